"""`dockyard serve` over HTTPS: a throwaway CA's certificate, a renewal
picked up without a restart, client certificates, and the one-line errors
and warning of a registry that is not set up to be exposed."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request

import pytest
from cryptography import x509

from registry.cli import exposure_warning
from registry.settings import AuthSettings, HttpSettings, Settings, TlsSettings
from tests.support import REPO_ROOT
from tests.support.content import sha256_digest
from tests.support.launch import ServerProcess, dockyard_command, free_port
from tests.support.tls import CertificateAuthority


def https_ready(port: int, context: ssl.SSLContext):
    def check() -> bool:
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/v2/", context=context, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False
    return check


def serve_tls(tmp_path, ca, files, *, env=None, client_ca=None, reload_interval=1) -> tuple[ServerProcess, int]:
    port = free_port()
    argv = [*dockyard_command(), "serve", "--host", "127.0.0.1", "--port", str(port),
            "--storage", str(tmp_path / "storage"), "--tls-cert", str(files.cert), "--tls-key", str(files.key)]
    child_env = {"PYTHONPATH": str(REPO_ROOT), "DOCKYARD_TLS_RELOAD_INTERVAL": str(reload_interval), **(env or {})}
    if client_ca:
        child_env["DOCKYARD_TLS_CLIENT_CA"] = str(client_ca)
    context = files.client_context()
    if client_ca:
        client = ca.issue(["client.test"], stem="client", client=True)
        context.load_cert_chain(str(client.cert), str(client.key))
    server = ServerProcess(argv, ready_check=https_ready(port, context), env=child_env, cwd=REPO_ROOT,
                           name="dockyard-tls")
    server.start(30)
    return server, port


def served_serial(port: int, context: ssl.SSLContext) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def file_serial(path) -> int:
    return x509.load_pem_x509_certificate(open(path, "rb").read()).serial_number


def test_push_and_pull_over_https(tmp_path):
    ca = CertificateAuthority(tmp_path / "ca")
    files = ca.issue()
    server, port = serve_tls(tmp_path, ca, files)
    try:
        assert "listening on https://127.0.0.1:" in server.log()
        context = files.client_context()
        data = os.urandom(3 << 20)
        digest = sha256_digest(data)
        url = f"https://127.0.0.1:{port}/v2/tls/app/blobs/uploads/?digest={digest}"
        req = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(req, context=context, timeout=10) as resp:
            assert resp.status == 201
        # a real client: curl trusting only the throwaway CA
        out = subprocess.run(["curl", "-sS", "--cacert", str(files.ca_cert),
                              f"https://127.0.0.1:{port}/v2/tls/app/blobs/{digest}"],
                             capture_output=True, timeout=30, check=True).stdout
        assert out == data
        # plain HTTP on the TLS port gets no answer a client could take for one
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=5)
    finally:
        server.stop()


def test_renewed_certificate_is_served_without_a_restart(tmp_path):
    ca = CertificateAuthority(tmp_path / "ca")
    files = ca.issue()
    server, port = serve_tls(tmp_path, ca, files, reload_interval=1)
    try:
        context = files.client_context()
        first = served_serial(port, context)
        assert first == file_serial(files.cert)
        pid = server.pid

        # a half-written renewal is refused and the old certificate kept
        files.cert.write_bytes(b"-----BEGIN CERTIFICATE-----\ntruncated")
        time.sleep(2.5)
        assert served_serial(port, context) == first

        renewed = ca.issue(stem="renewed")
        shutil.copy(renewed.key, files.key)
        shutil.copy(renewed.cert, files.cert)
        want = file_serial(files.cert)
        deadline = time.monotonic() + 10
        while served_serial(port, context) != want:
            assert time.monotonic() < deadline, "the renewed certificate was never served"
            time.sleep(0.2)
        assert server.pid == pid and server.running()
        assert "renewed certificate not loaded" in server.log()
    finally:
        server.stop()


def test_client_certificates_are_required_with_client_ca(tmp_path):
    ca = CertificateAuthority(tmp_path / "ca")
    files = ca.issue()
    server, port = serve_tls(tmp_path, ca, files, client_ca=files.ca_cert)
    try:
        without = files.client_context()
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/v2/", context=without, timeout=5) as r:
                r.read()
        other_ca = CertificateAuthority(tmp_path / "other")
        stranger = other_ca.issue(["stranger.test"], stem="stranger", client=True)
        wrong = files.client_context()
        wrong.load_cert_chain(str(stranger.cert), str(stranger.key))
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/v2/", context=wrong, timeout=5) as r:
                r.read()
    finally:
        server.stop()


@pytest.mark.parametrize("args, message", [
    (["--tls-cert", "{cert}"], "tls.cert and tls.key must be set together"),
    (["--tls-cert", "{cert}", "--tls-key", "{ca}"], "not a PEM certificate chain and its matching private key"),
    (["--tls-cert", "{missing}", "--tls-key", "{key}"], "No such file"),
])
def test_unusable_tls_settings_are_one_line_and_exit_2(tmp_path, args, message):
    files = CertificateAuthority(tmp_path / "ca").issue()
    names = {"cert": files.cert, "key": files.key, "ca": files.ca_cert, "missing": tmp_path / "absent.crt"}
    argv = [*dockyard_command(), "serve", "--port", "0", "--storage", str(tmp_path / "s"),
            *[a.format(**names) for a in args]]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr


def negotiated_suite(port: int, context: ssl.SSLContext) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.cipher()[0]


@pytest.mark.parametrize("suites, expected", [
    (None, "TLS_AES_128_GCM_SHA256"),                # the default: the server's order, AES-128 first
    ("", "TLS_AES_256_GCM_SHA384"),                  # OpenSSL's defaults: the client's order
    ("TLS_CHACHA20_POLY1305_SHA256", "TLS_CHACHA20_POLY1305_SHA256"),
], ids=["default", "openssl-order", "chacha-only"])
def test_tls13_cipher_suites_are_the_servers_choice(tmp_path, suites, expected):
    """An OpenSSL client (Python's, and curl, which lists AES-256-GCM first)
    gets the suite tls.ciphersuites puts first (RFC 8446 4.1.1: the server
    selects), as Go's crypto/tls would choose it."""
    ca = CertificateAuthority(tmp_path / "ca")
    files = ca.issue()
    env = {} if suites is None else {"DOCKYARD_TLS_CIPHERSUITES": suites}
    server, port = serve_tls(tmp_path, ca, files, env=env)
    try:
        client = files.client_context()
        assert [c["name"] for c in client.get_ciphers()][0] == "TLS_AES_256_GCM_SHA384"   # the client's first
        assert negotiated_suite(port, client) == expected
        curl = subprocess.run(["curl", "-sv", "--http1.1", "--cacert", str(files.ca_cert), "-o", "/dev/null",
                               f"https://127.0.0.1:{port}/v2/"], capture_output=True, text=True, timeout=30)
        assert f"TLSv1.3 / {expected}" in curl.stderr, curl.stderr[-800:]
    finally:
        server.stop()


def test_an_unknown_cipher_suite_is_one_line_and_exit_2(tmp_path):
    files = CertificateAuthority(tmp_path / "ca").issue()
    argv = [*dockyard_command(), "serve", "--port", "0", "--storage", str(tmp_path / "s"),
            "--tls-cert", str(files.cert), "--tls-key", str(files.key)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT),
                               "DOCKYARD_TLS_CIPHERSUITES": "TLS_AES_128_GCM_SHA256:ECDHE-RSA-AES128-GCM-SHA256"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "tls.ciphersuites" in lines[0] and "ECDHE-RSA-AES128-GCM-SHA256" in lines[0]


def test_a_public_address_without_tls_or_auth_warns():
    exposed = Settings(http=HttpSettings(host="0.0.0.0"))
    assert "plain HTTP without authentication on 0.0.0.0" in exposure_warning(exposed)
    assert exposure_warning(Settings(http=HttpSettings(host="127.0.0.1"))) is None
    assert exposure_warning(Settings(http=HttpSettings(host="::1"))) is None
    public, tls = HttpSettings(host="0.0.0.0"), TlsSettings(cert="c.pem", key="k.pem")
    token = AuthSettings(mode="token")
    assert "without authentication on 0.0.0.0: anyone who can reach the port may pull, push and delete" \
        in exposure_warning(Settings(http=public, tls=tls))
    assert "passwords and tokens cross the network unencrypted" in exposure_warning(Settings(http=public, auth=token))
    assert exposure_warning(Settings(http=public, tls=tls, auth=token)) is None
