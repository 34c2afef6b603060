"""Slow and stalled clients cost the registry a socket, never its service:
readers that never read do not stop other downloads, a body that makes no
progress is cut after http.send_timeout, and a request body that stops
arriving is answered and closed after http.body_timeout, its upload keeping
what came.

Raw sockets play the bad clients; everything is on loopback, bounded in
count and time.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time

import pytest

from registry.app import create_app
from registry.settings import HttpSettings, settings_for_tests
from storage.filesystem import FilesystemDriver
from tests.support.rawhttp import RawRequest, answer_started, close_with_reset, read_until_closed
from tests.support.registry_http import http_request, push_blob

BIG = 32 << 20
STALLED = 300
# a tiny receive window: the server's send buffer fills at once and stays full
RCVBUF = 4096


def _stalled_get(host: str, port: int, path: str) -> socket.socket:
    """A GET whose reader never reads, behind a tiny receive window."""
    return RawRequest((host, port), "GET", path, close=False, rcvbuf=RCVBUF, timeout=10).sock


_answered = answer_started      # the server began its answer (peeked: nothing is consumed)
_reset = close_with_reset


def _drain(sock: socket.socket, limit: float) -> tuple[int, float]:
    """Read until the server ends the connection: (bytes, seconds)."""
    sock.settimeout(limit)
    started, total = time.monotonic(), 0
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            total += len(data)
            assert time.monotonic() - started < limit, "the connection was never cut"
    except ConnectionResetError:
        pass
    except socket.timeout:
        pytest.fail(f"the connection stayed open (read {total} bytes)")
    return total, time.monotonic() - started


def _timed_get(url: str, expected: bytes, limit: float) -> float:
    started = time.monotonic()
    try:
        result = http_request("GET", url, timeout=limit + 5)
    except OSError as exc:
        pytest.fail(f"GET {url} failed after {time.monotonic() - started:.1f}s: {exc}")
    elapsed = time.monotonic() - started
    assert result.status == 200, (url, result.status)
    assert hashlib.sha256(result.body).digest() == hashlib.sha256(expected).digest()
    assert elapsed < limit, f"GET {url} took {elapsed:.1f}s"
    return elapsed


@pytest.mark.timeout(180)
def test_stalled_readers_do_not_stop_blob_downloads(start_dockyard):
    """Before: 64 readers that never read held all 64 file-send threads (up
    to 120 s each) and every other blob GET timed out."""
    server = start_dockyard()
    host, port = server.host.split(":")
    port = int(port)
    big, small = os.urandom(BIG), os.urandom(2048)
    big_digest = push_blob(server.url, "slow/readers", big)
    small_digest = push_blob(server.url, "slow/readers", small)
    path = f"/v2/slow/readers/blobs/{big_digest}"

    stalled: list[socket.socket] = []
    try:
        for _ in range(STALLED):
            stalled.append(_stalled_get(host, port, path))
        deadline = time.monotonic() + 20
        while not all(_answered(s) for s in stalled) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)   # let every send reach its full socket

        for _ in range(3):
            _timed_get(f"{server.url}/v2/slow/readers/blobs/{small_digest}", small, 5)
        _timed_get(f"{server.url}/v2/slow/readers/blobs/{big_digest}", big, 10)
        started = time.monotonic()
        pushed = os.urandom(4 << 20)
        pushed_digest = push_blob(server.url, "slow/pusher", pushed)
        assert time.monotonic() - started < 5
        _timed_get(f"{server.url}/v2/slow/pusher/blobs/{pushed_digest}", pushed, 5)
        # every stalled request was answered too, and its connection is still open
        assert sum(map(_answered, stalled)) == STALLED
    finally:
        for sock in stalled:
            _reset(sock)
    # and the server is still whole once they are gone
    _timed_get(f"{server.url}/v2/slow/readers/blobs/{small_digest}", small, 5)
    assert "Traceback" not in server.log()


@pytest.mark.timeout(120)
def test_stalled_reader_is_cut_after_send_timeout(start_dockyard):
    """Before: a reader that read nothing held its connection (and a thread)
    for 120 s; now the body is cut after http.send_timeout seconds."""
    server = start_dockyard(env={"DOCKYARD_HTTP_SEND_TIMEOUT": "1"})
    host, port = server.host.split(":")
    big = os.urandom(BIG)
    digest = push_blob(server.url, "slow/cut", big)

    sock = _stalled_get(host, int(port), f"/v2/slow/cut/blobs/{digest}")
    try:
        time.sleep(4)                       # the limit is 1 s: cut by now
        received, seconds = _drain(sock, 10)
    finally:
        sock.close()
    assert received < BIG // 2, f"{received} of {BIG} bytes: the body went on"
    assert seconds < 5
    assert "cut: no progress for 1s" in server.log()
    # a reader that reads is not cut
    _timed_get(f"{server.url}/v2/slow/cut/blobs/{digest}", big, 10)


class _NoLocalPath(FilesystemDriver):
    """A filesystem driver that hands out no local files: blob bodies go
    through aiohttp's writer, as on object stores."""

    async def open_local(self, path: str):
        return None


@pytest.mark.timeout(60)
async def test_streamed_blob_body_is_cut_after_send_timeout(aiohttp_server, tmp_path):
    settings = settings_for_tests(tmp_path / "storage", http=HttpSettings(send_timeout=1))
    app = create_app(settings, driver=_NoLocalPath(str(tmp_path / "storage")))
    server = await aiohttp_server(app)
    loop = asyncio.get_running_loop()
    big = os.urandom(BIG)
    base = f"http://{server.host}:{server.port}"
    digest = await loop.run_in_executor(None, push_blob, base, "slow/stream", big)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (server.host, server.port))
        await loop.sock_sendall(sock, f"GET /v2/slow/stream/blobs/{digest} HTTP/1.1\r\n"
                                      f"Host: {server.host}\r\n\r\n".encode())
        await asyncio.sleep(4)
        received = 0
        async with asyncio.timeout(10):
            try:
                while data := await loop.sock_recv(sock, 1 << 20):
                    received += len(data)
            except ConnectionResetError:
                pass
    finally:
        sock.close()
    assert received < BIG // 2, f"{received} of {BIG} bytes: the body went on"


@pytest.mark.timeout(60)
def test_stalled_upload_body_is_closed_and_keeps_what_came(start_dockyard):
    """Before: a PATCH announcing 10^12 bytes that sent three held its
    connection open for as long as the client liked."""
    server = start_dockyard(env={"DOCKYARD_HTTP_BODY_TIMEOUT": "1"})
    started = http_request("POST", f"{server.url}/v2/slow/body/blobs/uploads/", b"")
    assert started.status == 202
    location = started.headers["Location"]

    sock = RawRequest(server.host, "PATCH", location, {"Content-Type": "application/octet-stream",
                                                        "Content-Length": str(10 ** 12)},
                      close=False, body=b"abc").sock
    try:
        t0 = time.monotonic()
        try:
            answer = read_until_closed(sock)
        except socket.timeout:
            pytest.fail("the connection stayed open")
        closed_after = time.monotonic() - t0
    finally:
        sock.close()
    assert closed_after < 5, closed_after
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"BLOB_UPLOAD_INVALID" in answer

    status = http_request("GET", f"{server.url}{location}")
    assert status.status == 204
    assert status.headers["Range"] == "0-2"
    # the session goes on from there
    rest = http_request("PATCH", f"{server.url}{location}", b"def",
                        {"Content-Type": "application/octet-stream", "Content-Range": "3-5"})
    assert rest.status == 202 and rest.headers["Range"] == "0-5"


@pytest.mark.timeout(60)
def test_stalled_manifest_body_is_closed(start_dockyard):
    server = start_dockyard(env={"DOCKYARD_HTTP_BODY_TIMEOUT": "1"})
    sock = RawRequest(server.host, "PUT", "/v2/slow/manifest/manifests/v1",
                      {"Content-Type": "application/vnd.oci.image.manifest.v1+json", "Content-Length": "4000"},
                      close=False, body=b'{"schemaVersion"').sock
    try:
        t0 = time.monotonic()
        answer = b""
        while data := sock.recv(65536):
            answer += data
        closed_after = time.monotonic() - t0
    finally:
        sock.close()
    assert closed_after < 5, closed_after
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
