"""The storage layout shared with CNCF Distribution (storage/layout.py),
over every registered driver: what Dockyard writes is what Distribution
2.8 writes where the two overlap, a root laid out as Distribution lays it
out is served after the one-time index build, and roots Dockyard wrote
before (JSON revision links) keep working.

The real Distribution reading and writing these roots is in
tests/interop/test_distribution_layout.py; here the files are written by
hand, byte for byte as Distribution 2.8 writes them (checked there)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from storage import layout
from storage.driver import StorageDriver, exists
from storage.oci.errors import ManifestInvalid
from storage.oci.media import DOCKER_MANIFEST, OCI_EMPTY, OCI_INDEX, OCI_MANIFEST
from storage.store import ContentStore
from tests.storage.test_store import descriptor, image_manifest, push_blob, push_image
from tests.support.content import sha256_digest as sha256


async def link_of(store: ContentStore, path: str) -> bytes:
    return await store.driver.get_content(path)


async def untyped_image(store: ContentStore, repo: str, seed: bytes) -> bytes:
    """An image manifest without mediaType, its config and layer pushed to repo."""
    config, layer = b'{"seed":"%s"}' % seed, b"layer " + seed
    await push_blob(store, repo, config)
    await push_blob(store, repo, layer)
    body = json.loads(image_manifest(config, [layer]))
    del body["mediaType"]
    return json.dumps(body).encode()


# ---- what Dockyard writes ------------------------------------------------------

async def test_links_hold_bare_digests_and_tags_their_index(store):
    digest, _ = await push_image(store, "lib/app", "v1")
    # Distribution's tagStore.Tag: index/<alg>/<hex>/link, then current/link; all bare digests
    assert await link_of(store, layout.manifest_revision_link("lib/app", digest)) == digest.encode()
    assert await link_of(store, layout.tag_current_link("lib/app", "v1")) == digest.encode()
    assert await link_of(store, layout.tag_index_link("lib/app", "v1", digest)) == digest.encode()
    manifest = json.loads((await store.manifests.get("lib/app", digest)).body)
    for layer in manifest["layers"] + [manifest["config"]]:
        assert await link_of(store, layout.layer_link("lib/app", layer["digest"])) == layer["digest"].encode()


async def test_media_type_is_read_from_the_bytes(store, other_worker):
    """Nothing beside the bytes records a type: another process, with no
    cache, serves each as its bytes say (image-spec manifest.md, image-index.md:
    mediaType; without it the shape decides, as in Distribution)."""
    config, layer = b'{"docker":1}', b"docker layer"
    await push_blob(store, "types", config)
    await push_blob(store, "types", layer)
    docker = image_manifest(config, [layer], media_type=DOCKER_MANIFEST)
    await store.manifests.put("types", "docker", docker, DOCKER_MANIFEST)
    untyped = await untyped_image(store, "types", b"1")
    untyped_digest = (await store.manifests.put("types", "untyped", untyped, OCI_MANIFEST)).digest
    index = json.dumps({"schemaVersion": 2, "manifests": [descriptor(OCI_MANIFEST, untyped)]}).encode()
    await store.manifests.put("types", "index", index, OCI_INDEX)
    assert (await other_worker.manifests.get("types", "docker")).media_type == DOCKER_MANIFEST
    assert (await other_worker.manifests.get("types", untyped_digest)).media_type == OCI_MANIFEST
    assert (await other_worker.manifests.get("types", "index")).media_type == OCI_INDEX


async def test_a_content_type_the_bytes_do_not_say_is_refused(store):
    """A Docker manifest must name its mediaType (manifest-v2-2.md); the type
    is read back from the bytes, so a push they contradict is refused and
    nothing is linked."""
    raw = await untyped_image(store, "refused", b"2")
    with pytest.raises(ManifestInvalid):
        await store.manifests.put("refused", "v1", raw, DOCKER_MANIFEST)
    assert not await exists(store.driver, layout.manifest_revision_link("refused", sha256(raw)))
    assert (await store.manifests.tags("refused")).items == []


# ---- roots Dockyard wrote before: JSON revision links -------------------------------

async def test_old_json_revision_links_are_read_then_rewritten(store, open_store):
    digest, body = await push_image(store, "old/app", "v1")
    old = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body)}
    await store.driver.put_content(layout.manifest_revision_link("old/app", digest), json.dumps(old).encode())
    # a manifest without mediaType, served as the Docker type it was pushed as (before the refusal)
    raw = await untyped_image(store, "old/app", b"3")
    await store.blobs.put_small(sha256(raw), raw)
    pushed_as = json.dumps({"mediaType": DOCKER_MANIFEST, "digest": sha256(raw), "size": len(raw)}).encode()
    await store.driver.put_content(layout.manifest_revision_link("old/app", sha256(raw)), pushed_as)
    await store.driver.put_content(layout.tag_current_link("old/app", "docker"), sha256(raw).encode())

    fresh = await open_store()
    assert (await fresh.manifests.get("old/app", "v1")).media_type == OCI_MANIFEST
    assert (await fresh.manifests.get("old/app", "docker")).media_type == DOCKER_MANIFEST
    await fresh.indexing.ensure()
    assert await link_of(fresh, layout.manifest_revision_link("old/app", digest)) == digest.encode()
    assert await link_of(fresh, layout.manifest_revision_link("old/app", sha256(raw))) == pushed_as
    again = await open_store()
    assert (await again.manifests.get("old/app", digest)).media_type == OCI_MANIFEST
    assert (await again.manifests.get("old/app", "docker")).media_type == DOCKER_MANIFEST


# ---- roots CNCF Distribution filled -----------------------------------------------------

async def distribution_push(driver: StorageDriver, repo: str, tag: str | None, manifest: bytes,
                            blobs: list[bytes]) -> str:
    """Files as Distribution 2.8 writes a push: blob data, layer links,
    the revision link, the tag's index and current links; no catalog entry,
    no referrers index."""
    for blob in blobs + [manifest]:
        await driver.put_content(layout.blob_data(sha256(blob)), blob)
    for blob in blobs:
        await driver.put_content(layout.layer_link(repo, sha256(blob)), sha256(blob).encode())
    digest = sha256(manifest)
    await driver.put_content(layout.manifest_revision_link(repo, digest), digest.encode())
    if tag:
        await driver.put_content(layout.tag_index_link(repo, tag, digest), digest.encode())
        await driver.put_content(layout.tag_current_link(repo, tag), digest.encode())
    return digest


async def fill_like_distribution(driver: StorageDriver) -> dict[str, str]:
    """Three repositories (one inside another), an image in each and, in
    one, an artifact whose subject is the image."""
    config, layer = b'{"os":"linux"}', b"a layer"
    image = image_manifest(config, [layer])
    digests = {}
    for repo in ("a", "a/b", "c/d/e"):
        digests[repo] = await distribution_push(driver, repo, "v1", image, [config, layer])
    artifact = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "text/sbom",
                           "config": descriptor(OCI_EMPTY, b"{}"), "layers": [],
                           "subject": descriptor(OCI_MANIFEST, image),
                           "annotations": {"kind": "sbom"}}).encode()
    digests["artifact"] = await distribution_push(driver, "a/b", None, artifact, [b"{}"])
    return digests


async def test_a_root_distribution_filled_is_indexed_then_served(open_store):
    writer = await open_store()
    digests = await fill_like_distribution(writer.driver)
    store = await open_store()
    assert (await store.catalog.repositories()).items == ["a", "a/b", "c/d/e"]
    assert await exists(store.driver, layout.INDEXED)
    assert (await store.manifests.tags("a/b")).items == ["v1"]
    got = await store.manifests.get("c/d/e", "v1")
    assert (got.digest, got.media_type) == (digests["c/d/e"], OCI_MANIFEST)
    referrers = await store.manifests.referrers("a/b", digests["a/b"])
    assert referrers == [{"mediaType": OCI_MANIFEST, "digest": digests["artifact"],
                          "size": referrers[0]["size"], "artifactType": "text/sbom",
                          "annotations": {"kind": "sbom"}}]
    # a repository pushed afterwards is catalogued by the push, not by a second build
    await push_image(store, "later", "v1")
    assert (await (await open_store()).catalog.repositories()).items == ["a", "a/b", "c/d/e", "later"]


async def test_several_workers_build_the_index_once(open_store, caplog):
    writer = await open_store()
    await fill_like_distribution(writer.driver)
    workers = [await open_store() for _ in range(4)]
    caplog.set_level(logging.INFO, logger="dockyard.storage.indexing")
    pages = await asyncio.wait_for(asyncio.gather(*(w.catalog.repositories() for w in workers)), 60)
    assert [p.items for p in pages] == [["a", "a/b", "c/d/e"]] * 4
    builds = [r for r in caplog.records if "repositories indexed" in r.getMessage()]
    assert len(builds) == 1, [r.getMessage() for r in builds]
