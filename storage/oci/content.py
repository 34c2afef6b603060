"""Descriptors, image manifests, image indexes and image configs (image
spec: descriptor.md, manifest.md, image-index.md, config.md), checked field
by field, and the walk over a manifest's children.

Everything handed here comes from someone the reader does not trust (a
client pushing, a registry answering, a layout on disk), so a missing or
malformed field is one ManifestInvalid naming where it was, never a
KeyError three calls later; a descriptor's size always bounds a download.

    parse_json_object(data, where)          strict JSON (no NaN, nesting bounded), an object
    parse_descriptor(obj, where)            -> Descriptor
    parse_manifest(data, media_type, where) -> ImageManifest | ImageIndex  (what a reader got)
    parse_pushed_manifest(body, content_type) -> the same, by a registry's stricter rules
    stored_media_type(data)                 the type stored manifest bytes are served with
    parse_config(data, where)               an image config, the fields readers use
    Manifest.children()                     config, layers, index entries, subject: the walk
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Union

from storage.oci import media
from storage.oci.errors import DigestInvalid, ManifestInvalid, NestingTooDeep
from storage.oci.names import parse_digest

MAX_SIZE = 2 ** 63 - 1              # a descriptor's size is an int64: what any storage can hold
MAX_DOCUMENT_SIZE = 4 * 1024 * 1024  # a JSON document read whole (as containerd and Distribution cap manifests)
# Real manifests nest 5 levels (index > manifests > descriptor > platform >
# os.features); this leaves room for any extension and none for a parser bomb.
MAX_DEPTH = 64


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
        """A layer fetched from its own URLs, never from the registry."""
        return bool(self.urls) and ("foreign" in self.media_type or "nondistributable" in self.media_type)


@dataclass(frozen=True)
class Child:
    """One step of the walk: a descriptor and what it is to its parent."""
    descriptor: Descriptor
    role: str                            # "config" | "layer" | "manifest" | "subject"


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

    @property
    def effective_artifact_type(self) -> str | None:
        """artifactType, else the config's media type (referrers list rule)."""
        return self.artifact_type or (self.config.media_type if self.config else None) or None

    def children(self) -> Iterator[Child]:
        if self.config is not None:
            yield Child(self.config, "config")
        for layer in self.layers:
            yield Child(layer, "layer")
        if self.subject is not None:
            yield Child(self.subject, "subject")


@dataclass(frozen=True)
class ImageIndex:
    media_type: str
    manifests: tuple[Descriptor, ...]
    subject: Descriptor | None
    artifact_type: str | None
    annotations: dict | None
    json: dict = field(compare=False, repr=False)
    is_index = True

    @property
    def effective_artifact_type(self) -> str | None:
        return self.artifact_type

    def children(self) -> Iterator[Child]:
        for entry in self.manifests:
            yield Child(entry, "manifest")
        if self.subject is not None:
            yield Child(self.subject, "subject")


Manifest = Union[ImageManifest, ImageIndex]


# ---- pieces ---------------------------------------------------------------------------

def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _too_deep(doc: Any, limit: int) -> bool:
    """Objects and arrays nested more than limit levels (iterative: the
    check itself must not recurse)."""
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def parse_json_object(data: bytes | str, where: str, max_depth: int = MAX_DEPTH) -> dict:
    """data as a JSON object. NaN and Infinity are refused like any invalid
    JSON, and so is nesting deeper than max_depth."""
    try:
        value = json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        raise NestingTooDeep(f"{where}: nests deeper than {max_depth} levels", where) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestInvalid(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ManifestInvalid(f"{where}: not a JSON object")
    if _too_deep(value, max_depth):
        raise NestingTooDeep(f"{where}: nests deeper than {max_depth} levels", where)
    return value


def _optional(obj: dict, key: str, kind: type | tuple, where: str, what: str):
    value = obj.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
        raise ManifestInvalid(f"{where}: {key} must be {what}, got {_show(value)}")
    return value


def _media_type(obj: dict, key: str, where: str) -> str | None:
    value = _optional(obj, key, str, where, "a string")
    if value is not None and not media.is_media_type(value):
        raise ManifestInvalid(f"{where}: {key} {_show(value)} is not a media type")
    return value


def _string_list(obj: dict, key: str, where: str) -> tuple[str, ...]:
    value = _optional(obj, key, list, where, "a list of strings")
    if value is None:
        return ()
    if not all(isinstance(item, str) for item in value):
        raise ManifestInvalid(f"{where}: {key} must be a list of strings")
    return tuple(value)


def _string_map(obj: dict, key: str, where: str) -> dict | None:
    value = _optional(obj, key, dict, where, "an object")
    if value is not None and not all(isinstance(v, str) for v in value.values()):
        raise ManifestInvalid(f"{where}: {key} must map strings to strings")
    return value


def _digest(value: Any, where: str) -> str:
    if value is None:
        raise ManifestInvalid(f"{where}: no digest")
    if not isinstance(value, str):
        raise ManifestInvalid(f"{where}: digest must be a string, got {_show(value)}")
    try:
        parse_digest(value)
    except DigestInvalid as exc:
        raise ManifestInvalid(f"{where}: {exc.message}") from None
    return value


def _size(value: Any, where: str) -> int:
    # bool is an int to Python and a float may be 1e300: only a true integer bounds a download
    if value is None:
        raise ManifestInvalid(f"{where}: no size")
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SIZE:
        raise ManifestInvalid(f"{where}: size must be an integer from 0 to 2^63-1, got {_show(value)}")
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


# ---- descriptors, manifests, indexes ---------------------------------------------------

def parse_descriptor(obj: Any, where: str, *, require_media_type: bool = False) -> Descriptor:
    """A descriptor (config, layer, index entry, subject, referrer)."""
    if not isinstance(obj, dict):
        raise ManifestInvalid(f"{where}: a descriptor must be a JSON object, got {_show(obj)}")
    media_type = _media_type(obj, "mediaType", where)
    if require_media_type and not media_type:
        raise ManifestInvalid(f"{where}: mediaType must be a non-empty string")
    _optional(obj, "data", str, where, "a base64 string")
    return Descriptor(media_type=media_type or "", digest=_digest(obj.get("digest"), where),
                      size=_size(obj.get("size"), where), urls=_string_list(obj, "urls", where),
                      platform=_platform(obj, where), annotations=_string_map(obj, "annotations", where),
                      artifact_type=_media_type(obj, "artifactType", where), raw=obj)


def _descriptor_list(body: dict, key: str, where: str, required: bool,
                     strict: bool) -> tuple[Descriptor, ...]:
    value = body.get(key)
    if value is None:
        if required:
            raise ManifestInvalid(f"{where}: no {key} list")
        return ()
    if not isinstance(value, list):
        raise ManifestInvalid(f"{where}: {key} must be a list, got {_show(value)}")
    return tuple(parse_descriptor(item, f"{where}: {key}[{i}]", require_media_type=strict)
                 for i, item in enumerate(value))


def _check_unambiguous(body: dict, media_type: str, where: str) -> None:
    """CVE-2021-41190: a document that reads as both a manifest and an index
    could be served as either; refuse it whatever it declares."""
    has_manifests = "manifests" in body
    has_image_fields = "config" in body or "layers" in body
    if has_manifests and has_image_fields:
        raise ManifestInvalid(f"{where}: has both manifests and config/layers: ambiguous")
    if media.is_index(media_type) and has_image_fields:
        raise ManifestInvalid(f"{where}: an index with config or layers")
    if media.is_image_manifest(media_type) and has_manifests:
        raise ManifestInvalid(f"{where}: an image manifest with a manifests list")


def document_media_type(body: dict, fallback: str | None) -> str:
    """What a document read from elsewhere is: its own mediaType, else what
    it was served or described as, else its shape."""
    declared = body.get("mediaType") if isinstance(body.get("mediaType"), str) else None
    media_type = declared or fallback or ""
    if not media.is_manifest(media_type) and media_type.lower() not in media.DOCKER_SCHEMA1:
        # artifacts and untyped documents
        media_type = media.OCI_INDEX if "manifests" in body else (media_type or media.OCI_MANIFEST)
    return media_type


def stored_media_type(data: bytes | dict) -> str:
    """The media type stored manifest bytes are served with, read from the
    bytes alone as CNCF Distribution 2.8 reads them (it keeps no type
    beside a manifest): the document's own mediaType; else schema 1 (which
    Distribution only ever stored signed); else an index when it lists
    manifests, an image manifest otherwise. Never raises: what is stored was
    checked when it was pushed. `data` may be the document already parsed."""
    try:
        body = data if isinstance(data, dict) else parse_json_object(data, "stored manifest")
    except ManifestInvalid:           # NestingTooDeep included
        return media.OCI_MANIFEST
    declared = body.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if body.get("schemaVersion") == 1:
        return media.DOCKER_SCHEMA1_SIGNED
    return media.OCI_INDEX if "manifests" in body else media.OCI_MANIFEST


def _build(body: dict, resolved: str, where: str, strict: bool) -> Manifest:
    _check_unambiguous(body, resolved, where)
    subject = body.get("subject")
    subject = parse_descriptor(subject, f"{where}: subject", require_media_type=strict) \
        if subject is not None else None
    artifact_type = _media_type(body, "artifactType", where)
    annotations = _string_map(body, "annotations", where)
    if strict and annotations is not None and not all(isinstance(k, str) for k in annotations):
        raise ManifestInvalid(f"{where}: annotations must map strings to strings")
    if media.is_index(resolved):
        return ImageIndex(media_type=resolved,
                          manifests=_descriptor_list(body, "manifests", where, True, strict),
                          subject=subject, artifact_type=artifact_type, annotations=annotations, json=body)
    config = body.get("config")
    if config is None and media.is_image_manifest(resolved):
        raise ManifestInvalid(f"{where}: manifest without a config descriptor")
    if strict and "layers" not in body:
        raise ManifestInvalid(f"{where}: layers must be a list")
    return ImageManifest(media_type=resolved,
                         config=parse_descriptor(config, f"{where}: config", require_media_type=strict)
                         if config is not None else None,
                         layers=_descriptor_list(body, "layers", where, False, strict), subject=subject,
                         artifact_type=artifact_type, annotations=annotations, json=body)


def parse_manifest(data: bytes | str | dict, media_type: str | None = None,
                   where: str = "manifest") -> Manifest:
    """An image manifest or index as read from a registry or a layout;
    media_type is what it was served (Content-Type) or described as, used
    when it names none itself. A missing schemaVersion is tolerated."""
    body = data if isinstance(data, dict) else parse_json_object(data, where)
    _media_type(body, "mediaType", where)
    version = body.get("schemaVersion")
    resolved = document_media_type(body, media_type)
    if version == 1 or resolved.lower() in media.DOCKER_SCHEMA1:
        raise ManifestInvalid(f"{where}: Docker schema 1 manifests are not supported")
    if version is not None and (version != 2 or isinstance(version, bool)):
        raise ManifestInvalid(f"{where}: schemaVersion must be 2, got {_show(version)}")
    return _build(body, resolved, where, strict=False)


def pushed_media_type(content_type: str, body: dict) -> str:
    """The media type a pushed manifest is stored and served with: the
    Content-Type (parameters dropped), or, when that says nothing, the
    body's mediaType, or its shape. ManifestInvalid for a type that is not a
    manifest's, a mismatch between the two, or Docker schema 1."""
    pushed = media.essence(content_type)
    body_type = body.get("mediaType")
    if body_type is not None and not isinstance(body_type, str):
        raise ManifestInvalid("mediaType must be a string")
    generic = pushed.lower() in media.GENERIC_CONTENT_TYPES
    if generic:
        if body_type:
            chosen = body_type
        elif "manifests" in body:
            chosen = media.OCI_INDEX
        elif "config" in body:
            chosen = media.OCI_MANIFEST
        else:
            raise ManifestInvalid("cannot tell the manifest's media type")
    else:
        chosen = pushed
        if body_type and body_type.lower() != pushed.lower():
            raise ManifestInvalid(f"mediaType {body_type!r} does not match Content-Type {pushed!r}")
    if chosen.lower() in media.DOCKER_SCHEMA1:
        raise ManifestInvalid("Docker schema 1 manifests are not supported")
    if not media.is_manifest(chosen):
        raise ManifestInvalid(f"unsupported manifest media type: {chosen!r}")
    return chosen.lower() if generic else chosen


def parse_pushed_manifest(body: bytes, content_type: str) -> Manifest:
    """A manifest a client pushes, by a registry's rules: schemaVersion 2,
    a manifest media type (pushed_media_type), every descriptor typed."""
    doc = parse_json_object(body, "manifest")
    resolved = pushed_media_type(content_type, doc)
    version = doc.get("schemaVersion")
    if version != 2 or isinstance(version, bool):
        raise ManifestInvalid("schemaVersion must be 2")
    return _build(doc, resolved, "manifest", strict=True)


def check_document_size(descriptor: Descriptor, limit: int, where: str) -> None:
    """A manifest or config is read whole into memory: refuse one whose
    descriptor says it is larger than limit, before fetching it."""
    if descriptor.size > limit:
        raise ManifestInvalid(f"{where}: declared size {descriptor.size} bytes exceeds the {limit} byte limit")


# ---- image configs ----------------------------------------------------------------------

def parse_config(data: bytes | str, where: str = "config") -> dict:
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
