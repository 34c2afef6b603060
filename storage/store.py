"""The content store: blobs, uploads, manifests, tags and referrers on top of
any `StorageDriver`. The registry handlers talk only to this class.

Every path comes from `storage.layout`; this module never builds one.
Errors are the domain errors of `storage.errors` (each names its OCI code).

CONTRACT NOTE: this file was first written as the interface both the storage
and the registry work were built against. Signatures below are the contract;
change them only together with registry/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator

from storage.driver import StorageDriver


@dataclass(frozen=True)
class BlobInfo:
    digest: str            # "sha256:<hex>" or "sha512:<hex>"
    size: int


@dataclass(frozen=True)
class UploadStatus:
    repo: str
    upload_id: str
    offset: int            # bytes received so far; next chunk must start here


@dataclass(frozen=True)
class Manifest:
    digest: str
    media_type: str        # exactly the Content-Type it was pushed with
    body: bytes


@dataclass(frozen=True)
class PutManifestResult:
    digest: str
    subject: str | None    # digest of the `subject` descriptor, for OCI-Subject


@dataclass(frozen=True)
class Page:
    items: list[str]
    has_more: bool         # True when a further page exists (Link header)


@dataclass
class StoreLimits:
    max_manifest_bytes: int = 4 * 1024 * 1024
    # digest algorithms accepted for blobs and manifests
    digest_algorithms: tuple[str, ...] = field(default=("sha256", "sha512"))


class ContentStore:
    def __init__(self, driver: StorageDriver, limits: StoreLimits | None = None):
        self.driver = driver
        self.limits = limits or StoreLimits()

    # ---- names ---------------------------------------------------------
    @staticmethod
    def validate_name(repo: str) -> None:
        """NameInvalid unless repo matches the spec's grammar
        `[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*(\\/[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*)*`
        and is at most 255 characters."""
        raise NotImplementedError

    @staticmethod
    def validate_tag(tag: str) -> None:
        """TagInvalid unless tag matches `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`."""
        raise NotImplementedError

    @staticmethod
    def parse_digest(digest: str) -> tuple[str, str]:
        """(algorithm, hex) or DigestInvalid (unknown algorithm, bad hex/length)."""
        raise NotImplementedError

    # ---- blobs ---------------------------------------------------------
    async def stat_blob(self, repo: str, digest: str) -> BlobInfo:
        """BlobUnknown unless the blob exists AND is linked into repo."""
        raise NotImplementedError

    def read_blob(self, digest: str, offset: int = 0,
                  length: int | None = None) -> AsyncIterator[bytes]:
        """Stream a blob's bytes from the global store."""
        raise NotImplementedError

    def blob_local_path(self, digest: str) -> str | None:
        """Filesystem path for sendfile, None on object stores."""
        raise NotImplementedError

    async def blob_url(self, digest: str) -> str | None:
        """A direct download URL (S3 presigned) or None."""
        raise NotImplementedError

    async def delete_blob(self, repo: str, digest: str) -> None:
        """Unlink the blob from repo (BlobUnknown if not linked). The global
        bytes are left for garbage collection."""
        raise NotImplementedError

    async def mount_blob(self, repo: str, digest: str,
                         from_repo: str | None) -> BlobInfo | None:
        """Link an existing blob into repo. With from_repo, only if it is
        linked there; without, if it exists anywhere. None when not possible
        (the registry then starts an ordinary upload)."""
        raise NotImplementedError

    # ---- uploads -------------------------------------------------------
    async def start_upload(self, repo: str) -> UploadStatus:
        """A new upload session, kept in storage (any worker may continue it)."""
        raise NotImplementedError

    async def upload_status(self, repo: str, upload_id: str) -> UploadStatus:
        """BlobUploadUnknown for an unknown, finished or cancelled session."""
        raise NotImplementedError

    async def append_upload(self, repo: str, upload_id: str,
                            chunks: AsyncIterator[bytes],
                            start: int | None = None) -> UploadStatus:
        """Append a chunk. With start (from Content-Range), RangeInvalid
        unless start == current offset. Nothing of a chunk that fails half
        way is lost or duplicated for the next try: the offset reported after
        an error is one a client can resume from."""
        raise NotImplementedError

    async def finish_upload(self, repo: str, upload_id: str, digest: str,
                            chunks: AsyncIterator[bytes] | None = None,
                            start: int | None = None) -> BlobInfo:
        """Append the final chunk (optional), verify the digest (DigestInvalid
        and nothing committed on mismatch, the session stays open), move the
        bytes into the global blob store (a no-op when already there), link
        into repo, and delete the session."""
        raise NotImplementedError

    async def cancel_upload(self, repo: str, upload_id: str) -> None:
        raise NotImplementedError

    async def put_blob(self, repo: str, digest: str,
                       chunks: AsyncIterator[bytes]) -> BlobInfo:
        """Monolithic upload in one call (POST ?digest= with a body)."""
        raise NotImplementedError

    # ---- manifests and tags --------------------------------------------
    async def put_manifest(self, repo: str, reference: str, body: bytes,
                           media_type: str,
                           extra_tags: list[str] = ()) -> PutManifestResult:
        """Validate (JSON, media type, size limit, every referenced blob or
        child manifest present in repo -> ManifestInvalid /
        ManifestBlobUnknown), store the bytes as a blob, link the revision,
        point the tag (reference if it is a tag, plus extra_tags), and index
        the `subject` for referrers. reference may be a digest, which must
        match the body (DigestInvalid)."""
        raise NotImplementedError

    async def get_manifest(self, repo: str, reference: str) -> Manifest:
        """By tag or digest; ManifestUnknown (NameUnknown for an unknown repo
        is acceptable too)."""
        raise NotImplementedError

    async def delete_manifest(self, repo: str, reference: str) -> None:
        """By digest: unlink the revision, drop tags pointing at it and its
        referrers entry. By tag: delete only the tag."""
        raise NotImplementedError

    async def list_tags(self, repo: str, n: int | None = None,
                        last: str | None = None) -> Page:
        """Lexically sorted; NameUnknown for a repository that does not exist."""
        raise NotImplementedError

    async def list_repositories(self, n: int | None = None,
                                last: str | None = None) -> Page:
        """The catalog, lexically sorted, without walking blob data."""
        raise NotImplementedError

    async def referrers(self, repo: str, digest: str,
                        artifact_type: str | None = None) -> list[dict]:
        """Descriptors (mediaType, digest, size, artifactType, annotations)
        of manifests whose subject is digest."""
        raise NotImplementedError
