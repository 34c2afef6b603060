"""Small pieces of the HTTP protocol shared by the handlers: header names,
media types, URL building, query parsing and request-body streaming."""

from __future__ import annotations

import asyncio
import re
from typing import AsyncIterator
from urllib.parse import urlencode

from aiohttp import web
from aiohttp.streams import StreamReader

from registry.errors import BODY_TIMED_OUT, BodyTimeout, ContentRangeInvalid
from storage.oci.errors import PaginationNumberInvalid
from registry.state import SETTINGS

DIGEST_HEADER = "Docker-Content-Digest"
UPLOAD_UUID_HEADER = "Docker-Upload-UUID"
OCI_SUBJECT_HEADER = "OCI-Subject"
OCI_TAG_HEADER = "OCI-Tag"
OCI_FILTERS_HEADER = "OCI-Filters-Applied"

JSON = "application/json"
OCTET_STREAM = "application/octet-stream"

# Bodies are handed to storage in pieces of about this size: big enough that
# each write (one thread hop) is worth it, small enough to bound memory.
STREAM_CHUNK = 1 << 20

_CONTENT_RANGE_RE = re.compile(r"^(?:bytes[ =])?(\d+)-(\d+)(?:/(?:\d+|\*))?$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def absolute(request: web.Request, path: str) -> str:
    """path as the Location/Link target: relative, or absolute when configured."""
    if request.app[SETTINGS].http.relative_urls:
        return path
    # Behind a TLS proxy the client's view is in X-Forwarded-* (as Distribution reads it).
    headers = request.headers
    scheme = headers.get("X-Forwarded-Proto", "").split(",", 1)[0].strip() or request.scheme
    host = headers.get("X-Forwarded-Host", "").split(",", 1)[0].strip() or request.host
    return f"{scheme}://{host}{path}"


def blob_path(name: str, digest: str) -> str:
    return f"/v2/{name}/blobs/{digest}"


def manifest_path(name: str, reference: str) -> str:
    return f"/v2/{name}/manifests/{reference}"


def upload_path(name: str, upload_id: str) -> str:
    return f"/v2/{name}/blobs/uploads/{upload_id}"


def range_header(offset: int) -> str:
    """The upload's `Range` header: inclusive end of what was received, "0-0" when empty."""
    return f"0-{max(offset - 1, 0)}"


def next_link(path: str, n: int, last: str) -> str:
    return f'<{path}?{urlencode({"n": n, "last": last})}>; rel="next"'


def parse_page_size(request: web.Request) -> int | None:
    raw = request.query.get("n")
    if raw is None or raw == "":
        return None
    try:
        n = int(raw, 10)
    except ValueError:
        raise PaginationNumberInvalid(f"n must be a non-negative integer, got {raw!r}",
                                      {"n": raw}) from None
    if n < 0:
        raise PaginationNumberInvalid(f"n must be a non-negative integer, got {raw!r}", {"n": raw})
    return n


def parse_content_range(value: str) -> tuple[int, int]:
    """(start, end) inclusive of an upload chunk's Content-Range."""
    match = _CONTENT_RANGE_RE.match(value.strip())
    if not match:
        raise ContentRangeInvalid(f"malformed Content-Range {value!r}", {"Content-Range": value})
    start, end = int(match.group(1)), int(match.group(2))
    if end < start:
        raise ContentRangeInvalid(f"Content-Range end before start: {value!r}", {"Content-Range": value})
    return start, end


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """(start, end) inclusive for a single `Range: bytes=...` within size;
    None when unsatisfiable. ValueError when not a single byte range."""
    match = _RANGE_RE.match(value.strip())
    if not match or (match.group(1) == "" and match.group(2) == ""):
        raise ValueError(value)
    first, last = match.group(1), match.group(2)
    if first == "":                       # suffix: the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            return None
        return max(size - length, 0), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or (last != "" and int(last) < start):
        return None
    return start, end


def has_body(request: web.Request) -> bool:
    return request.body_exists


async def _read_piece(content: StreamReader, timeout: float) -> bytes:
    """What the body has buffered, else the next bytes to arrive within
    timeout seconds (TimeoutError); b"" at its end. The timer is only set
    when there is nothing to read yet: most reads of a fast upload find
    bytes waiting, and a timer per read cost ~5 us."""
    data = content.read_nowait()
    if data or content.at_eof():
        return data
    async with asyncio.timeout(timeout):
        return await content.readany()


def _body_timeout(request: web.Request) -> float:
    return request.app[SETTINGS].http.body_timeout


async def body_chunks(request: web.Request, size: int = STREAM_CHUNK) -> AsyncIterator[bytes]:
    """The request body in pieces of about `size` bytes, never whole in memory.

    When no byte arrives for http.body_timeout seconds the pieces simply end
    (after what came), and the request is marked so that the error
    middleware answers 408 and closes the connection: an upload thus keeps
    every byte that arrived (the store writes what it was given when the
    pieces end, not when they fail), and the digest or size check the
    consumer makes next cannot pass on a short body."""
    content = request.content
    timeout = _body_timeout(request)
    buf = bytearray()
    while True:
        try:
            data = await _read_piece(content, timeout)
        except TimeoutError:
            request[BODY_TIMED_OUT] = timeout
            break
        if not data:
            break
        if not buf and len(data) >= size:
            yield data
            continue
        buf += data
        if len(buf) >= size:
            yield bytes(buf)
            buf.clear()
    if buf:
        yield bytes(buf)


async def read_limited(request: web.Request, limit: int, too_large: Exception) -> bytes:
    """The whole body, or `too_large` as soon as it passes limit bytes;
    BodyTimeout when no byte arrives for http.body_timeout seconds."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise too_large
    content = request.content
    timeout = _body_timeout(request)
    buf = bytearray()
    while True:
        try:
            data = await _read_piece(content, timeout)
        except TimeoutError:
            request[BODY_TIMED_OUT] = timeout
            raise BodyTimeout(f"no request body data for {timeout:g}s") from None
        if not data:
            return bytes(buf)
        buf += data
        if len(buf) > limit:
            raise too_large
