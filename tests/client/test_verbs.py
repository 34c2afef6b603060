"""The registry verbs (ls, catalog, manifest, config, blob, tag, delete,
digest) against the Dockyard registry and CNCF Distribution, over real HTTP
(distribution spec: "Listing Tags", "Listing Repositories", "Pulling
manifests", "Pulling blobs", "Pushing Manifests", "Deleting Manifests")."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid
from dataclasses import dataclass

import pytest

from tests.support import REPO_ROOT
from tests.support.content import (OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST, gzip_bytes, sha256_digest,
                                   tar_layer)
from tests.support.registry_http import http_request, push_blob, put_manifest

pytestmark = pytest.mark.interop


def dockyard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "puller", *args], capture_output=True, cwd=REPO_ROOT, timeout=120,
                          stdin=subprocess.DEVNULL,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT),
                               "DOCKER_CONFIG": "/nonexistent-dockyard-config"})


def ok(*args: str) -> str:
    proc = dockyard(*args)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def error_line(*args: str) -> str:
    proc = dockyard(*args)
    assert proc.returncode == 1, proc.stdout.decode()
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dockyard: error: "), lines
    return lines[0]


@dataclass
class Pushed:
    host: str
    repo: str
    layer: bytes               # the gzip blob
    config: dict
    manifest: bytes
    index_digest: str
    arm_config: dict

    @property
    def name(self) -> str:
        return f"{self.host}/{self.repo}"

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)


def _image(url: str, repo: str, arch: str, text: bytes) -> tuple[dict, bytes, bytes]:
    layer_tar = tar_layer({"hello.txt": text})
    layer = gzip_bytes(layer_tar)
    config = {"architecture": arch, "os": "linux", "config": {"Cmd": ["/hello"]},
              "rootfs": {"type": "layers", "diff_ids": [sha256_digest(layer_tar)]}}
    config_bytes = json.dumps(config).encode()
    push_blob(url, repo, layer)
    push_blob(url, repo, config_bytes)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config_bytes), "size": len(config_bytes)},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": sha256_digest(layer), "size": len(layer)}]},
        indent=3).encode()   # not canonical JSON: --raw must give these bytes, not a re-serialisation
    return config, layer, manifest


@pytest.fixture(scope="module", params=["dockyard_registry", "distribution_registry"])
def pushed(request) -> Pushed:
    server = request.getfixturevalue(request.param)
    repo = f"verbs/{uuid.uuid4().hex[:8]}"
    config, layer, manifest = _image(server.url, repo, "amd64", b"amd64\n")
    assert put_manifest(server.url, repo, "v1", manifest).status == 201
    arm_config, _, arm_manifest = _image(server.url, repo, "arm64", b"arm64\n")
    assert put_manifest(server.url, repo, sha256_digest(arm_manifest), arm_manifest).status == 201
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": sha256_digest(m), "size": len(m),
         "platform": {"os": "linux", "architecture": a}}
        for m, a in ((manifest, "amd64"), (arm_manifest, "arm64"))]}).encode()
    assert put_manifest(server.url, repo, "multi", index, OCI_INDEX).status == 201
    return Pushed(server.host, repo, layer, config, manifest, sha256_digest(index), arm_config)


def test_ls_and_catalog(pushed):
    # in the registry's order (Distribution's is not lexical)
    assert sorted(ok("ls", pushed.name).split()) == ["multi", "v1"]
    listed = json.loads(ok("ls", "--json", pushed.name))
    assert listed["repository"] == pushed.name and sorted(listed["tags"]) == ["multi", "v1"]
    assert pushed.repo in ok("catalog", pushed.host).split()
    assert pushed.repo in json.loads(ok("catalog", "--json", pushed.host))["repositories"]
    assert "give a repository, without a tag" in error_line("ls", f"{pushed.name}:v1")


def test_manifest_raw_json_and_digest(pushed):
    raw = dockyard("manifest", "--raw", f"{pushed.name}:v1")
    assert raw.returncode == 0 and raw.stdout == pushed.manifest
    assert json.loads(ok("manifest", f"{pushed.name}:v1")) == json.loads(pushed.manifest)
    wrapped = json.loads(ok("manifest", "--json", f"{pushed.name}:v1"))
    assert wrapped["digest"] == pushed.digest and wrapped["media_type"] == OCI_MANIFEST
    assert wrapped["size"] == len(pushed.manifest)
    assert ok("digest", f"{pushed.name}:v1").strip() == pushed.digest
    assert ok("digest", f"{pushed.name}:multi").strip() == pushed.index_digest
    assert json.loads(ok("digest", "--json", f"{pushed.name}@{pushed.digest}"))["digest"] == pushed.digest
    assert "not found" in error_line("manifest", f"{pushed.name}:nope")


def test_config_follows_the_index_to_the_platform(pushed):
    assert json.loads(ok("config", f"{pushed.name}:v1")) == pushed.config
    assert json.loads(ok("config", "--platform", "linux/arm64", f"{pushed.name}:multi")) == pushed.arm_config
    assert json.loads(ok("config", "--platform", "linux/amd64", f"{pushed.name}:multi")) == pushed.config
    assert "no image for linux/s390x" in error_line("config", "--platform", "linux/s390x", f"{pushed.name}:multi")


def test_blob_to_stdout_and_file(pushed, tmp_path):
    digest = sha256_digest(pushed.layer)
    out = dockyard("blob", f"{pushed.name}@{digest}")
    assert out.returncode == 0 and out.stdout == pushed.layer
    target = tmp_path / "layer.tgz"
    ok("blob", "-o", str(target), f"{pushed.name}@{digest}")
    assert target.read_bytes() == pushed.layer
    absent = "sha256:" + hashlib.sha256(b"never pushed").hexdigest()
    missing = tmp_path / "absent.bin"
    assert "not found" in error_line("blob", "-o", str(missing), f"{pushed.name}@{absent}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer.tgz"]   # no partial file left
    assert "name the blob as REPO@DIGEST" in error_line("blob", f"{pushed.name}:v1")


def test_tag_is_server_side_and_delete_removes_the_manifest(pushed, request):
    out = ok("tag", f"{pushed.name}:v1", "v1-again")
    assert out.strip() == f"{pushed.name}:v1-again: tagged {pushed.digest}"
    again = dockyard("manifest", "--raw", f"{pushed.name}:v1-again")
    assert again.stdout == pushed.manifest      # the same bytes, so the same digest
    assert json.loads(ok("tag", "--json", f"{pushed.name}:v1", f"{pushed.name}:v1-third"))["digest"] == pushed.digest
    assert "same repository" in error_line("tag", f"{pushed.name}:v1", f"{pushed.host}/other/repo:x")
    # delete the index by tag: the tag resolves to its digest, the manifest goes
    deleted = json.loads(ok("delete", "--json", f"{pushed.name}:multi"))
    assert deleted["deleted"] == f"{pushed.name}@{pushed.index_digest}"
    url = f"http://{pushed.host}/v2/{pushed.repo}/manifests/{pushed.index_digest}"
    assert http_request("GET", url, headers={"Accept": OCI_INDEX}).status == 404
    assert "not found" in error_line("delete", f"{pushed.name}@{pushed.index_digest}")
    # the image manifest the index listed is still there (only the index was deleted)
    assert ok("digest", f"{pushed.name}:v1").strip() == pushed.digest


@pytest.mark.parametrize("verb", ["ls", "catalog"])
def test_a_reader_that_went_away_gets_one_line_not_a_traceback(pushed, verb):
    """`dockyard ls REPO --json | head -c0`: the pipe's reader is gone before
    the first write (EPIPE): one error line and status 1, as for `blob`."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        target = pushed.name if verb == "ls" else pushed.host
        proc = subprocess.run([sys.executable, "-m", "puller", verb, target, "--json"], stdout=write_end,
                              stderr=subprocess.PIPE, cwd=REPO_ROOT, timeout=120, stdin=subprocess.DEVNULL,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT),
                                   "DOCKER_CONFIG": "/nonexistent-dockyard-config"})
    finally:
        os.close(write_end)
    assert proc.stderr.decode().splitlines() == ["dockyard: error: cannot write stdout: Broken pipe"]
    assert proc.returncode == 1
