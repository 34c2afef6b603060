"""The pull-through cache with real clients in front of a real upstream:
`dockyard serve` proxying CNCF Distribution (an image built by the test
Docker daemon pushed into it), pulled by `docker pull` through the prefix,
by containerd (`ctr` with a hosts.toml mirror, so `?ns=docker.io` is sent,
as the distribution spec's "Registry Proxying" section describes), and by a
Docker daemon whose `registry-mirrors` names Dockyard (`proxy.default`).
The upstream's access log says what reached it.
"""

from __future__ import annotations

import os

import pytest

from tests.support.content import MANIFEST_ACCEPT
from tests.support.launch import launch_dockyard
from tests.support.peers import build_busybox_image, start_docker_daemon, stop_docker_daemon
from tests.support.registry_http import http_request
from tests.support.upstream import launch_upstream, push_image, upstream_requests

pytestmark = pytest.mark.interop

IMAGE = "library/bbproxy"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    server = launch_upstream(tmp_path_factory.mktemp("proxy-interop-upstream"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def seeded(dockerd, upstream) -> str:
    """The test image in the upstream as IMAGE:v1; its manifest digest."""
    ref = f"{upstream.host}/{IMAGE}:v1"
    build_busybox_image(dockerd, ref, run_step="echo proxied > /proxied.txt")
    pushed = dockerd.run("push", ref).stdout
    dockerd.run("rmi", ref)
    return next(word for word in pushed.split() if word.startswith("sha256:"))


def _config(upstream, **proxy) -> dict:
    return {"proxy": {"upstreams": [{"prefix": "hub", "url": upstream.url, "namespace": "docker.io",
                                     "revalidate": 300, "timeout": 5}], **proxy}}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, upstream):
    root = tmp_path_factory.mktemp("proxy-interop-cache")
    server = launch_dockyard(root / "storage", config={**_config(upstream, default="hub"),
                                                       "http": {"access_log": True}})
    yield server
    server.stop()


def _run_image(docker, ref: str) -> str:
    return docker.run("run", "--rm", "--network", "none", ref, "cat", "/proxied.txt").stdout.strip()


def test_docker_pull_through_prefix_then_push_to_a_local_repository(dockerd, cache, upstream, seeded):
    ref = f"{cache.host}/hub/bbproxy:v1"          # hub/bbproxy is library/bbproxy upstream
    dockerd.run("pull", ref)
    try:
        assert _run_image(dockerd, ref) == "proxied"
        digests = dockerd.run("image", "inspect", "-f", "{{json .RepoDigests}}", ref).stdout
        assert seeded in digests
        # a push outside the proxied prefix is an ordinary push
        local = f"{cache.host}/team/bbproxy:v1"
        dockerd.run("tag", ref, local)
        dockerd.run("push", local)
        # and into the prefix it is refused
        refused = dockerd.run("push", f"{cache.host}/hub/bbproxy:v1", check=False)
        assert refused.returncode != 0
        dockerd.run("rmi", local)
    finally:
        dockerd.run("rmi", ref, check=False)
    gets = upstream_requests(upstream, "GET", f"/v2/{IMAGE}/manifests/v1")
    assert gets == 1


def test_ctr_pull_through_hosts_toml_mirror_sends_ns(dockerd, cache, upstream, seeded, tmp_path):
    hosts = tmp_path / "hosts" / "docker.io"
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(
        'server = "https://registry-1.docker.io"\n\n'
        f'[host."http://{cache.host}"]\n  capabilities = ["pull", "resolve"]\n')
    ref = f"docker.io/{IMAGE}:v1"
    dockerd.ctr("images", "pull", "--hosts-dir", str(tmp_path / "hosts"), ref)
    try:
        listed = dockerd.ctr("images", "ls").stdout
        line = next((l for l in listed.splitlines() if l.startswith(ref + " ")), None)
        assert line is not None and seeded in line.split(), listed
    finally:
        dockerd.ctr("images", "rm", ref, check=False)
    # containerd named the source host; the cache honoured it (and said so in OCI-Namespace)
    assert f"/v2/{IMAGE}/manifests/v1?ns=docker.io" in cache.log()
    answer = http_request("HEAD", f"{cache.url}/v2/{IMAGE}/manifests/v1?ns=docker.io",
                          headers={"Accept": MANIFEST_ACCEPT})
    assert answer.status == 200 and answer.headers["OCI-Namespace"] == "docker.io"


def test_docker_registry_mirrors_use_the_default_upstream(tmp_path_factory, cache, upstream, seeded):
    daemon = start_docker_daemon(tmp_path_factory.mktemp("dockerd-mirror"),
                                 extra_args=["--registry-mirror", f"http://{cache.host}"])
    try:
        daemon.run("pull", "bbproxy:v1")          # docker.io/library/bbproxy: the mirror, or nothing
        assert _run_image(daemon, "bbproxy:v1") == "proxied"
    finally:
        stop_docker_daemon(daemon)


def test_second_pull_with_the_upstream_stopped(dockerd, tmp_path_factory, seeded, upstream):
    # an upstream of its own, so stopping it leaves the module's alone
    own = launch_upstream(tmp_path_factory.mktemp("proxy-interop-stoppable"))
    root = tmp_path_factory.mktemp("proxy-interop-stale")
    source = f"{upstream.host}/{IMAGE}:v1"
    dockerd.run("pull", source)
    dockerd.run("tag", source, f"{own.host}/{IMAGE}:v1")
    dockerd.run("push", f"{own.host}/{IMAGE}:v1")
    dockerd.run("rmi", source, f"{own.host}/{IMAGE}:v1")
    server = launch_dockyard(root / "storage", config={"proxy": {"upstreams": [
        {"prefix": "hub", "url": own.url, "revalidate": 0, "timeout": 3}]}})
    ref = f"{server.host}/hub/{IMAGE}:v1"
    try:
        dockerd.run("pull", ref)
        dockerd.run("rmi", ref)
        own.stop()
        dockerd.run("pull", ref)                  # tag revalidation fails: the cached copy
        assert _run_image(dockerd, ref) == "proxied"
        missing = dockerd.run("pull", f"{server.host}/hub/library/never:v1", check=False)
        assert missing.returncode != 0 and "502" in missing.stderr
        answer = http_request("GET", f"{server.url}/v2/hub/library/never/manifests/v1")
        assert answer.status == 502 and "upstream hub" in answer.json()["errors"][0]["message"]
    finally:
        dockerd.run("rmi", ref, check=False)
        server.stop()
        own.stop()


def test_ten_concurrent_skopeo_first_pulls_one_upstream_get_per_blob(skopeo, cache, upstream, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    image = push_image(upstream.url, "library/crowd10", "v1", [os.urandom(4_000_000), os.urandom(1_000_000)])

    def pull(i: int):
        return skopeo.copy(f"docker://{cache.host}/hub/crowd10:v1", f"dir:{tmp_path / str(i)}", timeout=120)

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(pull, range(10)))
    for i in range(10):
        for digest in image.blobs:
            assert (tmp_path / str(i) / digest.split(":", 1)[1]).stat().st_size > 0
    for digest in image.blobs:
        assert upstream_requests(upstream, "GET", f"/v2/library/crowd10/blobs/{digest}") == 1
    assert upstream_requests(upstream, "GET", "/v2/library/crowd10/manifests/v1") == 1
