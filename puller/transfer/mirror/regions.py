"""Blobs downloaded straight into their place in a bundle being written.

A plain bundle (one file, not compressed) knows where each blob's bytes go
before a byte is fetched: the tar's headers have fixed sizes, so the writer
reserves each blob's region (puller.transfer.mirror.bundle.BundleWriter.reserve)
and the download writes into it. No staging copy, no second write of every
byte. What stands in for the local store of puller.transfer.pull.BlobFetcher
(which keeps its verification, retries and resume-by-Range):

    regions = BundleRegions(fd, {digest: offset})
    fetcher = BlobFetcher(client, regions, progress)      fetch() as ever; nothing is committed

The file is the writer's hidden `.partial`, flushed and renamed by its
commit(): a blob that fails its digest aborts the bundle, so none is visible.
"""

from __future__ import annotations

import os
import pathlib

from storage.oci.digests import hasher_for

_NOWHERE = pathlib.Path("/nonexistent/dockyard-bundle-region")


class RegionFile:
    """The `size` bytes at `base` in fd, written in order from where the download is."""

    def __init__(self, fd: int, base: int, digest: str):
        self.fd, self.base, self.digest = fd, base, digest
        self.path = _NOWHERE
        self.position = 0

    def size(self) -> int:
        return self.position

    def resume_hasher(self, length: int, chunk: int):
        hasher = hasher_for(self.digest)
        done = 0
        while done < length:
            data = os.pread(self.fd, min(chunk, length - done), self.base + done)
            if not data:
                break
            hasher.update(data)
            done += len(data)
        return hasher

    def fresh_hasher(self):
        return hasher_for(self.digest)

    def seek(self, offset: int) -> None:
        self.position = offset

    def truncate(self) -> None:
        self.position = 0

    def append(self, hasher, parts: list) -> None:
        views = [memoryview(p) for p in parts]
        done = os.pwritev(self.fd, views, self.base + self.position)     # one call for ~1 MiB of pieces
        for view in views:
            hasher.update(view)
            if done >= len(view):
                done -= len(view)
            else:                               # a short write (a full disk, a signal): the rest by hand
                rest = view[done:]
                while rest:
                    rest = rest[os.pwrite(self.fd, rest, self.base + self.position + len(view) - len(rest)):]
                done = 0
            self.position += len(view)

    # the bundle is flushed once, whole, when it is committed
    def flush(self) -> None: ...
    def write_back(self) -> None: ...
    def sync(self) -> None: ...
    def unlink(self) -> None: ...
    def release(self, drop: bool = False, drop_if_empty: bool = False) -> None: ...


class BundleRegions:
    """The three calls BlobFetcher makes of a store, answered by the regions of a bundle."""

    def __init__(self, fd: int, offsets: dict[str, int]):
        self.fd = fd
        self.offsets = offsets

    def blob_path(self, digest: str) -> pathlib.Path:
        return _NOWHERE                       # never already there

    def open_ingest(self, digest: str) -> RegionFile:
        return RegionFile(self.fd, self.offsets[digest], digest)

    def commit_blob(self, staged: pathlib.Path, digest: str) -> pathlib.Path:
        return staged                         # verified in place: nothing to move


__all__ = ["BundleRegions", "RegionFile"]
