"""The one place a request's access is checked.

Each row of the route table names the action its route needs (pull, push,
delete, catalog, or base for `/v2/`); `auth_middleware`, inside the error
middleware, finds who is asking (a Caller), checks that action once, and
leaves the Caller on the request for the two handlers that need more than
one answer (a mount reads another repository; the catalog lists only what
the caller may see). Handlers never check access themselves.

    auth.mode none       everyone may do everything (the default on loopback)
    auth.mode htpasswd   Basic credentials (bcrypt) or none; the policy decides
    auth.mode token      Bearer tokens (docker-registry/token.md); without one,
                         a 401 whose challenge names the realm, service and scope

A refusal is UNAUTHORIZED (401, with the challenge) when other credentials
could help and DENIED (403) when the caller is known and the policy says no:
docker prints "denied: requested access to the resource is denied".
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from typing import Awaitable, Callable

from aiohttp import web

from registry.auth.directory import Directory
from registry.auth.scopes import CATALOG, REGISTRY, REPOSITORY, REPOSITORY_ACTIONS, WILDCARD
from registry.auth.tokens import AccessToken, TokenError, TokenVerifier
from registry.errors import with_headers
from storage.oci.errors import Denied, NameInvalid, Unauthorized
from storage.oci.names import validate_name

log = logging.getLogger("dockyard.auth")

# what a route needs (the route table's last column)
BASE, CATALOG_ACTION, PULL, PUSH, DELETE = "base", "catalog", "pull", "push", "delete"
ALL_ACTIONS = frozenset(REPOSITORY_ACTIONS)
CALLER = web.RequestKey("caller", object)   # the Caller the middleware found
TOKEN_PATH = "/auth/token"

# A token is three base64url parts; anything else is refused before parsing.
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*")
_HOST_SHAPE = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]+)?|\[[0-9A-Fa-f:.]+\](:[0-9]+)?")


def expand(actions: frozenset[str]) -> frozenset[str]:
    return ALL_ACTIONS if WILDCARD in actions else actions & ALL_ACTIONS


class Caller:
    """Who is asking and what they may do. `user` None: no credentials."""

    user: str | None = None
    sees_everything = False        # the catalog need not be filtered

    def actions_for(self, repository: str) -> frozenset[str]:
        raise NotImplementedError

    def may_list_catalog(self) -> bool:
        raise NotImplementedError

    def may_pull(self, repository: str) -> bool:
        return PULL in self.actions_for(repository)

    def may_see(self, repository: str) -> bool:
        """Whether the catalog shows this repository to the caller."""
        return self.may_pull(repository)

    def policy_allows(self, repository: str | None, action: str) -> bool:
        """Whether asking again (another token) could ever get `action`
        (repository None: the catalog)."""
        if repository is None:
            return self.may_list_catalog()
        return action in self.actions_for(repository)


class Everyone(Caller):
    """auth.mode none."""

    sees_everything = True

    def actions_for(self, repository: str) -> frozenset[str]:
        return ALL_ACTIONS

    def may_list_catalog(self) -> bool:
        return True


EVERYONE = Everyone()


class PolicyCaller(Caller):
    """A Basic-authenticated user (or nobody), judged by the current policy."""

    def __init__(self, user: str | None, directory: Directory):
        self.user, self.directory = user, directory

    def actions_for(self, repository: str) -> frozenset[str]:
        return self.directory.actions_for(self.user, repository)

    def may_list_catalog(self) -> bool:
        return self.directory.may_list_catalog(self.user)


class TokenCaller(Caller):
    """A Bearer token. Ours (a directory is given): what it grants AND what
    the current policy still allows its subject, so a revoked right ends
    at once rather than when the token expires. Another issuer's: what it
    grants."""

    def __init__(self, token: AccessToken, directory: Directory | None):
        self.token, self.directory = token, directory
        self.user = token.subject or None
        self.sees_everything = directory is None

    def actions_for(self, repository: str) -> frozenset[str]:
        granted = expand(self.token.actions_for(REPOSITORY, repository))
        if self.directory is not None and granted:
            granted = granted & self.directory.actions_for(self.user, repository)
        return granted

    def may_list_catalog(self) -> bool:
        if not self.token.allows(REGISTRY, CATALOG, WILDCARD):
            return False
        return self.directory is None or self.directory.may_list_catalog(self.user)

    def may_see(self, repository: str) -> bool:
        if self.directory is None:
            return True
        return PULL in self.directory.actions_for(self.user, repository)

    def policy_allows(self, repository: str | None, action: str) -> bool:
        if self.directory is None:
            return True                 # another issuer decides: ask it
        if repository is None:
            return self.directory.may_list_catalog(self.user)
        return action in self.directory.actions_for(self.user, repository)


def needed_scope(action: str, repository: str | None) -> str:
    """The scope a challenge names for an action (docker asks for pull,push to push)."""
    if action == CATALOG_ACTION:
        return f"{REGISTRY}:{CATALOG}:*"
    wanted = "pull,push" if action == PUSH else action
    return f"{REPOSITORY}:{repository}:{wanted}"


class Gate:
    """Finds the Caller of a request (`identify`) and refuses what it may not do."""

    def __init__(self, mode: str, *, directory: Directory | None = None,
                 verifier: TokenVerifier | None = None, realm: str = "", service: str = "",
                 basic_realm: str = "Dockyard", own_tokens: bool = True):
        self.mode = mode
        self.directory = directory
        self.verifier = verifier
        self.realm, self.service, self.basic_realm = realm, service, basic_realm
        self.own_tokens = own_tokens
        self.route_actions: dict = {}    # the app's ROUTE_ACTIONS, set when the app starts

    # ---- challenges ---------------------------------------------------------------

    def token_realm(self, request: web.Request) -> str:
        if self.realm:
            return self.realm
        host = request.host
        if not _HOST_SHAPE.fullmatch(host or ""):
            sock = request.transport.get_extra_info("sockname") if request.transport else None
            host = f"{sock[0]}:{sock[1]}" if sock else "localhost"
        return f"{request.scheme}://{host}{TOKEN_PATH}"

    def challenge(self, request: web.Request, scope: str | None, error: str | None = None) -> str:
        if self.mode == "htpasswd":
            return f'Basic realm="{self.basic_realm}",charset="UTF-8"'
        parts = [f'realm="{self.token_realm(request)}"', f'service="{self.service}"']
        if scope:
            parts.append(f'scope="{scope}"')
        if error:
            parts.append(f'error="{error}"')
        return "Bearer " + ",".join(parts)

    def unauthorized(self, request: web.Request, message: str, scope: str | None = None,
                     error: str | None = None, detail: object = None) -> Unauthorized:
        return with_headers(Unauthorized(message, detail),
                            {"WWW-Authenticate": self.challenge(request, scope, error)})

    # ---- who is asking ------------------------------------------------------------

    async def identify(self, request: web.Request, scope: str | None) -> Caller | None:
        """The Caller, or None when the request carries no credentials (token
        mode: a token is always needed). Bad credentials: Unauthorized."""
        headers = request.headers.getall("Authorization", [])
        if len(headers) > 1:
            raise self.unauthorized(request, "more than one Authorization header", scope, "invalid_request")
        header = headers[0] if headers else ""
        if self.mode == "htpasswd":
            return await self._basic(request, header, scope)
        return self._bearer(request, header, scope)

    async def _basic(self, request: web.Request, header: str, scope: str | None) -> Caller:
        assert self.directory is not None
        if not header:
            return PolicyCaller(None, self.directory)
        username, password = parse_basic(header)
        if username is None or not await self.directory.check_basic(
                header, username, password, request.remote or ""):
            raise self.unauthorized(request, "incorrect username or password", scope)
        return PolicyCaller(username, self.directory)

    def _bearer(self, request: web.Request, header: str, scope: str | None) -> Caller | None:
        assert self.verifier is not None
        if not header:
            return None
        kind, _, token = header.partition(" ")
        if kind.lower() != "bearer":
            raise self.unauthorized(request, "a Bearer token is required", scope, "invalid_token")
        try:
            # a token verified before is exactly a string that passed the shape check
            access = self.verifier.cached(token)
            if access is None:
                if not _TOKEN_SHAPE.fullmatch(token):
                    raise self.unauthorized(request, "a Bearer token is required", scope, "invalid_token")
                access = self.verifier.verify(token)
        except TokenError as exc:
            raise self.unauthorized(request, f"invalid token: {exc}", scope, "invalid_token") from None
        directory = self.directory if self.own_tokens else None
        if directory is not None and access.subject and not directory.exists(access.subject):
            raise self.unauthorized(request, "invalid token: the user no longer exists", scope,
                                    "invalid_token")
        return TokenCaller(access, directory)

    # ---- the check --------------------------------------------------------------

    async def admit(self, request: web.Request, action: str) -> Caller:
        repository = request.match_info.get("name") if action not in (BASE, CATALOG_ACTION) else None
        scope = needed_scope(action, repository) if action != BASE else None
        source = mount_source(request) if action == PUSH else None
        if source is not None:
            # a mount also reads its source: the challenge asks for both, so
            # the client's token can carry both (as Distribution's does)
            scope = f"{scope} {needed_scope(PULL, source)}"
        caller = await self.identify(request, scope)
        if caller is None:
            raise self.unauthorized(request, "authentication required", scope)
        if action == BASE:
            if caller.user is None and self.mode == "htpasswd":
                raise self.unauthorized(request, "authentication required")
            return caller
        if action == CATALOG_ACTION:
            if caller.may_list_catalog():
                return caller
            return self._refuse(request, caller, scope, None, action)
        assert repository is not None
        if action not in caller.actions_for(repository):
            return self._refuse(request, caller, scope, repository, action)
        if source is not None and self.mode == "token" and not caller.may_pull(source) \
                and caller.policy_allows(source, PULL):
            # another token would carry pull on the source: ask for it. When
            # the policy refuses it, the handler answers with a plain upload
            # session and reveals nothing of the source (Zot CVE-2024-39897).
            raise self.unauthorized(request, "the token does not grant pull on the mount source",
                                    scope, "insufficient_scope")
        return caller

    def _refuse(self, request: web.Request, caller: Caller, scope: str | None,
                repository: str | None, action: str) -> Caller:
        detail = [{"Type": REGISTRY if repository is None else REPOSITORY,
                   "Name": CATALOG if repository is None else repository, "Action": action}]
        if caller.user is None:
            raise self.unauthorized(request, "authentication required", scope,
                                    "insufficient_scope" if self.mode == "token" else None, detail)
        if self.mode == "token" and caller.policy_allows(repository, action):
            raise self.unauthorized(request, "the token does not grant this access", scope,
                                    "insufficient_scope", detail)
        raise Denied("requested access to the resource is denied", detail)


def mount_source(request: web.Request) -> str | None:
    """The `from` repository of a cross-repository mount (POST ...?mount=&from=)."""
    if request.method != "POST" or "mount" not in request.query:
        return None
    source = request.query.get("from")
    if not source:
        return None
    try:
        validate_name(source)
    except NameInvalid:
        return None
    return source


def parse_basic(header: str) -> tuple[str | None, str]:
    """(username, password) of a Basic header; (None, "") when malformed."""
    kind, _, encoded = header.partition(" ")
    if kind.lower() != "basic":
        return None, ""
    try:
        text = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None, ""
    username, sep, password = text.partition(":")
    if not sep or not username:
        return None, ""
    return username, password


ROUTE_ACTIONS = web.AppKey("route_actions", dict)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def auth_middleware(current: Callable[[], Gate | None]):
    """The middleware of one app; `current` gives its Gate once the app has
    started (None: auth.mode none). Bound at build time, so a request pays
    no lookup through the app's state to find it."""
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        gate = current()
        if gate is None:
            request[CALLER] = EVERYONE
            return await handler(request)
        action = gate.route_actions.get(request.match_info.route) if gate.route_actions else None
        if action is None:      # not a registry route: the token service, a 404, a 405
            return await handler(request)
        request[CALLER] = await gate.admit(request, action)
        return await handler(request)

    return middleware


def caller_of(request: web.Request) -> Caller:
    return request.get(CALLER, EVERYONE)
