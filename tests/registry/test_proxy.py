"""The pull-through cache over real HTTP: Dockyard (the real application on
aiohttp's loopback test server) in front of CNCF Distribution with an image
pushed into it, counting what reaches the upstream in its access log.

Distribution spec, "Registry Proxying": the `ns` query parameter names the
source host; a registry using it returns it in `OCI-Namespace`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time

import aiohttp
import pytest

from registry.app import create_app
from registry.proxy.settings import ProxySettings, UpstreamSettings
from registry.settings import settings_for_tests
from registry.state import STORE
from tests.registry.regapi import Registry
from tests.support.content import MANIFEST_ACCEPT, OCI_INDEX, OCI_MANIFEST
from tests.support.registry_http import put_manifest
from tests.support.upstream import PushedImage, TamperFront, launch_upstream, push_image, upstream_requests

pytestmark = pytest.mark.interop

LAYERS = [os.urandom(300_000), os.urandom(1_500_000)]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    server = launch_upstream(tmp_path_factory.mktemp("proxy-upstream"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def image(upstream) -> PushedImage:
    return push_image(upstream.url, "library/app", "v1", LAYERS, label="one")


def proxy_settings(tmp_path, url: str, **upstream_keys) -> object:
    up = UpstreamSettings(prefix="hub", url=url, namespace="docker.io", **upstream_keys)
    return settings_for_tests(tmp_path / "storage", proxy=ProxySettings(upstreams=(up,)))


@pytest.fixture
async def start_cache(aiohttp_client, tmp_path):
    """start_cache(url, **upstream keys, proxy=...) -> the test client of a Dockyard proxying url."""
    async def start(url: str, proxy_keys: dict | None = None, root=None, **upstream_keys):
        settings = proxy_settings(root or tmp_path, url, **upstream_keys)
        if proxy_keys:
            settings = dataclasses.replace(settings, proxy=dataclasses.replace(settings.proxy, **proxy_keys))
            settings.validate()
        return await aiohttp_client(create_app(settings))
    return start


async def test_pull_through_prefix_with_docker_hub_names(start_cache, upstream, image):
    client = await start_cache(upstream.url)
    # hub/app is library/app upstream, as Docker spells a one-component name
    resp = await client.get("/v2/hub/app/manifests/v1", headers={"Accept": MANIFEST_ACCEPT})
    assert resp.status == 200, await resp.text()
    body = await resp.read()
    assert body == image.manifest
    assert resp.headers["Docker-Content-Digest"] == image.digest
    assert resp.headers["Content-Type"] == OCI_MANIFEST
    for digest, data in zip(image.layers, LAYERS):
        resp = await client.get(f"/v2/hub/library/app/blobs/{digest}")
        assert resp.status == 200
        assert await resp.read() == data
    # what the cache holds is an ordinary repository: catalog and tags list
    catalog = await (await client.get("/v2/_catalog")).json()
    assert "hub/library/app" in catalog["repositories"]
    tags = await (await client.get("/v2/hub/library/app/tags/list")).json()
    assert tags["tags"] == ["v1"]


def fresh_image(upstream, name: str, size: int = 400_000, label: str = "") -> tuple[PushedImage, list[bytes]]:
    layers = [os.urandom(size), os.urandom(size // 3)]
    return push_image(upstream.url, name, "v1", layers, label=label), layers


def stored_files_naming(root, digest: str) -> list[str]:
    """Every file or directory under a storage root whose path holds the digest's hex."""
    hexpart = digest.split(":", 1)[1]
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files if hexpart in n
            or hexpart in os.path.join(d, n)]


async def test_ten_concurrent_first_pulls_make_one_upstream_get_per_blob(start_cache, upstream):
    img, layers = fresh_image(upstream, "library/crowd", 2_000_000)
    client = await start_cache(upstream.url)

    async def pull_blob(digest: str) -> bytes:
        resp = await client.get(f"/v2/hub/crowd/blobs/{digest}")
        assert resp.status == 200
        return await resp.read()

    for digest, data in zip(img.layers, layers):
        got = await asyncio.wait_for(asyncio.gather(*(pull_blob(digest) for _ in range(10))), 60)
        assert all(g == data for g in got)
        path = f"/v2/library/crowd/blobs/{digest}"
        assert upstream_requests(upstream, "GET", path) == 1
    manifests = await asyncio.gather(*(client.get("/v2/hub/crowd/manifests/v1") for _ in range(10)))
    assert {r.status for r in manifests} == {200}
    assert upstream_requests(upstream, "GET", "/v2/library/crowd/manifests/v1") == 1


async def test_a_waiter_that_hangs_up_does_not_cancel_the_fetch(start_cache, upstream, tmp_path):
    img, layers = fresh_image(upstream, "library/hangup", 8_000_000)
    front = await TamperFront(upstream.url).start()
    try:
        front.delay = 0.002               # slow the body down so the hang-up lands mid-fetch
        client = await start_cache(front.url)
        digest = img.layers[0]
        leaver = await client.get(f"/v2/hub/hangup/blobs/{digest}")
        assert leaver.status == 200
        await leaver.content.readexactly(1024)
        stayer = asyncio.create_task(client.get(f"/v2/hub/hangup/blobs/{digest}"))
        await asyncio.sleep(0.05)
        leaver.close()                    # the first client goes away mid-body
        resp = await asyncio.wait_for(stayer, 60)
        assert await resp.read() == layers[0]
        assert front.blob_gets == 1
        store = client.server.app[STORE]
        assert await store.blobs.exists(digest)
    finally:
        await front.close()


async def test_tag_revalidated_after_interval_not_before(start_cache, upstream):
    first, _ = fresh_image(upstream, "library/moving", 1000, label="first")
    client = await start_cache(upstream.url, revalidate=2)
    path = "/v2/library/moving/manifests/v1"
    resp = await client.get("/v2/hub/moving/manifests/v1")
    assert resp.headers["Docker-Content-Digest"] == first.digest
    second, _ = fresh_image(upstream, "library/moving", 1000, label="second")
    assert second.digest != first.digest
    gets, heads = upstream_requests(upstream, "GET", path), upstream_requests(upstream, "HEAD", path)
    # inside the interval: the cached tag, and nothing asked upstream
    for _ in range(5):
        resp = await client.get("/v2/hub/moving/manifests/v1")
        assert resp.headers["Docker-Content-Digest"] == first.digest
    assert (upstream_requests(upstream, "GET", path), upstream_requests(upstream, "HEAD", path)) == (gets, heads)
    await asyncio.sleep(2.1)
    resp = await client.get("/v2/hub/moving/manifests/v1")
    assert resp.headers["Docker-Content-Digest"] == second.digest
    assert await resp.read() == second.manifest
    assert upstream_requests(upstream, "HEAD", path) == heads + 1
    # by digest, the first manifest is still cached and never asked upstream
    before = upstream_requests(upstream, "GET", f"/v2/library/moving/manifests/{first.digest}")
    resp = await client.get(f"/v2/hub/moving/manifests/{first.digest}")
    assert resp.status == 200 and await resp.read() == first.manifest
    assert upstream_requests(upstream, "GET", f"/v2/library/moving/manifests/{first.digest}") == before
    assert upstream_requests(upstream, "HEAD", f"/v2/library/moving/manifests/{first.digest}") == 0


async def test_unchanged_tag_after_interval_costs_one_head_and_no_get(start_cache, upstream):
    img, _ = fresh_image(upstream, "library/steady", 1000)
    client = await start_cache(upstream.url, revalidate=1)
    path = "/v2/library/steady/manifests/v1"
    assert (await client.get("/v2/hub/steady/manifests/v1")).status == 200
    await asyncio.sleep(1.1)
    resp = await client.get("/v2/hub/steady/manifests/v1")
    assert resp.headers["Docker-Content-Digest"] == img.digest
    assert upstream_requests(upstream, "GET", path) == 1
    assert upstream_requests(upstream, "HEAD", path) == 1


async def test_upstream_down_serves_cached_and_fails_uncached_in_bounded_time(start_cache, upstream):
    img, layers = fresh_image(upstream, "library/outage", 1000)
    other, _ = fresh_image(upstream, "library/outage2", 1000)
    front = await TamperFront(upstream.url).start()
    client = await start_cache(front.url, revalidate=0, timeout=3)
    assert (await client.get("/v2/hub/outage/manifests/v1")).status == 200
    assert await (await client.get(f"/v2/hub/outage/blobs/{img.layers[0]}")).read() == layers[0]
    await front.close()                   # the upstream is gone: connection refused
    resp = await client.get("/v2/hub/outage/manifests/v1")          # stale, and served
    assert resp.status == 200 and await resp.read() == img.manifest
    assert await (await client.get(f"/v2/hub/outage/blobs/{img.layers[0]}")).read() == layers[0]
    started = time.monotonic()
    resp = await client.get("/v2/hub/outage2/manifests/v1")
    assert time.monotonic() - started < 10
    assert resp.status in (502, 504)
    body = await resp.json()
    assert body["errors"][0]["code"] == "UNKNOWN"
    assert "upstream hub" in body["errors"][0]["message"]
    resp = await client.get(f"/v2/hub/outage2/blobs/{other.layers[0]}")
    assert resp.status in (502, 504)


@pytest.mark.parametrize("fault", ["corrupt", "cut"])
async def test_bad_upstream_blob_leaves_nothing_cached_and_cuts_the_client(start_cache, upstream, tmp_path, fault):
    img, layers = fresh_image(upstream, f"library/fault-{fault}", 3_000_000)
    front = await TamperFront(upstream.url).start()
    try:
        client = await start_cache(front.url)
        front.mode = fault
        digest = img.layers[0]

        async def pull() -> BaseException | bytes:
            resp = await client.get(f"/v2/hub/fault-{fault}/blobs/{digest}")
            assert resp.status == 200           # headers went before the fault
            try:
                return await resp.read()
            except aiohttp.ClientPayloadError as exc:
                return exc

        # three waiters on one fetch: one upstream GET, and the same cut for each
        outcomes = await asyncio.wait_for(asyncio.gather(*(pull() for _ in range(3))), 60)
        assert all(isinstance(o, aiohttp.ClientPayloadError) for o in outcomes), outcomes
        assert front.blob_gets == 1
        store = client.server.app[STORE]
        assert not await store.blobs.exists(digest)
        assert stored_files_naming(tmp_path / "storage", digest) == []
        # the next pull, once the upstream behaves, gets the blob whole
        front.mode = "pass"
        resp = await client.get(f"/v2/hub/fault-{fault}/blobs/{digest}")
        assert await resp.read() == layers[0]
        assert await store.blobs.exists(digest)
    finally:
        await front.close()


async def test_push_outside_proxied_prefixes_works_inside_is_refused(start_cache, upstream):
    client = await start_cache(upstream.url)
    reg = Registry(client)
    digest, body = await reg.push_image("team/own", "v1")
    resp = await client.get("/v2/team/own/manifests/v1")
    assert resp.status == 200 and await resp.read() == body
    resp = await client.post("/v2/hub/library/app/blobs/uploads/")
    assert resp.status == 405
    assert (await resp.json())["errors"][0]["code"] == "UNSUPPORTED"
    resp = await client.put("/v2/hub/library/app/manifests/v2", data=body,
                            headers={"Content-Type": OCI_MANIFEST})
    assert resp.status == 405


async def test_ns_mirror_mode_and_default_upstream(start_cache, upstream, image):
    client = await start_cache(upstream.url, proxy_keys={"default": "hub"})
    # containerd hosts.toml mirror: /v2/library/app/...?ns=docker.io
    resp = await client.get("/v2/library/app/manifests/v1", params={"ns": "docker.io"})
    assert resp.status == 200 and await resp.read() == image.manifest
    assert resp.headers["OCI-Namespace"] == "docker.io"
    resp = await client.get(f"/v2/library/app/blobs/{image.layers[0]}", params={"ns": "docker.io"})
    assert await resp.read() == LAYERS[0]
    assert resp.headers["OCI-Namespace"] == "docker.io"
    # Docker's registry-mirrors: an unprefixed name comes from the default upstream
    resp = await client.get("/v2/app/manifests/v1")
    assert resp.status == 200 and await resp.read() == image.manifest
    assert "OCI-Namespace" not in resp.headers
    # an ns nobody is configured for is ignored (the spec allows it): the default upstream, which lacks it
    resp = await client.get("/v2/team/none/manifests/v1", params={"ns": "quay.io"})
    assert resp.status == 404
    # a repository pushed here stays local, default or not
    reg = Registry(client)
    _, body = await reg.push_image("local/thing", "v1")
    resp = await client.get("/v2/local/thing/manifests/v1")
    assert resp.status == 200 and await resp.read() == body
    tags = await (await client.get("/v2/hub/library/app/tags/list")).json()
    assert tags["tags"] == ["v1"]


async def test_multi_arch_index_cached_children_on_demand(start_cache, upstream):
    amd, _ = fresh_image(upstream, "library/multi", 1000, label="amd64")
    arm = push_image(upstream.url, "library/multi", "arm", [os.urandom(1000)], label="arm64")
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": amd.digest, "size": len(amd.manifest),
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": OCI_MANIFEST, "digest": arm.digest, "size": len(arm.manifest),
         "platform": {"os": "linux", "architecture": "arm64"}}]}, sort_keys=True).encode()
    assert put_manifest(upstream.url, "library/multi", "all", index, OCI_INDEX).status == 201
    client = await start_cache(upstream.url)
    resp = await client.get("/v2/hub/multi/manifests/all")
    assert resp.status == 200 and await resp.read() == index
    assert resp.headers["Content-Type"] == OCI_INDEX
    # the index came alone: no child, no blob was fetched with it
    for child in (amd.digest, arm.digest):
        assert upstream_requests(upstream, "GET", f"/v2/library/multi/manifests/{child}") == 0
    resp = await client.get(f"/v2/hub/multi/manifests/{arm.digest}")
    assert resp.status == 200 and await resp.read() == arm.manifest
    assert upstream_requests(upstream, "GET", f"/v2/library/multi/manifests/{arm.digest}") == 1
    assert upstream_requests(upstream, "GET", f"/v2/library/multi/manifests/{amd.digest}") == 0
    resp = await client.get(f"/v2/hub/multi/manifests/{arm.digest}")
    assert upstream_requests(upstream, "GET", f"/v2/library/multi/manifests/{arm.digest}") == 1


async def test_cache_on_every_storage_driver_commits_only_verified_blobs(make_registry, upstream):
    """The same fetch, fault and single flight on each registered driver (S3's
    direct writer, the filesystem's staged upload)."""
    img, layers = fresh_image(upstream, "library/drivers", 1_500_000)
    front = await TamperFront(upstream.url).start()
    try:
        up = UpstreamSettings(prefix="hub", url=front.url, namespace="docker.io")
        reg = await make_registry(proxy=ProxySettings(upstreams=(up,)))
        client, store = reg.client, reg.client.server.app[STORE]
        front.mode = "corrupt"
        resp = await client.get(f"/v2/hub/drivers/blobs/{img.layers[0]}")
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
        assert not await store.blobs.exists(img.layers[0])
        front.mode = "pass"
        before = front.blob_gets
        got = await asyncio.gather(*(client.get(f"/v2/hub/drivers/blobs/{img.layers[0]}") for _ in range(5)))
        assert [await r.read() for r in got] == [layers[0]] * 5
        assert front.blob_gets == before + 1
        assert await store.blobs.exists(img.layers[0])
    finally:
        await front.close()


async def test_first_client_gets_bytes_before_the_upstream_finished(start_cache, upstream):
    img, layers = fresh_image(upstream, "library/streamed", 3_000_000)
    front = await TamperFront(upstream.url).start()
    try:
        front.delay = 0.01                # ~0.5 s for the whole blob upstream
        client = await start_cache(front.url)
        store = client.server.app[STORE]
        resp = await client.get(f"/v2/hub/streamed/blobs/{img.layers[0]}")
        assert resp.status == 200 and resp.content_length == len(layers[0])
        head = await resp.content.readexactly(256 * 1024)
        # bytes arrived while the blob is still on its way: not committed yet
        assert not await store.blobs.exists(img.layers[0])
        rest = await resp.read()
        assert head + rest == layers[0]
        assert await store.blobs.exists(img.layers[0])
    finally:
        await front.close()


async def test_repositories_outside_the_upstreams_globs_are_denied(start_cache, upstream, image):
    client = await start_cache(upstream.url, repositories=("library/app",))
    assert (await client.get("/v2/hub/app/manifests/v1")).status == 200
    resp = await client.get("/v2/hub/library/other/manifests/v1")
    assert resp.status == 403
    assert (await resp.json())["errors"][0]["code"] == "DENIED"
    assert upstream_requests(upstream, "GET", "/v2/library/other/manifests/v1") == 0
