"""An export killed with SIGKILL leaves its hidden `.partial` bundle (and,
when it stages blobs first, its staging directory) beside the output; the next export to that
output removes them, but never what a live export still holds, nor the
leftovers of another output."""

from __future__ import annotations

import fcntl

from tests.client.test_mirror_bundle import bundle_manifest, dockyard, kill_when, push_image, unique
from tests.support.content import random_tar_layer, sha256_digest
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
    export = [*dockyard_command(), "mirror", "export", "-q", "--concurrency", "1", "--images",
              f"{dockyard_registry.host}/{repo}:v1", "--output", str(bundle)]
    # a compressed bundle stages its blobs first: killed once one has landed there
    kill_when(export + ["--zstd"],
              lambda: any(f.is_file() for p in out.glob(".b.tar.staging-*") for f in p.rglob("*")))
    staged = _hidden(out)
    assert [n for n in staged if n.startswith(".b.tar.staging-")] and not bundle.exists(), staged
    # a plain one is written in place: killed once a blob has landed in its hidden .partial;
    # that export's start removed the dead one's staging directory
    kill_when(export, lambda: any(p.stat().st_blocks * 512 >= 12 * 1024 * 1024 for p in out.glob(".b.tar.*.partial")))
    partial = _hidden(out)
    assert not staged & partial and [n for n in partial if n.endswith(".partial")] and not bundle.exists(), partial

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


def test_export_of_a_blob_with_wrong_bytes_leaves_no_bundle(start_dockyard, tmp_path):
    # blobs go straight into the bundle's hidden file: a blob that does not hash to its name
    # (distribution spec "Content Verification") fails the export, and nothing stays behind
    from storage import layout
    source = start_dockyard()
    repo = unique("mirror/badblob")
    bad = random_tar_layer(3 * 1024 * 1024, "bad.bin")
    push_image(source.url, repo, [random_tar_layer(200_000, "good.bin"), bad], "v1")
    stored = source.storage / layout.blob_data(sha256_digest(bad)).lstrip("/")
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF                                      # same size, other bytes
    stored.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    failed = dockyard("mirror", "export", "-q", "--images", f"{source.host}/{repo}:v1", "--output",
                      str(out / "b.tar"), check=False)
    assert failed.returncode == 1 and sha256_digest(bad) in failed.stderr, failed.stderr
    assert list(out.iterdir()) == []
