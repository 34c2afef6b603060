"""The bundle: an OCI image layout inside one tar (zstd-compressed on
request), with a bundle manifest that says what it carries.

    dockyard-bundle.json         the bundle manifest (first member, so an import reads it at once)
    dockyard-bundle.sig          its signature (puller.transfer.mirror.signing), when signed
    oci-layout, index.json       the image layout: every tagged image, ref.name = its source reference
    blobs/sha256/<hex>           every manifest and blob, once however many images share it
    manifest.json                with --format docker-archive: what `docker load` reads

`skopeo copy oci-archive:BUNDLE[:REF]` and (docker-archive) `docker load`
read it as it is. The bundle manifest lists every image (repository, tag,
digest), every manifest and blob carried (digest, size), and, in a delta,
every prerequisite the far side already holds and the bundle does not
carry (digest, size, a repository it was seen in).

    BundleManifest.from_json(data) / .to_json()     checked field by field (BundleError)
    BundleWriter(path, compress=False)              members in order; nothing visible until commit()
    BundleReader.open(path)                         members by name, read at offsets (zstd: unpacked first)
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tarfile
import tempfile
import time
from dataclasses import dataclass, field

from puller.errors import one_line
from puller.transfer.mirror.errors import BundleError
from puller.transfer.mirror.volumes import Output, Source, open_source
from storage.oci import media
from storage.oci.errors import OciError
from storage.oci.names import parse_digest, validate_name, validate_tag

BUNDLE_MANIFEST = "dockyard-bundle.json"
BUNDLE_SIGNATURE = "dockyard-bundle.sig"
BUNDLE_VERSION = 1
FORMATS = ("oci-archive", "docker-archive")
MAX_BUNDLE_MANIFEST = 256 * 1024 * 1024     # a million blobs at ~150 bytes each, with room
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MiB = 1024 * 1024


def blob_member(digest: str) -> str:
    algorithm, hex_ = parse_digest(digest)
    return f"blobs/{algorithm}/{hex_}"


# ---- the bundle manifest --------------------------------------------------------------

@dataclass
class BundleImage:
    repository: str                 # where it lands, below the import's --to prefix
    digest: str
    media_type: str
    size: int
    source: str = ""                # the reference it was exported from
    tag: str | None = None
    subject: str | None = None      # a referrer: the digest it is attached to
    present: bool = False           # only its top manifest is carried: the far side holds the rest

    def to_json(self) -> dict:
        out = {"repository": self.repository, "digest": self.digest, "mediaType": self.media_type,
               "size": self.size, "source": self.source}
        for key, value in (("tag", self.tag), ("subject", self.subject)):
            if value:
                out[key] = value
        if self.present:
            out["present"] = True
        return out


@dataclass
class BundleManifest:
    images: list[BundleImage] = field(default_factory=list)
    manifests: dict[str, tuple[int, str]] = field(default_factory=dict)    # digest -> (size, media type)
    blobs: dict[str, int] = field(default_factory=dict)                    # digest -> size
    prerequisites: dict[str, tuple[int, str]] = field(default_factory=dict)  # digest -> (size, repository)
    format: str = "oci-archive"
    created: str = ""

    def to_json(self) -> bytes:
        doc = {"bundleVersion": BUNDLE_VERSION, "created": self.created or _now(), "format": self.format,
               "images": [image.to_json() for image in self.images],
               "manifests": [{"digest": d, "size": s, "mediaType": t} for d, (s, t) in self.manifests.items()],
               "blobs": [{"digest": d, "size": s} for d, s in self.blobs.items()],
               "prerequisites": [{"digest": d, "size": s, "repository": r}
                                 for d, (s, r) in self.prerequisites.items()]}
        return json.dumps(doc, indent=1).encode()

    @property
    def carried_bytes(self) -> int:
        return sum(s for s, _ in self.manifests.values()) + sum(self.blobs.values())

    @classmethod
    def from_json(cls, data: bytes) -> "BundleManifest":
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            raise BundleError(f"{BUNDLE_MANIFEST} is not valid JSON") from None
        if not isinstance(doc, dict):
            raise BundleError(f"{BUNDLE_MANIFEST} is not a JSON object")
        if doc.get("bundleVersion") != BUNDLE_VERSION:
            raise BundleError(f"{BUNDLE_MANIFEST}: bundleVersion {doc.get('bundleVersion')!r} is not supported "
                              f"(this dockyard reads {BUNDLE_VERSION})")
        fmt = doc.get("format", "oci-archive")
        if fmt not in FORMATS:
            raise BundleError(f"{BUNDLE_MANIFEST}: unknown format {fmt!r}")
        out = cls(format=fmt, created=str(doc.get("created", "")))
        for i, entry in enumerate(_list(doc, "images")):
            where = f"images[{i}]"
            out.images.append(BundleImage(
                repository=_name(entry, where), digest=_digest(entry, where), size=_size(entry, where),
                media_type=_media_type(entry, where), source=_string(entry, "source", where) or "",
                tag=_tag(entry, where), subject=_digest(entry, where, "subject", required=False),
                present=entry.get("present") is True))
        for i, entry in enumerate(_list(doc, "manifests")):
            where = f"manifests[{i}]"
            out.manifests[_digest(entry, where)] = (_size(entry, where), _media_type(entry, where))
        for i, entry in enumerate(_list(doc, "blobs")):
            out.blobs[_digest(entry, f"blobs[{i}]")] = _size(entry, f"blobs[{i}]")
        for i, entry in enumerate(_list(doc, "prerequisites")):
            where = f"prerequisites[{i}]"
            out.prerequisites[_digest(entry, where)] = (_size(entry, where), _name(entry, where))
        for image in out.images:
            if image.digest not in out.manifests:
                raise BundleError(f"{BUNDLE_MANIFEST}: image {image.source or image.digest} is not among "
                                  f"the manifests it carries")
        return out


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _list(doc: dict, key: str) -> list[dict]:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise BundleError(f"{BUNDLE_MANIFEST}: {key} must be a list of objects")
    return value


def _string(entry: dict, key: str, where: str) -> str | None:
    value = entry.get(key)
    if value is not None and not isinstance(value, str):
        raise BundleError(f"{BUNDLE_MANIFEST}: {where}.{key} must be a string")
    return value


def _digest(entry: dict, where: str, key: str = "digest", required: bool = True) -> str | None:
    value = _string(entry, key, where)
    if value is None and not required:
        return None
    try:
        parse_digest(value or "")
    except OciError:
        raise BundleError(f"{BUNDLE_MANIFEST}: {where}.{key} is not a digest") from None
    return value


def _size(entry: dict, where: str) -> int:
    value = entry.get("size")
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 2 ** 63 - 1:
        raise BundleError(f"{BUNDLE_MANIFEST}: {where}.size must be an integer from 0 to 2^63-1")
    return value


def _media_type(entry: dict, where: str) -> str:
    value = _string(entry, "mediaType", where)
    if not media.is_media_type(value):
        raise BundleError(f"{BUNDLE_MANIFEST}: {where}.mediaType is not a media type")
    return value


def _name(entry: dict, where: str) -> str:
    try:
        return validate_name(_string(entry, "repository", where) or "")
    except OciError:
        raise BundleError(f"{BUNDLE_MANIFEST}: {where}.repository is not a repository name") from None


def _tag(entry: dict, where: str) -> str | None:
    value = _string(entry, "tag", where)
    if value is None:
        return None
    try:
        return validate_tag(value)
    except OciError:
        raise BundleError(f"{BUNDLE_MANIFEST}: {where}.tag is not a tag") from None


# ---- writing ----------------------------------------------------------------------------

class BundleWriter:
    """A tar written member by member to hidden files beside `path` (one, or
    volumes of `max_size` bytes: puller.transfer.mirror.volumes), renamed
    into place by commit(); abort() removes them."""

    def __init__(self, path: str | os.PathLike, compress: bool = False, level: int = 3,
                 max_size: int | None = None, bundle_id: str = ""):
        self.path = pathlib.Path(path)
        self.sink = Output(self.path, max_size, bundle_id)
        self._zstd = None
        self.out = self.sink
        if compress:
            import zstandard
            self._zstd = zstandard.ZstdCompressor(level=level, threads=-1).stream_writer(self.sink, closefd=False)
            self.out = self._zstd
        self.written = 0
        self.paths: list[pathlib.Path] = []
        self._dirs: set[str] = set()

    def _header(self, name: str, size: int, kind=tarfile.REGTYPE, mode: int = 0o644) -> None:
        parent = name.rpartition("/")[0]
        if parent and parent not in self._dirs:
            self._header(parent, 0, tarfile.DIRTYPE, 0o755)
            self._dirs.add(parent)
        info = tarfile.TarInfo(name + ("/" if kind == tarfile.DIRTYPE else ""))
        info.size, info.type, info.mode, info.mtime = size, kind, mode, int(time.time())
        self._write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def _write(self, data) -> None:
        self.out.write(data)
        self.written += len(data)

    def _pad(self, size: int) -> None:
        if size % tarfile.BLOCKSIZE:
            self._write(b"\0" * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))

    def add_bytes(self, name: str, data: bytes) -> None:
        self._header(name, len(data))
        self._write(data)
        self._pad(len(data))

    def add_file(self, name: str, source: pathlib.Path, size: int, on_progress=None) -> None:
        """Copy `size` bytes of `source` in (in the kernel when the output is not compressed)."""
        self._header(name, size)
        with open(source, "rb") as handle:
            if os.fstat(handle.fileno()).st_size != size:
                raise BundleError(f"{source}: not the {size} bytes its descriptor says")
            if self._zstd is None:
                self.sink.copy_from(handle.fileno(), size, on_progress)
                self.written += size
            else:
                while block := handle.read(4 * MiB):
                    self._write(block)
                    if on_progress:
                        on_progress(len(block))
        self._pad(size)

    def reserve(self, name: str, size: int) -> int:
        """A member whose `size` bytes are written later, elsewhere, at the offset
        returned (puller.transfer.mirror.regions); a plain single-file bundle only."""
        assert self._zstd is None and self.sink.max_size is None
        self._header(name, size)
        offset = self.written
        self.sink.skip(size)
        self.written += size
        self._pad(size)
        return offset

    def flush(self) -> int:
        """Everything written so far in the file; its descriptor (for reserve's regions)."""
        self.sink.flush()
        return self.sink.handle.fileno()

    def commit(self) -> list[pathlib.Path]:
        self._write(b"\0" * (2 * tarfile.BLOCKSIZE))
        record = tarfile.RECORDSIZE
        if self.written % record:
            self._write(b"\0" * (record - self.written % record))
        if self._zstd is not None:
            self._zstd.close()
        self.paths = self.sink.commit()
        return self.paths

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if self._zstd is not None:
                self._zstd.close()
        self.sink.abort()


# ---- reading ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Member:
    offset: int
    size: int


class BundleReader:
    """A bundle's members by name, read at their offsets, from one file or
    its volumes in any order (a zstd bundle is unpacked to a temporary tar
    first: a compressed stream cannot be read at offsets). Blocking: use
    from a thread."""

    def __init__(self, source: Source, temp: pathlib.Path | None = None):
        self.source = source
        self.path = source.name
        self._temp = temp
        self.members: dict[str, Member] = {}

    @classmethod
    def open(cls, paths: str | os.PathLike | list) -> "BundleReader":
        paths = paths if isinstance(paths, (list, tuple)) else [paths]
        source = open_source(list(paths))
        temp = None
        try:
            if source.pread(0, min(4, source.size)) == ZSTD_MAGIC:
                temp = _unzstd(source)
                unpacked = open_source([temp])
                unpacked.name = source.name
                source.close()
                source = unpacked
            reader = cls(source, temp)
            reader._scan()
        except OSError as exc:
            source.close()
            raise BundleError(f"{source.name}: {one_line(exc)}") from exc
        except BaseException:
            source.close()
            if temp is not None:
                temp.unlink()
            raise
        return reader

    def _scan(self) -> None:
        try:
            with tarfile.open(fileobj=self.source, mode="r:") as tar:
                for info in tar:
                    if info.isdir():
                        continue
                    if not info.isreg():
                        raise BundleError(f"{self.path}: member {info.name!r} is not a regular file")
                    name = info.name[2:] if info.name.startswith("./") else info.name
                    self.members[name] = Member(info.offset_data, info.size)
        except tarfile.TarError as exc:
            raise BundleError(f"{self.path}: not a bundle ({one_line(exc)})") from exc
        if BUNDLE_MANIFEST not in self.members:
            raise BundleError(f"{self.path}: not a dockyard bundle (no {BUNDLE_MANIFEST})")

    def read(self, name: str, limit: int) -> bytes | None:
        member = self.members.get(name)
        if member is None:
            return None
        if member.size > limit:
            raise BundleError(f"{self.path}: {name} is larger than {limit} bytes")
        return self.pread(member, 0, member.size)

    def pread(self, member: Member, start: int, length: int) -> bytes:
        return self.source.pread(member.offset + start, length)

    def close(self) -> None:
        self.source.close()
        if self._temp is not None:
            with contextlib.suppress(FileNotFoundError):
                self._temp.unlink()


def _unzstd(source: Source) -> pathlib.Path:
    import zstandard
    fd, temp = tempfile.mkstemp(prefix="dockyard-bundle-", suffix=".tar")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                zstandard.ZstdDecompressor().copy_stream(source, out, read_size=4 * MiB, write_size=4 * MiB)
            except zstandard.ZstdError as exc:
                raise BundleError(f"{source.name}: damaged zstd stream ({exc})") from exc
    except BaseException:
        os.unlink(temp)
        raise
    return pathlib.Path(temp)


def read_bundle_manifest(path: str | os.PathLike | list) -> tuple[BundleManifest, bytes, dict | None]:
    """(manifest, its bytes, the signature document or None) of a bundle on disk."""
    reader = BundleReader.open(path)
    try:
        return manifest_of(reader)
    finally:
        reader.close()


def manifest_of(reader: BundleReader) -> tuple[BundleManifest, bytes, dict | None]:
    data = reader.read(BUNDLE_MANIFEST, MAX_BUNDLE_MANIFEST)
    signature = reader.read(BUNDLE_SIGNATURE, 64 * 1024)
    document = None
    if signature is not None:
        try:
            document = json.loads(signature)
        except ValueError:
            document = {}
    return BundleManifest.from_json(data), data, document


__all__ = ["BUNDLE_MANIFEST", "BUNDLE_SIGNATURE", "BundleImage", "BundleManifest", "BundleReader",
           "BundleWriter", "Member", "blob_member", "manifest_of", "read_bundle_manifest"]
