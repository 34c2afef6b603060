"""One upstream fetch per key, however many clients ask at once.

    flights = Flights()
    result = await flights.join(key, lambda: fetch())   # every waiter: one result, or one error

    fetch = BlobFetch(digest, map_error)   # a blob on its way from upstream into storage
    task = asyncio.create_task(fetch.run(open_upstream, commit))
    fetch.acquire()                        # a reader's hold on the spool, then release()
    size = await fetch.ready()             # once the upstream's answer is in
    await fetch.stream(write)              # from byte 0, as fast as the upstream delivers

A fetch is a task of its own: a waiter that goes away (its client hung up)
stops waiting, never the fetch, and later waiters join it while it runs.
A blob's bytes go to storage (which hashes and commits them only when they
match the digest) and to a spool file readers follow, so a waiter that
joins late starts from byte 0 without a second upstream request. Readers
are held one byte short of the end until storage committed the blob: a
corrupt or short upstream body is never seen whole by any client.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from typing import Any, AsyncIterator, Awaitable, Callable, Hashable

from storage.oci.errors import OciError

READ_CHUNK = 256 * 1024      # bytes per spool read handed to a client
SPOOL_BATCH = 256 * 1024     # bytes gathered before one spool write (one thread hop)


class Flights:
    """Concurrent calls with one key share one task."""

    def __init__(self) -> None:
        self._tasks: dict[Hashable, asyncio.Task] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    async def join(self, key: Hashable, start: Callable[[], Awaitable[Any]]) -> Any:
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.create_task(start())
            self._tasks[key] = task
            task.add_done_callback(lambda t: self._finished(key, t))
        # shield: a waiter cancelled (client gone) must not cancel the fetch
        return await asyncio.shield(task)

    def _finished(self, key: Hashable, task: asyncio.Task) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()         # retrieved: every waiter may have left

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


class BlobFetch:
    """One blob coming from upstream, followed by any number of readers."""

    def __init__(self, digest: str, map_error: Callable[[BaseException], OciError]):
        self.digest = digest
        self.size: int | None = None
        self.written = 0             # bytes in the spool
        self.committed = False       # storage verified and holds the blob
        self.error: OciError | None = None
        self.finished = False
        self._map_error = map_error
        self._ready = asyncio.get_running_loop().create_future()
        self._progress = asyncio.Event()
        self._spool = None           # an unnamed temporary file
        self._refs = 1               # the fetch itself, and each reader

    async def run(self, open_upstream: Callable[[], Any],
                  commit: Callable[[AsyncIterator[bytes], int], Awaitable[None]]) -> None:
        """The fetch: open_upstream() is an async context manager yielding a
        response (.content_length, .iter_body()); commit(chunks, size) stores
        the bytes, verified. Never raises: readers see .error."""
        try:
            self._spool = await asyncio.to_thread(tempfile.TemporaryFile, prefix="dockyard-proxy-")
            async with open_upstream() as response:
                size = response.content_length
                if size is None:
                    raise OciError("the upstream sent no Content-Length for a blob")
                self.size = size
                self._ready.set_result(size)
                await commit(self._tee(response.iter_body()), size)
            self.committed = True
        except BaseException as exc:       # cancelled at shutdown too: readers must end
            self.error = self._map_error(exc)
            if not self._ready.done():
                self._ready.set_exception(self.error)
                self._ready.exception()
            if not isinstance(exc, Exception):
                raise
        finally:
            self.finished = True
            self._wake()
            self._release()

    async def _tee(self, pieces: AsyncIterator[bytes | memoryview]) -> AsyncIterator[bytes]:
        """The upstream body to storage, each batch first written to the spool."""
        batch = bytearray()
        async for piece in pieces:
            batch += piece
            if len(batch) >= SPOOL_BATCH:
                data = bytes(batch)
                batch.clear()
                await self._spool_write(data)
                yield data
        if batch:
            data = bytes(batch)
            await self._spool_write(data)
            yield data

    async def _spool_write(self, data: bytes) -> None:
        await asyncio.to_thread(os.pwrite, self._spool.fileno(), data, self.written)
        self.written += len(data)
        self._wake()

    def _wake(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    def acquire(self) -> "BlobFetch":
        """A reader's hold on the spool (taken before any await); release() it."""
        self._refs += 1
        return self

    def release(self) -> None:
        self._release()

    def _release(self) -> None:
        self._refs -= 1
        if self._refs == 0 and self._spool is not None:
            self._spool.close()
            self._spool = None

    async def ready(self) -> int:
        """The blob's size once the upstream answered; its error otherwise."""
        return await asyncio.shield(self._ready)

    async def done(self) -> None:
        """Returns once the blob is committed; the fetch's error otherwise."""
        while not self.finished:
            await self._progress.wait()
        if self.error is not None:
            raise self.error

    async def stream(self, write: Callable[[bytes], Awaitable[None]]) -> None:
        """Hand the blob to write() from byte 0; the last byte only once it is
        committed. Raises the fetch's error (the caller cuts its client).
        The caller holds the spool (acquire) around it."""
        size = await self.ready()
        offset = 0
        while True:
            if self.error is not None:
                raise self.error
            limit = self.written if self.committed else min(self.written, size - 1)
            if offset < limit:
                fd = self._spool.fileno()
                data = await asyncio.to_thread(os.pread, fd, min(READ_CHUNK, limit - offset), offset)
                if not data:
                    raise OciError("cache spool ended early")
                offset += len(data)
                await write(data)
                continue
            if self.committed and offset >= size:
                return
            await self._progress.wait()
