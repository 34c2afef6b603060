"""The one table that maps an OCI error to its HTTP status, and the one
middleware that renders every error.

Handlers and the content store raise the OCI vocabulary's errors
(`storage.oci.errors`, each naming its code and knowing nothing of HTTP) or
the few HTTP-level ones below; `error_middleware` turns each into

    HTTP <status>   {"errors": [{"code": ..., "message": ..., "detail": ...}]}

and stamps `Docker-Distribution-API-Version` on every response.

    OciError                           (storage/oci/errors.py: code + message + detail)
    ├── BlobUnknown, DigestInvalid, ManifestInvalid, NameUnknown, ... by code
    ├── BlobUploadInvalid
    │   ├── RangeInvalid               416 + Range: where the upload stands
    │   ├── ContentRangeInvalid        416: a malformed or inconsistent Content-Range
    │   ├── BodyIncomplete             the client broke off its request body
    │   └── BodyTimeout                408: the request body stopped arriving
    ├── SizeInvalid
    │   └── ManifestTooLarge           413 (also any body over the manifest limit)
    ├── Unsupported
    │   └── MethodNotAllowed           405 (aiohttp's own)
    ├── UpstreamUnavailable            502: a pull-through cache's upstream failed
    │   └── UpstreamTimeout            504: ... did not answer in time
    └── RouteNotFound                  404 NOT_FOUND (aiohttp's own)

An error may carry response headers in `headers` (with_headers).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from storage.driver import StorageError
from storage.oci.errors import (BlobUploadInvalid, ManifestTooLarge, OciError, RangeInvalid,
                                Unsupported)

log = logging.getLogger("dockyard.registry")

API_VERSION_HEADER = "Docker-Distribution-API-Version"
API_VERSION = "registry/2.0"


@dataclass(frozen=True)
class ErrorSpec:
    status: int
    message: str


# code -> (HTTP status, default message).
ERRORS: dict[str, ErrorSpec] = {
    "BLOB_UNKNOWN": ErrorSpec(404, "blob unknown to registry"),
    "BLOB_UPLOAD_INVALID": ErrorSpec(400, "blob upload invalid"),
    "BLOB_UPLOAD_UNKNOWN": ErrorSpec(404, "blob upload unknown to registry"),
    "DIGEST_INVALID": ErrorSpec(400, "provided digest did not match uploaded content"),
    "MANIFEST_BLOB_UNKNOWN": ErrorSpec(400, "manifest references a manifest or blob unknown to registry"),
    "MANIFEST_INVALID": ErrorSpec(400, "manifest invalid"),
    "MANIFEST_UNKNOWN": ErrorSpec(404, "manifest unknown to registry"),
    "MANIFEST_UNVERIFIED": ErrorSpec(400, "manifest failed signature verification"),
    "NAME_INVALID": ErrorSpec(400, "invalid repository name"),
    "NAME_UNKNOWN": ErrorSpec(404, "repository name not known to registry"),
    "SIZE_INVALID": ErrorSpec(400, "provided length did not match content length"),
    "TAG_INVALID": ErrorSpec(400, "manifest tag did not match URI"),
    "PAGINATION_NUMBER_INVALID": ErrorSpec(400, "invalid number of results requested"),
    "UNAUTHORIZED": ErrorSpec(401, "authentication required"),
    "DENIED": ErrorSpec(403, "requested access to the resource is denied"),
    "UNSUPPORTED": ErrorSpec(405, "the operation is unsupported"),
    "TOOMANYREQUESTS": ErrorSpec(429, "too many requests"),
    "NOT_FOUND": ErrorSpec(404, "no such endpoint"),
    "UNKNOWN": ErrorSpec(500, "unknown error"),
}


class ContentRangeInvalid(BlobUploadInvalid):
    """Content-Range malformed or inconsistent with the body."""


class BodyIncomplete(BlobUploadInvalid):
    """The client broke off its request body."""


class BodyTimeout(BlobUploadInvalid):
    """No byte of the request body for http.body_timeout seconds (then close)."""


class RouteNotFound(OciError):
    code = "NOT_FOUND"


class MethodNotAllowed(Unsupported):
    pass


class UpstreamUnavailable(OciError):
    """The pull-through cache's upstream could not give what storage lacks
    (refused, timed out, 5xx, a redirect not allowed): 502, naming the upstream."""


class UpstreamTimeout(UpstreamUnavailable):
    """The upstream did not answer in time: 504."""


# The cases that share a code with a commoner one but have a status of their
# own (the spec's 413 for an oversized manifest, 416 for an out-of-order chunk).
# Looked up along the class's ancestry before the code table.
_STATUS_BY_KIND: dict[type, int] = {
    ManifestTooLarge: 413,
    RangeInvalid: 416,
    ContentRangeInvalid: 416,
    BodyTimeout: 408,
    MethodNotAllowed: 405,
    UpstreamUnavailable: 502,
    UpstreamTimeout: 504,
}


def status_of(exc: OciError) -> int:
    for kind in type(exc).__mro__:
        if kind in _STATUS_BY_KIND:
            return _STATUS_BY_KIND[kind]
    return (ERRORS.get(exc.code) or ERRORS["UNKNOWN"]).status


def with_headers(exc: OciError, headers: dict[str, str]) -> OciError:
    """exc, answered with these response headers too."""
    exc.headers = {**getattr(exc, "headers", {}), **headers}
    return exc


# Set on a request (to the timeout, in seconds) whose body stopped arriving:
# whatever the handler made of the short body, the answer is a 408 and the
# connection is closed (the rest of the body may never come).
BODY_TIMED_OUT = "dockyard.body_timed_out"
# Headers of an upload answer worth keeping in the 408: where the upload stands.
_RESUME_HEADERS = ("Location", "Range", "Docker-Upload-UUID")


def error_body(code: str, message: str, detail: Any = None) -> bytes:
    entry: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        entry["detail"] = detail
    return json.dumps({"errors": [entry]}).encode()


def error_response(exc: OciError) -> web.Response:
    spec = ERRORS.get(exc.code) or ERRORS["UNKNOWN"]
    status = status_of(exc)
    headers = dict(getattr(exc, "headers", None) or {})
    if isinstance(exc, RangeInvalid):
        # The chunk did not start where the upload stands: say where it stands.
        headers["Range"] = f"0-{max(exc.offset - 1, 0)}"
    if status == 429:
        headers.setdefault("Retry-After", "1")
    return web.Response(status=status, body=error_body(exc.code, exc.message or spec.message, exc.detail),
                        content_type="application/json", headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except OciError as exc:
        response = error_response(exc)
    except web.HTTPException as exc:
        if exc.status == 404:
            response = error_response(RouteNotFound(f"no route for {request.method} {request.path}"))
        elif exc.status == 405:
            allowed = exc.headers.get("Allow", "")
            response = error_response(with_headers(MethodNotAllowed(
                f"method {request.method} not allowed"), {"Allow": allowed}))
        elif exc.status == 413:
            response = error_response(ManifestTooLarge("request body too large"))
        else:
            raise
    except (ConnectionError, HttpProcessingError) as exc:
        # The client went away or sent a broken body mid-request: nothing to
        # answer it, nothing for the log but a line at debug level.
        log.debug("connection broken on %s %s from %s: %s", request.method, request.path,
                  request.remote, exc)
        response = error_response(BodyIncomplete(f"request body incomplete: {exc}"))
    except StorageError as exc:
        # A backend failure the store did not map: log it, answer 500 without internals.
        log.error("storage error on %s %s: %s", request.method, request.path, exc)
        response = error_response(OciError("storage backend error"))
    except Exception:
        # A bug: the traceback goes to the log, the client gets the usual JSON shape.
        log.exception("unhandled error on %s %s", request.method, request.path)
        response = error_response(OciError("internal server error"))
    timed_out = request.get(BODY_TIMED_OUT)
    if timed_out is not None and not response.prepared:
        response = await _answer_and_close(request, response, timed_out)
    if not response.prepared:
        response.headers[API_VERSION_HEADER] = API_VERSION
    return response


async def _answer_and_close(request: web.Request, answer: web.StreamResponse,
                            timeout: float) -> web.StreamResponse:
    """408 for a request whose body stopped arriving, then close the
    connection: aiohttp would otherwise wait (up to 10 s) for the rest of a
    body that is not coming before it lets the connection go."""
    log.info("request body of %s %s from %s stopped arriving: no data for %gs",
             request.method, request.path, request.remote, timeout)
    response = error_response(BodyTimeout(f"no request body data for {timeout:g}s"))
    for name in _RESUME_HEADERS:
        if name in answer.headers:
            response.headers[name] = answer.headers[name]
    response.headers[API_VERSION_HEADER] = API_VERSION
    response.force_close()
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        pass
    request.protocol.force_close()
    return response
