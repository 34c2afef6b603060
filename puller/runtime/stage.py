"""Staged apply: a layer's heavy work done before its parent tree exists.

Phase one (`stage_layer`) needs no parent tree: it decompresses, hashes,
verifies and parses the layer, writing each regular file (data and
attributes) as a new inode named by its entry number in a private staging
directory. Phase two (`apply_staged`) replays the entries on the tree in
archive order exactly as `apply_layer` does, renaming each staged file into
place. So layer n+1 is decompressed and written while layer n is applied:
the pipelined pull (puller.runtime.image) stages the layers that arrive
while their parent is still being built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from puller.runtime.apply import WHITEOUT, LayerApplier, verify_diff_id
from puller.runtime.confine import ConfinedTree
from puller.runtime.errors import UnpackError
from puller.runtime.options import ApplyOptions, LayerStats
from puller.runtime.streams import layer_stream
from puller.runtime.tar import Entry, Reader, read_entries

STAGE_MAX_ENTRIES = 200_000  # entries kept in memory by a StagedLayer; beyond, apply in one pass


@dataclass
class StagedLayer:
    """A layer verified and with its regular files written, not yet placed."""
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
    meter, stream = layer_stream(blob_path, media_type, options)
    reader = Reader(stream)
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
                    try:
                        entry.staged_ino = attrs.write_file(name, dirfd, entry, reader)
                    except OSError as exc:
                        raise UnpackError(f"cannot apply {entry.name!r}: {exc.strerror or exc}") from None
                    entry.staged = name
            entries.append(entry)
        reader.drain()
    finally:
        os.close(dirfd)
        stream.close()
    for entry in entries:
        entry.size = 0  # the data is consumed (read_entries needed the sizes until the end)
    stats = LayerStats(diff_id=meter.diff_id, uncompressed_bytes=meter.count)
    verify_diff_id(stats, expected_diff_id, blob_path)
    return StagedLayer(directory, entries, stats)


def apply_staged(root: str | os.PathLike, staged: StagedLayer, options: ApplyOptions | None = None) -> LayerStats:
    """Phase two: the staged layer's entries on the tree at root."""
    options = options or ApplyOptions()
    tree = ConfinedTree(root, options.force_portable_resolver)
    dirfd = os.open(staged.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    applier = LayerApplier(tree, options, staged_fd=dirfd)
    try:
        applier.apply_all(staged.entries, Reader(iter(())))  # the data is in the staged files
        applier.finish()
    finally:
        tree.close()
        os.close(dirfd)
    applier.stats.diff_id = staged.stats.diff_id
    applier.stats.uncompressed_bytes = staged.stats.uncompressed_bytes
    return applier.stats
