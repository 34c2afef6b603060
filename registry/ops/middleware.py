"""The one middleware every request passes first: request ID, timing,
figures and the access line. Outside the error middleware, so it sees the
status the client gets; one clock read at each end serves all three."""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable

from aiohttp import web

from registry.ops import metrics
from registry.ops.requestlog import (ACCESS_LOG, REQUEST_ID_HEADER, AccessWriter, request_id_of,
                                     request_id_var, safe_query)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# request[REQUEST_ID]; aiohttp before 3.11 keys requests by plain strings
REQUEST_ID = web.RequestKey("request_id", str) if hasattr(web, "RequestKey") else "dockyard_request_id"
_UPLOAD_METHODS = frozenset(("POST", "PATCH", "PUT"))
TOKEN_ROUTE = "/auth/token"


def _route_of(request: web.Request) -> str:
    info = request.match_info
    route = info.route
    resource = route.resource
    if resource is None:                         # 404 / 405 of the router: one label for all
        return "unmatched"
    return resource.canonical


class _Series:
    """Label children looked up once per (route, method, status): labels()
    takes a lock and builds a tuple on every call."""

    def __init__(self) -> None:
        self.duration: dict[tuple[str, str, int], Any] = {}
        self.bytes_in: dict[tuple[str, str], Any] = {}
        self.bytes_out: dict[tuple[str, str], Any] = {}

    def observe(self, route: str, method: str, status: int, seconds: float, sent: int, received: int):
        key = (route, method, status)
        child = self.duration.get(key)
        if child is None:
            child = self.duration[key] = metrics.REQUEST_DURATION.labels(route, method, str(status))
        child.observe(seconds)
        if sent:
            out = self.bytes_out.get(key[:2])
            if out is None:
                out = self.bytes_out[key[:2]] = metrics.RESPONSE_BYTES.labels(route, method)
            out.inc(sent)
        if received:
            got = self.bytes_in.get(key[:2])
            if got is None:
                got = self.bytes_in[key[:2]] = metrics.REQUEST_BYTES.labels(route, method)
            got.inc(received)


def _sent_bytes(request: web.Request, response: web.StreamResponse | None) -> int:
    """Body bytes of the response (its Content-Length; what a chunked one wrote)."""
    if response is None or request.method == "HEAD":
        return 0
    length = response.content_length
    if length is not None:
        return length
    if response.prepared:
        return response.body_length     # chunked: counts its head too, near enough
    body = getattr(response, "body", None)
    return len(body) if isinstance(body, (bytes, bytearray)) else 0


def ops_middleware(*, metrics_on: bool, access_log: bool, log_format: str = "text",
                   writer: AccessWriter | None = None):
    """`writer`: where access lines go (default: a batching writer to stderr
    when the access logger is enabled for info, as `dockyard serve` sets it)."""
    series = _Series()
    access = None
    if access_log and ACCESS_LOG.isEnabledFor(logging.INFO):
        access = writer or AccessWriter(log_format)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request_id_of(request.headers.get(REQUEST_ID_HEADER))
        request[REQUEST_ID] = rid
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status = 500
        response = None
        route = _route_of(request) if metrics_on or access is not None else ""
        uploading = metrics_on and request.method in _UPLOAD_METHODS and "/blobs/uploads" in route
        if metrics_on:
            metrics.IN_FLIGHT.inc()
            if uploading:
                metrics.UPLOADS_IN_PROGRESS.inc()
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            elapsed = time.perf_counter() - start
            sent = _sent_bytes(request, response)
            received = request.content.total_bytes if request.body_exists else 0
            if metrics_on:
                metrics.IN_FLIGHT.dec()
                series.observe(route, request.method, status, elapsed, sent, received)
                if uploading:
                    metrics.UPLOADS_IN_PROGRESS.dec()
                    metrics.UPLOAD_DURATION.labels(request.method).observe(elapsed)
                if status in (401, 403) and ("Authorization" in request.headers or route == TOKEN_ROUTE):
                    metrics.AUTH_FAILURES.labels(str(status)).inc()
                elif status == 200 and route == TOKEN_ROUTE:
                    metrics.TOKENS_ISSUED.inc()
            if access is not None:
                _log_access(access, request, rid, route, status, sent, received, elapsed)
            request_id_var.reset(token)

    return middleware


def _log_access(writer: AccessWriter, request: web.Request, rid: str, route: str, status: int, sent: int,
                received: int, elapsed: float) -> None:
    query = safe_query(request.query_string) if request.query_string else ""
    path = request.path
    target = f"{path}?{query}" if query else path
    remote = request.remote or "-"
    message = f'{remote} "{request.method} {target}" {status} {sent} {elapsed * 1000:.1f}ms'
    fields = {"remote": remote, "method": request.method, "path": path, "query": query, "route": route,
              "status": status, "bytes_sent": sent, "bytes_received": received,
              "duration_ms": round(elapsed * 1000, 3), "user_agent": request.headers.get("User-Agent", "")}
    writer.write(message, fields, rid, time.time())


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response, streamed ones and errors too, names its request."""
    rid = request.get(REQUEST_ID)
    if rid is not None:
        response.headers[REQUEST_ID_HEADER] = rid
