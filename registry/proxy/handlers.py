"""The pull-through cache's side of the HTTP API: the manifest and blob
GET/HEAD handlers the route table names (ordinary repositories pass straight
to registry.manifests / registry.blobs), the guard that refuses pushes into a
proxied prefix, the `OCI-Namespace` answer to `?ns=`, and the app context
that opens and closes the upstream clients.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from aiohttp import web

from registry import blobs, manifests
from registry.errors import API_VERSION, API_VERSION_HEADER
from registry.protocol import DIGEST_HEADER, OCTET_STREAM
from registry.proxy.cache import PULL_THROUGH, PullThrough
from registry.proxy.routing import Route
from registry.proxy.settings import ProxyConfigError
from registry.settings import Settings, SettingsError
from registry.state import STORE
from storage.oci.errors import BlobUnknown, OciError, Unsupported
from storage.oci.names import parse_digest, validate_name, validate_tag

log = logging.getLogger("dockyard.registry.proxy")

NAMESPACE_HEADER = "OCI-Namespace"
_NAMESPACE = web.RequestKey("proxy_namespace", str)   # the ns= value honoured
_PUSH_METHODS = ("PUT", "POST", "PATCH")


async def _route(request: web.Request) -> tuple[PullThrough, Route] | None:
    cache = request.app.get(PULL_THROUGH)
    if cache is None:
        return None
    name = request.match_info["name"]
    validate_name(name)
    route = await cache.resolve(name, request.query.get("ns"))
    if route is None:
        return None
    if route.namespace:
        request[_NAMESPACE] = route.namespace
    return cache, route


async def get_manifest(request: web.Request) -> web.StreamResponse:
    routed = await _route(request)
    if routed is None:
        return await manifests.get_manifest(request)
    cache, route = routed
    reference = request.match_info["reference"]
    if ":" in reference:
        parse_digest(reference)
    else:
        validate_tag(reference)
    return manifests.manifest_response(request, await cache.manifest(route, reference))


async def get_blob(request: web.Request) -> web.StreamResponse:
    routed = await _route(request)
    if routed is None:
        return await blobs.get_blob(request)
    cache, route = routed
    digest = request.match_info["digest"]
    request.app[STORE].blobs.check_digest(digest)
    if await cache.has_blob(route, digest):
        return await blobs.serve_blob(request, route.local, digest)
    if request.method == "HEAD":
        size = await cache.blob_size(route, digest)
        if size is None:
            raise BlobUnknown(f"blob unknown to {cache.upstream(route).label}: {route.remote}@{digest}",
                              {"digest": digest})
        return web.Response(status=200, headers={**_blob_headers(digest), "Content-Length": str(size)})
    fetch = cache.blob_fetch(route, digest)
    try:
        if request.headers.get("Range"):
            # a resumed download: once the blob is in, storage answers the range
            await fetch.done()
            return await blobs.serve_blob(request, route.local, digest)
        size = await fetch.ready()
        response = web.StreamResponse(status=200, headers=_blob_headers(digest))
        response.content_length = size
        await response.prepare(request)
        try:
            await fetch.stream(response.write)
            await response.write_eof()
        except ConnectionError as exc:
            log.debug("blob %s to %s broke off: %s (the fetch goes on)", digest, request.remote, exc)
            _cut(request)
        except OciError as exc:
            # Headers are gone: the client's only honest signal is a cut connection.
            log.warning("blob %s of %s cut off: %s", digest, route.local, exc)
            _cut(request)
        return response
    finally:
        fetch.release()


def _cut(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def _blob_headers(digest: str) -> dict[str, str]:
    return {DIGEST_HEADER: digest, "Content-Type": OCTET_STREAM, "ETag": f'"{digest}"',
            "Cache-Control": "max-age=31536000", API_VERSION_HEADER: API_VERSION}


@web.middleware
async def push_guard(request: web.Request, handler) -> web.StreamResponse:
    """Repositories under a proxied prefix hold the upstream's content only:
    pushes there are refused (405 UNSUPPORTED), as anywhere else they work."""
    cache = request.app.get(PULL_THROUGH)
    if cache is not None and request.method in _PUSH_METHODS:
        name = request.match_info.get("name")
        if name and cache.proxied(name):
            raise Unsupported(f"repository {name} is a pull-through cache of "
                              f"{cache.upstreams[cache.router.prefixed(name).prefix].label}: push refused",
                              {"name": name})
    return await handler(request)


async def _namespace_header(request: web.Request, response: web.StreamResponse) -> None:
    namespace = request.get(_NAMESPACE)
    if namespace:
        response.headers[NAMESPACE_HEADER] = namespace


def install(app: web.Application, settings: Settings) -> None:
    """The pull-through cache on app, when settings name upstreams."""
    if not settings.proxy.enabled:
        return
    app.on_response_prepare.append(_namespace_header)

    async def cache_ctx(app: web.Application) -> AsyncIterator[None]:
        try:
            # in a thread: a password_file is read here
            cache = await asyncio.to_thread(PullThrough, settings.proxy, app[STORE])
        except ProxyConfigError as exc:
            raise SettingsError(str(exc)) from None
        app[PULL_THROUGH] = cache
        try:
            yield
        finally:
            await cache.close()

    app.cleanup_ctx.append(cache_ctx)
