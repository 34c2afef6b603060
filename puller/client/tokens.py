"""Docker's bearer-token flow (distribution's token spec): fetching a token
for a set of scopes from the realm a challenge names, and keeping it until
it expires.

    tokens = BearerTokens(transport_getter, retries)
    value = await tokens.token(host, registry_base, challenge, scopes, credentials, force=False)
    identity = await tokens.login(host, registry_base, challenge, credentials)   # refresh token or None

With credentials, the OAuth2 form is POSTed first (password or refresh
token grant), falling back to GET with Basic on 404/405, as Docker does;
anonymous clients GET. Tokens are cached per (realm, service, scopes,
account) and one fetch per key runs at a time. The realm is checked
(puller.client.auth.check_realm) before anything is sent to it, and its
answer (token_from_response) before it is used.

Login asks for offline access, as `docker login` does: the POST form says
access_type=offline (with an empty scope), the GET fallback
offline_token=true and client_id. A refresh token in the answer is the
identity token saved in place of the password; later requests send it with
grant_type=refresh_token. A refused refresh token is LoginExpired (log in
again), a refused password "incorrect username or password".

Neither a password nor a token ever goes into an error message: what a
refusal says comes from the server's error fields.

The token server is its own origin: the credentials (a Basic header, or a
form carrying the password) go nowhere else, even when it redirects.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

from puller.client import policy
from puller.client.auth import ANONYMOUS, Challenge, Credentials, Scope, check_realm
from puller.client.transport import Transport
from puller.errors import AuthError, LoginExpired, TransportError

# a token answer's expires_in is clamped to this range: the spec's default
# and minimum, and a day (a longer-lived cache gains nothing, and an
# Infinity or a 400-digit number would overflow the clock arithmetic)
MIN_TOKEN_SECONDS = 60
MAX_TOKEN_SECONDS = 86400
MAX_ANSWER = 64 * 1024
MAX_RETRY_AFTER = 10.0         # seconds: a token server asking for a longer wait is answered at once
CLIENT_ID = "dockyard"          # OAuth2 client_id: not registered anywhere, for the server's audit


@dataclass
class Token:
    value: str = field(repr=False)
    expires_at: float

    def valid(self, now: float | None = None) -> bool:
        return (now or time.monotonic()) < self.expires_at


class TokenCache:
    """Bearer tokens keyed by (realm, service, scopes, account)."""

    MARGIN = 5.0  # seconds before expiry at which a token is no longer used

    def __init__(self, clock=time.monotonic):
        self._tokens: dict[tuple, Token] = {}
        self.clock = clock

    @staticmethod
    def key(realm: str, service: str | None, scopes: list[Scope], account: str | None) -> tuple:
        return (realm, service or "", tuple(str(s) for s in scopes), account or "")

    def get(self, key: tuple) -> Token | None:
        token = self._tokens.get(key)
        if token and token.valid(self.clock()):
            return token
        self._tokens.pop(key, None)
        return None

    def put(self, key: tuple, token: Token) -> None:
        self._tokens[key] = token


def _usable_token(value) -> bool:
    # it goes into an Authorization header: visible ASCII only, no spaces, CR or LF
    return isinstance(value, str) and 0 < len(value) <= 64 * 1024 and value.isascii() and value.isprintable() \
        and " " not in value


def token_lifetime(value) -> float:
    """Seconds a token may be used, from the answer's expires_in: anything
    that is not a finite number (a string, NaN, Infinity, true) or is below
    the minimum counts as the spec's 60 s; more than a day counts as a day."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return MIN_TOKEN_SECONDS
    if isinstance(value, float) and not math.isfinite(value):
        return MAX_TOKEN_SECONDS if value > 0 else MIN_TOKEN_SECONDS
    return float(min(max(value, MIN_TOKEN_SECONDS), MAX_TOKEN_SECONDS))


def token_from_response(body, now: float | None = None, where: str = "token server") -> Token:
    """A Token from a token server's decoded JSON answer, every field checked."""
    if not isinstance(body, dict):
        raise AuthError(f"{where} answered something that is not a JSON object")
    value = body.get("token") or body.get("access_token")
    if not value:
        raise AuthError(f"{where} answered without a token")
    if not _usable_token(value):
        raise AuthError(f"{where} answered a token that is not a printable string")
    now = time.monotonic() if now is None else now
    return Token(value=value, expires_at=now + token_lifetime(body.get("expires_in")) - TokenCache.MARGIN)


def refresh_token_from_response(body, where: str = "token server") -> str | None:
    """The refresh (identity) token of a token server's decoded JSON answer,
    or None when it carries none; checked like an access token, since it goes
    into a form and into Docker's config."""
    value = body.get("refresh_token") if isinstance(body, dict) else None
    if value is None or value == "":
        return None
    if not _usable_token(value):
        raise AuthError(f"{where} answered a refresh token that is not a printable string")
    return value


def _error_of(body: bytes) -> tuple[str | None, str]:
    """(OAuth2 error code, message) of a token server's error answer: the
    OAuth2 fields (RFC 6749 5.2) or the OCI errors list."""
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        description = answer.get("error_description")
        message = description if isinstance(description, str) and description else answer["error"]
        return answer["error"], message.strip().splitlines()[0][:200] if message.strip() else ""
    return None, policy.registry_error(body)[1]


def _locked_out(response) -> bool:
    """A 429 that says to come back later than a retry would: a token server
    refusing logins from this address after failed ones. Retrying only delays
    the line that says so."""
    if response.status != 429:
        return False
    try:
        return float(response.headers.get("Retry-After") or 0) > MAX_RETRY_AFTER
    except ValueError:
        return True             # an HTTP date: minutes away, not seconds


class BearerTokens:
    """Fetches and caches the tokens of one client."""

    def __init__(self, transport: Callable[[], Transport], retries: int):
        self._transport = transport      # the client's, opened on first use
        self.retries = retries
        self.cache = TokenCache()
        self._locks: dict[tuple, asyncio.Lock] = {}

    async def token(self, host: str, registry_base: str, challenge: Challenge, scopes: list[Scope],
                    creds: Credentials, force: bool = False) -> str:
        """A token for `scopes` from the challenge's realm; `force` skips the
        cache (the registry refused the one it had)."""
        realm = challenge.realm
        check_realm(realm, host, registry_base)
        service = challenge.params.get("service")
        key = TokenCache.key(realm, service, scopes, creds.username or creds.identity_token)
        if not force:
            cached = self.cache.get(key)
            if cached:
                return cached.value
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if not force:
                cached = self.cache.get(key)
                if cached:
                    return cached.value
            token, _ = await self._fetch(host, realm, service, scopes, creds)
            self.cache.put(key, token)
            return token.value

    async def login(self, host: str, registry_base: str, challenge: Challenge, creds: Credentials) -> str | None:
        """Exchange `creds` (a user name and password) for a token for no
        scope with offline access, as `docker login` does: the refresh token
        the server answers with (the identity token to save), or None when it
        issues none. The access token is cached, so a request for no scope
        (GET /v2/) right after uses it."""
        realm = challenge.realm
        check_realm(realm, host, registry_base)
        service = challenge.params.get("service")
        token, refresh = await self._fetch(host, realm, service, [], creds, offline=True)
        self.cache.put(TokenCache.key(realm, service, [], creds.username or creds.identity_token), token)
        return refresh

    async def _fetch(self, host: str, realm: str, service: str | None, scopes: list[Scope],
                     creds: Credentials, offline: bool = False) -> tuple[Token, str | None]:
        """A token and the answer's refresh token (None if it has none)."""
        scope_strings = [str(s) for s in scopes]
        refreshing = bool(creds.identity_token)
        if refreshing or (creds.username and creds.password):
            form = {"client_id": CLIENT_ID, "access_type": "offline" if offline and not refreshing else "online"}
            if service:
                form["service"] = service
            if scope_strings or offline:
                form["scope"] = " ".join(scope_strings)     # empty at login, as docker sends it
            if refreshing:
                form.update(grant_type="refresh_token", refresh_token=creds.identity_token)
            else:
                form.update(grant_type="password", username=creds.username, password=creds.password)
            status, body = await self._request(
                "POST", realm, body=urlencode(form).encode(), secret_body=True,
                headers={"Content-Type": "application/x-www-form-urlencoded"})
            if status not in (404, 405):
                return self._result(host, status, body, refreshing=refreshing)
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
            if offline:
                params += [("offline_token", "true"), ("client_id", CLIENT_ID)]
        url = realm + ("&" if "?" in realm else "?") + urlencode(params) if params else realm
        status, body = await self._request("GET", url, auth=basic)
        return self._result(host, status, body)

    async def _request(self, method: str, url: str, *, headers: dict | None = None, body: bytes | None = None,
                       auth: str | None = None, secret_body: bool = False) -> tuple[int, bytes]:
        realm_origin = policy.origin(url)
        for attempt in range(self.retries + 1):
            try:
                response = await policy.send(self._transport(), method, url, headers or {}, body,
                                             follow_redirects=True, auth=auth, auth_origin=realm_origin,
                                             body_origin=realm_origin if secret_body else None)
                try:
                    data = await response.read(MAX_ANSWER)
                finally:
                    response.release()
                if response.status in policy.RETRYABLE_STATUS and attempt < self.retries \
                        and not _locked_out(response):
                    await asyncio.sleep(policy.backoff(attempt))
                    continue
                return response.status, data
            except policy.TRANSIENT_ERRORS as exc:
                if attempt >= self.retries:
                    raise TransportError(f"token server {urlsplit(url).netloc} unreachable: "
                                         f"{policy.describe(exc)}") from exc
                await asyncio.sleep(policy.backoff(attempt))
        raise TransportError("token server unreachable")  # pragma: no cover

    @staticmethod
    def _result(host: str, status: int, body: bytes, refreshing: bool = False) -> tuple[Token, str | None]:
        if status != 200:
            error, message = _error_of(body)
            # RFC 6749 5.2 answers a bad grant with 400 invalid_grant; token.md with 401
            if status in (401, 403) or error == "invalid_grant":
                if refreshing:
                    raise LoginExpired(host, message)
                raise AuthError(f"authentication to {host} failed: incorrect username or password")
            raise AuthError(f"token server for {host} answered {status}: {message}".rstrip(": "))
        try:
            # lenient about NaN and Infinity here: token_from_response clamps expires_in
            answer = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise AuthError(f"token server for {host} answered something that is not JSON") from exc
        where = f"token server for {host}"
        return token_from_response(answer, where=where), refresh_token_from_response(answer, where)
