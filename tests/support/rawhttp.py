"""HTTP/1.1 written by hand over a socket, for what no HTTP client sends:
a request whose body comes in pieces with pauses (or never), bytes that are
not HTTP at all, a reader that stops reading, a client that resets the
connection half way through a body.

An address is "HOST:PORT" (as `RegistryServer.host` gives it) or a
(host, port) pair. Headers of parsed answers are keyed in lower case.
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct
import time
from typing import Mapping, Sequence

Address = str | tuple[str, int | str]
Response = tuple[int, dict[str, str], bytes]


def split_address(address: Address) -> tuple[str, int]:
    if isinstance(address, str):
        host, _, port = address.rpartition(":")
        return host, int(port)
    host, port = address
    return host, int(port)


def connect(address: Address, *, timeout: float = 15.0, rcvbuf: int | None = None) -> socket.socket:
    """A connected TCP socket. `rcvbuf` shrinks the receive buffer before
    connecting (so the window the server sees is small from the start)."""
    host, port = split_address(address)
    if rcvbuf is None:
        return socket.create_connection((host, port), timeout=timeout)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


Headers = Mapping[str, str] | Sequence[tuple[str, str]]


def _pairs(headers: Headers | None) -> list[tuple[str, str]]:
    if headers is None:
        return []
    return list(headers.items()) if isinstance(headers, Mapping) else list(headers)


def request_head(method: str, path: str, host: str, headers: Headers | None = None,
                 *, close: bool = True) -> bytes:
    """Request line and headers, up to and including the blank line. The
    path is sent exactly as given (no normalisation, no quoting); pairs
    may repeat a header."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if close:
        lines.append("Connection: close")
    lines += [f"{name}: {value}" for name, value in _pairs(headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


def parse_response(raw: bytes) -> Response:
    """(status, headers, body) of one whole answer as read off the wire."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status, headers = parse_head(head)
    return status, headers, body


def close_with_reset(sock: socket.socket) -> None:
    """Close so that the peer sees a reset (RST), not an orderly end (FIN)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def answer_started(sock: socket.socket) -> bool:
    """The peer has sent something (peeked: nothing is consumed)."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable) and bool(sock.recv(1, socket.MSG_PEEK))


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends until it ends the connection (a reset ends it too)."""
    received = b""
    try:
        while data := sock.recv(65536):
            received += data
    except ConnectionResetError:
        pass
    return received


class RawRequest:
    """One request on a connection of its own, sent in as many pieces, with
    as long pauses between them, as the test wants.

    The head goes out at once (with `Connection: close` unless close=False);
    the body is whatever `send()` is given later. `response()` reads one
    answer (its Content-Length worth of body) and closes the connection.
    """

    def __init__(self, address: Address, method: str, path: str,
                 headers: Mapping[str, str] | None = None, *, timeout: float = 15.0,
                 close: bool = True, rcvbuf: int | None = None, host_header: str | None = None,
                 body: bytes = b""):
        host, port = split_address(address)
        self.sock = connect((host, port), timeout=timeout, rcvbuf=rcvbuf)
        head = request_head(method, path, host_header or f"{host}:{port}", headers, close=close)
        self.sock.sendall(head + body)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_in_pieces(self, data: bytes, piece: int, pause: float) -> None:
        """data in pieces of `piece` bytes, `pause` seconds after each but the last."""
        for offset in range(0, len(data), piece):
            if offset:
                time.sleep(pause)
            self.sock.sendall(data[offset:offset + piece])

    def response(self) -> Response:
        raw = b""
        while b"\r\n\r\n" not in raw:
            piece = self.sock.recv(65536)
            if not piece:
                raise ConnectionError(f"connection closed before a response: {raw!r}")
            raw += piece
        status, headers, body = parse_response(raw)
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            piece = self.sock.recv(65536)
            if not piece:
                break
            body += piece
        self.sock.close()
        return status, headers, body

    def read_until_closed(self) -> bytes:
        return read_until_closed(self.sock)

    def answered(self) -> bool:
        return answer_started(self.sock)

    def reset(self) -> None:
        close_with_reset(self.sock)

    def close(self) -> None:
        self.sock.close()


def request(address: Address, method: str, path: str, body: bytes = b"",
            headers: Mapping[str, str] | None = None) -> Response:
    """A whole request (Content-Length set; Content-Type octet-stream when
    there is a body) on its own connection, and its answer."""
    headers = {"Content-Length": str(len(body)), **(headers or {})}
    if body:
        headers.setdefault("Content-Type", "application/octet-stream")
    raw = RawRequest(address, method, path, headers)
    if body:
        raw.send(body)
    return raw.response()


def exchange(address: Address, payload: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes as they are (HTTP or not), read until the server closes."""
    with connect(address, timeout=timeout) as sock:
        sock.sendall(payload)
        return read_until_closed(sock)


async def raw_request(address: Address, method: str, path: str,
                      headers: Headers | None = None, body: bytes = b"",
                      timeout: float = 10.0) -> Response:
    """The same from a coroutine: one request exactly as written, read to the end."""
    host, port = split_address(address)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        given = _pairs(headers)
        if not any(name.lower() == "content-length" for name, _ in given):
            given.insert(0, ("Content-Length", str(len(body))))
        head = request_head(method, path, host, given)
        writer.write(head + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    return parse_response(raw)
