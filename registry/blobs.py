"""Blob handlers: GET/HEAD (sendfile, Range), DELETE."""

from __future__ import annotations

from aiohttp import web

from registry.errors import API_VERSION, API_VERSION_HEADER, UnsupportedOperation
from registry.protocol import DIGEST_HEADER, OCTET_STREAM, parse_range
from registry.state import SETTINGS, STORE
from storage.store import ContentStore

# Blobs never change under a digest: let caches keep them.
_CACHE_CONTROL = "max-age=31536000"


def _name_and_digest(request: web.Request) -> tuple[str, str]:
    name = request.match_info["name"]
    digest = request.match_info["digest"]
    ContentStore.validate_name(name)
    ContentStore.parse_digest(digest)
    return name, digest


async def get_blob(request: web.Request) -> web.StreamResponse:
    name, digest = _name_and_digest(request)
    store = request.app[STORE]
    info = await store.stat_blob(name, digest)
    headers = {
        DIGEST_HEADER: info.digest,
        "Accept-Ranges": "bytes",
        "Cache-Control": _CACHE_CONTROL,
        "Content-Type": OCTET_STREAM,
        "ETag": f'"{info.digest}"',
    }
    if request.method == "HEAD":
        headers["Content-Length"] = str(info.size)
        return web.Response(status=200, headers=headers)

    if request.app[SETTINGS].storage.redirect:
        url = await store.blob_url(info.digest)
        if url:
            return web.Response(status=307, headers={"Location": url, DIGEST_HEADER: info.digest})

    path = store.blob_local_path(info.digest)
    if path is not None:
        # aiohttp answers Range (206/416) itself and uses sendfile.
        del headers["ETag"]  # FileResponse sets its own validator
        return web.FileResponse(path, headers=headers)
    return await _stream_blob(request, store, info.digest, info.size, headers)


async def _stream_blob(request: web.Request, store: ContentStore, digest: str, size: int,
                       headers: dict[str, str]) -> web.StreamResponse:
    start, end, status = 0, size - 1, 200
    range_value = request.headers.get("Range")
    if range_value:
        try:
            span = parse_range(range_value, size)
        except ValueError:
            span = (0, size - 1) if size else None  # not a single byte range: ignore it, send all
            range_value = None
        if span is None:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{size}",
                                                     DIGEST_HEADER: digest})
        if range_value:
            start, end, status = span[0], span[1], 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    length = end - start + 1 if size else 0
    headers[API_VERSION_HEADER] = API_VERSION  # prepared here, so the middleware cannot add it
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = length
    await response.prepare(request)
    if length:
        async for chunk in store.read_blob(digest, start, length):
            await response.write(chunk)
    await response.write_eof()
    return response


async def delete_blob(request: web.Request) -> web.Response:
    name, digest = _name_and_digest(request)
    if not request.app[SETTINGS].storage.delete_enabled:
        raise UnsupportedOperation("deletion is disabled on this registry")
    await request.app[STORE].delete_blob(name, digest)
    return web.Response(status=202)
