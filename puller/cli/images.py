"""`dockyard images`, `rmi`, `prune`, `df`: what the local store and the unpack
cache hold, and giving the disk back (puller.store.inventory, puller.runtime.cache_gc).

    dockyard images [--json]            repository, tag, digest, platform, size, created
    dockyard rmi REF...                 the references, and the blobs only they used
    dockyard prune [--json]             stopped containers, snapshots no image or container uses,
                                        blobs no reference leads to (older than an hour)
    dockyard df [--json]                disk used by images, snapshots, containers, volumes

The store stays an OCI image layout that skopeo and umoci read after each.
As an ordinary user they run in the user namespace `run` uses, where the
unpacked files of the user's ID range can be removed.
"""

from __future__ import annotations

import json
import os

from puller.cli.common import add_store_flag, emit, fail
from puller.errors import ClientError


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1000
    return f"{size}B"


def _places(args):
    """(store, [SnapshotCache...], volumes dir): the caches of both modes when not given one."""
    from puller.cli.run import cache_dir_for, volumes_dir
    from puller.runtime import rootless
    from puller.runtime.snapshots import SnapshotCache
    from puller.store import LocalStore
    if os.geteuid() != 0 and rootless.current() is None:
        rootless.enter_user_namespace()
    store = LocalStore(args.store)
    first = cache_dir_for(args, store)
    dirs = [first]
    if not args.cache:
        # the cache made in a user namespace with an ID range, beside the plain one
        for sibling in (first.with_name(first.name.removesuffix("-userns")), first.with_name(first.name + "-userns")):
            if sibling not in dirs and sibling.is_dir():
                dirs.append(sibling)
    caches = [SnapshotCache(d) for d in dirs if d == first or d.is_dir()]
    return store, caches, volumes_dir(store)


def cmd_images(args) -> int:
    from puller.store.inventory import images
    try:
        from puller.store import LocalStore
        rows = images(LocalStore(args.store))
    except ClientError as exc:
        return fail(exc, json_output=args.json)
    if args.json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
        return 0
    table = [("REPOSITORY", "TAG", "DIGEST", "PLATFORM", "SIZE", "CREATED")]
    table += [(r.repository, r.tag, r.digest[:19], r.platform, _human(r.size), r.created[:19]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("   ".join(v.ljust(widths[i]) for i, v in enumerate(row)).rstrip())
    return 0


def cmd_rmi(args) -> int:
    from puller.store import LocalStore
    from puller.store.inventory import forget, reachable, remove_unreachable
    store = LocalStore(args.store)
    code = 0
    for reference in args.references:
        try:
            before = reachable(store)
            entry = forget(store, reference)
            count, freed = remove_unreachable(store, only=before)
        except ClientError as exc:
            code = fail(exc)
            continue
        emit(args, {"reference": reference, "digest": entry["digest"], "blobs_removed": count, "bytes_freed": freed},
             f"Untagged: {reference}\nDeleted: {count} blobs ({_human(freed)})", one_line=True)
    return code


def cmd_prune(args) -> int:
    from puller.runtime.cache_gc import prune_containers, prune_snapshots, used_by_containers, wanted_chains
    from puller.runtime.run import containers_dir
    from puller.store.inventory import remove_unreachable
    try:
        store, caches, _ = _places(args)
        removed_containers: list[str] = []
        snapshots = snapshot_bytes = 0
        for cache in caches:
            removed_containers += prune_containers(containers_dir(cache))
        keep = wanted_chains(store)
        for cache in caches:
            n, freed = prune_snapshots(cache, keep | used_by_containers(containers_dir(cache)))
            snapshots, snapshot_bytes = snapshots + n, snapshot_bytes + freed
        blobs, blob_bytes = remove_unreachable(store, grace=args.grace) if store.root.is_dir() else (0, 0)
    except ClientError as exc:
        return fail(exc, json_output=args.json)
    except OSError as exc:
        return fail(ClientError(f"prune failed: {exc}"), json_output=args.json)
    emit(args, {"containers": removed_containers, "snapshots": snapshots, "snapshot_bytes": snapshot_bytes,
                "blobs": blobs, "blob_bytes": blob_bytes},
         f"Deleted {len(removed_containers)} containers, {snapshots} snapshots ({_human(snapshot_bytes)}), "
         f"{blobs} blobs ({_human(blob_bytes)})")
    return 0


def cmd_df(args) -> int:
    from puller.runtime.cache_gc import snapshot_dirs, unused_snapshots, used_by_containers, wanted_chains
    from puller.runtime.containers import list_containers
    from puller.runtime.run import containers_dir
    from puller.store.inventory import all_blobs, reachable, tree_size
    try:
        store, caches, volumes = _places(args)
        references = store.references() if store.root.is_dir() else []
        live = reachable(store) if references else set()
        every = set(all_blobs(store.root))
        all_blobs = sum(_blob_size(store, d) for d in every)
        live_bytes = sum(_blob_size(store, d) for d in live & every)
        keep = wanted_chains(store) if references else set()
        seen: set = set()
        snap_total = snap_count = snap_free = 0
        containers = []
        for cache in caches:
            containers += list_containers(containers_dir(cache))
            used = keep | used_by_containers(containers_dir(cache))
            snaps = snapshot_dirs(cache)
            snap_count += len(snaps)
            for path in snaps:
                if path.name in used:
                    snap_total += tree_size(path, seen)
            for path in unused_snapshots(cache, used):
                size = tree_size(path, seen)
                snap_total, snap_free = snap_total + size, snap_free + size
        stopped = [c for c in containers if c.status != "running"]
        container_bytes = sum(tree_size(c.bundle) for c in containers)
        stopped_bytes = sum(tree_size(c.bundle) for c in stopped)
        volume_dirs = sorted(p for p in volumes.iterdir() if p.is_dir()) if volumes.is_dir() else []
        volume_bytes = sum(tree_size(p) for p in volume_dirs)
    except ClientError as exc:
        return fail(exc, json_output=args.json)
    rows = [
        ("Images", len(references), all_blobs, max(0, all_blobs - live_bytes)),
        ("Snapshots", snap_count, snap_total, snap_free),
        ("Containers", len(containers), container_bytes, stopped_bytes),
        ("Volumes", len(volume_dirs), volume_bytes, 0),
    ]
    if args.json:
        print(json.dumps({kind.lower(): {"count": n, "size": size, "reclaimable": free}
                          for kind, n, size, free in rows}, indent=2))
        return 0
    table = [("TYPE", "TOTAL", "SIZE", "RECLAIMABLE")] + [(k, str(n), _human(s), _human(f)) for k, n, s, f in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print("   ".join(v.ljust(widths[i]) for i, v in enumerate(row)).rstrip())
    return 0


def _blob_size(store, digest: str) -> int:
    try:
        return store.blob_path(digest).stat().st_blocks * 512
    except OSError:
        return 0


def _flags(p, json_flag: bool = True) -> None:
    add_store_flag(p)
    if json_flag:
        p.add_argument("--json", action="store_true", help="print the result as JSON")


def register(subparsers) -> None:
    p = subparsers.add_parser("images", help="list the images in the local store")
    _flags(p)
    p.set_defaults(func=cmd_images)

    p = subparsers.add_parser("rmi", help="remove images from the local store (and the blobs only they use)")
    p.add_argument("references", nargs="+", metavar="REF")
    _flags(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=cmd_rmi)

    for name, func, text in (("prune", cmd_prune, "remove stopped containers, unused snapshots and blobs"),
                             ("df", cmd_df, "show the disk used by images, snapshots, containers, volumes")):
        p = subparsers.add_parser(name, help=text)
        _flags(p)
        p.add_argument("--cache", metavar="DIR", help="unpacked-layer cache (default: next to the store)")
        p.set_defaults(func=func, quiet=False)
        if name == "prune":
            p.add_argument("--grace", type=float, default=3600.0, metavar="SECONDS",
                           help="keep unreferenced blobs younger than this (a pull in progress): 3600")
