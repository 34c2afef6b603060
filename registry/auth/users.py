"""Who may log in: an htpasswd file of bcrypt hashes, and a limiter that
slows down, then refuses, a client that keeps failing.

    alice:$2y$05$...        (what `htpasswd -B` writes)

Only bcrypt is accepted: `{SHA}`, `$apr1$` (MD5), crypt(3) and plain text
are fast to brute-force from a leaked file, so a file holding one is refused
at load, naming the line. No error message ever quotes a hash or a password.

`Htpasswd.verify` is blocking (bcrypt is slow by design): run it in a
thread. It always does exactly one bcrypt check, so an unknown user, a
wrong password and an unusable password take the same time as each other.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Hashable, Mapping

import bcrypt

# bcrypt reads at most 72 bytes; longer passwords are truncated, as
# `htpasswd -B` truncated them when it hashed them.
BCRYPT_MAX_PASSWORD = 72
# Anything longer is not a password anybody typed: refused without work
# beyond the one bcrypt check every attempt costs.
MAX_PASSWORD_BYTES = 1024
# The names the policy gives to "no credentials" and "any credentials"; a
# real user of that name could not be told apart from them.
RESERVED_USERS = frozenset({"anonymous", "authenticated"})

_BCRYPT_RE = re.compile(rb"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_USER_RE = re.compile(r"[^\s:]+")
_MIN_COST, _MAX_COST = 4, 31


class CredentialsFileError(ValueError):
    """The credentials file is unusable: one line naming the file, the line
    and what is wrong, never its hash."""


def _scheme_of(hashed: bytes) -> str:
    """A name for a hash we refuse (for the message; never the hash itself)."""
    if hashed.startswith(b"{SHA}"):
        return "SHA-1 ({SHA})"
    if hashed.startswith(b"$apr1$"):
        return "MD5 ($apr1$)"
    if hashed.startswith((b"$1$", b"$5$", b"$6$")):
        return "crypt(3) " + hashed[:3].decode("ascii")
    if hashed.startswith(b"$2"):
        return "malformed bcrypt"
    if re.fullmatch(rb"[./A-Za-z0-9]{13}", hashed):
        return "DES crypt(3)"
    return "plain text or unknown"


@dataclass(frozen=True, eq=False)
class Htpasswd:
    """An immutable snapshot of an htpasswd file: reload by loading again."""

    source: str
    _hashes: Mapping[str, bytes] = field(repr=False)
    _dummy: bytes = field(repr=False)

    @classmethod
    def parse(cls, data: bytes | str, source: str = "htpasswd") -> "Htpasswd":
        """The entries of `data`; CredentialsFileError on the first bad line."""
        raw = data.encode("utf-8") if isinstance(data, str) else data
        hashes: dict[str, bytes] = {}
        costs: Counter[int] = Counter()
        for number, line in enumerate(raw.splitlines(), start=1):
            where = f"{source}:{number}"
            line = line.strip()
            if not line or line.startswith(b"#"):
                continue
            name_bytes, colon, hashed = line.partition(b":")
            try:
                name = name_bytes.decode("utf-8")
            except UnicodeDecodeError:
                raise CredentialsFileError(f"{where}: the user name is not UTF-8") from None
            if not colon or not _USER_RE.fullmatch(name):
                raise CredentialsFileError(f"{where}: expected user:bcrypt-hash")
            if name in RESERVED_USERS:
                raise CredentialsFileError(f"{where}: user name {name!r} is reserved by the policy")
            if name in hashes:
                raise CredentialsFileError(f"{where}: user {name!r} appears twice")
            match = _BCRYPT_RE.fullmatch(hashed)
            if match is None:
                raise CredentialsFileError(
                    f"{where}: user {name!r} has a {_scheme_of(hashed)} password; only bcrypt "
                    f"is accepted (htpasswd -B)")
            cost = int(match.group(1))
            if not _MIN_COST <= cost <= _MAX_COST:
                raise CredentialsFileError(f"{where}: user {name!r} has bcrypt cost {cost}, "
                                           f"outside {_MIN_COST}..{_MAX_COST}")
            hashes[name] = hashed
            costs[cost] += 1
        # the dummy costs what most entries cost, so an unknown user takes as
        # long as a wrong password (ties: the higher cost)
        cost = max(costs.items(), key=lambda kv: (kv[1], kv[0]))[0] if costs else _MIN_COST
        dummy = bcrypt.hashpw(secrets.token_hex(16).encode("ascii"), bcrypt.gensalt(rounds=cost))
        return cls(source, MappingProxyType(hashes), dummy)

    @property
    def users(self) -> frozenset[str]:
        return frozenset(self._hashes)

    def __contains__(self, username: object) -> bool:
        return isinstance(username, str) and username in self._hashes

    def __len__(self) -> int:
        return len(self._hashes)

    def verify(self, username: str, password: str | bytes) -> bool:
        """True when `password` is this user's. BLOCKING: one bcrypt check,
        whoever asks and whatever they send."""
        stored = self._hashes.get(username) if isinstance(username, str) else None
        candidate = _password_bytes(password)
        try:
            # a missing user or an unusable password still costs one check
            # at the usual cost; the placeholder never counts as a match
            matched = bcrypt.checkpw(candidate if candidate is not None else b"-",
                                     stored if stored is not None else self._dummy)
        except ValueError:
            matched = False
        return matched and stored is not None and candidate is not None

    def fingerprint(self, username: str) -> str | None:
        """Hex sha256 of the user's entry: changes with the password, None
        once the user is gone. Tokens and caches keyed on it die with it."""
        stored = self._hashes.get(username) if isinstance(username, str) else None
        if stored is None:
            return None
        return hashlib.sha256(username.encode("utf-8") + b":" + stored).hexdigest()


def _password_bytes(password: object) -> bytes | None:
    """The bytes bcrypt should see, or None for a password no entry can have."""
    if isinstance(password, str):
        if len(password) > MAX_PASSWORD_BYTES:
            return None
        try:
            # surrogateescape gives back the bytes of a header decoded that way
            password = password.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return None
    if not isinstance(password, (bytes, bytearray)) or len(password) > MAX_PASSWORD_BYTES:
        return None
    if b"\0" in password:          # htpasswd cannot have hashed one (C strings)
        return None
    return bytes(password[:BCRYPT_MAX_PASSWORD])


def load_htpasswd(path: str | Path) -> Htpasswd:
    """Read and parse an htpasswd file (blocking: run it in a thread)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CredentialsFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return Htpasswd.parse(data, str(path))


@dataclass
class _Record:
    failures: list[float]
    locked_until: float = 0.0


class FailureLimiter:
    """Repeated failures from one client are slowed down and then refused
    for a while.

    The first failures in `window` seconds cost nothing (a typo); then each
    failed attempt is answered after a delay that doubles up to `max_delay`;
    the `max_failures`-th failure locks the key for `lockout` seconds. A
    success clears the key. At most `max_clients` keys are remembered, the
    least recently seen forgotten first (a flood of addresses can only
    forget records, never lock out others).

    Usage, keyed by the client's address, on the event loop (not thread-safe):

        if limiter.locked_for(addr): refuse
        ok = await to_thread(htpasswd.verify, user, password)
        if ok: limiter.succeeded(addr)
        else: limiter.failed(addr); await sleep(limiter.delay_for(addr))
    """

    # failures in the window answered without delay
    FREE_FAILURES = 2

    def __init__(self, max_failures: int = 5, window: float = 60, lockout: float = 300,
                 max_delay: float = 2.0, max_clients: int = 10000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_failures < 1 or max_clients < 1 or window <= 0 or lockout < 0 or max_delay < 0:
            raise ValueError("FailureLimiter: max_failures and max_clients must be at least 1, "
                             "window positive, lockout and max_delay not negative")
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
        self.max_delay = max_delay
        self.max_clients = max_clients
        self._clock = clock
        self._free = min(self.FREE_FAILURES, max_failures - 1)
        self._records: OrderedDict[Hashable, _Record] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def _current(self, key: Hashable, now: float) -> _Record | None:
        """The key's record with failures older than the window dropped;
        None (and forgotten) once nothing about it is left."""
        record = self._records.get(key)
        if record is None:
            return None
        record.failures = [t for t in record.failures if now - t < self.window]
        if not record.failures and record.locked_until <= now:
            del self._records[key]
            return None
        return record

    def locked_for(self, key: Hashable) -> float:
        """Seconds left of the key's lockout; 0 when it is not locked."""
        now = self._clock()
        record = self._current(key, now)
        return max(0.0, record.locked_until - now) if record is not None else 0.0

    def delay_for(self, key: Hashable) -> float:
        """Seconds to wait before answering a failed attempt (after `failed`):
        0 for the first FREE_FAILURES in the window, then doubling up to
        `max_delay`, which the failure that locks the key waits."""
        now = self._clock()
        record = self._current(key, now)
        if record is not None and record.locked_until > now:
            return self.max_delay
        count = len(record.failures) if record is not None else 0
        if count <= self._free:
            return 0.0
        return min(self.max_delay, self.max_delay * 2.0 ** (count - self.max_failures))

    def failed(self, key: Hashable) -> None:
        """Record a failure; the max_failures-th in the window locks the key."""
        now = self._clock()
        record = self._current(key, now)
        if record is None:
            record = self._records[key] = _Record([])
            while len(self._records) > self.max_clients:
                self._records.popitem(last=False)
        self._records.move_to_end(key)
        if record.locked_until > now:
            return                  # already refused; a lockout is not extended
        record.failures.append(now)
        if len(record.failures) >= self.max_failures:
            record.locked_until = now + self.lockout
            record.failures = []    # the lockout ends with a clean slate

    def succeeded(self, key: Hashable) -> None:
        """A success clears everything known about the key."""
        self._records.pop(key, None)
