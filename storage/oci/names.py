"""The grammar of names (distribution spec, "Pulling manifests"; the
`distribution/reference` grammar for whole references): repository names,
tags, digests and `[domain/]path[:tag][@digest]` references.

Each grammar excludes "/..", absolute paths, NUL and anything else that
could lead a name out of a storage root, so a name checked here may become
a path component.
"""

from __future__ import annotations

import re

from storage.oci.errors import DigestInvalid, NameInvalid, TagInvalid

MAX_NAME_LENGTH = 255
# Hex length of each supported algorithm's digest.
DIGEST_HEX_LENGTH = {"sha256": 64, "sha512": 128}
ALGORITHMS = tuple(DIGEST_HEX_LENGTH)

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_HEX_RE = re.compile(r"[a-f0-9]+")
# The image spec's general digest grammar: tells "malformed" from "well
# formed, but an algorithm we do not support".
_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?")


def validate_name(repo: str) -> str:
    """repo, or NameInvalid unless it matches
    `[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*(\\/[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*)*`
    and has at most 255 characters."""
    if not isinstance(repo, str) or len(repo) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(repo):
        why = "invalid repository name"
        if isinstance(repo, str) and len(repo) > MAX_NAME_LENGTH:
            why = f"repository name longer than {MAX_NAME_LENGTH} characters"
        elif isinstance(repo, str) and repo != repo.lower() and _NAME_RE.fullmatch(repo.lower()):
            why = "repository name must be lowercase"
        raise NameInvalid(f"{why}: {repo!r}", {"name": repo})
    return repo


def validate_tag(tag: str) -> str:
    """tag, or TagInvalid unless it matches `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`."""
    if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
        raise TagInvalid(f"invalid tag: {tag!r}", {"tag": tag})
    return tag


def parse_digest(digest: str, algorithms: tuple[str, ...] = ALGORITHMS) -> tuple[str, str]:
    """(algorithm, hex) of "alg:hex"; DigestInvalid for anything else."""
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise DigestInvalid(f"invalid digest: {digest!r}", {"digest": digest})
    alg, _, hex_ = digest.partition(":")
    if alg not in algorithms or alg not in DIGEST_HEX_LENGTH:
        raise DigestInvalid(f"unsupported digest algorithm: {alg!r}", {"digest": digest})
    if len(hex_) != DIGEST_HEX_LENGTH[alg] or not _HEX_RE.fullmatch(hex_):
        raise DigestInvalid(f"invalid {alg} digest: {digest!r}", {"digest": digest})
    return alg, hex_


def validate_digest(digest: str) -> str:
    parse_digest(digest)
    return digest


def is_digest(reference: str) -> bool:
    """True when a manifest reference is meant as a digest (it has a colon,
    which no tag may have)."""
    return ":" in reference


def is_domain(text: str) -> bool:
    """A registry host: DNS labels or a bracketed IPv6 address, with an optional port."""
    return _DOMAIN_RE.fullmatch(text) is not None


def split_reference(text: str) -> tuple[str, str | None, str | None]:
    """`name[:tag][@digest]` into (name, tag, digest), each part checked
    except the name (whose first component may be a registry host: the
    caller decides). NameInvalid for an empty name."""
    name, digest = text, None
    if "@" in name:
        name, _, digest = name.partition("@")
        validate_digest(digest)
    tag = None
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], validate_tag(name[colon + 1:])
    if not name:
        raise NameInvalid(f"empty repository name in {text!r}", {"name": ""})
    return name, tag, digest
