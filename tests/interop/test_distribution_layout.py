"""CNCF Distribution 2.8 (`docker-registry`) and Dockyard on one storage
root, both ways, on the filesystem and on S3 (the session's Ceph RADOS
Gateway, which checks SigV4 as AWS does; both registries' S3 drivers point
at one bucket and prefix, `<prefix>/docker/registry/v2/...`):

- a root Distribution filled, with skopeo pushing an OCI image, a Docker
  schema 2 image, a multi-platform index and an artifact with a subject,
  is served by `dockyard serve` (two processes of two workers each at once)
  with the same catalog, tags, digests, media types and
  sizes, and skopeo pulls it back by tag and by digest;
- a root Dockyard filled the same way is served by Distribution, and
  `docker-registry garbage-collect --dry-run` runs clean on it: exit 0,
  every manifest marked, nothing eligible for deletion.

Distribution spec: "Pulling manifests", "Listing tags", the catalog
(docker-registry/api.md, "Listing Repositories"); the manifest's media type
is its Content-Type (image-spec manifest.md, image-index.md).
"""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests.support.content import (DOCKER_MANIFEST, MANIFEST_ACCEPT, OCI_EMPTY, OCI_MANIFEST, OciLayoutWriter,
                                   random_tar_layer, sha256_digest, write_oci_layout)
from tests.support.launch import RegistryServer, distribution_config, free_port, launch_distribution
from tests.support.peers import distribution_garbage_collect, distribution_s3_storage
from tests.support.registry_http import http_request, push_blob, put_manifest
from tests.support.s3 import S3Target

pytestmark = pytest.mark.interop

class Root:
    """One storage root both registries are pointed at, in turn."""

    def __init__(self, kind: str, base: Path, ceph=None):
        self.kind, self.base = kind, base
        self.fs_root = base / "root"
        self.prefix = f"compat-{uuid.uuid4().hex[:8]}"
        self.s3: S3Target | None = None
        self.started: list[RegistryServer] = []      # stopped by the fixture, a failed test's too
        if ceph is not None:        # a bucket of its own, made on first use
            self.s3 = S3Target(ceph.endpoint, ceph.access_key, ceph.secret_key,
                               f"layout-{uuid.uuid4().hex[:10]}", ceph.region)

    def distribution(self, name: str) -> RegistryServer:
        workdir = self.base / name
        workdir.mkdir()
        port = free_port()
        settings = distribution_config(self.fs_root, port)
        if self.s3 is not None:
            settings["storage"] = distribution_s3_storage(self.s3.endpoint, self.s3.bucket, self.prefix,
                                                          self.s3.access_key, self.s3.secret_key, self.s3.region)
        path = workdir / "config.yml"
        path.write_text(yaml.safe_dump(settings, sort_keys=False))
        server = launch_distribution(workdir, config=path)
        self.started.append(server)
        return server

    def dockyard(self, start_dockyard, workers: int = 2) -> RegistryServer:
        if self.s3 is None:
            return start_dockyard(self.fs_root, workers=workers)
        # storage.root only says where the settings file goes: --storage would mean the filesystem
        config = {"storage": {"driver": "s3", "root": str(self.base / f"dockyard-{uuid.uuid4().hex[:6]}"), "s3": {
            "bucket": self.s3.bucket, "endpoint_url": self.s3.endpoint, "prefix": self.prefix,
            "region": self.s3.region, "access_key_id": self.s3.access_key, "secret_access_key": self.s3.secret_key,
            "addressing_style": "path"}}}
        return start_dockyard(workers=workers, config=config)


@pytest.fixture(params=["filesystem", "s3"])
def shared_root(request, tmp_path, monkeypatch):
    if request.param == "filesystem":
        root = Root("filesystem", tmp_path)
    else:
        # Distribution 2.8's AWS SDK panics on a CA bundle with its own transport; loopback is plain HTTP
        monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
        root = Root("s3", tmp_path, request.getfixturevalue("ceph_s3"))
    yield root
    for server in root.started:      # the last test started one and left it running
        server.stop()


def fill(registry: RegistryServer, skopeo, tmp_path: Path) -> dict[str, list[str]]:
    """Push, with skopeo and by hand: an OCI image, the same as Docker schema
    2, a two-platform index, and an artifact whose subject is the image.
    Returns {repository: [references to compare]}."""
    image = write_oci_layout(tmp_path / "image", layer_sizes=[3000, 500], tag="v1")
    skopeo.copy(image.ref, f"docker://{registry.host}/compat/oci:v1")
    skopeo.copy(image.ref, f"docker://{registry.host}/compat/docker:v2", "--format", "v2s2")
    writer = OciLayoutWriter(tmp_path / "multi")
    platforms = [{"os": "linux", "architecture": "amd64"}, {"os": "linux", "architecture": "arm64"}]
    children = [writer.image([random_tar_layer(800, name=f"p{i}")], platform=p) for i, p in enumerate(platforms)]
    index = writer.index(children)
    writer.tag("multi", index)
    writer.close()
    skopeo.copy(f"oci:{writer.dir}:multi", f"docker://{registry.host}/compat/multi:multi", "--all")
    # skopeo may rewrite what it copies: the digests are what the registry serves
    image_digest, _, image_size, _ = manifest_answer(registry, "compat/oci", "v1")
    index_digest = manifest_answer(registry, "compat/multi", "multi")[0]
    # an artifact with a subject (image-spec manifest.md "subject"); 2.8 keeps it as a plain manifest
    push_blob(registry.url, "compat/oci", b"{}")
    note = b"signed, sealed"
    push_blob(registry.url, "compat/oci", note)
    artifact = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/x.note",
                "config": {"mediaType": OCI_EMPTY, "digest": sha256_digest(b"{}"), "size": 2},
                "layers": [{"mediaType": "text/plain", "digest": sha256_digest(note), "size": len(note)}],
                "subject": {"mediaType": OCI_MANIFEST, "digest": image_digest, "size": image_size}}
    artifact_body = json.dumps(artifact, sort_keys=True).encode()
    assert put_manifest(registry.url, "compat/oci", sha256_digest(artifact_body), artifact_body).status == 201
    refs = {"compat/oci": ["v1", image_digest, sha256_digest(artifact_body)],
            "compat/docker": ["v2"], "compat/multi": ["multi", index_digest]}
    served_index = http_request("GET", f"{registry.url}/v2/compat/multi/manifests/{index_digest}",
                                headers={"Accept": MANIFEST_ACCEPT}).json()
    refs["compat/multi"] += [c["digest"] for c in served_index["manifests"]]
    assert len(refs["compat/multi"]) == 2 + len(children)
    refs["compat/docker"].append(manifest_answer(registry, "compat/docker", "v2")[0])
    return refs


def manifest_answer(registry: RegistryServer, repo: str, reference: str) -> tuple[str, str, int, str]:
    """(Docker-Content-Digest, Content-Type, size, sha256 of the body) of a manifest GET."""
    got = http_request("GET", f"{registry.url}/v2/{repo}/manifests/{reference}",
                       headers={"Accept": MANIFEST_ACCEPT})
    assert got.status == 200, (registry.kind, repo, reference, got.status, got.body[:300])
    return got.headers["Docker-Content-Digest"], got.headers["Content-Type"], len(got.body), sha256_digest(got.body)


def observe(registry: RegistryServer, refs: dict[str, list[str]]) -> dict:
    """What a client sees: catalog, tags lists, every manifest's digest, type and size."""
    catalog = http_request("GET", f"{registry.url}/v2/_catalog")
    assert catalog.status == 200, (registry.kind, catalog.body[:300])
    seen = {"catalog": catalog.json()["repositories"]}
    for repo, references in refs.items():
        tags = http_request("GET", f"{registry.url}/v2/{repo}/tags/list")
        assert tags.status == 200, (registry.kind, repo, tags.body[:300])
        seen[f"tags {repo}"] = sorted(tags.json()["tags"])
        for reference in references:
            seen[f"{repo} {reference}"] = manifest_answer(registry, repo, reference)
    return seen


def pull_everything(registry: RegistryServer, skopeo, refs: dict[str, list[str]], into: Path) -> None:
    """skopeo pulls every reference (blobs included) and finds the digest it asked for."""
    into.mkdir()
    for n, (repo, references) in enumerate(refs.items()):
        for m, reference in enumerate(references):
            src = f"docker://{registry.host}/{repo}{'@' if ':' in reference else ':'}{reference}"
            skopeo.copy(src, f"oci:{into / f'{n}-{m}'}:x", "--all")
            raw = skopeo.inspect(src, "--raw").stdout.encode()
            if ":" in reference:
                assert sha256_digest(raw) == reference, (registry.kind, src)


def test_dockyard_serves_a_root_distribution_filled(shared_root, skopeo, start_dockyard, tmp_path):
    distribution = shared_root.distribution("distribution")
    refs = fill(distribution, skopeo, tmp_path)
    expected = observe(distribution, refs)
    assert expected["catalog"] == ["compat/docker", "compat/multi", "compat/oci"]
    assert expected["compat/docker v2"][1] == DOCKER_MANIFEST
    distribution.stop()

    # two processes of two workers each start on it at once: the index build is theirs to share
    servers = [shared_root.dockyard(start_dockyard) for _ in range(2)]
    with ThreadPoolExecutor(len(servers)) as pool:
        seen = list(pool.map(lambda s: observe(s, refs), servers))
    for got in seen:
        assert got == expected
    pull_everything(servers[0], skopeo, refs, tmp_path / "pulled")
    # Distribution 2.8 has no referrers API: the index build found the subject
    image_digest = refs["compat/oci"][1]
    referrers = http_request("GET", f"{servers[0].url}/v2/compat/oci/referrers/{image_digest}").json()
    assert [d["digest"] for d in referrers["manifests"]] == [refs["compat/oci"][2]]
    assert referrers["manifests"][0]["artifactType"] == "application/x.note"


def test_distribution_serves_and_collects_a_root_dockyard_filled(shared_root, skopeo, start_dockyard, tmp_path):
    dockyard = shared_root.dockyard(start_dockyard, workers=1)
    refs = fill(dockyard, skopeo, tmp_path)
    expected = observe(dockyard, refs)
    assert expected["catalog"] == ["compat/docker", "compat/multi", "compat/oci"]
    dockyard.stop()

    distribution = shared_root.distribution("distribution")
    assert observe(distribution, refs) == expected
    pull_everything(distribution, skopeo, refs, tmp_path / "pulled")
    distribution.stop()

    gc = distribution_garbage_collect(distribution.config)
    out = gc.stdout + gc.stderr
    assert gc.returncode == 0, out[-3000:]
    assert " 0 blobs and 0 manifests eligible for deletion" in out, out[-3000:]
    manifests = {ref for references in refs.values() for ref in references if ":" in ref}
    marked = {line.split()[-1] for line in out.splitlines() if "marking manifest" in line}
    assert manifests <= marked, (manifests - marked, out[-3000:])


def test_distribution_lists_no_tag_that_dockyard_deleted(shared_root, skopeo, start_dockyard, tmp_path):
    """Distribution's tags list names every entry under _manifests/tags/
    (its S3 driver lists any object there): a tag Dockyard deleted leaves
    nothing behind, no hidden marker either."""
    dockyard = shared_root.dockyard(start_dockyard, workers=1)
    image = write_oci_layout(tmp_path / "image", layer_sizes=[700], tag="v1")
    skopeo.copy(image.ref, f"docker://{dockyard.host}/compat/deleted:v1")
    skopeo.copy(image.ref, f"docker://{dockyard.host}/compat/deleted:gone")
    assert http_request("DELETE", f"{dockyard.url}/v2/compat/deleted/manifests/gone").status == 202
    dockyard.stop()
    distribution = shared_root.distribution("distribution")
    tags = http_request("GET", f"{distribution.url}/v2/compat/deleted/tags/list")
    assert tags.status == 200 and tags.json()["tags"] == ["v1"], tags.body[:300]
