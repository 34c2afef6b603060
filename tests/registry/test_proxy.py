"""The pull-through cache over real HTTP: Dockyard (the real application on
aiohttp's loopback test server) in front of CNCF Distribution with an image
pushed into it, counting what reaches the upstream in its access log.

Distribution spec, "Registry Proxying": the `ns` query parameter names the
source host; a registry using it returns it in `OCI-Namespace`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time

import aiohttp
import pytest

from registry.app import create_app
from registry.proxy.settings import ProxySettings, UpstreamSettings
from registry.settings import settings_for_tests
from tests.support.content import MANIFEST_ACCEPT, OCI_MANIFEST, sha256_digest
from tests.support.launch import free_port
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
