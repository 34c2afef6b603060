"""The client's HTTP/1.1 transport (puller/transport.py) against raw loopback
servers that misbehave on purpose: keep-alive reuse, a pooled connection
the server closed, chunked bodies, bodies cut short, early answers to an
upload, silent servers."""

from __future__ import annotations

import asyncio
import os

import pytest

from puller.client.transport import Transport, TransportFailure, TransportOptions

Handler = "async (reader, writer, state) -> None"


class RawServer:
    """A loopback TCP server running `handler` per connection; counts connections."""

    def __init__(self, handler):
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> "RawServer":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            body += await reader.readexactly(size)
            await reader.readexactly(2)
            if size == 0:
                return body
    return b""


def answer(status: str, body: bytes = b"", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


async def keep_alive_echo(reader, writer, state) -> None:
    """Answers every request on the connection with its own body (or "ok")."""
    while True:
        try:
            request_line, headers = await read_head(reader)
        except asyncio.IncompleteReadError:
            return
        body = await read_body(reader, headers)
        state.requests.append(body)
        payload = b"" if request_line.startswith("HEAD") else (body or b"ok")
        length = len(body or b"ok")
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n\r\n".encode() + payload)
        await writer.drain()


@pytest.fixture
async def transport():
    client = Transport(TransportOptions(read_timeout=5, connect_timeout=5))
    yield client
    await client.close()


async def test_keep_alive_reuses_one_connection(transport):
    async with RawServer(keep_alive_echo) as server:
        for _ in range(3):
            async with transport.request("GET", server.url()) as response:
                assert response.status == 200
                assert await response.read() == b"ok"
        # a HEAD answer has a Content-Length but no body: the connection stays usable
        async with transport.request("HEAD", server.url()) as response:
            assert response.content_length == 2
            assert await response.read() == b""
        async with transport.request("GET", server.url()) as response:
            assert await response.read() == b"ok"
        assert server.connections == 1


async def test_unread_response_is_not_reused(transport):
    async with RawServer(keep_alive_echo) as server:
        async with transport.request("GET", server.url()) as response:
            assert response.status == 200          # body left unread
        async with transport.request("GET", server.url()) as response:
            assert await response.read() == b"ok"
        assert server.connections == 2


async def test_pooled_connection_closed_by_server_is_replaced(transport):
    async def close_idle_connections(reader, writer, state):
        _, headers = await read_head(reader)
        state.requests.append(await read_body(reader, headers))
        writer.write(answer("200 OK", b"ok"))  # keep-alive announced, then closed anyway
        await writer.drain()
        await asyncio.sleep(0.05)

    async def close_on_second_request(reader, writer, state):
        """Answers once, then drops the connection when the next request
        comes: the race a client sees when the server's idle timer fires."""
        await close_idle_connections(reader, writer, state)
        await read_head(reader)

    for handler in (close_idle_connections, close_on_second_request):
        async with RawServer(handler) as server:
            async with transport.request("PUT", server.url(), body=b"first") as response:
                assert await response.read() == b"ok"
            await asyncio.sleep(0.2)

            async def streamed():
                yield b"sec"
                yield b"ond"
            async with transport.request("PUT", server.url(), body=streamed,
                                         headers={"Content-Length": "6"}) as response:
                assert await response.read() == b"ok"
            assert server.requests == [b"first", b"second"]
            assert server.connections == 2


async def test_streamed_body_without_length_goes_chunked(transport):
    pieces = [os.urandom(70_000), b"", os.urandom(3)]

    async def body():
        for piece in pieces:
            yield piece
    async with RawServer(keep_alive_echo) as server:
        async with transport.request("PATCH", server.url(), body=body) as response:
            assert await response.read() == b"".join(pieces)
        assert server.requests == [b"".join(pieces)]


async def test_chunked_response_is_decoded(transport):
    async def chunked(reader, writer, state):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
    async with RawServer(chunked) as server:
        async with transport.request("GET", server.url()) as response:
            assert response.content_length is None
            assert await response.read() == b"hello world"


async def test_body_cut_short_is_a_failure(transport):
    async def truncated(reader, writer, state):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 400)
        await writer.drain()
    async with RawServer(truncated) as server:
        async with transport.request("GET", server.url()) as response:
            with pytest.raises(TransportFailure, match="closed"):
                await response.read()


async def test_early_answer_to_an_upload_is_read(transport):
    """A server that refuses a large body at once (413) and closes: the client
    reports the 413, not a broken pipe."""
    async def refuse(reader, writer, state):
        await read_head(reader)
        writer.write(answer("413 Payload Too Large", b'{"errors":[]}', "Connection: close\r\n"))
        await writer.drain()
        await asyncio.sleep(0.3)     # then close with the body unread: the kernel resets

    async def big():       # more than the socket buffers of both ends hold
        for _ in range(512):
            yield b"z" * 65536
    async with RawServer(refuse) as server:
        async with transport.request("PUT", server.url(), body=big,
                                     headers={"Content-Length": str(512 * 65536)}) as response:
            assert response.status == 413


async def test_silent_server_times_out(transport):
    async def silent(reader, writer, state):
        await read_head(reader)
        await asyncio.sleep(10)
    async with RawServer(silent) as server:
        started = asyncio.get_running_loop().time()
        with pytest.raises(TransportFailure, match="timed out"):
            async with transport.request("GET", server.url(), timeout=0.5):
                pass
        assert asyncio.get_running_loop().time() - started < 5


async def test_refused_connection_names_the_address(transport):
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(TransportFailure, match=f"127.0.0.1:{port}"):
        async with transport.request("GET", f"http://127.0.0.1:{port}/"):
            pass


async def test_large_body_spans_buffers_and_keeps_the_connection(transport):
    """A Content-Length body bigger than several receive buffers arrives
    whole and in order, and the connection serves the next request."""
    blob = os.urandom(5 * 1024 * 1024 + 12345)

    async def serve_blob(reader, writer, state):
        while True:
            try:
                await read_head(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(answer("200 OK", blob))
            await writer.drain()
    async with RawServer(serve_blob) as server:
        for _ in range(2):
            async with transport.request("GET", server.url()) as response:
                pieces = [bytes(piece) async for piece in response.iter_body()]
            assert b"".join(pieces) == blob
            assert len(pieces) > 1
        assert server.connections == 1
