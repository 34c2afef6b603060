"""The built-in token service: a small app mounted at /auth, outside /v2/.

    GET  /auth/token   Basic credentials or none; ?service= &scope= (repeated)
                       &account= &offline_token=true &client_id=     (token.md)
    POST /auth/token   grant_type=password | refresh_token, scope (space-
                       separated), access_type=offline, client_id  (oauth.md)
    GET  /auth/jwks    the public keys tokens are verified with (RFC 7517)

It grants the intersection of what was asked and what the policy allows
and says so in `access`; not getting everything asked for is not an error
(token.md, "Requesting a Token"). A refresh token is bound to the user's
password entry: a changed password or a removed user revokes it. Bad
credentials are 401 (with the OAuth2 error field for the POST form);
repeated failures are slowed down and then refused (429) for a while.
"""

from __future__ import annotations

import datetime
import json
from typing import Callable, Sequence

from aiohttp import web

from registry.auth.directory import Directory
from registry.auth.gate import ALL_ACTIONS, expand, parse_basic
from registry.auth.keys import KeySet
from registry.auth.scopes import CATALOG, REGISTRY, REPOSITORY, WILDCARD, Scope, parse_scopes
from registry.auth.tokens import IssuedToken, TokenError, TokenIssuer
from registry.errors import status_of, with_headers
from storage.oci.errors import NameInvalid, OciError, TooManyRequests, Unauthorized
from storage.oci.names import validate_name

_JSON = "application/json"
# Scopes one token request may ask for: a push asks for two or three; a
# request for thousands would only make a token too big to send back.
MAX_SCOPES = 64


class TokenRequestInvalid(OciError):
    """A malformed token request (OAuth2 `invalid_request`)."""

    code = "UNSUPPORTED"


class TokenService:
    def __init__(self, issuer: TokenIssuer, directory: Directory, keys: KeySet, *,
                 service: str, basic_realm: str):
        self.issuer, self.directory, self.keys = issuer, directory, keys
        self.service, self.basic_realm = service, basic_realm

    # ---- granting ----------------------------------------------------------------

    def grant(self, user: str | None, asked: Sequence[Scope]) -> list[Scope]:
        granted = []
        for scope in asked:
            actions: frozenset[str] = frozenset()
            if scope.type == REPOSITORY and _valid_name(scope.name):
                allowed = self.directory.actions_for(user, scope.name)
                actions = expand(scope.actions) & allowed
                if actions == ALL_ACTIONS and WILDCARD in scope.actions:
                    actions = frozenset({WILDCARD})
            elif scope.type == REGISTRY and scope.name == CATALOG and WILDCARD in scope.actions:
                if self.directory.may_list_catalog(user):
                    actions = frozenset({WILDCARD})
            granted.append(Scope(scope.type, scope.name, actions))
        return granted

    def _asked(self, texts: Sequence[str]) -> list[Scope]:
        asked = parse_scopes(texts)
        if len(asked) > MAX_SCOPES:
            raise TokenRequestInvalid(f"at most {MAX_SCOPES} scopes in one token request")
        return asked

    def _check_service(self, service: str | None) -> None:
        if service and service != self.service:
            raise TokenRequestInvalid(f"this token service issues tokens for {self.service!r} only")

    def _unauthorized(self, message: str, kind: type[Unauthorized] = Unauthorized) -> Unauthorized:
        # every 401 names how to authenticate (RFC 7235 3.1), the OAuth2 form's too
        return with_headers(kind(message),
                            {"WWW-Authenticate": f'Basic realm="{self.basic_realm}",charset="UTF-8"'})

    def _invalid_grant(self, message: str) -> Unauthorized:
        return self._unauthorized(message, InvalidGrant)

    def _answer(self, issued: IssuedToken, granted: Sequence[Scope], refresh: str | None) -> web.Response:
        body = {"token": issued.token, "access_token": issued.token,
                "expires_in": issued.expires_in,
                "issued_at": issued.issued_at.astimezone(datetime.timezone.utc)
                .strftime("%Y-%m-%dT%H:%M:%SZ"),
                "scope": " ".join(str(s) for s in granted if s.actions)}
        if refresh:
            body["refresh_token"] = refresh
        # Cache-Control: a token is a credential (RFC 6749 5.1)
        return web.Response(body=json.dumps(body).encode(), content_type=_JSON,
                            headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _refresh_for(self, user: str) -> str:
        return self.issuer.issue_refresh(user, self.directory.fingerprint(user) or "")

    # ---- GET: Basic credentials ----------------------------------------------------

    async def get_token(self, request: web.Request) -> web.Response:
        query = request.query
        self._check_service(query.get("service"))
        asked = self._asked(query.getall("scope", []))
        headers = request.headers.getall("Authorization", [])
        if len(headers) > 1:
            raise self._unauthorized("more than one Authorization header")
        user = None
        if headers:
            username, password = parse_basic(headers[0])
            if username is None:
                raise self._unauthorized("Basic credentials are required")
            if not await self.directory.check_password(username, password, request.remote or ""):
                raise self._unauthorized("incorrect username or password")
            user = username
        granted = self.grant(user, asked)
        refresh = None
        if user is not None and query.get("offline_token", "").lower() == "true":
            refresh = self._refresh_for(user)
        return self._answer(self.issuer.issue(user or "", granted), granted, refresh)

    # ---- POST: the OAuth2 form -------------------------------------------------------

    async def post_token(self, request: web.Request) -> web.Response:
        if request.content_type != "application/x-www-form-urlencoded":
            raise TokenRequestInvalid("the token form must be application/x-www-form-urlencoded")
        form = await request.post()
        self._check_service(_field(form, "service"))
        asked = self._asked([_field(form, "scope") or ""])
        grant_type = _field(form, "grant_type")
        refresh = None
        if grant_type == "password":
            username, password = _field(form, "username"), _field(form, "password")
            if not username or password is None or not await self.directory.check_password(
                    username, password, request.remote or ""):
                raise self._invalid_grant("incorrect username or password")
            user = username
            if _field(form, "access_type") == "offline":
                refresh = self._refresh_for(user)
        elif grant_type == "refresh_token":
            presented = _field(form, "refresh_token") or ""
            try:
                user, binding = self.issuer.verify_refresh(presented)
            except TokenError:
                raise self._invalid_grant("the refresh token is not valid") from None
            if not user or binding != (self.directory.fingerprint(user) or "") or \
                    not self.directory.exists(user):
                raise self._invalid_grant("the refresh token is no longer valid")
            refresh = presented        # oauth.md: the same refresh token, not a new one
        else:
            raise TokenRequestInvalid("grant_type must be password or refresh_token")
        granted = self.grant(user, asked)
        return self._answer(self.issuer.issue(user, granted), granted, refresh)

    async def jwks(self, request: web.Request) -> web.Response:
        return web.Response(body=json.dumps(self.keys.jwks()).encode(), content_type=_JSON,
                            headers={"Cache-Control": "max-age=60"})


class InvalidGrant(Unauthorized):
    """Bad password or refresh token in the OAuth2 form (401, RFC 6749 5.2)."""




# OAuth2's error field (RFC 6749 5.2) beside the OCI errors list docker prints
_OAUTH_ERRORS = ((InvalidGrant, "invalid_grant"), (Unauthorized, "invalid_client"),
                 (TokenRequestInvalid, "invalid_request"), (TooManyRequests, "slow_down"))


@web.middleware
async def _token_errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except (Unauthorized, TokenRequestInvalid, TooManyRequests) as exc:
        error = next(name for kind, name in _OAUTH_ERRORS if isinstance(exc, kind))
        status = 400 if isinstance(exc, TokenRequestInvalid) else status_of(exc)
        body = {"errors": [{"code": exc.code, "message": exc.message}],
                "error": error, "error_description": exc.message}
        return web.Response(status=status, body=json.dumps(body).encode(), content_type=_JSON,
                            headers=getattr(exc, "headers", None) or {})


def _field(form, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


def _valid_name(name: str) -> bool:
    try:
        validate_name(name)
    except NameInvalid:
        return False
    return True


def token_app(current: Callable[[], TokenService | None]) -> web.Application:
    """The sub-application to mount at /auth/; `current` gives the service
    once the app has started (keys are loaded then, not at build time)."""
    def route(method: str):
        async def handler(request: web.Request) -> web.StreamResponse:
            service = current()
            if service is None:     # started without the issuer: nothing here
                raise web.HTTPNotFound()
            return await getattr(service, method)(request)
        return handler

    app = web.Application(middlewares=[_token_errors])
    app.router.add_get("/token", route("get_token"))
    app.router.add_post("/token", route("post_token"))
    app.router.add_get("/jwks", route("jwks"))
    return app
