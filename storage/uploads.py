"""Upload sessions (distribution spec, "Pushing blobs"): started, appended
to in chunks or a stream, finished by a PUT that verifies and commits, or
cancelled. They live in storage, not in a process, so any worker (or
replica) may continue one; one request at a time changes a session, under
its lock in storage."""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import hashlib
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, AsyncIterator

from storage import layout
from storage.blobs import BlobInfo, Blobs
from storage.driver import PathNotFound, StorageDriver, StorageError, delete_if_present
from storage.oci.errors import (BlobUploadInvalid, BlobUploadUnknown, DigestInvalid, RangeInvalid,
                                SizeInvalid)
from storage.oci.names import validate_name

_WRITE_BATCH = 1 << 20          # bytes gathered from the network before one write
_HASH_ON_LOOP_LIMIT = 64 << 10  # hash smaller buffers inline, larger in a thread
_DIGEST_RECORD_MIN = 1 << 20   # smaller uploads are cheaper to re-hash than to record
_MAX_HASHERS = 1024             # in-process running hashes kept (an optimisation)
_SESSION_LOCK_WAIT = 1.0        # seconds a request waits for a busy upload session


@dataclass(frozen=True)
class UploadStatus:
    repo: str
    upload_id: str
    offset: int            # bytes received so far; next chunk must start here


@dataclass
class _RunningHash:
    """sha256 of an upload's first `offset` bytes, as this process wrote them."""
    hasher: Any
    offset: int


async def hash_update(hasher: Any, data: bytes) -> None:
    if len(data) <= _HASH_ON_LOOP_LIMIT:
        hasher.update(data)
    else:
        await asyncio.to_thread(hasher.update, data)


def _hash_open_file(fd: int, alg: str) -> str:
    h = hashlib.new(alg)
    offset = 0
    while chunk := os.pread(fd, 4 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return f"{alg}:{h.hexdigest()}"


class Uploads:
    def __init__(self, driver: StorageDriver, blobs: Blobs):
        self.driver = driver
        self.blobs = blobs
        self._hashers: OrderedDict[tuple[str, str], _RunningHash] = OrderedDict()

    async def start(self, repo: str) -> UploadStatus:
        """A new upload session, kept in storage (any worker may continue it)."""
        validate_name(repo)
        upload_id = str(uuid.uuid4())
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        # Session state is scratch: a session lost to a power failure is just
        # unknown to the client, which starts over.
        await asyncio.gather(
            self.driver.put_content(layout.upload_started_at(repo, upload_id), started.encode(),
                                    durable=False),
            self.driver.put_content(layout.upload_data(repo, upload_id), b"", durable=False))
        self._hashers[(repo, upload_id)] = _RunningHash(hashlib.sha256(), 0)
        self._trim_hashers()
        return UploadStatus(repo, upload_id, 0)

    async def status(self, repo: str, upload_id: str) -> UploadStatus:
        """BlobUploadUnknown for an unknown, finished or cancelled session."""
        return UploadStatus(repo, upload_id, await self._upload_size(repo, upload_id))

    async def started_at(self, repo: str, upload_id: str) -> float:
        """When the session started (seconds since the epoch)."""
        try:
            raw = await self.driver.get_content(layout.upload_started_at(repo, upload_id))
        except PathNotFound as exc:
            raise BlobUploadUnknown(f"upload unknown: {upload_id}", {"uuid": upload_id}) from exc
        return float(calendar.timegm(time.strptime(raw.decode().strip(), "%Y-%m-%dT%H:%M:%SZ")))

    async def _upload_size(self, repo: str, upload_id: str) -> int:
        validate_name(repo)
        try:
            return (await self.driver.stat(layout.upload_data(repo, upload_id))).size
        except PathNotFound as exc:
            raise BlobUploadUnknown(f"upload unknown: {upload_id}", {"uuid": upload_id}) from exc

    def _trim_hashers(self) -> None:
        while len(self._hashers) > _MAX_HASHERS:
            self._hashers.popitem(last=False)

    def _take_hasher(self, key: tuple[str, str], offset: int) -> _RunningHash | None:
        """The running hash for an upload if it covers exactly the stored
        bytes; otherwise forget it (another process appended, or a write
        failed half way) and let finish re-hash from storage."""
        running = self._hashers.pop(key, None)
        if running is not None and running.offset == offset:
            return running
        return None

    @contextlib.asynccontextmanager
    async def _session_locked(self, repo: str, upload_id: str) -> AsyncIterator[None]:
        """Hold the session's lock: one request at a time changes a session,
        whichever process or host it reached. A request that finds the
        session busy waits a moment (a client's retry may overlap the end of
        its first try) and then loses: BlobUploadInvalid. A session that is
        gone, or goes while we wait, is BlobUploadUnknown."""
        validate_name(repo)
        path = layout.upload_lock(repo, upload_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _SESSION_LOCK_WAIT
        pause = 0.005
        while True:
            try:
                # every holder reads the session's data size first (_upload_size):
                # that is the check that the session still exists
                lock = await self.driver.try_lock(path, caller_checks_dir=True)
            except PathNotFound as exc:
                raise BlobUploadUnknown(f"upload unknown: {upload_id}", {"uuid": upload_id}) from exc
            if lock is not None:
                break
            if loop.time() >= deadline:
                raise BlobUploadInvalid("another request is changing this upload session",
                                        {"uuid": upload_id})
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)
        try:
            yield
        finally:
            await lock.release()

    async def append(self, repo: str, upload_id: str,
                            chunks: AsyncIterator[bytes],
                            start: int | None = None) -> UploadStatus:
        """Append a chunk. With start (from Content-Range), RangeInvalid
        unless start == current offset. Nothing of a chunk that fails half
        way is lost or duplicated for the next try: the offset reported after
        an error is one a client can resume from. Holds the session's lock
        for the whole body (BlobUploadInvalid when another request has it)."""
        async with self._session_locked(repo, upload_id):
            return await self._append(repo, upload_id, chunks, start)

    async def _append(self, repo: str, upload_id: str, chunks: AsyncIterator[bytes],
                      start: int | None) -> UploadStatus:
        """append_upload for a caller that holds the session's lock."""
        size = await self._upload_size(repo, upload_id)
        if start is not None and start != size:
            raise RangeInvalid(f"chunk starts at {start}, upload is at {size}", size)
        key = (repo, upload_id)
        path = layout.upload_data(repo, upload_id)
        writer = await self.driver.writer(path, append=True)
        running = self._take_hasher(key, writer.size)
        if running is None and writer.size == 0:
            # Started by another worker, nothing written yet: hash from here.
            running = _RunningHash(hashlib.sha256(), 0)
        done = False
        try:
            await self._write_body(writer, chunks, running.hasher if running is not None else None)
            if running is not None and writer.size >= _DIGEST_RECORD_MIN:
                # Another worker may finish this upload: leave it the digest.
                record = f"{writer.size} sha256:{running.hasher.copy().hexdigest()}".encode()
                await asyncio.gather(writer.commit(), self.driver.put_content(
                    layout.upload_digest_record(repo, upload_id), record, durable=False))
            else:
                await writer.commit()
            done = True
        finally:
            if not done:
                # What reached the file stays (the status reports it); the
                # running hash may not match it any more, so it is dropped.
                try:
                    await writer.close()
                except Exception:
                    pass
        if running is not None:
            running.offset = writer.size
            self._hashers[key] = running
            self._trim_hashers()
        return UploadStatus(repo, upload_id, writer.size)

    @staticmethod
    async def _write_body(writer, chunks: AsyncIterator[bytes], hasher: Any | None) -> None:
        """Write a request body in batches, hashing it on the way (hasher: None for not)."""
        async def one(data: bytes) -> None:
            if hasher is None:
                await writer.write(data)
            else:
                # Both release the GIL: write and hash in parallel threads.
                await asyncio.gather(writer.write(data), hash_update(hasher, data))

        batch = bytearray()
        async for chunk in chunks:
            batch += chunk
            if len(batch) >= _WRITE_BATCH:
                await one(bytes(batch))
                batch.clear()
        if batch:
            await one(bytes(batch))

    async def _commit_direct(self, repo: str, digest: str, chunks: AsyncIterator[bytes],
                             size: int | None) -> BlobInfo | None:
        """A whole blob whose digest is known before its first byte (POST
        ?digest= with the body, or a PUT with the whole body), streamed
        straight to its place (Blobs.direct_writer) and hashed on the way:
        committed only once it hashed to its name and has the size asked,
        so nothing is staged and moved, and the place never shows other
        bytes. None when the driver has no such writer (nothing read yet)."""
        writer = await self.blobs.direct_writer(digest)
        if writer is None:
            return None
        alg, _ = self.blobs.check_digest(digest)
        hasher = hashlib.new(alg)
        try:
            await self._write_body(writer, chunks, hasher)
            total = writer.size
            if size is not None and size != total:
                raise SizeInvalid(f"upload holds {total} bytes, expected {size}",
                                  {"expected": size, "actual": total})
            actual = f"{alg}:{hasher.hexdigest()}"
            if actual != digest:
                raise DigestInvalid("provided digest did not match uploaded content",
                                    {"expected": digest, "actual": actual})
            await writer.commit()
        except BaseException:
            # An abort the backend cannot take now (it is down) leaves an
            # upload nothing names: the purge's reclaim_leftovers aborts it.
            with contextlib.suppress(StorageError):
                await writer.cancel()
            raise
        await self.blobs.link(repo, digest, total)
        return BlobInfo(digest, total)

    async def _digest_of_upload(self, repo: str, upload_id: str, alg: str,
                                size: int) -> str:
        running = self._take_hasher((repo, upload_id), size)
        if running is not None and alg == "sha256":
            return f"sha256:{running.hasher.hexdigest()}"
        if alg == "sha256" and size >= _DIGEST_RECORD_MIN:
            recorded = await self._recorded_digest(repo, upload_id, size)
            if recorded is not None:
                return recorded
        path = layout.upload_data(repo, upload_id)
        try:
            local = await self.driver.open_local(path)
        except PathNotFound as exc:
            raise BlobUploadUnknown(f"upload unknown: {upload_id}", {"uuid": upload_id}) from exc
        if local is not None:
            try:
                return await asyncio.to_thread(_hash_open_file, local.fd, alg)
            finally:
                local.close()
        hasher = hashlib.new(alg)
        try:
            async for chunk in self.driver.reader(path, chunk_size=4 << 20):
                await hash_update(hasher, chunk)
        except PathNotFound as exc:
            raise BlobUploadUnknown(f"upload unknown: {upload_id}", {"uuid": upload_id}) from exc
        return f"{alg}:{hasher.hexdigest()}"

    async def _recorded_digest(self, repo: str, upload_id: str, size: int) -> str | None:
        """The digest another process recorded for exactly `size` bytes of
        this upload, if any. The record is written once its bytes are, and
        an upload only grows, so a record for the current size is current."""
        try:
            raw = await self.driver.get_content(layout.upload_digest_record(repo, upload_id))
            recorded_size, digest = raw.decode().split()
            if int(recorded_size) == size:
                self.blobs.check_digest(digest)
                return digest
        except (PathNotFound, ValueError, UnicodeDecodeError, DigestInvalid):
            pass
        return None

    async def finish(self, repo: str, upload_id: str, digest: str,
                            chunks: AsyncIterator[bytes] | None = None,
                            start: int | None = None, *,
                            size: int | None = None) -> BlobInfo:
        """Append the final chunk (optional), verify the digest (DigestInvalid
        and nothing committed on mismatch, the session stays open), move the
        bytes into the global blob store, link into repo, and delete the
        session, all under the session's lock, so the bytes committed are
        exactly the bytes hashed and no other request can still write them.
        With size, SizeInvalid unless the upload holds exactly that many bytes."""
        self.blobs.check_digest(digest)
        async with self._session_locked(repo, upload_id):
            return await self._finish(repo, upload_id, digest, chunks, start, size)

    async def _finish(self, repo: str, upload_id: str, digest: str,
                      chunks: AsyncIterator[bytes] | None, start: int | None,
                      size: int | None) -> BlobInfo:
        """finish_upload for a caller that holds the session's lock (or owns
        a session nobody else knows of)."""
        alg, _ = self.blobs.check_digest(digest)
        if chunks is not None and not start and await self._upload_size(repo, upload_id) == 0:
            # The whole blob in this request: straight to its place where the driver can.
            info = await self._commit_direct(repo, digest, chunks, size)
            if info is not None:
                self._hashers.pop((repo, upload_id), None)
                await delete_if_present(self.driver, layout.upload_dir(repo, upload_id))
                return info
        if chunks is not None:
            total = (await self._append(repo, upload_id, chunks, start)).offset
        else:
            total = await self._upload_size(repo, upload_id)
            if start is not None and start != total:
                raise RangeInvalid(f"chunk starts at {start}, upload is at {total}", total)
        if size is not None and size != total:
            raise SizeInvalid(f"upload holds {total} bytes, expected {size}",
                              {"expected": size, "actual": total})
        actual = await self._digest_of_upload(repo, upload_id, alg, total)
        if actual != digest:
            raise DigestInvalid("provided digest did not match uploaded content",
                                {"expected": digest, "actual": actual})
        await self.blobs.commit(layout.upload_data(repo, upload_id), digest)
        # The bytes are in place: link them and drop the session together.
        await asyncio.gather(self.blobs.link(repo, digest, total),
                             delete_if_present(self.driver, layout.upload_dir(repo, upload_id)))
        self._hashers.pop((repo, upload_id), None)
        return BlobInfo(digest, total)

    async def cancel(self, repo: str, upload_id: str) -> None:
        async with self._session_locked(repo, upload_id):
            self._hashers.pop((repo, upload_id), None)
            if not await delete_if_present(self.driver, layout.upload_dir(repo, upload_id)):
                raise BlobUploadUnknown(f"upload unknown: {upload_id}", {"uuid": upload_id})

    async def put(self, repo: str, digest: str,
                       chunks: AsyncIterator[bytes], *,
                       size: int | None = None) -> BlobInfo:
        """Monolithic upload in one call (POST ?digest= with a body): straight
        to the blob's place where the driver can (`_commit_direct`), else
        staged like any upload, and the session removed whatever happens.
        Its id is never handed out, so no other request can touch it: no
        lock needed."""
        self.blobs.check_digest(digest)
        validate_name(repo)
        info = await self._commit_direct(repo, digest, chunks, size)
        if info is not None:
            return info
        status = await self.start(repo)
        try:
            return await self._finish(repo, status.upload_id, digest, chunks, None, size)
        except BaseException:
            self._hashers.pop((repo, status.upload_id), None)
            await delete_if_present(self.driver, layout.upload_dir(repo, status.upload_id))
            raise

    async def purge(self, repo: str, older_than: float) -> list[str]:
        """Delete sessions of repo started before `older_than` (epoch
        seconds); the ids removed. For garbage collection."""
        try:
            entries = await self.driver.list(layout.uploads_dir(repo))
        except PathNotFound:
            return []
        purged = []
        for entry in entries:
            upload_id = entry.rsplit("/", 1)[-1]
            try:
                started = await self.started_at(repo, upload_id)
            except (BlobUploadUnknown, ValueError):
                started = 0.0  # no or unreadable start time: a crashed start
            if started >= older_than:
                continue
            try:
                lock = await self.driver.try_lock(layout.upload_lock(repo, upload_id))
            except PathNotFound:
                continue                # finished or cancelled meanwhile
            if lock is None:
                continue                # a request is writing it right now: not abandoned
            async with lock:
                if await delete_if_present(self.driver, entry):
                    purged.append(upload_id)
        return purged
