"""Tree copy: a private copy of a snapshot (`materialize`, `copy_tree`), and
the ext4 placement hint for directories where new trees start.

A bundle's rootfs must be private to the container (a write there must not
reach the cache through a shared inode), so it is a copy: copy_file_range
(an in-kernel copy, or a reflink where the filesystem has them) in a small
thread pool, hard-link groups, owners, modes, xattrs and devices kept. Why
not hard-link the bundle to the cache: the container could write a shared
inode in place.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import uuid
from pathlib import Path

from puller.runtime.errors import UnpackError

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
    # imported here: concurrent.futures brings logging (~8 ms), and a `run`
    # on an overlay of the cache copies nothing
    from concurrent.futures import ThreadPoolExecutor
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
