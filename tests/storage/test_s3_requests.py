"""What the registry's hot paths cost in S3 requests, counted with
botocore's event hooks on the driver's client: a blob HEAD or GET, a
manifest PUT over many layers. Each request is a round trip to the object
store (the 100-layer pull was 0.43x CNCF Distribution's speed when a blob
GET cost six of them, tests/benchmarks/bench_registry.py --only s3), so
these are counts a change must not raise by accident.
"""

from __future__ import annotations

import json
import os

import pytest

from storage.oci.errors import BlobUnknown
from storage.oci.media import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST
from storage.blobs import StoreLimits
from storage.store import ContentStore
from tests.storage.s3_fixtures import kind, requires_s3, space  # noqa: F401 (fixtures)
from tests.support.content import chunks, sha256_digest
from tests.support.s3 import Requests

pytestmark = requires_s3


@pytest.fixture
async def store(space) -> ContentStore:
    return ContentStore(await space.open())


@pytest.fixture
async def remembering_store(space) -> ContentStore:
    return ContentStore(await space.open(), StoreLimits(pull_cache_seconds=60))


async def _push(store: ContentStore, repo: str, payload: bytes) -> str:
    digest = sha256_digest(payload)
    await store.uploads.put(repo, digest, chunks(payload), size=len(payload))
    return digest


async def test_a_linked_blob_is_two_heads_and_open_local_sends_nothing(store):
    digest = await _push(store, "count/pull", os.urandom(5000))
    requests = Requests(store.driver)
    assert (await store.blobs.stat("count/pull", digest)).size == 5000
    assert await store.blobs.open_local(digest) is None
    assert sorted(requests.names()) == ["HeadObject", "HeadObject"]


async def test_a_blob_streamed_whole_is_its_link_head_and_its_get_at_once(store):
    """What a GET of a whole blob costs with redirects off: the layer
    link's HEAD beside the bytes' GET, whose answer carries the size."""
    payload = os.urandom(5000)
    digest = await _push(store, "count/stream", payload)
    requests = Requests(store.driver)
    opened = await store.blobs.open_linked("count/stream", digest)
    assert sorted(requests.names()) == ["GetObject", "HeadObject"]
    assert opened.size == 5000 and b"".join([c async for c in opened]) == payload
    await opened.aclose()
    requests.clear()
    with pytest.raises(BlobUnknown):                  # linked elsewhere only
        await store.blobs.open_linked("count/other", digest)
    assert sorted(requests.names()) == ["GetObject", "HeadObject", "HeadObject"]


async def test_an_absent_blob_is_two_heads_and_no_listing(store):
    requests = Requests(store.driver)
    with pytest.raises(BlobUnknown):
        await store.blobs.stat("count/push", sha256_digest(b"never pushed"))
    assert sorted(requests.names()) == ["HeadObject", "HeadObject"]


async def test_a_blob_of_another_repository_also_asks_for_a_revision_link(store):
    digest = await _push(store, "count/elsewhere", os.urandom(3000))
    requests = Requests(store.driver)
    with pytest.raises(BlobUnknown):
        await store.blobs.stat("count/here", digest)
    assert sorted(requests.names()) == ["HeadObject"] * 3


async def test_a_manifest_put_over_many_layers_lists_nothing(store):
    """Every link check is one HEAD (absent links too: half of them are, a
    layer link or a revision link): no ListObjects per 404."""
    repo = "count/manifest"
    layers = [await _push(store, repo, os.urandom(100) + bytes([i])) for i in range(20)]
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": layers}}).encode()
    config_digest = await _push(store, repo, config)
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
                       "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": 101} for d in layers]},
                      sort_keys=True).encode()
    requests = Requests(store.driver)
    await store.manifests.put(repo, "v1", body, OCI_MANIFEST)
    names = requests.names()
    lists = [params.get("Prefix") for name, params in requests.params if name.startswith("ListObjects")]
    assert not lists, lists
    assert names.count("HeadObject") <= 2 * 21 + 4, names


async def test_a_chunked_push_locks_its_session_without_a_listing(store):
    """PATCH and the finishing PUT each take the session's lock. The lock's
    own check that the session exists (a listing) is left out: the holder
    reads the data's size first, which answers that. The finish deletes the
    session directory, lock object included, so releasing the lock sends
    nothing: 15 requests a finish before, 13 after."""
    repo = "count/chunked"
    payload = os.urandom(70_000)
    digest = sha256_digest(payload)
    await store.blobs.catalog.register(repo)        # the catalog entry of an earlier push
    status = await store.uploads.start(repo)
    requests = Requests(store.driver)
    await store.uploads.append(repo, status.upload_id, chunks(payload))
    patch = requests.names()
    assert "ListObjectsV2" not in patch, patch
    assert sorted(patch) == ["DeleteObject", "HeadObject", "HeadObject", "PutObject", "PutObject"], patch
    requests.clear()
    requests.params.clear()
    await store.uploads.finish(repo, status.upload_id, digest)
    finish = requests.sent
    deletes = [key for name, key in finish if name == "DeleteObject"]
    assert len(deletes) == 1 and deletes[0].endswith("/data"), finish      # the staged data, moved
    lists = [name for name, _ in finish if name.startswith("ListObjects")]
    assert len(lists) == 1, finish                   # the session directory's delete alone
    assert len(finish) <= 12, finish
    assert (await store.blobs.stat(repo, digest)).size == len(payload)


async def test_a_blob_pulled_again_soon_costs_its_get_alone(remembering_store):
    """storage.pull_cache_seconds: seen linked (here by its push) a moment
    ago, a blob's GET is the bytes' GET alone, and a redirect's stat nothing."""
    store = remembering_store
    payload = os.urandom(4000)
    digest = await _push(store, "count/again", payload)
    requests = Requests(store.driver)
    assert (await store.blobs.stat_for_pull("count/again", digest)).size == 4000
    assert requests.names() == []
    opened = await store.blobs.open_linked("count/again", digest)
    assert b"".join([c async for c in opened]) == payload
    await opened.aclose()
    assert requests.names() == ["GetObject"]
    requests.clear()
    await store.blobs.stat("count/again", digest)                   # a push's HEAD still asks
    assert sorted(requests.names()) == ["HeadObject", "HeadObject"]
