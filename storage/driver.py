"""The storage driver contract.

A driver stores opaque byte strings under slash-separated paths ("/a/b/c").
It knows nothing about blobs, manifests or repositories: `storage.layout`
builds every path and `storage.store.ContentStore` gives them meaning.

The contract is deliberately small and fits an object store: no rename
tricks are required of a driver (a filesystem driver may use rename
internally to make `put_content` atomic; an S3 driver uses a single PUT or a
multipart upload), and a driver may hand out a direct download URL.

Every driver passes the one shared suite in tests/storage/test_driver_contract.py;
a new driver registers a factory and a cleanup in tests/support/drivers.py,
nothing else.

Paths are checked by the contract, not by each backend: every operation
calls `check_path` (below) on each path it is given before touching storage,
so "/a/../b" or a name a driver keeps for its hidden state is InvalidPath
on every driver alike.

Errors raised by a backend (OSError, botocore errors) are translated at the
driver edge into the typed errors below with `raise ... from`.
"""

from __future__ import annotations

import abc
import asyncio
import os
import re
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Sequence


class StorageError(Exception):
    """Base of every error a driver raises."""


class PathNotFound(StorageError):
    def __init__(self, path: str):
        super().__init__(f"path not found: {path}")
        self.path = path


class InvalidPath(StorageError):
    def __init__(self, path: str, why: str = "invalid path"):
        super().__init__(f"{why}: {path!r}")
        self.path = path


class InvalidOffset(StorageError):
    def __init__(self, path: str, offset: int):
        super().__init__(f"invalid offset {offset} for {path}")
        self.path = path
        self.offset = offset


# Path components starting with this are the drivers' own (temporary files,
# staging directories): never listed, never valid in a caller's path.
HIDDEN_PREFIX = ".dockyard-tmp-"
MAX_PATH = 4096

# An empty, "." or ".." component, a hidden component, or a trailing "/".
_BAD_COMPONENT = re.compile(r"//|/\.\.?(?:/|$)|/" + re.escape(HIDDEN_PREFIX) + r"|/$")


def check_path(path: str) -> None:
    """InvalidPath unless path is "/" or "/c1/c2/..." with ordinary
    components: no "", ".", "..", NUL, or hidden component, at most
    MAX_PATH characters."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidPath(str(path), "path must be absolute")
    if path == "/":
        return
    if len(path) > MAX_PATH or "\x00" in path:
        raise InvalidPath(path)
    if _BAD_COMPONENT.search(path):
        raise InvalidPath(path, "invalid path component")


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    mtime: float
    is_dir: bool


class FileWriter(abc.ABC):
    """An appending writer. Bytes written become visible under the path only
    once `commit()` returns (object stores) or are at least flushed and
    fsynced by then (filesystem). `close()` keeps what was written so a later
    `writer(path, append=True)` can continue it; `cancel()` discards it."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Total bytes in the file, including those from earlier sessions."""

    @abc.abstractmethod
    async def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def commit(self) -> None: ...

    @abc.abstractmethod
    async def cancel(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


class LocalFile:
    """A read-only descriptor of stored content and its size; close() it."""

    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size

    def detach(self) -> int:
        """The descriptor, now the caller's to close."""
        fd, self.fd = self.fd, -1
        return fd

    def close(self) -> None:
        fd = self.detach()
        if fd >= 0:
            os.close(fd)


class SizedStream:
    """The whole content of a file as it is read: its size, known before
    the first byte, and its chunks (`async for`). Iterate it to the end or
    `aclose()` it: an unread stream holds a connection."""

    def __init__(self, size: int, chunks: AsyncIterator[bytes], release: Callable[[], None] | None = None):
        self.size = size
        self._chunks = chunks
        # what an opened but never iterated stream holds (a generator's own
        # cleanup does not run when it never started)
        self._release = release

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks

    async def aclose(self) -> None:
        await self._chunks.aclose()
        if self._release is not None:
            self._release()


class StorageLock(abc.ABC):
    """An exclusive lock on one name in storage, held until `release()`."""

    @abc.abstractmethod
    async def release(self) -> None: ...

    async def __aenter__(self) -> "StorageLock":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.release()


class StorageDriver(abc.ABC):
    name: str = "abstract"
    # Whether open_local can ever give a local file: callers skip asking
    # (an object store would answer each ask with a HEAD and then None).
    local_files: bool = False

    # Every operation of every driver passes each path it is given through
    # this first (see the module docstring).
    check_path = staticmethod(check_path)

    @abc.abstractmethod
    async def get_content(self, path: str) -> bytes:
        """The whole content at path; PathNotFound if absent."""

    @abc.abstractmethod
    async def put_content(self, path: str, data: bytes, *, durable: bool = True) -> None:
        """Write the whole content atomically: readers see the old content or
        the new, never a partial file, and `list` never shows a directory of
        its path before the file is in it (as on an object store, where
        directories are only prefixes). durable=False marks scratch state
        (upload sessions) that need not survive a power failure: a driver
        may then skip flushing it to stable storage."""

    @abc.abstractmethod
    def reader(self, path: str, offset: int = 0, length: int | None = None,
               chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """Stream the content from offset (up to length bytes). Raises
        PathNotFound / InvalidOffset on first iteration at the latest."""

    async def open_reader(self, path: str, chunk_size: int = 1 << 20) -> SizedStream:
        """The whole content of path with its size (PathNotFound if absent),
        from one round trip where the backend answers both at once (S3: the
        GET's Content-Length); the default stats, then reads."""
        info = await self.stat(path)
        if info.is_dir:
            raise PathNotFound(path)
        return SizedStream(info.size, self.reader(path, chunk_size=chunk_size))

    @abc.abstractmethod
    async def writer(self, path: str, append: bool = False) -> FileWriter:
        """An appending writer; with append=True continue an existing file."""

    async def atomic_writer(self, path: str) -> FileWriter | None:
        """A writer of new content for path that shows nothing of it until
        `commit()`, which replaces what path held at once (a reader sees
        the old content or all the new); `cancel()` and `close()` discard
        what was written and leave path as it was. For bytes checked while
        they stream (a blob hashed on its way in) that nobody may see before
        the check passed. None where the backend has nothing cheaper than
        `writer` on a path of one's own and `move` (a filesystem's rename
        is that already): callers stage and move then."""
        return None

    @abc.abstractmethod
    async def try_lock(self, path: str, *, caller_checks_dir: bool = False) -> StorageLock | None:
        """Take the exclusive lock named by path, or None at once when another
        holder has it. The lock holds across every process and host sharing
        this storage (it is what serialises requests on one upload session),
        and a holder that dies loses it. It never creates directories:
        PathNotFound when path's directory does not exist, or stops existing
        while the lock is taken (the session finished meanwhile). A driver
        may keep a file at path; it goes when its directory is deleted.

        caller_checks_dir: the caller reads a file of the directory under the
        lock anyway (an upload session its data's size) and releases the lock
        when it is gone, so a driver whose directory check is a round trip of
        its own (S3: a listing) may skip it and return a lock in a directory
        deleted meanwhile."""

    async def get_many(self, paths: Sequence[str]) -> list[bytes | None]:
        """get_content of each path, None for an absent one. Drivers with a
        cheaper batch override this."""
        async def one(path: str) -> bytes | None:
            try:
                return await self.get_content(path)
            except PathNotFound:
                return None

        return list(await asyncio.gather(*(one(p) for p in paths)))

    @abc.abstractmethod
    async def stat(self, path: str) -> FileInfo:
        """PathNotFound if absent. Directories (prefixes) have is_dir=True."""

    async def stat_many(self, paths: Sequence[str]) -> list[FileInfo | None]:
        """stat of each path, None for an absent one. Drivers with a cheaper
        batch (one thread hop, one request) override this."""
        async def one(path: str) -> FileInfo | None:
            try:
                return await self.stat(path)
            except PathNotFound:
                return None

        return list(await asyncio.gather(*(one(p) for p in paths)))

    async def stat_files(self, paths: Sequence[str]) -> list[FileInfo | None]:
        """stat of each path that is a file; None for an absent path or a
        directory. For callers that ask only about files (links, blob data):
        an object store answers it with one HEAD a path, where stat_many
        also lists a prefix to tell a directory from nothing."""
        return [None if info is None or info.is_dir else info for info in await self.stat_many(paths)]

    @abc.abstractmethod
    async def list(self, path: str) -> list[str]:
        """Full paths of the direct children of a directory, sorted;
        PathNotFound if the directory does not exist."""

    @abc.abstractmethod
    async def move(self, src: str, dst: str) -> None:
        """Move src to dst, replacing dst. Atomic where the backend allows."""

    @abc.abstractmethod
    async def delete(self, path: str) -> None:
        """Delete a file or a whole directory tree; PathNotFound if absent.
        A directory the delete leaves empty may be gone afterwards (an object
        store keeps no empty prefix): callers read a missing directory as an
        empty one."""

    async def url_for(self, path: str, method: str = "GET",
                      expires_in: int = 1200) -> str | None:
        """A URL a client may fetch the content from directly, or None when
        the backend has no such thing (the registry then streams it)."""
        return None

    async def open_local(self, path: str) -> "LocalFile | None":
        """The content open as a local file (read-only) that the caller may
        send or hash straight from, then close; None on backends without
        local files (the caller streams `reader` instead). PathNotFound if absent."""
        return None

    async def reclaim_leftovers(self, older_than: float) -> int:
        """Remove what interrupted writes left hidden (temporary files and
        staging directories) older than `older_than` (epoch seconds); how many.
        Backends whose writes leave nothing behind keep this default."""
        return 0

    async def close(self) -> None:
        """Release connections and thread pools."""


# ---- small helpers every user of the contract needs ---------------------------

async def exists(driver: StorageDriver, path: str) -> bool:
    try:
        await driver.stat(path)
        return True
    except PathNotFound:
        return False


async def file_exists(driver: StorageDriver, path: str) -> bool:
    """Whether path is a file (one HEAD on an object store, no listing)."""
    return (await driver.stat_files([path]))[0] is not None


async def delete_if_present(driver: StorageDriver, path: str) -> bool:
    """Delete path; False when it was not there."""
    try:
        await driver.delete(path)
        return True
    except PathNotFound:
        return False
