"""OCI runtime bundles: DIR/rootfs plus DIR/config.json, made atomically.

    write_bundle(DIR, layers, image_config, cache=...)     `dockyard unpack`

A bundle is assembled in a sibling `DIR.tmp-XXXX` (mode 0700) and renamed to
DIR only when complete, so a failure never leaves something that looks like
a bundle. Its rootfs is a private copy of the image's top snapshot
(puller.runtime.tree.materialize), or with `cache=None` the layers applied
straight into it. Why not an overlay mount, as `dockyard run` uses as root:
the bundle must stay a plain directory (it outlives a reboot, `rm -rf` works
on it). New trees carry an ext4 placement hint (tree.new_trees_here).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Sequence

from puller.runtime.errors import UnpackError, os_errors_mapped
from puller.runtime.options import ApplyOptions, Layer
from puller.runtime.snapshots import SnapshotCache
from puller.runtime.spec import RunSettings, runtime_config, write_bundle_files
from puller.runtime.tree import materialize, new_trees_here


class BundleBuilder:
    """with BundleBuilder(dest) as tmp: ...fill tmp...  -> renamed to dest on success."""

    def __init__(self, dest: str | os.PathLike):
        self.dest = Path(dest).absolute()
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        if self.dest.exists() and (not self.dest.is_dir() or any(self.dest.iterdir())):
            raise UnpackError(f"{self.dest} already exists and is not empty")
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=self.dest.name + ".tmp-", dir=self.dest.parent))
        os.chmod(self.tmp, 0o700)
        new_trees_here(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            new_trees_here(self.tmp, on=False)  # the user's directory keeps no flag of ours
            try:
                if self.dest.is_dir():
                    self.dest.rmdir()  # an empty directory given by the user
                os.rename(self.tmp, self.dest)
                return
            except OSError as err:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise UnpackError(f"cannot create bundle {self.dest}: {err.strerror}") from None
        shutil.rmtree(self.tmp, ignore_errors=True)


def build_rootfs(layers: Sequence[Layer], rootfs: Path, *, cache: SnapshotCache | None,
                 options: ApplyOptions | None = None) -> None:
    """Fill rootfs (which must not exist) with the image's layers."""
    if cache is None:
        from puller.runtime.apply import apply_layer   # imported here: see puller.runtime.snapshots
        rootfs.mkdir(mode=0o755)
        for blob, media_type, diff_id in layers:
            apply_layer(rootfs, blob, media_type, diff_id, options)
    else:
        materialize(cache.ensure(layers, options), rootfs)


@os_errors_mapped
def write_bundle(bundle_dir: str | os.PathLike, layers: Sequence[Layer], image_config: dict, *,
                 cache: SnapshotCache | None, settings: RunSettings | None = None,
                 options: ApplyOptions | None = None, container_id: str | None = None) -> Path:
    """`dockyard unpack`: DIR/rootfs + DIR/config.json, atomically."""
    settings = settings or RunSettings()
    container_id = container_id or uuid.uuid4().hex
    with BundleBuilder(bundle_dir) as tmp:
        rootfs = tmp / "rootfs"
        build_rootfs(layers, rootfs, cache=cache, options=options)
        config, files = runtime_config(image_config, rootfs, Path(bundle_dir).absolute(), settings,
                                       container_id, require_command=False)
        write_bundle_files(tmp, config, files)
    return Path(bundle_dir).absolute()
