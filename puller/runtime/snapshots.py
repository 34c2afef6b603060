"""The snapshot cache: unpacked layers kept by chain ID, hard-linked, never
written after commit.

    CACHE/                     mode 0700 (it holds setuid binaries and devices)
      snapshots/<chainid-hex>/ the full tree after applying layers 0..n,
                               where chainid = ChainID(L0|...|Ln) (config.md)
      staging/                 snapshots being built (renamed into place)
      unsynced/<chainid-hex>   boot ID of a snapshot not yet known to be on disk
      diffids/<blob-hex>       diff ID learnt for a compressed blob, so a
                               pipelined pull can find a cached snapshot
                               before the image config is there

Snapshot n is built from snapshot n-1 by a hard-linked copy (`cp -al`: new
directories, shared file inodes, no data copied), then layer n is applied to
it with `shared_inodes=True`: the applier never modifies an existing inode in
place (a changed file is a new inode, directories are per snapshot, and a hard
link whose header would change a shared inode's attributes gets a private copy
instead, which every name of that inode in the new tree then links to), so
older snapshots are never altered. A snapshot becomes visible only by an
atomic rename of a complete tree; two builders racing for the same chain both
succeed and one copy is dropped. A second image that shares a base (same diff
IDs in the same order) finds the base's chain snapshot and only applies its
own layers.

Durability without an fsync on the way: files are written through the page
cache and never fsynced one by one (that would cost more than the whole
unpack). Instead, before a snapshot is renamed into place, `unsynced/<chain>`
records the kernel's boot ID. A snapshot whose marker names ANOTHER boot may
have lost data in a crash before writeback, so it is discarded and rebuilt;
one from this boot is what the page cache holds, hence correct. Markers older
than the kernel's writeback delay are cleared after one `syncfs` (cheap by
then: the data is on disk already) when a cache is opened.

A layer that arrives while its parent is still being applied can be STAGED
(`stage`, puller.runtime.stage) and placed later by `apply_next`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Sequence

from typing import TYPE_CHECKING

from puller.runtime.errors import UnpackError, os_errors_mapped
from puller.runtime.options import ApplyOptions, Layer
from puller.runtime.tree import new_trees_here
from storage.oci.digests import digest_of
from storage.oci.errors import DigestInvalid
from storage.oci.names import parse_digest

if TYPE_CHECKING:
    from puller.runtime.stage import StagedLayer

# Layer application (puller.runtime.apply, .stage: tar, decompressors,
# confinement) is imported where a snapshot is built, not with the cache:
# a `run` of an image already in the cache needs none of it, and those
# imports were ~40 ms of a ~200 ms `dockyard run --rm`.

# the digest of no layers at all: names the (empty) snapshot of an image without layers
NO_LAYERS = "sha256:" + "0" * 64


def chain_ids(diff_ids: list[str]) -> list[str]:
    """ChainID of each prefix of the layer list (config.md)."""
    out: list[str] = []
    for diff_id in diff_ids:
        out.append(diff_id if not out else digest_of(f"{out[-1]} {diff_id}".encode()))
    return out


def _hex(digest: str) -> str:
    # snapshot and marker names: only sha256 digests (chain IDs are sha256 by definition)
    try:
        return parse_digest(digest, ("sha256",))[1]
    except DigestInvalid:
        raise UnpackError(f"invalid digest {digest!r}") from None


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


WRITEBACK_DELAY = 60.0  # seconds: past the kernel's dirty_expire (30 s by default)


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def syncfs(path: Path) -> bool:
    """syncfs(2) on the filesystem holding path."""
    import ctypes
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syncfs(fd) == 0
    finally:
        os.close(fd)


def _run_cp(args: list[str]) -> None:
    proc = subprocess.run(["cp", *args], capture_output=True)
    if proc.returncode != 0:
        raise UnpackError(f"copy failed: {proc.stderr.decode(errors='replace').strip()}")


class SnapshotCache:
    """The chain-ID snapshot cache under root (see the module docstring)."""

    @os_errors_mapped
    def __init__(self, root: str | os.PathLike):
        self.root = _private_dir(Path(root))
        self.snapshots = _private_dir(self.root / "snapshots")
        self.staging = _private_dir(self.root / "staging")
        self.unsynced = _private_dir(self.root / "unsynced")
        self.settle()
        new_trees_here(self.staging)
        self.diffids = _private_dir(self.root / "diffids")

    def path(self, chain_id: str) -> Path:
        return self.snapshots / _hex(chain_id)

    def has(self, chain_id: str) -> bool:
        return self.path(chain_id).is_dir() and self._durable_or_this_boot(chain_id)

    def _durable_or_this_boot(self, chain_id: str) -> bool:
        marker = self.unsynced / _hex(chain_id)
        try:
            boot = marker.read_text().strip()
        except FileNotFoundError:
            return True
        if boot == boot_id():
            return True
        # committed in an earlier boot and never known to be on disk: rebuild it
        trash = Path(tempfile.mkdtemp(prefix="stale-", dir=self.staging))
        try:
            os.rename(self.path(chain_id), trash / "tree")
        except OSError:
            pass
        shutil.rmtree(trash, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()
        return False

    def _mark_unsynced(self, chain_id: str) -> None:
        target = self.unsynced / _hex(chain_id)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(boot_id())
        os.replace(tmp, target)

    def settle(self, older_than: float = WRITEBACK_DELAY) -> int:
        """Clear the markers of snapshots committed more than `older_than`
        seconds ago, after one syncfs; returns how many were cleared."""
        now = time.time()
        old = []
        for marker in self.unsynced.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if now - marker.stat().st_mtime >= older_than and not marker.name.startswith("."):
                    old.append(marker)
        if not old:
            return 0
        if not syncfs(self.root):
            return 0
        for marker in old:
            with contextlib.suppress(FileNotFoundError):
                marker.unlink()
        return len(old)

    def known_diff_id(self, blob_digest: str) -> str | None:
        try:
            value = (self.diffids / _hex(blob_digest)).read_text().strip()
            _hex(value)
            return value
        except (OSError, UnpackError):
            return None

    def remember_diff_id(self, blob_digest: str, diff_id: str) -> None:
        target = self.diffids / _hex(blob_digest)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(diff_id)
        os.replace(tmp, target)

    def stage(self, blob: Path, media_type: str, diff_id: str | None,
              options: ApplyOptions | None = None) -> StagedLayer | None:
        """Phase one of a layer (decompress, verify, write its files) before
        its parent snapshot exists; None if the layer is too large to stage
        (see puller.runtime.stage). Pass the result to apply_next."""
        from puller.runtime.stage import stage_layer
        directory = Path(tempfile.mkdtemp(prefix="stage-", dir=self.staging))
        staged = None
        try:
            staged = stage_layer(blob, media_type, diff_id, directory, options)
            return staged
        finally:
            if staged is None:
                shutil.rmtree(directory, ignore_errors=True)

    @staticmethod
    def discard(staged: StagedLayer | None) -> None:
        if staged is not None:
            shutil.rmtree(staged.directory, ignore_errors=True)

    def apply_next(self, parent_chain: str | None, blob: Path, media_type: str,
                   diff_id: str | None, options: ApplyOptions | None = None,
                   blob_digest: str | None = None, staged: StagedLayer | None = None) -> str:
        """Build the snapshot for parent + this layer; return its chain ID.
        With diff_id None the digest measured while applying names it.
        `staged` (from stage(), same layer) is consumed."""
        options = options or ApplyOptions()
        if staged is not None:
            diff_id = staged.stats.diff_id  # verified against the expected one when staged
        if diff_id is not None:
            chain = self._chain(parent_chain, diff_id)
            if self.has(chain):
                self.discard(staged)
                return chain
        work = Path(tempfile.mkdtemp(prefix="snap-", dir=self.staging))
        try:
            tree = work / "tree"
            if parent_chain is None:
                tree.mkdir(mode=0o755)
            else:
                _run_cp(["-al", "--", str(self.path(parent_chain)), str(tree)])
            shared = dataclasses.replace(options, shared_inodes=True)
            if staged is not None:
                from puller.runtime.stage import apply_staged
                stats = apply_staged(tree, staged, shared)
            else:
                from puller.runtime.apply import apply_layer
                stats = apply_layer(tree, blob, media_type, diff_id, shared)
            chain = self._chain(parent_chain, stats.diff_id)
            if blob_digest:
                self.remember_diff_id(blob_digest, stats.diff_id)
            try:
                self._mark_unsynced(chain)
                os.rename(tree, self.path(chain))
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            return chain
        finally:
            shutil.rmtree(work, ignore_errors=True)
            self.discard(staged)

    @staticmethod
    def _chain(parent_chain: str | None, diff_id: str) -> str:
        return diff_id if parent_chain is None else chain_ids([parent_chain, diff_id])[1]

    def ensure(self, layers: Sequence[Layer], options: ApplyOptions | None = None) -> Path:
        """The snapshot of the whole layer list, building what is missing."""
        diff_ids = [d for _, _, d in layers]
        chains = chain_ids(diff_ids) if all(diff_ids) else []
        start = 0
        if chains:
            for n in range(len(chains), 0, -1):
                if self.has(chains[n - 1]):
                    start = n
                    break
        parent = chains[start - 1] if start else None
        for blob, media_type, diff_id in layers[start:]:
            parent = self.apply_next(parent, blob, media_type, diff_id, options)
        if parent is None:  # an image without layers
            parent = NO_LAYERS
            if not self.has(parent):
                empty = Path(tempfile.mkdtemp(prefix="snap-", dir=self.staging))
                os.chmod(empty, 0o755)
                try:
                    os.rename(empty, self.path(parent))
                except OSError:
                    shutil.rmtree(empty, ignore_errors=True)
        return self.path(parent)

