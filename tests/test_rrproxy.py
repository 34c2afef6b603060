"""The round-robin proxy (tests.support.rrproxy) against two small HTTP/1.1
servers of its own: each request to the next backend, on one client
connection; bodies of every framing (RFC 9112 section 6: Content-Length,
chunked, to the end of the connection, none for HEAD and 204) through
whole; Expect: 100-continue; a backend that is down."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support.launch import free_port
from tests.support.rrproxy import MAX_HEAD, RoundRobinProxy


class _Backend(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            out = b""
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                out += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
            return out
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _answer(self) -> None:
        body = self._body()
        self.server.peers.add(self.client_address)
        report = json.dumps({"backend": self.server.name, "method": self.command, "path": self.path,
                             "sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}).encode()
        if self.path == "/no-content":
            self.send_response(204)
            self.end_headers()
        elif self.path.startswith("/chunked/"):
            size = int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("X-Backend", self.server.name)
            self.end_headers()
            data = hashlib.sha256(b"seed").digest() * (size // 32)
            for at in range(0, len(data), 100_000):
                piece = data[at:at + 100_000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/until-close":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(report)
            self.close_connection = True
        else:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(report)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(report)

    do_GET = do_PUT = do_POST = do_PATCH = do_HEAD = do_DELETE = _answer


@pytest.fixture
def backends():
    servers = []
    for name in ("a", "b"):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
        server.name, server.peers, server.daemon_threads = name, set(), True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy(backends):
    with RoundRobinProxy([f"127.0.0.1:{s.server_address[1]}" for s in backends]) as running:
        yield running


def _exchange(conn: http.client.HTTPConnection, method: str, path: str, body=None, headers=None):
    conn.request(method, path, body=body, headers=headers or {}, encode_chunked=not isinstance(body, bytes)
                 and body is not None)
    response = conn.getresponse()
    return response, response.read()


def test_each_request_on_one_connection_goes_to_the_next_backend(proxy, backends):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    seen = []
    for n in range(6):
        response, body = _exchange(conn, "GET", f"/v2/{n}")
        assert response.status == 200
        seen.append(json.loads(body)["backend"])
    conn.close()
    assert seen == ["a", "b"] * 3
    # the proxy kept one connection to each backend for all three requests
    assert [len(s.peers) for s in backends] == [1, 1]
    assert proxy.served == [3, 3]


def test_bodies_of_every_framing_go_through_whole(proxy):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    data = os.urandom(5 << 20)
    response, body = _exchange(conn, "PUT", "/sized", data, {"Content-Length": str(len(data))})
    assert json.loads(body)["sha256"] == hashlib.sha256(data).hexdigest()

    pieces = [data[at:at + 700_001] for at in range(0, len(data), 700_001)]
    response, body = _exchange(conn, "PATCH", "/chunked-request", iter(pieces))
    assert json.loads(body) == {"backend": "b", "method": "PATCH", "path": "/chunked-request",
                                "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    response, body = _exchange(conn, "GET", "/chunked/3000000")
    assert len(body) == 3_000_000 // 32 * 32 and body == hashlib.sha256(b"seed").digest() * (3_000_000 // 32)

    response, body = _exchange(conn, "HEAD", "/sized")
    assert response.status == 200 and body == b"" and int(response.headers["Content-Length"]) > 0
    response, body = _exchange(conn, "DELETE", "/no-content")
    assert response.status == 204 and body == b""
    response, body = _exchange(conn, "GET", "/after-no-body")         # the connection still works
    assert json.loads(body)["path"] == "/after-no-body"

    response, body = _exchange(conn, "GET", "/until-close")
    assert json.loads(body)["path"] == "/until-close"
    assert response.will_close
    conn.close()


def test_expect_100_continue_is_answered_by_the_proxy(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"PUT /expecting HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"hello")
        answer = b""
        while not answer.endswith(b"}"):
            answer += sock.recv(65536)
    assert b"HTTP/1.1 200" in answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["sha256"] == hashlib.sha256(b"hello").hexdigest()


def test_a_backend_that_is_down_gets_the_client_a_502():
    with RoundRobinProxy([f"127.0.0.1:{free_port()}"]) as running:
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        response, body = _exchange(conn, "GET", "/v2/")
        assert response.status == 502 and b"unreachable" in body
        conn.close()


def test_a_head_over_the_limit_ends_the_connection(proxy, backends):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        try:
            sock.sendall(b"GET / HTTP/1.1\r\nX-Long: " + b"x" * (MAX_HEAD + 1024) + b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass
    assert proxy.served == [0, 0] and all(not s.peers for s in backends)
