"""Rough edges of the command line: `dockyard --version`, and a --ca-file
that cannot be loaded named in the one-line error (it was a bare
"[Errno 2] No such file or directory")."""

from __future__ import annotations

import http.server
import ssl
import subprocess
import sys
import threading

import pytest

from puller.client.transport import Transport, TransportOptions
from puller.errors import TransportError
from tests.support import REPO_ROOT
from tests.support.tls import server_files


def dockyard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "puller", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=60, stdin=subprocess.DEVNULL,
                          env={"PATH": "/usr/bin:/bin", "DOCKER_CONFIG": "/nonexistent-dockyard-config",
                               "PYTHONPATH": str(REPO_ROOT)})


def test_version():
    from importlib import metadata
    proc = dockyard("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"dockyard {metadata.version('dockyard')}"


@pytest.fixture
def tls_server(tmp_path):
    """HTTPS on loopback answering 200 to everything: enough for the client to build its TLS context."""
    files = server_files(tmp_path / "tls")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = files.server_context().wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", files
    server.shutdown()
    server.server_close()


def test_missing_ca_file_is_named(tls_server, tmp_path):
    host, _ = tls_server
    missing = tmp_path / "nowhere" / "ca.pem"
    proc = dockyard("pull", "--store", str(tmp_path / "store"), "--ca-file", str(missing), f"{host}/x/y:v1")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"dockyard: error: cannot load CA file {missing}: No such file or directory"]


def test_ca_file_that_is_not_pem_is_named(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(TransportError, match=f"^cannot load CA file {bad}: "):
        Transport(TransportOptions(ca_file=str(bad))).ssl_context()
    good = server_files(tmp_path / "tls").ca_cert
    assert isinstance(Transport(TransportOptions(ca_file=str(good))).ssl_context(), ssl.SSLContext)
