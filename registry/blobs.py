"""Blob handlers: GET/HEAD (file copied to the socket from a thread, single Range), DELETE."""

from __future__ import annotations

import logging

from aiohttp import web

from registry.errors import API_VERSION, API_VERSION_HEADER
from registry.protocol import DIGEST_HEADER, OCTET_STREAM, parse_range
from registry.filesend import SendWatchdog, send_file, socket_of

# Bytes per write when a blob is streamed rather than sent from its file
# (TLS): 256 KiB chunks sent 64 MiB over TLS 8-10% faster than 1 MiB ones
# (less memory-BIO growth and copying in the SSL layer; 128 KiB was slower).
_STREAM_CHUNK = 256 * 1024
from registry.state import FILE_SEND_POOL, FILE_SENDS_WAITING, SETTINGS, STORE
from storage.blobs import BlobInfo
from storage.driver import SizedStream, StorageError
from storage.oci.errors import OciError, Unsupported
from storage.oci.names import parse_digest, validate_name

log = logging.getLogger("dockyard.registry")

# Blobs never change under a digest: let caches keep them.
_CACHE_CONTROL = "max-age=31536000"


def _name_and_digest(request: web.Request) -> tuple[str, str]:
    name = request.match_info["name"]
    digest = request.match_info["digest"]
    validate_name(name)
    parse_digest(digest)
    return name, digest


async def get_blob(request: web.Request) -> web.StreamResponse:
    name, digest = _name_and_digest(request)
    return await serve_blob(request, name, digest)


async def serve_blob(request: web.Request, name: str, digest: str) -> web.StreamResponse:
    """GET/HEAD of a blob storage holds in repository name (also the pull-through cache's)."""
    store = request.app[STORE]
    whole = None
    if request.method == "HEAD":          # pushers asking whether to upload: ask storage
        info = await store.blobs.stat(name, digest)
    elif _streams_whole_from_storage(request):
        # a backend of requests (S3): the link's check and the bytes' GET together
        whole = await store.blobs.open_linked(name, digest, _STREAM_CHUNK)
        info = BlobInfo(digest, whole.size)
    else:
        info = await store.blobs.stat_for_pull(name, digest)
    try:
        return await _send_blob(request, info, whole)
    finally:
        if whole is not None:
            await whole.aclose()


def _streams_whole_from_storage(request: web.Request) -> bool:
    """A GET of the whole blob that will be streamed from storage: neither
    sent from a local file nor redirected, and no Range asked."""
    return (not request.app[STORE].driver.local_files and "Range" not in request.headers
            and not request.app[SETTINGS].storage.redirect)


async def _send_blob(request: web.Request, info: BlobInfo,
                     whole: SizedStream | None) -> web.StreamResponse:
    store = request.app[STORE]
    headers = {
        DIGEST_HEADER: info.digest,
        "Accept-Ranges": "bytes",
        "Cache-Control": _CACHE_CONTROL,
        "Content-Type": OCTET_STREAM,
        "ETag": f'"{info.digest}"',
        API_VERSION_HEADER: API_VERSION,   # prepared here: the middleware comes too late
    }
    if request.method == "HEAD":
        headers["Content-Length"] = str(info.size)
        return web.Response(status=200, headers=headers)

    if request.app[SETTINGS].storage.redirect:
        url = await store.blobs.url(info.digest)
        if url:
            return web.Response(status=307, headers={"Location": url, DIGEST_HEADER: info.digest})

    span = _requested_span(request, info.size, headers)
    if span is None:
        return web.Response(status=416, headers={
            "Content-Range": f"bytes */{info.size}", DIGEST_HEADER: info.digest})
    status, start, length = span
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = length

    send_timeout = request.app[SETTINGS].http.send_timeout
    local = await store.blobs.open_local(info.digest) if socket_of(request) is not None else None
    if local is not None:
        # send_file closes the descriptor
        return await send_file(request, response, local.detach(), start, length,
                               request.app[FILE_SEND_POOL], request.app[FILE_SENDS_WAITING],
                               send_timeout)

    await response.prepare(request)
    watchdog = SendWatchdog(request, send_timeout)
    try:
        if length:
            chunks = whole if whole is not None else store.blobs.read(info.digest, start, length, _STREAM_CHUNK)
            async for chunk in chunks:
                watchdog.handed += len(chunk)
                await response.write(chunk)
        await response.write_eof()
    except ConnectionError as exc:
        # The client went away, or the watchdog cut a client that read nothing.
        log.debug("blob %s to %s broke off mid-body: %s", info.digest, request.remote, exc)
        if request.transport is not None:
            request.transport.abort()
    except (OciError, StorageError, OSError) as exc:
        # Headers are gone already: the only honest signal left is a cut connection.
        log.warning("blob %s broke off mid-body: %s", info.digest, exc)
        if request.transport is not None:
            request.transport.close()
    finally:
        watchdog.cancel()
    return response


def _requested_span(request: web.Request, size: int,
                    headers: dict[str, str]) -> tuple[int, int, int] | None:
    """(status, start, length) for the Range header, if any; None: 416."""
    value = request.headers.get("Range")
    if not value:
        return 200, 0, size
    try:
        span = parse_range(value, size)
    except ValueError:
        return 200, 0, size        # not one byte range: ignore it, send everything
    if span is None:
        return None
    start, end = span
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return 206, start, end - start + 1


async def delete_blob(request: web.Request) -> web.Response:
    name, digest = _name_and_digest(request)
    if not request.app[SETTINGS].storage.delete_enabled:
        raise Unsupported("deletion is disabled on this registry")
    await request.app[STORE].blobs.unlink(name, digest)
    return web.Response(status=202)
