"""The content store under concurrent requests: what a blob file holds,
and tags against deletes by digest. Storage calls are delayed at random
(a wrapper over a real driver, each registered one in turn) so
interleavings that a quiet machine rarely produces happen in every run."""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest

from storage import layout
from storage.filesystem import FilesystemDriver
from storage.oci.media import OCI_MANIFEST
from storage.store import ContentStore
from tests.support.content import chunks as body, sha256_digest as sha256

CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"


class JitteryDriver:
    """Forwards to a real driver, each storage call after a random pause."""

    _DELAYED = {"get_content", "put_content", "stat", "stat_many", "get_many", "list", "move", "delete"}

    def __init__(self, inner, rng: random.Random):
        self._inner, self._rng = inner, rng

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name not in self._DELAYED:
            return attr

        async def delayed(*args, **kwargs):
            await asyncio.sleep(self._rng.uniform(0, 0.002))
            return await attr(*args, **kwargs)

        return delayed


@pytest.mark.filesystem_only("alters a blob's file under the root behind the store's back")
async def test_a_tampered_copy_in_place_is_replaced_by_the_next_verified_push(tmp_path):
    """A blob file altered in place (as the open-PATCH attack did before
    the session lock) must not be what the next push of its digest links."""
    store = ContentStore(FilesystemDriver(str(tmp_path)))
    good = b"good layer bytes" * 100
    digest = sha256(good)
    await store.uploads.put("victim/one", digest, body(good))
    data = tmp_path / layout.blob_data(digest).lstrip("/")
    data.write_bytes(good + b"EVIL")                     # poisoned behind the store's back

    await store.uploads.put("victim/two", digest, body(good))
    assert data.read_bytes() == good
    assert b"".join([c async for c in store.blobs.read(digest)]) == good


async def test_retag_racing_delete_by_digest_never_leaves_a_dangling_tag(driver_space):
    """Re-tagging a manifest while it is deleted by digest, from two
    "workers": afterwards every listed tag resolves. (Distribution 2.8 left
    a tag naming nothing in about 1 of 6 such races.)"""
    rng = random.Random(8)
    pusher = ContentStore(JitteryDriver(await driver_space.open(), rng))
    deleter = ContentStore(JitteryDriver(await driver_space.open(), rng))
    repo = "race/tags"
    config, layer = b'{"os":"linux"}', b"layer"
    await pusher.uploads.put(repo, sha256(config), body(config))
    await pusher.uploads.put(repo, sha256(layer), body(layer))
    outcomes = {"tag-wins": 0, "delete-wins": 0}
    for trial in range(40):
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": {"mediaType": CONFIG_TYPE, "digest": sha256(config), "size": len(config)},
                               "layers": [{"mediaType": LAYER_TYPE, "digest": sha256(layer), "size": len(layer)}],
                               "annotations": {"trial": str(trial)}}).encode()
        started = time.perf_counter()
        digest = (await pusher.manifests.put(repo, f"a{trial}", manifest, OCI_MANIFEST)).digest
        # Head starts in step with the storage's pace: a jittered put takes
        # about 10 ms on a filesystem, ten times that on an object store
        # (each call a round trip), where fixed milliseconds would only ever
        # let the delete win.
        pace = max(1.0, (time.perf_counter() - started) / 0.010)

        async def retag():
            # a longer head start for the delete now and then, so that both
            # orders (and everything between) happen in every run
            await asyncio.sleep(rng.uniform(0, 0.012 * pace))
            await pusher.manifests.put(repo, f"b{trial}", manifest, OCI_MANIFEST)

        async def delete():
            await asyncio.sleep(rng.uniform(0, 0.004 * pace))
            await deleter.manifests.delete(repo, digest)

        await asyncio.gather(retag(), delete())
        tags = (await deleter.manifests.tags(repo)).items
        for tag in tags:
            fresh = ContentStore(await driver_space.open())   # no cache of this process's pushes
            assert (await fresh.manifests.get(repo, tag)).digest, tag
        outcomes["tag-wins" if f"b{trial}" in tags else "delete-wins"] += 1
        assert f"a{trial}" not in tags                   # the delete always removes the old tag
    assert all(outcomes.values()), outcomes              # both orders happened: the race was run
