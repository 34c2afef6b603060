"""Appending writes on S3: the part-size rule, the state of a file whose
bytes are still an open multipart upload ("pending"), the writer, the
completion of a pending file, and server-side copies.

A writer fills one part at a time for the request it serves (in memory up
to 64 MiB, in a temporary file beyond: parts grow to 5 GiB) and sends each
full part as it fills, two in flight. What is left when it commits, less
than a part, is the pending tail (a tail over 64 MiB goes up as a part of
its own instead); it is stored in the bucket together with the upload's
state, in the object at the file's own key, never in a process between
requests:

    body      b"dockyard-s3-pending/1\\n" {"upload_id": ..., "parts": [[n, etag, size], ...]} b"\\n"
              then the tail bytes
    metadata  dockyard-upload (the UploadId), dockyard-size (the file's size),
              dockyard-header (bytes before the tail)

so one conditional PUT commits the part list and the tail together, HEAD
(stat) answers the file's size, and any process can continue the file. The
first read or move of a pending file completes it (`complete_pending`):
the tail becomes the last part and CompleteMultipartUpload puts the whole
object at the key, atomically.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import weakref
from dataclasses import dataclass
from typing import Awaitable, Iterable

from storage.config import S3_MAX_PART
from storage.driver import FileWriter, PathNotFound, StorageError
from storage.s3.client import (META_HEADER, META_SIZE, META_UPLOAD, Conflict, ObjectInfo, S3Calls, UploadGone,
                               object_info, quoted)

log = logging.getLogger("dockyard.storage.s3")

MAX_PARTS = 10_000               # S3's limit on the parts of one upload
PARTS_PER_STEP = 1_000           # the part size doubles after every this many parts
MAX_OBJECT = 5 << 40             # S3's largest object (5 TiB)
COPY_PIECE = 1 << 30             # a server-side copy moves up to this much per UploadPartCopy
PARTS_IN_FLIGHT = 2              # part uploads of one writer running at once
MEMORY_PART_MAX = 64 << 20       # a part being filled beyond this is spooled to a temporary file
TAIL_IN_STATE_MAX = MEMORY_PART_MAX   # a tail beyond this goes up as a part of its own on commit
COPIES_IN_FLIGHT = 8             # UploadPartCopy requests of one copy running at once
STATE_MAGIC = b"dockyard-s3-pending/1\n"


def part_size_for(number: int, base: int) -> int:
    """The size of part `number` (1-based) of an upload whose parts start at
    `base` bytes: doubled after every 1,000 parts, capped at S3's 5 GiB, and
    the last thousand parts (9,001-10,000) are 5 GiB in any case. The last
    thousand alone hold 4.9 TiB and the nine thousand before at least 2.4
    TiB (base 5 MiB), so no object below S3's 5 TiB limit runs out of
    parts, whatever the base; with the default 16 MiB base, 1,000 parts
    hold 15.6 GiB, 2,000 parts 46.9 GiB."""
    if not 1 <= number <= MAX_PARTS:
        raise ValueError(f"S3 part numbers are 1..{MAX_PARTS}, got {number}")
    if number > MAX_PARTS - PARTS_PER_STEP:
        return S3_MAX_PART
    return min(S3_MAX_PART, base << ((number - 1) // PARTS_PER_STEP))


def max_object_size(base: int) -> int:
    """The bytes 10,000 parts hold under `part_size_for`."""
    return sum(part_size_for(n, base) for n in range(1, MAX_PARTS + 1, PARTS_PER_STEP)) * PARTS_PER_STEP


def copy_pieces(size: int, piece: int | None = None) -> list[tuple[int, int]]:
    """(start, length) ranges of about equal size, each at most `piece`
    bytes (COPY_PIECE): the UploadPartCopy requests that copy `size` bytes."""
    piece = piece or COPY_PIECE
    count = max(1, -(-size // piece))
    step, extra = divmod(size, count)
    out, start = [], 0
    for i in range(count):
        length = step + (1 if i < extra else 0)
        out.append((start, length))
        start += length
    return out


async def bounded_gather(coros: Iterable[Awaitable], limit: int) -> list:
    semaphore = asyncio.Semaphore(limit)

    async def one(coro):
        async with semaphore:
            return await coro

    return list(await asyncio.gather(*(one(c) for c in coros)))


@dataclass(frozen=True)
class Part:
    number: int
    etag: str
    size: int


@dataclass
class PendingState:
    upload_id: str
    parts: list[Part]
    tail: bytes

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts) + len(self.tail)

    def encode(self) -> tuple[bytes, dict[str, str]]:
        header = STATE_MAGIC + json.dumps(
            {"upload_id": self.upload_id, "parts": [[p.number, p.etag, p.size] for p in self.parts]},
            separators=(",", ":")).encode() + b"\n"
        return header + self.tail, {META_UPLOAD: self.upload_id, META_SIZE: str(self.size),
                                    META_HEADER: str(len(header))}

    @classmethod
    def decode(cls, body: bytes, info: ObjectInfo, path: str) -> "PendingState":
        try:
            length = int(info.metadata[META_HEADER])
            header = body[:length]
            if not header.startswith(STATE_MAGIC):
                raise ValueError("no state header")
            raw = json.loads(header[len(STATE_MAGIC):])
            parts = [Part(int(n), quoted(str(e)), int(s)) for n, e, s in raw["parts"]]
            state = cls(str(raw["upload_id"]), parts, body[length:])
        except (KeyError, ValueError, TypeError) as exc:
            raise StorageError(f"unreadable upload state of {path}: {exc}") from exc
        if state.upload_id != info.upload_id or state.size != info.size:
            raise StorageError(f"inconsistent upload state of {path}")
        return state


async def read_state(calls: S3Calls, path: str, key: str) -> tuple[PendingState, str] | None:
    """The pending state at key and its ETag; None when the file is a whole
    object (PathNotFound when there is none)."""
    response = await calls.call("get_object", path, Key=key)
    info = object_info(response)
    if not info.pending:
        response["Body"].close()
        return None
    body = await calls.run(response["Body"].read, op="get_object", path=path)
    return PendingState.decode(body, info, path), info.etag


async def complete_pending(calls: S3Calls, path: str, key: str) -> None:
    """Make a pending file a whole object: its tail becomes the last part and
    the upload is completed at the key (conditional on the state read, so a
    writer that appended meanwhile is not cut short). A no-op for a file
    that is whole already."""
    for _ in range(4):
        got = await read_state(calls, path, key)
        if got is None:
            return
        state, etag = got
        parts = list(state.parts)
        if state.tail or not parts:
            number = parts[-1].number + 1 if parts else 1
            response = await calls.call("upload_part", path, Key=key, UploadId=state.upload_id,
                                        PartNumber=number, Body=state.tail)
            parts.append(Part(number, quoted(response.get("ETag")), len(state.tail)))
        try:
            # Ceph may answer with an empty ETag: the answer is not needed.
            await calls.call("complete_multipart_upload", path, Key=key, UploadId=state.upload_id, IfMatch=etag,
                             MultipartUpload={"Parts": [{"PartNumber": p.number, "ETag": p.etag} for p in parts]})
            return
        except Conflict:
            continue                # a writer committed more meanwhile: complete that
        except (UploadGone, PathNotFound):
            info = await calls.head(path, key)
            if info is not None and not info.pending:
                return              # completed by another reader meanwhile
            raise PathNotFound(path) from None
    raise StorageError(f"{path} kept changing while it was being completed")


async def copy_object(calls: S3Calls, src: str, src_key: str, info: ObjectInfo, dst: str, dst_key: str) -> None:
    """Server-side copy of a whole object: CopyObject up to 5 GiB, above
    that a multipart upload of UploadPartCopy pieces. Conflict if the
    source changed meanwhile; PathNotFound(src) if it went."""
    source = {"Bucket": calls.bucket, "Key": src_key}
    if info.size <= S3_MAX_PART:
        await calls.call("copy_object", src, Key=dst_key, CopySource=source, CopySourceIfMatch=info.etag,
                         **calls.content_args(info.size))
        return
    upload_id = (await calls.call("create_multipart_upload", dst, Key=dst_key, **calls.content_args()))["UploadId"]
    try:
        pieces = copy_pieces(info.size)

        async def piece(number: int, start: int, length: int) -> dict:
            response = await calls.call("upload_part_copy", src, Key=dst_key, UploadId=upload_id,
                                        PartNumber=number, CopySource=source, CopySourceIfMatch=info.etag,
                                        CopySourceRange=f"bytes={start}-{start + length - 1}")
            return {"PartNumber": number, "ETag": quoted(response["CopyPartResult"]["ETag"])}

        parts = await bounded_gather((piece(i + 1, s, n) for i, (s, n) in enumerate(pieces)), COPIES_IN_FLIGHT)
        await calls.call("complete_multipart_upload", dst, Key=dst_key, UploadId=upload_id,
                         MultipartUpload={"Parts": parts})
    except BaseException:
        await asyncio.shield(calls.abort(dst, dst_key, upload_id))
        raise


def _write_all(file, data) -> None:
    view = memoryview(data)
    while view:
        view = view[file.write(view):]


class _PartBuffer:
    """The bytes of the part being filled: in memory up to MEMORY_PART_MAX,
    in a temporary file beyond (parts grow to 5 GiB: never in memory)."""

    def __init__(self, initial: bytes = b""):
        self._memory = bytearray(initial)
        self._file = None
        self.size = len(initial)

    async def append(self, data: memoryview, calls: S3Calls) -> None:
        if self._file is None and self.size + len(data) > MEMORY_PART_MAX:
            self._file = await calls.run(tempfile.TemporaryFile, buffering=0, prefix="dockyard-s3-part-",
                                         op="spool")
            await calls.run(_write_all, self._file, self._memory, op="spool")
            self._memory = bytearray()
        if self._file is None:
            self._memory += data
        else:
            await calls.run(_write_all, self._file, bytes(data), op="spool")
        self.size += len(data)

    async def read(self, calls: S3Calls) -> bytes:
        """The bytes (a tail: at most TAIL_IN_STATE_MAX)."""
        if self._file is None:
            return bytes(self._memory)
        self._file.seek(0)
        return await calls.run(self._file.read, op="spool")

    def body(self):
        """What a PUT sends: the bytes as they are (no copy of up to 64 MiB
        on the event loop), or the file rewound (unbuffered: nothing to flush)."""
        if self._file is None:
            return self._memory
        self._file.seek(0)
        return self._file

    def close(self) -> None:
        self._memory = bytearray()
        if self._file is not None:
            self._file.close()
            self._file = None


class S3Writer(FileWriter):
    """See the module docstring. Opened by `S3Writer.open`."""

    def __init__(self, calls: S3Calls, path: str, key: str, base: int, *, original: int = 0,
                 buffer: bytes = b"", state: PendingState | None = None, copy_source: ObjectInfo | None = None,
                 condition: dict[str, str] | None = None, stale_upload: str | None = None, dirty: bool = True):
        self._calls, self._path, self._key, self._base = calls, path, key, base
        self._upload_id = state.upload_id if state else None
        self._created = False                    # this writer started the upload
        self._parts: dict[int, Part] = {p.number: p for p in state.parts} if state else {}
        self._copy_pieces = copy_pieces(copy_source.size) if copy_source else []
        self._copy_source = copy_source
        self._next = max(self._parts, default=len(self._copy_pieces)) + 1
        self._first_new = self._next
        self._buf = _PartBuffer(buffer)
        self._original = original               # the file's size when opened
        self._size = original
        self._condition = condition or {}
        self._stale_upload = stale_upload
        self._dirty = dirty
        self._inflight: dict[int, asyncio.Future] = {}
        self._failed: BaseException | None = None
        self._failed_parts: set[int] = set()
        self._closed = False
        self._open_marker = calls.writing(path)
        # a writer dropped without commit, close or cancel stops counting as open
        weakref.finalize(self, calls.done_writing, path, self._open_marker)

    def _done(self) -> None:
        self._buf.close()
        self._calls.done_writing(self._path, self._open_marker)

    @classmethod
    async def open(cls, calls: S3Calls, path: str, append: bool, base: int) -> "S3Writer":
        key = calls.key(path)
        for _ in range(4):
            info = await calls.head(path, key)
            if not append:
                return cls(calls, path, key, base, stale_upload=info.upload_id if info else None)
            if info is None:
                return cls(calls, path, key, base, condition={"IfNoneMatch": "*"})
            try:
                if info.pending:
                    got = await read_state(calls, path, key)
                    if got is None:
                        continue            # completed meanwhile: look again
                    state, etag = got
                    return cls(calls, path, key, base, original=state.size, buffer=state.tail, state=state,
                               condition={"IfMatch": etag}, dirty=False)
                if info.size == 0:
                    return cls(calls, path, key, base, condition={"IfMatch": info.etag}, dirty=False)
                if info.size < min(part_size_for(1, base), MEMORY_PART_MAX):
                    response = await calls.call("get_object", path, Key=key, IfMatch=info.etag)
                    data = await calls.run(response["Body"].read, op="get_object", path=path)
                    return cls(calls, path, key, base, original=len(data), buffer=data,
                               condition={"IfMatch": info.etag}, dirty=False)
                # A whole object of a part or more: continued by copying it
                # into a new upload on the server, never through here.
                return cls(calls, path, key, base, original=info.size, copy_source=info,
                           condition={"IfMatch": info.etag}, dirty=False)
            except (Conflict, PathNotFound):
                continue                    # changed between the HEAD and the GET
        raise StorageError(f"{path} kept changing while a writer opened it")

    # ---- FileWriter --------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    async def write(self, data: bytes) -> None:
        self._require_open()
        self._raise_failed()
        if not data:
            return
        self._dirty = True
        view = memoryview(data)
        while view:
            if self._next > MAX_PARTS:
                raise StorageError(f"{self._path}: larger than S3's largest object (10,000 parts)")
            target = part_size_for(self._next, self._base)
            taken = view[:target - self._buf.size]
            await self._buf.append(taken, self._calls)
            self._size += len(taken)
            view = view[len(taken):]
            if self._buf.size >= target:
                await self._send_part()

    async def commit(self) -> None:
        self._require_open()
        self._closed = True
        try:
            await self._settle()
            if self._failed is not None:
                await self._abandon()
                raise self._failed
            try:
                await self._persist(None)
            except BaseException:
                await self._abandon()
                raise
        finally:
            self._done()

    async def close(self) -> None:
        """Keep what was written: after a failed part, the whole parts before
        it (unless that is less than the file held when opened: then the
        file stays as it was)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._close()
        finally:
            self._done()

    async def _close(self) -> None:
        await self._settle()
        parts: list[Part] | None = None
        if self._failed is not None:
            kept = [p for p in parts if p.number < self._first_new]
            number = self._first_new
            while number in self._parts and number not in self._failed_parts:
                kept.append(self._parts[number])
                number += 1
            parts = kept
            self._buf.close()
            self._buf = _PartBuffer()
            if sum(p.size for p in parts) < self._original or (not parts and not self._original):
                await self._abandon()
                return
        try:
            await self._persist(parts)
        except BaseException:
            await self._abandon()
            raise

    async def cancel(self) -> None:
        self._closed = True
        try:
            await self._settle()
            self._buf.close()
            for upload_id in {self._upload_id, self._stale_upload} - {None}:
                await self._calls.abort(self._path, self._key, upload_id)
            try:
                await self._calls.call("delete_object", self._path, Key=self._key)
            except PathNotFound:
                pass
        finally:
            self._done()

    # ---- internals ---------------------------------------------------------
    def _require_open(self) -> None:
        if self._closed:
            raise StorageError(f"writer for {self._path} is closed")

    def _raise_failed(self) -> None:
        self._reap()
        if self._failed is not None:
            raise self._failed

    def _reap(self) -> None:
        for number, task in list(self._inflight.items()):
            if not task.done():
                continue
            del self._inflight[number]
            exc = task.exception() if not task.cancelled() else asyncio.CancelledError()
            if exc is not None:
                self._failed_parts.add(number)
                if self._failed is None:
                    self._failed = exc if isinstance(exc, StorageError) else StorageError(
                        f"part {number} of {self._path} failed: {type(exc).__name__}")

    async def _settle(self) -> None:
        """Wait for the parts in flight (even when cancelled meanwhile)."""
        if self._inflight:
            await asyncio.wait(list(self._inflight.values()))
        self._reap()

    async def _ensure_upload(self) -> None:
        if self._upload_id is not None:
            return
        response = await self._calls.call("create_multipart_upload", self._path, Key=self._key,
                                          **self._calls.content_args())
        self._upload_id, self._created = response["UploadId"], True
        if self._copy_source is not None:
            source = {"Bucket": self._calls.bucket, "Key": self._key}

            async def piece(number: int, start: int, length: int) -> Part:
                r = await self._calls.call("upload_part_copy", self._path, Key=self._key, UploadId=self._upload_id,
                                           PartNumber=number, CopySource=source,
                                           CopySourceIfMatch=self._copy_source.etag,
                                           CopySourceRange=f"bytes={start}-{start + length - 1}")
                return Part(number, quoted(r["CopyPartResult"]["ETag"]), length)

            copied = await bounded_gather((piece(i + 1, s, n) for i, (s, n) in enumerate(self._copy_pieces)),
                                          COPIES_IN_FLIGHT)
            self._parts.update({p.number: p for p in copied})

    async def _send_part(self) -> None:
        await self._ensure_upload()
        number, buf = self._next, self._buf
        self._next += 1
        self._buf = _PartBuffer()
        while len(self._inflight) >= PARTS_IN_FLIGHT:
            await asyncio.wait(list(self._inflight.values()), return_when=asyncio.FIRST_COMPLETED)
            self._raise_failed()
        self._inflight[number] = asyncio.ensure_future(self._upload_part(number, buf))

    async def _upload_part(self, number: int, buf: _PartBuffer) -> None:
        try:
            response = await self._calls.call("upload_part", self._path, Key=self._key,
                                              UploadId=self._upload_id, PartNumber=number, Body=buf.body())
        except UploadGone as exc:
            # aborted under us (the file was deleted): its bytes are gone
            raise PathNotFound(self._path) from exc
        finally:
            size = buf.size
            buf.close()
        self._parts[number] = Part(number, quoted(response.get("ETag")), size)

    async def _persist(self, parts: list[Part] | None) -> None:
        """Store the file: `parts` (None: every part there is) and the tail."""
        calls = self._calls
        if self._dirty:
            if self._upload_id is None and self._copy_source is None:
                # Everything is here, less than a part: one PUT, no multipart upload.
                await calls.call("put_object", self._path, Key=self._key, Body=self._buf.body(),
                                 **self._condition, **calls.content_args(self._buf.size))
            else:
                await self._ensure_upload()        # a whole object continued by a small write
                if self._buf.size > TAIL_IN_STATE_MAX:
                    # A tail this big (parts past 64 MiB, blobs past 47 GiB at
                    # the default size) is not rewritten with every commit:
                    # it goes up as a part of its own, at least 64 MiB.
                    number, buf = self._next, self._buf
                    self._next += 1
                    self._buf = _PartBuffer()
                    await self._upload_part(number, buf)
                chosen = list(self._parts.values()) if parts is None else parts
                state = PendingState(self._upload_id, sorted(chosen, key=lambda p: p.number),
                                     await self._buf.read(calls))
                body, metadata = state.encode()
                await calls.call("put_object", self._path, Key=self._key, Body=body, Metadata=metadata,
                                 **self._condition, **calls.encryption_args())
        self._buf.close()
        if self._stale_upload and self._stale_upload != self._upload_id:
            await calls.abort(self._path, self._key, self._stale_upload)

    async def _abandon(self) -> None:
        """An upload this writer started and no state names: abort it."""
        if self._created and self._upload_id is not None:
            try:
                await asyncio.shield(self._calls.abort(self._path, self._key, self._upload_id))
            except StorageError as exc:
                log.warning("could not abort the multipart upload of %s: %s", self._path, exc)
            self._created = False
