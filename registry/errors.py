"""The one table of OCI error codes and the one middleware that renders them.

Handlers raise domain errors (`storage.errors.StoreError` subclasses, or the
few HTTP-level ones below); `error_middleware` turns each into

    HTTP <status>   {"errors": [{"code": ..., "message": ..., "detail": ...}]}

and stamps `Docker-Distribution-API-Version` on every response.

    StoreError                    (storage/errors.py: code + message + detail)
    ├── BlobUnknown, DigestInvalid, ManifestInvalid, ... (store's domain)
    ├── RangeInvalid              (416 + Range: where the upload stands)
    ├── ManifestTooLarge          (413, code SIZE_INVALID; also a body over the limit)
    └── registry-level:
        ├── Unauthorized, Denied, TooManyRequests
        ├── PaginationNumberInvalid
        ├── BodyIncomplete        (the client broke off its request body)
        ├── BodyTimeout           (408: the request body stopped arriving)
        └── RouteNotFound, MethodNotAllowed (aiohttp's own 404/405)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from storage.driver import StorageError
from storage.errors import ManifestTooLarge, RangeInvalid, StoreError

log = logging.getLogger("dockyard.registry")

API_VERSION_HEADER = "Docker-Distribution-API-Version"
API_VERSION = "registry/2.0"


@dataclass(frozen=True)
class ErrorSpec:
    status: int
    message: str


# code -> (HTTP status, default message). The one place a code meets HTTP.
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
    "RANGE_INVALID": ErrorSpec(416, "invalid content range"),
    "UNAUTHORIZED": ErrorSpec(401, "authentication required"),
    "DENIED": ErrorSpec(403, "requested access to the resource is denied"),
    "UNSUPPORTED": ErrorSpec(405, "the operation is unsupported"),
    "TOOMANYREQUESTS": ErrorSpec(429, "too many requests"),
    "NOT_FOUND": ErrorSpec(404, "no such endpoint"),
    "UNKNOWN": ErrorSpec(500, "unknown error"),
}

# A few errors share a code with a more common case but need another status
# (the spec's 413 for an oversized manifest, 416 for an out-of-order chunk).
# They say so with a `status` attribute; everything else uses the table.


class RegistryError(StoreError):
    """An error raised by the HTTP layer itself (not the content store)."""

    status: int | None = None

    def __init__(self, message: str = "", detail: Any = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message, detail)
        self.headers = headers or {}


class Unauthorized(RegistryError):
    code = "UNAUTHORIZED"


class Denied(RegistryError):
    code = "DENIED"


class TooManyRequests(RegistryError):
    code = "TOOMANYREQUESTS"


class UnsupportedOperation(RegistryError):
    code = "UNSUPPORTED"


class PaginationNumberInvalid(RegistryError):
    code = "PAGINATION_NUMBER_INVALID"


class UploadRangeInvalid(RegistryError):
    """Content-Range malformed or inconsistent with the body (416)."""
    code = "BLOB_UPLOAD_INVALID"
    status = 416


class BodyIncomplete(RegistryError):
    code = "BLOB_UPLOAD_INVALID"


class BodyTimeout(RegistryError):
    """No byte of the request body for http.body_timeout seconds (408, then close)."""
    code = "BLOB_UPLOAD_INVALID"
    status = 408


# Set on a request (to the timeout, in seconds) whose body stopped arriving:
# whatever the handler made of the short body, the answer is a 408 and the
# connection is closed (the rest of the body may never come).
BODY_TIMED_OUT = "dockyard.body_timed_out"
# Headers of an upload answer worth keeping in the 408: where the upload stands.
_RESUME_HEADERS = ("Location", "Range", "Docker-Upload-UUID")


class RouteNotFound(RegistryError):
    code = "NOT_FOUND"


class MethodNotAllowed(RegistryError):
    code = "UNSUPPORTED"
    status = 405


def error_body(code: str, message: str, detail: Any = None) -> bytes:
    entry: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        entry["detail"] = detail
    return json.dumps({"errors": [entry]}).encode()


def error_response(exc: StoreError) -> web.Response:
    spec = ERRORS.get(exc.code) or ERRORS["UNKNOWN"]
    status = getattr(exc, "status", None) or spec.status
    headers = dict(getattr(exc, "headers", None) or {})
    if isinstance(exc, RangeInvalid):
        # The chunk did not start where the upload stands: 416 and where it stands.
        status = 416
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
    except StoreError as exc:
        response = error_response(exc)
    except web.HTTPException as exc:
        if exc.status == 404:
            response = error_response(RouteNotFound(f"no route for {request.method} {request.path}"))
        elif exc.status == 405:
            allowed = exc.headers.get("Allow", "")
            response = error_response(MethodNotAllowed(
                f"method {request.method} not allowed", headers={"Allow": allowed}))
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
        response = error_response(StoreError("storage backend error"))
    except Exception:
        # A bug: the traceback goes to the log, the client gets the usual JSON shape.
        log.exception("unhandled error on %s %s", request.method, request.path)
        response = error_response(StoreError("internal server error"))
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
