"""The pull-through cache and its upstream's credentials and redirects:
Authorization goes to the upstream's own origin only, a redirect to a host
proxy.allow_hosts does not list is refused before any byte is asked of it,
and no credential reaches a client or a log line.

Upstream: CNCF Distribution with htpasswd auth, behind a recording front
(tests.support.upstream.TamperFront) that can redirect blob GETs to a second
front on another loopback address (127.0.0.2, another host) over an
unauthenticated Distribution holding the same blobs, as blob storage would.
"""

from __future__ import annotations

import logging
import os

import pytest

from registry.app import create_app
from registry.proxy.settings import ProxySettings, UpstreamSettings
from registry.settings import settings_for_tests
from tests.support.auth import write_htpasswd
from tests.support.upstream import TamperFront, launch_upstream, push_image

pytestmark = pytest.mark.interop

USER, PASSWORD = "cacher", "upstream-Secret-771"
LAYERS = [os.urandom(200_000)]


def _basic_url(url: str) -> str:
    return url.replace("http://", f"http://{USER}:{PASSWORD}@")


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory):
    """(authenticated upstream, open twin), the same image pushed into both."""
    work = tmp_path_factory.mktemp("proxy-auth-upstream")
    htpasswd = write_htpasswd(work / "htpasswd", {USER: PASSWORD})
    guarded = launch_upstream(work / "guarded", auth={"htpasswd": {"realm": "up", "path": str(htpasswd)}})
    twin = launch_upstream(work / "twin")
    yield guarded, twin
    guarded.stop()
    twin.stop()


def _push_basic(server, repo: str):
    # urllib sends Basic only after a challenge with a password manager: do it by hand
    import base64
    import urllib.request
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    opener = urllib.request.build_opener()
    opener.addheaders = [("Authorization", f"Basic {token}")]
    urllib.request.install_opener(opener)
    try:
        return push_image(server.url, repo, "v1", LAYERS)
    finally:
        urllib.request.install_opener(urllib.request.build_opener())


@pytest.fixture(scope="module")
def image(upstreams):
    guarded, twin = upstreams
    pushed = _push_basic(guarded, "library/secret")
    push_image(twin.url, "library/secret", "v1", LAYERS)
    return pushed


@pytest.fixture
async def fronts(upstreams):
    guarded, twin = upstreams
    front = await TamperFront(guarded.url).start()
    storage = await TamperFront(twin.url, host="127.0.0.2").start()
    front.redirect_to = storage.url
    yield front, storage
    await front.close()
    await storage.close()


async def _cache(aiohttp_client, tmp_path, url: str, allow_hosts=()):
    up = UpstreamSettings(prefix="hub", url=url, username=USER, password=PASSWORD, timeout=5)
    settings = settings_for_tests(tmp_path / "storage",
                                  proxy=ProxySettings(upstreams=(up,), allow_hosts=tuple(allow_hosts)))
    return await aiohttp_client(create_app(settings))


async def test_credentials_go_upstream_only_never_to_a_redirect_host(aiohttp_client, tmp_path, fronts, image,
                                                                     caplog):
    caplog.set_level(logging.DEBUG)
    front, storage = fronts
    front.mode = "redirect"
    client = await _cache(aiohttp_client, tmp_path, front.url, allow_hosts=["127.0.0.1", "127.0.0.2"])
    resp = await client.get("/v2/hub/library/secret/manifests/v1")
    assert resp.status == 200, await resp.text()
    assert "Authorization" not in resp.headers and PASSWORD not in (await resp.text())
    resp = await client.get(f"/v2/hub/library/secret/blobs/{image.layers[0]}")
    assert resp.status == 200
    assert await resp.read() == LAYERS[0]
    # the upstream got Basic credentials; the redirect's host got none
    assert any(auth and auth.startswith("Basic ") for _, auth in front.authorizations)
    assert storage.authorizations and all(auth is None for _, auth in storage.authorizations)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert PASSWORD not in logged


async def test_redirect_to_a_host_not_allowed_is_refused(aiohttp_client, tmp_path, fronts, image):
    front, storage = fronts
    front.mode = "redirect"
    client = await _cache(aiohttp_client, tmp_path, front.url, allow_hosts=["127.0.0.1"])
    resp = await client.get(f"/v2/hub/library/secret/blobs/{image.layers[0]}")
    assert resp.status == 502
    message = (await resp.json())["errors"][0]["message"]
    assert "127.0.0.2" in message and "allow_hosts" in message
    assert storage.authorizations == []               # never contacted
    assert PASSWORD not in message


async def test_without_allow_hosts_only_the_upstream_origin_is_followed(aiohttp_client, tmp_path, fronts, image):
    front, storage = fronts
    front.mode = "redirect"
    client = await _cache(aiohttp_client, tmp_path, front.url)
    resp = await client.get(f"/v2/hub/library/secret/blobs/{image.layers[0]}")
    assert resp.status == 502
    assert storage.authorizations == []


async def test_wrong_upstream_password_is_a_502_without_the_password(aiohttp_client, tmp_path, fronts, image):
    front, _ = fronts
    up = UpstreamSettings(prefix="hub", url=front.url, username=USER, password="wrong-Pass-123", timeout=5)
    settings = settings_for_tests(tmp_path / "storage", proxy=ProxySettings(upstreams=(up,)))
    client = await aiohttp_client(create_app(settings))
    resp = await client.get("/v2/hub/library/secret/manifests/v1")
    assert resp.status == 502
    text = await resp.text()
    assert "wrong-Pass-123" not in text and "credentials" in text


async def test_token_server_on_a_host_not_allowed_is_never_contacted(aiohttp_client, tmp_path, fronts):
    front, storage = fronts
    front.mode = "challenge"                 # the token server: 127.0.0.2, not listed
    client = await _cache(aiohttp_client, tmp_path, front.url, allow_hosts=["127.0.0.1"])
    resp = await client.get("/v2/hub/library/secret/manifests/v1")
    assert resp.status == 502
    message = (await resp.json())["errors"][0]["message"]
    assert "token server 127.0.0.2" in message and "allow_hosts" in message
    assert storage.authorizations == []      # no credentials went there


def test_upstream_url_outside_allow_hosts_stops_the_settings():
    from registry.settings import SettingsError
    up = UpstreamSettings(prefix="hub", url="http://169.254.169.254")
    with pytest.raises(SettingsError, match="not in proxy.allow_hosts"):
        settings_for_tests("/tmp/x", proxy=ProxySettings(upstreams=(up,), allow_hosts=("registry.example",)))
