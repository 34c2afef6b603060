"""The client's edge over the shared OCI vocabulary (storage.oci.content):
the same parsers and types, with storage.oci's OciError mapped into the
client's tree as ContentError (a ManifestError), so a malformed field in a
registry's answer or a layout on disk is one line for the user.

    parse_json_object(data, where) -> dict
    parse_descriptor(obj, where) -> Descriptor
    parse_manifest(data, media_type, where) -> ImageManifest | ImageIndex
    parse_config(data, where) -> dict
    check_document_size(descriptor, limit, where)

No validation lives here; what a field may hold is decided once, in
storage.oci, for the registry and the client alike.
"""

from __future__ import annotations

import functools

from puller.errors import ContentError
from storage.oci import content
from storage.oci.content import MAX_DOCUMENT_SIZE, MAX_SIZE, Descriptor, ImageIndex, ImageManifest, Manifest
from storage.oci.errors import NestingTooDeep, OciError


def _edge(parse):
    @functools.wraps(parse)
    def mapped(*args, **kwargs):
        try:
            return parse(*args, **kwargs)
        except NestingTooDeep as exc:
            # to the client a document nested past any sane depth is simply not JSON
            raise ContentError(f"{exc.where}: not valid JSON") from exc
        except OciError as exc:
            raise ContentError(str(exc)) from exc
    return mapped


parse_json_object = _edge(content.parse_json_object)
parse_descriptor = _edge(content.parse_descriptor)
parse_manifest = _edge(content.parse_manifest)
parse_config = _edge(content.parse_config)
check_document_size = _edge(content.check_document_size)

__all__ = ["MAX_DOCUMENT_SIZE", "MAX_SIZE", "ContentError", "Descriptor", "ImageIndex", "ImageManifest", "Manifest",
           "check_document_size", "parse_config", "parse_descriptor", "parse_json_object", "parse_manifest"]
