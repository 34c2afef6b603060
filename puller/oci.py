"""OCI content as the client reads it: descriptors, image manifests, image
indexes and image configs, checked field by field at the edge.

Pure: bytes or decoded JSON in, typed values or one ContentError out; no
I/O, no HTTP. Everything handed to this module comes from someone the
client does not trust (a registry, an OCI layout on disk, a referrers
list), so a missing or malformed field becomes one line naming where it
was, never a KeyError or a TypeError three calls later; and a descriptor
whose size cannot bound a download is refused before anything is fetched.

    parse_json_object(data, where) -> dict              strict JSON (no NaN/Infinity), an object
    parse_descriptor(obj, where) -> Descriptor
    parse_manifest(data, media_type, where) -> ImageManifest | ImageIndex
    parse_config(data, where) -> dict                   an image config, the fields the client uses
    check_document_size(descriptor, limit, where)       refuse a manifest/config too big to read

MAX_DOCUMENT_SIZE bounds every JSON document the client reads whole
(manifests, indexes, configs, referrers lists): each is held in memory and
decoded, so its size is capped before the first byte arrives.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from puller.errors import ManifestError
from puller.reference import ReferenceError, validate_digest

MAX_DOCUMENT_SIZE = 4 * 1024 * 1024     # as containerd and CNCF Distribution cap manifests
MAX_SIZE = 2 ** 63 - 1                  # a descriptor's size is an int64

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")
INDEX_MEDIA_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)

# RFC 6838 type/subtype; it also keeps CR, LF and spaces out of Content-Type headers
_MEDIA_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$")


class ContentError(ManifestError):
    """Untrusted OCI JSON with a missing or malformed field (one line)."""


@dataclass(frozen=True)
class Descriptor:
    media_type: str                      # "" when the descriptor names none
    digest: str                          # sha256:<64 hex> or sha512:<128 hex>
    size: int                            # 0 <= size <= 2**63-1: always bounds a download
    urls: tuple[str, ...] = ()
    platform: dict | None = None
    annotations: dict | None = None
    artifact_type: str | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)   # the checked object as it came

    @property
    def non_distributable(self) -> bool:
        """A layer to fetch from its own URLs, not from the registry."""
        return bool(self.urls) and ("foreign" in self.media_type or "nondistributable" in self.media_type)


@dataclass(frozen=True)
class ImageManifest:
    media_type: str
    config: Descriptor | None            # None only for manifests of an unknown (artifact) type
    layers: tuple[Descriptor, ...]
    subject: Descriptor | None
    artifact_type: str | None
    annotations: dict | None
    json: dict = field(compare=False, repr=False)
    is_index = False

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        return ((self.config,) if self.config else ()) + self.layers


@dataclass(frozen=True)
class ImageIndex:
    media_type: str
    manifests: tuple[Descriptor, ...]
    subject: Descriptor | None
    artifact_type: str | None
    annotations: dict | None
    json: dict = field(compare=False, repr=False)
    is_index = True


# -- pieces ---------------------------------------------------------------------------

def _show(value) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json_object(data: bytes | str, where: str) -> dict:
    """`data` as a JSON object; NaN, Infinity and nesting too deep to decode
    are refused like any other invalid JSON."""
    try:
        value = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise ContentError(f"{where}: not valid JSON") from None
    if not isinstance(value, dict):
        raise ContentError(f"{where}: not a JSON object")
    return value


def _optional(obj: dict, key: str, kind: type | tuple, where: str, what: str):
    value = obj.get(key)
    if value is not None and not isinstance(value, kind):
        raise ContentError(f"{where}: {key} must be {what}, got {_show(value)}")
    return value


def _media_type(obj: dict, key: str, where: str) -> str | None:
    value = _optional(obj, key, str, where, "a string")
    if value is not None and not _MEDIA_TYPE_RE.match(value):
        raise ContentError(f"{where}: {key} {_show(value)} is not a media type")
    return value


def _string_list(obj: dict, key: str, where: str) -> tuple[str, ...]:
    value = _optional(obj, key, list, where, "a list of strings")
    if value is None:
        return ()
    if not all(isinstance(item, str) for item in value):
        raise ContentError(f"{where}: {key} must be a list of strings")
    return tuple(value)


def _string_map(obj: dict, key: str, where: str) -> dict | None:
    value = _optional(obj, key, dict, where, "an object")
    if value is not None and not all(isinstance(v, str) for v in value.values()):
        raise ContentError(f"{where}: {key} must map strings to strings")
    return value


def _digest(value, where: str) -> str:
    if value is None:
        raise ContentError(f"{where}: no digest")
    if not isinstance(value, str):
        raise ContentError(f"{where}: digest must be a string, got {_show(value)}")
    try:
        return validate_digest(value)
    except ReferenceError as exc:
        raise ContentError(f"{where}: {exc}") from None


def _size(value, where: str) -> int:
    # bool is an int to Python and a float may be 1e300: only a true integer bounds a download
    if value is None:
        raise ContentError(f"{where}: no size")
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SIZE:
        raise ContentError(f"{where}: size must be an integer from 0 to 2^63-1, got {_show(value)}")
    return value


def _platform(obj: dict, where: str) -> dict | None:
    value = _optional(obj, "platform", dict, where, "an object")
    if value is None:
        return None
    inner = f"{where}: platform"
    for key in ("os", "architecture", "variant", "os.version"):
        _optional(value, key, str, inner, "a string")
    _string_list(value, "os.features", inner)
    _string_list(value, "features", inner)
    return value


# -- descriptors, manifests, indexes ----------------------------------------------------

def parse_descriptor(obj, where: str) -> Descriptor:
    """A descriptor (config, layer, index entry, subject, referrer)."""
    if not isinstance(obj, dict):
        raise ContentError(f"{where}: a descriptor must be a JSON object, got {_show(obj)}")
    _optional(obj, "data", str, where, "a base64 string")
    return Descriptor(media_type=_media_type(obj, "mediaType", where) or "",
                      digest=_digest(obj.get("digest"), where), size=_size(obj.get("size"), where),
                      urls=_string_list(obj, "urls", where), platform=_platform(obj, where),
                      annotations=_string_map(obj, "annotations", where),
                      artifact_type=_media_type(obj, "artifactType", where), raw=obj)


def _descriptor_list(body: dict, key: str, where: str, required: bool) -> tuple[Descriptor, ...]:
    value = body.get(key)
    if value is None:
        if required:
            raise ContentError(f"{where}: no {key} list")
        return ()
    if not isinstance(value, list):
        raise ContentError(f"{where}: {key} must be a list, got {_show(value)}")
    return tuple(parse_descriptor(item, f"{where}: {key}[{i}]") for i, item in enumerate(value))


def document_media_type(body: dict, fallback: str | None) -> str:
    """The media type of a manifest-like document: its own mediaType, else
    what it was served or described as, else guessed from its shape."""
    declared = body.get("mediaType") if isinstance(body.get("mediaType"), str) else None
    media_type = declared or fallback or ""
    if media_type not in INDEX_MEDIA_TYPES + MANIFEST_MEDIA_TYPES + DOCKER_SCHEMA1:
        # artifacts and untyped documents
        media_type = OCI_INDEX if "manifests" in body else (media_type or OCI_MANIFEST)
    return media_type


def parse_manifest(data: bytes | str, media_type: str | None, where: str) -> ImageManifest | ImageIndex:
    """An image manifest or index; `media_type` is what the document was
    served (Content-Type) or described as, used when it names none itself."""
    body = parse_json_object(data, where)
    return parse_manifest_object(body, media_type, where)


def parse_manifest_object(body: dict, media_type: str | None, where: str) -> ImageManifest | ImageIndex:
    if not isinstance(body, dict):
        raise ContentError(f"{where}: not a JSON object")
    _media_type(body, "mediaType", where)
    version = body.get("schemaVersion")
    resolved = document_media_type(body, media_type)
    if version == 1 or resolved in DOCKER_SCHEMA1:
        raise ContentError(f"{where}: Docker schema 1 manifests are not supported")
    if version is not None and (version != 2 or isinstance(version, bool)):
        raise ContentError(f"{where}: schemaVersion must be 2, got {_show(version)}")
    subject = body.get("subject")
    subject = parse_descriptor(subject, f"{where}: subject") if subject is not None else None
    artifact_type = _media_type(body, "artifactType", where)
    annotations = _string_map(body, "annotations", where)
    if resolved in INDEX_MEDIA_TYPES:
        return ImageIndex(media_type=resolved, manifests=_descriptor_list(body, "manifests", where, True),
                          subject=subject, artifact_type=artifact_type, annotations=annotations, json=body)
    config = body.get("config")
    if config is None and resolved in MANIFEST_MEDIA_TYPES:
        raise ContentError(f"{where}: manifest without a config descriptor")
    return ImageManifest(media_type=resolved,
                         config=parse_descriptor(config, f"{where}: config") if config is not None else None,
                         layers=_descriptor_list(body, "layers", where, False), subject=subject,
                         artifact_type=artifact_type, annotations=annotations, json=body)


def check_document_size(descriptor: Descriptor, limit: int, where: str) -> None:
    """A manifest or config is read whole into memory: refuse one whose
    descriptor says it is larger than `limit`, before fetching it."""
    if descriptor.size > limit:
        raise ContentError(f"{where}: declared size {descriptor.size} bytes exceeds the {limit} byte limit")


# -- image configs --------------------------------------------------------------------------

def parse_config(data: bytes | str, where: str) -> dict:
    """An image config: a JSON object whose platform fields are strings and
    whose rootfs.diff_ids are digests (they name snapshot directories)."""
    body = parse_json_object(data, where)
    for key in ("os", "architecture", "variant", "os.version", "created", "author"):
        _optional(body, key, str, where, "a string")
    _optional(body, "config", dict, where, "an object")
    rootfs = _optional(body, "rootfs", dict, where, "an object")
    if rootfs is not None:
        diff_ids = _optional(rootfs, "diff_ids", list, f"{where}: rootfs", "a list")
        for i, diff_id in enumerate(diff_ids or []):
            _digest(diff_id, f"{where}: rootfs.diff_ids[{i}]")
    return body


__all__ = ["ContentError", "Descriptor", "ImageIndex", "ImageManifest", "MAX_DOCUMENT_SIZE",
           "check_document_size", "document_media_type", "parse_config", "parse_descriptor",
           "parse_json_object", "parse_manifest", "parse_manifest_object"]
