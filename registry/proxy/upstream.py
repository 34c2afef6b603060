"""One upstream registry, reached through the client's registry library
(puller.client: endpoints, Basic and bearer-token auth, retries).

    upstream = Upstream(settings, allow_hosts)
    digest = await upstream.head_manifest("library/debian", "12")    # None: not there
    fetched = await upstream.get_manifest("library/debian", "12")     # UpstreamManifest
    size = await upstream.blob_size("library/debian", digest)
    async with upstream.open_blob("library/debian", digest) as response: ...

Redirects are followed here, not by the library: every hop, and the token
server the upstream's challenge names, must be a host proxy.allow_hosts
lists (without it, the upstream's own origin only), so a
configured or redirecting upstream cannot make the cache reach an internal
or metadata address; Authorization goes to the upstream's own origin only,
never to a redirect's host (blob storage).

Every failure leaves as a registry error naming the upstream, never with
its credentials: UpstreamUnavailable (502) when it is refused, broken or
answers 5xx, UpstreamTimeout (504), ManifestUnknown / BlobUnknown when the
upstream says it has no such thing, TooManyRequests passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import AsyncIterator
from urllib.parse import urlsplit

from puller.client import policy
from puller.client.auth import ANONYMOUS, Credentials, Scope
from puller.client.http import FetchedManifest, RegistryClient, read_document
from puller.client.options import ClientOptions
from puller.client.transport import Response
from puller.errors import AuthError, ClientError, ManifestError, TransportError
from registry.errors import UpstreamTimeout, UpstreamUnavailable
from registry.proxy.settings import UpstreamSettings, host_allowed, upstream_credentials
from storage.oci import digests, media
from storage.oci.content import stored_media_type
from storage.oci.errors import BlobUnknown, ManifestUnknown, OciError, TooManyRequests
from storage.oci.names import is_digest

log = logging.getLogger("dockyard.registry.proxy")

MAX_REDIRECTS = 5
ERROR_BODY = 16 * 1024


@dataclass(frozen=True)
class UpstreamManifest:
    body: bytes
    media_type: str              # as the bytes say (how the store serves it)
    digest: str                  # computed here, never taken from a header


class Upstream:
    def __init__(self, settings: UpstreamSettings, allow_hosts: tuple[str, ...] = (),
                 environ=None):
        self.settings = settings
        self.allow_hosts = allow_hosts
        parts = urlsplit(settings.url)
        self.scheme = parts.scheme
        self.host = parts.netloc.lower()
        self.label = f"upstream {settings.prefix} ({parts.scheme}://{self.host})"
        username, password = upstream_credentials(settings, environ)
        creds = Credentials(username, password) if username else ANONYMOUS
        self.client = RegistryClient(ClientOptions(
            plain_http=parts.scheme == "http", credentials=((self.host, creds),),
            retries=1, connect_timeout=settings.timeout, read_timeout=settings.timeout))
        self._origin = policy.origin(settings.url)

    async def close(self) -> None:
        await self.client.close()

    # -- where requests may go -------------------------------------------------------
    def allowed(self, url: str) -> bool:
        parts = urlsplit(url)
        if not self.allow_hosts:
            return policy.origin(url) == self._origin
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return host_allowed(parts.hostname or "", port, self.allow_hosts)

    def _failure(self, what: str, exc: BaseException) -> OciError:
        reason = policy.describe(exc)
        if isinstance(exc, asyncio.TimeoutError) or "timed out" in reason:
            return UpstreamTimeout(f"{what}: {self.label} did not answer in time",
                                   {"upstream": self.settings.prefix})
        return UpstreamUnavailable(f"{what}: {self.label} unavailable: {reason}",
                                   {"upstream": self.settings.prefix})

    @contextlib.asynccontextmanager
    async def _request(self, method: str, remote: str, path: str, what: str,
                       headers: dict | None = None) -> AsyncIterator[Response]:
        """One request upstream, redirects followed under allow_hosts; yields
        the final response whatever its status. Client errors become registry ones."""
        scopes = [Scope.repository(remote, "pull")]
        try:
            await self._check_token_realm(what)
            async with contextlib.AsyncExitStack() as stack:
                response = await stack.enter_async_context(self.client.request(
                    method, self.host, f"/v2/{remote}/{path}", scopes=scopes, headers=headers,
                    follow_redirects=False))
                for _ in range(MAX_REDIRECTS + 1):
                    if response.status not in policy.REDIRECTS:
                        break
                    location = response.headers.get("Location")
                    if not location:
                        raise UpstreamUnavailable(f"{what}: {self.label} redirected without Location")
                    target = policy.redirect_target(response.url, location, f"redirect from {self.label} to")
                    if not self.allowed(target):
                        shown = urlsplit(target).netloc
                        log.warning("%s: %s redirected to %s, not in proxy.allow_hosts: refused",
                                    what, self.label, shown)
                        raise UpstreamUnavailable(f"{what}: {self.label} redirected to {shown}, "
                                                  f"which proxy.allow_hosts does not list")
                    response.release()
                    # No Authorization: it belongs to the upstream's origin only.
                    response = await policy.send(self.client.transport, method, target, headers or {}, None,
                                                 follow_redirects=False, auth=None, auth_origin=None)
                    stack.callback(response.release)
                else:
                    raise UpstreamUnavailable(f"{what}: {self.label} redirected too often")
                yield response
        except OciError:
            raise
        except (TransportError, *policy.TRANSIENT_ERRORS) as exc:
            raise self._failure(what, exc) from exc
        except AuthError as exc:
            raise UpstreamUnavailable(f"{what}: {self.label} refused the cache's credentials",
                                      {"upstream": self.settings.prefix}) from exc
        except ClientError as exc:
            raise UpstreamUnavailable(f"{what}: {self.label}: {exc}",
                                      {"upstream": self.settings.prefix}) from exc

    async def _check_token_realm(self, what: str) -> None:
        """The token server the upstream names is contacted with the cache's
        credentials: it must be a host allow_hosts lists, like any redirect
        (checked on the upstream's /v2/ challenge, before a token is asked for)."""
        endpoint = await self.client.endpoint(self.host)
        for challenge in endpoint.challenges:
            realm = challenge.realm if challenge.scheme == "bearer" else None
            if realm and not self.allowed(realm):
                shown = urlsplit(realm).netloc or realm[:80]
                log.warning("%s: %s names the token server %s, not in proxy.allow_hosts: refused",
                            what, self.label, shown)
                raise UpstreamUnavailable(f"{what}: {self.label} names the token server {shown}, "
                                          f"which proxy.allow_hosts does not list")

    async def _check_status(self, response: Response, what: str, unknown: OciError) -> None:
        if response.status in (200, 206):
            return
        body = b""
        if response.status not in (304,):
            with contextlib.suppress(ClientError, asyncio.TimeoutError):
                body = await response.read(ERROR_BODY)
        code, message = policy.registry_error(body)
        if response.status == 404:
            raise unknown
        if response.status == 429:
            raise TooManyRequests(f"{what}: {self.label} asks to slow down (429)")
        detail = f" {code}" if code else ""
        raise UpstreamUnavailable(f"{what}: {self.label} answered {response.status}{detail}"
                                  + (f": {message}" if message else ""), {"upstream": self.settings.prefix})

    # -- manifests -------------------------------------------------------------------
    def _manifest_unknown(self, remote: str, reference: str) -> ManifestUnknown:
        return ManifestUnknown(f"manifest unknown to {self.label}: {remote}:{reference}",
                               {"name": remote, "reference": reference})

    async def head_manifest(self, remote: str, reference: str) -> str | None:
        """The digest the upstream has under reference (one HEAD), None when
        it has nothing there; a HEAD without Docker-Content-Digest: a GET."""
        what = f"manifest {remote}:{reference}"
        async with self._request("HEAD", remote, f"manifests/{reference}", what,
                                 {"Accept": media.MANIFEST_ACCEPT}) as response:
            if response.status == 404:
                return None
            await self._check_status(response, what, self._manifest_unknown(remote, reference))
            digest = response.headers.get("Docker-Content-Digest")
        if digest and is_digest(digest):
            return digest
        return (await self.get_manifest(remote, reference)).digest

    async def get_manifest(self, remote: str, reference: str) -> UpstreamManifest:
        what = f"manifest {remote}:{reference}"
        limit = self.client.options.max_manifest_size
        async with self._request("GET", remote, f"manifests/{reference}", what,
                                 {"Accept": media.MANIFEST_ACCEPT}) as response:
            await self._check_status(response, what, self._manifest_unknown(remote, reference))
            try:
                body = await read_document(response, limit, what)
            except (TransportError, *policy.TRANSIENT_ERRORS) as exc:
                raise self._failure(what, exc) from exc
            except ManifestError as exc:
                raise UpstreamUnavailable(f"{what}: {self.label}: {exc}") from exc
            header_type = media.essence(response.headers.get("Content-Type"))
        algorithm = reference.split(":", 1)[0] if is_digest(reference) else "sha256"
        digest = await asyncio.to_thread(digests.digest_of, body, algorithm) if len(body) > 65536 \
            else digests.digest_of(body, algorithm)
        if is_digest(reference) and digest != reference:
            raise UpstreamUnavailable(f"{what}: {self.label} sent content that does not match the digest "
                                      f"(got {digest})", {"upstream": self.settings.prefix})
        try:
            parsed = FetchedManifest.from_bytes(body, digest, header_type or None, what)
        except ClientError as exc:       # untrusted JSON, checked at the edge
            raise UpstreamUnavailable(f"{what}: {self.label} sent a manifest not to be used: {exc}",
                                      {"upstream": self.settings.prefix}) from exc
        return UpstreamManifest(body, stored_media_type(parsed.json), digest)

    # -- blobs -----------------------------------------------------------------------
    def _blob_unknown(self, remote: str, digest: str) -> BlobUnknown:
        return BlobUnknown(f"blob unknown to {self.label}: {remote}@{digest}", {"digest": digest})

    async def blob_size(self, remote: str, digest: str) -> int | None:
        """HEAD: the blob's size upstream, None when it has no such blob."""
        what = f"blob {remote}@{digest}"
        async with self._request("HEAD", remote, f"blobs/{digest}", what) as response:
            if response.status == 404:
                return None
            await self._check_status(response, what, self._blob_unknown(remote, digest))
            return response.content_length

    @contextlib.asynccontextmanager
    async def open_blob(self, remote: str, digest: str) -> AsyncIterator[Response]:
        """GET the whole blob; yields the 200 response (body not read yet)."""
        what = f"blob {remote}@{digest}"
        async with self._request("GET", remote, f"blobs/{digest}", what) as response:
            if response.status == 206:
                raise UpstreamUnavailable(f"{what}: {self.label} answered a whole-blob GET with 206")
            await self._check_status(response, what, self._blob_unknown(remote, digest))
            yield response

    def failure(self, what: str, exc: BaseException) -> OciError:
        """A body read that broke off, as a registry error naming the upstream."""
        if isinstance(exc, OciError):
            return exc
        return self._failure(what, exc)
