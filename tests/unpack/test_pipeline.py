"""Two-phase apply (stage a layer's files while its parent is applied) and the
pull pipeline that uses it: same trees as the one-pass apply, same checks."""

from __future__ import annotations

import asyncio
import os
import tarfile
from pathlib import Path

import pytest

from puller.runtime.apply import apply_layer
from puller.runtime.errors import LayerVerificationError, UnsafeEntry
from puller.runtime.image import _LayerPipeline
from puller.runtime.options import ApplyOptions
from puller.runtime.snapshots import SnapshotCache, chain_ids
from puller.runtime.stage import apply_staged, stage_layer
from puller.runtime.tree import materialize
from tests.unpack.conftest import GZIP, TAR, D, E, F, H, L, diff_id, tar_bytes
from tests.unpack.test_config_and_cache import _listing

# every directory has an entry: an implicit one's mtime is "now", which differs run to run
LOWER = [D("."), D("etc"), F("etc/conf", b"old"), F("etc/keep", b"k"), D("opq"), F("opq/gone", b"g"),
         F("shared", b"s", mode=0o644), D("dir-to-file"), F("dir-to-file/x", b"x"), F("bye", b"b")]
UPPER = [D("."), D("bin"), D("a"), D("opq"), D("etc"), F("etc/conf", b"new", mode=0o600, uid=7, gid=8), F(".wh.bye"), F("opq/.wh..wh..opq"),
         F("opq/new", b"n"), F("dir-to-file", b"now a file"), H("hl", "etc/conf"),
         H("shared-link", "shared", mode=0o600), L("sym", "/etc/keep"), F("twice", b"1"), F("twice", b"2"),
         F("x", b"x", pax={"SCHILY.xattr.user.k": "v"}), F("bin/su", b"s", mode=0o4755),
         E("fifo", type=tarfile.FIFOTYPE), F("big", os.urandom(3 << 20)), F("a/.wh.missing")]


def test_staged_apply_makes_the_same_tree_as_one_pass(tmp_path, layers):
    lower, upper = tar_bytes(LOWER), tar_bytes(UPPER)
    one, two = tmp_path / "one", tmp_path / "two"
    for r in (one, two):
        r.mkdir()
        apply_layer(r, layers.blob(lower), TAR, diff_id(lower))
    apply_layer(one, layers.blob(upper, GZIP), GZIP, diff_id(upper))
    stage_dir = tmp_path / "stage"
    stage_dir.mkdir()
    staged = stage_layer(layers.blob(upper, GZIP), GZIP, diff_id(upper), stage_dir)
    assert staged is not None and staged.stats.diff_id == diff_id(upper)
    stats = apply_staged(two, staged)
    assert stats.diff_id == diff_id(upper)
    assert _listing(one) == _listing(two)
    assert os.listdir(stage_dir) == []  # every staged file was placed (the first "twice", then replaced)


def test_staging_verifies_the_diff_id_and_gives_up_past_the_entry_cap(tmp_path, layers):
    upper = tar_bytes(UPPER)
    (tmp_path / "s1").mkdir()
    with pytest.raises(LayerVerificationError):
        stage_layer(layers.blob(upper), TAR, "sha256:" + "0" * 64, tmp_path / "s1")
    (tmp_path / "s2").mkdir()
    assert stage_layer(layers.blob(upper), TAR, None, tmp_path / "s2", max_entries=3) is None


def test_staged_unsafe_entry_is_refused_when_placed(tmp_path, layers):
    bad = tar_bytes([F("ok", b"1"), F("../../escape", b"x")])
    (tmp_path / "s").mkdir()
    staged = stage_layer(layers.blob(bad), TAR, None, tmp_path / "s")
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(UnsafeEntry):
        apply_staged(root, staged)
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()


def _pipeline_run(cache: SnapshotCache, blobs: list[tuple[Path, str]]) -> str:
    async def main():
        pipeline = _LayerPipeline(cache, ApplyOptions(), parallel=2)
        for i, (path, digest) in enumerate(blobs):
            await pipeline(i, {"digest": digest, "mediaType": GZIP}, path)  # returns at once
        await pipeline.finish(failed=False)
        return await pipeline.tasks[-1]
    return asyncio.run(main())


def test_pipeline_stages_later_layers_and_builds_every_snapshot(tmp_path, layers):
    tars = [tar_bytes(LOWER), tar_bytes(UPPER), tar_bytes([D("."), D("etc"), F("etc/conf", b"third"), F("more", os.urandom(1 << 20))])]
    blobs = [(layers.blob(t, GZIP), "sha256:%064x" % i) for i, t in enumerate(tars)]
    cache = SnapshotCache(tmp_path / "cache")
    staged_calls = []
    original = cache.stage
    cache.stage = lambda *a, **k: staged_calls.append(a[0]) or original(*a, **k)
    top = _pipeline_run(cache, blobs)
    chains = chain_ids([diff_id(t) for t in tars])
    assert top == chains[-1] and all(cache.has(c) for c in chains)
    assert staged_calls  # the later layers arrived while the first was being applied
    assert os.listdir(cache.staging) == []
    # the same snapshots as a serial build
    serial = SnapshotCache(tmp_path / "serial")
    ref = serial.ensure([(p, GZIP, diff_id(t)) for (p, _), t in zip(blobs, tars)])
    assert _listing(cache.path(top)) == _listing(ref)
    assert (cache.path(chains[0]) / "etc/conf").read_bytes() == b"old"  # lower snapshots untouched
    assert cache.known_diff_id(blobs[1][1]) == diff_id(tars[1])


def test_pipeline_error_in_a_middle_layer_is_raised_and_cleaned_up(tmp_path, layers):
    tars = [tar_bytes([F("a", os.urandom(2 << 20))]), tar_bytes([F("../../escape", b"x")]), tar_bytes([F("c", b"c")])]
    blobs = [(layers.blob(t, GZIP), "sha256:%064x" % i) for i, t in enumerate(tars)]
    cache = SnapshotCache(tmp_path / "cache")
    with pytest.raises(UnsafeEntry):
        _pipeline_run(cache, blobs)
    assert os.listdir(cache.staging) == []
    assert cache.has(diff_id(tars[0])) and len(os.listdir(cache.snapshots)) == 1


def test_pipeline_bounds_layers_staged_and_waiting(tmp_path, layers, monkeypatch):
    tars = [tar_bytes([D("."), F(f"f{i}", os.urandom(256 << 10))]) for i in range(8)]
    blobs = [(layers.blob(t, GZIP), "sha256:%064x" % i) for i, t in enumerate(tars)]
    cache = SnapshotCache(tmp_path / "cache")
    peak = []
    original = cache.stage

    async def main():
        pipeline = _LayerPipeline(cache, ApplyOptions(), parallel=1)

        def stage(*a, **k):
            peak.append(pipeline.waiting)
            return original(*a, **k)
        cache.stage = stage
        for i, (path, digest) in enumerate(blobs):
            await pipeline(i, {"digest": digest, "mediaType": GZIP}, path)
        await pipeline.finish(failed=False)
        return await pipeline.tasks[-1], pipeline.waiting
    top, waiting = asyncio.run(main())
    assert top == chain_ids([diff_id(t) for t in tars])[-1] and waiting == 0
    assert peak and max(peak) <= 2  # 2 x parallel
    assert sorted(os.listdir(cache.path(top))) == [f"f{i}" for i in range(8)]


# ---- through a real registry: `dockyard unpack` pulls and applies at once -----------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    from tests.support.launch import launch_dockyard
    server = launch_dockyard(tmp_path_factory.mktemp("registry"))
    yield server
    server.stop()


def _push_image(registry, repo: str, tars: list[bytes]) -> str:
    import gzip
    import json
    from tests.support.content import OCI_MANIFEST, image_config, sha256_digest
    from tests.support.registry_http import push_blob, put_manifest
    base = f"http://{registry.host}"
    blobs = [gzip.compress(t, 1) for t in tars]
    config = json.dumps(image_config([sha256_digest(t) for t in tars], cmd=["/bin/sh"])).encode()
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": push_blob(base, repo, config), "size": len(config)},
                "layers": [{"mediaType": GZIP, "digest": push_blob(base, repo, b), "size": len(b)} for b in blobs]}
    assert put_manifest(base, repo, "1", manifest).status == 201
    return f"{registry.host}/{repo}:1"


def _unpack(tmp_path, ref: str, name: str):
    import subprocess
    import sys
    from tests.support import REPO_ROOT
    return subprocess.run([sys.executable, "-m", "puller", "unpack", "-q", "--plain-http",
                           "--store", str(tmp_path / "store"), "--cache", str(tmp_path / "cache"),
                           ref, str(tmp_path / name)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)


def test_pulled_multi_layer_unpack_matches_the_layers(tmp_path, registry):
    tars = [tar_bytes(LOWER), tar_bytes([D("."), F("big", os.urandom(4 << 20))]), tar_bytes(UPPER)]
    ref = _push_image(registry, "pipeline/ok", tars)
    proc = _unpack(tmp_path, ref, "bundle")
    assert proc.returncode == 0, proc.stderr
    # the same tree as a serial build of the cache (layer by layer, no staging), copied out
    serial = SnapshotCache(tmp_path / "serial")
    blobs = []
    for i, t in enumerate(tars):
        (tmp_path / f"l{i}.tar").write_bytes(t)
        blobs.append((tmp_path / f"l{i}.tar", TAR, diff_id(t)))
    materialize(serial.ensure(blobs), tmp_path / "ref")  # link counts as in a bundle
    got, want = _listing(tmp_path / "bundle/rootfs"), _listing(tmp_path / "ref")
    got["nodes"].pop("."), want["nodes"].pop(".")  # the rootfs directory's own mtime: when it was made
    assert got == want and "big" in got["nodes"] and "opq/gone" not in got["nodes"]
    cache = SnapshotCache(tmp_path / "cache")
    assert cache.has(chain_ids([diff_id(t) for t in tars])[-1]) and os.listdir(cache.staging) == []


def test_pulled_unpack_with_an_unsafe_layer_fails_cleanly(tmp_path, registry):
    tars = [tar_bytes([F("a", os.urandom(2 << 20))]), tar_bytes([F("../../escape", b"x")]),
            tar_bytes([F("c", os.urandom(1 << 20))])]
    ref = _push_image(registry, "pipeline/bad", tars)
    proc = _unpack(tmp_path, ref, "bundle")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dockyard: error:") and "outside the root" in lines[0], lines
    assert not (tmp_path / "bundle").exists() and not list(tmp_path.glob("bundle.tmp-*"))
    assert os.listdir(tmp_path / "cache/staging") == []
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()
