"""Computing digests (image spec, descriptor.md "Digests")."""

from __future__ import annotations

import hashlib

from storage.oci.names import ALGORITHMS, parse_digest

EMPTY_JSON = b"{}"


def digest_of(data: bytes | bytearray | memoryview, algorithm: str = "sha256") -> str:
    """"<algorithm>:<hex>" of data."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def hasher_for(digest: str):
    """A fresh hashlib object of the digest's algorithm (DigestInvalid for a bad digest)."""
    algorithm, _ = parse_digest(digest)
    return hashlib.new(algorithm)


def matches(data: bytes | bytearray | memoryview, digest: str) -> bool:
    """True when data hashes to digest (of whichever supported algorithm it names)."""
    algorithm, hex_ = parse_digest(digest)
    return hashlib.new(algorithm, data).hexdigest() == hex_


# The OCI empty descriptor's blob: `{}`, the config of artifacts.
EMPTY_DIGEST = digest_of(EMPTY_JSON)
