"""Bundles read by other tools as they are: `skopeo copy oci-archive:` takes
a full bundle (image spec image-layout.md: the bundle is a layout in a tar),
and with `--format docker-archive` so does `docker load`; a Docker-built
image carried through a bundle into CNCF Distribution is pulled and run by
docker, digest unchanged; and the Debian-based test image (debootstrap, built
once and cached: tests.support.debian) inside a multi-arch index with a
signature and an SBOM as referrers makes the whole round trip, signed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.client.test_mirror_bundle import (SBOM_TYPE, SIGNATURE_TYPE, _body, dockyard, dockyard_json,
                                             manifest_head, multiarch_with_referrers, push_image, push_index,
                                             push_referrer, referrer_digests, unique, write_key)
from tests.support.content import (OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, image_config, random_tar_layer,
                                   sha256_digest, tar_layer)
from tests.support.debian import debian_layer
from tests.support.peers import build_busybox_image, missing_peer
from tests.support.registry_http import http_request, push_blob, put_manifest

pytestmark = pytest.mark.interop


@pytest.fixture(scope="session")
def debian_image_layer() -> tuple[bytes, str]:
    """(the gzipped layer, its diff_id): built once, cached across sessions by its inputs."""
    cache = Path(os.environ.get("DOCKYARD_TEST_CACHE") or Path.home() / ".cache" / "dockyard-tests")
    layer = debian_layer(cache, on_missing=missing_peer).read_bytes()
    return layer, sha256_digest(gzip.decompress(layer))


def _push_debian(url: str, repo: str, layer: bytes, diff_id: str) -> dict:
    config = image_config([diff_id], cmd=["/bin/bash"])
    config["config"]["Env"] = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    config_bytes = _body(config)
    manifest = _body({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                      "config": {"mediaType": OCI_CONFIG, "digest": push_blob(url, repo, config_bytes),
                                 "size": len(config_bytes)},
                      "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": push_blob(url, repo, layer),
                                  "size": len(layer)}]})
    digest = sha256_digest(manifest)
    assert put_manifest(url, repo, digest, manifest, OCI_MANIFEST).status == 201
    return {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest),
            "platform": {"os": "linux", "architecture": "amd64"}}


def test_debian_image_in_a_signed_multiarch_bundle_round_trip(dockyard_registry, distribution_registry, dockerd,
                                                              debian_image_layer, tmp_path):
    layer, diff_id = debian_image_layer
    source, target = dockyard_registry, distribution_registry
    repo, prefix = unique("mirror/debian"), unique("gap")
    debian = _push_debian(source.url, repo, layer, diff_id)
    arm64 = push_image(source.url, repo, [tar_layer({"etc/os-release": b"ID=arm\n"})], architecture="arm64")
    index = push_index(source.url, repo, "12", [debian, arm64])
    signature = push_referrer(source.url, repo, index, SIGNATURE_TYPE, b'{"sig": "' + os.urandom(8).hex().encode()
                              + b'"}')
    sbom = push_referrer(source.url, repo, debian, SBOM_TYPE, b'{"spdxVersion": "SPDX-2.3", "name": "debian"}')
    key, public = write_key(tmp_path / "k.pem", "ecdsa")
    bundle = tmp_path / "debian.tar"

    exported = dockyard_json("mirror", "export", "--images", f"{source.host}/{repo}:12", "--referrers",
                             "--sign-key", str(key), "--output", str(bundle))
    assert exported["signed"] and exported["referrers"] == 2 and exported["carried_bytes"] > len(layer)
    imported = dockyard_json("mirror", "import", str(bundle), "--to", f"{target.host}/{prefix}",
                             "--verify-key", str(public))
    dest = f"{prefix}/{repo}"
    assert imported["signature"] == "verified" and imported["tags"] == [f"{target.host}/{dest}:12"]
    # digests preserved (distribution spec "Pulling manifests"); the layer's bytes hash to its name
    assert manifest_head(target.url, dest, "12") == index["digest"]
    for descriptor in (debian, arm64, signature, sbom):
        assert manifest_head(target.url, dest, descriptor["digest"]) == descriptor["digest"]
    assert signature["digest"] in referrer_digests(target.url, dest, index["digest"])
    assert sbom["digest"] in referrer_digests(target.url, dest, debian["digest"])
    carried = http_request("GET", f"{target.url}/v2/{dest}/blobs/{sha256_digest(layer)}")
    assert carried.status == 200 and "sha256:" + hashlib.sha256(carried.body).hexdigest() == sha256_digest(layer)

    # a real client pulls the carried Debian by digest and runs it
    ref = f"{target.host}/{dest}@{debian['digest']}"
    dockerd.run("pull", ref)
    ran = dockerd.run("run", "--rm", "--network", "none", ref, "cat", "/etc/debian_version")
    assert ran.stdout.strip().startswith("12"), ran.stdout


def test_skopeo_copies_a_full_bundle_from_oci_archive(dockyard_registry, distribution_registry, skopeo, tmp_path):
    repo = unique("mirror/skopeo")
    single = push_image(dockyard_registry.url, repo, [tar_layer({"a": b"one"}), random_tar_layer(100_000)], "one")
    image = multiarch_with_referrers(dockyard_registry.url, repo, "multi")
    one, multi = f"{dockyard_registry.host}/{repo}:one", f"{dockyard_registry.host}/{repo}:multi"

    bundle = tmp_path / "one.tar"
    dockyard("mirror", "export", "--images", one, "--output", str(bundle), "-q")
    dest = f"{distribution_registry.host}/{unique('skopeo')}/app:one"
    skopeo.copy(f"oci-archive:{bundle}", f"docker://{dest}", "--preserve-digests")
    assert json.loads(skopeo.inspect(f"docker://{dest}").stdout)["Digest"] == single["digest"]

    # several images in one bundle: skopeo picks one by its ref.name, every platform with --all
    both = tmp_path / "both.tar"
    dockyard("mirror", "export", "--images", one, multi, "--referrers", "--output", str(both), "-q")
    dest = f"{distribution_registry.host}/{unique('skopeo')}/app:multi"
    skopeo.copy(f"oci-archive:{both}:{multi}", f"docker://{dest}", "--all", "--preserve-digests")
    raw = skopeo.inspect("--raw", f"docker://{dest}").stdout
    assert {m["digest"] for m in json.loads(raw)["manifests"]} == {image["amd64"], image["arm64"]}
    repo_dest = dest.split("/", 1)[1].rsplit(":", 1)[0]
    assert manifest_head(distribution_registry.url, repo_dest, "multi") == image["index"]


def test_docker_loads_a_docker_archive_bundle_and_runs_it(dockyard_registry, distribution_registry, dockerd,
                                                          skopeo, tmp_path):
    name = f"{dockyard_registry.host}/{unique('mirror/docker')}/busybox:v1"
    build_busybox_image(dockerd, name, run_step="echo carried-across-the-gap > /hello.txt")
    dockerd.run("push", name)
    pushed = dockerd.run("image", "inspect", "-f", "{{index .RepoDigests 0}}", name).stdout.strip()

    bundle = tmp_path / "docker.tar"
    exported = dockyard_json("mirror", "export", "--images", name, "--format", "docker-archive",
                             "--output", str(bundle))
    assert pushed.endswith("@" + exported["images"][0]["digest"])
    dockerd.run("rmi", name)
    loaded = dockerd.run("load", "-i", str(bundle)).stdout
    assert name in loaded
    ran = dockerd.run("run", "--rm", "--network", "none", name, "cat", "/hello.txt")
    assert ran.stdout.strip() == "carried-across-the-gap"

    # skopeo reads the same bundle as an OCI archive (a Docker-typed image in it)
    inspected = json.loads(skopeo.run("inspect", f"oci-archive:{bundle}").stdout)
    assert inspected["Digest"] == exported["images"][0]["digest"]

    # the same bundle imported into Distribution: docker pulls it by the digest it was built with
    prefix = unique("gap")
    dockyard("mirror", "import", str(bundle), "--to", f"{distribution_registry.host}/{prefix}", "-q")
    repo = name.split("/", 1)[1].rsplit(":", 1)[0]
    carried = f"{distribution_registry.host}/{prefix}/{repo}@{exported['images'][0]['digest']}"
    dockerd.run("pull", carried)
    ran = dockerd.run("run", "--rm", "--network", "none", carried, "cat", "/hello.txt")
    assert ran.stdout.strip() == "carried-across-the-gap"
