"""A round-robin HTTP/1.1 proxy on loopback: each REQUEST goes to the next
backend, not each connection, because clients (the OCI conformance suite,
docker) send a whole push over one keep-alive connection and would
otherwise talk to one replica only.

    with RoundRobinProxy(["127.0.0.1:5001", "127.0.0.1:5002"]) as proxy:
        http_request("GET", f"{proxy.url}/v2/")      # replica 1
        http_request("GET", f"{proxy.url}/v2/")      # replica 2
        proxy.served                                 # [1, 1]: requests per backend

It knows just enough HTTP to find where a message ends: the request head
(at most 64 KiB), then a body framed by Content-Length or chunked
transfer coding (copied as it comes, 64 KiB at a time: nothing is held
whole), and the same for the answer (no body for HEAD, 1xx, 204 and 304;
read to the end of the connection when neither framing is given). Each
client connection keeps one upstream connection per backend, reused while
both sides keep it alive. `Expect: 100-continue` is answered by the proxy
itself and not forwarded, so the body never waits on a backend's interim
answer. A backend that cannot be reached gets the client a 502 and a
closed connection. Nothing else is changed: heads go through byte for
byte, so Location headers stay the backends' (relative, by default).

`RoundRobinProxy` runs its own event loop in a thread (`start`/`stop`, or
a `with` block) for synchronous tests; `serve(backends, port)` is the
coroutine underneath, for an event loop of one's own.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass, field
from typing import Sequence

MAX_HEAD = 64 * 1024        # bytes of one message head (request or answer)
PIECE = 64 * 1024           # bytes copied at a time
CONNECT_TIMEOUT = 10.0


class ProxyError(Exception):
    """A message the proxy cannot frame: the connection is ended."""


class BackendUnreachable(ProxyError):
    """No connection to the backend: the client gets a 502."""


@dataclass
class _Head:
    raw: bytes                      # the head as received, blank line included
    start: list[str]                # the first line, split in three
    headers: dict[str, str]         # lower-cased names; repeated ones joined with ","

    @classmethod
    async def read(cls, reader: asyncio.StreamReader) -> "_Head | None":
        """The next head on reader; None at a clean end of the connection."""
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial.strip():
                return None
            raise ProxyError("connection ended inside a message head") from None
        except asyncio.LimitOverrunError:
            raise ProxyError(f"message head over {MAX_HEAD} bytes") from None
        lines = raw.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                key = name.strip().lower()
                headers[key] = f"{headers[key]},{value.strip()}" if key in headers else value.strip()
        return cls(raw, lines[0].split(" ", 2), headers)

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for t in self.headers.get(name, "").split(",") if t.strip()}

    @property
    def chunked(self) -> bool:
        return "chunked" in self.tokens("transfer-encoding")

    def length(self) -> int | None:
        value = self.headers.get("content-length")
        if value is None:
            return None
        sizes = {v.strip() for v in value.split(",")}
        if len(sizes) != 1 or not next(iter(sizes)).isdigit():
            raise ProxyError(f"bad Content-Length {value!r}")
        return int(sizes.pop())

    def keeps_alive(self) -> bool:
        # a request's version is its last word, an answer's its first
        version = self.start[0] if self.start[0].startswith("HTTP/") else self.start[-1]
        connection = self.tokens("connection")
        if version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection

    def without(self, name: str) -> bytes:
        """The raw head with every `name:` line left out."""
        lines = self.raw.split(b"\r\n")
        prefix = name.lower().encode() + b":"
        return b"\r\n".join(line for line in lines if not line.lower().startswith(prefix))


async def _copy_exactly(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: int) -> None:
    while count > 0:
        piece = await reader.read(min(PIECE, count))
        if not piece:
            raise ProxyError(f"connection ended with {count} body bytes still to come")
        writer.write(piece)
        await writer.drain()
        count -= len(piece)


async def _copy_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy a chunked body as it is, size lines and trailers included."""
    while True:
        line = await reader.readuntil(b"\r\n")
        writer.write(line)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise ProxyError(f"bad chunk size line {line[:40]!r}") from None
        if size == 0:
            break
        await _copy_exactly(reader, writer, size + 2)      # the chunk and its CRLF
    while True:                                            # trailers, up to the blank line
        line = await reader.readuntil(b"\r\n")
        writer.write(line)
        if line == b"\r\n":
            break
    await writer.drain()


async def _copy_to_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while piece := await reader.read(PIECE):
        writer.write(piece)
        await writer.drain()


async def _copy_body(head: _Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    if head.chunked:
        await _copy_chunked(reader, writer)
    else:
        await _copy_exactly(reader, writer, head.length() or 0)


@dataclass
class _Upstream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        self.writer.close()


@dataclass
class ProxyState:
    backends: list[tuple[str, int]]
    served: list[int] = field(default_factory=list)       # requests sent to each backend
    _turn: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.served = [0] * len(self.backends)

    def next_backend(self) -> int:
        index = next(self._turn) % len(self.backends)
        self.served[index] += 1
        return index


async def _exchange(state: ProxyState, head: _Head, client_r: asyncio.StreamReader,
                    client_w: asyncio.StreamWriter, upstreams: dict[int, _Upstream]) -> bool:
    """Send one request to the next backend and its answer back; whether
    the client connection may carry another request."""
    index = state.next_backend()
    upstream = upstreams.pop(index, None)
    if upstream is None:
        host, port = state.backends[index]
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=MAX_HEAD), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            raise BackendUnreachable(f"backend {host}:{port} unreachable: {exc}") from None
        upstream = _Upstream(reader, writer)
    raw = head.raw
    if "100-continue" in head.tokens("expect"):
        raw = head.without("expect")
        client_w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    upstream.writer.write(raw)
    await _copy_body(head, client_r, upstream.writer)
    while True:
        answer = await _Head.read(upstream.reader)
        if answer is None:
            raise ProxyError(f"backend {state.backends[index]} closed without answering")
        client_w.write(answer.raw)
        status = int(answer.start[1]) if len(answer.start) > 1 and answer.start[1].isdigit() else 0
        if not 100 <= status < 200 or status == 101:
            break
    await client_w.drain()
    # The answer's head went to the client as it was, so both connections
    # live on exactly when it says so (and its end is framed).
    alive = answer.keeps_alive()
    if head.start[0] == "HEAD" or status in (204, 304):
        pass
    elif answer.chunked or answer.length() is not None:
        await _copy_body(answer, upstream.reader, client_w)
    else:
        await _copy_to_end(upstream.reader, client_w)
        alive = False
    if alive:
        upstreams[index] = upstream
    else:
        upstream.close()
    return alive and head.keeps_alive()


async def _serve_client(state: ProxyState, client_r: asyncio.StreamReader,
                        client_w: asyncio.StreamWriter) -> None:
    upstreams: dict[int, _Upstream] = {}
    try:
        while True:
            head = await _Head.read(client_r)
            if head is None or not await _exchange(state, head, client_r, client_w, upstreams):
                break
    except BackendUnreachable as exc:
        body = str(exc).encode()
        client_w.write(b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    except (ProxyError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass                                # either side went away: end both
    finally:
        for upstream in upstreams.values():
            upstream.close()
        try:
            client_w.close()
            await client_w.wait_closed()
        except OSError:
            pass


async def serve(backends: Sequence[str], port: int = 0, host: str = "127.0.0.1"
                ) -> tuple[asyncio.base_events.Server, ProxyState]:
    """Listen on host:port (0: a free port) and proxy to backends ("HOST:PORT")."""
    pairs = []
    for backend in backends:
        address, _, number = backend.rpartition(":")
        pairs.append((address, int(number)))
    if not pairs:
        raise ValueError("a proxy needs at least one backend")
    state = ProxyState(pairs)
    server = await asyncio.start_server(lambda r, w: _serve_client(state, r, w), host, port, limit=MAX_HEAD)
    return server, state


class RoundRobinProxy:
    """The proxy on its own event loop in a daemon thread (see the module docstring)."""

    def __init__(self, backends: Sequence[str], port: int = 0):
        self.backends = list(backends)
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server = None
        self._state: ProxyState | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def served(self) -> list[int]:
        """Requests sent to each backend so far."""
        return list(self._state.served) if self._state else [0] * len(self.backends)

    def start(self) -> "RoundRobinProxy":
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server, self._state = loop.run_until_complete(serve(self.backends, self.port))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:
                failure.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()
            self._server.close()
            # connections still open end with the proxy
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="rrproxy", daemon=True)
        self._thread.start()
        started.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._thread = None

    def __enter__(self) -> "RoundRobinProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
