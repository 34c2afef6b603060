"""The client against real peers: Docker, CNCF Distribution, the Dockyard
registry, skopeo and umoci reading the local store."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.support import REPO_ROOT
from tests.support.content import (OCI_INDEX, OCI_MANIFEST, OciLayoutWriter, random_tar_layer, sha256_digest,
                                   tar_layer, write_oci_layout)
from tests.support.launch import dockyard_command
from tests.support.peers import build_busybox_image, require_tool, run
from tests.support.registry_http import http_request, put_manifest

pytestmark = pytest.mark.interop

REGISTRIES = ["distribution_registry", "dockyard_registry"]


def dockyard(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    return run([*dockyard_command(), *args], timeout=timeout, check=check,
               env={"PYTHONPATH": str(REPO_ROOT), "DOCKER_CONFIG": "/nonexistent-dockyard-config"})


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=REGISTRIES)
def registry(request):
    return request.getfixturevalue(request.param)


def check_store_readable(store: Path, ref: str, digest: str, skopeo, layers: list | None = None) -> None:
    """skopeo and umoci read the store as a plain OCI layout. A Docker image
    is listed through its OCI view, annotated with the registry's digest."""
    entries = json.loads((store / "index.json").read_text())["manifests"]
    entry = next(e for e in entries if e["annotations"]["org.opencontainers.image.ref.name"] == ref)
    assert entry["annotations"].get("io.dockyard.source.digest", entry["digest"]) == digest
    inspected = json.loads(skopeo.run("inspect", f"oci:{store}:{ref}").stdout)
    assert inspected["Digest"] == entry["digest"]
    if layers is not None:
        assert inspected["Layers"] == layers
    umoci = require_tool("umoci")
    listed = run([umoci, "ls", "--layout", str(store)]).stdout.split()
    assert ref in listed


def test_docker_push_then_dockyard_pull(registry, dockerd, skopeo, tmp_path):
    name = f"{registry.host}/{unique('dockerpush')}/busybox:v1"
    build_busybox_image(dockerd, name)
    dockerd.run("push", name)
    pushed = dockerd.run("image", "inspect", "-f", "{{index .RepoDigests 0}}", name).stdout.strip()
    store = tmp_path / "store"
    result = json.loads(dockyard("pull", "--json", "--store", str(store), name).stdout)
    assert pushed.endswith("@" + result["digest"])
    assert len(result["layers"]) >= 2
    for layer in result["layers"]:
        assert (store / "blobs" / "sha256" / layer["digest"][7:]).is_file()
    check_store_readable(store, name, result["manifest_digest"], skopeo,
                         layers=[l["digest"] for l in result["layers"]])
    # umoci unpacks the store's OCI view of this Docker image into a bundle
    bundle = tmp_path / "bundle"
    run([require_tool("umoci"), "unpack", "--rootless", "--image", f"{store}:{name}", str(bundle)])
    assert (bundle / "rootfs" / "hello.txt").read_text().strip() == "hello"
    # the config's diff_ids match what docker built
    config = json.loads((store / "blobs" / "sha256" / result["config_digest"][7:]).read_text())
    docker_layers = json.loads(dockerd.run("image", "inspect", "-f", "{{json .RootFS.Layers}}", name).stdout)
    assert config["rootfs"]["diff_ids"] == docker_layers


def test_dockyard_push_then_docker_pull_and_run(registry, dockerd, tmp_path):
    """docker save -> dockyard push docker-archive: -> docker pull -> docker run."""
    built = f"dockyard-build/{unique('img')}:v1"
    build_busybox_image(dockerd, built, run_step="echo pushed-by-dockyard > /hello.txt")
    archive = tmp_path / "image.tar"
    dockerd.run("save", "-o", str(archive), built)
    dest = f"{registry.host}/{unique('dypush')}/busybox:v1"
    out = json.loads(dockyard("push", "--json", f"docker-archive:{archive}", dest).stdout)
    assert out["blobs_uploaded"] >= 3
    dockerd.run("rmi", built)
    dockerd.run("pull", dest)
    ran = dockerd.run("run", "--rm", "--network", "none", dest, "cat", "/hello.txt")
    assert ran.stdout.strip() == "pushed-by-dockyard"
    # and from the local store to another repository of the same registry: mounted, not uploaded
    store = tmp_path / "store"
    dockyard("pull", "-q", "--store", str(store), dest)
    dest2 = f"{registry.host}/{unique('dypush2')}/busybox:v2"
    second = json.loads(dockyard("push", "--json", "--store", str(store), dest, dest2).stdout)
    assert second["blobs_uploaded"] == 0 and second["blobs_mounted"] + second["blobs_existing"] >= 3
    dockerd.run("pull", dest2)
    ran = dockerd.run("run", "--rm", "--network", "none", dest2, "cat", "/hello.txt")
    assert ran.stdout.strip() == "pushed-by-dockyard"


def _multi_arch_layout(path: Path) -> tuple[str, dict]:
    writer = OciLayoutWriter(path)
    children = []
    for arch, variant in (("amd64", None), ("arm64", "v8")):
        platform = {"os": "linux", "architecture": arch, **({"variant": variant} if variant else {})}
        children.append(writer.image([tar_layer({f"{arch}.txt": arch.encode()}), random_tar_layer(40_000)],
                                     platform=platform))
    index = writer.index(children)
    writer.tag("multi", index)
    writer.close()
    return index["digest"], {c["platform"]["architecture"]: c["digest"] for c in children}


def test_multi_arch_push_copy_pull_preserve_digests(registry, distribution_registry, skopeo, tmp_path):
    index_digest, children = _multi_arch_layout(tmp_path / "layout")
    src = f"{registry.host}/{unique('multi')}/app:1"
    pushed = json.loads(dockyard("push", "--json", f"oci:{tmp_path / 'layout'}:multi", src).stdout)
    assert pushed["digest"] == index_digest
    dst = f"{distribution_registry.host}/{unique('copied')}/app:1"
    copied = json.loads(dockyard("copy", "--json", src, dst).stdout)
    assert copied["digest"] == index_digest
    remote = json.loads(skopeo.inspect("--raw", f"docker://{dst}").stdout)
    assert sorted(m["digest"] for m in remote["manifests"]) == sorted(children.values())
    store = tmp_path / "store"
    one = json.loads(dockyard("pull", "--json", "--store", str(store), "--platform", "linux/arm64", dst).stdout)
    assert one["digest"] == index_digest and one["manifest_digest"] == children["arm64"]
    check_store_readable(store, dst, children["arm64"], skopeo)
    every = json.loads(dockyard("pull", "--json", "--all-platforms", "--store", str(tmp_path / "all"), dst).stdout)
    assert sorted(every["platforms"]) == ["linux/amd64", "linux/arm64/v8"]
    # a copy into an OCI layout that skopeo reads back
    dockyard("copy", "-q", dst, f"oci:{tmp_path / 'out'}:copy")
    assert json.loads(skopeo.run("inspect", "--raw", f"oci:{tmp_path / 'out'}:copy").stdout)["manifests"]
    # the same layout pushed back by skopeo equals the original index digest
    again = f"{distribution_registry.host}/{unique('back')}/app:1"
    skopeo.copy("--all", "--preserve-digests", f"oci:{tmp_path / 'out'}:copy", f"docker://{again}")
    assert json.loads(skopeo.inspect("--raw", f"docker://{again}").stdout) == remote


def _attach_artifact(base: str, repo: str, subject: dict, fallback_tag: bool) -> str:
    """A signature-like artifact whose subject is `subject`; returns its digest."""
    from tests.support.registry_http import push_blob
    empty = b"{}"
    push_blob(base, repo, empty)
    payload = b"signature bytes " + uuid.uuid4().hex.encode()
    layer_digest = push_blob(base, repo, payload)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.dockyard.test.sig",
                "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256_digest(empty),
                           "size": 2},
                "layers": [{"mediaType": "application/octet-stream", "digest": layer_digest, "size": len(payload)}],
                "subject": subject}
    body = json.dumps(manifest).encode()
    result = put_manifest(base, repo, sha256_digest(body), body)
    assert result.status == 201, result.body
    if fallback_tag:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
                 "manifests": [{"mediaType": OCI_MANIFEST, "digest": sha256_digest(body), "size": len(body),
                                "artifactType": manifest["artifactType"]}]}
        tag = subject["digest"].replace(":", "-")
        assert put_manifest(base, repo, tag, json.dumps(index).encode(), OCI_INDEX).status == 201
    return sha256_digest(body)


@pytest.mark.parametrize("direction", ["distribution-to-dockyard", "dockyard-to-distribution"])
def test_copy_with_referrers(direction, distribution_registry, dockyard_registry, tmp_path):
    src_reg, dst_reg = ((distribution_registry, dockyard_registry) if direction.startswith("distribution")
                        else (dockyard_registry, distribution_registry))
    image = write_oci_layout(tmp_path / "layout", layer_sizes=[10_000], tag="v1")
    repo = unique("signed") + "/app"
    dockyard("push", "-q", f"oci:{image.path}:v1", f"{src_reg.host}/{repo}:v1")
    # Distribution 2.8 has no referrers API: there the fallback tag carries the artifact
    artifact = _attach_artifact(f"http://{src_reg.host}", repo, image.manifest,
                                fallback_tag=src_reg is distribution_registry)
    dst_repo = unique("signed-copy") + "/app"
    out = json.loads(dockyard("copy", "--json", "--referrers", f"{src_reg.host}/{repo}:v1",
                              f"{dst_reg.host}/{dst_repo}:v1").stdout)
    assert out["referrers"] == [artifact]
    # the destination lists it, by the referrers API or by the fallback tag
    base = f"http://{dst_reg.host}"
    api = http_request("GET", f"{base}/v2/{dst_repo}/referrers/{image.digest}")
    if api.status == 200:
        listed = [m["digest"] for m in api.json()["manifests"]]
    else:
        tag = image.digest.replace(":", "-")
        listed = [m["digest"] for m in http_request("GET", f"{base}/v2/{dst_repo}/manifests/{tag}",
                                                    headers={"Accept": OCI_INDEX}).json()["manifests"]]
    assert artifact in listed
    blob = http_request("GET", f"{base}/v2/{dst_repo}/manifests/{artifact}", headers={"Accept": OCI_MANIFEST})
    assert blob.status == 200 and sha256_digest(blob.body) == artifact
