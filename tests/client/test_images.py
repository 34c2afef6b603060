"""`dockyard images`, `rmi`, `prune` and `df` on a store filled by real pulls
from the Dockyard registry; after each, skopeo and umoci still read the store
as an OCI image layout (image-spec image-layout.md), and what another image
still uses is kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.support import REPO_ROOT
from tests.support.content import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, gzip_bytes, sha256_digest, tar_layer
from tests.support.peers import require_tool, run
from tests.support.registry_http import push_blob, put_manifest

pytestmark = pytest.mark.interop


def dockyard(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "puller", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=180, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "DOCKER_CONFIG": "/nonexistent"})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _push(url: str, repo: str, tag: str, layers: list[bytes], created: str) -> str:
    diff_ids = []
    descriptors = []
    for tar in layers:
        blob = gzip_bytes(tar)
        push_blob(url, repo, blob)
        diff_ids.append(sha256_digest(tar))
        descriptors.append({"mediaType": OCI_LAYER_GZIP, "digest": sha256_digest(blob), "size": len(blob)})
    config = json.dumps({"architecture": "amd64", "os": "linux", "created": created, "config": {"Cmd": ["/x"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    push_blob(url, repo, config)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": descriptors,
                "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config), "size": len(config)}}
    assert put_manifest(url, repo, tag, manifest).status == 201
    return sha256_digest(json.dumps(manifest, sort_keys=True).encode())


def _readable(store, refs: list[str], skopeo) -> None:
    for ref in refs:
        inspected = json.loads(skopeo.run("inspect", f"oci:{store}:{ref}").stdout)
        assert inspected["Layers"]
    listed = run([require_tool("umoci"), "ls", "--layout", str(store)]).stdout.split()
    assert sorted(listed) == sorted(refs)


def test_images_rmi_prune_df_keep_the_store_readable(dockyard_registry, skopeo, tmp_path):
    repo = f"images/{uuid.uuid4().hex[:8]}"
    base = tar_layer({"base.txt": os.urandom(50_000)})
    only_a = tar_layer({"a.txt": os.urandom(70_000)})
    only_b = tar_layer({"b.txt": os.urandom(30_000)})
    url, host = dockyard_registry.url, dockyard_registry.host
    digest_a = _push(url, repo, "a", [base, only_a], "2026-01-02T03:04:05Z")
    _push(url, repo, "b", [base, only_b], "2026-02-03T04:05:06Z")
    store, cache = tmp_path / "store", tmp_path / "cache"
    ref_a, ref_b = f"{host}/{repo}:a", f"{host}/{repo}:b"
    for ref in (ref_a, ref_b):
        dockyard("pull", "-q", "--plain-http", "--store", str(store), ref)
        dockyard("unpack", "-q", "--store", str(store), "--cache", str(cache), ref, str(tmp_path / ref[-1]))

    rows = {r["reference"]: r for r in json.loads(dockyard("images", "--json", "--store", str(store)).stdout)}
    assert set(rows) == {ref_a, ref_b}
    assert rows[ref_a]["repository"] == f"{host}/{repo}" and rows[ref_a]["tag"] == "a"
    assert rows[ref_a]["digest"] == digest_a and rows[ref_a]["platform"] == "linux/amd64"
    assert rows[ref_a]["created"] == "2026-01-02T03:04:05Z"
    assert rows[ref_a]["size"] > 120_000 and rows[ref_b]["size"] > 80_000
    table = dockyard("images", "--store", str(store)).stdout.splitlines()
    assert table[0].split() == ["REPOSITORY", "TAG", "DIGEST", "PLATFORM", "SIZE", "CREATED"]
    assert len(table) == 3
    _readable(store, [ref_a, ref_b], skopeo)

    before = json.loads(dockyard("df", "--json", "--store", str(store), "--cache", str(cache)).stdout)
    assert before["images"]["count"] == 2 and before["images"]["reclaimable"] == 0
    assert before["snapshots"]["count"] == 3 and before["snapshots"]["reclaimable"] == 0   # base, base+a, base+b

    removed = json.loads(dockyard("rmi", "--json", "--store", str(store), ref_a).stdout)
    assert removed["digest"] == digest_a and removed["blobs_removed"] == 3     # manifest, config, layer a
    blobs = store / "blobs" / "sha256"
    assert not (blobs / sha256_digest(gzip_bytes(only_a)).split(":")[1]).exists()
    assert (blobs / sha256_digest(gzip_bytes(base)).split(":")[1]).exists()     # b still uses it
    _readable(store, [ref_b], skopeo)
    missing = dockyard("rmi", "--store", str(store), ref_a, check=False)
    assert missing.returncode == 1 and missing.stderr.strip() == (
        f"dockyard: error: no such image in the store {store}: {ref_a}")

    # a stray blob (what an interrupted copy may leave): kept while young, pruned after the grace period
    stray = store / "blobs" / "sha256" / ("0" * 64)
    stray.write_bytes(b"stray")
    mid = json.loads(dockyard("df", "--json", "--store", str(store), "--cache", str(cache)).stdout)
    assert mid["snapshots"]["reclaimable"] > 0                  # base+a: no image needs it now
    assert mid["images"]["reclaimable"] > 0
    kept = json.loads(dockyard("prune", "--json", "--store", str(store), "--cache", str(cache)).stdout)
    assert kept["blobs"] == 0 and stray.exists() and kept["snapshots"] == 1
    pruned = json.loads(dockyard("prune", "--json", "--grace", "0", "--store", str(store),
                                 "--cache", str(cache)).stdout)
    assert pruned["blobs"] == 1 and not stray.exists() and pruned["snapshots"] == 0
    after = json.loads(dockyard("df", "--json", "--store", str(store), "--cache", str(cache)).stdout)
    assert after["snapshots"]["count"] == 2 and after["snapshots"]["reclaimable"] == 0
    _readable(store, [ref_b], skopeo)
    # what is left still unpacks (its snapshots were kept)
    dockyard("unpack", "-q", "--store", str(store), "--cache", str(cache), ref_b, str(tmp_path / "again"))
    assert (tmp_path / "again" / "rootfs" / "b.txt").stat().st_size == 30_000
