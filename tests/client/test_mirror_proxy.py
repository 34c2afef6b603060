"""The connected side of an air gap is usually behind a proxy: the client
honours HTTPS_PROXY and NO_PROXY as Docker and skopeo do (a CONNECT tunnel,
RFC 9110 section 9.3.6; loopback never proxied), here for `mirror export`
from a TLS Dockyard reached under a host name, through the CONNECT proxy of
tests.support.connect_proxy.
"""

from __future__ import annotations

import os
import ssl
import urllib.request
import uuid
from types import SimpleNamespace

import pytest

from tests.client.test_mirror_bundle import push_image, unique
from tests.support import REPO_ROOT
from tests.support.connect_proxy import ConnectProxy
from tests.support.content import random_tar_layer, tar_layer
from tests.support.launch import ServerProcess, dockyard_command, free_port
from tests.support.peers import require_root, run
from tests.support.secure_registry import HostsEntry
from tests.support.tls import server_files

pytestmark = pytest.mark.interop


def dockyard_env(*args: str, env: dict, check: bool = True):
    base = {"PYTHONPATH": str(REPO_ROOT), "DOCKER_CONFIG": "/nonexistent-dockyard-config",
            "HTTPS_PROXY": "", "https_proxy": "", "NO_PROXY": "", "no_proxy": ""}
    return run([*dockyard_command(), *args], env={**base, **env}, check=check, timeout=120)


def _ready(port: int, context: ssl.SSLContext) -> bool:
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/v2/", context=context, timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture
def tls_registry(tmp_path):
    """Dockyard over HTTPS as `mirror-XXXX.test:PORT` (an /etc/hosts line for 127.0.0.1, removed after)."""
    require_root()
    name = f"mirror-{uuid.uuid4().hex[:8]}.test"
    files = server_files(tmp_path / "tls", names=(name, "127.0.0.1"))
    port = free_port()
    entry = HostsEntry(name, "127.0.0.1").add()
    server = ServerProcess([*dockyard_command(), "serve", "--host", "127.0.0.1", "--port", str(port),
                            "--storage", str(tmp_path / "storage"), "--tls-cert", str(files.cert),
                            "--tls-key", str(files.key)],
                           ready_check=lambda: _ready(port, files.client_context()),
                           env={"PYTHONPATH": str(REPO_ROOT)}, cwd=REPO_ROOT, name="dockyard-tls")
    try:
        server.start()
        yield SimpleNamespace(name=name, host=f"{name}:{port}", ca=str(files.ca_cert))
    finally:
        server.stop()
        entry.remove()


def test_export_goes_through_https_proxy_unless_no_proxy_says_otherwise(tls_registry, dockyard_registry,
                                                                         tmp_path):
    repo = unique("mirror/proxied")
    push_image(dockyard_registry.url, repo, [tar_layer({"p": b"proxied"}), random_tar_layer(300_000)], "v1")
    ref = f"{tls_registry.host}/{repo}:v1"
    dockyard_env("copy", "-q", "--ca-file", tls_registry.ca, f"{dockyard_registry.host}/{repo}:v1", ref, env={})
    export = ["mirror", "export", "-q", "--ca-file", tls_registry.ca, "--images", ref, "--output"]

    with ConnectProxy(hosts={tls_registry.name: "127.0.0.1"}) as proxy:
        dockyard_env(*export, str(tmp_path / "a.tar"), env={"HTTPS_PROXY": proxy.url})
        assert proxy.tunnels and set(proxy.tunnels) == {tls_registry.host}
        assert proxy.bytes_relayed > 300_000                   # the blobs came through the tunnel
        # lower case as well; NO_PROXY by name, by domain suffix, by host:port: straight to the registry
        for no_proxy in (tls_registry.name, ".test", f"other.example,{tls_registry.host}", "*"):
            seen = len(proxy.tunnels)
            dockyard_env(*export, str(tmp_path / "b.tar"), env={"https_proxy": proxy.url, "NO_PROXY": no_proxy})
            assert len(proxy.tunnels) == seen, no_proxy
        # a NO_PROXY entry for another port does not apply
        dockyard_env(*export, str(tmp_path / "c.tar"),
                     env={"HTTPS_PROXY": proxy.url, "NO_PROXY": f"{tls_registry.name}:1"})
        assert len(proxy.tunnels) > seen

    # a loopback registry is never proxied, even with a proxy that is not there
    dead = f"http://127.0.0.1:{free_port()}"
    dockyard_env("mirror", "export", "-q", "--images", f"{dockyard_registry.host}/{repo}:v1", "--output",
                 str(tmp_path / "d.tar"), env={"HTTPS_PROXY": dead})
    # and a proxy that cannot be reached is one line naming the registry, exit 1
    failed = dockyard_env(*export, str(tmp_path / "e.tar"), env={"HTTPS_PROXY": dead}, check=False)
    assert failed.returncode == 1
    assert failed.stderr.startswith(f"dockyard: error: ") and tls_registry.name in failed.stderr
    assert not (tmp_path / "e.tar").exists()


def test_proxy_credentials_from_the_url(tls_registry, dockyard_registry, tmp_path):
    repo = unique("mirror/proxyauth")
    push_image(dockyard_registry.url, repo, [tar_layer({"a": b"auth"})], "v1")
    ref = f"{tls_registry.host}/{repo}:v1"
    dockyard_env("copy", "-q", "--ca-file", tls_registry.ca, f"{dockyard_registry.host}/{repo}:v1", ref, env={})
    export = ["mirror", "export", "-q", "--ca-file", tls_registry.ca, "--images", ref, "--output",
              str(tmp_path / "b.tar")]
    with ConnectProxy(require_auth="gate:s3cr%t") as proxy:
        authed = proxy.url.replace("http://", "http://gate:s3cr%25t@")
        dockyard_env(*export, env={"HTTPS_PROXY": authed})
        assert proxy.tunnels
        failed = dockyard_env(*export, env={"HTTPS_PROXY": proxy.url}, check=False)
        assert failed.returncode == 1 and "407" in failed.stderr and len(failed.stderr.splitlines()) == 1
    assert os.path.getsize(tmp_path / "b.tar") > 0


def test_plain_http_registry_goes_through_http_proxy(start_dockyard, dockyard_registry, tmp_path):
    require_root()
    registry = start_dockyard()
    name = f"mirror-{uuid.uuid4().hex[:8]}.test"
    port = registry.host.rsplit(":", 1)[1]
    entry = HostsEntry(name, "127.0.0.1").add()
    try:
        repo = unique("mirror/plainproxy")
        push_image(registry.url, repo, [tar_layer({"p": b"plain"}), random_tar_layer(200_000)], "v1")
        export = ["mirror", "export", "-q", "--plain-http", "--images", f"{name}:{port}/{repo}:v1", "--output"]
        with ConnectProxy(require_auth="gate:pw") as proxy:
            authed = proxy.url.replace("http://", "http://gate:pw@")
            dockyard_env(*export, str(tmp_path / "a.tar"), env={"HTTP_PROXY": authed, "HTTPS_PROXY": ""})
            assert proxy.forwarded and not proxy.tunnels
            assert all(line.split()[1].startswith(f"http://{name}:{port}/v2/") for line in proxy.forwarded)
            # HTTPS_PROXY alone is not for a plain-HTTP registry; NO_PROXY still applies to HTTP_PROXY
            seen = len(proxy.forwarded)
            dockyard_env(*export, str(tmp_path / "b.tar"), env={"HTTPS_PROXY": authed})
            dockyard_env(*export, str(tmp_path / "c.tar"), env={"http_proxy": authed, "no_proxy": name})
            assert len(proxy.forwarded) == seen
            failed = dockyard_env(*export, str(tmp_path / "d.tar"), env={"HTTP_PROXY": proxy.url}, check=False)
            assert failed.returncode == 1 and len(failed.stderr.strip().splitlines()) == 1
            # the proxy refused (RFC 9110 section 15.5.8), not the registry: the line names the proxy
            assert "407" in failed.stderr and f"proxy {proxy.url.split('://', 1)[1]}" in failed.stderr, failed.stderr
    finally:
        entry.remove()
