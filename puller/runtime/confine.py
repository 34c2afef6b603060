"""Path confinement: every path the runtime takes from an image is resolved
INSIDE a root directory, never from the host's point of view.

    open_in_root(rootfd, rel, flags)    an fd on rel, symlinks resolved in the root
    ConfinedTree(root)                  the applier's view: parent directories, made when missing
    resolve_dir(root, path, reserved)   the working directory's canonical path, made when missing
    clean_name(name)                    an archive name as 'a/b/c', refused if it climbs out

Resolution is `openat2(RESOLVE_IN_ROOT)` where the kernel has it (5.6+): the
kernel treats the root as "/", so symlinks left by earlier layers, `..` and
absolute link targets all stay under it, and loops fail with ELOOP. Where it
is missing (or a test asks), one walk does the same in user space: one
component at a time, each opened with O_NOFOLLOW relative to the directory
before it, symlinks read and expanded by hand, `..` clamped at the root.
Only that walk yields the canonical path (openat2 gives an fd, not a name),
so `resolve_dir`, whose answer goes into config.json, always walks.

The last component of an entry is never resolved here: callers create,
replace or remove it with a `*at()` call relative to its parent's fd.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from typing import Collection

from puller.runtime.errors import ReservedPath, UnsafeEntry

O_PATH = getattr(os, "O_PATH", 0o10000000)
DIR_FLAGS = O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
_SYS_OPENAT2 = 437  # same number on x86_64 and the generic table (arm64, riscv64)
MAX_SYMLINKS = 40   # the kernel's own limit for one lookup
OPENAT2_TRIES = 8


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_openat2_works: bool | None = None


def _openat2(dirfd: int, path: str, flags: int) -> int:
    how = _OpenHow(flags, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(_SYS_OPENAT2, ctypes.c_int(dirfd), os.fsencode(path),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def openat2_available() -> bool:
    global _openat2_works
    if _openat2_works is None:
        try:
            os.close(_openat2(os.open("/", DIR_FLAGS), ".", DIR_FLAGS))
            _openat2_works = True
        except OSError:
            _openat2_works = False
    return _openat2_works


def lstat_at(name: str, dirfd: int) -> os.stat_result | None:
    """lstat of name in dirfd; None when it does not exist."""
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _walk(rootfd: int, path: str, flags: int, make_dirs: bool = False,
          reserved: Collection[str] = ()) -> tuple[int, list[str]]:
    """RESOLVE_IN_ROOT in user space. Returns an fd opened with `flags` on
    the resolved path and the names of its components from the root.

    Symlinks are followed (the last component's too), an absolute target
    restarts at the root, `..` never goes above it. Without make_dirs a
    missing component is FileNotFoundError and the last one, once no
    symlink, is opened as it is (O_NOFOLLOW). With make_dirs every
    component must be a directory and a missing one is made (0755); a
    first-level name in `reserved` is ReservedPath."""
    stack = [os.dup(rootfd)]
    names: list[str] = []
    todo = list(reversed(path.split("/")))
    hops = 0
    try:
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if names:
                    os.close(stack.pop())
                    names.pop()
                continue
            cur = stack[-1]
            st = lstat_at(part, cur)
            if st is None and not make_dirs:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), part)
            if st is not None and stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), part)
                target = os.readlink(part, dir_fd=cur)
                if target.startswith("/"):
                    while names:
                        os.close(stack.pop())
                        names.pop()
                todo.extend(reversed(target.split("/")))
                continue
            if make_dirs:
                if st is not None and not stat.S_ISDIR(st.st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), part)
                if not names and part in reserved:
                    raise ReservedPath(part)
                if st is None:
                    os.mkdir(part, 0o755, dir_fd=cur)
            elif not any(p not in ("", ".") for p in todo):
                if todo and not stat.S_ISDIR(st.st_mode):
                    # "name/" or "name/.": only a directory, as the kernel (and openat2) sees it
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), part)
                return os.open(part, flags | os.O_NOFOLLOW, dir_fd=cur), names + [part]
            elif not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), part)
            stack.append(os.open(part, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=cur))
            names.append(part)
        return os.open(".", flags, dir_fd=stack[-1]), names
    finally:
        for fd in stack:
            os.close(fd)


def open_in_root(rootfd: int, rel: str, flags: int, portable: bool = False) -> int:
    """Open rel (a path inside the root, symlinks resolved inside the root)."""
    if not portable and openat2_available():
        for _ in range(OPENAT2_TRIES):
            try:
                return _openat2(rootfd, rel or ".", flags)
            except BlockingIOError:
                # EAGAIN: a rename or mount anywhere on the system raced a ".."
                # in this lookup; measured: 7 in 200,000 lookups through a
                # "../" symlink on a busy host, 1 in 1,700 beside a renaming thread
                continue
        # still racing: the walk gives the same answer without the kernel's check
    return _walk(rootfd, rel, flags)[0]


def resolve_dir(root: str | os.PathLike, path: str, reserved: Collection[str] = ()) -> str:
    """The canonical absolute path (inside root) of the directory `path`,
    symlinks followed inside the root, missing directories made (0755).
    NotADirectoryError when a component is something else, OSError ELOOP
    past MAX_SYMLINKS, ReservedPath when it passes through a first-level
    directory named in `reserved`."""
    rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd, names = _walk(rootfd, path, DIR_FLAGS, make_dirs=True, reserved=reserved)
        os.close(fd)
    finally:
        os.close(rootfd)
    return "/" + "/".join(names)


def clean_name(name: str) -> str:
    """Normalise an archive path to 'a/b/c' relative to the root ('' = the
    root itself); refuse names that climb out of it."""
    if "\0" in name:
        raise UnsafeEntry(f"entry name {name!r} contains a NUL byte")
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise UnsafeEntry(f"entry {name!r} points outside the root")
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


class ConfinedTree:
    """One root being written: parent-directory fds resolved in the root
    (and cached: most entries share their parent with the one before)."""

    def __init__(self, root: str | os.PathLike, portable: bool = False):
        self.portable = portable
        self.rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dirs: dict[str, int] = {}

    def close(self) -> None:
        self.forget_dirs()
        os.close(self.rootfd)

    def open(self, rel: str, flags: int) -> int:
        """open_in_root for this tree."""
        return open_in_root(self.rootfd, rel, flags, self.portable)

    def forget_dirs(self, keep: int | None = None) -> None:
        """Drop cached directory fds (except `keep`, which the caller holds)."""
        kept = {}
        for key, fd in self._dirs.items():
            if fd == keep:
                kept[key] = fd
            else:
                os.close(fd)
        self._dirs = kept

    def parent(self, rel: str, create: bool = True) -> int | None:
        """A directory fd for rel's parent, resolved in the root; missing
        directories are created (0755, like Docker) when create is set."""
        parent = rel.rpartition("/")[0]
        fd = self._dirs.get(parent)
        if fd is not None:
            return fd
        try:
            fd = self.open(parent, DIR_FLAGS)
        except FileNotFoundError:
            if not create:
                return None
            fd = self._make_dirs(parent)
        except OSError as exc:
            raise UnsafeEntry(f"cannot resolve {parent!r} inside the root: {exc.strerror}") from None
        if len(self._dirs) > 256:
            self.forget_dirs()
        self._dirs[parent] = fd
        return fd

    def _make_dirs(self, rel: str) -> int:
        parts = rel.split("/")
        fd = os.dup(self.rootfd)
        try:
            for i, part in enumerate(parts):
                prefix = "/".join(parts[:i + 1])
                try:
                    nxt = self.open(prefix, DIR_FLAGS)
                except FileNotFoundError:
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    except FileExistsError:
                        # a dangling symlink (or a race): refuse rather than follow
                        raise UnsafeEntry(f"cannot create directory {prefix!r}: "
                                          "a non-directory is in the way") from None
                    nxt = os.open(part, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    raise UnsafeEntry(f"cannot resolve {prefix!r} inside the root: {exc.strerror}") from None
                os.close(fd)
                fd = nxt
            return fd
        except BaseException:
            os.close(fd)
            raise
