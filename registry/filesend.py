"""Send a file as a response body from a thread, around aiohttp's writer.

aiohttp's FileResponse uses `loop.sendfile`, which uvloop does not
implement: it then falls back to reading the file into memory in chunks on
an executor and writing them through the event loop, several times the CPU
per byte. Blob GET is the registry's bulk path, so it gets its own: the
response headers are written and flushed by aiohttp, then a thread from a
dedicated pool copies the file to a duplicate of the connection's socket
(the duplicate keeps the socket alive even if the loop closes its own
descriptor when the client goes away, so bytes can never reach another
connection), waiting for writability with poll(2) when the socket buffer is
full.

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
import os
import select
import socket
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

# A client that reads nothing for this long is dropped.
STALL_TIMEOUT_MS = 120_000
# Bytes read from the file per pread(2): large enough that syscalls are few.
_CHUNK = 1 << 20


class NoPlainSocket(Exception):
    """The transport has no socket (e.g. TLS): the caller streams instead."""


def make_pool(max_workers: int = 64) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="dockyard-filesend")


def open_file(path: str) -> int:
    """A read-only descriptor (call it on the pool: it touches the disk)."""
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _wait_writable(poller: select.poll) -> None:
    events = poller.poll(STALL_TIMEOUT_MS)
    if not events:
        raise TimeoutError("client stopped reading")
    if events[0][1] & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
        raise ConnectionResetError("client went away")


def _send_blocking(sock_fd: int, file_fd: int, offset: int, count: int) -> None:
    """Copy count bytes of file_fd from offset to a non-blocking socket."""
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    buffer = memoryview(bytearray(min(count, _CHUNK)))
    while count > 0:
        got = os.preadv(file_fd, [buffer[:min(count, len(buffer))]], offset)
        if got == 0:               # the file is shorter than announced
            raise EOFError(f"{count} bytes missing at offset {offset}")
        pending = buffer[:got]
        while pending:
            try:
                pending = pending[os.write(sock_fd, pending):]
            except BlockingIOError:
                _wait_writable(poller)
        offset += got
        count -= got


def socket_of(request: web.Request) -> socket.socket | None:
    """The connection's plain socket, None when it cannot be written directly (TLS)."""
    transport = request.transport
    if transport is None or transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        return None
    return sock


async def send_file(request: web.Request, response: web.StreamResponse, file_fd: int,
                    offset: int, count: int, pool: ThreadPoolExecutor) -> web.StreamResponse:
    """Prepare `response` (status, headers, Content-Length set by the caller)
    and send count bytes of file_fd from offset as its body. A client that
    goes away mid-body just has its connection closed."""
    sock = socket_of(request)
    if sock is None:
        raise NoPlainSocket("no plain socket")
    transport = request.transport
    writer = await response.prepare(request)
    if count:
        await writer.drain()
        # Headers must be on the wire before the body goes around the transport.
        for _ in range(1000):
            if transport.is_closing():
                return response
            if not transport.get_write_buffer_size():
                break
            await asyncio.sleep(0.005)
        else:
            transport.close()
            return response
        sock_fd = os.dup(sock.fileno())
        try:
            await asyncio.get_running_loop().run_in_executor(
                pool, _send_blocking, sock_fd, file_fd, offset, count)
        except (OSError, TimeoutError, EOFError):
            transport.close()      # a truncated body must not look complete
            return response
        finally:
            os.close(sock_fd)
        # The body went around aiohttp's writer: its length is satisfied.
        if writer.length is not None:
            writer.length = 0
        writer.output_size += count
    await response.write_eof()
    return response
