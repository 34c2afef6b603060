"""Layer application: every feature of layer.md, on crafted layers."""

from __future__ import annotations

import gzip
import os
import stat
import tarfile

import pytest

from puller.runtime.apply import apply_layer
from puller.runtime.errors import LayerVerificationError
from puller.runtime.options import ApplyOptions
from puller.runtime.snapshots import chain_ids
from tests.unpack.conftest import GZIP, TAR, ZSTD, D, E, F, H, L, diff_id, kind, tar_bytes

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.mark.parametrize("media_type,decompressor", [(TAR, "auto"), (GZIP, "auto"), (GZIP, "pipe"),
                                                     (GZIP, "zlib"), (ZSTD, "auto")])
def test_basic_tree_each_compression(layers, root, media_type, decompressor):
    big = os.urandom(3 << 20)  # more than one read chunk
    stats = layers.apply(root, [D("etc"), F("etc/conf", b"hello\n"), F("bin/tool", big, mode=0o755),
                                L("bin/link", "tool"), D("empty", mode=0o700)],
                         media_type, ApplyOptions(decompressor=decompressor))
    assert (root / "etc/conf").read_bytes() == b"hello\n"
    assert (root / "bin/tool").read_bytes() == big
    assert stat.S_IMODE(os.lstat(root / "bin/tool").st_mode) == 0o755
    assert os.readlink(root / "bin/link") == "tool"
    assert stat.S_IMODE(os.lstat(root / "empty").st_mode) == 0o700
    assert kind(root / "bin") == "dir"  # implicit parent created
    assert stats.entries == 5


def test_diff_id_is_hash_of_uncompressed_stream(layers, root):
    tar = tar_bytes([F("a", b"x")])
    stats = layers.apply(root, tar, GZIP)
    assert stats.diff_id == diff_id(tar)
    assert stats.uncompressed_bytes == len(tar)


def test_diff_id_mismatch_fails(layers, root):
    with pytest.raises(LayerVerificationError):
        layers.apply(root, [F("a", b"x")], GZIP, expected="sha256:" + "0" * 64)


def test_multi_member_gzip(tmp_path, root):
    tar = tar_bytes([F("a", b"1" * 5000), F("b", b"2" * 5000)])
    blob = tmp_path / "multi.gz"
    blob.write_bytes(gzip.compress(tar[:4096]) + gzip.compress(tar[4096:]))
    for dec in ("auto", "zlib", "pipe"):
        r = tmp_path / f"r-{dec}"
        r.mkdir()
        apply_layer(r, blob, GZIP, diff_id(tar), ApplyOptions(decompressor=dec))
        assert (r / "b").read_bytes() == b"2" * 5000


def test_whiteout_removes_lower_file_and_dir(layers, root):
    layers.apply(root, [F("file1", b"1"), F("a/file2", b"2"), D("b"), F("b/x", b"x"), F("c/file3", b"3")])
    layers.apply(root, [F(".wh.file1"), F("a/.wh.file2"), F(".wh.b"), F("file4", b"4")])
    assert not (root / "file1").exists() and not (root / "a/file2").exists() and not (root / "b").exists()
    assert (root / "c/file3").read_bytes() == b"3" and (root / "file4").read_bytes() == b"4"
    assert not any(p.name.startswith(".wh.") for p in root.rglob("*"))


def test_whiteout_does_not_hide_same_layer_entry(layers, root):
    layers.apply(root, [F("x", b"lower")])
    layers.apply(root, [F("x", b"upper"), F(".wh.x")])
    assert (root / "x").read_bytes() == b"upper"


@pytest.mark.parametrize("opaque_first", [True, False])
def test_opaque_dir_hides_lower_keeps_same_layer(layers, root, opaque_first):
    layers.apply(root, [D("a"), D("a/b"), D("a/b/c"), F("a/b/c/bar", b"bar"), F("a/top", b"t"), F("keep", b"k")])
    upper = [D("a"), D("a/b"), D("a/b/c"), F("a/b/c/foo", b"foo")]
    opq = F("a/.wh..wh..opq")
    layers.apply(root, [opq] + upper if opaque_first else upper + [opq])
    assert (root / "a/b/c/foo").read_bytes() == b"foo"
    assert not (root / "a/b/c/bar").exists()
    assert not (root / "a/top").exists()
    assert (root / "keep").exists()
    assert not (root / "a/.wh..wh..opq").exists()


def test_entry_replaces_other_type(layers, root):
    layers.apply(root, [D("d"), F("d/inner", b"1"), F("f", b"file"), L("s", "f")])
    layers.apply(root, [F("d", b"now a file"), D("f"), F("s", b"no longer a link")])
    assert (root / "d").read_bytes() == b"now a file"
    assert kind(root / "f") == "dir"
    assert kind(root / "s") == "file"


@needs_root
def test_dir_mode_and_owner_change_in_later_layer(layers, root):
    layers.apply(root, [D("srv", mode=0o755), F("srv/data", b"d")])
    layers.apply(root, [D("srv", mode=0o700, uid=1234, gid=4321)])
    st = os.lstat(root / "srv")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o700, 1234, 4321)
    assert (root / "srv/data").read_bytes() == b"d"  # contents kept


def test_hardlinks_same_and_lower_layer(layers, root):
    layers.apply(root, [F("base", b"shared")])
    layers.apply(root, [F("new", b"n"), H("new-link", "new"), H("base-link", "base"), H("abs-link", "/base")])
    assert os.lstat(root / "new").st_ino == os.lstat(root / "new-link").st_ino
    assert os.lstat(root / "base").st_ino == os.lstat(root / "base-link").st_ino == os.lstat(root / "abs-link").st_ino


@needs_root
def test_ownership_setuid_after_chown_and_xattr_capability(layers, root):
    cap = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep, v2
    layers.apply(root, [F("suid", b"#!", mode=0o4755, uid=1000, gid=1000),
                        F("sgid", b"#!", mode=0o2750, uid=0, gid=50),
                        F("ping", b"elf", mode=0o755, pax={"SCHILY.xattr.security.capability":
                                                          cap.decode("latin-1")}),
                        L("lnk", "suid", uid=1000, gid=1001)])
    st = os.lstat(root / "suid")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4755, 1000, 1000)
    assert stat.S_IMODE(os.lstat(root / "sgid").st_mode) == 0o2750
    assert os.lstat(root / "lnk").st_uid == 1000 and os.lstat(root / "lnk").st_gid == 1001


@needs_root
def test_xattr_binary_value_roundtrip(tmp_path, layers, root):
    # tarfile writes PAX values as UTF-8; write a raw binary record by hand
    cap = bytes.fromhex("01000002002000000000000000000000000000ff")
    tar = _raw_pax_tar("ping", {b"SCHILY.xattr.security.capability": cap}, b"ELF")
    layers.apply(root, tar)
    assert os.getxattr(root / "ping", "security.capability") == cap


def _raw_pax_tar(name: str, records: dict, data: bytes) -> bytes:
    body = b""
    for k, v in records.items():
        rec = b" " + k + b"=" + v + b"\n"
        n = len(rec) + 1
        while len(str(n).encode()) + len(rec) != n:
            n = len(str(n).encode()) + len(rec)
        body += str(n).encode() + rec
    pax = tarfile.TarInfo("PaxHeaders/" + name)
    pax.type, pax.size = tarfile.XHDTYPE, len(body)
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o755
    out = pax.tobuf(tarfile.USTAR_FORMAT) + body + b"\0" * (-len(body) % 512)
    out += info.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)
    return out + b"\0" * 1024


@needs_root
def test_fifo_and_devices_as_root(layers, root):
    layers.apply(root, [E("dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
                        E("dev/loop", type=tarfile.BLKTYPE, devmajor=7, devminor=0, mode=0o660, gid=6),
                        E("run/fifo", type=tarfile.FIFOTYPE, mode=0o620, uid=5)])
    st = os.lstat(root / "dev/null")
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert stat.S_IMODE(st.st_mode) == 0o666
    assert stat.S_ISBLK(os.lstat(root / "dev/loop").st_mode) and os.lstat(root / "dev/loop").st_gid == 6
    assert kind(root / "run/fifo") == "fifo" and os.lstat(root / "run/fifo").st_uid == 5


def test_mtimes_files_symlinks_and_dirs_after_contents(layers, root):
    layers.apply(root, [D("d", mtime=1_000_000), F("d/f", b"x", mtime=2_000_000), L("d/s", "f", mtime=3_000_000),
                        D("d/sub", mtime=4_000_000), F("d/sub/g", b"y", mtime=5_000_000)])
    assert os.lstat(root / "d").st_mtime == 1_000_000
    assert os.lstat(root / "d/f").st_mtime == 2_000_000
    assert os.lstat(root / "d/s").st_mtime == 3_000_000
    assert os.lstat(root / "d/sub").st_mtime == 4_000_000


def test_long_names_and_links(layers, root):
    deep = "/".join(["d" * 60] * 5) + "/file"
    target = "/".join(["t" * 60] * 3)
    layers.apply(root, [F(deep, b"deep"), L("longlink", target)])
    assert (root / deep).read_bytes() == b"deep"
    assert os.readlink(root / "longlink") == target


def test_gnu_format_long_name(tmp_path, layers, root):
    import io
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("g/" + "n" * 150)
        info.size = 2
        tar.addfile(info, io.BytesIO(b"ok"))
    layers.apply(root, buf.getvalue())
    assert (root / "g" / ("n" * 150)).read_bytes() == b"ok"


def test_chain_ids():
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    import hashlib
    assert chain_ids([a, b]) == [a, "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()]
