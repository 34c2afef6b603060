"""Candidate records on storage (layout.GC_RUNS): what one pass found
unwanted, kept until a later pass (any process, any replica) sweeps it once
the grace window has passed since the record was complete.

A record is `started` (its cutoff), then parts of one candidate a line
("<kind>\\t<repo>\\t<name>"), then `complete`, written last: a record
without it was cut off by a crash and is removed by the next pass (which
holds the GC lock, so no writer can still be at work on it). Times are the
storage's own: `storage_now` writes a small file and reads its time back,
so hosts whose clocks differ agree on when a record is due.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from storage import layout
from storage.driver import PathNotFound, StorageDriver, delete_if_present
from storage.gc.markset import MarkSet

PART_LINES = 5000               # candidates per part file


@dataclass(frozen=True)
class Record:
    run_id: str
    cutoff: float                # candidates were last written before this (storage time)
    completed: float             # storage time the record became whole


async def storage_now(driver: StorageDriver) -> float:
    """The storage's current time (a file written now, its time read back)."""
    await driver.put_content(layout.GC_CLOCK, b"", durable=False)
    return (await driver.stat(layout.GC_CLOCK)).mtime


def new_run_id(now: float) -> str:
    return f"{int(now):010d}-{secrets.token_hex(4)}"


async def complete_records(driver: StorageDriver) -> list[Record]:
    """The whole records, oldest first; records cut off by a crash are removed."""
    try:
        run_dirs = await driver.list(layout.GC_RUNS)
    except PathNotFound:
        return []
    out = []
    for path in run_dirs:
        run_id = layout.gc_run_from_dir(path)
        if run_id is None:
            continue
        info = (await driver.stat_files([layout.gc_run_complete(run_id)]))[0]
        if info is None:
            await delete_if_present(driver, layout.gc_run_dir(run_id))
            continue
        try:
            meta = json.loads(await driver.get_content(layout.gc_run_complete(run_id)))
            out.append(Record(run_id, float(meta["cutoff"]), info.mtime))
        except (PathNotFound, ValueError, KeyError, TypeError):
            await delete_if_present(driver, layout.gc_run_dir(run_id))
    return sorted(out, key=lambda r: r.completed)


async def write_record(driver: StorageDriver, markset: MarkSet, run_id: str, cutoff: float) -> int:
    """Write every candidate the mark found as a record; how many."""
    await driver.put_content(layout.gc_run_started(run_id), json.dumps({"cutoff": cutoff}).encode())
    count, part, lines = 0, 0, []
    async for rows in markset.found_rows().batches():
        for kind, repo, name, _, _ in rows:
            lines.append(f"{kind}\t{repo}\t{name}\n")
            if len(lines) >= PART_LINES:
                await driver.put_content(layout.gc_run_part(run_id, part), "".join(lines).encode())
                count, part, lines = count + len(lines), part + 1, []
    if lines:
        await driver.put_content(layout.gc_run_part(run_id, part), "".join(lines).encode())
        count += len(lines)
    await driver.put_content(layout.gc_run_complete(run_id),
                             json.dumps({"cutoff": cutoff, "candidates": count}).encode())
    return count


async def load_record(driver: StorageDriver, markset: MarkSet, record: Record) -> int:
    """Put a record's candidates in the mark set's `recorded`; how many."""
    count = 0
    for path in await driver.list(layout.gc_run_dir(record.run_id)):
        if not path.rsplit("/", 1)[-1].startswith("part-"):
            continue
        rows = []
        for line in (await driver.get_content(path)).decode(errors="replace").splitlines():
            fields = line.split("\t")
            if len(fields) == 3 and fields[0] in ("B", "L", "R", "T"):
                rows.append((fields[0], fields[1], fields[2]))
        await markset.add_recorded(rows)
        count += len(rows)
    return count


async def remove_record(driver: StorageDriver, run_id: str) -> None:
    await delete_if_present(driver, layout.gc_run_dir(run_id))
