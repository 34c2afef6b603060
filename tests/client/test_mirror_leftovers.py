"""An export killed with SIGKILL leaves its hidden staging directory (and
possibly a `.partial` bundle) beside the output; the next export to that
output removes them, but never what a live export still holds, nor the
leftovers of another output."""

from __future__ import annotations

import fcntl

from tests.client.test_mirror_bundle import bundle_manifest, dockyard, kill_when, push_image, unique
from tests.support.content import random_tar_layer
from tests.support.launch import dockyard_command


def _hidden(directory) -> set[str]:
    return {p.name for p in directory.iterdir() if p.name.startswith(".")}


def test_export_killed_midway_leaves_nothing_after_the_next_export(dockyard_registry, tmp_path):
    repo = unique("mirror/killexport")
    push_image(dockyard_registry.url, repo, [random_tar_layer(12 * 1024 * 1024, f"l{i}.bin") for i in range(8)],
               "v1")
    out = tmp_path / "out"
    out.mkdir()
    bundle = out / "b.tar"
    argv = [*dockyard_command(), "mirror", "export", "-q", "--concurrency", "1", "--images",
            f"{dockyard_registry.host}/{repo}:v1", "--output", str(bundle)]
    # killed once a blob has landed in its staging directory
    kill_when(argv, lambda: any(f.is_file() for p in out.glob(".b.tar.staging-*") for f in p.rglob("*")))
    killed = _hidden(out)
    assert any(name.startswith(".b.tar.staging-") for name in killed) and not bundle.exists()

    # a dead writer's half bundle; a live export's (it holds its lock); another output's
    (out / ".b.tar.k3x9q_2a.partial").write_bytes(b"\0" * 4096)
    live = out / ".b.tar.live0001.partial"
    other = out / ".b.tar.old.staging-abcdefgh"
    other.mkdir()
    with open(live, "wb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        dockyard("mirror", "export", "-q", "--images", f"{dockyard_registry.host}/{repo}:v1", "--output", str(bundle))
        assert _hidden(out) == {live.name, other.name}
    assert len(bundle_manifest(bundle)["blobs"]) == 9           # 8 layers and the config, all there
