"""storage.pull_cache_seconds: a blob this process saw linked is served to
blob GETs for that long without asking storage again (on S3 a HEAD each,
the cost that kept a 100-layer pull behind Distribution's, whose blob
descriptor cache never expires). What it may and may not trust:

- pushes (HEAD) and manifest checks always ask storage;
- a DELETE through this process forgets the blob at once;
- a delete through another process (replica) is seen once the entry runs
  out, or at once when the bytes themselves are gone: 404, never a 500 or
  a broken body.
"""

from __future__ import annotations

import asyncio
import os

from registry.settings import StorageSettings
from storage import layout
from storage.blobs import SeenLinks
from tests.registry.regapi import error_codes


def test_seen_links_keep_positive_answers_for_their_time_only():
    now = [100.0]
    seen = SeenLinks(10, clock=lambda: now[0])
    seen.add("a/b", "sha256:1", 5)
    assert seen.size("a/b", "sha256:1") == 5 and seen.size("a/c", "sha256:1") is None
    now[0] = 109.9
    assert seen.size("a/b", "sha256:1") == 5
    now[0] = 110.0
    assert seen.size("a/b", "sha256:1") is None
    seen.add("a/b", "sha256:1", 5)
    seen.forget("a/b", "sha256:1")
    assert seen.size("a/b", "sha256:1") is None
    off = SeenLinks(0)
    off.add("a/b", "sha256:1", 5)
    assert off.size("a/b", "sha256:1") is None


def test_seen_links_are_bounded():
    seen = SeenLinks(60)
    for i in range(SeenLinks.MAX_ENTRIES + 10):
        seen.add("r", f"sha256:{i}", i)
    assert seen.size("r", "sha256:0") is None                 # the oldest went first
    assert seen.size("r", f"sha256:{SeenLinks.MAX_ENTRIES + 9}") == SeenLinks.MAX_ENTRIES + 9


async def _registry(make_registry, tmp_path, seconds: int):
    return await make_registry(storage=StorageSettings(root=str(tmp_path / "storage"), pull_cache_seconds=seconds))


async def test_a_blob_unlinked_by_another_process_is_pulled_until_its_entry_runs_out(make_registry, tmp_path):
    reg = await _registry(make_registry, tmp_path, 1)
    payload = os.urandom(3000)
    digest = await reg.push_blob("cache/a", payload)
    assert (await reg.get(f"/v2/cache/a/blobs/{digest}")).status == 200
    other = await make_registry.store(tmp_path / "storage")          # another replica's view
    await other.blobs.unlink("cache/a", digest)
    head = await reg.head(f"/v2/cache/a/blobs/{digest}")
    assert head.status == 404                                        # pushes always ask
    resp = await reg.get(f"/v2/cache/a/blobs/{digest}")
    assert resp.status == 200 and await resp.read() == payload      # the bytes are still there
    await asyncio.sleep(1.1)
    resp = await reg.get(f"/v2/cache/a/blobs/{digest}")
    assert resp.status == 404 and error_codes(await resp.json()) == ["BLOB_UNKNOWN"]


async def test_off_asks_storage_on_every_get(make_registry, tmp_path):
    reg = await _registry(make_registry, tmp_path, 0)
    digest = await reg.push_blob("cache/off", b"x" * 100)
    assert (await reg.get(f"/v2/cache/off/blobs/{digest}")).status == 200
    other = await make_registry.store(tmp_path / "storage")
    await other.blobs.unlink("cache/off", digest)
    assert (await reg.get(f"/v2/cache/off/blobs/{digest}")).status == 404


async def test_a_delete_through_this_process_is_seen_at_once(make_registry, tmp_path):
    reg = await _registry(make_registry, tmp_path, 60)
    digest = await reg.push_blob("cache/del", b"y" * 100)
    assert (await reg.get(f"/v2/cache/del/blobs/{digest}")).status == 200
    assert (await reg.delete(f"/v2/cache/del/blobs/{digest}")).status == 202
    assert (await reg.get(f"/v2/cache/del/blobs/{digest}")).status == 404


async def test_bytes_deleted_by_another_process_are_a_404_not_a_broken_body(make_registry, tmp_path):
    reg = await _registry(make_registry, tmp_path, 60)
    digest = await reg.push_blob("cache/gone", os.urandom(2000))
    assert (await reg.get(f"/v2/cache/gone/blobs/{digest}")).status == 200
    other = await make_registry.store(tmp_path / "storage")
    await other.driver.delete(layout.blob_data(digest))              # what a garbage collection does
    resp = await reg.get(f"/v2/cache/gone/blobs/{digest}")
    assert resp.status == 404 and error_codes(await resp.json()) == ["BLOB_UNKNOWN"]
    # asked again now: gone from the cache too
    assert (await reg.get(f"/v2/cache/gone/blobs/{digest}")).status == 404
