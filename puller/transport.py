"""HTTP/1.1 for the client: asyncio streams, h11 for the protocol, a
keep-alive pool per origin.

    transport = Transport(TransportOptions(ca_file=None, insecure=False))
    async with transport.request("GET", url, headers={...}) as response:
        response.status, response.headers.get("Content-Type")
        async for piece in response.iter_body(): ...      # or: await response.read(limit)
    await transport.close()

Why not aiohttp, which the server uses: importing aiohttp's client costs a
`dockyard pull` about 0.2 s of a 0.3 s start-up (it builds two verified TLS
contexts at import), more than the whole download of a small image. The
client needs little of it: requests with a byte, or streamed, body; bodies
read as they arrive; redirects and auth are handled a layer up (puller.http).
h11 does the HTTP/1.1 framing (Content-Length, chunked, HEAD, keep-alive
rules); this module does the I/O, TLS (a context built on first use), the
connection pool and timeouts.

Failures: `TransportFailure` (connection refused or reset, a timeout, a
body cut short, a protocol violation: worth a retry) and
`CertificateFailure` (the server's certificate is not trusted: not worth
one). Both name the host and say what happened in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

MiB = 1024 * 1024
READ_SIZE = MiB                 # largest piece taken off a socket at once
STREAM_LIMIT = 4 * MiB          # the reader stops the socket beyond twice this
IDLE_REUSE_SECONDS = 30.0       # an idle connection older than this is not reused
MAX_IDLE_PER_ORIGIN = 16
MAX_HEADER_BYTES = 256 * 1024

Body = bytes | None | Callable[[], AsyncIterator[bytes]]


class TransportFailure(Exception):
    """The exchange failed below HTTP semantics; a retry may succeed."""


class CertificateFailure(Exception):
    """TLS certificate verification failed."""


@dataclass(frozen=True)
class TransportOptions:
    insecure: bool = False              # TLS without certificate verification
    ca_file: str | None = None          # extra CA bundle to trust
    connect_timeout: float = 30.0
    read_timeout: float = 300.0         # between two reads of a response
    user_agent: str = "dockyard"


class Headers:
    """Response headers: case-insensitive, several values per name."""

    def __init__(self, items: list[tuple[bytes, bytes]]):
        self._items = [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in items]

    def get(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for key, value in self._items:
            if key == name:
                return value
        return default

    def getall(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self._items if key == name]

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None


@dataclass(frozen=True)
class _Origin:
    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def _origin_of(url: str) -> tuple[_Origin, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TransportFailure(f"unsupported URL {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Origin(parts.scheme, parts.hostname.lower(), port), target


class _Connection:
    def __init__(self, origin: _Origin, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.origin = origin
        self.reader = reader
        self.writer = writer
        self.protocol = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.idle_since = time.monotonic()

    def reusable(self) -> bool:
        return (not self.writer.transport.is_closing() and not self.reader.at_eof()
                and time.monotonic() - self.idle_since < IDLE_REUSE_SECONDS)

    def close(self) -> None:
        self.writer.transport.abort() if self.origin.scheme == "https" else self.writer.close()


class Response:
    """One response; its body is read with `read`, `read_some` or `iter_body`."""

    def __init__(self, transport: "Transport", connection: _Connection, head: h11.Response, url: str,
                 read_timeout: float):
        self._transport = transport
        self._connection: _Connection | None = connection
        self.status = head.status_code
        self.headers = Headers(head.headers)
        self.url = url
        self._read_timeout = read_timeout
        self._done = False
        length = self.headers.get("Content-Length")
        self.content_length = int(length) if length and length.isdigit() else None

    async def read_some(self) -> bytes:
        """The next piece of the body as it arrived; b"" once it is complete."""
        if self._done:
            return b""
        conn = self._connection
        try:
            while True:
                event = conn.protocol.next_event()
                if event is h11.NEED_DATA:
                    async with asyncio.timeout(self._read_timeout):
                        data = await conn.reader.read(READ_SIZE)
                    conn.protocol.receive_data(data)
                    continue
                if isinstance(event, h11.Data):
                    return bytes(event.data)
                if isinstance(event, h11.EndOfMessage):
                    self._finish()
                    return b""
                raise TransportFailure(f"{conn.origin.host}: unexpected {type(event).__name__} in a response body")
        except (h11.RemoteProtocolError, OSError, asyncio.TimeoutError) as exc:
            self._discard()
            raise TransportFailure(f"{conn.origin.host}: {_reason(exc, 'body')}") from None

    async def iter_body(self) -> AsyncIterator[bytes]:
        while True:
            piece = await self.read_some()
            if not piece:
                return
            yield piece

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; with `limit`, stops once more than `limit` bytes
        arrived (so len(result) > limit says it was too big)."""
        parts: list[bytes] = []
        received = 0
        while limit is None or received <= limit:
            piece = await self.read_some()
            if not piece:
                break
            parts.append(piece)
            received += len(piece)
        return b"".join(parts)

    def _finish(self) -> None:
        self._done = True
        conn, self._connection = self._connection, None
        if conn is not None:
            self._transport._give_back(conn)

    def _discard(self) -> None:
        self._done = True
        conn, self._connection = self._connection, None
        if conn is not None:
            conn.close()

    def release(self) -> None:
        """Done with the response: a fully read one keeps its connection."""
        if not self._done:
            self._discard()


class Transport:
    def __init__(self, options: TransportOptions | None = None):
        self.options = options or TransportOptions()
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    def ssl_context(self) -> ssl.SSLContext:
        # built on first HTTPS use: loading the system's CA store is not free
        if self._ssl is None:
            if self.options.insecure:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            else:
                context = ssl.create_default_context()
                if self.options.ca_file:
                    context.load_verify_locations(cafile=self.options.ca_file)
            context.set_alpn_protocols(["http/1.1"])
            self._ssl = context
        return self._ssl

    async def close(self) -> None:
        self._closed = True
        for connections in self._idle.values():
            for conn in connections:
                conn.close()
        self._idle.clear()

    def _give_back(self, conn: _Connection) -> None:
        protocol = conn.protocol
        if (self._closed or protocol.our_state is not h11.DONE or protocol.their_state is not h11.DONE):
            conn.close()
            return
        try:
            protocol.start_next_cycle()
        except h11.LocalProtocolError:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        pool = self._idle.setdefault(conn.origin, [])
        if len(pool) >= MAX_IDLE_PER_ORIGIN:
            conn.close()
        else:
            pool.append(conn)

    async def _connect(self, origin: _Origin, timeout: float | None) -> _Connection:
        context = self.ssl_context() if origin.scheme == "https" else None
        try:
            async with asyncio.timeout(timeout or self.options.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    origin.host, origin.port, ssl=context, limit=STREAM_LIMIT,
                    server_hostname=origin.host if context else None)
        except ssl.SSLCertVerificationError as exc:
            raise CertificateFailure(f"TLS certificate of {origin.host} not trusted "
                                     f"({exc.verify_message or exc.reason})") from None
        except (OSError, asyncio.TimeoutError) as exc:
            raise TransportFailure(f"cannot connect to {origin.host}:{origin.port}: {_reason(exc, 'connect')}") from None
        return _Connection(origin, reader, writer)

    def _pooled(self, origin: _Origin) -> _Connection | None:
        pool = self._idle.get(origin)
        while pool:
            conn = pool.pop()
            if conn.reusable():
                return conn
            conn.close()
        return None

    @contextlib.asynccontextmanager
    async def request(self, method: str, url: str, *, headers: dict[str, str] | None = None, body: Body = None,
                      timeout: float | None = None) -> AsyncIterator[Response]:
        """Send one request and yield its response (head read, body not yet).
        `body` is bytes, or a zero-argument callable returning an async
        iterator of bytes (called again if a stale pooled connection makes
        the request go out twice); an iterator body needs a Content-Length
        header or goes out chunked. `timeout` bounds connect and each read."""
        response = await self.send(method, url, headers=headers, body=body, timeout=timeout)
        try:
            yield response
        finally:
            response.release()

    async def send(self, method: str, url: str, *, headers: dict[str, str] | None = None, body: Body = None,
                   timeout: float | None = None) -> Response:
        origin, target = _origin_of(url)
        fields = [("Host", origin.host_header), ("User-Agent", self.options.user_agent)]
        names = {"host", "user-agent"}
        for name, value in (headers or {}).items():
            if name.lower() in names:
                fields = [f for f in fields if f[0].lower() != name.lower()]
            fields.append((name, value))
        lowered = {name.lower() for name, _ in fields}
        if isinstance(body, (bytes, bytearray)) and "content-length" not in lowered:
            fields.append(("Content-Length", str(len(body))))
        elif body is None and method in ("POST", "PUT", "PATCH") and "content-length" not in lowered:
            fields.append(("Content-Length", "0"))
        elif callable(body) and "content-length" not in lowered:
            fields.append(("Transfer-Encoding", "chunked"))
        read_timeout = timeout or self.options.read_timeout
        for attempt in range(2):
            conn = self._pooled(origin) if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin, timeout)
            try:
                head = await self._exchange(conn, method, target, fields, body, read_timeout)
            except _StaleConnection:
                conn.close()
                if reused:
                    continue       # the server closed it while idle: once more on a new one
                raise TransportFailure(f"{origin.host}: connection closed before a response") from None
            except (h11.ProtocolError, OSError, asyncio.TimeoutError) as exc:
                conn.close()
                raise TransportFailure(f"{method} {urlsplit(url).path} on {origin.host}: "
                                       f"{_reason(exc, 'response')}") from None
            except BaseException:
                conn.close()
                raise
            return Response(self, conn, head, url, read_timeout)
        raise TransportFailure(f"{origin.host}: connection closed before a response")  # pragma: no cover

    async def _exchange(self, conn: _Connection, method: str, target: str, fields: list[tuple[str, str]],
                        body: Body, read_timeout: float) -> h11.Response:
        protocol = conn.protocol
        writer = conn.writer
        try:
            writer.write(protocol.send(h11.Request(method=method, target=target, headers=fields)))
            if not callable(body):
                if body:
                    writer.write(protocol.send(h11.Data(data=body)))
                writer.write(protocol.send(h11.EndOfMessage()))
                async with asyncio.timeout(read_timeout):
                    await writer.drain()
        except ConnectionError:
            raise _StaleConnection() from None
        if not callable(body):
            return await self._read_head(conn, read_timeout)
        # A streamed body goes out while the answer is awaited: a server may
        # answer before the body is complete (a 413, a 401) and then close.
        sending = asyncio.ensure_future(self._send_body(conn, body, read_timeout))
        head = asyncio.ensure_future(self._read_head(conn, None))
        try:
            await asyncio.wait((sending, head), return_when=asyncio.FIRST_COMPLETED)
            if head.done() and not sending.done():
                sending.cancel()   # the connection is not reused: our side never finished
                return head.result()
            try:
                sending.result()
            except ConnectionError:
                pass               # an answer may already be on its way: read it
            async with asyncio.timeout(read_timeout):
                return await head
        finally:
            for task in (sending, head):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task

    @staticmethod
    async def _send_body(conn: _Connection, body: Callable[[], AsyncIterator[bytes]], timeout: float) -> None:
        protocol, writer = conn.protocol, conn.writer
        async for piece in body():
            if piece:
                writer.write(protocol.send(h11.Data(data=piece)))
                async with asyncio.timeout(timeout):
                    await writer.drain()
        writer.write(protocol.send(h11.EndOfMessage()))
        async with asyncio.timeout(timeout):
            await writer.drain()

    @staticmethod
    async def _read_head(conn: _Connection, timeout: float | None) -> h11.Response:
        protocol = conn.protocol
        received_any = False
        while True:
            event = protocol.next_event()
            if event is h11.NEED_DATA:
                try:
                    async with asyncio.timeout(timeout):
                        data = await conn.reader.read(READ_SIZE)
                except ConnectionError:
                    if received_any:
                        raise
                    data = b""
                if not data and not received_any:
                    raise _StaleConnection()
                received_any = True
                protocol.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                return event
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} before the response")


class _StaleConnection(Exception):
    """A connection that closed without a byte of response."""


def _reason(exc: BaseException, stage: str) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"timed out waiting for the {stage}"
    if isinstance(exc, h11.RemoteProtocolError) and "peer closed" in str(exc):
        return "connection closed in the middle of the response"
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
