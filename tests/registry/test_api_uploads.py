"""Blob uploads: monolithic, POST+PUT, chunked, streamed, status, cancel, mount."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from tests.registry.regapi import digest_of, error_codes, raw_request

OCTET = {"Content-Type": "application/octet-stream"}


async def start(registry, repo: str, **params) -> str:
    resp = await registry.post(f"/v2/{repo}/blobs/uploads/", params=params or None)
    assert resp.status == 202, await resp.text()
    assert resp.headers["Range"] == "0-0"
    uuid = resp.headers["Docker-Upload-UUID"]
    location = resp.headers["Location"]
    assert location == f"/v2/{repo}/blobs/uploads/{uuid}"
    return location


async def assert_blob(registry, repo: str, digest: str, data: bytes) -> None:
    resp = await registry.get(f"/v2/{repo}/blobs/{digest}")
    assert resp.status == 200
    assert await resp.read() == data


async def test_monolithic_post(registry):
    data = os.urandom(5000)
    digest = digest_of(data)
    resp = await registry.post("/v2/mono/blobs/uploads/", params={"digest": digest}, data=data, headers=OCTET)
    assert resp.status == 201
    assert resp.headers["Location"] == f"/v2/mono/blobs/{digest}"
    assert resp.headers["Docker-Content-Digest"] == digest
    await assert_blob(registry, "mono", digest, data)


async def test_monolithic_post_wrong_digest(registry):
    data = b"some bytes"
    wrong = digest_of(b"other bytes")
    resp = await registry.post("/v2/mono/blobs/uploads/", params={"digest": wrong}, data=data, headers=OCTET)
    assert resp.status == 400
    assert error_codes(await resp.json()) == ["DIGEST_INVALID"]
    assert (await registry.get(f"/v2/mono/blobs/{wrong}")).status == 404
    assert (await registry.get(f"/v2/mono/blobs/{digest_of(data)}")).status == 404


async def test_post_then_put(registry):
    data = os.urandom(2048)
    digest = digest_of(data)
    location = await start(registry, "postput")
    resp = await registry.put(location, params={"digest": digest}, data=data, headers=OCTET)
    assert resp.status == 201
    assert resp.headers["Location"] == f"/v2/postput/blobs/{digest}"
    assert resp.headers["Docker-Content-Digest"] == digest
    await assert_blob(registry, "postput", digest, data)
    # The session is gone once finished.
    resp = await registry.get(location)
    assert resp.status == 404
    assert error_codes(await resp.json()) == ["BLOB_UPLOAD_UNKNOWN"]


async def test_chunked_upload_with_status(registry):
    data = os.urandom(3 * 1000 + 17)
    digest = digest_of(data)
    location = await start(registry, "chunked/repo")
    chunks = [data[0:1000], data[1000:2000], data[2000:3000], data[3000:]]
    offset = 0
    for chunk in chunks[:-1]:
        resp = await registry.patch(location, data=chunk, headers={
            **OCTET, "Content-Range": f"{offset}-{offset + len(chunk) - 1}"})
        assert resp.status == 202, await resp.text()
        offset += len(chunk)
        assert resp.headers["Range"] == f"0-{offset - 1}"
        location = resp.headers["Location"]
        status = await registry.get(location)
        assert status.status == 204
        assert status.headers["Range"] == f"0-{offset - 1}"
        assert status.headers["Docker-Upload-UUID"] in location
    # The final chunk rides on the PUT.
    resp = await registry.put(location, params={"digest": digest}, data=chunks[-1], headers={
        **OCTET, "Content-Range": f"{offset}-{len(data) - 1}"})
    assert resp.status == 201, await resp.text()
    await assert_blob(registry, "chunked/repo", digest, data)


async def test_chunk_gap_and_overlap_answer_416_with_range(registry):
    data = os.urandom(300)
    location = await start(registry, "gaps")
    resp = await registry.patch(location, data=data[:100], headers={**OCTET, "Content-Range": "0-99"})
    assert resp.status == 202
    # gap: starts after the current end
    resp = await registry.patch(location, data=data[150:200], headers={**OCTET, "Content-Range": "150-199"})
    assert resp.status == 416
    assert resp.headers["Range"] == "0-99"
    # overlap: starts before it
    resp = await registry.patch(location, data=data[50:150], headers={**OCTET, "Content-Range": "50-149"})
    assert resp.status == 416
    assert resp.headers["Range"] == "0-99"
    # Content-Range disagreeing with the body length
    resp = await registry.patch(location, data=data[100:150], headers={**OCTET, "Content-Range": "100-199"})
    assert resp.status == 416
    assert resp.headers["Range"] == "0-99"
    # malformed
    resp = await registry.patch(location, data=data[100:150], headers={**OCTET, "Content-Range": "abc"})
    assert resp.status == 416
    # the upload is intact and can go on from 100
    resp = await registry.patch(location, data=data[100:], headers={**OCTET, "Content-Range": "100-299"})
    assert resp.status == 202
    resp = await registry.put(location, params={"digest": digest_of(data)})
    assert resp.status == 201
    await assert_blob(registry, "gaps", digest_of(data), data)


async def test_final_put_out_of_order_is_416(registry):
    data = os.urandom(200)
    location = await start(registry, "putorder")
    await registry.patch(location, data=data[:100], headers={**OCTET, "Content-Range": "0-99"})
    resp = await registry.put(location, params={"digest": digest_of(data)}, data=data[150:],
                              headers={**OCTET, "Content-Range": "150-199"})
    assert resp.status == 416
    assert resp.headers["Range"] == "0-99"


async def test_streamed_patch_without_content_range(registry):
    # What docker does: one PATCH with the whole blob (chunked transfer), then PUT without body.
    data = os.urandom(3 * 1024 * 1024 + 5)
    digest = digest_of(data)
    location = await start(registry, "streamed")

    async def body():
        for i in range(0, len(data), 65536):
            yield data[i:i + 65536]

    resp = await registry.patch(location, data=body(), headers=OCTET)
    assert resp.status == 202
    assert resp.headers["Range"] == f"0-{len(data) - 1}"
    resp = await registry.put(resp.headers["Location"], params={"digest": digest})
    assert resp.status == 201
    await assert_blob(registry, "streamed", digest, data)


async def test_put_wrong_digest_commits_nothing(registry):
    data = os.urandom(500)
    wrong = digest_of(b"something else")
    location = await start(registry, "wrongdigest")
    resp = await registry.patch(location, data=data, headers=OCTET)
    assert resp.status == 202
    resp = await registry.put(location, params={"digest": wrong})
    assert resp.status == 400
    assert error_codes(await resp.json()) == ["DIGEST_INVALID"]
    for digest in (wrong, digest_of(data)):
        assert (await registry.get(f"/v2/wrongdigest/blobs/{digest}")).status == 404
    # malformed digest, and no digest at all
    resp = await registry.put(location, params={"digest": "sha256:nothex"})
    assert resp.status == 400
    assert error_codes(await resp.json()) == ["DIGEST_INVALID"]
    resp = await registry.put(location)
    assert resp.status == 400
    assert error_codes(await resp.json()) == ["DIGEST_INVALID"]


async def test_cancel_upload(registry):
    location = await start(registry, "cancel")
    await registry.patch(location, data=b"partial", headers=OCTET)
    resp = await registry.delete(location)
    assert resp.status == 204
    for method in ("GET", "PATCH", "PUT", "DELETE"):
        resp = await registry.request(method, location, params={"digest": digest_of(b"partial")})
        assert resp.status == 404, method
        assert error_codes(await resp.json()) == ["BLOB_UPLOAD_UNKNOWN"], method


async def test_unknown_upload(registry):
    await registry.push_blob("uploads", b"make the repo exist")
    for upload_id in ("0f2e5a1c-1111-2222-3333-444455556666", "not-a-session", "a.b"):
        resp = await registry.get(f"/v2/uploads/blobs/uploads/{upload_id}")
        assert resp.status == 404, upload_id
        assert error_codes(await resp.json()) == ["BLOB_UPLOAD_UNKNOWN"], upload_id
        resp = await registry.patch(f"/v2/uploads/blobs/uploads/{upload_id}", data=b"x")
        assert resp.status == 404, upload_id
        assert error_codes(await resp.json()) == ["BLOB_UPLOAD_UNKNOWN"], upload_id


async def test_upload_id_with_dot_segments_on_the_wire(registry):
    await registry.push_blob("uploads", b"make the repo exist")
    for path in ("/v2/uploads/blobs/uploads/%2e%2e", "/v2/uploads/blobs/uploads/..%2F..%2Fx"):
        status, _, body = await raw_request(registry.client, "PATCH", path, body=b"x")
        assert status == 404, path
        assert error_codes(json.loads(body))[0] in ("BLOB_UPLOAD_UNKNOWN", "NOT_FOUND"), path


async def test_upload_session_belongs_to_its_repository(registry):
    location = await start(registry, "owner/a")
    other = location.replace("/v2/owner/a/", "/v2/owner/b/")
    resp = await registry.get(other)
    assert resp.status == 404
    assert error_codes(await resp.json()) == ["BLOB_UPLOAD_UNKNOWN"]


async def test_sha512_blobs(registry):
    data = os.urandom(4000)
    digest = "sha512:" + hashlib.sha512(data).hexdigest()
    location = await start(registry, "five12", **{"digest-algorithm": "sha512"})
    resp = await registry.patch(location, data=data, headers=OCTET)
    assert resp.status == 202
    resp = await registry.put(resp.headers["Location"], params={"digest": digest})
    assert resp.status == 201
    assert resp.headers["Docker-Content-Digest"] == digest
    await assert_blob(registry, "five12", digest, data)
    # monolithic too
    other = os.urandom(100)
    digest2 = await registry.push_blob("five12", other, alg="sha512")
    await assert_blob(registry, "five12", digest2, other)


async def test_unsupported_digest_algorithm(registry):
    resp = await registry.post("/v2/algo/blobs/uploads/", params={"digest-algorithm": "md5"})
    assert resp.status == 400
    assert error_codes(await resp.json()) == ["DIGEST_INVALID"]


async def test_cross_repository_mount(registry):
    data = os.urandom(1000)
    digest = await registry.push_blob("src/repo", data)
    resp = await registry.post("/v2/dst/repo/blobs/uploads/", params={"mount": digest, "from": "src/repo"})
    assert resp.status == 201
    assert resp.headers["Location"] == f"/v2/dst/repo/blobs/{digest}"
    assert resp.headers["Docker-Content-Digest"] == digest
    await assert_blob(registry, "dst/repo", digest, data)


async def test_mount_falls_back_to_upload(registry):
    data = os.urandom(100)
    digest = await registry.push_blob("has/it", data)
    # `from` does not hold the blob: an ordinary session starts (202)
    resp = await registry.post("/v2/wants/it/blobs/uploads/", params={"mount": digest, "from": "lacks/it"})
    assert resp.status == 202
    assert "Docker-Upload-UUID" in resp.headers
    resp = await registry.put(resp.headers["Location"], params={"digest": digest}, data=data, headers=OCTET)
    assert resp.status == 201
    # unknown blob
    resp = await registry.post("/v2/wants/it/blobs/uploads/",
                               params={"mount": digest_of(b"nowhere"), "from": "has/it"})
    assert resp.status == 202
    # invalid `from` name: still an upload, not an error
    resp = await registry.post("/v2/wants/it/blobs/uploads/", params={"mount": digest, "from": "BAD..name"})
    assert resp.status == 202


async def test_mount_without_from(registry):
    data = os.urandom(100)
    digest = await registry.push_blob("anywhere/src", data)
    resp = await registry.post("/v2/anywhere/dst/blobs/uploads/", params={"mount": digest})
    assert resp.status == 201
    await assert_blob(registry, "anywhere/dst", digest, data)


async def test_post_with_digest_and_empty_body_starts_upload(registry):
    digest = digest_of(b"not sent")
    resp = await registry.post("/v2/emptypost/blobs/uploads/", params={"digest": digest})
    assert resp.status == 202
    # the empty blob itself may be pushed monolithically with no body
    empty = digest_of(b"")
    resp = await registry.post("/v2/emptypost/blobs/uploads/", params={"digest": empty})
    assert resp.status == 201
    await assert_blob(registry, "emptypost", empty, b"")


async def test_absolute_locations_when_configured(make_registry, tmp_path):
    from registry.settings import HttpSettings

    reg = await make_registry(http=HttpSettings(relative_urls=False))
    resp = await reg.post("/v2/abs/blobs/uploads/")
    assert resp.status == 202
    location = resp.headers["Location"]
    assert location.startswith(f"http://{reg.client.server.host}:{reg.client.server.port}/v2/abs/blobs/uploads/")
    data = b"absolute"
    resp = await reg.client.session.put(location, params={"digest": digest_of(data)}, data=data,
                                        headers=OCTET)
    assert resp.status == 201
    assert resp.headers["Location"].startswith("http://")


async def test_client_breaking_off_a_chunk_can_resume(registry):
    import asyncio

    data = os.urandom(6 * 1024 * 1024)
    location = await start(registry, "brokenoff")
    reader, writer = await asyncio.open_connection(registry.client.server.host, registry.client.server.port)
    writer.write((f"PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                  f"Content-Range: 0-{len(data) - 1}\r\nContent-Length: {len(data)}\r\n\r\n").encode())
    writer.write(data[:4 * 1024 * 1024])
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.transport.abort()
    # The session reports a prefix it holds; the client resumes from there.
    resp = None
    for _ in range(50):
        resp = await registry.get(location)
        if resp.status == 204:
            break
        await asyncio.sleep(0.1)
    assert resp.status == 204
    offset = int(resp.headers["Range"].split("-")[1]) + 1 if resp.headers["Range"] != "0-0" else 0
    assert 0 <= offset <= 4 * 1024 * 1024
    resp = await registry.patch(location, data=data[offset:], headers={
        **OCTET, "Content-Range": f"{offset}-{len(data) - 1}"})
    assert resp.status == 202, await resp.text()
    resp = await registry.put(location, params={"digest": digest_of(data)})
    assert resp.status == 201, await resp.text()
    await assert_blob(registry, "brokenoff", digest_of(data), data)


async def test_abandoned_uploads_are_purged(make_registry, tmp_path):
    import asyncio

    from registry.settings import UploadsSettings, settings_for_tests

    reg = await make_registry(uploads=UploadsSettings(max_age=1, purge_interval=1))
    await reg.push_blob("purge/me", b"the repository exists")
    location = await start(reg, "purge/me")
    await reg.patch(location, data=b"abandoned", headers=OCTET)
    for _ in range(100):                 # purged within about two intervals
        resp = await reg.get(location)
        if resp.status == 404:
            break
        await asyncio.sleep(0.1)
    assert resp.status == 404
    assert error_codes(await resp.json()) == ["BLOB_UPLOAD_UNKNOWN"]
    # a live session is left alone when younger than max_age
    reg2 = await make_registry(settings_for_tests(tmp_path / "other",
                                                  uploads=UploadsSettings(max_age=3600, purge_interval=1)))
    location = await start(reg2, "purge/me")
    await asyncio.sleep(2.5)
    assert (await reg2.get(location)).status == 204


@pytest.mark.filesystem_only("plants a crashed write's hidden files under the root")
async def test_purge_pass_removes_leftovers_of_interrupted_writes(make_registry, tmp_path):
    """A crash mid-write leaves a hidden file or staging tree in storage; the
    purge pass reclaims it once it is an hour old."""
    import asyncio
    import time

    from registry.settings import UploadsSettings
    from storage.filesystem import TEMP_PREFIX

    reg = await make_registry(uploads=UploadsSettings(max_age=3600, purge_interval=1))
    await reg.push_blob("left/over", b"the repository exists")
    leftover = tmp_path / "storage" / f"{TEMP_PREFIX}99-crashed"
    leftover.mkdir(parents=True)
    (leftover / "link").write_bytes(b"sha256:00")
    hour_ago = time.time() - 3700
    os.utime(leftover, (hour_ago, hour_ago))
    for _ in range(60):                   # the first pass comes within one interval
        if not leftover.exists():
            break
        await asyncio.sleep(0.1)
    assert not leftover.exists()


async def test_absolute_locations_follow_forwarded_headers(make_registry):
    from registry.settings import HttpSettings

    reg = await make_registry(http=HttpSettings(relative_urls=False))
    resp = await reg.post("/v2/fwd/blobs/uploads/", headers={
        "X-Forwarded-Proto": "https", "X-Forwarded-Host": "registry.example:8443"})
    assert resp.status == 202
    assert resp.headers["Location"].startswith("https://registry.example:8443/v2/fwd/blobs/uploads/")
