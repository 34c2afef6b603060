"""Content discovery: the version check, tags list, catalog and referrers."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlencode

from aiohttp import web

from registry.auth.gate import caller_of
from registry.protocol import JSON, OCI_FILTERS_HEADER, absolute, next_link, parse_page_size
from registry.state import SETTINGS, STORE
from storage.oci.errors import NameUnknown
from storage.oci.media import OCI_INDEX
from storage.oci.names import parse_digest, validate_name

_BASE_BODY = b"{}"
# A page of referrers above this many descriptors is encoded off the loop
# (2,000 took about half a second of JSON work).
_ENCODE_ON_LOOP_MAX = 64


async def base(request: web.Request) -> web.Response:
    """GET /v2/: this is a registry/2.0 (the middleware adds the header)."""
    return web.Response(body=_BASE_BODY, content_type=JSON)


def _json(data: object, headers: dict[str, str] | None = None,
          content_type: str = JSON) -> web.Response:
    return web.Response(body=json.dumps(data, separators=(",", ":")).encode(),
                        content_type=content_type, headers=headers)


async def list_tags(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    validate_name(name)
    n = parse_page_size(request)
    last = request.query.get("last") or None
    store = request.app[STORE]
    if n == 0:
        # Still 404 for an unknown repository; never a Link header.
        await store.manifests.tags(name, 1, last)
        return _json({"name": name, "tags": []})
    page = await store.manifests.tags(name, n, last)
    headers = None
    if page.has_more and page.items and n is not None:
        headers = {"Link": next_link(absolute(request, f"/v2/{name}/tags/list"), n, page.items[-1])}
    return _json({"name": name, "tags": page.items}, headers)


async def catalog(request: web.Request) -> web.Response:
    limit = request.app[SETTINGS].limits.catalog_max_entries
    n = parse_page_size(request)
    n = limit if n is None else min(n, limit)
    last = request.query.get("last") or None
    if n == 0:
        return _json({"repositories": []})
    page = await request.app[STORE].catalog.repositories(n, last)
    caller = caller_of(request)
    # Only what the caller may pull is listed; the page may come out short,
    # and the Link still continues after the last repository looked at.
    shown = page.items if caller.sees_everything else [r for r in page.items if caller.may_see(r)]
    headers = None
    if page.has_more and page.items:
        headers = {"Link": next_link(absolute(request, "/v2/_catalog"), n, page.items[-1])}
    return _json({"repositories": shown}, headers)


async def referrers(request: web.Request) -> web.Response:
    """GET /v2/<name>/referrers/<digest>[?artifactType=][&n=][&last=]: an image
    index of the referrers, a page at a time (spec, "Listing Referrers": a
    Link header with rel="next" when the list does not fit one answer)."""
    name = request.match_info["name"]
    digest = request.match_info["digest"]
    validate_name(name)
    parse_digest(digest)
    artifact_type = request.query.get("artifactType") or None
    limit = request.app[SETTINGS].limits.referrers_max_entries
    n = parse_page_size(request)
    n = limit if n is None else min(n, limit)
    last = request.query.get("last") or None
    descriptors: list[dict] = []
    if n > 0:
        try:
            # one more than the page holds tells whether another page follows
            descriptors = await request.app[STORE].manifests.referrers(name, digest, artifact_type,
                                                             n=n + 1, last=last)
        except NameUnknown:
            descriptors = []  # the API is supported: an empty list, never a 404
    headers = {OCI_FILTERS_HEADER: "artifactType"} if artifact_type else {}
    if len(descriptors) > n:
        descriptors = descriptors[:n]
        query = {"n": n, "last": descriptors[-1]["digest"]}
        if artifact_type:
            query["artifactType"] = artifact_type
        path = absolute(request, f"/v2/{name}/referrers/{digest}")
        headers["Link"] = f'<{path}?{urlencode(query)}>; rel="next"'
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
    if len(descriptors) > _ENCODE_ON_LOOP_MAX:
        body = await asyncio.to_thread(_encode, index)
    else:
        body = _encode(index)
    return web.Response(body=body, content_type=OCI_INDEX, headers=headers or None)


def _encode(data: object) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()
