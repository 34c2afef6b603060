"""Bundles read by other tools as they are: `skopeo copy oci-archive:` takes
a full bundle (image spec image-layout.md: the bundle is a layout in a tar),
and with `--format docker-archive` so does `docker load`; a Docker-built
image carried through a bundle into CNCF Distribution is pulled and run by
docker, digest unchanged.
"""

from __future__ import annotations

import json

import pytest

from tests.client.test_mirror_bundle import (dockyard, dockyard_json, manifest_head, multiarch_with_referrers,
                                             push_image, unique)
from tests.support.content import random_tar_layer, tar_layer
from tests.support.peers import build_busybox_image

pytestmark = pytest.mark.interop


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
