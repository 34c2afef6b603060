"""Hostile layers: every entry must stay inside the root, every bound must hold.

Each test writes a sentinel OUTSIDE the root and checks it is untouched; each
would fail against a naive extractor (tarfile.extractall without filters,
os.path.join + open, following symlinks left by a lower layer)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import pytest

from puller.runtime.apply import apply_layer
from puller.runtime.bundle import write_bundle
from puller.runtime.errors import CorruptLayer, LayerTooLarge, LayerVerificationError, UnsafeEntry
from puller.runtime.options import ApplyOptions, UnpackLimits
from tests.support import REPO_ROOT
from tests.support.content import write_oci_layout
from tests.unpack.conftest import GZIP, TAR, D, E, F, H, L, diff_id, kind, tar_bytes

RESOLVERS = [pytest.param(False, id="openat2"), pytest.param(True, id="portable-walk")]


@pytest.fixture
def outside(tmp_path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret").write_text("host data")
    return d


def _opts(portable: bool, **kw) -> ApplyOptions:
    return ApplyOptions(force_portable_resolver=portable, **kw)


def _untouched(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_text() == "host data"
    assert os.lstat(outside / "secret").st_nlink == 1


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "./../../../../escape"])
def test_dotdot_name_is_refused(layers, root, outside, name):
    with pytest.raises(UnsafeEntry):
        layers.apply(root, [F(name, b"x")])
    assert not (root.parent / "escape").exists()


@pytest.mark.parametrize("portable", [False, True], ids=["openat2", "portable-walk"])
def test_absolute_name_lands_inside_root(layers, root, outside, portable):
    layers.apply(root, [F(str(outside / "secret"), b"overwritten"), F("/abs", b"a")], options=_opts(portable))
    _untouched(outside)
    assert (root / str(outside / "secret").lstrip("/")).read_bytes() == b"overwritten"
    assert (root / "abs").read_bytes() == b"a"


@pytest.mark.parametrize("portable", [False, True], ids=["openat2", "portable-walk"])
def test_write_through_absolute_symlink_from_lower_layer(layers, root, outside, portable):
    # CVE-2021-29136 / CVE-2021-32760 / CVE-2014-9356 shape: lower layer plants a
    # symlink to a host directory, upper layer writes "through" it
    layers.apply(root, [L("etc", str(outside))], options=_opts(portable))
    # resolved in the root, the link's target does not exist: refused, nothing written
    with pytest.raises(UnsafeEntry):
        layers.apply(root, [F("etc/secret", b"pwned"), F("etc/new", b"pwned")], options=_opts(portable))
    _untouched(outside)
    # once the target exists INSIDE the root, writes go there
    layers.apply(root, [D(str(outside)), F("etc/new", b"inside")], options=_opts(portable))
    _untouched(outside)
    assert (root / str(outside).lstrip("/") / "new").read_bytes() == b"inside"


@pytest.mark.parametrize("portable", [False, True], ids=["openat2", "portable-walk"])
def test_write_through_dotdot_symlink_stays_in_root(layers, root, outside, portable):
    layers.apply(root, [L("up", "../../../../../../.."), L("deep/up2", "../up")], options=_opts(portable))
    layers.apply(root, [F(f"up/{outside.name}/secret", b"pwned"), F("deep/up2/x", b"in")], options=_opts(portable))
    _untouched(outside)
    assert (root / outside.name / "secret").read_bytes() == b"pwned"  # clamped at the root
    assert (root / "x").read_bytes() == b"in"


@pytest.mark.parametrize("portable", [False, True], ids=["openat2", "portable-walk"])
def test_symlink_to_etc_then_file_written_through_it(layers, root, portable, tmp_path):
    # the rootfs has its own /etc: a link "/etc" must mean the ROOT's /etc
    layers.apply(root, [D("etc"), F("etc/passwd", b"root:x:0:0::/:/bin/sh\n"), L("evil", "/etc")],
                 options=_opts(portable))
    before = Path("/etc/passwd").read_bytes()
    layers.apply(root, [F("evil/passwd", b"evil:x:0:0::/:/bin/sh\n")], options=_opts(portable))
    assert Path("/etc/passwd").read_bytes() == before
    assert (root / "etc/passwd").read_bytes() == b"evil:x:0:0::/:/bin/sh\n"


@pytest.mark.parametrize("portable", [False, True], ids=["openat2", "portable-walk"])
def test_hardlink_to_outside_path(layers, root, outside, portable):
    with pytest.raises(UnsafeEntry):
        layers.apply(root, [H("x", f"../{outside.name}/secret")], options=_opts(portable))
    # absolute link target: resolved in the root, where it does not exist
    with pytest.raises(UnsafeEntry):
        layers.apply(root, [H("y", str(outside / "secret"))], options=_opts(portable))
    # through a symlinked directory planted by a lower layer
    layers.apply(root, [L("lnk", str(outside))], options=_opts(portable))
    with pytest.raises(UnsafeEntry):
        layers.apply(root, [H("z", "lnk/secret")], options=_opts(portable))
    _untouched(outside)


@pytest.mark.parametrize("portable", [False, True], ids=["openat2", "portable-walk"])
def test_whiteout_through_symlink_does_not_delete_host_file(layers, root, outside, portable):
    layers.apply(root, [L("lnk", str(outside)), L("rel", f"../{outside.name}")], options=_opts(portable))
    layers.apply(root, [F("lnk/.wh.secret"), F("rel/.wh.secret"), F("lnk/.wh..wh..opq")], options=_opts(portable))
    _untouched(outside)
    assert kind(root / "lnk") == "symlink"


@pytest.mark.parametrize("name", ["sub/.wh...", "sub/.wh..", ".wh.", "sub/.wh."])
def test_whiteout_naming_dot_or_dotdot_is_refused(layers, root, outside, name):
    layers.apply(root, [D("sub"), F("sub/f", b"x")])
    with pytest.raises(UnsafeEntry):
        layers.apply(root, [F(name)])
    assert (root / "sub/f").exists()
    _untouched(outside)


@pytest.mark.parametrize("portable", [False, True], ids=["openat2", "portable-walk"])
def test_symlink_loop_fails_cleanly(layers, root, portable):
    layers.apply(root, [L("a", "b"), L("b", "a"), L("self", "self")], options=_opts(portable))
    start = time.monotonic()
    for target in ("a/file", "self/file"):
        with pytest.raises(UnsafeEntry):
            layers.apply(root, [F(target, b"x")], options=_opts(portable))
    assert time.monotonic() - start < 10


def test_device_node_without_root_is_skipped(tmp_path):
    """A real unprivileged process (uid 65534) applies a layer with devices."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")
    work = Path(tempfile.mkdtemp(prefix="dy-nonroot-", dir="/tmp"))
    try:
        os.chmod(work, 0o755)
        tar = tar_bytes([E("dev/sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0),
                         E("dev/kmsg", type=tarfile.CHRTYPE, devmajor=1, devminor=11),
                         E("fifo", type=tarfile.FIFOTYPE, mode=0o640), F("ok", b"fine", uid=0)])
        (work / "layer.tar").write_bytes(tar)
        (work / "root").mkdir()
        os.chown(work / "root", 65534, 65534)
        script = (
            "import os,sys,json,fcntl,ctypes; from puller.runtime.apply import apply_layer;"
            "os.setgroups([]); os.setgid(65534); os.setuid(65534);"
            "assert os.geteuid() == 65534;"
            f"s=apply_layer({str(work / 'root')!r}, {str(work / 'layer.tar')!r},"
            f" 'application/vnd.oci.image.layer.v1.tar', {diff_id(tar)!r});"
            "print(json.dumps({'skipped': s.skipped_devices}))")
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["skipped"] == 2
        assert not (work / "root/dev/sda").exists() and not (work / "root/dev/kmsg").exists()
        assert (work / "root/ok").read_bytes() == b"fine"
        assert kind(work / "root/fifo") == "fifo"
        assert os.lstat(work / "root/ok").st_uid == 65534
    finally:
        subprocess.run(["rm", "-rf", str(work)])


def test_gzip_bomb_stops_at_limit(tmp_path, root):
    # ~512 MiB of zeros inside a valid tar entry, about 0.5 MiB compressed
    header = tarfile.TarInfo("zeros")
    header.size = 512 << 20
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    blob = tmp_path / "bomb.gz"
    with open(blob, "wb") as f:
        f.write(comp.compress(header.tobuf(tarfile.USTAR_FORMAT)))
        chunk = b"\0" * (1 << 20)
        for _ in range(512):
            f.write(comp.compress(chunk))
        f.write(comp.flush())
    assert blob.stat().st_size < 2 << 20
    for dec in ("auto", "zlib", "pipe"):
        r = tmp_path / f"r-{dec}"
        r.mkdir()
        start = time.monotonic()
        with pytest.raises(LayerTooLarge):
            apply_layer(r, blob, GZIP, None, ApplyOptions(limits=UnpackLimits(max_layer_bytes=16 << 20),
                                                          decompressor=dec))
        assert time.monotonic() - start < 20
        assert (r / "zeros").stat().st_size <= 16 << 20


def test_huge_pax_header_is_refused(tmp_path, root):
    pax = tarfile.TarInfo("PaxHeaders/x")
    pax.type, pax.size = tarfile.XHDTYPE, 8 << 20
    blob = tmp_path / "pax.tar"
    blob.write_bytes(pax.tobuf(tarfile.USTAR_FORMAT) + b"1" * (8 << 20) + b"\0" * 1024)
    with pytest.raises(LayerTooLarge):
        apply_layer(root, blob, TAR, None)


def test_tar_truncated_in_the_middle_of_an_entry(tmp_path, layers, root):
    tar = tar_bytes([F("a", b"A" * 100), F("big", os.urandom(100_000))])
    cut = tar[:len(tar) // 2]
    # no diff ID given: the structural check alone must catch it
    with pytest.raises(CorruptLayer):
        layers.apply(root, cut, TAR, expected=False)
    r2 = tmp_path / "r2"
    r2.mkdir()
    blob = tmp_path / "cut.gz"
    blob.write_bytes(gzip.compress(tar)[:-2000])
    for dec in ("auto", "zlib", "pipe"):
        with pytest.raises(CorruptLayer):
            apply_layer(r2, blob, GZIP, None, ApplyOptions(decompressor=dec))


def test_garbage_header_is_refused(layers, root):
    tar = tar_bytes([F("a", b"x")])
    bad = tar[:512 * 2] + b"garbage!" * 64 + b"\0" * 1024
    with pytest.raises(CorruptLayer):
        layers.apply(root, bad, TAR, expected=False)


def test_diff_id_mismatch_fails_even_when_tar_is_valid(layers, root):
    other = tar_bytes([F("a", b"different")])
    with pytest.raises(LayerVerificationError):
        layers.apply(root, [F("a", b"x")], GZIP, expected=diff_id(other))


# ---- bundles -------------------------------------------------------------------------------


def _layout(tmp_path, layer_tars: list[bytes], config_extra: dict | None = None, diff_ids=None):
    from tests.support.content import image_config, sha256_digest
    cfg = image_config(diff_ids or [sha256_digest(t) for t in layer_tars], cmd=["/bin/true"])
    cfg["config"].update(config_extra or {})
    return write_oci_layout(tmp_path / "layout", layer_tars, cfg)


def test_bundle_is_0700_and_atomic(tmp_path):
    good = tar_bytes([F("bin/true", b"x", mode=0o755)])
    lay = _layout(tmp_path, [good])
    from puller.store import LocalStore
    from puller.runtime.image import layer_sequence
    store = LocalStore(lay.path)
    _, manifest, config = store.image_for_platform("latest")
    dest = tmp_path / "bundle"
    write_bundle(dest, layer_sequence(manifest, config, store.blob_path), config, cache=None)
    assert os.stat(dest).st_mode & 0o777 == 0o700
    assert (dest / "rootfs/bin/true").exists() and (dest / "config.json").exists()


def test_failed_unpack_leaves_no_bundle_cli(tmp_path):
    good = tar_bytes([F("bin/true", b"x", mode=0o755)])
    bad = tar_bytes([F("../../escape", b"x")])
    from tests.support.content import sha256_digest
    lay = _layout(tmp_path, [good, bad])
    dest = tmp_path / "out" / "bundle"
    dest.parent.mkdir()
    proc = subprocess.run([sys.executable, "-m", "puller", "unpack", "--cache", str(tmp_path / "cache"),
                           f"oci:{lay.path}:latest", str(dest)], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dockyard: error:") and "outside the root" in lines[0]
    assert not dest.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no DIR.tmp-* left either
    assert not (tmp_path / "escape").exists()
    # wrong diff ID in the config: same guarantee
    lay2 = _layout(tmp_path / "second", [good], diff_ids=[sha256_digest(b"not it")]) \
        if (tmp_path / "second").mkdir() is None else None
    proc = subprocess.run([sys.executable, "-m", "puller", "unpack", "--no-cache",
                           f"oci:{lay2.path}:latest", str(dest)], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120)
    assert proc.returncode != 0 and "diff ID" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert list((tmp_path / "out").iterdir()) == []
