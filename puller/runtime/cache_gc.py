"""What `dockyard prune` and `dockyard df` find in the unpack cache.

    wanted_chains(store) -> set[hex]              snapshots an image in the store unpacks to
    prune_containers(containers_dir) -> [id]      stopped containers removed (their bundles)
    prune_snapshots(cache, keep) -> (n, bytes)    snapshots no image and no container uses, removed

A container's bundle names the snapshot under its rootfs (`lower`, written
by puller.runtime.run.create_bundle): a running container's overlay keeps
its snapshot even when its image has been removed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from puller.runtime.containers import list_containers, remove
from puller.runtime.snapshots import NO_LAYERS, SnapshotCache, chain_ids

LOWER = "lower"      # in a bundle: the hex name of the snapshot its rootfs stands on


def wanted_chains(store) -> set[str]:
    from puller.store.inventory import image_configs
    wanted: set[str] = {NO_LAYERS.split(":", 1)[1]}
    for _, entry in store.references():
        for config in image_configs(store, entry):
            diff_ids = (config.get("rootfs") or {}).get("diff_ids")
            if isinstance(diff_ids, list) and diff_ids and all(isinstance(d, str) for d in diff_ids):
                wanted.update(c.split(":", 1)[1] for c in chain_ids(diff_ids))
    return wanted


def used_by_containers(containers: Path) -> set[str]:
    used = set()
    for container in list_containers(containers):
        try:
            used.add((container.bundle / LOWER).read_text().strip())
        except OSError:
            pass
    return used


def prune_containers(containers: Path) -> list[str]:
    removed = []
    for container in list_containers(containers):
        if container.status != "running":
            remove(container, force=False)
            removed.append(container.id)
    return removed


def snapshot_dirs(cache: SnapshotCache) -> list[Path]:
    return sorted(p for p in cache.snapshots.iterdir() if p.is_dir() and not p.name.startswith("."))


def unused_snapshots(cache: SnapshotCache, keep: set[str]) -> list[Path]:
    return [p for p in snapshot_dirs(cache) if p.name not in keep]


def prune_snapshots(cache: SnapshotCache, keep: set[str]) -> tuple[int, int]:
    from puller.store.inventory import tree_size
    kept_inodes: set = set()
    for path in snapshot_dirs(cache):
        if path.name in keep:
            tree_size(path, kept_inodes)       # inodes shared with a kept snapshot free nothing
    count = freed = 0
    for path in unused_snapshots(cache, keep):
        freed += tree_size(path, kept_inodes)
        # out of the way first (a rename is atomic), so a half-removed tree is never taken for a snapshot
        doomed = cache.staging / f".prune-{path.name}"
        path.rename(doomed)
        (cache.unsynced / path.name).unlink(missing_ok=True)
        shutil.rmtree(doomed, ignore_errors=True)
        count += 1
    return count, freed
