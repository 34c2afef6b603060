"""Malformed requests and clients hanging up mid-download are the client's
doing: at most one line each in the server's log, at debug level, never a
traceback; at the default level (info) a flood of them leaves no line."""

from __future__ import annotations

import os
import time

import pytest

from tests.support.rawhttp import RawRequest, exchange
from tests.support.registry_http import http_request, push_blob

BIG = 32 << 20


def _hang_up_mid_body(host: str, port: int, path: str, reset: bool) -> None:
    """GET a big blob, read part of its body, then close (FIN) or reset (RST)."""
    get = RawRequest((host, port), "GET", path, close=False, host_header=host, timeout=10)
    received = 0
    while received < (1 << 20):
        data = get.sock.recv(65536)
        assert data, "the server ended the body early"
        received += len(data)
    if reset:
        get.reset()
    else:
        get.close()


def _bad_requests(host: str) -> list[bytes]:
    return [
        b"GARBAGE\r\n\r\n",                                               # not a request line
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(64),      # TLS to a plain port
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",   # header too long
        b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",        # request line too long
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",   # bad Content-Length
        b"POST /v2/log/bad/blobs/uploads/ HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",                      # bad chunk size
        b"GET /v2/ HTTP/9.9\r\nHost: x\r\n\r\n",                          # bad version
    ]


def _settle(server, mark: int, quiet_for: float = 1.0, limit: float = 10.0) -> str:
    """The log written after mark, once it has stopped growing."""
    deadline = time.monotonic() + limit
    last = None
    while time.monotonic() < deadline:
        text = server.log()[mark:]
        if text == last:
            return text
        last = text
        time.sleep(quiet_for)
    return last or ""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("level", ["debug", "info"])
def test_bad_requests_and_hang_ups_log_one_line_each_without_traceback(start_dockyard, level):
    server = start_dockyard(extra_args=["--log-level", level])
    host, port = server.host.split(":")
    port = int(port)
    digest = push_blob(server.url, "log/blob", os.urandom(BIG))
    path = f"/v2/log/blob/blobs/{digest}"
    assert http_request("GET", f"{server.url}/v2/").status == 200
    mark = len(server.log())

    bad = _bad_requests(host)
    for payload in bad:
        answer = exchange((host, port), payload)
        assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n", 1)[0], answer[:100]
    hang_ups = 4
    for n in range(hang_ups):
        _hang_up_mid_body(host, port, path, reset=bool(n % 2))
    # the server is fine afterwards
    assert http_request("GET", f"{server.url}/v2/").status == 200

    text = _settle(server, mark)
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert not any(" ERROR " in line or " WARNING " in line for line in lines), text
    if level == "info":
        assert lines == [], text
    else:
        assert len(lines) <= len(bad) + hang_ups, text


@pytest.mark.timeout(120)
def test_flood_of_bad_requests_leaves_no_line_at_info(start_dockyard):
    server = start_dockyard()
    host, port = server.host.split(":")
    mark = len(server.log())
    bad = _bad_requests(host)
    for n in range(200):
        exchange((host, port), bad[n % len(bad)])
    assert http_request("GET", f"{server.url}/v2/").status == 200
    text = _settle(server, mark)
    assert text.strip() == "", text[:3000]
