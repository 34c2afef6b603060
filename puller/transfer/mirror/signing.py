"""The signature over a bundle manifest: ECDSA (P-256, P-384, P-521, with
SHA-256/384/512) or Ed25519 keys in PEM, through the `cryptography`
library. What is signed is the bundle manifest's exact bytes; the
signature document names the algorithm and the key (the SHA-256 of its
SubjectPublicKeyInfo), so a wrong key is told apart from a wrong signature.

    document = sign(data, load_private_key(path))      -> dict (JSON beside the manifest)
    verify(data, document, load_public_key(path))      SignatureError unless it holds
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from puller.transfer.mirror.errors import MirrorError, SignatureError

MAX_KEY_BYTES = 64 * 1024
_CURVE_HASH = {"secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384, "secp521r1": hashes.SHA512}


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(MAX_KEY_BYTES)
    except OSError as exc:
        raise MirrorError(f"{path}: {exc.strerror or exc}") from exc


def _check_kind(key, path: str):
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if key.curve.name not in _CURVE_HASH:
            raise MirrorError(f"{path}: ECDSA curve {key.curve.name} is not supported (P-256, P-384, P-521)")
        return key
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return key
    raise MirrorError(f"{path}: not an ECDSA or Ed25519 key")


def load_private_key(path: str):
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError) as exc:
        raise MirrorError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    return _check_kind(key, path)


def load_public_key(path: str):
    """A PEM public key, or the public half of a PEM private key."""
    data = _read(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as exc:
            raise MirrorError(f"{path}: not a PEM public key ({exc})") from None
    return _check_kind(key, path)


def key_id(public_key) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _algorithm(key) -> str:
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "ed25519"
    return f"ecdsa-{key.curve.name}"


def sign(data: bytes, private_key) -> dict:
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        signature = private_key.sign(data)
    else:
        signature = private_key.sign(data, ec.ECDSA(_CURVE_HASH[private_key.curve.name]()))
    public = private_key.public_key()
    return {"algorithm": _algorithm(public), "keyId": key_id(public),
            "signature": base64.b64encode(signature).decode()}


def verify(data: bytes, document: dict | None, public_key) -> None:
    if document is None:
        raise SignatureError("the bundle is not signed, and --verify-key asks for a signature")
    if not isinstance(document, dict) or not all(isinstance(document.get(k), str)
                                                 for k in ("algorithm", "keyId", "signature")):
        raise SignatureError("the bundle's signature document is malformed")
    if document["algorithm"] != _algorithm(public_key) or document["keyId"] != key_id(public_key):
        raise SignatureError(f"the bundle is signed by another key ({document['algorithm']} {document['keyId']})")
    try:
        signature = base64.b64decode(document["signature"], validate=True)
    except ValueError:
        raise SignatureError("the bundle's signature is not base64") from None
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, data)
        else:
            public_key.verify(signature, data, ec.ECDSA(_CURVE_HASH[public_key.curve.name]()))
    except InvalidSignature:
        raise SignatureError("the bundle manifest does not match its signature (tampered with?)") from None
