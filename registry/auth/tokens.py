"""Bearer tokens: the access tokens a token service signs and the registry
checks (docker-registry/jwt.md, token.md), and the refresh tokens of the
OAuth2 flow (oauth.md), which only the token service reads back.

    TokenError              every refusal; a short message safe to log or send
     ├── MalformedToken     not a compact JWS with a JSON header and claims
     ├── UntrustedKey       no trusted key for its kid/jwk/x5c, or an alg not the key's
     ├── BadSignature       the signature does not match
     └── InvalidClaims      issuer, audience, times, lifetime, access, token kind
          └── ExpiredToken  exp has passed (also checked on every cache hit)

A refresh token is a JWT of another kind, signed by the same key: its own
`typ`, `token_use: "refresh"` and the audience "<service>#refresh", so the
registry never takes it for an access token and the token service never
takes an access token for it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Sequence

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from registry.auth.keys import (KeyFileError, KeySet, SigningKey, VerificationKey, parse_jwk,
                                verification_key)
from registry.auth.scopes import Scope, claim_scopes

MIN_LIFETIME = 60            # token.md: "never ... less than 60 seconds to live"
ACCESS_TYPES = ("jwt", "at+jwt")
REFRESH_TYP = "dockyard-refresh+jwt"
REFRESH_USE = "refresh"
MAX_TOKEN_BYTES = 64 * 1024
MAX_X5C = 8
_PART = re.compile(r"[A-Za-z0-9_-]+")
# PyJWT checks the signature and that the claims are there; each claim's
# value is checked here once, the times against the injected clock (PyJWT
# would read the wall clock).
_DECODE_OPTIONS = {"require": ["exp", "iss", "aud"], "verify_exp": False, "verify_nbf": False,
                   "verify_iat": False, "verify_aud": False, "verify_iss": False,
                   "verify_sub": False, "verify_jti": False}


class TokenError(Exception):
    """Why a token was refused. Never holds the token or a claim's value."""


class MalformedToken(TokenError):
    pass


class UntrustedKey(TokenError):
    pass


class BadSignature(TokenError):
    pass


class InvalidClaims(TokenError):
    pass


class ExpiredToken(InvalidClaims):
    pass


@dataclass(frozen=True)
class AccessToken:
    """What a verified access token grants. Scope types lose their class
    ("repository(plugin)" is "repository", scope.md "Resource Class")."""

    subject: str
    scopes: tuple[Scope, ...]
    expires_at: float
    issued_at: float
    jti: str

    def __post_init__(self) -> None:
        # (type, name) -> every action granted on it, built once per verified
        # token: the hot path asks this on every request
        by_resource: dict[tuple[str, str], frozenset[str]] = {}
        for s in self.scopes:
            by_resource[s.type, s.name] = by_resource.get((s.type, s.name), frozenset()) | s.actions
        object.__setattr__(self, "_by_resource", by_resource)

    def allows(self, type: str, name: str, action: str) -> bool:
        return any(s.type == type and s.name == name and s.allows(action) for s in self.scopes)

    def actions_for(self, type: str, name: str) -> frozenset[str]:
        """Every action granted on the resource, as named ("*" stays "*")."""
        return self._by_resource.get((type, name), frozenset())


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_in: int
    issued_at: datetime


# ---- shared checks ------------------------------------------------------------------

def _header(token: object) -> dict:
    """The JOSE header of a compact JWS: three base64url parts, a JSON object first."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
        raise MalformedToken("malformed token")
    parts = token.split(".")
    if len(parts) != 3 or not all(_PART.fullmatch(p) for p in parts):
        raise MalformedToken("malformed token")
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        raise MalformedToken("malformed token header") from None
    if not isinstance(header, dict):
        raise MalformedToken("malformed token header")
    if "crit" in header or "b64" in header:
        # no extension is understood here, and an unencoded payload is never expected
        raise MalformedToken("unsupported critical header")
    return header


def _decode(token: str, key: VerificationKey, leeway: float,
            require: Sequence[str] | None = None) -> dict:
    options = _DECODE_OPTIONS if require is None else {**_DECODE_OPTIONS, "require": list(require)}
    try:
        # a name looked up at call time, so a test can count signature checks
        return jwt.decode(token, key.public_key, algorithms=[key.algorithm], options=options,
                          leeway=leeway)
    except jwt.InvalidSignatureError:
        raise BadSignature("signature does not match") from None
    except jwt.MissingRequiredClaimError as exc:
        raise InvalidClaims(f"missing {exc.claim} claim") from None
    except jwt.DecodeError:
        raise MalformedToken("malformed token") from None
    except jwt.PyJWTError:
        raise InvalidClaims("invalid token") from None


def _number(claims: dict, name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidClaims(f"malformed {name} claim")
    return float(value)


def _check_times(claims: dict, now: float, leeway: float, max_lifetime: float) -> tuple[float, float | None]:
    """(exp, issued: iat, else nbf); refused when exp has passed, nbf or iat
    is ahead, or the lifetime is longer than allowed."""
    exp = _number(claims, "exp")
    if exp is None:
        raise InvalidClaims("missing exp claim")
    nbf, iat = _number(claims, "nbf"), _number(claims, "iat")
    if now >= exp + leeway:
        raise ExpiredToken("token expired")
    if nbf is not None and nbf > now + leeway:
        raise InvalidClaims("token not yet valid")
    if iat is not None and iat > now + leeway:
        raise InvalidClaims("token issued in the future")
    limit = max_lifetime + leeway
    if exp - now > limit or any(exp - t > limit for t in (nbf, iat) if t is not None):
        raise InvalidClaims("token lifetime too long")
    return exp, iat if iat is not None else nbf


def _string(claims: dict, name: str) -> str:
    value = claims.get(name, "")
    if not isinstance(value, str):
        raise InvalidClaims(f"malformed {name} claim")
    return value


# ---- issuing ------------------------------------------------------------------------

class TokenIssuer:
    """Signs access tokens (jwt.md) and refresh tokens (oauth.md) with one key."""

    def __init__(self, key: SigningKey, *, issuer: str, service: str, lifetime: int,
                 refresh_lifetime: int, clock: Callable[[], float] = time.time,
                 leeway: int = 30) -> None:
        self._key = key
        self._issuer = issuer
        self._service = service
        self._lifetime = max(MIN_LIFETIME, int(lifetime))
        self._refresh_lifetime = max(MIN_LIFETIME, int(refresh_lifetime))
        self._clock = clock
        self._leeway = leeway

    @property
    def lifetime(self) -> int:
        return self._lifetime

    def _sign(self, claims: dict, typ: str) -> str:
        return jwt.encode(claims, self._key.private_key, algorithm=self._key.algorithm,
                          headers={"typ": typ, "kid": self._key.kid})

    def issue(self, subject: str, scopes: Sequence[Scope]) -> IssuedToken:
        now = int(self._clock())
        claims = {"iss": self._issuer, "sub": subject or "", "aud": self._service,
                  "exp": now + self._lifetime, "nbf": now, "iat": now,
                  "jti": secrets.token_hex(16),            # 128 random bits
                  "access": [scope.to_claim() for scope in scopes]}
        return IssuedToken(self._sign(claims, "JWT"), self._lifetime,
                           datetime.fromtimestamp(now, timezone.utc))

    def issue_refresh(self, subject: str, binding: str) -> str:
        """`binding` fingerprints what the subject logged in with, so the
        caller can refuse the token once that changes."""
        now = int(self._clock())
        claims = {"iss": self._issuer, "sub": subject or "", "aud": f"{self._service}#refresh",
                  "exp": now + self._refresh_lifetime, "nbf": now, "iat": now,
                  "jti": secrets.token_hex(16), "token_use": REFRESH_USE, "bnd": binding}
        return self._sign(claims, REFRESH_TYP)

    def verify_refresh(self, token: str) -> tuple[str, str]:
        """(subject, binding) of a refresh token this issuer's key signed."""
        header = _header(token)
        if header.get("typ") != REFRESH_TYP:
            raise InvalidClaims("not a refresh token")
        if header.get("kid") != self._key.kid:
            raise UntrustedKey("unknown key")
        if header.get("alg") != self._key.algorithm:
            raise UntrustedKey("algorithm not allowed for this key")
        claims = _decode(token, self._key.verification, self._leeway,
                         ("exp", "iss", "aud", "token_use", "bnd"))
        if claims.get("token_use") != REFRESH_USE:
            raise InvalidClaims("not a refresh token")
        _check_times(claims, self._clock(), self._leeway, self._refresh_lifetime)
        if claims.get("iss") != self._issuer:
            raise InvalidClaims("wrong issuer")
        if claims.get("aud") != f"{self._service}#refresh":
            raise InvalidClaims("wrong audience")
        binding = claims.get("bnd")
        if not isinstance(binding, str):
            raise InvalidClaims("malformed bnd claim")
        return _string(claims, "sub"), binding


# ---- verifying ----------------------------------------------------------------------

class TokenVerifier:
    """Checks access tokens against trusted keys (jwt.md, "Verifying the
    token"). A verified token is remembered until it expires, so a client's
    next requests cost a dictionary lookup and a clock read."""

    def __init__(self, keys: KeySet, *, issuer: str, service: str, max_lifetime: int,
                 leeway: int = 30, cache_size: int = 4096,
                 clock: Callable[[], float] = time.time) -> None:
        self._keys = keys
        self._issuer = issuer
        self._service = service
        self._max_lifetime = max_lifetime
        self._leeway = leeway
        self._cache_size = max(0, cache_size)
        self._clock = clock
        self._cache: OrderedDict[str, AccessToken] = OrderedDict()
        self._generation = 0        # bumped by replace_keys: a verify begun before does not cache
        self._lock = threading.Lock()

    @property
    def keys(self) -> KeySet:
        return self._keys

    def replace_keys(self, keys: KeySet) -> None:
        """Trust `keys` from now on; tokens verified under the old keys are
        checked again."""
        with self._lock:
            self._keys = keys
            self._generation += 1
            self._cache.clear()

    def cached(self, token: str) -> AccessToken | None:
        """The token's grant if it was verified before and has not expired;
        None when it must be verified. ExpiredToken once it has expired."""
        access = self._cache.get(token)
        if access is not None:
            if self._clock() >= access.expires_at + self._leeway:
                self._cache.pop(token, None)
                raise ExpiredToken("token expired")
            try:
                self._cache.move_to_end(token)
            except KeyError:        # evicted meanwhile by another thread
                pass
        return access

    def verify(self, token: str) -> AccessToken:
        access = self.cached(token) if isinstance(token, str) else None
        if access is not None:
            return access
        generation, keys = self._generation, self._keys
        access = self._verify(token, keys)
        if self._cache_size:
            with self._lock:
                if generation == self._generation:
                    self._cache[token] = access
                    while len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
        return access

    def _verify(self, token: str, keys: KeySet) -> AccessToken:
        header = _header(token)
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str)
                                or typ.lower().removeprefix("application/") not in ACCESS_TYPES):
            raise InvalidClaims("not an access token")
        key = self._select_key(header, keys)
        # the key's type fixes the algorithm: never none, HS*, or another family
        if header.get("alg") != key.algorithm:
            raise UntrustedKey("algorithm not allowed for this key")
        claims = _decode(token, key, self._leeway)
        return self._access(claims)

    def _select_key(self, header: dict, keys: KeySet) -> VerificationKey:
        kid = header.get("kid")
        embedded = None
        if "x5c" in header:
            embedded = self._x5c_key(header["x5c"], keys)
        if "jwk" in header:
            from_jwk = self._jwk_key(header["jwk"], keys)
            if embedded is not None and embedded.fingerprint != from_jwk.fingerprint:
                raise UntrustedKey("embedded keys disagree")
            embedded = from_jwk
        if kid is not None:
            if not isinstance(kid, str):
                raise MalformedToken("malformed token header")
            named = keys.get(kid)
            if named is None:
                # a leaf a trusted CA issued is not in the set; its kid names its own material
                if embedded is not None and (kid == embedded.kid or kid in embedded.aliases):
                    return embedded
                raise UntrustedKey("unknown key")
            # CVE-2025-24976: a known kid must not vouch for another embedded key
            if embedded is not None and embedded.fingerprint != named.fingerprint:
                raise UntrustedKey("key id and embedded key disagree")
            return named
        if embedded is not None:
            return embedded
        if len(keys) == 1:
            return next(iter(keys))
        raise UntrustedKey("token names no key")

    @staticmethod
    def _jwk_key(jwk: object, keys: KeySet) -> VerificationKey:
        try:
            candidate = parse_jwk(jwk, source="jwk header")
        except KeyFileError:
            raise UntrustedKey("embedded jwk is not a usable key") from None
        trusted = keys.by_fingerprint(candidate.fingerprint)
        if trusted is None:
            raise UntrustedKey("embedded jwk is not a trusted key")
        return trusted

    def _x5c_key(self, chain: object, keys: KeySet) -> VerificationKey:
        if not isinstance(chain, list) or not 1 <= len(chain) <= MAX_X5C \
                or not all(isinstance(c, str) for c in chain):
            raise MalformedToken("malformed x5c header")
        try:
            leaf = x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
            candidate = verification_key(leaf.public_key(), certificate=leaf, source="x5c leaf")
        except (ValueError, binascii.Error):
            raise UntrustedKey("x5c certificate is not usable") from None
        trusted = keys.by_fingerprint(candidate.fingerprint)
        if trusted is not None:
            return trusted
        now = datetime.fromtimestamp(self._clock(), timezone.utc)
        if not _valid_at(leaf, now) or not _may_sign(leaf):
            raise UntrustedKey("x5c certificate is not valid now or not for signing")
        for ca in keys.certificates:
            if _valid_at(ca, now) and _may_issue(ca) and _issued_by(leaf, ca):
                return candidate
        raise UntrustedKey("x5c certificate is not issued by a trusted certificate")

    def _access(self, claims: dict) -> AccessToken:
        exp, issued = _check_times(claims, self._clock(), self._leeway, self._max_lifetime)
        if claims.get("iss") != self._issuer:
            raise InvalidClaims("wrong issuer")
        aud = claims.get("aud")
        if not (aud == self._service or (isinstance(aud, list) and self._service in aud
                                         and all(isinstance(a, str) for a in aud))):
            raise InvalidClaims("wrong audience")
        if claims.get("token_use", "access") != "access":
            raise InvalidClaims("not an access token")
        subject, jti = _string(claims, "sub"), _string(claims, "jti")
        access = claims.get("access")
        try:
            scopes = () if access is None else claim_scopes(access)
        except ValueError:
            raise InvalidClaims("malformed access claim") from None
        scopes = tuple(Scope(s.type.split("(", 1)[0], s.name, s.actions) for s in scopes)
        return AccessToken(subject, scopes, exp, issued if issued is not None else self._clock(), jti)


def _valid_at(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _may_issue(ca: x509.Certificate) -> bool:
    """A CA that says what it may do must say it may sign certificates."""
    try:
        if not ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    except x509.ExtensionNotFound:
        pass
    try:
        return ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    except x509.ExtensionNotFound:
        return True


def _may_sign(leaf: x509.Certificate) -> bool:
    try:
        return leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    except x509.ExtensionNotFound:
        return True
    except ValueError:          # extensions that do not parse
        return False


def _issued_by(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
