"""`dockyard gc`: one garbage collection pass over the storage `serve`
uses (the same settings: --config FILE, DOCKYARD_* variables, --storage
DIR), while servers keep serving it (storage.gc explains why that is safe).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from registry.settings import Settings, SettingsError, load_settings

_KINDS = {"B": "blobs", "L": "layer links", "R": "manifests", "T": "tags"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "gc", help="collect garbage: blobs, manifests and links nothing references",
        description="Run one garbage collection pass over the registry's storage, safe while "
                    "servers use it. Candidates found by one pass are deleted by a later pass once "
                    "gc.grace seconds have passed (at once with a grace of 0).")
    p.add_argument("--config", metavar="FILE", help="YAML settings file, as for `dockyard serve`")
    p.add_argument("--storage", metavar="DIR", help="filesystem storage root")
    p.add_argument("--grace", type=int, metavar="SECONDS",
                   help="grace window (gc.grace); 0 only when no push is running")
    p.add_argument("--untagged", action="store_true", default=None,
                   help="also collect manifests no tag reaches (gc.untagged)")
    p.add_argument("--dry-run", action="store_true", help="report what would be collected; change nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    p.set_defaults(func=gc_command)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.storage:
        out["storage"] = {"driver": "filesystem", "root": os.path.abspath(args.storage)}
    gc: dict[str, Any] = {}
    if args.grace is not None:
        gc["grace"] = args.grace
    if args.untagged:
        gc["untagged"] = True
    if gc:
        out["gc"] = gc
    return out


def gc_policy(settings: Settings):
    from storage.gc import GcPolicy

    return GcPolicy(grace=settings.gc.grace, untagged=settings.gc.untagged,
                    referrers=settings.gc.referrers, upload_max_age=settings.uploads.max_age)


def gc_command(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config, overrides=_overrides(args))
    except SettingsError as exc:
        print(f"dockyard gc: {exc}", file=sys.stderr)
        return 2
    if settings.storage.driver == "filesystem" and not os.path.isdir(settings.storage.root):
        print(f"dockyard gc: storage root {settings.storage.root} does not exist", file=sys.stderr)
        return 2
    show = not args.quiet and not args.json

    def progress(phase: str) -> None:
        if not args.quiet:
            print(f"gc: {phase}", file=sys.stderr, flush=True)

    try:
        report = asyncio.run(_run(settings, args.dry_run, progress))
    except SettingsError as exc:
        print(f"dockyard gc: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:   # a storage failure: one line, the store is left as a pass may leave it
        print(f"dockyard gc: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    elif show or args.quiet:
        _print_report(report)
    return 3 if report.busy else 0


async def _run(settings: Settings, dry_run: bool, progress):
    from storage.config import StorageConfigError, check_driver, open_driver
    from storage.gc import collect_garbage
    from storage.store import ContentStore

    try:
        driver = open_driver(settings.storage)
        await check_driver(driver)
    except StorageConfigError as exc:
        raise SettingsError(str(exc)) from None
    store = ContentStore(driver, settings.store_limits())
    try:
        return await collect_garbage(store, gc_policy(settings), dry_run=dry_run, progress=progress)
    finally:
        await store.close()


def _print_report(report) -> None:
    if report.busy:
        print("another garbage collection pass holds the storage's lock: nothing done")
        return
    if report.dry_run:
        found = ", ".join(f"{n} {_KINDS[k]}" for k, n in sorted(report.would_delete.items())) or "nothing"
        print(f"dry run: {report.repositories} repositories; would collect {found} "
              f"({report.candidate_bytes} bytes of blobs)")
        return
    print(f"{report.repositories} repositories: deleted {report.blobs_deleted} blobs "
          f"({report.bytes_reclaimed} bytes), {report.manifests_deleted} manifests, "
          f"{report.tags_deleted} tags, {report.layer_links_deleted} layer links; "
          f"{report.uploads_purged} stale uploads purged; {report.recorded} candidates recorded "
          f"for a later pass")
    print("phases: " + ", ".join(f"{k} {v:.2f}s" for k, v in report.phases.items()))
