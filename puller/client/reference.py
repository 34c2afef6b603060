"""Image references, parsed the way Docker parses them.

    name                     -> docker.io/library/name:latest
    user/name:tag            -> docker.io/user/name:tag
    host:port/path/name:tag  -> host:port/path/name:tag
    name@sha256:<64 hex>     -> docker.io/library/name@sha256:...
    name:tag@sha256:...      -> both kept; the digest is what gets fetched

The first path component is a registry host when it contains '.' or ':',
is 'localhost', or has an upper-case letter (Docker's rule). Repository
names, tags and digests follow the grammar of the OCI distribution spec,
as storage.oci.names draws it for both halves; this module adds only
Docker's defaults (docker.io, library/, latest) and platforms.

    parse_reference(text) -> Reference   (raises ReferenceError, one line)
    Reference.registry      "docker.io", "127.0.0.1:5000", "[::1]:5000"
    Reference.repository    "library/busybox"
    Reference.tag / .digest
    Reference.api_host      host to talk HTTP to ("registry-1.docker.io" for Docker Hub)
    str(Reference)          the normalised form, "127.0.0.1:5000/busybox:latest"
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

from puller.errors import ReferenceError
from storage.oci import names
from storage.oci.errors import NameInvalid, OciError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        """registry/repository, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def identifier(self) -> str:
        """What to ask the registry for: the digest when known, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_tag(self, tag: str | None) -> "Reference":
        return replace(self, tag=tag, digest=None)

    def with_digest(self, digest: str | None) -> "Reference":
        return replace(self, digest=digest)

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def _looks_like_registry(component: str) -> bool:
    return ("." in component or ":" in component or component == "localhost"
            or component.lower() != component)


def parse_reference(text: str, *, default_tag: bool = True) -> Reference:
    """Parse `text` into a normalised Reference. A bare name gets ':latest'
    unless `default_tag` is False or a digest is given."""
    original = text
    if not text or text != text.strip():
        raise ReferenceError(f"invalid reference {original!r}")
    try:
        text, tag, digest = names.split_reference(text)
    except NameInvalid as exc:
        raise ReferenceError(f"invalid reference {original!r}: {exc}") from exc
    except OciError as exc:           # a tag or digest outside the grammar
        raise ReferenceError(str(exc)) from exc
    first, sep, rest = text.partition("/")
    if sep and _looks_like_registry(first):
        registry, path = first, rest
        if not names.is_domain(registry):
            raise ReferenceError(f"invalid registry host {registry!r} in {original!r}")
        if registry == "index.docker.io":
            registry = DOCKER_HUB
    else:
        registry, path = DOCKER_HUB, text
    if not path:
        raise ReferenceError(f"invalid reference {original!r}: empty repository name")
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    try:
        names.validate_name(path)
    except OciError as exc:
        raise ReferenceError(f"invalid reference {original!r}: {exc}") from exc
    if tag is None and digest is None and default_tag:
        tag = DEFAULT_TAG
    return Reference(registry=registry, repository=path, tag=tag, digest=digest)


def host_without_port(host: str) -> str:
    if host.startswith("["):
        return host[1:host.index("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 and ::1 (with or without a port) - the hosts
    Docker talks plain HTTP to."""
    bare = host_without_port(host)
    if bare == "localhost" or bare.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


# -- platforms ("os/arch[/variant]") --------------------------------------------
# Platform strings select one image of an index; they live here so that the
# store, pull and run all parse them the same way.

_MACHINE_TO_ARCH = {
    "x86_64": ("amd64", None), "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
    "i386": ("386", None), "i686": ("386", None),
    "ppc64le": ("ppc64le", None), "s390x": ("s390x", None), "riscv64": ("riscv64", None),
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def parse_platform(text: str) -> Platform:
    parts = (text or "").strip().lower().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ReferenceError(f"invalid platform {text!r} (expected os/arch[/variant], e.g. linux/arm64)")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


def host_platform() -> Platform:
    import platform as _platform
    arch, variant = _MACHINE_TO_ARCH.get(_platform.machine().lower(), (_platform.machine().lower(), None))
    return Platform("linux", arch, variant)


def _default_variant(arch: str) -> str | None:
    return {"arm64": "v8", "arm": "v7"}.get(arch)


def platform_matches(candidate: dict | None, wanted: Platform) -> bool:
    if not candidate:
        return False
    if candidate.get("os") != wanted.os or candidate.get("architecture") != wanted.architecture:
        return False
    if wanted.variant is None:
        return True
    have = candidate.get("variant") or _default_variant(wanted.architecture)
    return have == wanted.variant


def choose_platform(descriptors: list[dict], wanted: Platform) -> dict | None:
    """The descriptor of an index that serves `wanted`; an exact variant match
    wins, then the default variant of the architecture, then any variant."""
    matching = [d for d in descriptors if platform_matches(d.get("platform"), Platform(wanted.os, wanted.architecture))]
    if not matching:
        return None
    if wanted.variant:
        for desc in matching:
            if platform_matches(desc.get("platform"), wanted):
                return desc
        return None
    default = _default_variant(wanted.architecture)
    for desc in matching:
        if (desc["platform"].get("variant") or default) == default:
            return desc
    return matching[0]


def describe_platform(platform: dict | None) -> str:
    if not platform:
        return "unknown"
    return "/".join(p for p in (platform.get("os"), platform.get("architecture"), platform.get("variant")) if p)
