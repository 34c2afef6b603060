"""Real Docker against two Dockyard replicas over one storage (one
filesystem root or one bucket, tests.support.replicas): an image pushed to
one replica is pulled from the other and runs, and the same through the
round-robin proxy, where docker's requests of one push land on both."""

from __future__ import annotations

import re
import uuid

import pytest

from tests.support.peers import build_busybox_image
from tests.support.registry_http import http_request
from tests.support.replicas import ReplicaSet, backend_names, backend_storage

pytestmark = pytest.mark.interop


@pytest.fixture(params=backend_names())
def replicas(request, tmp_path):
    with backend_storage(request.param, tmp_path) as storage:
        with ReplicaSet(storage, tmp_path / "replicas") as replica_set:
            yield replica_set


def pushed_digest(output: str) -> str:
    match = re.search(r"digest: (sha256:[0-9a-f]{64})", output)
    assert match, output
    return match.group(1)


def test_docker_push_to_one_replica_pull_from_the_other(dockerd, replicas):
    repo = f"replicas/docker-{uuid.uuid4().hex[:8]}"
    first, second = replicas.hosts
    pushed_ref, pulled_ref = f"{first}/{repo}:1", f"{second}/{repo}:1"
    build_busybox_image(dockerd, pushed_ref, run_step=f"echo {repo} > /hello.txt")
    digest = pushed_digest(dockerd.run("push", pushed_ref).stdout)
    dockerd.run("rmi", pushed_ref)
    try:
        dockerd.run("pull", pulled_ref)
        out = dockerd.run("run", "--rm", "--network", "none", pulled_ref, "cat", "/hello.txt")
        assert out.stdout.strip() == repo
        digests = dockerd.run("image", "inspect", "-f", "{{json .RepoDigests}}", pulled_ref).stdout
        assert f"{second}/{repo}@{digest}" in digests
    finally:
        dockerd.run("rmi", "-f", pulled_ref, check=False)


def test_docker_push_and_pull_through_the_round_robin_proxy(dockerd, replicas):
    repo = f"replicas/proxied-{uuid.uuid4().hex[:8]}"
    proxy = replicas.proxy
    ref = f"{proxy.host}/{repo}:1"
    build_busybox_image(dockerd, ref, run_step=f"echo {repo} > /hello.txt")
    digest = pushed_digest(dockerd.run("push", ref).stdout)
    after_push = proxy.served
    assert min(after_push) >= 4, after_push         # the push's requests went to both replicas
    for url in replicas.urls:                       # and either replica serves what it made
        got = http_request("HEAD", f"{url}/v2/{repo}/manifests/{digest}",
                           headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
        assert got.status == 200 and got.headers["Docker-Content-Digest"] == digest
    dockerd.run("rmi", ref)
    try:
        dockerd.run("pull", ref)
        out = dockerd.run("run", "--rm", "--network", "none", ref, "cat", "/hello.txt")
        assert out.stdout.strip() == repo
    finally:
        dockerd.run("rmi", "-f", ref, check=False)
    assert all(now > before for now, before in zip(proxy.served, after_push)), proxy.served
