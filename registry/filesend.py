"""Send a file as a response body from a thread, around aiohttp's writer.

aiohttp's FileResponse uses `loop.sendfile`, which uvloop does not
implement: it then falls back to reading the file into memory in chunks on
an executor and writing them through the event loop, several times the CPU
per byte. Blob GET is the registry's bulk path, so it gets its own: the
response headers are written and flushed by aiohttp, then a thread from a
dedicated pool copies the file to a duplicate of the connection's socket
(the duplicate keeps the socket alive even if the loop closes its own
descriptor when the client goes away, so bytes can never reach another
connection).

A thread copies only while the socket takes bytes. When the socket stays
full (the client reads slowly, or not at all) the thread gives the wait
back to the event loop (`loop.add_writer` on the duplicate) and returns to
the pool; the copy continues on a pool thread once the socket is writable.
A stalled reader therefore holds a socket and nothing else: before, each
one held a pool thread for up to two minutes, and 64 of them stopped every
blob download of the process. A body that makes no progress for
`http.send_timeout` seconds is cut (RST, so the kernel drops its buffers).

Before giving the wait back, a thread polls the socket for a few
milliseconds: a fast reader drains a full socket buffer in far less, and
handing every such wait to the loop and back would cost a thread hop each
time. The pending bytes are not kept across a hand-back: blobs never
change, so the thread reads them from the file again (page cache), and a
waiting send owns no buffer (each pool thread has one).

The thread copies with pread(2) + write(2) through a buffer rather than
sendfile(2). sendfile puts page-cache pages in the socket as 4 KiB
fragments; a receiver with a small window (skopeo: its 128 KiB receive
buffer does not grow) then gets segments of ~21-28 KiB instead of ~56 KiB
that it cannot coalesce, and spends more CPU per byte: on loopback, against
skopeo, the pull was ~8% slower than CNCF Distribution. write(2) from a
buffer builds the socket's own 32 KiB fragments: full-size segments, and
it measured as fast as sendfile for curl (tests/benchmarks/bench_registry.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from aiohttp import web

log = logging.getLogger("dockyard.registry")

# Bytes read from the file per pread(2): large enough that syscalls are few.
_CHUNK = 1 << 20
# Seconds one pool visit may spend in all in poll(2), waiting for a full
# socket to drain, before it hands the wait to the event loop. Measured on
# loopback: skopeo (a 128 KiB window) pulling a 64 MiB layer hands back ~11
# times, curl never; a trickling reader holds a thread for this long at most.
_POLL_BUDGET = 0.02
# Seconds one pool visit may copy before it queues up again behind other
# sends waiting for a thread (fairness when every thread has a fast reader).
_SLICE = 0.5
# How long the response headers may take to reach the kernel (polled).
_HEADERS_TIMEOUT = 5.0

_POLL_ERRORS = select.POLLERR | select.POLLHUP | select.POLLNVAL
_local = threading.local()


class NoPlainSocket(Exception):
    """The transport has no socket (e.g. TLS): the caller streams instead."""


def make_pool(max_workers: int = 64) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="dockyard-filesend")


def _buffer() -> memoryview:
    buffer = getattr(_local, "buffer", None)
    if buffer is None:
        buffer = _local.buffer = memoryview(bytearray(_CHUNK))
    return buffer


def _copy_some(sock_fd: int, file_fd: int, offset: int, end: int) -> tuple[int, bool]:
    """On a pool thread: copy file_fd[offset:end] to the non-blocking socket
    until done, the socket stays full past the poll budget, or the slice is
    over. Returns the offset reached and whether the socket is full."""
    buffer = _buffer()
    poller = None
    waited = 0.0
    started = time.monotonic()
    while offset < end:
        got = os.preadv(file_fd, [buffer[:min(end - offset, len(buffer))]], offset)
        if got == 0:               # the file is shorter than announced
            raise EOFError(f"{end - offset} bytes missing at offset {offset}")
        sent = 0
        while sent < got:
            try:
                sent += os.write(sock_fd, buffer[sent:got])
                continue
            except BlockingIOError:
                pass
            if waited >= _POLL_BUDGET:
                # The rest of this piece is read again next visit (blobs never change).
                return offset + sent, True
            if poller is None:
                poller = select.poll()
                poller.register(sock_fd, select.POLLOUT)
            before = time.monotonic()
            events = poller.poll(max(1, int((_POLL_BUDGET - waited) * 1000)))
            waited += time.monotonic() - before
            if events and events[0][1] & _POLL_ERRORS:
                raise ConnectionResetError("client went away")
        offset += got
        if time.monotonic() - started > _SLICE:
            break
    return offset, False


class Waiting:
    """Sends waiting on the event loop, holding no thread, for a full socket
    to drain. A stopping server cuts them at once (`stop`): a reader that
    reads nothing would otherwise hold the shutdown for the whole drain
    time, twice (aiohttp waits for the handler, cancels the request, and
    waits again)."""

    def __init__(self) -> None:
        self._futures: set[asyncio.Future] = set()
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True
        for future in list(self._futures):
            if not future.done():
                future.set_exception(ConnectionAbortedError("server stopping"))

    async def writable(self, loop: asyncio.AbstractEventLoop, fd: int, timeout: float) -> bool:
        """Wait until fd is writable (or in error: the next write says
        which); False after timeout seconds."""
        if self.stopped:
            raise ConnectionAbortedError("server stopping")
        ready = loop.create_future()

        def on_writable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_writer(fd, on_writable)
        self._futures.add(ready)
        try:
            async with asyncio.timeout(timeout):
                await ready
            return True
        except TimeoutError:
            return False
        finally:
            self._futures.discard(ready)
            loop.remove_writer(fd)


def socket_of(request: web.Request) -> socket.socket | None:
    """The connection's plain socket, None when it cannot be written directly (TLS)."""
    transport = request.transport
    if transport is None or transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        return None
    return sock


def abort(request: web.Request) -> None:
    """Drop the connection at once: RST, the kernel frees what it buffered
    (a plain close would keep unsent bytes queued for a peer that reads nothing)."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


async def _copy(loop: asyncio.AbstractEventLoop, pool: ThreadPoolExecutor, waiting: Waiting,
                owned: list[int], sock_fd: int, file_fd: int, offset: int, count: int,
                send_timeout: float) -> None:
    """Copy count bytes from offset, in pool visits, waiting for a full socket
    on the loop. TimeoutError after send_timeout seconds without a byte sent."""
    end = offset + count
    last_progress = loop.time()
    while offset < end:
        try:
            visit: Future = pool.submit(_copy_some, sock_fd, file_fd, offset, end)
        except RuntimeError:       # the pool is shut down: the server is stopping
            raise ConnectionAbortedError("server stopping") from None
        try:
            reached, full = await asyncio.wrap_future(visit)
        except asyncio.CancelledError:
            # A thread may still be writing: the descriptors must outlive it
            # (a number closed early could be reused by another connection).
            owned.clear()
            visit.add_done_callback(lambda _: _close(sock_fd, file_fd))
            raise
        now = loop.time()
        if reached > offset:
            offset, last_progress = reached, now
        if offset >= end or not full:
            continue
        remaining = last_progress + send_timeout - now
        if remaining <= 0 or not await waiting.writable(loop, sock_fd, remaining):
            raise TimeoutError(f"no progress for {send_timeout:g}s, {end - offset} bytes unsent")


def _close(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


async def send_file(request: web.Request, response: web.StreamResponse, file_fd: int,
                    offset: int, count: int, pool: ThreadPoolExecutor, waiting: Waiting,
                    send_timeout: float) -> web.StreamResponse:
    """Prepare `response` (status, headers, Content-Length set by the caller)
    and send count bytes of file_fd from offset as its body; file_fd is
    closed when no thread uses it any more. A client that goes away or reads
    nothing for send_timeout seconds mid-body has its connection cut."""
    owned = [file_fd]
    try:
        sock = socket_of(request)
        if sock is None:
            raise NoPlainSocket("no plain socket")
        transport = request.transport
        writer = await response.prepare(request)
        if count:
            await writer.drain()
            # Headers must be on the wire before the body goes around the transport.
            for _ in range(int(_HEADERS_TIMEOUT / 0.005)):
                if transport.is_closing():
                    return response
                if not transport.get_write_buffer_size():
                    break
                await asyncio.sleep(0.005)
            else:
                abort(request)
                return response
            sock_fd = os.dup(sock.fileno())
            owned.append(sock_fd)
            loop = asyncio.get_running_loop()
            try:
                await _copy(loop, pool, waiting, owned, sock_fd, file_fd, offset, count, send_timeout)
            except TimeoutError as exc:
                log.info("blob send to %s cut: %s", request.remote, exc)
                abort(request)
                return response
            except OSError as exc:
                log.debug("blob send to %s broke off: %s", request.remote, exc)
                abort(request)         # a truncated body must not look complete
                return response
            except EOFError as exc:
                log.warning("blob file shorter than its size: %s", exc)
                abort(request)
                return response
            # The body went around aiohttp's writer: its length is satisfied.
            if writer.length is not None:
                writer.length = 0
            writer.output_size += count
        await response.write_eof()
        return response
    finally:
        _close(*owned)


class SendWatchdog:
    """Cuts a response whose body makes no progress for `timeout` seconds,
    for bodies written through aiohttp (TLS, non-local storage). The caller
    adds to `handed` what it writes; progress is bytes that left the
    transport for the kernel, checked four times per timeout, so the cut
    comes at most 1.5 timeouts after the last byte went out."""

    def __init__(self, request: web.Request, timeout: float):
        self._request, self._timeout = request, timeout
        self._loop = asyncio.get_running_loop()
        self._every = max(timeout / 4, 0.05)
        self.handed = 0
        self._mark: int | None = None
        self._since = self._loop.time()
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(self._every, self._check)

    def _check(self) -> None:
        self._handle = None
        transport = self._request.transport
        if transport is None or transport.is_closing():
            return
        now, sent = self._loop.time(), self.handed - transport.get_write_buffer_size()
        if sent != self._mark:
            self._mark, self._since = sent, now
        elif now - self._since >= self._timeout:
            log.info("blob send to %s cut: no progress for %gs", self._request.remote, self._timeout)
            abort(self._request)
            return
        self._handle = self._loop.call_later(self._every, self._check)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
