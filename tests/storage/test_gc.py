"""Garbage collection (storage.gc) over the content store, on the
filesystem and on real S3 (Ceph's RADOS Gateway): what a pass keeps (tags,
index children, nested indexes, referrers, fresh uploads), what it
collects (unreferenced blobs, untagged manifests by setting, dangling
links, stale uploads), the two-phase record and sweep, the lock between
passes, and the manifest PUT's second look that closes the sweep race.

OCI image spec, "Image Index" (manifests entries are references the walk
follows) and distribution spec, "Listing Referrers" (a referrer's subject
relation): the walk that decides what is kept."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from storage import layout
from storage.driver import StorageError, file_exists
from storage.gc import GcPolicy, collect_garbage
from storage.oci.errors import ManifestBlobUnknown, ManifestUnknown
from storage.oci.media import OCI_INDEX, OCI_MANIFEST
from storage.store import ContentStore
from tests.support.content import chunks as body, sha256_digest as sha256
from tests.support.drivers import DriverSpace, driver_kind, driver_names

CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
NOW = GcPolicy(grace=0)
NOW_UNTAGGED = GcPolicy(grace=0, untagged=True)

# GC runs on every driver the same way; the fsync variants add nothing here.
GC_DRIVERS = [n for n in driver_names() if n in ("filesystem", "s3-ceph")]


@pytest.fixture(params=GC_DRIVERS)
async def space(request, driver_scratch):
    space = DriverSpace(driver_kind(request.param), driver_scratch)
    yield space
    await space.destroy()


@pytest.fixture
async def store(space) -> ContentStore:
    return ContentStore(await space.open())


def descriptor(media_type: str, data: bytes, **extra) -> dict:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data), **extra}


async def push_blob(store: ContentStore, repo: str, data: bytes) -> str:
    digest = sha256(data)
    await store.uploads.put(repo, digest, body(data))
    return digest


async def push_image(store: ContentStore, repo: str, reference: str, seed: str, **extra) -> tuple[str, list[str]]:
    """(manifest digest, [config, layer digests]) of a small image pushed under reference."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed}).encode()
    layer = f"layer of {seed}".encode() + os.urandom(16)
    blobs = [await push_blob(store, repo, config), await push_blob(store, repo, layer)]
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": descriptor(CONFIG_TYPE, config),
                           "layers": [descriptor(LAYER_TYPE, layer)], **extra}).encode()
    result = await store.manifests.put(repo, reference, manifest, OCI_MANIFEST)
    return result.digest, blobs


async def push_index(store: ContentStore, repo: str, reference: str, children: list[str]) -> str:
    entries = []
    for digest in children:
        got = await store.manifests.get(repo, digest)
        entries.append({"mediaType": got.media_type, "digest": digest, "size": len(got.body)})
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    return (await store.manifests.put(repo, reference, index, OCI_INDEX)).digest


async def collect(store: ContentStore, policy: GcPolicy, **kw):
    """A pass, once what was just written is older than the storage's clock
    can tell (S3 times are whole seconds: written this second is not before now)."""
    if not store.driver.local_files:
        await asyncio.sleep(1.05)
    return await collect_garbage(store, policy, **kw)


async def has_blob(store: ContentStore, digest: str) -> bool:
    return await file_exists(store.driver, layout.blob_data(digest))


async def pulls(store: ContentStore, repo: str, reference: str) -> None:
    """Every manifest and blob the reference reaches is there, with the right bytes."""
    manifest = await store.manifests.get(repo, reference)
    assert sha256(manifest.body) == manifest.digest
    doc = json.loads(manifest.body)
    for entry in doc.get("manifests", []):
        await pulls(store, repo, entry["digest"])
    for d in ([doc["config"]] if "config" in doc else []) + doc.get("layers", []):
        info = await store.blobs.stat(repo, d["digest"])
        data = b"".join([c async for c in store.blobs.read(d["digest"])])
        assert sha256(data) == d["digest"] and len(data) == info.size


# ---- what is collected ---------------------------------------------------------------

async def test_deleted_image_frees_its_blobs_and_tagged_image_keeps_shared_ones(store):
    kept, kept_blobs = await push_image(store, "app", "v1", "kept")
    gone, gone_blobs = await push_image(store, "app", "v2", "gone")
    shared_layer = kept_blobs[1]
    await push_blob(store, "other", b"linked but never in a manifest")   # link older than grace 0
    await store.manifests.delete("app", gone)
    report = await collect(store, NOW)
    assert not report.busy
    assert set(gone_blobs) | {gone} <= set(report.deleted_blobs)
    assert report.blobs_deleted == 4 and report.bytes_reclaimed > 0
    assert report.layer_links_deleted == 3     # gone's two links, and the stray link in "other"
    for digest in gone_blobs + [gone, sha256(b"linked but never in a manifest")]:
        assert not await has_blob(store, digest)
    assert await has_blob(store, shared_layer)
    await pulls(store, "app", "v1")
    # a second pass finds nothing more
    again = await collect(store, NOW)
    assert again.blobs_deleted == 0 and again.candidates == 0


async def test_untagged_manifests_collected_only_when_the_setting_says_so(store):
    untagged, blobs = await push_image(store, "app", "v1", "first")
    await push_image(store, "app", "v1", "second")    # v1 moves on: the first is untagged
    assert (await collect(store, NOW)).manifests_deleted == 0
    await store.manifests.get("app", untagged)         # still there without gc.untagged
    report = await collect(store, NOW_UNTAGGED)
    assert report.manifests_deleted == 1
    with pytest.raises(ManifestUnknown):
        await store.manifests.get("app", untagged)
    for digest in blobs + [untagged]:
        assert not await has_blob(store, digest)
    await pulls(store, "app", "v1")


async def test_index_children_nested_index_and_referrer_survive_untagged_collection(store):
    amd, amd_blobs = await push_image(store, "multi", "tmp", "amd")
    arm, _ = await push_image(store, "multi", "tmp", "arm")
    await store.manifests.delete("multi", "tmp")          # children untagged, by digest only
    inner = await push_index(store, "multi", "tmp", [amd, arm])
    await store.manifests.delete("multi", "tmp")
    outer = await push_index(store, "multi", "latest", [inner])       # nested: outer > inner > images
    signature, sig_blobs = await push_image(store, "multi", "tmp", "signature",
                                            subject={"mediaType": OCI_INDEX, "digest": outer,
                                                     "size": len((await store.manifests.get("multi", outer)).body)},
                                            artifactType="application/vnd.example.signature")
    await store.manifests.delete("multi", "tmp")          # the signature is untagged, a referrer
    orphan, orphan_blobs = await push_image(store, "multi", "tmp", "orphan")
    await store.manifests.delete("multi", "tmp")
    report = await collect(store, NOW_UNTAGGED)
    assert report.manifests_deleted == 1                 # the orphan alone
    assert set(orphan_blobs) <= set(report.deleted_blobs)
    await pulls(store, "multi", "latest")
    await pulls(store, "multi", signature)
    referrers = await store.manifests.referrers("multi", outer)
    assert [r["digest"] for r in referrers] == [signature]
    assert all([await has_blob(store, d) for d in amd_blobs + sig_blobs])


async def test_follow_subject_collects_referrers_with_their_subject(store):
    image, _ = await push_image(store, "signed", "v1", "image")
    size = len((await store.manifests.get("signed", image)).body)
    signature, sig_blobs = await push_image(store, "signed", "sig", "signature",
                                            subject={"mediaType": OCI_MANIFEST, "digest": image, "size": size})
    await store.manifests.delete("signed", "sig")
    policy = GcPolicy(grace=0, untagged=True, referrers="follow-subject")
    assert (await collect(store, policy)).manifests_deleted == 0     # subject kept: so is it
    await store.manifests.delete("signed", "v1")
    report = await collect(store, policy)
    assert report.manifests_deleted == 2
    assert not await has_blob(store, signature) and not await has_blob(store, sig_blobs[1])
    assert await store.manifests.referrers("signed", image) == []


async def test_dangling_links_and_stale_uploads_are_removed(store):
    digest = await push_blob(store, "app", b"bytes that will vanish")
    await store.driver.delete(layout.blob_dir(digest))          # as a crash or a hand edit leaves it
    stale = await store.uploads.start("app")
    report = await collect(store, GcPolicy(grace=0, upload_max_age=0))
    assert report.layer_links_deleted == 1 and report.uploads_purged == 1
    assert not await file_exists(store.driver, layout.layer_link("app", digest))
    assert not await file_exists(store.driver, layout.upload_started_at("app", stale.upload_id))


async def test_old_json_revision_links_count_as_links(store):
    """Dockyard's old revision links were JSON descriptors (storage.layout): both forms are marked."""
    image, blobs = await push_image(store, "old", "v1", "old")
    got = await store.manifests.get("old", image)
    await store.driver.put_content(layout.manifest_revision_link("old", image), json.dumps(
        {"mediaType": got.media_type, "digest": image, "size": len(got.body)}).encode())
    await store.driver.put_content(layout.tag_current_link("old", "v1"), json.dumps(
        {"mediaType": got.media_type, "digest": image, "size": len(got.body)}).encode())
    report = await collect(store, NOW_UNTAGGED)
    assert report.blobs_deleted == 0 and report.manifests_deleted == 0
    await pulls(store, "old", "v1")


async def test_dry_run_changes_nothing(store):
    image, blobs = await push_image(store, "app", "v1", "dry")
    await store.manifests.delete("app", image)
    report = await collect(store, NOW, dry_run=True)
    assert report.would_delete.get("B") == 3 and report.candidate_bytes > 0
    assert all([await has_blob(store, d) for d in blobs + [image]])
    assert not await file_exists(store.driver, layout.GC_CLOCK)


# ---- the grace window and the two phases ----------------------------------------------

async def test_grace_window_protects_fresh_blob_and_two_phase_sweep_collects_it_later(store):
    fresh = await push_blob(store, "app", b"uploaded, not referenced yet")
    report = await collect_garbage(store, GcPolicy(grace=3600))
    assert report.candidates == 0 and await has_blob(store, fresh)

    # grace 2 s (S3 times are whole seconds): first pass records, a later one sweeps
    await asyncio.sleep(3.1)
    first = await collect_garbage(store, GcPolicy(grace=2))
    assert first.recorded >= 2 and first.blobs_deleted == 0 and await has_blob(store, fresh)
    runs = await store.driver.list(layout.GC_RUNS)
    assert len(runs) == 1
    early = await collect_garbage(store, GcPolicy(grace=2))         # the record is not due yet
    assert early.blobs_deleted == 0 and await has_blob(store, fresh)
    await asyncio.sleep(3.1)
    second = await collect_garbage(store, GcPolicy(grace=2))
    assert second.swept_record == runs[0].rsplit("/", 1)[-1]
    assert second.blobs_deleted == 1 and not await has_blob(store, fresh)


async def test_candidate_linked_again_after_the_record_is_not_swept(store):
    """The re-check against links written since the record: a blob recorded
    as a candidate that a manifest then references survives the sweep."""
    blob = await push_blob(store, "app", b"a layer pushed long ago")
    config = await push_blob(store, "app", b'{"architecture":"amd64","os":"linux"}')
    await asyncio.sleep(3.1)
    first = await collect_garbage(store, GcPolicy(grace=2))
    assert first.would_delete.get("B") == 2
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": descriptor(CONFIG_TYPE, b'{"architecture":"amd64","os":"linux"}'),
                           "layers": [descriptor(LAYER_TYPE, b"a layer pushed long ago")]}).encode()
    await store.manifests.put("app", "v1", manifest, OCI_MANIFEST)    # blobs HEAD as present: no upload
    await asyncio.sleep(3.1)
    second = await collect_garbage(store, GcPolicy(grace=2))
    assert second.swept_record and second.blobs_deleted == 0
    assert await has_blob(store, blob) and await has_blob(store, config)
    await pulls(store, "app", "v1")


async def test_manifest_put_links_back_what_a_sweep_removed_under_it(store, monkeypatch):
    """The PUT's second look: a layer link swept between the first check and
    the revision's write is written back; bytes swept are MANIFEST_BLOB_UNKNOWN."""
    config = b'{"architecture":"amd64","os":"linux"}'
    layer = b"a layer"
    await push_blob(store, "app", config)
    await push_blob(store, "app", layer)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": descriptor(CONFIG_TYPE, config),
                           "layers": [descriptor(LAYER_TYPE, layer)]}).encode()
    checked = store.manifests._check_references
    sweep_takes = ["link"]

    async def check_then_sweep(repo, parsed):
        await checked(repo, parsed)
        await store.driver.delete(layout.layer_link_dir(repo, sha256(layer)))
        if sweep_takes == ["bytes"]:
            await store.driver.delete(layout.blob_dir(sha256(layer)))

    monkeypatch.setattr(store.manifests, "_check_references", check_then_sweep)
    await store.manifests.put("app", "v1", manifest, OCI_MANIFEST)
    assert await file_exists(store.driver, layout.layer_link("app", sha256(layer)))
    await pulls(store, "app", "v1")
    sweep_takes[0] = "bytes"
    with pytest.raises(ManifestBlobUnknown, match="push it again"):
        await store.manifests.put("app", "v2", manifest, OCI_MANIFEST)


async def test_one_pass_at_a_time_across_processes(store, space):
    other = ContentStore(await space.open())
    await store.driver.put_content(layout.GC_CLOCK, b"")
    lock = await other.driver.try_lock(layout.GC_LOCK)
    assert lock is not None
    try:
        report = await collect(store, NOW)
        assert report.busy and report.phases == {}
    finally:
        await lock.release()
    assert not (await collect(store, NOW)).busy


async def test_cut_off_record_is_removed_and_made_again(store):
    image, blobs = await push_image(store, "app", "v1", "cut")
    await store.manifests.delete("app", image)
    run = "0000000001-deadbeef"
    await store.driver.put_content(layout.gc_run_started(run), b'{"cutoff": 0}')
    await store.driver.put_content(layout.gc_run_part(run, 0), b"B\t\t" + blobs[0].encode() + b"\n")
    report = await collect(store, NOW)            # no `complete`: a crashed pass's record
    assert not await file_exists(store.driver, layout.gc_run_started(run))
    assert report.blobs_deleted == 3
    with pytest.raises(StorageError):
        await store.driver.list(layout.GC_RUNS + "/" + run)
