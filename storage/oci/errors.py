"""The OCI error codes (distribution spec, "Error Codes"), knowing nothing
of HTTP: the registry's table (registry/errors.py) alone maps a code to a
status; the client maps these at its boundary into its own tree.

    OciError                 code + message + detail
    ├── BlobUnknown              BLOB_UNKNOWN
    ├── BlobUploadInvalid        BLOB_UPLOAD_INVALID
    │   └── RangeInvalid             a chunk not starting where the upload stands
    ├── BlobUploadUnknown        BLOB_UPLOAD_UNKNOWN
    ├── DigestInvalid            DIGEST_INVALID
    ├── ManifestBlobUnknown      MANIFEST_BLOB_UNKNOWN
    ├── ManifestInvalid          MANIFEST_INVALID
    │   └── NestingTooDeep           JSON nested past the depth limit
    ├── ManifestUnknown          MANIFEST_UNKNOWN
    ├── NameInvalid              NAME_INVALID
    ├── NameUnknown              NAME_UNKNOWN
    ├── SizeInvalid              SIZE_INVALID
    │   └── ManifestTooLarge         over the manifest size limit
    ├── TagInvalid               TAG_INVALID
    ├── Unauthorized             UNAUTHORIZED
    ├── Denied                   DENIED
    ├── Unsupported              UNSUPPORTED
    ├── TooManyRequests          TOOMANYREQUESTS
    └── PaginationNumberInvalid  PAGINATION_NUMBER_INVALID
"""

from __future__ import annotations

from typing import Any


class OciError(Exception):
    """An error with an OCI code; str() is its message."""

    code: str = "UNKNOWN"

    def __init__(self, message: str = "", detail: Any = None):
        super().__init__(message or self.code)
        self.message = message
        self.detail = detail


class BlobUnknown(OciError):
    code = "BLOB_UNKNOWN"


class BlobUploadInvalid(OciError):
    code = "BLOB_UPLOAD_INVALID"


class RangeInvalid(BlobUploadInvalid):
    """A chunk whose Content-Range does not start at the upload's offset;
    `offset` is where the upload stands."""

    def __init__(self, message: str, offset: int):
        super().__init__(message, {"offset": offset})
        self.offset = offset


class BlobUploadUnknown(OciError):
    code = "BLOB_UPLOAD_UNKNOWN"


class DigestInvalid(OciError):
    code = "DIGEST_INVALID"


class ManifestBlobUnknown(OciError):
    code = "MANIFEST_BLOB_UNKNOWN"


class ManifestInvalid(OciError):
    code = "MANIFEST_INVALID"


class NestingTooDeep(ManifestInvalid):
    """A JSON document nested deeper than the limit; `where` names the
    document (the client words this as invalid JSON)."""

    def __init__(self, message: str, where: str):
        super().__init__(message)
        self.where = where


class ManifestUnknown(OciError):
    code = "MANIFEST_UNKNOWN"


class NameInvalid(OciError):
    code = "NAME_INVALID"


class NameUnknown(OciError):
    code = "NAME_UNKNOWN"


class SizeInvalid(OciError):
    code = "SIZE_INVALID"


class ManifestTooLarge(SizeInvalid):
    """A manifest over the size limit (the spec answers it with 413)."""


class TagInvalid(OciError):
    code = "TAG_INVALID"


class Unauthorized(OciError):
    code = "UNAUTHORIZED"


class Denied(OciError):
    code = "DENIED"


class Unsupported(OciError):
    code = "UNSUPPORTED"


class TooManyRequests(OciError):
    code = "TOOMANYREQUESTS"


class PaginationNumberInvalid(OciError):
    code = "PAGINATION_NUMBER_INVALID"
