"""Where a bundle's bytes go and come from: one file, or volumes of at most
`max_size` bytes each for media with a size limit (`--max-size`).

A volume is a 4 KiB header (a magic line, then JSON: the bundle's id, this
volume's number, how many there are), then the next slice of the bundle's
bytes. The bundle is the slices joined in number order, whatever order the
volumes are handed over in, and whatever they were renamed to.

    out = Output(path, max_size=None, bundle_id="sha256:...")   write(), copy_from(), commit() / abort()
    source = open_source(paths)                                  pread(), size, a file object over the joined bytes
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import tempfile

from puller.errors import one_line
from puller.transfer.mirror import leftovers
from puller.transfer.mirror.errors import BundleError

VOLUME_MAGIC = b"DOCKYARD-BUNDLE-VOLUME\n"
HEADER_SIZE = 4096
MIN_VOLUME = HEADER_SIZE + 64 * 1024
MiB = 1024 * 1024


def volume_name(path: pathlib.Path, number: int) -> pathlib.Path:
    return path.with_name(f"{path.name}.vol{number:03d}")


def _sync_dir(directory: pathlib.Path) -> None:
    with contextlib.suppress(OSError):          # the renames themselves survive a power cut
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Output:
    """Hidden files beside `path`, renamed into place by commit(): `path`
    itself, or `path.vol001`, `path.vol002`, ... with `max_size`."""

    def __init__(self, path: pathlib.Path, max_size: int | None = None, bundle_id: str = ""):
        if max_size is not None and max_size < MIN_VOLUME:
            raise BundleError(f"--max-size must be at least {MIN_VOLUME} bytes")
        self.path = path
        self.max_size = max_size
        self.bundle_id = bundle_id
        self.temps: list[pathlib.Path] = []
        self.held: list = []                    # the full volumes' files, until commit or abort
        self.handle = None
        self.room = 0
        self._next()

    def _next(self) -> None:
        try:
            fd, temp = tempfile.mkstemp(prefix=leftovers.partial_prefix(self.path), suffix=leftovers.PARTIAL,
                                        dir=self.path.parent)
            leftovers.hold(fd)          # a later export leaves it alone while this one lives
        except OSError as exc:
            raise BundleError(f"{self.path}: {one_line(exc)}") from exc
        if self.handle is not None:
            self.handle.flush()
            self.held.append(self.handle)       # left open: its lock says this export still lives
        self.temps.append(pathlib.Path(temp))
        self.handle = os.fdopen(fd, "wb")
        if self.max_size is None:
            self.room = 2 ** 63
        else:
            self.handle.write(b"\0" * HEADER_SIZE)      # the header, once the count is known
            self.room = self.max_size - HEADER_SIZE

    def write(self, data) -> int:
        view = memoryview(data)
        while view:
            if self.room == 0:
                self._next()
            n = min(len(view), self.room)
            self.handle.write(view[:n])
            self.room -= n
            view = view[n:]
        return len(data)

    def flush(self) -> None:
        self.handle.flush()

    def skip(self, count: int) -> None:
        """Leave count bytes to be written in place later (one file only)."""
        self.handle.flush()
        self.handle.seek(count, os.SEEK_CUR)
        self.room -= count

    def copy_from(self, fd: int, count: int, on_progress=None) -> None:
        """count bytes of the file `fd` at its offset, copied in the kernel."""
        self.handle.flush()
        while count:
            if self.room == 0:
                self._next()
                self.handle.flush()
            n = os.copy_file_range(fd, self.handle.fileno(), min(count, self.room, 64 * MiB))
            if n == 0:
                raise BundleError("a blob file is shorter than its descriptor says")
            count -= n
            self.room -= n
            if on_progress:
                on_progress(n)

    def _release(self) -> None:
        for handle in self.held:
            with contextlib.suppress(OSError):
                handle.close()
        self.held = []

    def commit(self) -> list[pathlib.Path]:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.held.append(self.handle)           # locked until renamed
        self.handle = None
        try:
            return self._rename()
        finally:
            self._release()

    def _rename(self) -> list[pathlib.Path]:
        if self.max_size is None:
            os.replace(self.temps[0], self.path)
            _sync_dir(self.path.parent)
            return [self.path]
        finals = []
        for number, temp in enumerate(self.temps, 1):
            header = VOLUME_MAGIC + json.dumps({"bundle": self.bundle_id, "volume": number,
                                                "volumes": len(self.temps)}).encode() + b"\n"
            with open(temp, "r+b") as handle:
                handle.write(header.ljust(HEADER_SIZE, b"\0"))
                handle.flush()
                os.fsync(handle.fileno())
            finals.append(volume_name(self.path, number))
        for temp, final in zip(self.temps, finals):
            os.replace(temp, final)
        _sync_dir(self.path.parent)
        return finals

    def abort(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(OSError):
                self.handle.close()
        self._release()
        for temp in self.temps:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()


class Source(io.RawIOBase):
    """The bundle's bytes, from one file or joined from volumes: read at
    offsets (pread), or as a file object (for tarfile and zstd)."""

    def __init__(self, parts: list[tuple[int, int, int]], name: str):
        self.parts = parts                  # (fd, offset of the slice in its file, length)
        self.size = sum(length for _, _, length in parts)
        self.name = name
        self._position = 0

    def pread(self, offset: int, length: int) -> bytes:
        out = []
        start = 0
        for fd, base, part in self.parts:
            if length and offset < start + part:
                within = offset - start
                n = min(length, part - within)
                data = os.pread(fd, n, base + within)
                if len(data) != n:
                    raise BundleError(f"{self.name}: cut short")
                out.append(data)
                offset, length = offset + n, length - n
            start += part
        if length:
            raise BundleError(f"{self.name}: cut short (a member ends past the end of the bundle)")
        return b"".join(out)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self._position)
        if n <= 0:
            return 0
        data = self.pread(self._position, n)
        buffer[:n] = data
        self._position += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._position, 2: self.size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        for fd, _, _ in self.parts:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.parts = []
        super().close()


def _volume_header(fd: int) -> dict | None:
    head = os.pread(fd, HEADER_SIZE, 0)
    if not head.startswith(VOLUME_MAGIC):
        return None
    try:
        doc = json.loads(head[len(VOLUME_MAGIC):].split(b"\n", 1)[0])
        if isinstance(doc, dict) and all(isinstance(doc.get(k), int) for k in ("volume", "volumes")) \
                and isinstance(doc.get("bundle"), str):
            return doc
    except ValueError:
        pass
    raise BundleError("a volume header is damaged")


def open_source(paths: list[str | os.PathLike]) -> Source:
    """One bundle file, or every volume of one bundle (any order)."""
    fds: list[int] = []
    try:
        volumes: dict[int, tuple[int, int]] = {}
        bundle = count = None
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            fds.append(fd)
            header = _volume_header(fd)
            if header is None:
                if len(paths) != 1:
                    raise BundleError(f"{path}: not a bundle volume (give one bundle, or all its volumes)")
                return Source([(fd, 0, os.fstat(fd).st_size)], str(path))
            if bundle is None:
                bundle, count = header["bundle"], header["volumes"]
            if header["bundle"] != bundle or header["volumes"] != count:
                raise BundleError(f"{path}: a volume of another bundle")
            if header["volume"] in volumes:
                raise BundleError(f"{path}: volume {header['volume']} given twice")
            volumes[header["volume"]] = (fd, os.fstat(fd).st_size - HEADER_SIZE)
        missing = [n for n in range(1, count + 1) if n not in volumes]
        if missing or len(volumes) != count:
            raise BundleError(f"volume(s) {', '.join(map(str, missing))} of {count} missing")
        return Source([(volumes[n][0], HEADER_SIZE, volumes[n][1]) for n in range(1, count + 1)],
                      str(paths[0]))
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        raise BundleError(one_line(exc)) from exc
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
