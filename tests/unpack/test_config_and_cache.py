"""config.json from an untrusted image config; the chainID snapshot cache."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from puller.runtime.apply import apply_layer
from puller.runtime.errors import ConfigError
from puller.runtime.snapshots import SnapshotCache, boot_id, chain_ids
from puller.runtime.spec import RunSettings, Volume, resolve_user, runtime_config, safe_workdir
from puller.runtime.tree import copy_tree, materialize
from tests.unpack.conftest import TAR, D, E, F, H, L, diff_id, tar_bytes

PASSWD = b"root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1001:A:/home/alice:/bin/sh\nbob:x:1002:1002::/b:/bin/sh\n"
GROUP = b"root:x:0:\nalice:x:1001:\nstaff:x:50:alice,bob\nwheel:x:10:alice\nbob:x:1002:\n"


@pytest.fixture
def image_root(layers, root):
    layers.apply(root, [F("etc/passwd", PASSWD), F("etc/group", GROUP), D("home/alice"), D("data")])
    return root


@pytest.mark.parametrize("spec,expected", [
    ("", (0, 0, ())), ("alice", (1000, 1001, (50, 10))), ("1000", (1000, 1001, ())),
    ("alice:staff", (1000, 50, ())), ("alice:7", (1000, 7, ())), ("4242", (4242, 0, ())),
    ("4242:4243", (4242, 4243, ())), ("bob:wheel", (1002, 10, ())),
])
def test_user_resolution(image_root, spec, expected):
    u = resolve_user(image_root, spec)
    assert (u.uid, u.gid, u.additional_gids) == expected


def test_unknown_user_or_group_is_an_error(image_root):
    with pytest.raises(ConfigError, match="unable to find user"):
        resolve_user(image_root, "mallory")
    with pytest.raises(ConfigError, match="unable to find group"):
        resolve_user(image_root, "alice:nogroup")


def test_passwd_symlink_out_of_root_is_not_followed(tmp_path, layers, root):
    host = tmp_path / "hostpasswd"
    host.write_text("evil:x:4242:4242::/:/bin/sh\n")
    layers.apply(root, [D("etc"), L("etc/passwd", str(host)), L("etc/group", "../../../../.." + str(host))])
    with pytest.raises(ConfigError, match="unable to find user evil"):
        resolve_user(root, "evil")


@pytest.mark.parametrize("workdir", ["/proc/self/fd/7", "/proc/1/cwd", "/sys/kernel", "/dev/fd/3",
                                     "/../../proc/self/cwd", "/tolink/self/fd/5"])
def test_workdir_under_runtime_mounts_is_refused(image_root, layers, workdir):
    layers.apply(image_root, [L("tolink", "/proc")])
    with pytest.raises(ConfigError):
        safe_workdir(image_root, workdir)


def test_workdir_canonicalised_inside_root(tmp_path, image_root, layers):
    outside = tmp_path / "outside"
    outside.mkdir()
    layers.apply(image_root, [L("w", str(outside)), L("up", "../../..")])
    assert safe_workdir(image_root, "../../data/x") == "/data/x"
    assert (image_root / "data/x").is_dir()
    assert safe_workdir(image_root, "/w/sub") == str(outside / "sub")
    assert (image_root / str(outside).lstrip("/") / "sub").is_dir()
    assert not (outside / "sub").exists()
    assert safe_workdir(image_root, "/up/home/alice") == "/home/alice"
    assert safe_workdir(image_root, None) == "/"


def test_runtime_config_fields(image_root, tmp_path):
    image = {"os": "linux", "architecture": "amd64",
             "config": {"Entrypoint": ["/bin/app"], "Cmd": ["--flag"], "Env": ["A=1", "PATH=/custom"],
                        "User": "alice", "WorkingDir": "/home/alice", "Labels": {"l": "v"},
                        "Volumes": {"/": {}, "/etc": {}, "/data": {}}, "ExposedPorts": {"80/tcp": {}},
                        "StopSignal": "SIGTERM"}}
    cfg, files = runtime_config(image, image_root, tmp_path, RunSettings(env=("B=2", "A=3")), "c" * 64)
    p = cfg["process"]
    assert p["args"] == ["/bin/app", "--flag"]
    assert "A=3" in p["env"] and "B=2" in p["env"] and "PATH=/custom" in p["env"]
    assert p["cwd"] == "/home/alice" and p["user"] == {"uid": 1000, "gid": 1001, "additionalGids": [50, 10]}
    assert p["rlimits"][0]["type"] == "RLIMIT_NOFILE"
    assert "CAP_NET_RAW" in p["capabilities"]["bounding"] and "CAP_SYS_ADMIN" not in p["capabilities"]["bounding"]
    dests = [m["destination"] for m in cfg["mounts"]]
    for d in ("/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/etc/hosts", "/etc/resolv.conf"):
        assert d in dests
    # image Volumes never become bind mounts of anything
    assert all(m["type"] != "bind" or m["source"].startswith(str(tmp_path)) or m["source"] == "/sys"
               for m in cfg["mounts"])
    assert {n["type"] for n in cfg["linux"]["namespaces"]} == {"pid", "ipc", "uts", "mount", "network"}
    assert "/proc/kcore" in cfg["linux"]["maskedPaths"] and "/proc/sys" in cfg["linux"]["readonlyPaths"]
    assert cfg["annotations"]["org.opencontainers.image.exposedPorts"] == "80/tcp"
    assert cfg["annotations"]["l"] == "v" and cfg["hostname"] == "c" * 12
    # overrides
    cfg, _ = runtime_config(image, image_root, tmp_path, RunSettings(command=("x",), network="host",
                                                                     user="0:0", workdir="/data"), "d" * 64)
    assert cfg["process"]["args"] == ["/bin/app", "x"] and cfg["process"]["user"] == {"uid": 0, "gid": 0}
    assert "network" not in {n["type"] for n in cfg["linux"]["namespaces"]}
    cfg, _ = runtime_config({"config": {"Cmd": ["sh"]}}, image_root, tmp_path, RunSettings(), "e" * 64)
    assert any(e.startswith("PATH=/usr/local/sbin:") for e in cfg["process"]["env"])


def test_volume_parsing_and_refused_destinations(image_root, tmp_path):
    v = Volume.parse(f"{tmp_path}/h:/data:ro")
    assert v.readonly and v.container == "/data"
    with pytest.raises(Exception):
        Volume.parse("relative")
    with pytest.raises(ConfigError):
        runtime_config({"config": {"Cmd": ["sh"]}}, image_root, tmp_path,
                       RunSettings(volumes=(Volume(str(tmp_path / "h"), "/proc/sys"),)), "f" * 64)


# ---- cache ------------------------------------------------------------------------------------


def _blob(layers, entries):
    tar = tar_bytes(entries)
    return layers.blob(tar), TAR, diff_id(tar)


def test_second_image_reuses_base_snapshot(tmp_path, layers):
    cache = SnapshotCache(tmp_path / "cache")
    base = _blob(layers, [F("bin/base", b"base" * 1000), D("etc"), F("etc/conf", b"1")])
    app1 = _blob(layers, [F("app1", b"one")])
    app2 = _blob(layers, [F("app2", b"two"), F("etc/conf", b"2")])
    top1 = cache.ensure([base, app1])
    base_snap = cache.path(base[2])
    base_ino = os.lstat(base_snap / "bin/base").st_ino
    assert os.stat(cache.root).st_mode & 0o777 == 0o700
    # the second image: only its own layer is applied; the base tree is reused, not redone
    (base_snap / "MARK").write_text("x")  # would vanish if the base were re-applied into a new tree
    top2 = cache.ensure([base, app2])
    assert top2 == cache.path(chain_ids([base[2], app2[2]])[1])
    assert (top2 / "MARK").exists() and os.lstat(top2 / "bin/base").st_ino == base_ino
    # snapshots are immutable: upper layers never changed lower trees
    assert (base_snap / "etc/conf").read_bytes() == b"1" and (top1 / "etc/conf").read_bytes() == b"1"
    assert (top2 / "etc/conf").read_bytes() == b"2"
    assert not (top1 / "app2").exists() and not (base_snap / "app1").exists()


def test_materialised_rootfs_does_not_share_inodes_with_cache(tmp_path, layers):
    cache = SnapshotCache(tmp_path / "cache")
    base = _blob(layers, [F("f", b"cached"), H("f2", "f")])
    snap = cache.ensure([base])
    rootfs = tmp_path / "rootfs"
    materialize(snap, rootfs)
    (rootfs / "f").write_bytes(b"container wrote this")
    assert (snap / "f").read_bytes() == b"cached"
    assert os.lstat(rootfs / "f").st_ino == os.lstat(rootfs / "f2").st_ino  # hard-link group kept


def test_hardlink_attribute_change_does_not_touch_lower_snapshot(tmp_path, layers):
    cache = SnapshotCache(tmp_path / "cache")
    base = _blob(layers, [F("f", b"data", mode=0o644)])
    up = _blob(layers, [H("g", "f", mode=0o600)])
    top = cache.ensure([base, up])
    lower = cache.path(base[2])
    assert os.lstat(lower / "f").st_mode & 0o777 == 0o644
    assert os.lstat(top / "g").st_mode & 0o777 == 0o600 and (top / "g").read_bytes() == b"data"


def test_hardlink_attribute_change_gives_what_docker_gives(tmp_path, layers):
    """Docker changes the linked inode itself: every name of it sees the new
    attributes. The cache cannot touch the shared inode, so the whole group
    moves to a private copy in the new snapshot: same tree as an uncached apply."""
    base = _blob(layers, [D("."), D("d"), F("f", b"data", mode=0o644), H("d/f2", "f"), F("other", b"o")])
    up = _blob(layers, [D("."), D("d"), H("g", "f", mode=0o600, uid=5)])
    cache = SnapshotCache(tmp_path / "cache")
    top = cache.ensure([base, up])
    rootfs = tmp_path / "rootfs"
    materialize(top, rootfs)
    direct = tmp_path / "direct"
    direct.mkdir()
    for blob, media_type, digest in (base, up):
        apply_layer(direct, blob, media_type, digest)
    got, want = _listing(rootfs), _listing(direct)
    assert got == want and ["d/f2", "f", "g"] in got["links"]
    lower = cache.path(base[2])
    assert os.lstat(lower / "f").st_mode & 0o777 == 0o644 and os.lstat(lower / "d/f2").st_nlink >= 2
    assert not list(top.rglob(".dockyard-relink-*"))


def _listing(top: Path) -> dict:
    """Everything a copy must keep, per path; hard-link groups as sorted path lists."""
    out, groups = {}, {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames + ([""] if dirpath == str(top) else []):
            path = Path(dirpath) / name if name else Path(dirpath)
            st = os.lstat(path)
            rel = str(path.relative_to(top))
            info = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                    st.st_mtime_ns, st.st_rdev, st.st_nlink if not stat.S_ISDIR(st.st_mode) else 0)
            xattrs = {} if stat.S_ISLNK(st.st_mode) else \
                {k: os.getxattr(path, k, follow_symlinks=False) for k in os.listxattr(path, follow_symlinks=False)}
            content = os.readlink(path) if stat.S_ISLNK(st.st_mode) else \
                (path.read_bytes() if stat.S_ISREG(st.st_mode) else None)
            out[rel] = (info, xattrs, content)
            if stat.S_ISREG(st.st_mode):
                groups.setdefault(st.st_ino, []).append(rel)
    return {"nodes": out, "links": sorted(sorted(g) for g in groups.values() if len(g) > 1)}


def test_copy_tree_keeps_everything_and_shares_no_inode(tmp_path, layers, root):
    big = os.urandom(5 << 20)
    entries = [D("etc", mode=0o750, uid=3, gid=4), F("etc/conf", b"c", mode=0o640, uid=5, gid=6),
               F("bin/su", b"suid", mode=0o4755), F("big", big), F("empty"), D("locked", mode=0o000),
               F("locked/inside", b"i"), H("bin/su-link", "bin/su"), L("abs", "/etc/passwd"),
               L("dangling", "../../nowhere"), E("fifo", type=tarfile.FIFOTYPE, mode=0o620),
               F("x", b"x", pax={"SCHILY.xattr.user.note": "kept"}),
               D("d/e/f", mode=0o711, mtime=1_500_000_000)]
    if os.geteuid() == 0:
        entries.append(E("dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666))
    layers.apply(root, entries)
    os.utime(root, ns=(1_400_000_000 * 10**9,) * 2)
    dst = tmp_path / "copy"
    copy_tree(root, dst, workers=3)
    assert _listing(dst) == _listing(root)
    src_inodes = {os.lstat(p).st_ino for p in root.rglob("*")}
    assert not src_inodes & {os.lstat(p).st_ino for p in dst.rglob("*")}
    # and it matches what `cp -a` makes
    ref = tmp_path / "cp"
    subprocess.run(["cp", "-a", "--", str(root), str(ref)], check=True)
    assert _listing(dst) == _listing(ref)


def test_copy_tree_keeps_links_of_a_group_shared_with_lower_snapshots(tmp_path, layers):
    cache = SnapshotCache(tmp_path / "cache")
    base = _blob(layers, [F("a", b"1"), H("b", "a"), F("c", b"3")])
    up = _blob(layers, [F("d", b"4")])
    top = cache.ensure([base, up])  # every file of base now has one more link (the base snapshot)
    rootfs = tmp_path / "rootfs"
    materialize(top, rootfs)
    assert os.lstat(rootfs / "a").st_ino == os.lstat(rootfs / "b").st_ino
    assert os.lstat(rootfs / "a").st_nlink == 2 and os.lstat(rootfs / "c").st_nlink == 1


def test_copy_tree_refuses_an_existing_destination(tmp_path, root):
    (tmp_path / "there").mkdir()
    with pytest.raises(FileExistsError):
        copy_tree(root, tmp_path / "there")


def test_snapshot_from_an_earlier_boot_without_sync_is_rebuilt(tmp_path, layers):
    cache = SnapshotCache(tmp_path / "cache")
    base = _blob(layers, [F("f", b"data")])
    snap = cache.ensure([base])
    marker = cache.unsynced / snap.name
    assert marker.read_text() == boot_id()  # written before the rename, for this boot
    assert cache.has(base[2])
    # the machine crashed before writeback: the files may be empty, so do not trust them
    marker.write_text("another-boot")
    (snap / "f").write_bytes(b"")
    assert not cache.has(base[2]) and not snap.exists() and not marker.exists()
    again = cache.ensure([base])
    assert (again / "f").read_bytes() == b"data"


def test_settle_clears_old_markers_after_syncfs(tmp_path, layers):
    cache = SnapshotCache(tmp_path / "cache")
    one = cache.ensure([_blob(layers, [F("a", b"1")])])
    two = cache.ensure([_blob(layers, [F("b", b"2")])])
    old = time.time() - 3600
    os.utime(cache.unsynced / one.name, (old, old))
    assert cache.settle() == 1
    assert not (cache.unsynced / one.name).exists() and (cache.unsynced / two.name).exists()
    os.utime(cache.unsynced / two.name, (old, old))
    SnapshotCache(tmp_path / "cache")  # opening the cache settles too
    assert os.listdir(cache.unsynced) == []
    assert cache.has("sha256:" + two.name)  # on disk: trusted after any reboot


def test_new_trees_start_in_their_own_block_group_hint(tmp_path, layers):
    import array
    import fcntl
    from puller.runtime.bundle import write_bundle
    from puller.runtime.tree import FS_IOC_GETFLAGS, FS_TOPDIR_FL

    def flags(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            buf = array.array("i", [0])
            fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
            return buf[0]
        except OSError:
            pytest.skip("this filesystem has no inode flags")
        finally:
            os.close(fd)
    cache = SnapshotCache(tmp_path / "cache")
    if not flags(cache.staging) & FS_TOPDIR_FL:
        pytest.skip("this filesystem ignores the TOPDIR flag")
    bundle = write_bundle(tmp_path / "bundle", [_blob(layers, [F("a", b"1")])], {}, cache=cache)
    assert not flags(bundle) & FS_TOPDIR_FL  # the user's directory is left as it would be
    assert (bundle / "rootfs/a").read_bytes() == b"1"


def test_copy_tree_to_another_filesystem(tmp_path, layers, root):
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem at /dev/shm")
    big = os.urandom((1 << 20) + 5)
    layers.apply(root, [F("a", big), F("d/b", b"small"), H("c", "a")])
    dst = Path(tempfile.mkdtemp(dir=other)) / "copy"
    try:
        copy_tree(root, dst)  # copy_file_range says EXDEV here: sendfile instead
        assert _listing(dst) == _listing(root)
    finally:
        shutil.rmtree(dst.parent)
