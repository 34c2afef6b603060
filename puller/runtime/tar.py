"""A small streaming tar reader of our own: ustar, GNU long names and links,
PAX records (local and global), base-256 numbers, xattrs from PAX
(`SCHILY.xattr.*`, `LIBARCHIVE.xattr.*`).

It never holds more than one read buffer of a layer: entries are yielded as
their headers are read, and a regular file's data is copied straight from the
buffer to the file being written. Sizes of metadata records and the number
of entries are bounded by UnpackLimits. Unknown entry types are skipped (Go's
archive/tar and Docker ignore them too); GNU sparse files are refused.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from typing import Iterator

from puller.runtime.errors import CorruptLayer, LayerTooLarge
from puller.runtime.options import UnpackLimits

BLOCK = 512


class Reader:
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


def read_entries(reader: Reader, limits: UnpackLimits) -> Iterator[Entry]:
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
