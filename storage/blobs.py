"""Blobs: stored once, by digest, in the global store; linked into each
repository that was given them. Reading, linking, mounting and the commit
of verified bytes."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from storage import layout
from storage.catalog import Catalog
from storage.driver import (FileWriter, PathNotFound, SizedStream, StorageDriver, delete_if_present,
                            file_exists)
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
    # seconds a blob seen linked is served to pulls without asking storage
    # (storage.pull_cache_seconds)
    pull_cache_seconds: int = 0


class SeenLinks:
    """Blobs this process saw linked into a repository, with their sizes,
    for `ttl` seconds: what a blob GET may trust without asking storage
    (StoreLimits.pull_cache_seconds). Only positive answers are kept, and an
    unlink here forgets at once; what another process deletes is seen when
    the entry runs out, or sooner, when the bytes turn out to be gone."""

    MAX_ENTRIES = 100_000          # ~20 MB of keys at most

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic):
        self._ttl = ttl
        self._clock = clock
        self._seen: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()

    def size(self, repo: str, digest: str) -> int | None:
        entry = self._seen.get((repo, digest))
        if entry is None:
            return None
        if self._clock() >= entry[1]:
            del self._seen[(repo, digest)]
            return None
        return entry[0]

    def add(self, repo: str, digest: str, size: int) -> None:
        if self._ttl <= 0:
            return
        key = (repo, digest)
        self._seen[key] = (size, self._clock() + self._ttl)
        self._seen.move_to_end(key)
        while len(self._seen) > self.MAX_ENTRIES:
            self._seen.popitem(last=False)

    def forget(self, repo: str, digest: str) -> None:
        self._seen.pop((repo, digest), None)


class Blobs:
    def __init__(self, driver: StorageDriver, limits: StoreLimits, catalog: Catalog):
        self.driver = driver
        self.limits = limits
        self.catalog = catalog
        self.seen = SeenLinks(limits.pull_cache_seconds)

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
            if layer is not None:        # a manifest's revision link is not kept: deletes drop it
                self.seen.add(repo, digest, data.size)
            return BlobInfo(digest, data.size)
        raise self._unknown(repo, digest)

    async def stat_for_pull(self, repo: str, digest: str) -> BlobInfo:
        """`stat` for a blob GET: a blob seen linked in the last
        pull_cache_seconds is not asked for again (its bytes may still turn
        out gone when read or fetched: BlobUnknown, or the redirect's 404)."""
        validate_name(repo)
        self.check_digest(digest)
        size = self.seen.size(repo, digest)
        return BlobInfo(digest, size) if size is not None else await self.stat(repo, digest)

    async def open_linked(self, repo: str, digest: str, chunk_size: int = 1 << 20) -> SizedStream:
        """`stat` and the whole of `read` at once: the bytes' GET (which
        answers their size) in the same round trip as the layer link's
        check, for a backend where each is a request (S3: a pull of 100
        small layers waited for a HEAD, then a GET, on each). BlobUnknown
        as `stat` says; the stream is closed unread then."""
        validate_name(repo)
        self.check_digest(digest)
        if self.seen.size(repo, digest) is not None:
            try:
                return await self.driver.open_reader(layout.blob_data(digest), chunk_size)
            except PathNotFound:
                self.seen.forget(repo, digest)       # deleted by another process: ask again
        links, opened = await asyncio.gather(
            self.driver.stat_files([layout.layer_link(repo, digest)]),
            self.driver.open_reader(layout.blob_data(digest), chunk_size), return_exceptions=True)
        if isinstance(opened, PathNotFound):
            opened = None
        try:
            if isinstance(links, BaseException):
                raise links
            if isinstance(opened, BaseException):
                raise opened
            if opened is not None and (links[0] is not None or (await self.driver.stat_files(
                    [layout.manifest_revision_link(repo, digest)]))[0] is not None):
                stream, opened = opened, None
                if links[0] is not None:
                    self.seen.add(repo, digest, stream.size)
                return stream
            raise self._unknown(repo, digest)
        finally:
            if isinstance(opened, SizedStream):
                await opened.aclose()

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
        self.seen.forget(repo, digest)
        if not await delete_if_present(self.driver, layout.layer_link_dir(repo, digest)):
            raise self._unknown(repo, digest)

    async def link(self, repo: str, digest: str, size: int | None = None) -> None:
        """Link the blob into repo; with its size, pulls of it from this
        process may skip asking storage for a while (SeenLinks)."""
        await self.driver.put_content(layout.layer_link(repo, digest), digest.encode())
        await self.catalog.register(repo)
        if size is not None:
            self.seen.add(repo, digest, size)

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
        await self.link(repo, digest, info.size)
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
