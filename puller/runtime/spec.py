"""OCI runtime bundles: a cached root filesystem plus a config.json.

Cache scheme (chainID snapshots, hard-linked, never written after commit)
-------------------------------------------------------------------------

    CACHE/                     mode 0700 (it holds setuid binaries and devices)
      snapshots/<chainid-hex>/ the full tree after applying layers 0..n,
                               where chainid = ChainID(L0|...|Ln) (config.md)
      staging/                 snapshots being built (renamed into place)
      diffids/<blob-hex>       diff ID learnt for a compressed blob, so a
                               pipelined pull can find a cached snapshot
                               before the image config is there

Snapshot n is built from snapshot n-1 by a hard-linked copy (`cp -al`: new
directories, shared file inodes, no data copied), then layer n is applied to
it with `shared_inodes=True`: the applier never modifies an existing inode in
place (a changed file is a new inode, directories are per snapshot, and a hard
link whose header would change a shared inode's attributes gets a private copy
instead, which every name of that inode in the new tree then links to), so
older snapshots are never altered. A snapshot becomes visible
only by an atomic rename of a complete tree; two builders racing for the same
chain both succeed and one copy is dropped. A second image that shares a base
(same diff IDs in the same order) finds the base's chain snapshot and only
applies its own layers.

Durability without an fsync on the way: files are written through the page
cache and never fsynced one by one (that would cost more than the whole
unpack). Instead, before a snapshot is renamed into place, `unsynced/<chain>`
records the kernel's boot ID. A snapshot whose marker names ANOTHER boot may
have lost data in a crash before writeback, so it is discarded and rebuilt;
one from this boot is what the page cache holds, hence correct. Markers older
than the kernel's writeback delay are cleared after one `syncfs` (cheap by
then: the data is on disk already) when a cache is opened.

Pipelined pulls (puller.run) apply layer n while later layers download; a
layer that arrives while its parent is still being applied is STAGED (its
files written as new inodes, verified) and later placed by rename, so several
layers' decompression and writing run at once (puller.unpack.StagedLayer).

The bundle's rootfs must be private to the container (a write there must not
reach the cache through a shared inode), so it is MATERIALISED: `copy_tree`
of the top snapshot (copy_file_range, i.e. an in-kernel copy or a reflink
where the filesystem has them, in a small thread pool; hard-link groups,
owners, modes, xattrs and devices kept), or for `dockyard run` as root an
overlayfs mount with the snapshot as the read-only lower dir and the bundle's
own upper dir (O(1), what containerd does). Why not hard-link the bundle to
the cache: the container could write a shared inode in place. Why not an
overlay for `unpack`: the bundle must stay a plain directory (it outlives a
reboot, `rm -rf` works on it). `cache=None` skips all of this and applies the
layers straight into the bundle. New snapshot and rootfs trees carry an ext4
placement hint (see new_trees_here).

Bundles are assembled in a sibling `DIR.tmp-XXXX` (mode 0700) and renamed to
DIR only when complete, so a failure never leaves something that looks like
a bundle.

config.json is generated from the image config, which is untrusted: the user
is looked up in the rootfs' /etc/passwd and /etc/group opened INSIDE the root
(a symlink out of it resolves under the root), the working directory is
canonicalised inside the root and refused under /proc, /sys and /dev (which
the runtime mounts over: `/proc/self/fd/N`-style escapes, CVE-2024-21626),
and image `Volumes` never become host bind mounts (their data simply stays in
the container's private rootfs).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from puller.runtime.apply import (ApplyOptions, StagedLayer, UnpackError, apply_layer, apply_staged, chain_ids,
                                  clean_name, open_in_root, stage_layer)

Layer = tuple[Path, str, str | None]   # (blob path, media type, diff ID or None)

# ---- snapshot cache ------------------------------------------------------------------------


def _hex(digest: str) -> str:
    algorithm, _, hexpart = digest.partition(":")
    if algorithm != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise UnpackError(f"invalid digest {digest!r}")
    return hexpart


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS = 0x80086601, 0x40086602
FS_TOPDIR_FL = 0x00020000


def new_trees_here(path: Path, on: bool = True) -> None:
    """Mark a directory whose subdirectories start unrelated trees (ext4's
    TOPDIR flag, `chattr +T`): the allocator then places each new snapshot or
    rootfs in a lightly used block group instead of next to its parent, where
    the inodes of recently deleted trees sit. ext4 without a journal checks
    every candidate inode for a recent deletion, which made creating a Debian
    rootfs right after deleting one 2-3x slower. Best effort: other
    filesystems ignore or refuse the flag."""
    import array
    import fcntl
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
        wanted = flags[0] | FS_TOPDIR_FL if on else flags[0] & ~FS_TOPDIR_FL
        if wanted != flags[0]:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, array.array("i", [wanted]), True)
    except OSError:
        pass
    finally:
        os.close(fd)


WRITEBACK_DELAY = 60.0  # seconds: past the kernel's dirty_expire (30 s by default)


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def syncfs(path: Path) -> bool:
    """syncfs(2) on the filesystem holding path."""
    import ctypes
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syncfs(fd) == 0
    finally:
        os.close(fd)


def _run_cp(args: list[str]) -> None:
    proc = subprocess.run(["cp", *args], capture_output=True)
    if proc.returncode != 0:
        raise UnpackError(f"copy failed: {proc.stderr.decode(errors='replace').strip()}")


class SnapshotCache:
    def __init__(self, root: str | os.PathLike):
        self.root = _private_dir(Path(root))
        self.snapshots = _private_dir(self.root / "snapshots")
        self.staging = _private_dir(self.root / "staging")
        self.unsynced = _private_dir(self.root / "unsynced")
        self.settle()
        new_trees_here(self.staging)
        self.diffids = _private_dir(self.root / "diffids")

    def path(self, chain_id: str) -> Path:
        return self.snapshots / _hex(chain_id)

    def has(self, chain_id: str) -> bool:
        return self.path(chain_id).is_dir() and self._durable_or_this_boot(chain_id)

    def _durable_or_this_boot(self, chain_id: str) -> bool:
        marker = self.unsynced / _hex(chain_id)
        try:
            boot = marker.read_text().strip()
        except FileNotFoundError:
            return True
        if boot == boot_id():
            return True
        # committed in an earlier boot and never known to be on disk: rebuild it
        trash = Path(tempfile.mkdtemp(prefix="stale-", dir=self.staging))
        try:
            os.rename(self.path(chain_id), trash / "tree")
        except OSError:
            pass
        shutil.rmtree(trash, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()
        return False

    def _mark_unsynced(self, chain_id: str) -> None:
        target = self.unsynced / _hex(chain_id)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(boot_id())
        os.replace(tmp, target)

    def settle(self, older_than: float = WRITEBACK_DELAY) -> int:
        """Clear the markers of snapshots committed more than `older_than`
        seconds ago, after one syncfs; returns how many were cleared."""
        now = time.time()
        old = []
        for marker in self.unsynced.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if now - marker.stat().st_mtime >= older_than and not marker.name.startswith("."):
                    old.append(marker)
        if not old:
            return 0
        if not syncfs(self.root):
            return 0
        for marker in old:
            with contextlib.suppress(FileNotFoundError):
                marker.unlink()
        return len(old)

    def known_diff_id(self, blob_digest: str) -> str | None:
        try:
            value = (self.diffids / _hex(blob_digest)).read_text().strip()
            _hex(value)
            return value
        except (OSError, UnpackError):
            return None

    def remember_diff_id(self, blob_digest: str, diff_id: str) -> None:
        target = self.diffids / _hex(blob_digest)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(diff_id)
        os.replace(tmp, target)

    def stage(self, blob: Path, media_type: str, diff_id: str | None,
              options: ApplyOptions | None = None) -> StagedLayer | None:
        """Phase one of a layer (decompress, verify, write its files) before
        its parent snapshot exists; None if the layer is too large to stage
        (see puller.unpack.StagedLayer). Pass the result to apply_next."""
        directory = Path(tempfile.mkdtemp(prefix="stage-", dir=self.staging))
        staged = None
        try:
            staged = stage_layer(blob, media_type, diff_id, directory, options)
            return staged
        finally:
            if staged is None:
                shutil.rmtree(directory, ignore_errors=True)

    @staticmethod
    def discard(staged: StagedLayer | None) -> None:
        if staged is not None:
            shutil.rmtree(staged.directory, ignore_errors=True)

    def apply_next(self, parent_chain: str | None, blob: Path, media_type: str,
                   diff_id: str | None, options: ApplyOptions | None = None,
                   blob_digest: str | None = None, staged: StagedLayer | None = None) -> str:
        """Build the snapshot for parent + this layer; return its chain ID.
        With diff_id None the digest measured while applying names it.
        `staged` (from stage(), same layer) is consumed."""
        options = options or ApplyOptions()
        if staged is not None:
            diff_id = staged.stats.diff_id  # verified against the expected one when staged
        if diff_id is not None:
            chain = self._chain(parent_chain, diff_id)
            if self.has(chain):
                self.discard(staged)
                return chain
        work = Path(tempfile.mkdtemp(prefix="snap-", dir=self.staging))
        try:
            tree = work / "tree"
            if parent_chain is None:
                tree.mkdir(mode=0o755)
            else:
                _run_cp(["-al", "--", str(self.path(parent_chain)), str(tree)])
            shared = ApplyOptions(limits=options.limits, as_root=options.as_root,
                                  decompressor=options.decompressor, shared_inodes=True,
                                  force_portable_resolver=options.force_portable_resolver)
            if staged is not None:
                stats = apply_staged(tree, staged, shared)
            else:
                stats = apply_layer(tree, blob, media_type, diff_id, shared)
            chain = self._chain(parent_chain, stats.diff_id)
            if blob_digest:
                self.remember_diff_id(blob_digest, stats.diff_id)
            try:
                self._mark_unsynced(chain)
                os.rename(tree, self.path(chain))
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            return chain
        finally:
            shutil.rmtree(work, ignore_errors=True)
            self.discard(staged)

    @staticmethod
    def _chain(parent_chain: str | None, diff_id: str) -> str:
        return diff_id if parent_chain is None else chain_ids([parent_chain, diff_id])[1]

    def ensure(self, layers: Sequence[Layer], options: ApplyOptions | None = None) -> Path:
        """The snapshot of the whole layer list, building what is missing."""
        diff_ids = [d for _, _, d in layers]
        chains = chain_ids(diff_ids) if all(diff_ids) else []
        start = 0
        if chains:
            for n in range(len(chains), 0, -1):
                if self.has(chains[n - 1]):
                    start = n
                    break
        parent = chains[start - 1] if start else None
        for blob, media_type, diff_id in layers[start:]:
            parent = self.apply_next(parent, blob, media_type, diff_id, options)
        if parent is None:  # an image without layers
            parent = "sha256:" + "0" * 64
            if not self.has(parent):
                empty = Path(tempfile.mkdtemp(prefix="snap-", dir=self.staging))
                os.chmod(empty, 0o755)
                try:
                    os.rename(empty, self.path(parent))
                except OSError:
                    shutil.rmtree(empty, ignore_errors=True)
        return self.path(parent)


def materialize(snapshot: Path, rootfs: Path) -> None:
    """A private copy of a snapshot tree (new inodes: a write in rootfs never
    reaches the cache)."""
    # built under a random name: ext4 picks a TOPDIR child's block group from a
    # hash of its name, and "rootfs" every time would land where the last one was
    building = rootfs.with_name(f".{rootfs.name}-{uuid.uuid4().hex[:12]}")
    try:
        copy_tree(snapshot, building)
        os.rename(building, rootfs)
    except OSError as exc:
        shutil.rmtree(building, ignore_errors=True)
        raise UnpackError(f"cannot copy {snapshot} to {rootfs}: {exc.strerror or exc}") from None


def copy_workers() -> int:
    # file creation and page-cache copies are kernel work that overlaps well
    return max(2, min(8, 2 * (os.cpu_count() or 1)))


def copy_tree(src: Path, dst: Path, workers: int | None = None) -> None:
    """`cp -a` for our own snapshot trees, with files copied in parallel.

    One thread walks the tree and makes the directories; a pool copies the
    regular files (`copy_file_range`: an in-kernel copy, a reflink where the
    filesystem can) and makes the other nodes; hard-link groups are linked
    once their first member is copied; directory attributes come last, deepest
    first. Owners, modes (setuid kept: chmod after chown), xattrs (after chown,
    which drops security.capability), and atime/mtime are kept. Symlinks are
    never followed. dst must not exist. Only for trees we built ourselves (the
    snapshot cache is 0700): paths inside them are real directories."""
    src, dst = Path(src), Path(dst)
    top = os.lstat(src)
    if not stat.S_ISDIR(top.st_mode):
        raise UnpackError(f"{src} is not a directory")
    os.mkdir(dst, 0o700)
    dirs: list[tuple[str, os.stat_result]] = [("", top)]
    first_of_inode: dict[tuple[int, int], str] = {}
    links: list[tuple[str, str]] = []
    jobs = []
    batch: list[tuple[str, str, os.stat_result]] = []
    batch_bytes = 0
    with ThreadPoolExecutor(max_workers=workers or copy_workers(), thread_name_prefix="copy") as pool:
        try:
            stack = [""]
            while stack:
                rel = stack.pop()
                sdir = os.path.join(src, rel) if rel else str(src)
                ddir = os.path.join(dst, rel) if rel else str(dst)
                with os.scandir(sdir) as it:
                    for entry in it:
                        crel = f"{rel}/{entry.name}" if rel else entry.name
                        st = entry.stat(follow_symlinks=False)
                        if stat.S_ISDIR(st.st_mode):
                            os.mkdir(os.path.join(ddir, entry.name), 0o700)
                            dirs.append((crel, st))
                            stack.append(crel)
                            continue
                        if st.st_nlink > 1:
                            key = (st.st_dev, st.st_ino)
                            first = first_of_inode.get(key)
                            if first is not None:
                                links.append((first, crel))
                                continue
                            first_of_inode[key] = crel
                        batch.append((entry.path, os.path.join(ddir, entry.name), st))
                        batch_bytes += st.st_size
                        # batches, not a job per file: small files cost more in
                        # hand-offs than in copying; big files still spread out
                        if len(batch) >= 64 or batch_bytes >= 8 << 20:
                            jobs.append(pool.submit(_copy_nodes, batch))
                            batch, batch_bytes = [], 0
                if batch:
                    jobs.append(pool.submit(_copy_nodes, batch))
                    batch, batch_bytes = [], 0
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
        for job in jobs:
            job.result()  # the first error, if any
    for first, other in links:
        os.link(dst / first, dst / other, follow_symlinks=False)
    for rel, st in sorted(dirs, key=lambda item: item[0].count("/") if item[0] else -1, reverse=True):
        path = dst / rel if rel else dst
        _set_attrs(path, st, os.path.join(src, rel) if rel else src, symlink=False)


def _copy_nodes(batch: list[tuple[str, str, os.stat_result]]) -> None:
    for src, dst, st in batch:
        _copy_node(src, dst, st)


def _copy_node(src: str, dst: str, st: os.stat_result) -> None:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                _copy_data(fin, fout, st.st_size)
                _set_fd_attrs(fout, st, fin)
            finally:
                os.close(fout)
        finally:
            os.close(fin)
        return
    if stat.S_ISLNK(mode):
        os.symlink(os.readlink(src), dst)
        _set_attrs(dst, st, src, symlink=True)
        return
    if stat.S_ISFIFO(mode):
        os.mkfifo(dst, 0o600)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode):
        os.mknod(dst, stat.S_IFMT(mode) | 0o600, st.st_rdev)
    else:
        return
    _set_attrs(dst, st, src, symlink=False)


def _copy_data(fin: int, fout: int, size: int) -> None:
    """size bytes: copy_file_range (in-kernel, reflink if possible), or
    sendfile where the kernel refuses it (another filesystem: EXDEV)."""
    done = 0
    use_range = True
    while done < size:
        step = min(size - done, 1 << 30)
        if use_range:
            try:
                n = os.copy_file_range(fin, fout, step, done, done)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                use_range = False
                continue
        else:
            os.lseek(fout, done, os.SEEK_SET)
            n = os.sendfile(fout, fin, done, step)
        if n == 0:
            break  # the file shrank: cannot happen in a snapshot, do not spin
        done += n


def _set_fd_attrs(fd: int, st: os.stat_result, src_fd: int) -> None:
    if os.geteuid() == 0:
        os.fchown(fd, st.st_uid, st.st_gid)
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
    for key in os.listxattr(src_fd):
        _copy_xattr(fd, key, os.getxattr(src_fd, key), follow=True)
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _set_attrs(path: Path, st: os.stat_result, src, symlink: bool) -> None:
    """Attributes of a node that is not opened (directory, symlink, fifo,
    device): path calls that never follow the last component."""
    if os.geteuid() == 0:
        os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    if not symlink:  # a node we just made, not a link: nothing to follow
        os.chmod(path, stat.S_IMODE(st.st_mode))
    for key in os.listxattr(src, follow_symlinks=False):
        _copy_xattr(path, key, os.getxattr(src, key, follow_symlinks=False), follow=False)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _copy_xattr(target, key: str, value: bytes, follow: bool) -> None:
    try:
        os.setxattr(target, key, value, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EPERM):
            raise


# ---- atomic bundle directories ---------------------------------------------------------------


class BundleBuilder:
    """with BundleBuilder(dest) as tmp: ...fill tmp...  -> renamed to dest on success."""

    def __init__(self, dest: str | os.PathLike):
        self.dest = Path(dest).absolute()
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        if self.dest.exists() and (not self.dest.is_dir() or any(self.dest.iterdir())):
            raise UnpackError(f"{self.dest} already exists and is not empty")
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=self.dest.name + ".tmp-", dir=self.dest.parent))
        os.chmod(self.tmp, 0o700)
        new_trees_here(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            new_trees_here(self.tmp, on=False)  # the user's directory keeps no flag of ours
            try:
                if self.dest.is_dir():
                    self.dest.rmdir()  # an empty directory given by the user
                os.rename(self.tmp, self.dest)
                return
            except OSError as err:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise UnpackError(f"cannot create bundle {self.dest}: {err.strerror}") from None
        shutil.rmtree(self.tmp, ignore_errors=True)


def build_rootfs(layers: Sequence[Layer], rootfs: Path, *, cache: SnapshotCache | None,
                 options: ApplyOptions | None = None) -> None:
    """Fill rootfs (which must not exist) with the image's layers."""
    if cache is None:
        rootfs.mkdir(mode=0o755)
        for blob, media_type, diff_id in layers:
            apply_layer(rootfs, blob, media_type, diff_id, options)
    else:
        materialize(cache.ensure(layers, options), rootfs)


# ---- runtime config ----------------------------------------------------------------------------

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Docker's default capability set
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)
MASKED_PATHS = (
    "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
)
DEFAULT_NOFILE = 1048576
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
# the runtime mounts its own filesystems here: nothing from the image may point into them
RUNTIME_MOUNTED = ("proc", "sys", "dev")


@dataclass(frozen=True)
class Volume:
    host: str
    container: str
    readonly: bool = False

    @classmethod
    def parse(cls, spec: str) -> "Volume":
        parts = spec.split(":")
        readonly = False
        if len(parts) == 3 and parts[2] in ("ro", "rw"):
            readonly = parts[2] == "ro"
            parts = parts[:2]
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise UnpackError(f"invalid volume {spec!r} (want HOST:CONTAINER[:ro])")
        if not parts[1].startswith("/"):
            raise UnpackError(f"invalid volume {spec!r}: the container path must be absolute")
        return cls(os.path.abspath(parts[0]), parts[1], readonly)


@dataclass(frozen=True)
class RunSettings:
    """What the user asks for on top of the image config."""
    command: tuple[str, ...] | None = None      # replaces Cmd
    entrypoint: tuple[str, ...] | None = None   # replaces Entrypoint
    env: tuple[str, ...] = ()                   # K=V, override the image's
    user: str | None = None
    workdir: str | None = None
    volumes: tuple[Volume, ...] = ()
    network: str = "none"                       # "none" (own namespace, loopback) | "host"
    hostname: str | None = None
    tty: bool = False
    readonly_rootfs: bool = False


class ConfigError(UnpackError):
    """The image config (or the user's settings) cannot be turned into a runtime config."""


# -- reading files inside the rootfs


def read_in_root(rootfs: Path, path: str, limit: int = 4 << 20) -> bytes | None:
    """A regular file of the rootfs, resolved inside it; None if missing."""
    rootfd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fd = open_in_root(rootfd, clean_name(path), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read {path} in the image: {exc.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(f"{path} in the image is not a regular file")
            data = os.read(fd, limit + 1)
            if len(data) > limit:
                raise ConfigError(f"{path} in the image is larger than {limit} bytes")
            return data
        finally:
            os.close(fd)
    finally:
        os.close(rootfd)


def _colon_file(data: bytes | None, fields: int) -> list[list[str]]:
    rows = []
    for line in (data or b"").decode("utf-8", "replace").splitlines():
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) >= fields:
            rows.append(parts)
    return rows


def _id(text: str) -> int | None:
    if text.isdigit():
        value = int(text)
        if value < 2**32 - 1:
            return value
        raise ConfigError(f"id {text} is out of range")
    return None


@dataclass(frozen=True)
class ResolvedUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    home: str = "/"


def resolve_user(rootfs: Path, spec: str | None) -> ResolvedUser:
    """`user`, `uid`, `user:group`, `uid:gid`, `uid:group`, `user:gid` (config.md)."""
    spec = (spec or "").strip()
    user_part, _, group_part = spec.partition(":")
    passwd = _colon_file(read_in_root(rootfs, "/etc/passwd"), 7)
    uid = _id(user_part) if user_part else 0
    entry = None
    if uid is None:
        entry = next((p for p in passwd if p[0] == user_part), None)
        if entry is None:
            raise ConfigError(f"unable to find user {user_part}: no matching entries in passwd file")
    else:
        entry = next((p for p in passwd if p[2] == str(uid)), None)
    if entry is not None:
        uid = _id(entry[2])
        gid = _id(entry[3]) if entry[3].isdigit() else 0
        home = entry[5] or "/"
        name = entry[0]
    else:
        gid, home, name = 0, "/", None
    if uid is None:
        raise ConfigError(f"invalid uid for user {user_part!r} in the image's /etc/passwd")
    extra: list[int] = []
    if group_part:
        gid_value = _id(group_part)
        if gid_value is None:
            groups = _colon_file(read_in_root(rootfs, "/etc/group"), 4)
            match = next((g for g in groups if g[0] == group_part), None)
            if match is None or _id(match[2]) is None:
                raise ConfigError(f"unable to find group {group_part}: no matching entries in group file")
            gid_value = _id(match[2])
        gid = gid_value
    elif name is not None and not user_part.isdigit():
        # supplementary groups only for a named user without an explicit group (conversion.md)
        for g in _colon_file(read_in_root(rootfs, "/etc/group"), 4):
            members = [m.strip() for m in g[3].split(",") if m.strip()]
            gid_value = _id(g[2]) if g[2].isdigit() else None
            if name in members and gid_value is not None and gid_value != gid and gid_value not in extra:
                extra.append(gid_value)
    return ResolvedUser(uid, gid, tuple(extra), home)


def safe_workdir(rootfs: Path, workdir: str | None) -> str:
    """Canonical in-root path for the working directory, created if missing.

    Symlinks are followed inside the root; the result never lies under the
    runtime's own mounts (/proc, /sys, /dev)."""
    wanted = workdir or "/"
    if not isinstance(wanted, str) or "\0" in wanted:
        raise ConfigError("invalid working directory in the image config")
    parts: list[str] = []
    todo = list(reversed(wanted.split("/")))
    hops = 0
    rootfd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if parts:
                    parts.pop()
                continue
            dfd = _open_dir(rootfd, parts)
            try:
                try:
                    st = os.stat(part, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    st = None
                if st is not None and stat.S_ISLNK(st.st_mode):
                    hops += 1
                    if hops > 40:
                        raise ConfigError(f"working directory {wanted!r}: too many symlinks")
                    target = os.readlink(part, dir_fd=dfd)
                    if target.startswith("/"):
                        parts = []
                    todo.extend(reversed(target.split("/")))
                    continue
                if st is not None and not stat.S_ISDIR(st.st_mode):
                    raise ConfigError(f"working directory {wanted!r} is not a directory in the image")
                if not parts and part in RUNTIME_MOUNTED:
                    raise ConfigError(f"working directory {wanted!r} resolves under /{part}, "
                                      "which the runtime mounts over")
                if st is None:
                    os.mkdir(part, 0o755, dir_fd=dfd)
                parts.append(part)
            finally:
                os.close(dfd)
    finally:
        os.close(rootfd)
    return "/" + "/".join(parts)


def _open_dir(rootfd: int, parts: list[str]) -> int:
    """The directory rootfs/parts..., every component opened without following."""
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=rootfd)
    for part in parts:
        try:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nxt
    return fd


def _clean_container_path(path: str) -> str:
    cleaned = "/" + clean_name(path.replace("\\", "/")) if path.startswith("/") else None
    if not cleaned:
        raise ConfigError(f"container path {path!r} must be absolute")
    return cleaned


def _merge_env(image_env: Iterable[str], overrides: Iterable[str]) -> list[str]:
    merged: dict[str, str] = {}
    for item in list(image_env or []) + list(overrides or []):
        if not isinstance(item, str) or not item or "\0" in item:
            continue
        key, sep, value = item.partition("=")
        if not key:
            continue
        if not sep:  # `-e NAME` takes the value from our environment, like docker
            if key in os.environ:
                merged[key] = os.environ[key]
            continue
        merged[key] = value
    if "PATH" not in merged:
        merged["PATH"] = DEFAULT_PATH.partition("=")[2]
    return [f"{k}={v}" for k, v in merged.items()]


def _annotations(image_config: dict) -> dict[str, str]:
    cfg = image_config.get("config") or {}
    out: dict[str, str] = {}
    for field_, key in (("os", "os"), ("architecture", "architecture"), ("variant", "variant"),
                        ("os.version", "os.version"), ("author", "author"), ("created", "created")):
        value = image_config.get(field_)
        if isinstance(value, str) and value:
            out[f"org.opencontainers.image.{key}"] = value
    if isinstance(image_config.get("os.features"), list):
        out["org.opencontainers.image.os.features"] = ",".join(map(str, image_config["os.features"]))
    if isinstance(cfg.get("StopSignal"), str):
        out["org.opencontainers.image.stopSignal"] = cfg["StopSignal"]
    if isinstance(cfg.get("ExposedPorts"), dict) and cfg["ExposedPorts"]:
        out["org.opencontainers.image.exposedPorts"] = ",".join(sorted(cfg["ExposedPorts"]))
    for key, value in (cfg.get("Labels") or {}).items():
        if isinstance(key, str) and isinstance(value, str):
            out[key] = value  # labels win over implicit annotations
    return out


def _str_list(value, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return ["/bin/sh", "-c", value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"image config {what} is not a list of strings")
    return list(value)


def runtime_config(image_config: dict, rootfs: Path, bundle: Path, settings: RunSettings,
                   container_id: str, require_command: bool = True) -> tuple[dict, dict[str, str]]:
    """The OCI runtime config.json for this image and these settings, and the
    bundle files it refers to ({path relative to the bundle: content}); bind
    mount sources name them under `bundle` (the bundle's final path)."""
    cfg = image_config.get("config") or {}
    entrypoint = list(settings.entrypoint) if settings.entrypoint is not None \
        else _str_list(cfg.get("Entrypoint"), "Entrypoint")
    if settings.command is not None:
        cmd = list(settings.command)
    elif settings.entrypoint is not None:
        cmd = []  # a new entrypoint resets the image's Cmd, as docker does
    else:
        cmd = _str_list(cfg.get("Cmd"), "Cmd")
    args = entrypoint + cmd
    if not args and require_command:
        raise ConfigError("no command: the image has no Entrypoint or Cmd, give one")
    user = resolve_user(rootfs, settings.user if settings.user is not None else cfg.get("User"))
    cwd = safe_workdir(rootfs, settings.workdir if settings.workdir is not None else cfg.get("WorkingDir"))
    hostname = settings.hostname or container_id[:12]
    env = _merge_env(cfg.get("Env") or [], [f"HOSTNAME={hostname}", *settings.env])
    if settings.tty and not any(e.startswith("TERM=") for e in env):
        env.append("TERM=xterm")
    if user.home and not any(e.startswith("HOME=") for e in env):
        env.append(f"HOME={user.home}")

    host_net = settings.network == "host"
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/sys", "type": "bind", "source": "/sys",
         "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]} if host_net else
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["ro", "nosuid", "noexec", "nodev"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
    ]
    # /etc/hostname, /etc/hosts, /etc/resolv.conf: files of the bundle, like docker's
    files = {
        "etc/hostname": hostname + "\n",
        "etc/hosts": ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                      f"127.0.1.1\t{hostname}\n"),
        "etc/resolv.conf": _resolv_conf(host_net),
    }
    for rel in files:
        mounts.append({"destination": "/" + rel, "type": "bind", "source": str(bundle / rel),
                       "options": ["rbind", "rprivate"]})
    for volume in settings.volumes:
        dest = _clean_container_path(volume.container)
        if dest == "/" or dest.split("/")[1] in RUNTIME_MOUNTED:
            raise ConfigError(f"cannot mount a volume at {dest}")
        source = Path(volume.host)
        source.mkdir(parents=True, exist_ok=True)
        options = ["rbind", "rprivate"] + (["ro"] if volume.readonly else [])
        mounts.append({"destination": dest, "type": "bind", "source": str(source.resolve()),
                       "options": options})

    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if not host_net:
        namespaces.append({"type": "network"})
    caps = list(DEFAULT_CAPABILITIES)
    nofile = _nofile_limit()
    config = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": settings.tty,
            "user": {"uid": user.uid, "gid": user.gid,
                     **({"additionalGids": list(user.additional_gids)} if user.additional_gids else {})},
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": False,
        },
        "root": {"path": "rootfs", "readonly": settings.readonly_rootfs},
        "hostname": hostname,
        "mounts": mounts,
        "annotations": _annotations(image_config),
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": namespaces,
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }
    return config, files


def write_bundle_files(directory: Path, config: dict, files: dict[str, str]) -> None:
    for rel, content in files.items():
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        os.chmod(target, 0o644)
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def _nofile_limit() -> int:
    """Docker's 1048576, unless our own hard limit is lower (raising it needs
    CAP_SYS_RESOURCE, which a nested host may not grant)."""
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return DEFAULT_NOFILE
    return min(DEFAULT_NOFILE, hard)


def _resolv_conf(host_net: bool) -> str:
    try:
        text = Path("/etc/resolv.conf").read_text()
    except OSError:
        text = ""
    if host_net:
        return text
    # a private network namespace cannot reach the host's loopback resolvers
    lines = [l for l in text.splitlines()
             if not (l.startswith("nameserver") and (" 127." in l or " ::1" in l))]
    return "\n".join(lines) + ("\n" if lines else "")


def write_bundle(bundle_dir: str | os.PathLike, layers: Sequence[Layer], image_config: dict, *,
                 cache: SnapshotCache | None, settings: RunSettings | None = None,
                 options: ApplyOptions | None = None, container_id: str | None = None) -> Path:
    """`dockyard unpack`: DIR/rootfs + DIR/config.json, atomically."""
    settings = settings or RunSettings()
    container_id = container_id or uuid.uuid4().hex
    with BundleBuilder(bundle_dir) as tmp:
        rootfs = tmp / "rootfs"
        build_rootfs(layers, rootfs, cache=cache, options=options)
        config, files = runtime_config(image_config, rootfs, Path(bundle_dir).absolute(), settings,
                                       container_id, require_command=False)
        write_bundle_files(tmp, config, files)
    return Path(bundle_dir).absolute()
