"""Media types (image spec, media-types.md) and what kind of document each is."""

from __future__ import annotations

import re

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDISTRIBUTABLE_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_LAYOUT_HEADER = "application/vnd.oci.layout.header.v1+json"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_SCHEMA1 = frozenset({"application/vnd.docker.distribution.manifest.v1+json", DOCKER_SCHEMA1_SIGNED})

IMAGE_MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = IMAGE_MANIFEST_TYPES | INDEX_TYPES
# Docker's types as their OCI equivalents (converting an image to a layout)
DOCKER_TO_OCI = {DOCKER_MANIFEST: OCI_MANIFEST, DOCKER_MANIFEST_LIST: OCI_INDEX,
                 DOCKER_CONFIG: OCI_CONFIG, DOCKER_LAYER: OCI_LAYER_GZIP, DOCKER_LAYER_TAR: OCI_LAYER,
                 DOCKER_LAYER_ZSTD: OCI_LAYER_ZSTD, DOCKER_FOREIGN_LAYER: OCI_LAYER_NONDISTRIBUTABLE_GZIP}
# What a client sends as Accept for a manifest: every type it can read.
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])

# Content-Types that say nothing about a manifest: its mediaType (or shape) decides.
GENERIC_CONTENT_TYPES = frozenset({"", "application/json", "application/octet-stream",
                                   "text/plain", "*/*"})

# RFC 6838 type/subtype; also keeps CR, LF and spaces out of Content-Type headers.
_MEDIA_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")


def is_media_type(value: object) -> bool:
    return isinstance(value, str) and _MEDIA_TYPE_RE.fullmatch(value) is not None


def is_index(media_type: str | None) -> bool:
    return (media_type or "").lower() in INDEX_TYPES


def is_image_manifest(media_type: str | None) -> bool:
    return (media_type or "").lower() in IMAGE_MANIFEST_TYPES


def is_manifest(media_type: str | None) -> bool:
    """An image manifest or an index: what the manifests endpoint serves."""
    return (media_type or "").lower() in MANIFEST_TYPES


def essence(content_type: str | None) -> str:
    """A Content-Type without its parameters ("; charset=...")."""
    return (content_type or "").split(";", 1)[0].strip()
