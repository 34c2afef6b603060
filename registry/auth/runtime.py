"""Auth for one app, from its settings: built without I/O in `create_app`,
started (files read, keys loaded or made, JWKS fetched) in the app's
cleanup context, refreshed in the background while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import AsyncIterator

from aiohttp import web

from registry.auth.directory import Directory, DirectoryError, watch
from registry.auth.gate import ROUTE_ACTIONS, Gate
from registry.auth.keys import (KeyFileError, KeySet, SigningKey, VerificationKey, load_or_create_signing_key,
                                load_verification_keys, parse_jwks)
from registry.auth.service import TokenService
from registry.auth.tokens import TokenIssuer, TokenVerifier
from registry.auth.users import FailureLimiter
from registry.settings import Settings, SettingsError

log = logging.getLogger("dockyard.auth")

_JWKS_TIMEOUT = 10.0


class AuthRuntime:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.gate: Gate | None = None
        self.service: TokenService | None = None
        self.directory: Directory | None = None
        self.signing: SigningKey | None = None
        self._tasks: list[asyncio.Task] = []

    @property
    def issues_tokens(self) -> bool:
        auth = self.settings.auth
        return auth.mode == "token" and auth.token.issue

    async def start(self) -> None:
        auth, token = self.settings.auth, self.settings.auth.token
        if auth.mode == "none":
            return
        if auth.mode == "htpasswd" or token.issue:
            self.directory = Directory(
                auth.htpasswd, auth.policy,
                limiter=FailureLimiter(max_failures=auth.max_failures, window=auth.failure_window,
                                       lockout=auth.lockout))
            try:
                await self.directory.load()
            except DirectoryError as exc:
                raise SettingsError(str(exc)) from None
            self._tasks.append(asyncio.create_task(watch(self.directory, auth.reload_interval)))
        if auth.mode == "htpasswd":
            self.gate = Gate("htpasswd", directory=self.directory, basic_realm=auth.basic_realm)
            return
        if token.issue:
            self.signing = await asyncio.to_thread(_signing_key, self.settings)
        keys = await self._verification_keys()
        verifier = TokenVerifier(keys, issuer=token.issuer, service=token.service,
                                 max_lifetime=token.max_lifetime)
        if self.signing is not None:
            issuer = TokenIssuer(self.signing, issuer=token.issuer, service=token.service,
                                 lifetime=token.lifetime, refresh_lifetime=token.refresh_lifetime)
            assert self.directory is not None
            self.service = TokenService(issuer, self.directory, keys, service=token.service,
                                        basic_realm=auth.basic_realm)
        self.gate = Gate("token", directory=self.directory, verifier=verifier, realm=token.realm,
                         service=token.service, basic_realm=auth.basic_realm, own_tokens=token.issue)
        if token.jwks_url:
            self._tasks.append(asyncio.create_task(self._refresh_jwks(verifier)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def reload(self) -> None:
        """SIGHUP: re-read the htpasswd and policy files now."""
        if self.directory is not None:
            if await self.directory.refresh(force=True):
                log.info("auth files re-read (SIGHUP)")

    # ---- keys -------------------------------------------------------------------

    async def _verification_keys(self, fetched: KeySet | None = None) -> KeySet:
        token = self.settings.auth.token
        keys: list[VerificationKey] = []
        for name in filter(None, (part.strip() for part in token.trusted_keys.split(","))):
            try:
                keys.extend(await asyncio.to_thread(load_verification_keys, Path(name)))
            except KeyFileError as exc:
                raise SettingsError(str(exc)) from None
        if token.jwks_url:
            keys.extend(fetched if fetched is not None else await _fetch_jwks(token.jwks_url))
        if self.signing is not None:
            keys.insert(0, self.signing.verification)
        try:
            return KeySet(keys)
        except ValueError as exc:
            raise SettingsError(f"auth.token trusted keys: {exc}") from None

    async def _refresh_jwks(self, verifier: TokenVerifier) -> None:
        token = self.settings.auth.token
        while True:
            await asyncio.sleep(token.jwks_refresh)
            try:
                fetched = await _fetch_jwks(token.jwks_url)
                verifier.replace_keys(await self._verification_keys(fetched))
            except (SettingsError, OSError) as exc:
                log.warning("keeping the previous keys of %s: %s", token.jwks_url, exc)


def _signing_key(settings: Settings):
    path = Path(settings.signing_key_path())
    try:
        return load_or_create_signing_key(path, settings.auth.token.algorithm)
    except KeyFileError as exc:
        raise SettingsError(f"auth.token.key (the signing key): {exc}") from None


def prepare_signing_key(settings: Settings) -> None:
    """Make the built-in issuer's key before worker processes start, so
    they all sign with one key. SettingsError when it cannot be read or made."""
    if settings.auth.mode == "token" and settings.auth.token.issue:
        _signing_key(settings)


async def _fetch_jwks(url: str) -> list[VerificationKey]:
    import aiohttp

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_JWKS_TIMEOUT)) as session:
            async with session.get(url) as response:
                if response.status != 200:
                    raise SettingsError(f"auth.token.jwks_url {url}: HTTP {response.status}")
                document = await response.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        raise SettingsError(f"auth.token.jwks_url {url}: {type(exc).__name__}: {exc}") from None
    try:
        return parse_jwks(document, source=url)
    except (KeyFileError, ValueError, TypeError) as exc:
        raise SettingsError(f"auth.token.jwks_url {url}: {exc}") from None


AUTH = web.AppKey("auth", AuthRuntime)


def auth_context(runtime: AuthRuntime):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        await runtime.start()
        if runtime.gate is not None:
            runtime.gate.route_actions = app[ROUTE_ACTIONS]
        try:
            yield
        finally:
            await runtime.stop()

    return ctx
