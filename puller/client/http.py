"""The registry client's core: requests with auth and retries over one
connection pool, and the distribution API on top of them.

    async with RegistryClient(ClientOptions(...)) as client:
        manifest = await client.get_manifest(ref, "latest")       # -> FetchedManifest
        async with client.blob(ref, digest, offset=0) as response: ...
        await client.blob_size(ref, digest)                        # HEAD, None if absent
        await client.put_manifest(ref, "v1", body, media_type)
        ...

The rooms of the library (puller.client), each used only from above:

    reference   Docker's reference rules and platforms over storage.oci's grammar
    transport   HTTP/1.1: asyncio + h11, a keep-alive pool
    policy      retries, redirects, where Authorization may go
    auth        challenges, scopes, credentials (Docker's config), realm policy
    tokens      the bearer-token flow and its cache
    endpoints   per host: scheme (TLS probed for loopback), challenge, credentials
    options     ClientOptions
    http        this module

Auth: the first request to a host pings /v2/ to learn its challenge; Basic
sends stored credentials; Bearer gets a token for the scopes of the request
(puller.client.tokens). A 401 with a new challenge (e.g. insufficient_scope)
gets one retry; a second 401 is an AuthError. Authorization is never sent to
another host after a redirect (blob downloads are often redirected to object
storage).

Manifest requests (GET, PUT) to one registry run at most
MANIFEST_REQUESTS_PER_REGISTRY at a time, whatever the caller gathers (an
index of thousands of platforms); blob transfers have their own bound
(options.concurrency) in pull and push.

Errors: the tree in puller.errors; manifests and descriptors are checked by
puller.oci (ContentError, a ManifestError). No wording for a command line
here: the library is meant to be used from inside the server too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from urllib.parse import urlencode, urljoin, urlsplit

from puller.client import policy
from puller.client.auth import Credentials, Scope, challenges_from_headers, merge_scopes, parse_scope_list
from puller.client.endpoints import Endpoint, Endpoints
from puller.client.options import ClientOptions
from puller.client.reference import Reference
from puller.client.transport import Response, Transport, TransportOptions
from puller.errors import (AuthError, ClientError, ContentError, DigestMismatchError, LoginRequired, ManifestError,
                           NotFoundError, RegistryResponseError, TransportError)
from puller.oci import Descriptor, ImageIndex, ImageManifest, check_document_size, parse_config, parse_manifest
from storage.oci import digests, media
from storage.oci.names import is_digest

# Manifest requests in flight per registry. An index may list thousands of
# platforms; gathering them all at once opened one connection each and ran
# out of file descriptors. 8 is what skopeo and containerd allow per host,
# and at least the default blob concurrency, so a pull's peak stays at 8.
MANIFEST_REQUESTS_PER_REGISTRY = 8
ERROR_BODY = 64 * 1024          # what is read of an error answer


@dataclass(frozen=True)
class FetchedManifest:
    data: bytes
    media_type: str
    digest: str
    json: dict                              # the document, every field the client uses checked
    parsed: ImageManifest | ImageIndex      # the same, typed (puller.oci)

    @classmethod
    def from_bytes(cls, data: bytes, digest: str, media_type: str | None, where: str) -> "FetchedManifest":
        parsed = parse_manifest(data, media_type, where)
        return cls(data=data, media_type=parsed.media_type, digest=digest, json=parsed.json, parsed=parsed)

    @property
    def is_index(self) -> bool:
        return self.parsed.is_index

    def descriptor(self) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data)}


class RegistryClient:
    def __init__(self, options: ClientOptions | None = None):
        self.options = options or ClientOptions()
        self._transport: Transport | None = None
        self._endpoints = Endpoints(self.options, lambda: self.transport)
        self._tokens = None             # puller.client.tokens.BearerTokens, made when a registry asks
        self._manifest_slots: dict[str, asyncio.Semaphore] = {}

    # -- lifecycle ------------------------------------------------------------------
    async def __aenter__(self) -> "RegistryClient":
        self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def open(self) -> None:
        if self._transport is None:
            options = self.options
            self._transport = Transport(TransportOptions(
                insecure=options.insecure, ca_file=options.ca_file, connect_timeout=options.connect_timeout,
                read_timeout=options.read_timeout, user_agent=options.user_agent))

    async def close(self) -> None:
        if self._transport is not None:
            await self._transport.close()
            self._transport = None

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            self.open()
        return self._transport

    # -- auth -------------------------------------------------------------------------------
    async def endpoint(self, host: str) -> Endpoint:
        return await self._endpoints.get(host)

    def _bearer_tokens(self):
        """The token flow (puller.client.tokens.BearerTokens), made on first use:
        only a registry that wants tokens pays for its import."""
        if self._tokens is None:
            from puller.client.tokens import BearerTokens
            self._tokens = BearerTokens(lambda: self.transport, self.options.retries)
        return self._tokens

    async def _authorization(self, host: str, endpoint: Endpoint, scopes: list[Scope],
                             force: bool = False) -> str | None:
        for challenge in endpoint.challenges:
            if challenge.scheme == "bearer" and challenge.realm:
                return "Bearer " + await self._bearer_tokens().token(host, endpoint.base, challenge, scopes,
                                                                     endpoint.credentials, force)
        for challenge in endpoint.challenges:
            if challenge.scheme == "basic" and not endpoint.credentials.anonymous:
                return endpoint.credentials.basic_header()
        return None

    # -- requests -------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def request(self, method: str, host: str, path_or_url: str, *, scopes: list[Scope],
                      headers: dict | None = None, data: bytes | Callable[[], object] | None = None,
                      params: dict | None = None, follow_redirects: bool = True,
                      retry: bool = True) -> AsyncIterator[Response]:
        """Send one request with auth (one retry after a 401 challenge), retrying
        transient failures when `retry`. `data` is bytes or a zero-argument
        callable returning a fresh async iterator of bytes (so a body can be
        sent again)."""
        endpoint = await self.endpoint(host)
        url = path_or_url if "://" in path_or_url else endpoint.base + path_or_url
        if params:
            url += ("&" if "?" in url else "?") + urlencode(params)
        scopes = merge_scopes(scopes)
        attempts = self.options.retries if retry else 0
        attempt = 0
        reauthed = False        # one fresh credential per request, not counted as a retry
        while True:
            auth = await self._authorization(host, endpoint, scopes, force=False)
            try:
                response = await policy.send(self.transport, method, url, headers or {}, data,
                                             follow_redirects=follow_redirects, auth=auth,
                                             auth_origin=policy.origin(endpoint.base))
            except policy.TRANSIENT_ERRORS as exc:
                if attempt >= attempts:
                    raise TransportError(f"{method} {urlsplit(url).path} on {host} failed: "
                                         f"{policy.describe(exc)}") from exc
                attempt += 1
                await asyncio.sleep(policy.backoff(attempt))
                continue
            if response.status == 401 and not reauthed:
                challenges = challenges_from_headers(response.headers.getall("WWW-Authenticate"))
                response.release()
                if challenges:
                    endpoint.challenges = challenges
                    for challenge in challenges:
                        if challenge.scheme == "bearer":
                            scopes = merge_scopes(scopes + parse_scope_list(challenge.params.get("scope", "")))
                reauthed = True
                # drop the cached token for these scopes and fetch a new one
                if await self._authorization(host, endpoint, scopes, force=True) is None:
                    raise LoginRequired(host)
                continue
            if response.status == 401:
                _, message = policy.registry_error(await response.read(ERROR_BODY))
                response.release()
                if endpoint.credentials.anonymous:
                    raise LoginRequired(host)
                raise AuthError(f"authentication to {host} failed: {message or 'unauthorized'}")
            if response.status in policy.RETRYABLE_STATUS and attempt < attempts:
                response.release()
                attempt += 1
                await asyncio.sleep(policy.backoff(attempt))
                continue
            try:
                yield response
            finally:
                response.release()
            return

    async def error_for(self, response: Response, what: str) -> ClientError:
        code, message = policy.registry_error(await response.read(ERROR_BODY))
        if response.status == 404:
            return NotFoundError(f"{what}: not found" + (f" ({message})" if message else ""))
        if response.status == 403:
            return AuthError(f"{what}: denied" + (f" ({message})" if message else ""))
        return RegistryResponseError(f"{what}: registry answered {response.status}"
                                     + (f" {code}" if code else "") + (f": {message}" if message else ""),
                                     response.status, code)

    # -- manifests --------------------------------------------------------------------------
    def manifest_slots(self, host: str) -> asyncio.Semaphore:
        """The bound on manifest requests in flight to `host` (see MANIFEST_REQUESTS_PER_REGISTRY)."""
        slots = self._manifest_slots.get(host)
        if slots is None:
            slots = self._manifest_slots[host] = asyncio.Semaphore(MANIFEST_REQUESTS_PER_REGISTRY)
        return slots

    async def get_manifest(self, ref: Reference, identifier: str | None = None,
                           accept: str = media.MANIFEST_ACCEPT) -> FetchedManifest:
        identifier = identifier or ref.identifier
        what = f"manifest {ref.name}{'@' if is_digest(identifier) else ':'}{identifier}"
        scopes = [Scope.repository(ref.repository, "pull")]
        async with self.manifest_slots(ref.api_host):
            async with self.request("GET", ref.api_host, f"/v2/{ref.repository}/manifests/{identifier}",
                                    scopes=scopes, headers={"Accept": accept}) as response:
                if response.status != 200:
                    raise await self.error_for(response, what)
                data = await read_document(response, self.options.max_manifest_size, what)
                header_type = media.essence(response.headers.get("Content-Type"))
        return self._check_manifest(what, identifier, data, header_type)

    def _check_manifest(self, what: str, identifier: str, data: bytes, header_type: str) -> FetchedManifest:
        if is_digest(identifier):
            algorithm = identifier.split(":", 1)[0]
            try:
                actual = digests.digest_of(data, algorithm)
            except ValueError:
                raise ManifestError(f"{what}: unsupported digest algorithm {algorithm}") from None
            if actual != identifier:
                raise ManifestError(f"{what}: content does not match its digest (got {actual})")
            digest = actual
        else:
            digest = digests.digest_of(data)
        return FetchedManifest.from_bytes(data, digest, header_type or None, what)

    async def put_manifest(self, ref: Reference, identifier: str, data: bytes, media_type: str) -> dict:
        scopes = [Scope.repository(ref.repository, "pull", "push")]
        async with self.manifest_slots(ref.api_host):
            async with self.request("PUT", ref.api_host, f"/v2/{ref.repository}/manifests/{identifier}",
                                    scopes=scopes, headers={"Content-Type": media_type}, data=data) as response:
                if response.status not in (200, 201, 202):
                    raise await self.error_for(response, f"push manifest {ref.name}:{identifier}")
                return {"digest": response.headers.get("Docker-Content-Digest"),
                        "subject": response.headers.get("OCI-Subject")}

    async def referrers(self, ref: Reference, digest: str) -> list[Descriptor]:
        """Descriptors of manifests whose subject is `digest`: the referrers API,
        or the referrers tag schema (sha256-<hex>) when the API answers 404."""
        scopes = [Scope.repository(ref.repository, "pull")]
        what = f"referrers of {ref.name}@{digest}"
        async with self.request("GET", ref.api_host, f"/v2/{ref.repository}/referrers/{digest}",
                                scopes=scopes, headers={"Accept": media.OCI_INDEX}) as response:
            if response.status == 200:
                listed = parse_manifest(await read_document(response, self.options.max_manifest_size, what),
                                        media.OCI_INDEX, what)
                if not listed.is_index:
                    raise ContentError(f"{what}: the answer is not an index")
                return list(listed.manifests)
            if response.status not in (404, 405, 400):
                raise await self.error_for(response, what)
        tag = digest.replace(":", "-")
        try:
            fallback = await self.get_manifest(ref, tag, accept=media.OCI_INDEX)
        except NotFoundError:
            return []
        if not fallback.is_index:
            raise ContentError(f"{what}: the referrers tag {tag} is not an index")
        return list(fallback.parsed.manifests)

    # -- blobs ------------------------------------------------------------------------------
    async def blob_size(self, ref: Reference, digest: str, *, push: bool = False) -> int | None:
        """HEAD a blob: its size, or None when the repository lacks it."""
        actions = ("pull", "push") if push else ("pull",)
        scopes = [Scope.repository(ref.repository, *actions)]
        async with self.request("HEAD", ref.api_host, f"/v2/{ref.repository}/blobs/{digest}",
                                scopes=scopes) as response:
            if response.status == 404:
                return None
            if response.status != 200:
                raise await self.error_for(response, f"blob {digest} in {ref.name}")
            return response.content_length or 0

    @contextlib.asynccontextmanager
    async def blob(self, ref: Reference, digest: str, offset: int = 0) -> AsyncIterator[Response]:
        """GET a blob from `offset` (Range); yields the 200/206 response."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        scopes = [Scope.repository(ref.repository, "pull")]
        async with self.request("GET", ref.api_host, f"/v2/{ref.repository}/blobs/{digest}",
                                scopes=scopes, headers=headers) as response:
            if response.status not in (200, 206):
                raise await self.error_for(response, f"blob {digest} in {ref.name}")
            yield response

    async def get_config(self, ref: Reference, descriptor: Descriptor) -> dict:
        """An image config read whole: capped like a manifest (by its
        descriptor before the request, and while reading), digest verified."""
        what = f"config {descriptor.digest} of {ref.name}"
        check_document_size(descriptor, self.options.max_manifest_size, what)
        async with self.blob(ref, descriptor.digest) as response:
            data = await read_document(response, descriptor.size, what)
        if len(data) != descriptor.size or not digests.matches(data, descriptor.digest):
            raise DigestMismatchError(f"{what}: content does not match its descriptor")
        return parse_config(data, what)

    async def start_upload(self, ref: Reference, mount: str | None = None,
                           mount_from: str | None = None) -> str | None:
        """POST an upload session. With `mount`/`mount_from`, try a cross-repository
        mount first: returns None when the blob was mounted, else the upload URL."""
        scopes = [Scope.repository(ref.repository, "pull", "push")]
        params = None
        if mount and mount_from:
            scopes.append(Scope.repository(mount_from, "pull"))
            params = {"mount": mount, "from": mount_from}
        async with self.request("POST", ref.api_host, f"/v2/{ref.repository}/blobs/uploads/", scopes=scopes,
                                params=params, headers={"Content-Length": "0"}, data=b"") as response:
            if response.status == 201 and params:
                return None
            if response.status != 202:
                raise await self.error_for(response, f"start upload to {ref.name}")
            location = response.headers.get("Location")
            if not location:
                raise RegistryResponseError(f"upload to {ref.name}: no Location in the answer")
            return policy.redirect_target(response.url, location, f"upload location from {ref.api_host}")

    async def upload_blob(self, ref: Reference, location: str, digest: str, size: int,
                          read_chunks: Callable[[int, int], AsyncIterator[bytes]],
                          on_progress: Callable[[int], None] | None = None) -> None:
        """Upload `size` bytes to the session at `location`. `read_chunks(start,
        length)` yields the blob's bytes; small blobs go in one PUT, large ones in
        PATCH chunks with Content-Range, then a closing PUT with the digest."""
        scopes = [Scope.repository(ref.repository, "pull", "push")]
        host = ref.api_host
        what = f"upload {digest} to {ref.name}"

        def body(start: int, length: int):
            async def generate():
                async for chunk in read_chunks(start, length):
                    if on_progress:
                        on_progress(len(chunk))
                    yield chunk
            return generate()

        if size <= self.options.monolithic_limit:
            async with self.request("PUT", host, location, scopes=scopes, params={"digest": digest},
                                    headers={"Content-Type": "application/octet-stream",
                                             "Content-Length": str(size)},
                                    data=lambda: body(0, size), retry=False) as response:
                if response.status not in (201, 204):
                    raise await self.error_for(response, what)
            return
        offset = 0
        step = self.options.upload_chunk_size
        while offset < size:
            length = min(step, size - offset)
            async with self.request("PATCH", host, location, scopes=scopes,
                                    headers={"Content-Type": "application/octet-stream",
                                             "Content-Range": f"{offset}-{offset + length - 1}",
                                             "Content-Length": str(length)},
                                    data=lambda o=offset, n=length: body(o, n), retry=False) as response:
                if response.status != 202:
                    raise await self.error_for(response, what)
                location = urljoin(response.url, response.headers.get("Location") or location)
            offset += length
        async with self.request("PUT", host, location, scopes=scopes, params={"digest": digest},
                                headers={"Content-Length": "0"}, data=b"", retry=False) as response:
            if response.status not in (201, 204):
                raise await self.error_for(response, what)

    async def check_login(self, host: str) -> Credentials:
        """Log in to `host` with its credentials as `docker login` does, and
        return what to save. Basic: GET /v2/ must answer 200, and the
        credentials are saved as given. Bearer: the password is exchanged for
        a token with offline access (BearerTokens.login), which GET /v2/ must
        then accept; when the token server issued a refresh token, that is
        the identity token saved with the user name, in place of the password.
        A registry that asks for nothing: the credentials as given."""
        endpoint = await self.endpoint(host)
        creds = endpoint.credentials
        if not endpoint.challenges:
            return creds
        identity = None
        for challenge in endpoint.challenges:
            if challenge.scheme == "bearer" and challenge.realm:
                identity = await self._bearer_tokens().login(host, endpoint.base, challenge, creds)
                break
        async with self.request("GET", host, "/v2/", scopes=[]) as response:
            if response.status != 200:
                raise await self.error_for(response, f"login to {host}")
        if identity:
            return Credentials(creds.username, None, identity)
        return creds


async def read_document(response: Response, limit: int, what: str) -> bytes:
    """The body of a JSON document read whole (manifest, config, referrers):
    refused when it announces, or turns out to be, larger than `limit`."""
    if response.content_length is not None and response.content_length > limit:
        raise ManifestError(f"{what}: {response.content_length} bytes exceeds the {limit} byte limit")
    data = await response.read(limit)
    if len(data) > limit:
        raise ManifestError(f"{what}: exceeds the {limit} byte limit")
    return data
