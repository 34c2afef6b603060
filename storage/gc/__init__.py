"""Garbage collection while the registry serves: on any driver, with any
number of processes and replicas on one storage, and no database.

One pass (`collect_garbage`) runs under the storage lock `layout.GC_LOCK`
(a flock on a filesystem, a lease on S3: it dies with its holder), so at
most one pass runs at a time over a storage; a process finding it held
skips its turn. A pass:

1. purges upload sessions older than the uploads' max age (a session being
   written holds its own lock and is never purged) and what interrupted
   writes left hidden;
2. marks (storage.gc.mark): from every tag, index children (nested too),
   referrers of kept manifests, revisions linked since the cutoff, and with
   `untagged` off every revision. Everything unwanted and last written
   before the cutoff (now minus the grace window) is a candidate;
3. records the candidates on storage (storage.gc.record) and, once the
   grace window has passed since a record was complete, a later pass
   (any process, any replica) sweeps it (storage.gc.sweep): a candidate
   goes only if that pass's own mark found it unwanted again and unchanged
   since the record's cutoff. With a grace of 0 a pass sweeps its own
   record at once.

The race this closes, and how. A push refers to content in three ways:

- it uploads a blob: the bytes and the layer link are written now, after
  the cutoff, so neither is a candidate; a re-upload of bytes that were
  a candidate rewrites them, and the sweep looks at each blob's time once
  more immediately before deleting it;
- it mounts a blob: the new layer link is fresh, and a fresh link keeps
  its blob;
- it names, in a manifest, a blob or child already linked in the
  repository (docker skips blobs HEAD says are there). Its check of the
  link and its write of the revision are two steps, and a sweep may fall
  between them. So the sweep deletes links first, then marks everything
  again from the links that exist at that moment, writes back any deleted
  layer link or revision that a manifest linked meanwhile needs, and keeps
  those bytes; and a manifest PUT, after writing its revision, looks at its
  references once more (storage.manifests) and links back a layer link
  that vanished under it, or fails with MANIFEST_BLOB_UNKNOWN if the bytes
  went. Either the re-mark sees the revision (it was written before), or
  the PUT's second look sees the link gone (it was written after): one of
  the two always repairs.

What remains: a re-upload of a candidate's exact bytes landing between the
sweep's last look at that one blob and its delete (one stat and one delete
apart), immediately followed by a manifest naming it before the delete
lands. The grace window exists for this and for pushes slower than one
pass: anything written within it is never a candidate, and a candidate
waits a further window before it goes.

A pass is resumable: a record cut off by a crash is removed and made again;
a sweep cut off is done again by the next pass from the same record (every
delete is idempotent); the pass's working sets live in a temporary SQLite
file (storage.gc.markset), so memory stays bounded by the largest
repository, not the store.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from storage import layout
from storage.gc.mark import REFERRER_MODES, MarkPolicy, Marker
from storage.gc.markset import MarkSet, remove_stale_dirs
from storage.gc.record import (Record, complete_records, load_record, new_run_id, remove_record, storage_now,
                               write_record)
from storage.gc.sweep import sweep
from storage.store import ContentStore

__all__ = ["GcPolicy", "GcReport", "REFERRER_MODES", "collect_garbage"]

log = logging.getLogger("dockyard.storage.gc")

LEFTOVER_AGE = 3600             # hidden leftovers of interrupted writes older than this go


@dataclass(frozen=True)
class GcPolicy:
    grace: float = 6 * 3600         # seconds anything written stays safe from collection
    untagged: bool = False          # collect manifests no tag (or kept index, or referrer rule) reaches
    referrers: str = "keep"         # keep | follow-subject
    upload_max_age: float = 7 * 24 * 3600


@dataclass
class GcReport:
    dry_run: bool = False
    busy: bool = False              # another pass held the lock: this one did nothing
    repositories: int = 0
    candidates: int = 0             # found unwanted by this pass's mark
    candidate_bytes: int = 0        # of the blobs among them
    recorded: int = 0               # written to a record for a later sweep
    swept_record: str = ""          # the record this pass swept
    blobs_deleted: int = 0
    bytes_reclaimed: int = 0
    manifests_deleted: int = 0
    tags_deleted: int = 0
    layer_links_deleted: int = 0
    links_restored: int = 0
    kept_on_recheck: int = 0
    uploads_purged: int = 0
    leftovers_removed: int = 0
    manifests_read: int = 0
    phases: dict[str, float] = field(default_factory=dict)     # seconds each phase took
    deleted_blobs: list[str] = field(default_factory=list)
    would_delete: dict[str, int] = field(default_factory=dict)  # dry run: candidates by kind

    def as_dict(self) -> dict:
        return asdict(self)


Progress = Callable[[str], None]


class _Phases:
    def __init__(self, report: GcReport, progress: Progress | None):
        self.report = report
        self.progress = progress

    def __call__(self, name: str):
        report, progress = self.report, self.progress

        class _Timer:
            def __enter__(self):
                if progress is not None:
                    progress(name)
                self.t = time.monotonic()

            def __exit__(self, *exc):
                report.phases[name] = round(report.phases.get(name, 0.0) + time.monotonic() - self.t, 4)

        return _Timer()


async def collect_garbage(store: ContentStore, policy: GcPolicy, *, dry_run: bool = False,
                          progress: Progress | None = None) -> GcReport:
    """One pass (see the module docstring). With dry_run nothing is written
    or deleted: the report says what this pass's mark would make candidates.
    progress(phase) is called as each phase starts."""
    if policy.referrers not in REFERRER_MODES:
        raise ValueError(f"gc.referrers must be one of {', '.join(REFERRER_MODES)}")
    report = GcReport(dry_run=dry_run)
    phase = _Phases(report, progress)
    driver = store.driver
    if dry_run:
        return await _dry_run(store, policy, report, phase)
    now = await storage_now(driver)         # also makes the lock's directory
    lock = await driver.try_lock(layout.GC_LOCK)
    if lock is None:
        report.busy = True
        return report
    async with lock:
        remove_stale_dirs()
        with phase("purge"):
            report.uploads_purged = await store.purge_uploads(time.time() - policy.upload_max_age)
            report.leftovers_removed = await store.reclaim_leftovers(time.time() - LEFTOVER_AGE)
        records = await complete_records(driver)
        if policy.grace <= 0:
            # Nothing is in flight (the operator's word): this pass's own
            # mark supersedes every earlier record, and it sweeps at once.
            due, waiting, cutoff = [], [], now
        else:
            due = [r for r in records if r.completed + policy.grace <= now]
            waiting = [r for r in records if r not in due]
            cutoff = min([now - policy.grace] + [r.cutoff for r in due])
        markset = await MarkSet().open()
        try:
            marker = Marker(store, markset, MarkPolicy(policy.untagged, policy.referrers), cutoff)
            with phase("mark"):
                report.repositories = await marker.mark_all()
            await _count_candidates(markset, report)
            if policy.grace <= 0:
                for old in records:
                    await remove_record(driver, old.run_id)
                if report.candidates:
                    with phase("record"):
                        run_id = new_run_id(now)
                        report.recorded = await write_record(driver, markset, run_id, cutoff)
                    due = [Record(run_id, cutoff, now)]
            for record in due:
                with phase("sweep"):
                    await load_record(driver, markset, record)
                    counts = await sweep(marker, markset, record.cutoff, progress)
                    await markset.clear_recorded()
                    await remove_record(driver, record.run_id)
                report.swept_record = record.run_id
                report.blobs_deleted += counts.blobs
                report.bytes_reclaimed += counts.bytes
                report.manifests_deleted += counts.manifests
                report.tags_deleted += counts.tags
                report.layer_links_deleted += counts.layer_links
                report.links_restored += counts.restored
                report.kept_on_recheck += counts.kept_on_recheck
                report.deleted_blobs += counts.deleted_blobs
            if policy.grace > 0 and not waiting and report.candidates:
                # Candidates for a later pass (swept ones were deleted: found again only if still there).
                with phase("record"):
                    report.recorded = await write_record(driver, markset, new_run_id(now), now - policy.grace)
            report.manifests_read = marker.manifests_read
        finally:
            await markset.close()
    log.info("gc: %d blobs (%d bytes), %d manifests, %d tags, %d layer links deleted; %d recorded; %s",
             report.blobs_deleted, report.bytes_reclaimed, report.manifests_deleted, report.tags_deleted,
             report.layer_links_deleted, report.recorded, report.phases)
    return report


async def _count_candidates(markset: MarkSet, report: GcReport) -> None:
    async for rows in markset.found_rows().batches():
        for kind, _, _, _, size in rows:
            report.candidates += 1
            report.would_delete[kind] = report.would_delete.get(kind, 0) + 1
            if kind == "B":
                report.candidate_bytes += size or 0


async def _dry_run(store: ContentStore, policy: GcPolicy, report: GcReport, phase: _Phases) -> GcReport:
    markset = await MarkSet().open()
    try:
        marker = Marker(store, markset, MarkPolicy(policy.untagged, policy.referrers),
                        time.time() - policy.grace)
        with phase("mark"):
            report.repositories = await marker.mark_all()
        await _count_candidates(markset, report)
        report.manifests_read = marker.manifests_read
    finally:
        await markset.close()
    return report
