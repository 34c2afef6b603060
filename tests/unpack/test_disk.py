"""Ten containers of the Debian-based image cost little more disk than one:
each bundle's rootfs is an overlay over the cached snapshot (only what the
container writes is its own), measured with `du` on the data directory, as
root and as an ordinary user in a user namespace (overlay there, where the
kernel allows it)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO_ROOT
from tests.support.content import OCI_LAYER_GZIP, OciLayoutWriter, image_config, sha256_digest
from tests.support.debian import debian_layer
from tests.support.peers import missing_peer, require_root, require_tool

pytestmark = pytest.mark.interop
CONTAINERS = 10


@pytest.fixture(scope="module")
def debian_image(tmp_path_factory) -> str:
    require_root()
    require_tool("runc")
    cache = Path(os.environ.get("DOCKYARD_TEST_CACHE") or Path.home() / ".cache" / "dockyard-tests")
    layer = debian_layer(cache, on_missing=missing_peer).read_bytes()
    config = image_config([sha256_digest(gzip.decompress(layer))], cmd=["/bin/bash"])
    config["config"]["Env"] = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    writer = OciLayoutWriter(tmp_path_factory.mktemp("debian") / "layout")
    writer.tag("v1", writer.image([layer], config, layer_media_type=OCI_LAYER_GZIP))
    writer.close()
    return f"oci:{writer.dir}:v1"


def du(path: Path) -> int:
    out = subprocess.run(["du", "-s", "-x", "--block-size=1", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def test_ten_containers_cost_less_than_twice_one(debian_image, tmp_path):
    data = tmp_path / "data"
    argv = [sys.executable, "-m", "puller", "run", "-q", "--store", str(data / "store"), "--runtime", "runc",
            debian_image, "/bin/sh", "-c", "echo $$ > /written-by-the-container"]
    sizes = []
    for i in range(CONTAINERS):
        proc = subprocess.run([*argv[:4], "--name", f"disk-{i}", *argv[4:]], capture_output=True, text=True,
                              cwd=REPO_ROOT, timeout=300, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr
        if i == 0:
            sizes.append(du(data))
    sizes.append(du(data))
    bundles = sorted((data / "unpacked" / "containers").iterdir())
    assert len(bundles) == CONTAINERS            # all ten kept (no --rm), each with its own writes
    assert all((b / "upper" / "written-by-the-container").is_file() for b in bundles)
    one, ten = sizes
    assert one > 50_000_000                      # a real Debian rootfs was unpacked
    assert ten < 2 * one, f"one container: {one} bytes, ten: {ten} bytes"
