"""Garbage collection across the layout Dockyard shares with CNCF
Distribution (storage/layout.py): `dockyard gc` on a root Distribution
filled and deleted from collects what Distribution left, keeps what its
tags reach (Distribution serves it afterwards), and Distribution's own
`garbage-collect` then finds nothing more to delete."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.support import REPO_ROOT
from tests.support.content import MANIFEST_ACCEPT, OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, sha256_digest
from tests.support.launch import dockyard_command, launch_distribution
from tests.support.peers import distribution_garbage_collect
from tests.support.registry_http import http_request, push_blob, put_manifest

pytestmark = pytest.mark.interop


def push(url: str, repo: str, tag: str, seed: str) -> tuple[str, list[str]]:
    config = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed}).encode()
    layer = f"layer {seed} ".encode() * 100
    blobs = [push_blob(url, repo, config), push_blob(url, repo, layer)]
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": blobs[0], "size": len(config)},
                "layers": [{"mediaType": OCI_LAYER, "digest": blobs[1], "size": len(layer)}]}
    put = put_manifest(url, repo, tag, manifest)
    assert put.status == 201, put.body
    return put.headers["Docker-Content-Digest"], blobs


def test_dockyard_gc_on_a_root_distribution_filled(tmp_path):
    distribution = launch_distribution(tmp_path / "distribution")
    try:
        kept, kept_blobs = push(distribution.url, "compat/app", "v1", "kept")
        gone, gone_blobs = push(distribution.url, "compat/app", "v2", "gone")
        assert http_request("DELETE", f"{distribution.url}/v2/compat/app/manifests/{gone}").status == 202
    finally:
        distribution.server.stop()
    gc = subprocess.run([*dockyard_command(), "gc", "--storage", str(distribution.storage), "--grace", "0",
                         "--json", "--quiet"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert gc.returncode == 0, gc.stderr
    report = json.loads(gc.stdout)
    assert set(report["deleted_blobs"]) == set(gone_blobs) | {gone}, (report, gc.stderr)
    after = distribution_garbage_collect(distribution.config)
    assert after.returncode == 0, after.stderr[-2000:]
    eligible = re.search(r"(\d+) blobs and (\d+) manifests eligible for deletion", after.stdout + after.stderr)
    assert eligible and eligible.groups() == ("0", "0"), (after.stdout + after.stderr)[-2000:]
    again = launch_distribution(tmp_path / "distribution", config=distribution.config)
    try:
        got = http_request("GET", f"{again.url}/v2/compat/app/manifests/v1", headers={"Accept": MANIFEST_ACCEPT})
        assert got.status == 200 and got.headers["Docker-Content-Digest"] == kept
        for digest in kept_blobs:
            blob = http_request("GET", f"{again.url}/v2/compat/app/blobs/{digest}")
            assert blob.status == 200 and sha256_digest(blob.body) == digest
        assert http_request("GET", f"{again.url}/v2/compat/app/manifests/{gone}",
                            headers={"Accept": MANIFEST_ACCEPT}).status == 404
    finally:
        again.server.stop()
