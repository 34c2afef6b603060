"""Key material for tokens: the signing key a token service keeps, and the
public keys (and CA certificates) a registry trusts.

Each key type signs with one fixed algorithm, so a token never chooses how
it is checked (no RS256/HS256 key confusion):

    EC P-256 -> ES256    EC P-384 -> ES384    RSA >= 2048 bits -> RS256
    Ed25519  -> EdDSA    anything else is refused (KeyFileError)

A key is named by its RFC 7638 thumbprint. Two more names lead to the same
material: its libtrust key id (the "ABCD:EFGH:..." kid of jwt.md, used by
Distribution-era token servers) and the `kid` a JWKS document gives it.
`fingerprint` (sha256 of the DER SubjectPublicKeyInfo) compares material.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Union

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

PublicKey = Union[ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey]
PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]

MIN_RSA_BITS = 2048
GENERATED_RSA_BITS = 3072
_EC_ALGORITHMS = {"secp256r1": ("ES256", "P-256", 32), "secp384r1": ("ES384", "P-384", 48)}
_JWK_CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1}
CREATABLE = ("ES256", "RS256", "EdDSA")


class KeyFileError(ValueError):
    """A key file or document that cannot be used: `<source>: <problem>`, one
    line, never key bytes."""

    def __init__(self, source: object, problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source = str(source)
        self.problem = problem


# ---- one public key ---------------------------------------------------------------

def key_algorithm(public_key: object, source: object = "key") -> str:
    """The one algorithm `public_key` signs with; KeyFileError for other keys."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        spec = _EC_ALGORITHMS.get(public_key.curve.name)
        if spec is None:
            raise KeyFileError(source, f"EC curve {public_key.curve.name} is not supported (P-256, P-384)")
        return spec[0]
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise KeyFileError(source, f"RSA key of {public_key.key_size} bits is too small "
                                       f"(at least {MIN_RSA_BITS})")
        return "RS256"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise KeyFileError(source, f"{type(public_key).__name__} keys are not supported "
                               "(EC P-256/P-384, RSA, Ed25519)")


def key_fingerprint(public_key: PublicKey) -> str:
    return hashlib.sha256(_spki(public_key)).hexdigest()


def libtrust_key_id(public_key: PublicKey) -> str:
    """The kid Distribution's libtrust derives: base32 of the first 240 bits of
    sha256(SPKI), in twelve groups of four."""
    text = base64.b32encode(hashlib.sha256(_spki(public_key)).digest()[:30]).decode()
    return ":".join(text[i:i + 4] for i in range(0, len(text), 4))


def _spki(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int_bytes(value: int, length: int | None = None) -> bytes:
    return value.to_bytes(length or max(1, (value.bit_length() + 7) // 8), "big")


def _jwk_members(public_key: PublicKey) -> dict[str, str]:
    """The members RFC 7638 §3.2 (and RFC 8037 §2 for OKP) require."""
    key_algorithm(public_key)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        _, crv, size = _EC_ALGORITHMS[public_key.curve.name]
        numbers = public_key.public_numbers()
        return {"crv": crv, "kty": "EC", "x": _b64u(_int_bytes(numbers.x, size)),
                "y": _b64u(_int_bytes(numbers.y, size))}
    if isinstance(public_key, rsa.RSAPublicKey):
        numbers = public_key.public_numbers()
        return {"e": _b64u(_int_bytes(numbers.e)), "kty": "RSA", "n": _b64u(_int_bytes(numbers.n))}
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"crv": "Ed25519", "kty": "OKP", "x": _b64u(raw)}


def jwk_thumbprint(public_key: PublicKey) -> str:
    """RFC 7638: sha256 over the required members, sorted, no whitespace."""
    canonical = json.dumps(_jwk_members(public_key), sort_keys=True, separators=(",", ":"))
    return _b64u(hashlib.sha256(canonical.encode()).digest())


def public_jwk(public_key: PublicKey, kid: str, algorithm: str) -> dict:
    return {**_jwk_members(public_key), "kid": kid, "alg": algorithm, "use": "sig"}


@dataclass(frozen=True)
class VerificationKey:
    """A trusted public key. Equal when kid, algorithm and material are."""

    kid: str
    algorithm: str
    public_key: PublicKey = field(compare=False, repr=False)
    fingerprint: str
    # the certificate it came in, so an x5c leaf can be checked against it
    certificate: x509.Certificate | None = field(default=None, compare=False, repr=False)
    # other names for the same material: its libtrust id, a JWKS's own kid
    aliases: tuple[str, ...] = field(default=(), compare=False)


def verification_key(public_key: PublicKey, *, certificate: x509.Certificate | None = None,
                     aliases: Iterable[str] = (), source: object = "key") -> VerificationKey:
    algorithm = key_algorithm(public_key, source)
    kid = jwk_thumbprint(public_key)
    names = dict.fromkeys(a for a in (libtrust_key_id(public_key), *aliases) if a and a != kid)
    return VerificationKey(kid, algorithm, public_key, key_fingerprint(public_key), certificate,
                           tuple(names))


# ---- JWK / JWKS ---------------------------------------------------------------------

def _member(entry: dict, name: str, source: object) -> bytes:
    value = entry.get(name)
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", value):
        raise KeyFileError(source, f"JWK member {name!r} is missing or not base64url")
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def parse_jwk(entry: object, *, source: object = "JWK") -> VerificationKey:
    """One public JWK (private members are ignored); its own kid becomes an alias."""
    if not isinstance(entry, dict):
        raise KeyFileError(source, "JWK is not an object")
    kty, crv = entry.get("kty"), entry.get("crv")
    try:
        if kty == "EC" and crv in _JWK_CURVES:
            x, y = (int.from_bytes(_member(entry, m, source), "big") for m in ("x", "y"))
            public_key: PublicKey = ec.EllipticCurvePublicNumbers(x, y, _JWK_CURVES[crv]()).public_key()
        elif kty == "RSA":
            n, e = (int.from_bytes(_member(entry, m, source), "big") for m in ("n", "e"))
            public_key = rsa.RSAPublicNumbers(e, n).public_key()
        elif kty == "OKP" and crv == "Ed25519":
            public_key = ed25519.Ed25519PublicKey.from_public_bytes(_member(entry, "x", source))
        else:
            raise KeyFileError(source, f"JWK type {kty!r}{f' curve {crv!r}' if crv else ''} is not supported")
    except (ValueError, UnsupportedAlgorithm) as exc:
        if isinstance(exc, KeyFileError):
            raise
        raise KeyFileError(source, f"JWK of type {kty} is not a valid public key") from None
    key = verification_key(public_key, source=source)
    alg = entry.get("alg")
    if alg is not None and alg != key.algorithm:
        raise KeyFileError(source, f"JWK declares alg {alg!r}; this key type signs with {key.algorithm}")
    kid = entry.get("kid")
    if isinstance(kid, str) and kid and kid != key.kid:
        key = verification_key(public_key, aliases=(*key.aliases, kid), source=source)
    return key


def parse_jwks(document: object, *, source: object = "JWKS") -> list[VerificationKey]:
    """A JWKS document's signature keys; keys marked `"use": "enc"` are skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeyFileError(source, 'not a JWKS document (an object with a "keys" list)')
    keys: list[VerificationKey] = []
    for index, entry in enumerate(document["keys"]):
        if isinstance(entry, dict) and entry.get("use", "sig") != "sig":
            continue
        keys.append(parse_jwk(entry, source=f"{source} key {index}"))
    if not keys:
        raise KeyFileError(source, "holds no signature keys")
    try:
        KeySet(keys)              # refuse a kid naming two keys now, at load
    except ValueError as exc:
        raise KeyFileError(source, str(exc)) from None
    return keys


# ---- files --------------------------------------------------------------------------

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)


def load_verification_keys(path: Path) -> list[VerificationKey]:
    """A PEM bundle of public keys and/or certificates, or a JWKS JSON file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(path, f"cannot read ({exc.strerror or exc.__class__.__name__})") from None
    if data.lstrip()[:1] in (b"{", b"["):
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise KeyFileError(path, "is not valid JSON") from None
        return parse_jwks(document, source=path)
    keys = []
    for index, match in enumerate(_PEM_BLOCK.finditer(data)):
        label = match.group(1).decode()
        where = f"{path} (PEM block {index + 1})"
        try:
            if label == "CERTIFICATE":
                cert = x509.load_pem_x509_certificate(match.group(0))
                keys.append(verification_key(cert.public_key(), certificate=cert, source=where))
            elif label in ("PUBLIC KEY", "RSA PUBLIC KEY"):
                keys.append(verification_key(serialization.load_pem_public_key(match.group(0)), source=where))
            elif "PRIVATE KEY" in label:
                raise KeyFileError(where, "is a private key; trust takes public keys or certificates")
            else:
                raise KeyFileError(where, f"{label} is not a public key or certificate")
        except (ValueError, UnsupportedAlgorithm) as exc:
            if isinstance(exc, KeyFileError):
                raise
            raise KeyFileError(where, f"is not a valid {label.lower()}") from None
    if not keys:
        raise KeyFileError(path, "holds no PEM public key, certificate or JWKS document")
    return keys


# ---- the key set --------------------------------------------------------------------

class KeySet:
    """The keys a verifier trusts, by kid (and aliases) and by material; the
    certificates among them (and any extra ones) may issue x5c leaves."""

    def __init__(self, keys: Iterable[VerificationKey] = (), *,
                 certificates: Iterable[x509.Certificate] = ()) -> None:
        merged: dict[str, VerificationKey] = {}
        for key in keys:
            seen = merged.get(key.fingerprint)
            if seen is not None:       # the same material twice: one key, every name
                aliases = tuple(dict.fromkeys((*seen.aliases, *key.aliases)))
                key = VerificationKey(seen.kid, seen.algorithm, seen.public_key, seen.fingerprint,
                                      seen.certificate or key.certificate, aliases)
            merged[key.fingerprint] = key
        self._by_material = merged
        self._by_kid: dict[str, VerificationKey] = {}
        for key in merged.values():
            for name in (key.kid, *key.aliases):
                other = self._by_kid.setdefault(name, key)
                if other is not key:
                    raise ValueError(f"key id {name!r} names two different keys")
        certs = [k.certificate for k in merged.values() if k.certificate is not None]
        self.certificates: tuple[x509.Certificate, ...] = tuple(dict.fromkeys([*certs, *certificates]))

    def get(self, kid: str) -> VerificationKey | None:
        return self._by_kid.get(kid)

    def by_material(self, public_key: PublicKey) -> VerificationKey | None:
        return self._by_material.get(key_fingerprint(public_key))

    def by_fingerprint(self, fingerprint: str) -> VerificationKey | None:
        return self._by_material.get(fingerprint)

    def jwks(self) -> dict:
        return {"keys": [public_jwk(k.public_key, k.kid, k.algorithm) for k in self]}

    def __len__(self) -> int:
        return len(self._by_material)

    def __iter__(self) -> Iterator[VerificationKey]:
        return iter(self._by_material.values())


# ---- the signing key ----------------------------------------------------------------

@dataclass(frozen=True)
class SigningKey:
    private_key: PrivateKey = field(repr=False)
    verification: VerificationKey

    @property
    def kid(self) -> str:
        return self.verification.kid

    @property
    def algorithm(self) -> str:
        return self.verification.algorithm


def signing_key(private_key: PrivateKey, source: object = "key") -> SigningKey:
    if not isinstance(private_key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey,
                                    ed25519.Ed25519PrivateKey)):
        raise KeyFileError(source, f"{type(private_key).__name__} keys are not supported "
                                   "(EC P-256/P-384, RSA, Ed25519)")
    return SigningKey(private_key, verification_key(private_key.public_key(), source=source))


def generate_signing_key(algorithm: str = "ES256") -> SigningKey:
    if algorithm == "ES256":
        return signing_key(ec.generate_private_key(ec.SECP256R1()))
    if algorithm == "RS256":
        return signing_key(rsa.generate_private_key(65537, GENERATED_RSA_BITS))
    if algorithm == "EdDSA":
        return signing_key(ed25519.Ed25519PrivateKey.generate())
    raise ValueError(f"cannot create a key for algorithm {algorithm!r} (one of {', '.join(CREATABLE)})")


def load_signing_key(path: Path) -> SigningKey:
    """An unencrypted PEM private key, PKCS8 or traditional."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(path, f"cannot read ({exc.strerror or exc.__class__.__name__})") from None
    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(path, "is an encrypted private key; give an unencrypted one") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(path, "is not a PEM private key (PKCS8 or traditional)") from None
    return signing_key(private_key, source=path)


def load_or_create_signing_key(path: Path, algorithm: str = "ES256") -> SigningKey:
    """The key at `path`, created on first use. `algorithm` picks the type of a
    new key; an existing file's own key type wins.

    Several processes may start at once: each writes a complete key to its own
    temporary file and links it into place; link never replaces, so the first
    wins and the others read the winner's key.
    """
    path = Path(path)
    if path.exists():
        return load_signing_key(path)
    key = generate_signing_key(algorithm)
    pem = key.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # 0600
    except OSError as exc:
        raise KeyFileError(path, f"cannot create ({exc.strerror or exc.__class__.__name__})") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            pass                      # another process won the race: use its key
        except OSError as exc:
            raise KeyFileError(path, f"cannot create ({exc.strerror or exc.__class__.__name__})") from None
        else:
            _fsync_dir(path.parent)
    finally:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
    return load_signing_key(path)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
