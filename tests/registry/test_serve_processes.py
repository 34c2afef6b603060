"""`dockyard serve` as real processes: several workers sharing one port and
one storage root, a crash in the middle of an upload, clean shutdown.

Which worker owns a connection is read from /proc (the accepted socket's
inode among the worker's file descriptors), so the test can send each chunk
of one upload to a different process on purpose.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.support.launch import launch_dockyard
from tests.support.content import sha256_digest as digest_of

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")


def child_pids(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.add(int(entry))
    return out


def _server_socket_inode(server_port: int, client_port: int) -> int | None:
    want_local = f"0100007F:{server_port:04X}"
    want_remote = f"0100007F:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == want_local and fields[2] == want_remote and fields[9] != "0":
            return int(fields[9])
    return None


def owner_of(conn: http.client.HTTPConnection, server_port: int, workers: set[int]) -> int | None:
    """The worker pid holding the server end of conn (after a request went through)."""
    client_port = conn.sock.getsockname()[1]
    inode = _server_socket_inode(server_port, client_port)
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in workers:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None


def connection_to(worker: int, port: int, workers: set[int], attempts: int = 60) -> http.client.HTTPConnection:
    """A keep-alive connection served by `worker` (new connections until one lands there)."""
    for _ in range(attempts):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/v2/")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        if owner_of(conn, port, workers) == worker:
            return conn
        conn.close()
    raise AssertionError(f"no connection reached worker {worker} in {attempts} attempts")


def request(conn, method, path, body=b"", headers=None) -> http.client.HTTPResponse:
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    resp.body = resp.read()
    return resp


def test_chunked_upload_across_worker_processes(tmp_path):
    server = launch_dockyard(tmp_path / "storage", workers=2, log_path=tmp_path / "serve.log")
    try:
        port = int(server.host.rsplit(":", 1)[1])
        deadline = time.monotonic() + 20
        workers = child_pids(server.server.pid)
        while len(workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            workers = child_pids(server.server.pid)
        assert len(workers) == 2, workers
        # /v2/ answers as soon as one worker listens; the line follows once all do.
        while f"listening on http://127.0.0.1:{port}" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)

        order = sorted(workers) * 2                 # w1, w2, w1, w2
        data = os.urandom(4 * 256 * 1024 + 123)
        pieces = [data[i * 262144:(i + 1) * 262144] for i in range(3)] + [data[3 * 262144:]]

        conn = connection_to(order[0], port, workers)
        resp = request(conn, "POST", "/v2/multi/proc/blobs/uploads/")
        assert resp.status == 202
        location = resp.getheader("Location")
        conn.close()

        served_by = []
        offset = 0
        for worker, piece in zip(order, pieces):
            conn = connection_to(worker, port, workers)
            resp = request(conn, "PATCH", location, piece, {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(piece) - 1}"})
            assert resp.status == 202, resp.body
            served_by.append(owner_of(conn, port, workers))
            offset += len(piece)
            assert resp.getheader("Range") == f"0-{offset - 1}"
            location = resp.getheader("Location")
            conn.close()
        assert served_by == order                   # every chunk went where we sent it

        conn = connection_to(order[1], port, workers)
        resp = request(conn, "PUT", f"{location}?digest={digest_of(data)}")
        assert resp.status == 201, resp.body
        conn.close()
        for worker in sorted(workers):              # every worker serves the result
            conn = connection_to(worker, port, workers)
            resp = request(conn, "GET", f"/v2/multi/proc/blobs/{digest_of(data)}")
            assert resp.status == 200
            assert resp.body == data
            conn.close()
    finally:
        server.stop()


def test_sigkill_mid_upload_then_restart_and_retry(tmp_path):
    storage = tmp_path / "storage"
    data = os.urandom(3 * 1024 * 1024)
    digest = digest_of(data)
    first = 1024 * 1024

    server = launch_dockyard(storage, workers=2, log_path=tmp_path / "serve1.log")
    port = int(server.host.rsplit(":", 1)[1])
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        resp = request(conn, "POST", "/v2/crash/test/blobs/uploads/")
        location = resp.getheader("Location")
        resp = request(conn, "PATCH", location, data[:first],
                       {"Content-Type": "application/octet-stream", "Content-Range": f"0-{first - 1}"})
        assert resp.status == 202
        conn.close()

        # A second chunk announced in full but only half sent when the server dies.
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        rest = data[first:]
        raw.sendall((f"PATCH {location} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Content-Type: application/octet-stream\r\n"
                     f"Content-Range: {first}-{len(data) - 1}\r\n"
                     f"Content-Length: {len(rest)}\r\n\r\n").encode())
        raw.sendall(rest[:len(rest) // 2])
        time.sleep(1.0)                                # let the worker write what it got
        os.killpg(server.server.pid, signal.SIGKILL)   # supervisor and workers, no cleanup
        server.server.proc.wait(10)
        raw.close()
    finally:
        server.stop()

    server = launch_dockyard(storage, workers=2, log_path=tmp_path / "serve2.log")
    port = int(server.host.rsplit(":", 1)[1])
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        # Nothing partial is served as the blob.
        for method in ("GET", "HEAD"):
            resp = request(conn, method, f"/v2/crash/test/blobs/{digest}")
            assert resp.status == 404, method
        # The session survived in storage; its offset is a resumable prefix.
        resp = request(conn, "GET", location)
        assert resp.status == 204
        offset = int(resp.getheader("Range").split("-")[1]) + 1
        assert first <= offset <= len(data)
        # A client retrying from the reported offset completes the blob.
        if offset < len(data):
            resp = request(conn, "PATCH", location, data[offset:], {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{len(data) - 1}"})
            assert resp.status == 202, resp.body
        resp = request(conn, "PUT", f"{location}?digest={digest}")
        assert resp.status == 201, resp.body
        resp = request(conn, "GET", f"/v2/crash/test/blobs/{digest}")
        assert resp.status == 200
        assert resp.body == data
    finally:
        server.stop()


def test_sigterm_stops_supervisor_and_workers(tmp_path):
    server = launch_dockyard(tmp_path / "storage", workers=2, log_path=tmp_path / "serve.log")
    try:
        deadline = time.monotonic() + 20
        workers = child_pids(server.server.pid)
        while len(workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            workers = child_pids(server.server.pid)
        assert len(workers) == 2
        os.kill(server.server.pid, signal.SIGTERM)     # the supervisor only
        assert server.server.proc.wait(20) == 0
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() and "Z" not in
                  Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                  for pid in workers if Path(f"/proc/{pid}").exists()):
            assert time.monotonic() < deadline, "workers outlived the supervisor"
            time.sleep(0.1)
    finally:
        server.stop()


def test_worker_killed_is_replaced(tmp_path):
    server = launch_dockyard(tmp_path / "storage", workers=2, log_path=tmp_path / "serve.log")
    try:
        port = int(server.host.rsplit(":", 1)[1])
        deadline = time.monotonic() + 20
        while f"listening on http://127.0.0.1:{port}" not in server.log():  # all workers up
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        workers = child_pids(server.server.pid)
        assert len(workers) == 2
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = child_pids(server.server.pid)
            if len(now) == 2 and victim not in now:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the killed worker was not replaced")
        for _ in range(20):   # every connection is answered, whichever worker takes it
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            assert request(conn, "GET", "/v2/").status == 200
            conn.close()
    finally:
        server.stop()
