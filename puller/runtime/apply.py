"""The layer applier: one OCI layer changeset applied to a root filesystem,
streamed, verified against its diff ID, and confined to the root.

    apply_layer(root, blob_path, media_type, expected_diff_id, options) -> LayerStats

One pass over the layer: its tar stream (puller.runtime.streams) is read
entry by entry (puller.runtime.tar), and each entry is placed through
puller.runtime.confine: its parent directory is resolved inside the root,
and the last component is created, replaced or removed with a `*at()` call
relative to that directory's fd, never followed. Names that climb out of the
root lexically (`../x`) are refused as Docker refuses them; absolute names
are taken relative to the root. Hard link sources are resolved the same way,
so a link can only ever name an inode under the root.

Layer semantics (layer.md): entries replace what is there (a directory over a
directory only updates its attributes); `.wh.NAME` removes NAME from lower
layers, `.wh..wh..opq` hides everything the lower layers put in its directory,
and neither touches what this same layer adds, whatever their order in the
archive. Attributes: lchown (when root), then chmod (so setuid/setgid bits
survive the chown), then xattrs (after chown, which would drop
`security.capability`), then mtimes; directory mtimes are set last, once
their contents are in place. Device nodes are only made as root; without
root they are skipped and counted (like rootless Docker).

`shared_inodes=True` tells the applier that inodes already in the tree are
shared with other trees (the hard-linked snapshot cache,
puller.runtime.snapshots), so it must never modify one in place: every
change replaces the directory entry with a new inode instead.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import Iterable

from puller.runtime.confine import ConfinedTree, clean_name, lstat_at
from puller.runtime.errors import LayerVerificationError, UnpackError, UnsafeEntry
from puller.runtime.options import ApplyOptions, LayerStats
from puller.runtime.streams import CHUNK, layer_stream
from puller.runtime.tar import Entry, Reader, read_entries

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


def _remove(name: str, dirfd: int, st: os.stat_result | None = None) -> None:
    st = st or lstat_at(name, dirfd)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dirfd)
    else:
        os.unlink(name, dir_fd=dirfd)


def to_ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


class LayerApplier:
    """Applies one layer's entries to a tree (see the module docstring)."""

    def __init__(self, tree: ConfinedTree | None, options: ApplyOptions, staged_fd: int | None = None):
        self.tree = tree
        self.options = options
        self.staged_fd = staged_fd               # directory of a StagedLayer's file inodes
        self.root = options.root_privileges
        self.stats = LayerStats()
        self.layer_paths: set[str] = set()     # entries of this layer and their ancestors
        self.created_inodes: set[int] = set()  # inodes this layer made (free to modify)
        self.dir_times: list[tuple[str, float]] = []

    # -- bookkeeping

    def _mark(self, rel: str) -> None:
        paths = self.layer_paths
        while rel not in paths:
            paths.add(rel)
            if not rel:
                return
            rel = rel.rpartition("/")[0]

    # -- entry dispatch

    def apply_all(self, entries: Iterable[Entry], reader: Reader) -> None:
        """Every entry, in archive order; system-call failures as UnpackError."""
        for entry in entries:
            try:
                self.apply(entry, reader)
            except UnpackError:
                raise
            except OSError as exc:
                raise UnpackError(f"cannot apply {entry.name!r}: {exc.strerror or exc}") from None

    def apply(self, entry: Entry, reader: Reader) -> None:
        rel = clean_name(entry.name)
        base = rel.rpartition("/")[2]
        if base.startswith(WHITEOUT):
            if entry.type == b"0" and entry.size:
                reader.skip(entry.size)
            self._whiteout(rel, base)
            return
        self.stats.entries += 1
        t = entry.type
        if rel == "":
            if t != b"5":
                raise UnsafeEntry(f"entry {entry.name!r} would replace the root directory")
            self._root_attrs(entry)
            return
        parent = self.tree.parent(rel)
        name = base
        existing = lstat_at(name, parent)
        if t == b"5":
            self._directory(rel, name, parent, existing, entry)
        elif t == b"0":
            self._regular(name, parent, existing, entry, reader)
        elif t == b"2":
            self._replace(name, parent, existing)
            os.symlink(entry.linkname, name, dir_fd=parent)
            self._owner(name, parent, entry)
            self._xattrs_nofollow(name, parent, entry)
            os.utime(name, ns=(to_ns(entry.mtime),) * 2, dir_fd=parent, follow_symlinks=False)
        elif t == b"1":
            self._hardlink(rel, name, parent, existing, entry)
        elif t in (b"3", b"4", b"6"):
            self._special(name, parent, existing, entry)
        self._mark(rel)

    def _replace(self, name: str, parent: int, existing: os.stat_result | None) -> None:
        if existing is None:
            return
        _remove(name, parent, existing)
        if stat.S_ISDIR(existing.st_mode) or stat.S_ISLNK(existing.st_mode):
            # cached parent fds may sit below (or behind) what was removed
            self.tree.forget_dirs(keep=parent)

    def _directory(self, rel, name, parent, existing, entry) -> None:
        if existing is None or not stat.S_ISDIR(existing.st_mode):
            self._replace(name, parent, existing)
            os.mkdir(name, 0o700, dir_fd=parent)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            self.set_fd_attrs(fd, entry)
        finally:
            os.close(fd)
        self.dir_times.append((rel, entry.mtime))

    def _root_attrs(self, entry: Entry) -> None:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.tree.rootfd)
        try:
            self.set_fd_attrs(fd, entry)
        finally:
            os.close(fd)
        self.dir_times.append(("", entry.mtime))

    def _regular(self, name, parent, existing, entry, reader) -> None:
        self._replace(name, parent, existing)
        if entry.staged is not None:
            # written (data and attributes) while an earlier layer was applied
            os.rename(entry.staged, name, src_dir_fd=self.staged_fd, dst_dir_fd=parent)
            if self.options.shared_inodes:
                self.created_inodes.add(entry.staged_ino)
            return
        ino = self.write_file(name, parent, entry, reader)
        if self.options.shared_inodes:
            self.created_inodes.add(ino)

    def write_file(self, name: str, dirfd: int, entry: Entry, reader: Reader) -> int:
        """Create name in dirfd (never through a link, never over a file),
        write the entry's data and attributes; its inode number."""
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dirfd)
        try:
            if entry.size:
                reader.copy_to(fd, entry.size)
            self.set_fd_attrs(fd, entry)
            os.utime(fd, ns=(to_ns(entry.mtime),) * 2)
            return os.fstat(fd).st_ino
        finally:
            os.close(fd)

    def _special(self, name, parent, existing, entry) -> None:
        if entry.type in (b"3", b"4"):
            if not self.root:
                self.stats.skipped_devices += 1
                return
            kind = stat.S_IFCHR if entry.type == b"3" else stat.S_IFBLK
            self._replace(name, parent, existing)
            os.mknod(name, kind | 0o600, os.makedev(entry.devmajor, entry.devminor), dir_fd=parent)
        else:
            self._replace(name, parent, existing)
            os.mkfifo(name, 0o600, dir_fd=parent)
        self._node_attrs(name, parent, entry)
        if self.options.shared_inodes:
            self.created_inodes.add(os.stat(name, dir_fd=parent, follow_symlinks=False).st_ino)

    def _hardlink(self, rel, name, parent, existing, entry) -> None:
        target = clean_name(entry.linkname)
        if not target:
            raise UnsafeEntry(f"hard link {entry.name!r} points at the root directory")
        if target == rel:
            return
        sparent = self.tree.parent(target, create=False)
        sname = target.rpartition("/")[2]
        src = lstat_at(sname, sparent) if sparent is not None else None
        if src is None:
            raise UnsafeEntry(f"hard link {entry.name!r} points at missing {entry.linkname!r}")
        if stat.S_ISDIR(src.st_mode):
            raise UnsafeEntry(f"hard link {entry.name!r} points at a directory")
        if existing is not None and existing.st_ino == src.st_ino and existing.st_dev == src.st_dev:
            return
        self._replace(name, parent, existing)
        sparent = self.tree.parent(target, create=False)  # _replace may have reset the cache
        if sparent is None or lstat_at(sname, sparent) is None:
            raise UnsafeEntry(f"hard link {entry.name!r} points at missing {entry.linkname!r}")
        if (self.options.shared_inodes and src.st_ino not in self.created_inodes
                and stat.S_ISREG(src.st_mode) and not self._same_attrs(src, entry)):
            # changing attributes of an inode shared with a cached snapshot: copy up
            self._copy_up(sname, sparent, name, parent, entry)
            return
        os.link(sname, name, src_dir_fd=sparent, dst_dir_fd=parent, follow_symlinks=False)
        if stat.S_ISLNK(src.st_mode) or self._same_attrs(src, entry):
            return
        # Docker applies the link header's attributes to the (shared) inode
        self._node_attrs(name, parent, Entry(**{**entry.__dict__, "xattrs": {}}))

    def _same_attrs(self, st: os.stat_result, entry: Entry) -> bool:
        if stat.S_IMODE(st.st_mode) != entry.mode:
            return False
        if self.root and (st.st_uid != entry.uid or st.st_gid != entry.gid):
            return False
        return int(st.st_mtime) == int(entry.mtime)

    def _copy_up(self, sname, sparent, name, parent, entry) -> None:
        self.stats.copied_up += 1
        src = os.open(sname, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sparent)
        try:
            dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o600, dir_fd=parent)
            try:
                while os.copy_file_range(src, dst, CHUNK):
                    pass
                for key in os.listxattr(src):
                    entry.xattrs.setdefault(key, os.getxattr(src, key))
                self.set_fd_attrs(dst, entry)
                os.utime(dst, ns=(to_ns(entry.mtime),) * 2)
                self.created_inodes.add(os.fstat(dst).st_ino)
            finally:
                os.close(dst)
            self._relink_group(os.fstat(src), name, parent)
        finally:
            os.close(src)

    def _relink_group(self, old: os.stat_result, name: str, parent: int) -> None:
        """Every other name of the shared inode `old` in this tree now names
        the private copy (parent/name): Docker changes the one inode, so all
        its names see the new attributes. Only this tree's directories change
        (they are per snapshot); their mtimes are kept."""
        for _, _, files, dfd in os.fwalk(".", dir_fd=self.tree.rootfd, follow_symlinks=False):
            hits = [f for f in files if (st := lstat_at(f, dfd)) is not None
                    and st.st_ino == old.st_ino and st.st_dev == old.st_dev]
            if not hits:
                continue
            times = os.fstat(dfd)
            for f in hits:
                tmp = f".dockyard-relink-{uuid.uuid4().hex}"
                os.link(name, tmp, src_dir_fd=parent, dst_dir_fd=dfd, follow_symlinks=False)
                os.rename(tmp, f, src_dir_fd=dfd, dst_dir_fd=dfd)
            os.utime(dfd, ns=(times.st_atime_ns, times.st_mtime_ns))

    # -- whiteouts

    def _whiteout(self, rel: str, base: str) -> None:
        parent_rel = rel.rpartition("/")[0]
        if base == OPAQUE:
            self._opaque(parent_rel)
            self._mark(parent_rel)
            return
        if base.startswith(WHITEOUT + WHITEOUT):
            return  # other AUFS metadata (.wh..wh.plnk, ...): not content
        victim = base[len(WHITEOUT):]
        if victim in ("", ".", ".."):
            raise UnsafeEntry(f"invalid whiteout {rel!r}")
        target = f"{parent_rel}/{victim}" if parent_rel else victim
        if target in self.layer_paths:
            return  # a whiteout never hides what its own layer adds
        parent = self.tree.parent(target, create=False)
        if parent is None:
            return
        st = lstat_at(victim, parent)
        if st is not None:
            self._replace(victim, parent, st)

    def _opaque(self, dir_rel: str) -> None:
        try:
            fd = self.tree.open(dir_rel, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise UnsafeEntry(f"cannot resolve {dir_rel!r} inside the root: {exc.strerror}") from None
        try:
            self._hide_lower(fd, dir_rel)
        finally:
            os.close(fd)
        self.tree.forget_dirs()

    def _hide_lower(self, fd: int, dir_rel: str) -> None:
        for child in os.listdir(fd):
            crel = f"{dir_rel}/{child}" if dir_rel else child
            st = lstat_at(child, fd)
            if st is None:
                continue
            if crel not in self.layer_paths:
                _remove(child, fd, st)
            elif stat.S_ISDIR(st.st_mode):
                cfd = os.open(child, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                try:
                    self._hide_lower(cfd, crel)
                finally:
                    os.close(cfd)

    # -- attributes

    def set_fd_attrs(self, fd: int, entry: Entry) -> None:
        if self.root:
            os.fchown(fd, entry.uid, entry.gid)
        os.fchmod(fd, entry.mode)  # after chown, which clears setuid/setgid
        for key, value in entry.xattrs.items():
            self._setxattr(fd, key, value)

    def _owner(self, name: str, parent: int, entry: Entry) -> None:
        if self.root:
            os.chown(name, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)

    def _node_attrs(self, name: str, parent: int, entry: Entry) -> None:
        """Attributes of a node we just made (fifo, device, hard link; never a
        symlink): *at() calls relative to its directory; opening a fifo or a
        device to get an fd would block or have side effects."""
        self._owner(name, parent, entry)
        os.chmod(name, entry.mode, dir_fd=parent)
        self._xattrs_nofollow(name, parent, entry)
        os.utime(name, ns=(to_ns(entry.mtime),) * 2, dir_fd=parent, follow_symlinks=False)

    def _xattrs_nofollow(self, name: str, parent: int, entry: Entry) -> None:
        for key, value in entry.xattrs.items():
            # /proc/self/fd/N is the parent directory itself; the last
            # component (the symlink) is not followed
            self._setxattr(f"/proc/self/fd/{parent}/{name}", key, value, follow=False)

    def _setxattr(self, target, key: str, value: bytes, follow: bool = True) -> None:
        if not self.root and key.startswith(("trusted.", "security.")):
            return
        try:
            os.setxattr(target, key, value, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                raise

    def finish(self) -> None:
        """Directory mtimes last (deepest first): their contents are in place."""
        for rel, mtime in sorted(self.dir_times, key=lambda item: item[0].count("/"), reverse=True):
            ns = (to_ns(mtime),) * 2
            if not rel:
                os.utime(f"/proc/self/fd/{self.tree.rootfd}", ns=ns)
                continue
            parent = self.tree.parent(rel, create=False)
            if parent is None:
                continue
            name = rel.rpartition("/")[2]
            st = lstat_at(name, parent)
            if st is not None and stat.S_ISDIR(st.st_mode):
                os.utime(name, ns=ns, dir_fd=parent, follow_symlinks=False)



def apply_layer(root: str | os.PathLike, blob_path: str | os.PathLike, media_type: str,
                expected_diff_id: str | None, options: ApplyOptions | None = None) -> LayerStats:
    """Apply one layer blob to the tree at root; verify its diff ID.

    On a verification failure the tree is left partially modified: callers
    apply into a staging tree and discard it on error (see puller.runtime.snapshots)."""
    options = options or ApplyOptions()
    meter, stream = layer_stream(blob_path, media_type, options)
    reader = Reader(stream)
    tree = ConfinedTree(root, options.force_portable_resolver)
    applier = LayerApplier(tree, options)
    try:
        applier.apply_all(read_entries(reader, options.limits), reader)
        reader.drain()  # the diff ID covers the whole stream, padding included
        applier.finish()
    finally:
        tree.close()
        stream.close()
    applier.stats.uncompressed_bytes = meter.count
    applier.stats.diff_id = meter.diff_id
    verify_diff_id(applier.stats, expected_diff_id, blob_path)
    return applier.stats


def verify_diff_id(stats: LayerStats, expected_diff_id: str | None, blob_path) -> None:
    if expected_diff_id is not None and stats.diff_id != expected_diff_id:
        raise LayerVerificationError(
            f"layer {Path(blob_path).name[:12]} does not match its diff ID: "
            f"expected {expected_diff_id}, got {stats.diff_id}")
