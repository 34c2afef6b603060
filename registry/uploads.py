"""Blob upload handlers: start (POST, with monolithic and mount variants),
chunk (PATCH), status (GET), finish (PUT), cancel (DELETE).

Upload sessions live in storage, so any worker process can continue one;
bodies are streamed to storage in pieces, never read whole.
"""

from __future__ import annotations

from aiohttp import web

from registry.auth.gate import EVERYONE, caller_of
from registry.errors import ContentRangeInvalid, with_headers
from registry.protocol import (DIGEST_HEADER, UPLOAD_UUID_HEADER, absolute, blob_path,
                               body_chunks, has_body, parse_content_range, range_header,
                               upload_path)
from registry.state import STORE
from storage.blobs import BlobInfo
from storage.oci.digests import digest_of
from storage.oci.errors import DigestInvalid, NameInvalid
from storage.oci.names import ALGORITHMS, parse_digest, validate_name
from storage.uploads import UploadStatus

_EMPTY_DIGESTS = {digest_of(b"", alg) for alg in ALGORITHMS}


def _upload_response(request: web.Request, status: int, upload: UploadStatus) -> web.Response:
    return web.Response(status=status, headers={
        "Location": absolute(request, upload_path(upload.repo, upload.upload_id)),
        "Range": range_header(upload.offset),
        UPLOAD_UUID_HEADER: upload.upload_id,
    })


def _created_response(request: web.Request, name: str, info: BlobInfo) -> web.Response:
    return web.Response(status=201, headers={
        "Location": absolute(request, blob_path(name, info.digest)),
        DIGEST_HEADER: info.digest,
    })


def _name(request: web.Request) -> str:
    name = request.match_info["name"]
    validate_name(name)
    return name


def _upload_id(request: web.Request) -> str:
    return request.match_info["upload_id"]


async def start_upload(request: web.Request) -> web.Response:
    """POST /v2/<name>/blobs/uploads/ [?digest= | ?mount=&from= | ?digest-algorithm=]"""
    name = _name(request)
    store = request.app[STORE]
    query = request.query

    mount = query.get("mount")
    if mount:
        parse_digest(mount)
        from_repo = query.get("from") or None
        if from_repo is not None:
            try:
                validate_name(from_repo)
            except NameInvalid:
                from_repo = ""  # never matches: fall back to an ordinary upload
        info = None
        if from_repo != "":
            # Only a repository the caller may pull from is mounted from
            # (Zot CVE-2024-39897); without `from`, only those are searched.
            caller = caller_of(request)
            readable = None if caller is EVERYONE else caller.may_pull
            info = await store.blobs.mount(name, mount, from_repo, readable=readable)
        if info is not None:
            return _created_response(request, name, info)
        # Not mountable: an ordinary upload session (202), as the spec allows.

    algorithm = query.get("digest-algorithm")
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise DigestInvalid(f"unsupported digest algorithm {algorithm!r}", {"digest-algorithm": algorithm})

    digest = query.get("digest")
    if digest and not mount:
        parse_digest(digest)
        if has_body(request) or digest in _EMPTY_DIGESTS:
            info = await store.uploads.put(name, digest, body_chunks(request),
                                        size=request.content_length)
            return _created_response(request, name, info)

    upload = await store.uploads.start(name)
    return _upload_response(request, 202, upload)


def _chunk_start(request: web.Request) -> int | None:
    """The chunk's start offset from Content-Range, checked against Content-Length."""
    value = request.headers.get("Content-Range")
    if not value:
        return None
    start, end = parse_content_range(value)
    length = request.content_length
    if length is not None and length != end - start + 1:
        raise ContentRangeInvalid(
            f"Content-Range {value!r} does not match Content-Length {length}",
            {"Content-Range": value, "Content-Length": length})
    return start


async def _with_range(request: web.Request, name: str, upload_id: str, exc: ContentRangeInvalid):
    """Attach Range/Location to a 416 so the client can resume."""
    status = await request.app[STORE].uploads.status(name, upload_id)
    return with_headers(exc, {"Range": range_header(status.offset),
                              "Location": absolute(request, upload_path(name, upload_id)),
                              UPLOAD_UUID_HEADER: upload_id})


async def patch_upload(request: web.Request) -> web.Response:
    """PATCH <location>: append a chunk (Content-Range checked) or a stream."""
    name, upload_id = _name(request), _upload_id(request)
    store = request.app[STORE]
    try:
        start = _chunk_start(request)
    except ContentRangeInvalid as exc:
        raise await _with_range(request, name, upload_id, exc) from None
    upload = await store.uploads.append(name, upload_id, body_chunks(request), start=start)
    return _upload_response(request, 202, upload)


async def upload_status(request: web.Request) -> web.Response:
    name, upload_id = _name(request), _upload_id(request)
    upload = await request.app[STORE].uploads.status(name, upload_id)
    return _upload_response(request, 204, upload)


async def finish_upload(request: web.Request) -> web.Response:
    """PUT <location>?digest=: optional final chunk, verify, commit."""
    name, upload_id = _name(request), _upload_id(request)
    store = request.app[STORE]
    digest = request.query.get("digest")
    if not digest:
        # Say whether the session exists first: an unknown one is the bigger problem.
        await store.uploads.status(name, upload_id)
        raise DigestInvalid("the digest query parameter is required", {"digest": None})
    parse_digest(digest)
    chunks, start = None, None
    if has_body(request):
        try:
            start = _chunk_start(request)
        except ContentRangeInvalid as exc:
            raise await _with_range(request, name, upload_id, exc) from None
        chunks = body_chunks(request)
    info = await store.uploads.finish(name, upload_id, digest, chunks, start=start)
    return _created_response(request, name, info)


async def cancel_upload(request: web.Request) -> web.Response:
    name, upload_id = _name(request), _upload_id(request)
    await request.app[STORE].uploads.cancel(name, upload_id)
    return web.Response(status=204)
