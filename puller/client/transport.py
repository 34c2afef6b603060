"""HTTP/1.1 for the client: an asyncio protocol, h11 for the framing, a
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
read as they arrive; redirects and auth are handled a layer up (puller.client.http).
h11 does the HTTP/1.1 framing of requests and of response heads (and of
chunked or close-delimited bodies); this module does the I/O, TLS (a context
built on first use), the connection pool and timeouts; an HTTPS connection
goes through the proxy HTTPS_PROXY names (a CONNECT tunnel), a plain one
through HTTP_PROXY's (absolute-form requests), unless NO_PROXY says
otherwise (puller.client.proxy). A Content-Length
body - every blob - bypasses h11: the socket is read straight into 1 MiB
buffers whose filled parts are handed to the caller as memoryviews, so a
byte is copied once, by the kernel, on its way to the hasher and the file.

Failures (puller.errors, both TransportErrors): `TransportFailure`
(connection refused or reset, a timeout, a body cut short, a protocol
violation: worth a retry) and `CertificateError` (the server's certificate
is not trusted: not worth one). OSError, ssl and h11 errors are mapped to
them here; each names the host and says what happened in one line.
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

from puller.client.proxy import open_tunnel, proxy_for
from puller.errors import CertificateError, TransportError, TransportFailure, one_line

MiB = 1024 * 1024
RECEIVE_BUFFER = MiB            # the socket is read into buffers of this size
PAUSE_ABOVE = 8 * MiB           # received but not taken: stop reading the socket
HEAD_PIECE = 16 * 1024          # read size while waiting for a response head
IDLE_REUSE_SECONDS = 30.0       # an idle connection older than this is not reused
MAX_IDLE_PER_ORIGIN = 16
MAX_HEADER_BYTES = 256 * 1024

Body = bytes | None | Callable[[], AsyncIterator[bytes]]


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


class _Channel(asyncio.BufferedProtocol):
    """One connection's bytes in both directions. Received bytes land in
    RECEIVE_BUFFER-sized bytearrays; `take` hands out the filled,
    not yet taken part as a memoryview (never rewritten: later bytes go
    further along, or into a fresh buffer). Bytes that arrived are still
    delivered after the peer closed or reset the connection."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray(0)
        self._start = 0             # first byte of _buffer not yet taken
        self._end = 0               # bytes received into _buffer
        self._full: list[memoryview] = []   # untaken parts of earlier buffers
        self._available = 0
        self._paused = False
        self._eof = False
        self._error: BaseException | None = None
        self._readable: asyncio.Future | None = None
        self._writable: asyncio.Future | None = None
        self._write_paused = False

    # -- protocol callbacks --------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._end == len(self._buffer):
            if self._start < self._end:
                self._full.append(memoryview(self._buffer)[self._start:self._end])
            self._buffer = bytearray(RECEIVE_BUFFER)
            self._start = self._end = 0
        return memoryview(self._buffer)[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        self._available += nbytes
        if self._available > PAUSE_ABOVE and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self._eof = True
        if exc is not None:
            self._error = exc
        self._wake_reader()
        if self._writable is not None and not self._writable.done():
            self._writable.set_exception(exc or ConnectionResetError("connection closed"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def _wake_reader(self) -> None:
        if self._readable is not None and not self._readable.done():
            self._readable.set_result(None)

    # -- for the client ------------------------------------------------------------
    @property
    def peer_closed(self) -> bool:
        return self._eof

    @property
    def has_unread(self) -> bool:
        return self._available > 0

    def take(self, limit: int) -> memoryview | None:
        """Up to `limit` received bytes, None when none are waiting."""
        if self._full:
            piece = self._full[0]
            if len(piece) > limit:
                self._full[0] = piece[limit:]
                piece = piece[:limit]
            else:
                self._full.pop(0)
        elif self._start < self._end:
            stop = min(self._end, self._start + limit)
            piece = memoryview(self._buffer)[self._start:stop]
            self._start = stop
        else:
            return None
        self._available -= len(piece)
        if self._paused and self._available <= PAUSE_ABOVE // 2:
            self._paused = False
            self.transport.resume_reading()
        return piece

    async def receive(self, limit: int, timeout: float | None) -> memoryview | bytes:
        """The next received bytes (at most `limit`); b"" at a clean end of
        the stream; raises what broke the connection once all that arrived
        before it was taken."""
        while True:
            piece = self.take(limit)
            if piece is not None:
                return piece
            if self._eof:
                if self._error is not None:
                    raise self._error
                return b""
            self._readable = asyncio.get_running_loop().create_future()
            async with asyncio.timeout(timeout):
                await self._readable

    def write(self, data) -> None:
        self.writelines([data])

    def writelines(self, pieces: list) -> None:
        """Several pieces (h11's framing around a body piece) without joining them."""
        if self.transport.is_closing():
            raise self._error or ConnectionResetError("connection closed")
        self.transport.writelines(pieces)

    async def drain(self, timeout: float | None) -> None:
        if self.transport.is_closing():
            raise self._error or ConnectionResetError("connection closed")
        if self._write_paused:
            self._writable = asyncio.get_running_loop().create_future()
            async with asyncio.timeout(timeout):
                await self._writable


class _Connection:
    def __init__(self, origin: _Origin, channel: _Channel):
        self.origin = origin
        self.channel = channel
        self.idle_since = time.monotonic()
        self.proxy = None               # a plain-HTTP proxy this connection goes through (puller.client.proxy)

    def reusable(self) -> bool:
        return (not self.channel.transport.is_closing() and not self.channel.peer_closed
                and not self.channel.has_unread and time.monotonic() - self.idle_since < IDLE_REUSE_SECONDS)

    def close(self) -> None:
        self.channel.transport.abort()


class Response:
    """One response; its body is read with `read`, `read_some` or `iter_body`."""

    def __init__(self, transport: "Transport", connection: _Connection, exchange: h11.Connection,
                 head: h11.Response, method: str, url: str, read_timeout: float):
        self._transport = transport
        self._connection: _Connection | None = connection
        self._exchange = exchange
        self.status = head.status_code
        self.headers = Headers(head.headers)
        self.url = url
        self._read_timeout = read_timeout
        self._done = False
        length = self.headers.get("Content-Length")
        self.content_length = int(length) if length and length.isdigit() else None
        # a Content-Length body is read here, past h11; anything else through h11
        self._direct = (self.content_length is not None and method != "HEAD" and "Transfer-Encoding" not in self.headers
                        and self.status not in (204, 304) and self.status >= 200)
        self._remaining = self.content_length or 0
        self._leftover = b""
        if self._direct:
            self._leftover, _ = exchange.trailing_data
            self._keep_alive = (head.http_version == b"1.1"
                                and "close" not in (self.headers.get("Connection") or "").lower())
            if not self._remaining:
                self._finish(reusable=self._direct_reusable())

    async def read_some(self) -> bytes | memoryview:
        """The next piece of the body as it arrived (bytes or a memoryview,
        valid for good); b"" once the body is complete."""
        if self._done:
            return b""
        conn = self._connection
        try:
            if self._direct:
                return await self._read_direct(conn)
            exchange = self._exchange
            while True:
                event = exchange.next_event()
                if event is h11.NEED_DATA:
                    exchange.receive_data(bytes(await conn.channel.receive(RECEIVE_BUFFER, self._read_timeout)))
                    continue
                if isinstance(event, h11.Data):
                    return event.data
                if isinstance(event, h11.EndOfMessage):
                    self._finish(reusable=exchange.our_state is h11.DONE and exchange.their_state is h11.DONE)
                    return b""
                raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} in a response body")
        except (h11.RemoteProtocolError, OSError, asyncio.TimeoutError) as exc:
            self._discard()
            raise TransportFailure(f"{conn.origin.host}: {_reason(exc, 'body')}") from exc

    async def _read_direct(self, conn: _Connection) -> bytes | memoryview:
        if self._leftover:
            piece, self._leftover = self._leftover[:self._remaining], self._leftover[self._remaining:]
        else:
            piece = await conn.channel.receive(self._remaining, self._read_timeout)
            if not piece:
                raise h11.RemoteProtocolError("peer closed connection without sending complete message body")
        self._remaining -= len(piece)
        if not self._remaining:
            self._finish(reusable=self._direct_reusable())
        return piece

    def _direct_reusable(self) -> bool:
        # nothing beyond the body may have arrived, and our request must be complete
        return self._keep_alive and not self._leftover and self._exchange.our_state is h11.DONE

    async def iter_body(self) -> AsyncIterator[bytes | memoryview]:
        while True:
            piece = await self.read_some()
            if not piece:
                return
            yield piece

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; with `limit`, stops once more than `limit` bytes
        arrived (so len(result) > limit says it was too big)."""
        parts: list[bytes | memoryview] = []
        received = 0
        while limit is None or received <= limit:
            piece = await self.read_some()
            if not piece:
                break
            parts.append(piece)
            received += len(piece)
        return b"".join(parts)

    def _finish(self, reusable: bool) -> None:
        self._done = True
        conn, self._connection = self._connection, None
        if conn is not None:
            self._transport._give_back(conn, reusable)

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
                    try:
                        context.load_verify_locations(cafile=self.options.ca_file)
                    except OSError as exc:      # missing, unreadable, or not PEM (ssl.SSLError)
                        # OSError's str() omits the file name load_verify_locations was given
                        why = exc.strerror if exc.strerror and not isinstance(exc, ssl.SSLError) else one_line(exc)
                        raise TransportError(f"cannot load CA file {self.options.ca_file}: {why}") from exc
            context.set_alpn_protocols(["http/1.1"])
            self._ssl = context
        return self._ssl

    async def close(self) -> None:
        self._closed = True
        for connections in self._idle.values():
            for conn in connections:
                conn.close()
        self._idle.clear()

    def _give_back(self, conn: _Connection, reusable: bool) -> None:
        if self._closed or not reusable:
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
        proxy = proxy_for(origin.scheme, origin.host, origin.port)   # HTTPS_PROXY, HTTP_PROXY, NO_PROXY
        try:
            async with asyncio.timeout(timeout or self.options.connect_timeout):
                if proxy and context:
                    where = {"sock": await open_tunnel(proxy, origin.host, origin.port)}
                else:       # plain HTTP through a proxy: requests name the whole URL (absolute-form)
                    where = {"host": proxy.host, "port": proxy.port} if proxy else \
                        {"host": origin.host, "port": origin.port}
                _, channel = await asyncio.get_running_loop().create_connection(
                    _Channel, ssl=context, server_hostname=origin.host if context else None, **where)
        except ssl.SSLCertVerificationError as exc:
            raise CertificateError(origin.host, exc.verify_message or exc.reason) from exc
        except (OSError, asyncio.TimeoutError) as exc:
            raise TransportFailure(f"cannot connect to {origin.host}:{origin.port}: {_reason(exc, 'connect')}") from exc
        conn = _Connection(origin, channel)
        conn.proxy = proxy if proxy and not context else None
        return conn

    async def speaks_tls(self, host: str, port: int, timeout: float) -> bool:
        """Whether host:port completes a TLS handshake. The certificate is not
        checked here (a real request does that): this only chooses the scheme
        for a loopback registry without loading the CA store for a plain one."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=host)
        except (OSError, asyncio.TimeoutError):      # ssl.SSLError is an OSError
            return False
        writer.transport.abort()
        return True

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
            exchange = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
            try:
                if conn.proxy is None:
                    head = await self._exchange(conn, exchange, method, target, fields, body, read_timeout)
                else:
                    head = await self._exchange(conn, exchange, method, f"http://{origin.host_header}{target}",
                                                fields + conn.proxy.headers(), body, read_timeout)
            except _StaleConnection:
                conn.close()
                if reused:
                    continue       # the server closed it while idle: once more on a new one
                raise TransportFailure(f"{origin.host}: connection closed before a response") from None
            except (h11.ProtocolError, OSError, asyncio.TimeoutError) as exc:
                conn.close()
                raise TransportFailure(f"{method} {urlsplit(url).path} on {origin.host}: "
                                       f"{_reason(exc, 'response')}") from exc
            except BaseException:
                conn.close()
                raise
            if conn.proxy is not None and head.status_code == 407:
                # the proxy, not the registry, refused: say which one, as the CONNECT path does
                conn.close()
                raise TransportError(f"proxy {conn.proxy} refused {method} {urlsplit(url).path} on {origin.host}: "
                                     f"407 {head.reason.decode('latin-1') or 'Proxy Authentication Required'} "
                                     f"(credentials go in HTTP_PROXY as http://USER:PASSWORD@HOST:PORT)")
            return Response(self, conn, exchange, head, method, url, read_timeout)
        raise TransportFailure(f"{origin.host}: connection closed before a response")  # pragma: no cover

    async def _exchange(self, conn: _Connection, exchange: h11.Connection, method: str, target: str,
                        fields: list[tuple[str, str]], body: Body, read_timeout: float) -> h11.Response:
        channel = conn.channel
        try:
            channel.write(exchange.send(h11.Request(method=method, target=target, headers=fields)))
            if not callable(body):
                if body:
                    channel.writelines(exchange.send_with_data_passthrough(h11.Data(data=body)))
                channel.write(exchange.send(h11.EndOfMessage()))
                await channel.drain(read_timeout)
        except ConnectionError:
            raise _StaleConnection() from None
        if not callable(body):
            return await self._read_head(channel, exchange, read_timeout)
        # A streamed body goes out while the answer is awaited: a server may
        # answer before the body is complete (a 413, a 401) and then close.
        sending = asyncio.ensure_future(self._send_body(channel, exchange, body, read_timeout))
        head = asyncio.ensure_future(self._read_head(channel, exchange, None))
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
    async def _send_body(channel: _Channel, exchange: h11.Connection, body: Callable[[], AsyncIterator[bytes]],
                         timeout: float) -> None:
        async for piece in body():
            if piece:
                channel.writelines(exchange.send_with_data_passthrough(h11.Data(data=piece)))
                await channel.drain(timeout)
        channel.write(exchange.send(h11.EndOfMessage()))
        await channel.drain(timeout)

    @staticmethod
    async def _read_head(channel: _Channel, exchange: h11.Connection, timeout: float | None) -> h11.Response:
        received_any = False
        while True:
            event = exchange.next_event()
            if event is h11.NEED_DATA:
                try:
                    # small pieces: the body after the head stays in the channel
                    data = await channel.receive(HEAD_PIECE, timeout)
                except ConnectionError:
                    if received_any:
                        raise
                    data = b""
                if not data and not received_any:
                    raise _StaleConnection()
                received_any = True
                exchange.receive_data(bytes(data))
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
