"""A layer blob as its uncompressed tar stream: chunks of about CHUNK bytes,
decompressed as they are read, hashed and counted on the way.

gzip is inflated in-process by the fastest zlib-compatible module at hand
(ISA-L's `isal`, then zlib-ng, then zlib), or on request through a `pigz -dc`
pipe; zstd by `zstandard`; a plain tar is read as it is. The size limit is
checked as the bytes go by, so a gzip bomb stops at the limit, and the diff
ID is known at the end of the stream. Decompression and hashing run in a
thread of their own (both release the GIL), overlapping the applier's
system calls.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import queue
import shutil
import subprocess
import threading
import zlib
from pathlib import Path
from typing import Iterator

import zstandard

from puller.runtime.errors import CorruptLayer, LayerTooLarge, UnpackError
from puller.runtime.options import ApplyOptions
from storage.oci import media


def _nondistributable(media_type: str) -> str:
    # The image spec's (deprecated) non-distributable layer types are its
    # ordinary ones with "nondistributable" before the version; Windows base
    # images still use them. storage.oci.media names only the gzip one.
    return media_type.replace(".layer.v1.", ".layer.nondistributable.v1.")


GZIP_TYPES = frozenset({media.OCI_LAYER_GZIP, media.OCI_LAYER_NONDISTRIBUTABLE_GZIP,
                        media.DOCKER_LAYER, media.DOCKER_FOREIGN_LAYER})
ZSTD_TYPES = frozenset({media.OCI_LAYER_ZSTD, _nondistributable(media.OCI_LAYER_ZSTD)})
TAR_TYPES = frozenset({media.OCI_LAYER, _nondistributable(media.OCI_LAYER), media.DOCKER_LAYER_TAR})

CHUNK = 1 << 20

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


def prefetch(chunks: Iterator[bytes], depth: int = 8) -> Iterator[bytes]:
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


class Meter:
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

    @property
    def diff_id(self) -> str:
        """The digest of what went by (the whole layer once it is consumed)."""
        return "sha256:" + self.hasher.hexdigest()


def layer_stream(blob_path: str | os.PathLike, media_type: str,
                 options: ApplyOptions) -> tuple[Meter, Iterator[bytes]]:
    """The metered tar stream of a layer blob, produced in a thread of its
    own; close the stream when done (it stops the thread)."""
    meter = Meter(decompressed_chunks(blob_path, media_type, options.decompressor),
                  options.limits.max_layer_bytes)
    return meter, prefetch(iter(meter))
