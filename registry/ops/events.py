"""Registry events, written to an outbox in storage before the request answers.

Events: a manifest pushed (and, pushed by tag, the tag set), a blob pushed
(an upload finished or a blob mounted), a manifest pulled (GET, 200), a
manifest, tag or blob deleted. One outbox entry is written for each event
and each endpoint whose filters (repository globs, actions) take it, under
storage.layout.event_entry; a failed write fails the request (500), so
nothing a client was told succeeded goes unannounced. registry.ops.webhooks
delivers the entries and removes each only on a 2xx answer: at least once,
across restarts and crashes, by exactly one of several replicas at a time.

The event is the format's body as it will be sent (CloudEvents 1.0 JSON, or
CNCF Distribution's notification envelope); its id is the entry's, the same
on every attempt, so a receiver can drop repeats.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import secrets
import socket
import time
from typing import Any, Awaitable, Callable

from aiohttp import web

from registry.auth.gate import caller_of
from registry.protocol import DIGEST_HEADER
from registry.settings import EventEndpointSettings, EventsSettings
from registry.state import STORE
from storage import layout

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CLOUDEVENTS_TYPE = "application/cloudevents+json"
DISTRIBUTION_TYPE = "application/vnd.docker.distribution.events.v1+json"
_INSTANCE = secrets.token_hex(8)


def new_entry_id() -> str:
    # time first: the outbox lists oldest first, so delivery keeps push order
    return f"e{time.time_ns():020d}-{secrets.token_hex(6)}"


def _is_digest(reference: str) -> bool:
    return ":" in reference


def events_of(request: web.Request, response: web.StreamResponse) -> list[dict[str, Any]]:
    """What happened, from a finished request: [{action, target}] (none for most requests)."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else ""
    method, status, info = request.method, response.status, request.match_info
    name = info.get("name", "")
    digest = response.headers.get(DIGEST_HEADER, "")
    out: list[dict[str, Any]] = []
    if route.endswith("/manifests/{reference}"):
        reference = info.get("reference", "")
        tag = "" if _is_digest(reference) else reference
        base = {"repository": name, "digest": digest or (reference if not tag else ""),
                "mediaType": response.headers.get("Content-Type", "") if method == "GET"
                else request.headers.get("Content-Type", "")}
        if method == "PUT" and status == 201:
            out.append({"action": "push", "target": {**base, "size": request.content_length or 0, "tag": tag}})
            if tag:
                out.append({"action": "tag", "target": {**base, "tag": tag}})
        elif method == "GET" and status == 200:
            out.append({"action": "pull", "target": {**base, "size": response.content_length or 0, "tag": tag}})
        elif method == "DELETE" and status == 202:
            out.append({"action": "delete", "target": {"repository": name, "digest": "" if tag else reference,
                                                        "tag": tag}})
    elif route.endswith("/blobs/uploads/{upload_id}") and method == "PUT" and status == 201 \
            or route.endswith("/blobs/uploads/") and method == "POST" and status == 201:
        out.append({"action": "push", "target": {"repository": name, "digest": digest,
                                                 "mediaType": "application/octet-stream"}})
    elif route.endswith("/blobs/{digest}") and method == "DELETE" and status == 202:
        out.append({"action": "delete", "target": {"repository": name, "digest": info.get("digest", "")}})
    return out


def takes(endpoint: EventEndpointSettings, action: str, repository: str) -> bool:
    if endpoint.actions and action not in endpoint.actions:
        return False
    return not endpoint.repositories or any(fnmatch.fnmatchcase(repository, glob)
                                            for glob in endpoint.repositories)


def body_of(fmt: str, entry_id: str, event: dict[str, Any], request: web.Request,
            request_id: str = "") -> dict[str, Any]:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    target = {k: v for k, v in event["target"].items() if v not in ("", None)}
    user = caller_of(request).user or ""
    host = request.host
    if fmt == "distribution":
        if "size" in target:
            target["length"] = target["size"]
        ref = target.get("tag") or target.get("digest", "")
        sep = ":" if target.get("tag") else "@"
        if ref and event["action"] != "delete" and "manifests" in request.path:
            target["url"] = f"{request.scheme}://{host}/v2/{target['repository']}/manifests/{ref}"
        return {"events": [{
            "id": entry_id, "timestamp": now, "action": event["action"], "target": target,
            "request": {"id": request_id, "addr": request.remote or "",
                        "host": host, "method": request.method,
                        "useragent": request.headers.get("User-Agent", "")},
            "actor": {"name": user} if user else {},
            "source": {"addr": f"{socket.gethostname()}", "instanceID": _INSTANCE},
        }]}
    kind = "blob" if "/blobs/" in request.path else "manifest"
    subject = target["repository"] + (f":{target['tag']}" if target.get("tag") else
                                      f"@{target['digest']}" if target.get("digest") else "")
    return {"specversion": "1.0", "id": entry_id, "source": f"/dockyard/{host}",
            "type": f"dev.dockyard.{kind}.{event['action']}", "time": now, "subject": subject,
            "datacontenttype": "application/json",
            "data": {**target, **({"actor": user} if user else {})}}


def events_middleware(settings: EventsSettings):
    """Inside the error middleware (a failed outbox write is a 500 in OCI
    JSON), outside auth (a refused request made no event)."""
    endpoints = settings.endpoints

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if response.status < 300 and request.method in ("GET", "PUT", "POST", "DELETE"):
            events = events_of(request, response)
            if events:
                await write_outbox(request, events, endpoints, settings.format)
        return response

    return middleware


async def write_outbox(request: web.Request, events: list[dict[str, Any]],
                       endpoints: tuple[EventEndpointSettings, ...], fmt: str) -> None:
    from registry.ops.middleware import REQUEST_ID

    request_id = request.get(REQUEST_ID, "")
    driver = request.config_dict[STORE].driver
    for event in events:
        for endpoint in endpoints:
            if not takes(endpoint, event["action"], event["target"]["repository"]):
                continue
            entry_id = new_entry_id()
            record = {"url": endpoint.url, "format": fmt, "body": body_of(fmt, entry_id, event, request, request_id)}
            await driver.put_content(layout.event_record(entry_id),
                                     json.dumps(record, separators=(",", ":")).encode())
