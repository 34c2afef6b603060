"""Baseline: the peer clients work on this machine against CNCF Distribution.

When a Dockyard interop test fails and this file passes, the bug is in
Dockyard, not in the environment (daemon, podman storage, skopeo policy).
"""

from __future__ import annotations

import json

import pytest

from tests.support.content import write_oci_layout
from tests.support.peers import build_busybox_image

pytestmark = pytest.mark.interop


def test_docker_build_push_to_distribution(dockerd, distribution_registry):
    ref = f"{distribution_registry.host}/baseline/busybox:1"
    build_busybox_image(dockerd, ref)
    dockerd.run("push", ref)
    out = dockerd.run("run", "--rm", "--network", "none", ref, "cat", "/hello.txt")
    assert out.stdout.strip() == "hello"


def test_skopeo_layout_roundtrip_distribution(skopeo, distribution_registry, tmp_path):
    image = write_oci_layout(tmp_path / "src", layer_sizes=[4096, 10000])
    dest = f"docker://{distribution_registry.host}/baseline/layout:v1"
    skopeo.copy(image.ref, dest, "--preserve-digests")
    raw = json.loads(skopeo.inspect(dest, "--raw").stdout)
    assert [l["digest"] for l in raw["layers"]] == list(image.layers)
