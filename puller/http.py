"""The registry HTTP client: auth, redirects, retries over one connection pool.

    async with RegistryClient(ClientOptions(...)) as client:
        manifest = await client.get_manifest(ref, "latest")       # -> FetchedManifest
        async with client.blob(ref, digest, offset=0) as response: ...
        await client.blob_size(ref, digest)                        # HEAD, None if absent
        await client.put_manifest(ref, "v1", body, media_type)
        ...

Transport: puller.transport (asyncio + h11, keep-alive pool); this module
adds the registry's semantics on top.

Scheme: HTTPS, except plain HTTP with --plain-http, or for a loopback
registry (localhost, 127.0.0.0/8, ::1) that does not speak TLS - probed
once per host, as Docker does for insecure registries.

Auth: the first request to a host pings /v2/ to learn its challenge; Basic
sends stored credentials; Bearer fetches a token from the realm for the
scopes of the request (OAuth2 POST when there are credentials, falling back
to GET on 404/405), cached per scope set until expiry. A 401 with a new
challenge (e.g. insufficient_scope) gets one retry; a second 401 is an
AuthError. Authorization is never sent to another host after a redirect
(blob downloads are often redirected to object storage), nor a token
request's credentials; a plain-HTTP realm is refused unless it is on the
host of a plain-HTTP loopback registry (puller.auth.check_realm). Redirects
go to http(s) URLs only: another scheme (file:, ftp:) is a permanent
RegistryResponseError, never retried.

Manifest requests (GET, HEAD, PUT) to one registry run at most
MANIFEST_REQUESTS_PER_REGISTRY at a time, whatever the caller gathers (an
index of thousands of platforms); blob transfers have their own bound
(options.concurrency) in pull and push.

Errors (one line each, for the CLI): the tree in puller.errors, re-exported
here; manifests and descriptors are checked by puller.oci (ContentError, a
ManifestError).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode, urljoin, urlsplit

from puller.auth import (ANONYMOUS, AuthError, Challenge, Credentials, CredentialError, DockerConfig, Scope,
                         TokenCache, challenges_from_headers, check_realm, merge_scopes, parse_scope_list,
                         token_from_response)
from puller.errors import (ClientError, DigestMismatchError, ManifestError, NotFoundError,  # noqa: F401 (re-exported)
                           RegistryResponseError, TransportError)
from puller.oci import (DOCKER_LIST, DOCKER_MANIFEST, DOCKER_SCHEMA1, INDEX_MEDIA_TYPES,  # noqa: F401
                        MANIFEST_MEDIA_TYPES, MAX_DOCUMENT_SIZE, OCI_INDEX, OCI_MANIFEST, ContentError, Descriptor,
                        ImageIndex, ImageManifest, check_document_size, parse_config, parse_json_object,
                        parse_manifest)
from puller.reference import Reference, is_loopback
from puller.transport import CertificateFailure, Response, Transport, TransportFailure, TransportOptions

MiB = 1024 * 1024
MAX_MANIFEST_SIZE = MAX_DOCUMENT_SIZE    # manifests, indexes, configs, referrers lists: read whole
USER_AGENT = "dockyard/0.1"
# Manifest requests in flight per registry. An index may list thousands of
# platforms; gathering them all at once opened one connection each and ran
# out of file descriptors. 8 is what skopeo and containerd allow per host,
# and at least the default blob concurrency, so a pull's peak stays at 8.
MANIFEST_REQUESTS_PER_REGISTRY = 8
REDIRECT_SCHEMES = ("http", "https")
ACCEPT_MANIFESTS = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
TRANSIENT_ERRORS = (TransportFailure, asyncio.TimeoutError)
REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 10


# AuthError and CredentialError (puller.auth) derive from ClientError too; the
# tuple stays for the CLIs that catch it
CLIENT_ERRORS = (ClientError, AuthError, CredentialError)


# -- options ----------------------------------------------------------------------

@dataclass(frozen=True)
class ClientOptions:
    plain_http: bool = False            # --plain-http: never TLS
    insecure: bool = False              # --insecure: TLS without verification
    ca_file: str | None = None          # --ca-file: extra CA bundle
    concurrency: int = 6                # parallel blob transfers
    retries: int = 5                    # per request / per blob (resumed)
    max_manifest_size: int = MAX_MANIFEST_SIZE   # every JSON document read whole: manifests, configs
    connect_timeout: float = 30.0
    read_timeout: float = 300.0         # between two reads of a body
    docker_config: str | None = None    # directory holding config.json (default $DOCKER_CONFIG, ~/.docker)
    credentials: tuple[tuple[str, Credentials], ...] = ()   # (registry, creds) overriding the config
    user_agent: str = USER_AGENT
    chunk_size: int = MiB               # read / hash / write granularity
    upload_chunk_size: int = 16 * MiB   # PATCH size for large uploads
    monolithic_limit: int = 16 * MiB    # blobs up to this size are uploaded with one PUT

    def credentials_for(self, registry: str) -> Credentials | None:
        for name, creds in self.credentials:
            if name == registry:
                return creds
        return None


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


@dataclass
class _Endpoint:
    base: str                                    # "https://host:port"
    challenges: list[Challenge] = field(default_factory=list)
    credentials: Credentials = ANONYMOUS


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def _registry_error(status: int, body: bytes) -> tuple[str | None, str]:
    try:
        errors = json.loads(body).get("errors") or []
        first = errors[0]
        return first.get("code"), first.get("message") or first.get("code") or ""
    except (ValueError, AttributeError, IndexError, TypeError, KeyError, RecursionError):
        text = body.decode(errors="replace").strip().splitlines()
        return None, (text[0][:200] if text else "")


class RegistryClient:
    def __init__(self, options: ClientOptions | None = None):
        self.options = options or ClientOptions()
        self._transport: Transport | None = None
        self._endpoints: dict[str, _Endpoint] = {}
        self._endpoint_locks: dict[str, asyncio.Lock] = {}
        self._token_locks: dict[tuple, asyncio.Lock] = {}
        self._manifest_slots: dict[str, asyncio.Semaphore] = {}
        self._tokens = TokenCache()
        self._docker_config = DockerConfig(self.options.docker_config)

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

    # -- endpoints and auth ---------------------------------------------------------------
    async def endpoint(self, host: str) -> _Endpoint:
        endpoint = self._endpoints.get(host)
        if endpoint:
            return endpoint
        lock = self._endpoint_locks.setdefault(host, asyncio.Lock())
        async with lock:
            if host in self._endpoints:
                return self._endpoints[host]
            registry_name = "docker.io" if host == "registry-1.docker.io" else host
            creds = self.options.credentials_for(registry_name) or self.options.credentials_for(host)
            if creds is None:
                creds = await asyncio.to_thread(self._docker_config.get, registry_name)
            endpoint = await self._probe(host)
            endpoint.credentials = creds
            self._endpoints[host] = endpoint
            return endpoint

    async def _probe(self, host: str) -> _Endpoint:
        """GET /v2/ to learn the scheme and the auth challenge."""
        schemes = ["https"]
        if self.options.plain_http:
            schemes = ["http"]
        elif is_loopback(host):
            # as Docker does for a loopback registry: TLS if it speaks TLS, else plain
            parts = urlsplit(f"//{host}")
            if await self.transport.speaks_tls(parts.hostname, parts.port or 443, timeout=10.0):
                schemes = ["https", "http"]
            else:
                schemes = ["http"]
        last: Exception | None = None
        for scheme in schemes:
            base = f"{scheme}://{host}"
            # a TLS attempt on a plain loopback port must not hang for the read timeout
            timeout = 10.0 if len(schemes) > 1 and scheme == "https" else None
            try:
                async with self.transport.request("GET", f"{base}/v2/", headers=_IDENTITY,
                                                  timeout=timeout) as response:
                    await response.read(64 * 1024)
                    challenges = challenges_from_headers(response.headers.getall("WWW-Authenticate"))
                    return _Endpoint(base=base, challenges=challenges if response.status == 401 else [])
            except CertificateFailure as exc:
                raise TransportError(f"{exc}; use --ca-file or --insecure") from None
            except TRANSIENT_ERRORS as exc:
                last = exc  # e.g. TLS spoken to a plain HTTP loopback registry
                continue
        raise TransportError(f"cannot reach registry {host}: {_describe(last)}")

    async def _authorization(self, host: str, endpoint: _Endpoint, scopes: list[Scope],
                             force: bool = False) -> str | None:
        for challenge in endpoint.challenges:
            if challenge.scheme == "bearer" and challenge.realm:
                return "Bearer " + await self._token(host, endpoint, challenge, scopes, force)
        for challenge in endpoint.challenges:
            if challenge.scheme == "basic" and not endpoint.credentials.anonymous:
                return endpoint.credentials.basic_header()
        return None

    async def _token(self, host: str, endpoint: _Endpoint, challenge: Challenge, scopes: list[Scope],
                     force: bool) -> str:
        realm = challenge.realm
        check_realm(realm, host, endpoint.base)
        service = challenge.params.get("service")
        creds = endpoint.credentials
        key = TokenCache.key(realm, service, scopes, creds.username or creds.identity_token)
        if not force:
            cached = self._tokens.get(key)
            if cached:
                return cached.value
        lock = self._token_locks.setdefault(key, asyncio.Lock())
        async with lock:
            if not force:
                cached = self._tokens.get(key)
                if cached:
                    return cached.value
            token = await self._fetch_token(host, realm, service, scopes, creds)
            self._tokens.put(key, token)
            return token.value

    async def _fetch_token(self, host: str, realm: str, service: str | None, scopes: list[Scope],
                           creds: Credentials):
        scope_strings = [str(s) for s in scopes]
        if creds.identity_token or (creds.username and creds.password):
            form = {"client_id": "dockyard", "access_type": "online"}
            if service:
                form["service"] = service
            if scope_strings:
                form["scope"] = " ".join(scope_strings)
            if creds.identity_token:
                form.update(grant_type="refresh_token", refresh_token=creds.identity_token)
            else:
                form.update(grant_type="password", username=creds.username, password=creds.password)
            status, body = await self._token_request(
                "POST", realm, body=urlencode(form).encode(), secret_body=True,
                headers={"Content-Type": "application/x-www-form-urlencoded"})
            if status not in (404, 405):
                return self._token_result(host, status, body)
            if not (creds.username and creds.password):
                creds = ANONYMOUS
        params: list[tuple[str, str]] = []
        if service:
            params.append(("service", service))
        params.extend(("scope", s) for s in scope_strings)
        basic = None
        if creds.username:
            params.append(("account", creds.username))
            basic = creds.basic_header()
        url = realm + ("&" if "?" in realm else "?") + urlencode(params) if params else realm
        status, body = await self._token_request("GET", url, auth=basic)
        return self._token_result(host, status, body)

    async def _token_request(self, method: str, url: str, *, headers: dict | None = None,
                             body: bytes | None = None, auth: str | None = None,
                             secret_body: bool = False) -> tuple[int, bytes]:
        realm_origin = _origin(url)
        for attempt in range(self.options.retries + 1):
            try:
                # the token server is its own origin: the credentials (a Basic
                # header, or a form with the password) go nowhere else, even
                # when it redirects
                response = await self._send(method, url, headers or {}, body, follow_redirects=True,
                                            auth=auth, auth_origin=realm_origin,
                                            body_origin=realm_origin if secret_body else None)
                try:
                    data = await response.read(64 * 1024)
                finally:
                    response.release()
                if response.status in RETRYABLE_STATUS and attempt < self.options.retries:
                    await asyncio.sleep(min(0.2 * 2 ** attempt, 3))
                    continue
                return response.status, data
            except TRANSIENT_ERRORS as exc:
                if attempt >= self.options.retries:
                    raise TransportError(f"token server {urlsplit(url).netloc} unreachable: {_describe(exc)}") from None
                await asyncio.sleep(min(0.2 * 2 ** attempt, 3))
        raise TransportError("token server unreachable")  # pragma: no cover

    def _token_result(self, host: str, status: int, body: bytes):
        if status in (401, 403):
            raise AuthError(f"authentication to {host} failed: incorrect username or password")
        if status != 200:
            _, message = _registry_error(status, body)
            raise AuthError(f"token server for {host} answered {status}: {message}".rstrip(": "))
        try:
            # lenient about NaN and Infinity here: token_from_response clamps expires_in
            answer = json.loads(body)
        except (ValueError, RecursionError):
            raise AuthError(f"token server for {host} answered something that is not JSON") from None
        return token_from_response(answer, where=f"token server for {host}")

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
                response = await self._send(method, url, headers or {}, data, follow_redirects, auth,
                                            _origin(endpoint.base))
            except TRANSIENT_ERRORS as exc:
                if attempt >= attempts:
                    raise TransportError(f"{method} {urlsplit(url).path} on {host} failed: {_describe(exc)}") from None
                attempt += 1
                await asyncio.sleep(min(0.2 * 2 ** attempt, 3))
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
                    raise AuthError(f"authentication required by {host}: run 'dockyard login {host}'")
                continue
            if response.status == 401:
                code, message = _registry_error(401, await response.read(64 * 1024))
                response.release()
                if endpoint.credentials.anonymous:
                    raise AuthError(f"authentication required by {host}: run 'dockyard login {host}'")
                raise AuthError(f"authentication to {host} failed: {message or 'unauthorized'}")
            if response.status in RETRYABLE_STATUS and attempt < attempts:
                response.release()
                attempt += 1
                await asyncio.sleep(min(0.2 * 2 ** attempt, 3))
                continue
            try:
                yield response
            finally:
                response.release()
            return

    async def _send(self, method: str, url: str, headers: dict, body, follow_redirects: bool,
                    auth: str | None, auth_origin: tuple | None, body_origin: tuple | None = None) -> Response:
        """One request, following redirects; `auth` goes only to `auth_origin`,
        and with `body_origin` the body too (a redirect elsewhere is refused)."""
        for _ in range(MAX_REDIRECTS):
            request_headers = {**_IDENTITY, **headers}
            if auth and _origin(url) == auth_origin:
                request_headers["Authorization"] = auth
            response = await self.transport.send(method, url, headers=request_headers, body=body)
            if not follow_redirects or response.status not in REDIRECTS:
                return response
            location = response.headers.get("Location")
            response.release()
            source = urlsplit(url).netloc
            if not location:
                raise RegistryResponseError(f"redirect without Location from {source}")
            # permanent, not worth a retry: the next answer would say the same
            url = _redirect_target(url, location, f"redirect from {source} to")
            if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                method, body = "GET", None
                headers = {k: v for k, v in headers.items() if k.lower() not in ("content-type", "content-length")}
            if body is not None and body_origin is not None and _origin(url) != body_origin:
                raise AuthError(f"{source} redirected a request carrying credentials to "
                                f"{urlsplit(url).netloc}: refused")
        raise RegistryResponseError("too many redirects")

    async def error_for(self, response: Response, what: str) -> ClientError:
        body = await response.read(64 * 1024)
        code, message = _registry_error(response.status, body)
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
                           accept: str = ACCEPT_MANIFESTS) -> FetchedManifest:
        identifier = identifier or ref.identifier
        what = f"manifest {ref.name}{'@' if ':' in identifier else ':'}{identifier}"
        scopes = [Scope.repository(ref.repository, "pull")]
        async with self.manifest_slots(ref.api_host):
            async with self.request("GET", ref.api_host, f"/v2/{ref.repository}/manifests/{identifier}",
                                    scopes=scopes, headers={"Accept": accept}) as response:
                if response.status != 200:
                    raise await self.error_for(response, what)
                data = await read_document(response, self.options.max_manifest_size, what)
                header_type = (response.headers.get("Content-Type") or "").split(";")[0].strip()
        return self._check_manifest(what, identifier, data, header_type)

    def _check_manifest(self, what: str, identifier: str, data: bytes, header_type: str) -> FetchedManifest:
        if ":" in identifier:
            algorithm = identifier.split(":", 1)[0]
            try:
                actual = digest_of(data, algorithm)
            except ValueError:
                raise ManifestError(f"{what}: unsupported digest algorithm {algorithm}") from None
            if actual != identifier:
                raise ManifestError(f"{what}: content does not match its digest (got {actual})")
            digest = actual
        else:
            digest = digest_of(data)
        return FetchedManifest.from_bytes(data, digest, header_type or None, what)

    async def head_manifest(self, ref: Reference, identifier: str) -> dict | None:
        scopes = [Scope.repository(ref.repository, "pull")]
        async with self.manifest_slots(ref.api_host):
            async with self.request("HEAD", ref.api_host, f"/v2/{ref.repository}/manifests/{identifier}",
                                    scopes=scopes, headers={"Accept": ACCEPT_MANIFESTS}) as response:
                if response.status == 404:
                    return None
                if response.status != 200:
                    raise await self.error_for(response, f"manifest {ref.name}:{identifier}")
                return {"mediaType": (response.headers.get("Content-Type") or "").split(";")[0],
                        "digest": response.headers.get("Docker-Content-Digest"),
                        "size": response.content_length or 0}

    async def put_manifest(self, ref: Reference, identifier: str, data: bytes, media_type: str) -> dict:
        scopes = [Scope.repository(ref.repository, "pull", "push")]
        async with self.manifest_slots(ref.api_host):
            async with self.request("PUT", ref.api_host, f"/v2/{ref.repository}/manifests/{identifier}",
                                    scopes=scopes, headers={"Content-Type": media_type}, data=data) as response:
                if response.status not in (200, 201, 202):
                    raise await self.error_for(response, f"push manifest {ref.name}:{identifier}")
                return {"digest": response.headers.get("Docker-Content-Digest"),
                        "subject": response.headers.get("OCI-Subject")}

    async def list_tags(self, ref: Reference) -> list[str]:
        scopes = [Scope.repository(ref.repository, "pull")]
        tags: list[str] = []
        path = f"/v2/{ref.repository}/tags/list"
        what = f"tags of {ref.name}"
        for _ in range(1000):
            async with self.request("GET", ref.api_host, path, scopes=scopes) as response:
                if response.status != 200:
                    raise await self.error_for(response, what)
                body = _json_object(await read_document(response, self.options.max_manifest_size, what), what)
                page = body.get("tags") or []
                if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                    raise RegistryResponseError(f"{what}: tags is not a list of strings")
                tags.extend(page)
                link = response.headers.get("Link")
            if not link or 'rel="next"' not in link:
                break
            path = _redirect_target(response.url, link.split(";")[0].strip().strip("<>"), f"next page of {what}")
        return tags

    async def referrers(self, ref: Reference, digest: str) -> list[Descriptor]:
        """Descriptors of manifests whose subject is `digest`: the referrers API,
        or the referrers tag schema (sha256-<hex>) when the API answers 404."""
        scopes = [Scope.repository(ref.repository, "pull")]
        what = f"referrers of {ref.name}@{digest}"
        async with self.request("GET", ref.api_host, f"/v2/{ref.repository}/referrers/{digest}",
                                scopes=scopes, headers={"Accept": OCI_INDEX}) as response:
            if response.status == 200:
                listed = parse_manifest(await read_document(response, self.options.max_manifest_size, what),
                                        OCI_INDEX, what)
                if not listed.is_index:
                    raise ContentError(f"{what}: the answer is not an index")
                return list(listed.manifests)
            if response.status not in (404, 405, 400):
                raise await self.error_for(response, what)
        tag = digest.replace(":", "-")
        try:
            fallback = await self.get_manifest(ref, tag, accept=OCI_INDEX)
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
        algorithm = descriptor.digest.split(":", 1)[0]
        if len(data) != descriptor.size or digest_of(data, algorithm) != descriptor.digest:
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
            return _redirect_target(response.url, location, f"upload location from {ref.api_host}")

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

    async def check_login(self, host: str) -> None:
        """Verify the credentials of `host` (Basic: GET /v2/; Bearer: get a token)."""
        endpoint = await self.endpoint(host)
        if not endpoint.challenges:
            return
        async with self.request("GET", host, "/v2/", scopes=[]) as response:
            if response.status != 200:
                raise await self.error_for(response, f"login to {host}")

    def set_credentials(self, host: str, creds: Credentials) -> None:
        if host in self._endpoints:
            self._endpoints[host].credentials = creds


_IDENTITY = {"Accept-Encoding": "identity"}   # bytes as stored: digests are over them


def _json_object(data: bytes, what: str) -> dict:
    """A registry answer that must be a JSON object (strict: no NaN, no Infinity)."""
    try:
        return parse_json_object(data, what)
    except ContentError as exc:
        raise RegistryResponseError(str(exc)) from None


async def read_document(response: Response, limit: int, what: str) -> bytes:
    """The body of a JSON document read whole (manifest, config, referrers):
    refused when it announces, or turns out to be, larger than `limit`."""
    if response.content_length is not None and response.content_length > limit:
        raise ManifestError(f"{what}: {response.content_length} bytes exceeds the {limit} byte limit")
    data = await response.read(limit)
    if len(data) > limit:
        raise ManifestError(f"{what}: exceeds the {limit} byte limit")
    return data


def _redirect_target(url: str, location: str, what: str) -> str:
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


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
