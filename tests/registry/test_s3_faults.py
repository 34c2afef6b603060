"""Faults of the S3 backend, each on a private Ceph RADOS Gateway (so it
may be stopped) under a registry over real HTTP:

- the endpoint stops in the middle of an upload: the client gets a 5xx
  with an OCI error body, the registry keeps answering other requests,
  nothing half-written becomes visible, and the upload succeeds once S3
  is back;
- a connection carrying a part upload is reset once (a loopback proxy,
  tests.support.faultproxy): the part is sent again and the blob is whole;
- a digest mismatch aborts the multipart upload and leaves nothing;
- a `dockyard serve` killed with SIGKILL mid-upload leaves a session
  another process on the bucket finishes, and a monolithic upload it was
  streaming leaves only a multipart upload the purge pass aborts.

Distribution spec sections: "Pushing blobs" (monolithic POST ?digest=,
POST then PUT, chunked PATCH with Content-Range, GET of the session for its
offset) and "Error codes" (every error answer carries an errors body).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import time

import pytest

from registry.app import create_app
from registry.settings import settings_for_tests
from storage import layout
from storage.config import MIB, S3Settings
from storage.s3 import S3Driver
from storage.s3.client import client_config, make_client
from storage.store import ContentStore
from tests.registry.regapi import Registry, digest_of, error_codes
from tests.support.ceph import ACCESS_KEY, REGION, SECRET_KEY, CephS3, start_ceph_s3
from tests.support.faultproxy import FaultProxy
from tests.support.launch import launch_dockyard
from tests.support.s3 import serve_env

OCTET = {"Content-Type": "application/octet-stream"}
BUCKET = "faults"
ANSWER_WITHIN = 30.0          # seconds any request may take while S3 is away (two attempts of 4 s and backoff: about 10-15)


@pytest.fixture(scope="module")
def ceph(tmp_path_factory) -> CephS3:
    """A cluster of this module's own: pausing the session's would fail others."""
    cluster = start_ceph_s3(tmp_path_factory.mktemp("ceph-faults"), buckets=[BUCKET])
    yield cluster
    cluster.stop()


@pytest.fixture
def settings(ceph, request) -> S3Settings:
    return S3Settings(bucket=BUCKET, region=REGION, endpoint_url=ceph.endpoint,
                      prefix=f"{request.node.name[:40]}-{os.urandom(3).hex()}", access_key_id=ACCESS_KEY,
                      secret_access_key=SECRET_KEY, part_size=5 * MIB, addressing_style="path")


def quick_driver(settings: S3Settings) -> S3Driver:
    """The driver with its own client made to give up within seconds (two
    attempts, short timeouts) instead of the minute a production default
    waits: the faults are the point here, not patience."""
    config = client_config(settings, attempts=2, connect_timeout=2, read_timeout=4)
    return S3Driver(settings, client=make_client(settings, config), lock_lease=2.0)


@pytest.fixture
async def make_registry(aiohttp_client, tmp_path):
    drivers = []

    async def make(settings: S3Settings) -> Registry:
        driver = quick_driver(settings)
        drivers.append(driver)
        app = create_app(settings_for_tests(tmp_path / "unused"), driver=driver)
        return Registry(await aiohttp_client(app))

    yield make
    for driver in drivers:
        await driver.close()


def uploads(ceph: CephS3, settings: S3Settings) -> list[dict]:
    return ceph.client().list_multipart_uploads(Bucket=BUCKET, Prefix=settings.key_prefix).get("Uploads", [])


def parts(ceph: CephS3, upload: dict) -> int:
    return len(ceph.client().list_parts(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])
               .get("Parts", []))


def keys(ceph: CephS3, settings: S3Settings) -> list[str]:
    response = ceph.client().list_objects_v2(Bucket=BUCKET, Prefix=settings.key_prefix)
    return [o["Key"] for o in response.get("Contents", [])]


async def timed(coro) -> tuple[float, object]:
    started = time.monotonic()
    result = await coro
    return time.monotonic() - started, result


async def assert_oci_error(resp, statuses=range(500, 600)) -> None:
    assert resp.status in statuses, (resp.status, await resp.text())
    assert error_codes(await resp.json()), "an error answer without an OCI errors body"


@pytest.mark.parametrize("how", ["freeze", "down"])
async def test_s3_stopping_mid_upload_is_a_5xx_and_the_upload_resumes_once_it_is_back(
        ceph, settings, make_registry, how):
    registry = await make_registry(settings)
    manifest_digest, _ = await registry.push_image("faults/served", layers=[b"a small layer"])
    blob = os.urandom(12 * MIB)
    digest = digest_of(blob)
    resp = await registry.post("/v2/faults/up/blobs/uploads/")
    assert resp.status == 202
    location = resp.headers["Location"]
    first = 6 * MIB
    resp = await registry.patch(location, data=blob[:first], headers={**OCTET, "Content-Range": f"0-{first - 1}"})
    assert resp.status == 202
    location = resp.headers["Location"]

    ceph.pause(how)
    try:
        # The next chunk and, at the same time, other requests: each answers
        # within seconds (5xx with an OCI body, or what needs no S3).
        async def chunk():
            return await registry.patch(location, data=blob[first:], headers={
                **OCTET, "Content-Range": f"{first}-{len(blob) - 1}"})

        async def base():
            return await registry.get("/v2/")

        async def manifest():
            return await registry.get(f"/v2/faults/served/manifests/{manifest_digest}")

        (t_chunk, r_chunk), (t_base, r_base), (t_manifest, r_manifest) = await asyncio.gather(
            timed(chunk()), timed(base()), timed(manifest()))
        await assert_oci_error(r_chunk)
        assert r_base.status == 200 and t_base < 3, (r_base.status, t_base)
        if r_manifest.status != 200:
            await assert_oci_error(r_manifest)
        assert max(t_chunk, t_manifest) < ANSWER_WITHIN, (t_chunk, t_manifest)
        resp = await registry.put(location, params={"digest": digest})
        await assert_oci_error(resp)
    finally:
        ceph.resume()

    # Nothing of the failed chunk or commit is visible; the session is where it was.
    assert (await registry.head(f"/v2/faults/up/blobs/{digest}")).status == 404
    resp = await registry.get(location)
    assert resp.status == 204 and resp.headers["Range"] == f"0-{first - 1}"
    deadline = time.monotonic() + ANSWER_WITHIN
    while True:
        # A lock PUT the frozen gateway received but answered too late may
        # still hold the session for its lease (2 s): a client retries.
        resp = await registry.patch(location, data=blob[first:], headers={
            **OCTET, "Content-Range": f"{first}-{len(blob) - 1}"})
        if resp.status == 202 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert resp.status == 202, await resp.text()
    resp = await registry.put(resp.headers["Location"], params={"digest": digest})
    assert resp.status == 201, await resp.text()
    resp = await registry.get(f"/v2/faults/up/blobs/{digest}")
    assert resp.status == 200 and await resp.read() == blob
    assert uploads(ceph, settings) == []


async def test_a_part_upload_cut_once_is_sent_again(ceph, settings, make_registry):
    """The connection carrying a part is reset after 1 MiB of it, once: the
    client's retries send the part again and the blob is whole."""
    with FaultProxy(("127.0.0.1", ceph.port)) as proxy:
        registry = await make_registry(dataclasses.replace(settings, endpoint_url=proxy.url))
        blob = os.urandom(11 * MIB)
        proxy.cut_once(after=1 * MIB)
        resp = await registry.post("/v2/faults/retried/blobs/uploads/", params={"digest": digest_of(blob)},
                                   data=blob, headers=OCTET)
        assert resp.status == 201, await resp.text()
        assert proxy.cuts == 1
    # (the proxy is closed now: the bytes are read back on the gateway itself)
    key = settings.key_prefix + layout.blob_data(digest_of(blob))[1:]
    assert ceph.client().get_object(Bucket=BUCKET, Key=key)["Body"].read() == blob
    assert uploads(ceph, settings) == []


async def test_a_digest_mismatch_aborts_the_multipart_upload_and_leaves_nothing(ceph, settings, make_registry):
    registry = await make_registry(settings)
    blob = os.urandom(12 * MIB)
    wrong = digest_of(b"not these bytes")
    # Monolithic: the upload at the blob's key is aborted at once.
    resp = await registry.post("/v2/faults/wrong/blobs/uploads/", params={"digest": wrong}, data=blob,
                               headers=OCTET)
    assert resp.status == 400 and error_codes(await resp.json()) == ["DIGEST_INVALID"]
    assert uploads(ceph, settings) == []
    # Chunked: the session stays open for the client (the spec lets it
    # retry the PUT); cancelling it aborts its multipart upload.
    resp = await registry.post("/v2/faults/wrong/blobs/uploads/")
    location = resp.headers["Location"]
    resp = await registry.patch(location, data=blob, headers=OCTET)
    assert resp.status == 202
    resp = await registry.put(resp.headers["Location"], params={"digest": wrong})
    assert resp.status == 400 and error_codes(await resp.json()) == ["DIGEST_INVALID"]
    for digest in (wrong, digest_of(blob)):
        assert (await registry.head(f"/v2/faults/wrong/blobs/{digest}")).status == 404
    assert (await registry.delete(location)).status == 204
    assert uploads(ceph, settings) == []
    assert not [k for k in keys(ceph, settings) if "/blobs/" in k and "/_uploads/" not in k]


def _stream_then_hang(port: int, request_line: str, headers: dict[str, str], body: bytes) -> socket.socket:
    """Send a request whose body stops after `body` (the rest never comes)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = request_line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock.sendall(head.encode() + body)
    return sock


async def test_a_server_killed_mid_upload_leaves_a_session_another_finishes_or_the_purge_removes(
        ceph, settings, make_registry, tmp_path):
    server = launch_dockyard(config={"storage": {"root": str(tmp_path / "root")}}, env=serve_env(settings),
                             log_path=tmp_path / "killed.log")
    other = await make_registry(settings)
    try:
        head, tail = os.urandom(6 * MIB), os.urandom(7 * MIB)
        resp = await other.post("/v2/faults/killed/blobs/uploads/")
        location = resp.headers["Location"]
        resp = await other.patch(location, data=head, headers={**OCTET, "Content-Range": f"0-{len(head) - 1}"})
        assert resp.status == 202
        port = int(server.host.rsplit(":", 1)[1])
        path = resp.headers["Location"]
        # The killed server was streaming a chunk into the session and a
        # monolithic blob: 11 MiB of each reached it (two parts sent).
        total = 20 * MIB
        chunk = _stream_then_hang(port, f"PATCH {path} HTTP/1.1", {
            "Host": server.host, **OCTET, "Content-Length": str(total),
            "Content-Range": f"{len(head)}-{len(head) + total - 1}"}, os.urandom(11 * MIB))
        mono_digest = digest_of(b"never all sent")
        mono = _stream_then_hang(port, f"POST /v2/faults/killed/blobs/uploads/?digest={mono_digest} HTTP/1.1", {
            "Host": server.host, **OCTET, "Content-Length": str(total)}, os.urandom(11 * MIB))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # the session's upload with parts of the chunk, the monolithic blob's with one
            counts = sorted(parts(ceph, u) for u in uploads(ceph, settings))
            if len(counts) == 2 and counts[0] >= 1 and counts[1] >= 2:
                break
            await asyncio.sleep(0.2)
        assert len(counts) == 2 and counts[0] >= 1 and counts[1] >= 2, counts
        os.killpg(server.server.pid, signal.SIGKILL)          # the server and its workers
        server.server.proc.wait(10)
        chunk.close()
        mono.close()

        # The session holds what was committed before; its lock is taken over
        # once the dead server's lease runs out; another process finishes it.
        resp = await other.get(location)
        assert resp.status == 204 and resp.headers["Range"] == f"0-{len(head) - 1}"
        deadline = time.monotonic() + 30
        while True:
            resp = await other.patch(location, data=tail, headers={
                **OCTET, "Content-Range": f"{len(head)}-{len(head) + len(tail) - 1}"})
            if resp.status == 202 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)      # the dead server's lock still held (409 / 400)
        assert resp.status == 202, await resp.text()
        digest = digest_of(head + tail)
        resp = await other.put(resp.headers["Location"], params={"digest": digest})
        assert resp.status == 201, await resp.text()
        resp = await other.get(f"/v2/faults/killed/blobs/{digest}")
        assert await resp.read() == head + tail
        # Left: the monolithic blob's upload, which no file names and which
        # the purge pass aborts (what it calls, with the age threshold passed).
        left = uploads(ceph, settings)
        assert [u["Key"].rsplit("/", 2)[-2] for u in left] == [mono_digest[7:]], left
        store = ContentStore(quick_driver(settings))
        try:
            assert await store.reclaim_leftovers(time.time() + 60) >= 1
        finally:
            await store.close()
        assert uploads(ceph, settings) == []
        assert (await other.head(f"/v2/faults/killed/blobs/{mono_digest}")).status == 404
    finally:
        server.stop()
