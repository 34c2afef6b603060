"""Domain errors raised by the content store.

Each carries the OCI error code it stands for; `registry.errors` holds the
one table that maps a code to its HTTP status and message, and the one
middleware that writes the JSON error body. Nothing here knows HTTP.
"""

from __future__ import annotations

from typing import Any


class StoreError(Exception):
    code: str = "UNKNOWN"

    def __init__(self, message: str = "", detail: Any = None):
        super().__init__(message or self.code)
        self.message = message
        self.detail = detail


class BlobUnknown(StoreError):
    code = "BLOB_UNKNOWN"


class BlobUploadUnknown(StoreError):
    code = "BLOB_UPLOAD_UNKNOWN"


class BlobUploadInvalid(StoreError):
    code = "BLOB_UPLOAD_INVALID"


class DigestInvalid(StoreError):
    code = "DIGEST_INVALID"


class SizeInvalid(StoreError):
    code = "SIZE_INVALID"


class ManifestUnknown(StoreError):
    code = "MANIFEST_UNKNOWN"


class ManifestInvalid(StoreError):
    code = "MANIFEST_INVALID"


class ManifestBlobUnknown(StoreError):
    code = "MANIFEST_BLOB_UNKNOWN"


class NameInvalid(StoreError):
    code = "NAME_INVALID"


class NameUnknown(StoreError):
    code = "NAME_UNKNOWN"


class TagInvalid(StoreError):
    code = "TAG_INVALID"


class Unsupported(StoreError):
    code = "UNSUPPORTED"


class RangeInvalid(StoreError):
    """A chunk whose Content-Range does not start at the upload's offset.
    `offset` is where the upload stands (the registry answers 416 with a
    Range header built from it)."""

    code = "BLOB_UPLOAD_INVALID"

    def __init__(self, message: str, offset: int):
        super().__init__(message, {"offset": offset})
        self.offset = offset


class ManifestTooLarge(SizeInvalid):
    """A manifest over the store's size limit. The distribution spec answers
    this with 413 Payload Too Large; `status` says so to registry.errors,
    which honours a `status` attribute over its table."""

    status = 413
