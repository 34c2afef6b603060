"""Base endpoint, blob GET/HEAD/DELETE, Range requests, routing and error bodies."""

from __future__ import annotations

import os

import json

from tests.registry.regapi import digest_of, error_codes, raw_request

API_HEADER = "Docker-Distribution-API-Version"


async def test_base_endpoint(registry):
    resp = await registry.get("/v2/")
    assert resp.status == 200
    assert resp.headers[API_HEADER] == "registry/2.0"
    assert await resp.json() == {}
    resp = await registry.get("/v2")
    assert resp.status == 404  # only /v2/ is the version check


async def test_every_response_has_api_version_header(registry):
    digest = await registry.push_blob("hdr", b"x" * 10)
    for method, path in [("GET", "/v2/"), ("GET", f"/v2/hdr/blobs/{digest}"),
                         ("HEAD", f"/v2/hdr/blobs/{digest}"), ("GET", "/v2/nope/tags/list"),
                         ("GET", "/v2/no/such/endpoint"), ("POST", "/v2/hdr/blobs/uploads/")]:
        resp = await registry.request(method, path)
        assert resp.headers.get(API_HEADER) == "registry/2.0", (method, path, resp.status)


async def test_unknown_route_and_method_are_json_errors(registry):
    resp = await registry.get("/v2/foo/unknown/thing")
    assert resp.status == 404
    assert error_codes(await resp.json()) == ["NOT_FOUND"]
    resp = await registry.post("/v2/foo/tags/list")
    assert resp.status == 405
    assert error_codes(await resp.json()) == ["UNSUPPORTED"]


async def test_get_and_head_blob(registry):
    data = os.urandom(3000)
    digest = await registry.push_blob("library/app", data)
    resp = await registry.get(f"/v2/library/app/blobs/{digest}")
    assert resp.status == 200
    assert await resp.read() == data
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["Content-Length"] == "3000"
    assert resp.headers["Accept-Ranges"] == "bytes"
    assert resp.headers["Content-Type"] == "application/octet-stream"

    resp = await registry.head(f"/v2/library/app/blobs/{digest}")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == "3000"
    assert resp.headers["Docker-Content-Digest"] == digest
    assert await resp.read() == b""


async def test_blob_range_requests(registry):
    data = bytes(range(256)) * 40          # 10240 bytes
    digest = await registry.push_blob("ranges", data)
    url = f"/v2/ranges/blobs/{digest}"

    resp = await registry.get(url, headers={"Range": "bytes=100-199"})
    assert resp.status == 206
    assert await resp.read() == data[100:200]
    assert resp.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    assert resp.headers["Docker-Content-Digest"] == digest

    resp = await registry.get(url, headers={"Range": "bytes=10000-"})
    assert resp.status == 206
    assert await resp.read() == data[10000:]

    resp = await registry.get(url, headers={"Range": "bytes=-40"})
    assert resp.status == 206
    assert await resp.read() == data[-40:]

    resp = await registry.get(url, headers={"Range": "bytes=20000-20010"})
    assert resp.status == 416
    assert resp.headers["Content-Range"] == f"bytes */{len(data)}"


async def test_blob_unknown_and_invalid_digest(registry):
    await registry.push_blob("known", b"abc")
    missing = digest_of(b"not pushed")
    resp = await registry.get(f"/v2/known/blobs/{missing}")
    assert resp.status == 404
    assert error_codes(await resp.json()) == ["BLOB_UNKNOWN"]
    resp = await registry.head(f"/v2/known/blobs/{missing}")
    assert resp.status == 404

    for bad in ("sha256:xyz", "md5:" + "0" * 32, "sha256:" + "A" * 64, "nodigest"):
        resp = await registry.get(f"/v2/known/blobs/{bad}")
        assert resp.status == 400, bad
        assert error_codes(await resp.json()) == ["DIGEST_INVALID"], bad


async def test_blob_is_scoped_to_its_repository(registry):
    digest = await registry.push_blob("team/one", b"only in one")
    resp = await registry.get(f"/v2/team/two/blobs/{digest}")
    assert resp.status == 404
    assert (await registry.get(f"/v2/team/one/blobs/{digest}")).status == 200


async def test_delete_blob(registry):
    digest = await registry.push_blob("del/blob", b"to delete")
    resp = await registry.delete(f"/v2/del/blob/blobs/{digest}")
    assert resp.status == 202
    resp = await registry.get(f"/v2/del/blob/blobs/{digest}")
    assert resp.status == 404
    assert error_codes(await resp.json()) == ["BLOB_UNKNOWN"]
    resp = await registry.delete(f"/v2/del/blob/blobs/{digest}")
    assert resp.status == 404
    assert error_codes(await resp.json()) == ["BLOB_UNKNOWN"]


async def test_delete_disabled(make_registry, tmp_path):
    from registry.settings import StorageSettings

    reg = await make_registry(storage=StorageSettings(root=str(tmp_path / "s"), delete_enabled=False))
    digest = await reg.push_blob("nodel", b"keep me")
    resp = await reg.delete(f"/v2/nodel/blobs/{digest}")
    assert resp.status == 405
    assert error_codes(await resp.json()) == ["UNSUPPORTED"]
    assert (await reg.get(f"/v2/nodel/blobs/{digest}")).status == 200


async def test_invalid_repository_names(registry):
    digest = digest_of(b"x")
    for name in ("Upper/case", "foo..bar", "a/%2e%2e/b", "-lead", "trail-", "a//b", "a/_b"):
        resp = await registry.get(f"/v2/{name}/blobs/{digest}")
        assert resp.status in (400, 404), name
        if resp.status == 400:
            assert error_codes(await resp.json()) == ["NAME_INVALID"], name
    resp = await registry.get(f"/v2/foo..bar/blobs/{digest}")
    assert resp.status == 400
    assert error_codes(await resp.json()) == ["NAME_INVALID"]
    # As sent on the wire, without a client resolving the dot segments first.
    for path in ("/v2/a/%2E%2E/b/tags/list", "/v2/a/../b/tags/list", "/v2/../etc/tags/list"):
        status, _, body = await raw_request(registry.client, "GET", path)
        assert status in (400, 404), path
        if status == 400:
            assert error_codes(json.loads(body)) == ["NAME_INVALID"], path
    status, _, body = await raw_request(registry.client, "GET", "/v2/a/%2E%2E/b/tags/list")
    assert status == 400
    assert error_codes(json.loads(body)) == ["NAME_INVALID"]
    long_name = "/".join(["abcdefghij"] * 24)  # 263 characters
    resp = await registry.get(f"/v2/{long_name}/tags/list")
    assert resp.status == 400
    assert error_codes(await resp.json()) == ["NAME_INVALID"]


async def test_repository_names_ending_in_route_words(registry):
    for repo in ("x/blobs", "x/manifests", "x/tags", "x/blobs/uploads", "x/referrers"):
        digest, body = await registry.push_image(repo, "v1", layers=[repo.encode()])
        resp = await registry.get(f"/v2/{repo}/manifests/v1")
        assert resp.status == 200, repo
        assert await resp.read() == body
        layer = digest_of(repo.encode())
        resp = await registry.get(f"/v2/{repo}/blobs/{layer}")
        assert resp.status == 200, repo
        assert await resp.read() == repo.encode()
        resp = await registry.get(f"/v2/{repo}/tags/list")
        assert (await resp.json()) == {"name": repo, "tags": ["v1"]}
    resp = await registry.get("/v2/_catalog")
    repos = (await resp.json())["repositories"]
    for repo in ("x/blobs", "x/manifests", "x/tags", "x/blobs/uploads", "x/referrers"):
        assert repo in repos


async def test_large_blob_and_ranges_from_the_file_path(registry):
    data = os.urandom(9 * 1024 * 1024 + 7)
    digest = await registry.push_blob("bigblob", data)
    resp = await registry.get(f"/v2/bigblob/blobs/{digest}")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(len(data))
    assert await resp.read() == data
    start = 5 * 1024 * 1024 - 3
    resp = await registry.get(f"/v2/bigblob/blobs/{digest}", headers={"Range": f"bytes={start}-"})
    assert resp.status == 206
    assert await resp.read() == data[start:]


async def test_client_leaving_mid_blob_does_not_hurt_the_server(registry):
    import asyncio

    data = os.urandom(32 * 1024 * 1024)
    digest = await registry.push_blob("leaver", data)
    for _ in range(3):
        reader, writer = await asyncio.open_connection(registry.client.server.host, registry.client.server.port)
        writer.write(f"GET /v2/leaver/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        await reader.readexactly(4096)      # headers and a little body, then hang up
        writer.transport.abort()
    resp = await registry.get(f"/v2/leaver/blobs/{digest}", headers={"Range": "bytes=0-9"})
    assert resp.status == 206
    assert await resp.read() == data[:10]
    assert (await registry.get("/v2/")).status == 200


class _ObjectStoreLikeDriver:
    """The filesystem driver without local paths: blobs must be streamed
    through the registry, as with an object store."""

    @staticmethod
    def make(root):
        from storage.filesystem import FilesystemDriver

        class NoLocalPaths(FilesystemDriver):
            async def open_local(self, path):
                return None

        return NoLocalPaths(str(root))


async def test_streamed_blobs_without_local_path(aiohttp_client, tmp_path):
    from registry.app import create_app
    from registry.settings import settings_for_tests
    from tests.registry.regapi import Registry

    settings = settings_for_tests(tmp_path / "s")
    reg = Registry(await aiohttp_client(create_app(settings, driver=_ObjectStoreLikeDriver.make(tmp_path / "s"))))
    data = os.urandom(3 * 1024 * 1024 + 11)
    digest = await reg.push_blob("streamed", data)
    resp = await reg.get(f"/v2/streamed/blobs/{digest}")
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(len(data))
    assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert await resp.read() == data
    resp = await reg.get(f"/v2/streamed/blobs/{digest}", headers={"Range": "bytes=1048570-1048585"})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes 1048570-1048585/{len(data)}"
    assert await resp.read() == data[1048570:1048586]
    resp = await reg.get(f"/v2/streamed/blobs/{digest}", headers={"Range": "bytes=-5"})
    assert await resp.read() == data[-5:]
    resp = await reg.get(f"/v2/streamed/blobs/{digest}", headers={"Range": f"bytes={len(data)}-"})
    assert resp.status == 416
    resp = await reg.get(f"/v2/streamed/blobs/{digest}", headers={"Range": "bytes=0-1,5-6"})
    assert resp.status == 200            # several ranges: the whole blob
    assert await resp.read() == data
