"""Who the users are and what they may do, kept current while the server runs.

The htpasswd file and the policy file are re-read when they change (looked
at every auth.reload_interval seconds, off the event loop) and at once on
SIGHUP, so a user removed from a group or from the file loses access on the
next look, not at the next restart (Zot CVE-2025-23208 kept it). A file
that became unreadable or invalid keeps the last good copy and says so once.

Password checks are bcrypt, so they run in a thread; failures from one
address are slowed down and then refused for a while (FailureLimiter).
Verified Basic credentials are remembered for a minute, keyed by a keyed
hash of the header (never the password itself), and dropped the moment the
user's entry changes: bcrypt at cost 10 is ~70 ms, too slow for every
request of a `docker pull` in htpasswd mode.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from registry.auth.policy import Policy, PolicyError, load_policy
from registry.auth.users import CredentialsFileError, FailureLimiter, Htpasswd, load_htpasswd
from registry.errors import with_headers
from storage.oci.errors import TooManyRequests

log = logging.getLogger("dockyard.auth")

# Seconds a verified Basic header is trusted without another bcrypt check.
_CREDENTIALS_TTL = 60.0
_CREDENTIALS_CACHE = 1024


class DirectoryError(ValueError):
    """The htpasswd or policy file is unusable at start-up (one line)."""


@dataclass(frozen=True)
class _Stamp:
    mtime_ns: int
    size: int
    inode: int


def _stamp(path: str) -> _Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _Stamp(st.st_mtime_ns, st.st_size, st.st_ino)


class Directory:
    """The current users (an htpasswd snapshot, or none) and policy."""

    def __init__(self, htpasswd_path: str = "", policy_path: str = "", *,
                 limiter: FailureLimiter | None = None):
        self.htpasswd_path = htpasswd_path
        self.policy_path = policy_path
        self.users: Htpasswd | None = None
        self.policy: Policy = Policy.default()
        self.limiter = limiter if limiter is not None else FailureLimiter()
        self._stamps: dict[str, _Stamp | None] = {}
        self._complained: set[str] = set()
        self._secret = secrets.token_bytes(32)
        self._verified: OrderedDict[bytes, tuple[str, str | None, float]] = OrderedDict()

    # ---- loading ---------------------------------------------------------------

    async def load(self) -> None:
        """The first read: any problem is a DirectoryError."""
        try:
            await asyncio.to_thread(self._reload, True)
        except (CredentialsFileError, PolicyError) as exc:
            raise DirectoryError(str(exc)) from None

    async def refresh(self, force: bool = False) -> bool:
        """Re-read what changed (everything when forced); True when anything was."""
        try:
            return await asyncio.to_thread(self._reload, force)
        except (CredentialsFileError, PolicyError) as exc:
            # keep serving with the last good copy; say it once per problem
            text = str(exc)
            if text not in self._complained:
                self._complained.add(text)
                log.warning("keeping the previous auth files: %s", text)
            return False

    def _reload(self, force: bool) -> bool:
        changed = False
        if self.htpasswd_path:
            stamp = _stamp(self.htpasswd_path)
            if force or stamp != self._stamps.get(self.htpasswd_path, "unread"):
                users = load_htpasswd(self.htpasswd_path)
                self.users, self._stamps[self.htpasswd_path] = users, stamp
                self._verified.clear()
                changed = True
        if self.policy_path:
            stamp = _stamp(self.policy_path)
            if force or stamp != self._stamps.get(self.policy_path, "unread"):
                self.policy, self._stamps[self.policy_path] = load_policy(self.policy_path), stamp
                changed = True
        if changed:
            self._complained.clear()
        return changed

    # ---- who is who --------------------------------------------------------------

    def exists(self, user: str) -> bool:
        return self.users is not None and user in self.users

    def fingerprint(self, user: str) -> str | None:
        return self.users.fingerprint(user) if self.users is not None else None

    def actions_for(self, user: str | None, repository: str) -> frozenset[str]:
        return self.policy.actions_for(user, repository)

    def may_list_catalog(self, user: str | None) -> bool:
        return self.policy.may_list_catalog(user)

    async def check_password(self, username: str, password: str, client: str) -> bool:
        """bcrypt, off the loop, behind the failure limiter. TooManyRequests
        while the client is locked out."""
        limiter = self.limiter
        locked = limiter.locked_for(client)
        if locked > 0:
            raise _locked_out(locked)
        users = self.users
        ok = users is not None and await asyncio.to_thread(users.verify, username, password)
        if ok:
            limiter.succeeded(client)
            return True
        limiter.failed(client)
        delay = limiter.delay_for(client)
        if delay > 0:
            await asyncio.sleep(delay)
        return False

    async def check_basic(self, header: str, username: str, password: str, client: str) -> bool:
        """check_password, remembered for a minute per exact header while
        the user's entry stays what it was."""
        key = hmac.new(self._secret, header.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
        hit = self._verified.get(key)
        now = time.monotonic()
        if hit is not None:
            user, fingerprint, until = hit
            if until > now and user == username and fingerprint == self.fingerprint(username) \
                    and fingerprint is not None:
                return True
            self._verified.pop(key, None)
        if not await self.check_password(username, password, client):
            return False
        self._verified[key] = (username, self.fingerprint(username), now + _CREDENTIALS_TTL)
        while len(self._verified) > _CREDENTIALS_CACHE:
            self._verified.popitem(last=False)
        return True


def _locked_out(seconds: float) -> TooManyRequests:
    wait = max(1, int(seconds + 0.999))
    return with_headers(TooManyRequests(f"too many failed logins from this address; try again in {wait}s"),
                        {"Retry-After": str(wait)})


async def watch(directory: Directory, interval: float) -> None:
    """Look for changed files every `interval` seconds (0: never)."""
    if interval <= 0:
        return
    while True:
        await asyncio.sleep(interval)
        try:
            if await directory.refresh():
                log.info("auth files re-read")
        except Exception:   # never take the server down over a file look
            log.exception("auth file refresh failed")
