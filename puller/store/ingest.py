"""The ingest protocol of the local store: how bytes become a blob.

Nothing partial ever has a final name. Every blob is written under
STORE/ingest/ first and renamed into blobs/ only once verified:

    STORE/ingest/<alg>-<hex>.partial              a download of one digest; kept between
                                                  runs so the next pull resumes with Range
    STORE/ingest/<alg>-<hex>.partial.<pid>.<id>   a private file, when another process
                                                  holds the shared one
    STORE/ingest/.tmp-*, STORE/.tmp-*             small atomic writes (manifests, configs,
                                                  index.json), staged then renamed

    IngestFile(root, digest)     opened and locked (flock) for as long as it is written:
                                 two pulls never write one file, and reclaim() skips it
        .resume_hasher(chunk)    the running hash of what is already staged
        .append(hasher, parts)   write and hash (hashlib drops the GIL on big buffers)
        .release(drop=..., drop_if_empty=...)
    commit(root, path, digest)   the verified file renamed to its blob path
    write_atomic(path, data)     flushed, then renamed into place
    reclaim(root, now)           what crashed or abandoned pulls left: temp and
                                 private files after an hour, resumable partials
                                 after a week; a locked file is never touched

All of it is blocking file I/O: callers on an event loop run it in a thread.
OSError is the caller's to map (LocalStore maps it to StoreError).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import tempfile
import time
import uuid

from storage.oci.digests import hasher_for
from storage.oci.names import parse_digest

TEMP_PREFIX = ".tmp-"
# when leftovers count as abandoned (see reclaim)
STALE_TEMP_SECONDS = 3600
STALE_PARTIAL_SECONDS = 7 * 86400


def ingest_dir(root: pathlib.Path) -> pathlib.Path:
    return root / "ingest"


def blob_path(root: pathlib.Path, digest: str) -> pathlib.Path:
    """Where the blob of `digest` lives (DigestInvalid for anything but a digest)."""
    algorithm, hex_ = parse_digest(digest)
    return root / "blobs" / algorithm / hex_


def partial_path(root: pathlib.Path, digest: str) -> pathlib.Path:
    """Where a download of `digest` is staged (kept between runs to resume)."""
    algorithm, hex_ = parse_digest(digest)
    return ingest_dir(root) / f"{algorithm}-{hex_}.partial"


def _write_and_hash(handle, hasher, parts: list[bytes]) -> None:
    handle.writelines(parts)
    for data in parts:
        hasher.update(data)  # hashlib releases the GIL for buffers over 2 KiB


class IngestFile:
    """The staged file of one digest, locked so two pulls never write it at once."""

    def __init__(self, root: pathlib.Path, digest: str, durable: bool = True):
        self.digest = digest
        self.durable = durable          # False: a scratch store thrown away after use, never flushed
        self.path = partial_path(root, digest)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            self.handle = open(self.path, "ab+")
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # someone else is fetching the same blob: use a private file
                self.handle.close()
                self.path = self.path.with_name(f"{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
                self.handle = open(self.path, "ab+")
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)   # in use: reclaim skips it
                return
            if self._still_named() or attempt == 2:
                return
            # reclaimed (unlinked) between our open and our lock: the file made
            # anew is fresh, so the next round holds
            self.handle.close()

    def _still_named(self) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(self.handle.fileno()).st_ino
        except FileNotFoundError:
            return False

    def size(self) -> int:
        self.handle.flush()
        return os.fstat(self.handle.fileno()).st_size

    def resume_hasher(self, length: int, chunk: int):
        """A hasher of the digest's algorithm over the first `length` staged bytes."""
        hasher = hasher_for(self.digest)
        self.handle.seek(0)
        remaining = length
        while remaining > 0:
            data = self.handle.read(min(chunk, remaining))
            if not data:
                break
            hasher.update(data)
            remaining -= len(data)
        return hasher

    def fresh_hasher(self):
        return hasher_for(self.digest)

    def append(self, hasher, parts: list[bytes]) -> None:
        # looked up at call time, so a test can watch what reaches the file
        _write_and_hash(self.handle, hasher, parts)

    def seek(self, offset: int) -> None:
        self.handle.seek(offset)

    def truncate(self) -> None:
        self.handle.truncate(0)

    def flush(self) -> None:
        self.handle.flush()

    def write_back(self) -> None:
        """Start writing what is there to disk (a download keeps going meanwhile)."""
        if self.durable:
            os.fdatasync(self.handle.fileno())

    def sync(self) -> None:
        self.handle.flush()
        if self.durable:
            os.fdatasync(self.handle.fileno())

    def unlink(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.handle.close()

    def release(self, drop: bool = False, drop_if_empty: bool = False) -> None:
        """Close, removing the file first when asked (or when empty and asked)."""
        with contextlib.suppress(OSError, ValueError):
            if drop or (drop_if_empty and os.fstat(self.handle.fileno()).st_size == 0):
                self.path.unlink()
        self.close()


def temp_path(root: pathlib.Path) -> pathlib.Path:
    """A fresh private file in ingest/ to stage a blob whose digest is not
    known yet (reclaim drops it after an hour if it is never committed)."""
    folder = ingest_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX)
    os.close(fd)
    return pathlib.Path(name)


def commit(root: pathlib.Path, staged: pathlib.Path, digest: str) -> pathlib.Path:
    """Move a verified staged file to its final name (atomic rename)."""
    final = blob_path(root, digest)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(staged, 0o644)
    os.replace(staged, final)
    return final


def write_atomic(path: pathlib.Path, data: bytes, staging: pathlib.Path | None = None) -> None:
    """data at path, flushed first: staged next to the target (or in
    `staging`: for blobs, so nothing partial is ever under blobs/)."""
    fd, tmp = tempfile.mkstemp(dir=staging or path.parent, prefix=TEMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def reclaim(root: pathlib.Path, now: float | None = None) -> list[str]:
    """Remove what crashed or abandoned pulls left behind and return the
    names: temp files and private partials (`.partial.<pid>.<id>`) after
    an hour, resumable partials after a week. A file another process
    holds locked is being written and is never touched."""
    now = time.time() if now is None else now
    removed = []
    for folder in (ingest_dir(root), root):
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for entry in entries:
            name = entry.name
            if name.startswith(TEMP_PREFIX):
                limit = STALE_TEMP_SECONDS
            elif folder.name == "ingest" and ".partial" in name:
                limit = STALE_PARTIAL_SECONDS if name.endswith(".partial") else STALE_TEMP_SECONDS
            else:
                continue
            try:
                if not entry.is_file(follow_symlinks=False) or now - entry.stat().st_mtime < limit:
                    continue
                with open(entry.path, "rb") as handle:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.unlink(entry.path)
            except (BlockingIOError, FileNotFoundError):
                continue        # in use, or gone meanwhile
            removed.append(name)
    return removed
