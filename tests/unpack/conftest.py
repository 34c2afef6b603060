"""Helpers for the unpack tests: layers crafted entry by entry with tarfile."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from puller.runtime.apply import apply_layer
from puller.runtime.options import ApplyOptions

TAR = "application/vnd.oci.image.layer.v1.tar"
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


@dataclass
class E:
    """One crafted tar entry."""
    name: str
    data: bytes | None = None          # regular file content
    type: bytes = tarfile.REGTYPE
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    mtime: int = 1_600_000_000
    devmajor: int = 0
    devminor: int = 0
    pax: dict = field(default_factory=dict)


def D(name, mode=0o755, **kw) -> E:
    return E(name, type=tarfile.DIRTYPE, mode=mode, **kw)


def F(name, data=b"", mode=0o644, **kw) -> E:
    return E(name, data=data, mode=mode, **kw)


def L(name, target, **kw) -> E:
    return E(name, type=tarfile.SYMTYPE, link=target, mode=0o777, **kw)


def H(name, target, **kw) -> E:
    return E(name, type=tarfile.LNKTYPE, link=target, **kw)


def tar_bytes(entries: list[E]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type, info.mode, info.uid, info.gid = e.type, e.mode, e.uid, e.gid
            info.mtime, info.linkname = e.mtime, e.link
            info.devmajor, info.devminor = e.devmajor, e.devminor
            info.pax_headers = dict(e.pax)
            if e.data is not None:
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def diff_id(tar: bytes) -> str:
    return "sha256:" + hashlib.sha256(tar).hexdigest()


class Layers:
    """Writes layer blobs under a directory and applies them."""

    def __init__(self, base: Path):
        self.base = base
        self.n = 0

    def blob(self, tar: bytes, media_type: str = TAR) -> Path:
        self.n += 1
        if media_type == GZIP:
            data = gzip.compress(tar, compresslevel=1)
        elif media_type == ZSTD:
            import zstandard
            data = zstandard.ZstdCompressor().compress(tar)
        else:
            data = tar
        path = self.base / f"layer{self.n}"
        path.write_bytes(data)
        return path

    def apply(self, root: Path, entries, media_type: str = TAR, options: ApplyOptions | None = None,
              expected: str | None | bool = True):
        tar = entries if isinstance(entries, bytes) else tar_bytes(entries)
        blob = self.blob(tar, media_type)
        want = diff_id(tar) if expected is True else (None if expected is False else expected)
        return apply_layer(root, blob, media_type, want, options)


@pytest.fixture
def layers(tmp_path) -> Layers:
    d = tmp_path / "blobs"
    d.mkdir()
    return Layers(d)


@pytest.fixture
def root(tmp_path) -> Path:
    r = tmp_path / "rootfs"
    r.mkdir()
    return r


def kind(path: Path) -> str:
    m = os.lstat(path).st_mode
    for name, test in (("dir", stat.S_ISDIR), ("file", stat.S_ISREG), ("symlink", stat.S_ISLNK),
                       ("fifo", stat.S_ISFIFO), ("chr", stat.S_ISCHR), ("blk", stat.S_ISBLK)):
        if test(m):
            return name
    return "other"
