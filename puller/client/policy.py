"""How the registry client retries and follows redirects, and where
credentials may go: one request, followed through redirects, with
Authorization sent to one origin only.

    send(transport, method, url, headers, body, follow_redirects=..., auth=..., auth_origin=...)
    redirect_target(url, location, what)    an http(s) URL or RegistryResponseError
    backoff(attempt)                        seconds to wait before retry `attempt`
    registry_error(body)                    (code, message) of an OCI error body

Transient failures (TRANSIENT_ERRORS, RETRYABLE_STATUS) are worth a retry;
a refused redirect or a certificate nobody trusts is not: the next answer
would say the same. Redirects go to http(s) URLs only: another scheme
(file:, ftp:) is a RegistryResponseError, never retried.
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urljoin, urlsplit

from puller.client.transport import Response, Transport
from puller.errors import AuthError, RegistryResponseError, TransportFailure

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
TRANSIENT_ERRORS = (TransportFailure, asyncio.TimeoutError)
REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 10
REDIRECT_SCHEMES = ("http", "https")
IDENTITY = {"Accept-Encoding": "identity"}   # bytes as stored: digests are over them

Origin = tuple[str, str, "int | None"]


def backoff(attempt: int) -> float:
    return min(0.2 * 2 ** attempt, 3)


def origin(url: str) -> Origin:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def registry_error(body: bytes) -> tuple[str | None, str]:
    """(code, message) of the first error of an OCI error body; for any other
    body, its first line (shortened)."""
    try:
        errors = json.loads(body).get("errors") or []
        first = errors[0]
        return first.get("code"), first.get("message") or first.get("code") or ""
    except (ValueError, AttributeError, IndexError, TypeError, KeyError, RecursionError):
        text = body.decode(errors="replace").strip().splitlines()
        return None, (text[0][:200] if text else "")


def redirect_target(url: str, location: str, what: str) -> str:
    """The absolute URL a registry points to (redirect, upload Location, next
    page), resolved against `url`: only http(s) URLs with a host are followed."""
    shown = location if len(location) <= 80 else location[:77] + "..."
    try:
        target = urljoin(url, location.strip())
        parts = urlsplit(target)
        parts.port                      # a malformed port raises here, not later
    except ValueError:
        raise RegistryResponseError(f"{what} {shown!r} refused: not a valid URL") from None
    if parts.scheme.lower() not in REDIRECT_SCHEMES or not parts.hostname:
        raise RegistryResponseError(f"{what} {shown!r} refused: only http and https URLs are followed")
    return target


def describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


async def send(transport: Transport, method: str, url: str, headers: dict, body, *, follow_redirects: bool,
               auth: str | None, auth_origin: Origin | None, body_origin: Origin | None = None) -> Response:
    """One request, following redirects; `auth` goes only to `auth_origin`,
    and with `body_origin` the body too (a redirect elsewhere is refused)."""
    for _ in range(MAX_REDIRECTS):
        request_headers = {**IDENTITY, **headers}
        if auth and origin(url) == auth_origin:
            request_headers["Authorization"] = auth
        response = await transport.send(method, url, headers=request_headers, body=body)
        if not follow_redirects or response.status not in REDIRECTS:
            return response
        location = response.headers.get("Location")
        response.release()
        source = urlsplit(url).netloc
        if not location:
            raise RegistryResponseError(f"redirect without Location from {source}")
        url = redirect_target(url, location, f"redirect from {source} to")
        if response.status == 303 or (response.status in (301, 302) and method == "POST"):
            method, body = "GET", None
            headers = {k: v for k, v in headers.items() if k.lower() not in ("content-type", "content-length")}
        if body is not None and body_origin is not None and origin(url) != body_origin:
            raise AuthError(f"{source} redirected a request carrying credentials to "
                            f"{urlsplit(url).netloc}: refused")
    raise RegistryResponseError("too many redirects")
