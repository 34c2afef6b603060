"""The grammar of every name that ends up in a storage path.

Repository names, tags, digests and upload ids are checked here, against the
OCI distribution grammar, BEFORE `storage.layout` turns them into a path.
Each grammar excludes "/..", absolute paths, NUL and anything else that
could lead a path out of the storage root.
"""

from __future__ import annotations

import re

from storage.errors import BlobUploadUnknown, DigestInvalid, NameInvalid, TagInvalid

MAX_NAME_LENGTH = 255

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_UPLOAD_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")

# Hex length of each supported algorithm's digest.
DIGEST_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"[a-f0-9]+")
# The general digest grammar from the image spec; used to tell "malformed"
# from "well formed but an algorithm we do not support".
_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")


def validate_name(repo: str) -> None:
    if (not isinstance(repo, str) or len(repo) > MAX_NAME_LENGTH
            or not _NAME_RE.fullmatch(repo)):
        raise NameInvalid(f"invalid repository name: {repo!r}", {"name": repo})


def validate_tag(tag: str) -> None:
    if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
        raise TagInvalid(f"invalid tag: {tag!r}", {"tag": tag})


def parse_digest(digest: str,
                 algorithms: tuple[str, ...] = tuple(DIGEST_HEX_LENGTH)) -> tuple[str, str]:
    """(algorithm, hex) of "alg:hex"; DigestInvalid for anything else."""
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise DigestInvalid(f"invalid digest: {digest!r}", {"digest": digest})
    alg, _, hex_ = digest.partition(":")
    if alg not in algorithms or alg not in DIGEST_HEX_LENGTH:
        raise DigestInvalid(f"unsupported digest algorithm: {alg!r}", {"digest": digest})
    if len(hex_) != DIGEST_HEX_LENGTH[alg] or not _HEX_RE.fullmatch(hex_):
        raise DigestInvalid(f"invalid {alg} digest: {digest!r}", {"digest": digest})
    return alg, hex_


def is_digest(reference: str) -> bool:
    """True when a manifest reference is meant as a digest (it has a colon,
    which no tag may have)."""
    return ":" in reference


def validate_upload_id(upload_id: str) -> None:
    # An id that could not have come from us is simply an unknown session.
    if not isinstance(upload_id, str) or not _UPLOAD_ID_RE.fullmatch(upload_id):
        raise BlobUploadUnknown(f"unknown upload: {upload_id!r}", {"uuid": upload_id})
