"""Blobs: stored once, by digest, in the global store; linked into each
repository that was given them. Reading, linking, mounting and the commit
of verified bytes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from storage import layout
from storage.catalog import Catalog
from storage.driver import FileWriter, PathNotFound, StorageDriver, delete_if_present, file_exists
from storage.oci.digests import EMPTY_DIGEST, EMPTY_JSON
from storage.oci.errors import BlobUnknown, BlobUploadUnknown
from storage.oci.names import ALGORITHMS, parse_digest, validate_name

# A mount without `from` looks through at most this many repositories.
_MOUNT_SEARCH_LIMIT = 10_000


@dataclass(frozen=True)
class BlobInfo:
    digest: str            # "sha256:<hex>" or "sha512:<hex>"
    size: int


@dataclass
class StoreLimits:
    max_manifest_bytes: int = 4 * 1024 * 1024
    # digest algorithms accepted for blobs and manifests
    digest_algorithms: tuple[str, ...] = field(default=ALGORITHMS)
    # in-process cache of manifest bytes by digest (immutable content only)
    manifest_cache_bytes: int = 64 * 1024 * 1024
    # accept manifests whose layers or index children were never pushed
    # (mirrors of a subset, non-distributable layers); off, as Distribution
    allow_sparse_manifests: bool = False


class Blobs:
    def __init__(self, driver: StorageDriver, limits: StoreLimits, catalog: Catalog):
        self.driver = driver
        self.limits = limits
        self.catalog = catalog

    def check_digest(self, digest: str) -> tuple[str, str]:
        """(algorithm, hex), or DigestInvalid (also for an algorithm not accepted here)."""
        return parse_digest(digest, self.limits.digest_algorithms)

    def _unknown(self, repo: str, digest: str) -> BlobUnknown:
        return BlobUnknown(f"blob unknown to repository {repo}: {digest}", {"digest": digest})

    async def exists(self, digest: str) -> bool:
        """True when the blob's bytes are in the global store (any repository)."""
        self.check_digest(digest)
        return await file_exists(self.driver, layout.blob_data(digest))

    async def stat(self, repo: str, digest: str) -> BlobInfo:
        """BlobUnknown unless the blob exists AND is linked into repo (as a
        layer or config, or as a manifest revision: some clients fetch a
        manifest through the blobs endpoint)."""
        validate_name(repo)
        self.check_digest(digest)
        # The layer link and the bytes in one storage round trip (HEAD is on
        # every push's path for every blob, GET on every pull's); the
        # revision link only when the bytes are there but no layer link is:
        # a manifest fetched through the blobs endpoint, which is rare.
        layer, data = await self.driver.stat_files([layout.layer_link(repo, digest), layout.blob_data(digest)])
        if data is not None and (layer is not None or
                                 (await self.driver.stat_files([layout.manifest_revision_link(repo, digest)]))[0]):
            return BlobInfo(digest, data.size)
        raise self._unknown(repo, digest)

    async def read(self, digest: str, offset: int = 0, length: int | None = None,
                   chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """Stream a blob's bytes from the global store. BlobUnknown if absent;
        the driver's InvalidOffset for an offset past the end (callers check
        ranges against stat first)."""
        self.check_digest(digest)
        try:
            async for chunk in self.driver.reader(layout.blob_data(digest), offset, length, chunk_size):
                yield chunk
        except PathNotFound as exc:
            raise BlobUnknown(f"blob unknown: {digest}", {"digest": digest}) from exc

    async def open_local(self, digest: str):
        """An open local file of the blob (`.fd`, `.size`, `close()`) the
        registry may send from, None on backends without one. BlobUnknown if absent."""
        self.check_digest(digest)
        if not self.driver.local_files:
            return None
        try:
            return await self.driver.open_local(layout.blob_data(digest))
        except PathNotFound as exc:
            raise BlobUnknown(f"blob unknown: {digest}", {"digest": digest}) from exc

    async def url(self, digest: str) -> str | None:
        """A direct download URL (S3 presigned) or None."""
        self.check_digest(digest)
        return await self.driver.url_for(layout.blob_data(digest))

    async def unlink(self, repo: str, digest: str) -> None:
        """Unlink the blob from repo (BlobUnknown if not linked). The global
        bytes are left for garbage collection."""
        validate_name(repo)
        self.check_digest(digest)
        if not await delete_if_present(self.driver, layout.layer_link_dir(repo, digest)):
            raise self._unknown(repo, digest)

    async def link(self, repo: str, digest: str) -> None:
        await self.driver.put_content(layout.layer_link(repo, digest), digest.encode())
        await self.catalog.register(repo)

    async def mount(self, repo: str, digest: str, from_repo: str | None,
                    readable: Callable[[str], bool] | None = None) -> BlobInfo | None:
        """Link a blob into repo from a repository that has it. With
        from_repo, only if it is linked there; without, only if it is linked
        in some repository `readable` accepts (None: every one). A blob held
        only where the caller may not read, or by no repository at all (its
        links deleted), is None like an unknown one: the registry then starts
        an ordinary upload, and the answer says nothing about other
        repositories."""
        validate_name(repo)
        self.check_digest(digest)
        if from_repo is not None:
            validate_name(from_repo)
            if readable is not None and not readable(from_repo):
                return None
            try:
                info = await self.stat(from_repo, digest)
            except BlobUnknown:
                return None
        else:
            info = await self._find_linked(digest, readable)
            if info is None:
                return None
        await self.link(repo, digest)
        return info

    async def _find_linked(self, digest: str,
                           readable: Callable[[str], bool] | None) -> BlobInfo | None:
        """The blob's size when some readable repository links it."""
        data = (await self.driver.stat_files([layout.blob_data(digest)]))[0]
        if data is None:
            return None
        last, searched = None, 0
        while searched < _MOUNT_SEARCH_LIMIT:
            page = await self.catalog.repositories(1000, last)
            candidates = [r for r in page.items if readable is None or readable(r)]
            searched += len(page.items)
            found = await self.driver.stat_files(
                [path for r in candidates for path in (layout.layer_link(r, digest),
                                                       layout.manifest_revision_link(r, digest))])
            if any(found):
                return BlobInfo(digest, data.size)
            if not page.has_more or not page.items:
                return None
            last = page.items[-1]
        return None

    async def commit(self, src: str, digest: str) -> None:
        """Move verified bytes into the global store by rename, replacing
        whatever is there. A copy already in place is never trusted as is:
        had it been altered (written through a session before uploads were
        locked, or by hand), linking a new push to it would serve other bytes
        under the digest, while the file just hashed is known good. Two
        processes committing one digest at once each rename identical bytes."""
        try:
            await self.driver.move(src, layout.blob_data(digest))
        except PathNotFound as exc:
            raise BlobUploadUnknown("upload finished or cancelled meanwhile") from exc

    async def direct_writer(self, digest: str) -> FileWriter | None:
        """A writer straight at the blob's place that shows nothing before
        its commit (the driver's `atomic_writer`), for bytes the caller
        hashes as they stream and commits only once they hashed to
        `digest`: no staged copy to move, and the place never holds bytes
        of another digest. None when the driver has none: stage, then `commit`."""
        self.check_digest(digest)
        return await self.driver.atomic_writer(layout.blob_data(digest))

    async def put_small(self, digest: str, data: bytes) -> None:
        """Bytes the store itself vouches for (a manifest it hashed): written
        whole, atomically, unless already there."""
        if not await file_exists(self.driver, layout.blob_data(digest)):
            await self.driver.put_content(layout.blob_data(digest), data)

    async def provide_empty(self, repo: str) -> None:
        """The OCI empty blob `{}`, so artifact pushers need not upload 2 bytes."""
        await self.put_small(EMPTY_DIGEST, EMPTY_JSON)
        await self.link(repo, EMPTY_DIGEST)
