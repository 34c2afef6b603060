"""The sweep: delete the candidates a record named that this pass's mark
found unwanted again and unchanged since the record's cutoff. Links go
first (tags, revisions with their referrers entry, layer links); then every
repository is marked again from the links that exist now, a link deleted
that the new mark wants is written back, and only then do the bytes of the
blobs that mark left unwanted go, each looked at once more just before its
delete (storage.gc's docstring says which race each step closes).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

from storage import layout
from storage.driver import StorageDriver, delete_if_present
from storage.gc.mark import Marker
from storage.gc.markset import MarkSet, chunks

_PARALLEL = 32                  # deletes in flight at once


@dataclass
class SweepCounts:
    tags: int = 0
    manifests: int = 0
    layer_links: int = 0
    blobs: int = 0
    bytes: int = 0
    restored: int = 0
    kept_on_recheck: int = 0
    deleted_blobs: list[str] = field(default_factory=list)   # for tests and --json; capped


_KEEP_LISTED = 1000


async def sweep(marker: Marker, markset: MarkSet, cutoff: float,
                progress: Callable[[str], None] | None = None) -> SweepCounts:
    driver: StorageDriver = marker.driver
    counts = SweepCounts()
    say = progress or (lambda step: None)
    say("sweep: links")
    rows = markset.sweepable(cutoff)
    async for batch in rows.batches():
        links = [r for r in batch if r[0] != "B"]
        for group in chunks(links, _PARALLEL):
            done = await asyncio.gather(*(_delete_link(marker, markset, kind, repo, name)
                                          for kind, repo, name, _, _ in group))
            for (kind, _, _, _, _), gone in zip(group, done):
                if gone:
                    counts.tags += kind == "T"
                    counts.manifests += kind == "R"
                    counts.layer_links += kind == "L"
            await markset.add_deleted([(k, r, n) for (k, r, n, _, _), gone in zip(group, done) if gone])

    # The re-mark: what every repository links now keeps its bytes; links
    # deleted above that a manifest linked meanwhile needs are written back.
    say("sweep: re-mark")
    await markset.clear_marks()
    touched = set(await markset.deleted_repos())
    async for repo in marker.repositories():
        revisions, blobs = await marker.mark_linked(repo)
        if repo not in touched:
            continue
        for kind, name in await markset.deleted_in(repo):
            if kind == "L" and name in blobs:
                await driver.put_content(layout.layer_link(repo, name), layout.link_content(name))
                counts.restored += 1
            elif kind == "R" and name in revisions:
                await driver.put_content(layout.manifest_revision_link(repo, name), layout.link_content(name))
                counts.restored += 1

    say("sweep: blobs")
    async for batch in rows.batches():
        digests = [r[2] for r in batch if r[0] == "B"]
        wanted = await markset.is_marked(digests)
        counts.kept_on_recheck += len(wanted)
        for group in chunks([d for d in digests if d not in wanted], _PARALLEL):
            sizes = await asyncio.gather(*(_delete_blob(driver, d, cutoff) for d in group))
            for digest, size in zip(group, sizes):
                if size is None:
                    counts.kept_on_recheck += 1
                    continue
                counts.blobs += 1
                counts.bytes += size
                if len(counts.deleted_blobs) < _KEEP_LISTED:
                    counts.deleted_blobs.append(digest)
    return counts


async def _delete_link(marker: Marker, markset: MarkSet, kind: str, repo: str, name: str) -> bool:
    driver = marker.driver
    if kind == "T":
        return await delete_if_present(driver, layout.tag_dir(repo, name))
    if kind == "L":
        return await delete_if_present(driver, layout.layer_link_dir(repo, name))
    # R: its referrers entry first, so the referrers API never lists a manifest that is gone
    subject = (await marker.children_of([name])).get(name, {}).get("s")
    if subject:
        await delete_if_present(driver, layout.referrer_entry(repo, subject, name))
    return await delete_if_present(driver, layout.manifest_revision_dir(repo, name))


async def _delete_blob(driver: StorageDriver, digest: str, cutoff: float) -> int | None:
    """Delete a blob's bytes unless written since the cutoff; its size, None when kept."""
    info = (await driver.stat_files([layout.blob_data(digest)]))[0]
    if info is None or info.mtime >= cutoff:
        return None             # gone already, or uploaded again moments ago
    if not await delete_if_present(driver, layout.blob_dir(digest)):
        return None
    return info.size
