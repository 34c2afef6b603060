"""Apply OCI layer changesets to a root filesystem: streaming, verified, confined.

    apply_layer(root, blob_path, media_type, expected_diff_id, options) -> LayerStats

One pass over each layer: the blob is decompressed as a stream (gzip in-process
with the fastest inflate at hand: ISA-L (`isal`), zlib-ng, else zlib; or through
a `pigz -dc` pipe on request; zstd with `zstandard`; or plain tar), the
decompressed bytes are hashed and counted as they go by (the diff ID is checked
at the end, the size limit on the way: a gzip bomb stops at the limit), and the
tar entries are parsed by a small reader of our own (ustar, GNU long names,
PAX, base-256 numbers) that never holds more than one read buffer of a layer.

Confinement: no path from the archive is ever handed to a path-walking system
call from the host's point of view. Every parent directory is resolved inside
the root by `openat2(RESOLVE_IN_ROOT)` (symlinks left by earlier layers, `..`
and absolute link targets all stay under the root; loops fail with ELOOP), or
by an equivalent component-by-component walk with O_NOFOLLOW where openat2 is
missing; the last component is then created, replaced or removed with a
`*at()` call relative to that directory fd, never followed. Names that climb
out of the root lexically (`../x`) are refused like Docker does; absolute
names are taken relative to the root. Hard link sources are resolved the same
way, so a link can only ever point at an inode under the root.

Layer semantics (layer.md): entries replace what is there (a directory over a
directory only updates its attributes); `.wh.NAME` removes NAME from lower
layers, `.wh..wh..opq` hides everything the lower layers put in its directory,
and neither touches what this same layer adds, whatever their order in the
archive. Attributes: lchown (when root), then chmod (so setuid/setgid bits
survive the chown), then xattrs (PAX `SCHILY.xattr.*` / `LIBARCHIVE.xattr.*`,
after chown which would drop `security.capability`), then mtimes; directory
mtimes are set last, once their contents are in place. Device nodes are only
made as root; without root they are skipped and counted (like rootless Docker).

`shared_inodes=True` tells the applier that inodes already in the tree are
shared with other trees (the hard-linked snapshot cache of puller.bundle), so
it must never modify one in place: every change replaces the directory entry
with a new inode instead.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import hashlib
import importlib
import os
import queue
import shutil
import stat
import subprocess
import threading
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import zstandard

# ---- errors --------------------------------------------------------------------


class UnpackError(Exception):
    """An image could not be unpacked; str() is one line for the user."""


class UnsafeEntry(UnpackError):
    """An archive entry tries to reach outside the root or is malformed."""


class LayerVerificationError(UnpackError):
    """The uncompressed layer does not hash to its diff ID."""


class LayerTooLarge(UnpackError):
    """The uncompressed layer exceeds the configured limit (gzip bomb guard)."""


class CorruptLayer(UnpackError):
    """The compressed stream or the tar archive is truncated or invalid."""


# ---- settings --------------------------------------------------------------------

GZIP_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
})
ZSTD_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
})
TAR_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.docker.image.rootfs.diff.tar",
})


@dataclass(frozen=True)
class UnpackLimits:
    """Bounds on what one layer may make us do."""
    max_layer_bytes: int = 64 << 30        # uncompressed tar stream per layer
    max_entries: int = 5_000_000           # tar entries per layer
    max_header_bytes: int = 1 << 20        # one PAX / GNU long-name record


@dataclass(frozen=True)
class ApplyOptions:
    limits: UnpackLimits = field(default_factory=UnpackLimits)
    as_root: bool | None = None            # None: os.geteuid() == 0
    decompressor: str = "auto"             # "auto" (fastest in-process) | "pipe" (pigz -dc) | "zlib"
    shared_inodes: bool = False            # see module docstring
    force_portable_resolver: bool = False  # tests: use the O_NOFOLLOW walk, not openat2

    @property
    def root_privileges(self) -> bool:
        return os.geteuid() == 0 if self.as_root is None else self.as_root


@dataclass
class LayerStats:
    diff_id: str = ""
    uncompressed_bytes: int = 0
    entries: int = 0
    skipped_devices: int = 0
    copied_up: int = 0


CHUNK = 1 << 20
BLOCK = 512

# ---- decompressed, hashed, bounded chunk streams ---------------------------------------


def _pipe_tool() -> list[str] | None:
    for tool in ("pigz", "gzip"):
        path = shutil.which(tool)
        if path:
            return [path, "-dc"]
    return None


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb", buffering=0) as f:
        while True:
            data = f.read(CHUNK)
            if not data:
                return
            yield data


def inflate_module():
    """The fastest in-process inflate at hand, zlib-compatible: ISA-L's is about
    twice zlib's speed, zlib-ng's close to it. All release the GIL while they
    work, so decompressing overlaps with the applier's system calls."""
    global _INFLATE
    if _INFLATE is None:
        _INFLATE = zlib
        for name in ("isal.isal_zlib", "zlib_ng.zlib_ng"):
            try:
                _INFLATE = importlib.import_module(name)
                break
            except ImportError:
                continue
    return _INFLATE


_INFLATE = None


def _zlib_chunks(path: Path, module=zlib) -> Iterator[bytes]:
    # wbits=31: gzip wrapper. max_length bounds each output chunk, so a bomb
    # never inflates more than CHUNK at once; several members are concatenated.
    d = module.decompressobj(31)
    started = False
    for data in _file_chunks(path):
        while data:
            started = True
            try:
                out = d.decompress(data, CHUNK)
            except module.error as exc:
                raise CorruptLayer(f"invalid gzip data: {exc}") from None
            if out:
                yield out
            if d.eof:
                data = d.unused_data
                d = module.decompressobj(31)
                if data and not data.startswith(b"\x1f\x8b"):
                    return  # trailing garbage after the last member is ignored, as gzip -d does
                started = bool(data)
            else:
                data = d.unconsumed_tail
    if started and not d.eof:
        raise CorruptLayer("gzip stream is truncated")


def _pipe_chunks(path: Path, argv: list[str]) -> Iterator[bytes]:
    with open(path, "rb") as src:
        proc = subprocess.Popen(argv, stdin=src, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        fd = proc.stdout.fileno()
        try:  # fewer, larger reads
            import fcntl
            fcntl.fcntl(fd, 1031, CHUNK)  # F_SETPIPE_SZ
        except OSError:
            pass
        while True:
            data = os.read(fd, CHUNK)
            if not data:
                break
            yield data
        err = proc.stderr.read()
        if proc.wait() != 0:
            msg = err.decode(errors="replace").strip().splitlines()
            raise CorruptLayer(f"gzip stream is invalid or truncated ({msg[-1] if msg else proc.returncode})")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def _zstd_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        reader = zstandard.ZstdDecompressor().stream_reader(f, read_size=CHUNK, read_across_frames=True)
        try:
            while True:
                data = reader.read(CHUNK)
                if not data:
                    return
                yield data
        except zstandard.ZstdError as exc:
            raise CorruptLayer(f"invalid zstd data: {exc}") from None


def decompressed_chunks(blob_path: str | os.PathLike, media_type: str,
                        decompressor: str = "auto") -> Iterator[bytes]:
    """The layer's tar stream, as chunks of at most about CHUNK bytes."""
    path = Path(blob_path)
    if media_type in GZIP_TYPES:
        argv = _pipe_tool() if decompressor == "pipe" else None
        if argv:
            return _pipe_chunks(path, argv)
        return _zlib_chunks(path, inflate_module() if decompressor == "auto" else zlib)
    if media_type in ZSTD_TYPES:
        return _zstd_chunks(path)
    if media_type in TAR_TYPES:
        return _file_chunks(path)
    raise UnpackError(f"unsupported layer media type {media_type!r}")


def _prefetch(chunks: Iterator[bytes], depth: int = 8) -> Iterator[bytes]:
    """Run the producer (decompress + hash: both release the GIL) in a thread,
    so it overlaps with the applier's system calls."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for chunk in chunks:
                while not stop.is_set():
                    try:
                        q.put(chunk, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)
        finally:
            if stop.is_set() and hasattr(chunks, "close"):
                chunks.close()

    thread = threading.Thread(target=produce, name="layer-decompress", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


class _Meter:
    """Hash and count a chunk stream, stopping at the size limit."""

    def __init__(self, chunks: Iterator[bytes], limit: int):
        self._chunks = chunks
        self.hasher = hashlib.sha256()
        self.count = 0
        self.limit = limit

    def __iter__(self):
        for chunk in self._chunks:
            self.count += len(chunk)
            if self.count > self.limit:
                raise LayerTooLarge(f"layer is larger than the {self.limit}-byte uncompressed limit")
            self.hasher.update(chunk)
            yield chunk


# ---- a minimal streaming tar reader ------------------------------------------------------


class _Reader:
    """Buffered reads of exact sizes over a chunk iterator."""

    def __init__(self, chunks: Iterator[bytes]):
        self._it = iter(chunks)
        self._buf = b""
        self._pos = 0
        self.eof = False

    def _fill(self) -> bool:
        for chunk in self._it:
            if chunk:
                self._buf = self._buf[self._pos:] + chunk if self._pos < len(self._buf) else chunk
                self._pos = 0
                return True
        self.eof = True
        return False

    def read_exact(self, n: int) -> bytes | None:
        """n bytes, or None at a clean end of stream, CorruptLayer if cut short."""
        while len(self._buf) - self._pos < n:
            if not self._fill():
                if len(self._buf) - self._pos == 0:
                    return None
                raise CorruptLayer("tar archive is truncated")
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out

    def copy_to(self, fd: int | None, n: int) -> None:
        """The next n bytes of the entry, written to fd (dropped when None)."""
        while n:
            avail = len(self._buf) - self._pos
            if not avail:
                if not self._fill():
                    raise CorruptLayer("tar archive is truncated in the middle of an entry")
                continue
            take = min(avail, n)
            if fd is not None:
                view = memoryview(self._buf)[self._pos:self._pos + take]
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            self._pos += take
            n -= take

    def skip(self, n: int) -> None:
        self.copy_to(None, n)

    def drain(self) -> bool:
        """Consume the rest; True when all of it was zero bytes (tar padding)."""
        clean = True
        rest = self._buf[self._pos:]
        while True:
            if rest.strip(b"\0"):
                clean = False
            self._buf, self._pos = b"", 0
            if not self._fill():
                return clean
            rest = self._buf


@dataclass
class Entry:
    name: str
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime: float
    linkname: str
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes]
    staged: str | None = None      # regular file already written in a StagedLayer's directory
    staged_ino: int = 0


def _num(field_: bytes) -> int:
    if field_ and field_[0] & 0x80:  # base-256 (GNU) for large values
        value = int.from_bytes(field_, "big", signed=False)
        value &= ~(0x80 << (8 * (len(field_) - 1)))
        if field_[0] & 0x40:  # negative
            value -= 1 << (8 * len(field_) - 1)
        return value
    text = field_.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise CorruptLayer("invalid tar header (bad number field)") from None


def _str(field_: bytes) -> str:
    return field_.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _parse_pax(data: bytes, limits: UnpackLimits) -> dict[str, bytes]:
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise CorruptLayer("invalid PAX header")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise CorruptLayer("invalid PAX header") from None
        if length <= 0 or pos + length > len(data):
            raise CorruptLayer("invalid PAX header")
        record = data[space + 1:pos + length]
        if not record.endswith(b"\n") or b"=" not in record:
            raise CorruptLayer("invalid PAX header")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value
        pos += length
    return records


def read_entries(reader: _Reader, limits: UnpackLimits) -> Iterator[Entry]:
    """Yield entries; the caller must consume (copy_to/skip) exactly entry.size
    data bytes of a regular file before asking for the next one."""
    global_pax: dict[str, bytes] = {}
    pending_pax: dict[str, bytes] = {}
    long_name: str | None = None
    long_link: str | None = None
    count = 0
    while True:
        header = reader.read_exact(BLOCK)
        if header is None:
            return  # no end-of-archive blocks: accepted, as Go's archive/tar does
        if header == b"\0" * BLOCK:
            if not reader.drain():
                raise CorruptLayer("data after the end of the tar archive")
            return
        checksum = _num(header[148:156])
        computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if checksum != computed:
            raise CorruptLayer("invalid tar header (checksum mismatch)")
        count += 1
        if count > limits.max_entries:
            raise LayerTooLarge(f"layer has more than {limits.max_entries} entries")
        typeflag = header[156:157] or b"0"
        size = _num(header[124:136])
        if size < 0:
            raise CorruptLayer("invalid tar header (negative size)")
        if typeflag in (b"x", b"g", b"L", b"K"):
            if size > limits.max_header_bytes:
                raise LayerTooLarge(f"tar metadata record of {size} bytes exceeds the limit")
            data = reader.read_exact(size + (-size % BLOCK)) if size else b""
            if data is None:
                raise CorruptLayer("tar archive is truncated")
            data = data[:size]
            if typeflag == b"x":
                pending_pax.update(_parse_pax(data, limits))
            elif typeflag == b"g":
                global_pax.update(_parse_pax(data, limits))
            elif typeflag == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            else:
                long_link = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        name = _str(header[0:100])
        if header[257:262] == b"ustar":
            prefix = _str(header[345:500])
            if prefix:
                name = prefix + "/" + name
        pax = {**global_pax, **pending_pax} if global_pax else pending_pax
        if long_name is not None:
            name = long_name
        linkname = long_link if long_link is not None else _str(header[157:257])
        entry = Entry(name=name, type=typeflag if typeflag != b"\0" else b"0",
                      mode=_num(header[100:108]) & 0o7777, uid=_num(header[108:116]),
                      gid=_num(header[116:124]), size=size, mtime=float(_num(header[136:148])),
                      linkname=linkname, devmajor=_num(header[329:337]),
                      devminor=_num(header[337:345]), xattrs={})
        if pax:
            _apply_pax(entry, pax)
        pending_pax, long_name, long_link = {}, None, None
        if entry.type == b"7":
            entry.type = b"0"  # contiguous file: a regular file
        if entry.type == b"S":
            raise CorruptLayer(f"GNU sparse file {entry.name!r} is not supported")
        if entry.type not in (b"0", b"5", b"1", b"2", b"3", b"4", b"6"):
            # unknown types: skip their data (Go/Docker ignore them too)
            reader.skip(entry.size + (-entry.size % BLOCK))
            continue
        if entry.type in (b"5", b"1", b"2", b"3", b"4", b"6"):
            # only regular files carry data (a hard link with size>0 is skipped over)
            if entry.size:
                reader.skip(entry.size + (-entry.size % BLOCK))
            entry.size = 0
        yield entry
        if entry.type == b"0":
            reader.skip(-entry.size % BLOCK)


def _apply_pax(entry: Entry, pax: dict[str, bytes]) -> None:
    for key, value in pax.items():
        try:
            if key == "path":
                entry.name = value.decode("utf-8", "surrogateescape")
            elif key == "linkpath":
                entry.linkname = value.decode("utf-8", "surrogateescape")
            elif key == "size":
                entry.size = int(value)
            elif key == "uid":
                entry.uid = int(value)
            elif key == "gid":
                entry.gid = int(value)
            elif key == "mtime":
                entry.mtime = float(value)
            elif key.startswith("SCHILY.xattr."):
                entry.xattrs[key[len("SCHILY.xattr."):]] = value
            elif key.startswith("LIBARCHIVE.xattr."):
                name = _unescape_libarchive(key[len("LIBARCHIVE.xattr."):])
                entry.xattrs.setdefault(name, base64.b64decode(value))
        except ValueError:
            raise CorruptLayer(f"invalid PAX value for {key!r}") from None


def _unescape_libarchive(name: str) -> str:
    # libarchive URL-encodes xattr names in its PAX keys
    from urllib.parse import unquote
    return unquote(name)


# ---- confined path resolution ---------------------------------------------------------------

O_PATH = getattr(os, "O_PATH", 0o10000000)
_DIR_FLAGS = O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
_SYS_OPENAT2 = 437  # same number on x86_64 and the generic table (arm64, riscv64)


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
            os.close(_openat2(os.open("/", _DIR_FLAGS), ".", _DIR_FLAGS))
            _openat2_works = True
        except OSError:
            _openat2_works = False
    return _openat2_works


MAX_SYMLINKS = 40


def _walk_in_root(rootfd: int, parts: list[str], flags: int) -> int:
    """Portable RESOLVE_IN_ROOT: follow symlinks, clamp `..` and absolute
    targets at the root, never leave it. Returns an fd opened with `flags` on
    the final component (which is followed if it is a symlink)."""
    stack = [os.dup(rootfd)]
    todo = list(reversed(parts))
    hops = 0
    try:
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            cur = stack[-1]
            st = os.stat(part, dir_fd=cur, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), part)
                target = os.readlink(part, dir_fd=cur)
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                todo.extend(reversed(target.split("/")))
                continue
            last = not any(p not in ("", ".") for p in todo)
            if last:
                return os.open(part, flags | os.O_NOFOLLOW, dir_fd=cur)
            if not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), part)
            stack.append(os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=cur))
        return os.open(".", flags, dir_fd=stack[-1])
    finally:
        for fd in stack:
            os.close(fd)


def open_in_root(rootfd: int, rel: str, flags: int, portable: bool = False) -> int:
    """Open rel (a path inside the root, symlinks resolved inside the root)."""
    if not portable and openat2_available():
        return _openat2(rootfd, rel or ".", flags)
    return _walk_in_root(rootfd, rel.split("/") if rel else [], flags)


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


# ---- the applier -----------------------------------------------------------------------------

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


class _Tree:
    """One root being written: cached parent-directory fds, confined lookups."""

    def __init__(self, root: str | os.PathLike, options: ApplyOptions):
        self.options = options
        self.portable = options.force_portable_resolver
        self.rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dirs: dict[str, int] = {}

    def close(self) -> None:
        self.forget_dirs()
        os.close(self.rootfd)

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
            fd = open_in_root(self.rootfd, parent, _DIR_FLAGS, self.portable)
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
                    nxt = open_in_root(self.rootfd, prefix, _DIR_FLAGS, self.portable)
                except FileNotFoundError:
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    except FileExistsError:
                        # a dangling symlink (or a race): refuse rather than follow
                        raise UnsafeEntry(f"cannot create directory {prefix!r}: "
                                          "a non-directory is in the way") from None
                    nxt = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    raise UnsafeEntry(f"cannot resolve {prefix!r} inside the root: {exc.strerror}") from None
                os.close(fd)
                fd = nxt
            return fd
        except BaseException:
            os.close(fd)
            raise


def _lstat(name: str, dirfd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove(name: str, dirfd: int, st: os.stat_result | None = None) -> None:
    st = st or _lstat(name, dirfd)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dirfd)
    else:
        os.unlink(name, dir_fd=dirfd)


class LayerApplier:
    """Applies one layer's entries to a tree (see the module docstring)."""

    def __init__(self, tree: _Tree | None, options: ApplyOptions, staged_fd: int | None = None):
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

    def apply(self, entry: Entry, reader: _Reader) -> None:
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
        existing = _lstat(name, parent)
        if t == b"5":
            self._directory(rel, name, parent, existing, entry)
        elif t == b"0":
            self._regular(name, parent, existing, entry, reader)
        elif t == b"2":
            self._replace(name, parent, existing)
            os.symlink(entry.linkname, name, dir_fd=parent)
            self._owner(name, parent, entry)
            self._xattrs_nofollow(name, parent, entry)
            os.utime(name, ns=(_ns(entry.mtime),) * 2, dir_fd=parent, follow_symlinks=False)
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
            self._fd_attrs(fd, entry)
        finally:
            os.close(fd)
        self.dir_times.append((rel, entry.mtime))

    def _root_attrs(self, entry: Entry) -> None:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.tree.rootfd)
        try:
            self._fd_attrs(fd, entry)
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
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=parent)
        try:
            if entry.size:
                reader.copy_to(fd, entry.size)
            self._fd_attrs(fd, entry)
            os.utime(fd, ns=(_ns(entry.mtime),) * 2)
            if self.options.shared_inodes:
                self.created_inodes.add(os.fstat(fd).st_ino)
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
        src = _lstat(sname, sparent) if sparent is not None else None
        if src is None:
            raise UnsafeEntry(f"hard link {entry.name!r} points at missing {entry.linkname!r}")
        if stat.S_ISDIR(src.st_mode):
            raise UnsafeEntry(f"hard link {entry.name!r} points at a directory")
        if existing is not None and existing.st_ino == src.st_ino and existing.st_dev == src.st_dev:
            return
        self._replace(name, parent, existing)
        sparent = self.tree.parent(target, create=False)  # _replace may have reset the cache
        if sparent is None or _lstat(sname, sparent) is None:
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
                self._fd_attrs(dst, entry)
                os.utime(dst, ns=(_ns(entry.mtime),) * 2)
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
            hits = [f for f in files if (st := _lstat(f, dfd)) is not None
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
        st = _lstat(victim, parent)
        if st is not None:
            self._replace(victim, parent, st)

    def _opaque(self, dir_rel: str) -> None:
        try:
            fd = open_in_root(self.tree.rootfd, dir_rel, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                              self.tree.portable)
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
            st = _lstat(child, fd)
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

    def _fd_attrs(self, fd: int, entry: Entry) -> None:
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
        os.utime(name, ns=(_ns(entry.mtime),) * 2, dir_fd=parent, follow_symlinks=False)

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
            ns = (_ns(mtime),) * 2
            if not rel:
                os.utime(f"/proc/self/fd/{self.tree.rootfd}", ns=ns)
                continue
            parent = self.tree.parent(rel, create=False)
            if parent is None:
                continue
            name = rel.rpartition("/")[2]
            st = _lstat(name, parent)
            if st is not None and stat.S_ISDIR(st.st_mode):
                os.utime(name, ns=ns, dir_fd=parent, follow_symlinks=False)


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


# ---- public entry points --------------------------------------------------------------------


def apply_layer(root: str | os.PathLike, blob_path: str | os.PathLike, media_type: str,
                expected_diff_id: str | None, options: ApplyOptions | None = None) -> LayerStats:
    """Apply one layer blob to the tree at root; verify its diff ID.

    On a verification failure the tree is left partially modified: callers
    apply into a staging tree and discard it on error (see puller.bundle)."""
    options = options or ApplyOptions()
    chunks = decompressed_chunks(blob_path, media_type, options.decompressor)
    meter = _Meter(chunks, options.limits.max_layer_bytes)
    stream = _prefetch(iter(meter))
    reader = _Reader(stream)
    tree = _Tree(root, options)
    applier = LayerApplier(tree, options)
    try:
        for entry in read_entries(reader, options.limits):
            try:
                applier.apply(entry, reader)
            except UnpackError:
                raise
            except OSError as exc:
                raise UnpackError(f"cannot apply {entry.name!r}: {exc.strerror or exc}") from None
        reader.drain()  # the diff ID covers the whole stream, padding included
        applier.finish()
    finally:
        tree.close()
        stream.close()
    applier.stats.uncompressed_bytes = meter.count
    applier.stats.diff_id = "sha256:" + meter.hasher.hexdigest()
    _verify(applier.stats, expected_diff_id, blob_path)
    return applier.stats


# ---- two-phase apply: file data first, in parallel with earlier layers ------------------------

STAGE_MAX_ENTRIES = 200_000  # entries kept in memory by a StagedLayer; beyond, apply in one pass


@dataclass
class StagedLayer:
    """A layer verified and with its regular files written, not yet placed.

    Phase one (`stage_layer`) needs no parent tree: it decompresses, hashes
    and parses the layer, writing each regular file (data and attributes) as
    a new inode named by its entry number under `directory`. Phase two
    (`apply_staged`) replays the entries on the tree in archive order exactly
    like `apply_layer`, renaming each staged file into place. So layer n+1's
    heavy work can run while layer n is applied (the pipelined pull)."""
    directory: Path
    entries: list[Entry]
    stats: LayerStats


def stage_layer(blob_path: str | os.PathLike, media_type: str, expected_diff_id: str | None,
                directory: str | os.PathLike, options: ApplyOptions | None = None,
                max_entries: int = STAGE_MAX_ENTRIES) -> StagedLayer | None:
    """Phase one into `directory` (which must exist, empty and private).
    None when the layer has more than max_entries entries (the caller then
    applies it in one pass); the directory is left for the caller to remove."""
    options = options or ApplyOptions()
    directory = Path(directory)
    chunks = decompressed_chunks(blob_path, media_type, options.decompressor)
    meter = _Meter(chunks, options.limits.max_layer_bytes)
    stream = _prefetch(iter(meter))
    reader = _Reader(stream)
    attrs = LayerApplier(None, options)
    dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    entries: list[Entry] = []
    try:
        for entry in read_entries(reader, options.limits):
            if len(entries) >= max_entries:
                return None
            if entry.type == b"0":
                if entry.name.rpartition("/")[2].startswith(WHITEOUT):
                    reader.skip(entry.size)  # a whiteout's (meaningless) data
                else:
                    name = str(len(entries))
                    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o600, dir_fd=dirfd)
                    try:
                        if entry.size:
                            reader.copy_to(fd, entry.size)
                        attrs._fd_attrs(fd, entry)
                        os.utime(fd, ns=(_ns(entry.mtime),) * 2)
                        entry.staged, entry.staged_ino = name, os.fstat(fd).st_ino
                    except OSError as exc:
                        raise UnpackError(f"cannot apply {entry.name!r}: {exc.strerror or exc}") from None
                    finally:
                        os.close(fd)
            entries.append(entry)
        reader.drain()
    finally:
        os.close(dirfd)
        stream.close()
    for entry in entries:
        entry.size = 0  # the data is consumed (read_entries needed the sizes until the end)
    stats = LayerStats(diff_id="sha256:" + meter.hasher.hexdigest(), uncompressed_bytes=meter.count)
    _verify(stats, expected_diff_id, blob_path)
    return StagedLayer(directory, entries, stats)


def apply_staged(root: str | os.PathLike, staged: StagedLayer, options: ApplyOptions | None = None) -> LayerStats:
    """Phase two: the staged layer's entries on the tree at root."""
    options = options or ApplyOptions()
    tree = _Tree(root, options)
    dirfd = os.open(staged.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    applier = LayerApplier(tree, options, staged_fd=dirfd)
    nodata = _Reader(iter(()))
    try:
        for entry in staged.entries:
            try:
                applier.apply(entry, nodata)
            except UnpackError:
                raise
            except OSError as exc:
                raise UnpackError(f"cannot apply {entry.name!r}: {exc.strerror or exc}") from None
        applier.finish()
    finally:
        tree.close()
        os.close(dirfd)
    applier.stats.diff_id = staged.stats.diff_id
    applier.stats.uncompressed_bytes = staged.stats.uncompressed_bytes
    return applier.stats


def _verify(stats: LayerStats, expected_diff_id: str | None, blob_path) -> None:
    if expected_diff_id is not None and stats.diff_id != expected_diff_id:
        raise LayerVerificationError(
            f"layer {Path(blob_path).name[:12]} does not match its diff ID: "
            f"expected {expected_diff_id}, got {stats.diff_id}")


def chain_ids(diff_ids: list[str]) -> list[str]:
    """ChainID of each prefix of the layer list (config.md)."""
    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return out


def layer_sequence(manifest: dict, config: dict, blob_path: Callable[[str], Path]
                   ) -> list[tuple[Path, str, str]]:
    """(blob path, media type, diff ID) for each layer of an image."""
    layers = manifest.get("layers") or []
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if len(layers) != len(diff_ids):
        raise UnpackError(f"image has {len(layers)} layers but its config lists {len(diff_ids)} diff IDs")
    return [(blob_path(layer["digest"]), layer.get("mediaType", ""), diff_id)
            for layer, diff_id in zip(layers, diff_ids)]
