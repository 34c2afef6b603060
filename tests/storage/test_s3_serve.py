"""What the S3 driver offers a running registry, on every registered S3
endpoint: presigned URLs, the start-up check (one line naming the problem,
exit 2 from `dockyard serve`), `dockyard serve` pushing, pulling and
redirecting on S3, and one-line storage errors that carry no secret.

moto checks no signatures: what these tests prove about presigned URLs
and credentials, only the Ceph run proves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from storage.config import MIB, StorageConfigError
from storage.driver import PathNotFound, StorageError
from storage.s3 import S3Driver
from tests.storage.s3_fixtures import driver, kind, requires_s3, space, target  # noqa: F401 (fixtures)
from tests.support.content import sha256_digest
from tests.support.s3 import serve_env

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = requires_s3


# ---- direct access ----------------------------------------------------------------

async def test_presigned_url_fetch_returns_the_bytes(driver):
    """moto accepts any signature, so this proves the URL names the object
    and carries SigV4 query parameters; the Ceph run proves the signature."""
    payload = os.urandom(100_000)
    await driver.put_content("/blob/data", payload)
    url = await driver.url_for("/blob/data", expires_in=300)
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=300" in url
    assert "dockyard-test-secret" not in url

    def fetch(url: str, method: str = "GET") -> tuple[int, bytes, dict]:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=30) as resp:
            return resp.status, resp.read(), dict(resp.headers)

    status, body, _ = await asyncio.to_thread(fetch, url)
    assert (status, body) == (200, payload)
    default = await driver.url_for("/blob/data")
    assert f"X-Amz-Expires={driver.settings.presign_expires}" in default
    status, _, headers = await asyncio.to_thread(fetch, await driver.url_for("/blob/data", "HEAD"), "HEAD")
    assert status == 200 and int(headers["Content-Length"]) == len(payload)
    assert await driver.url_for("/blob/data", "PUT") is None
    assert await driver.open_local("/blob/data") is None


# ---- the start-up check -------------------------------------------------------------

async def test_start_up_check_names_the_problem_in_one_line(driver, target, space):
    await driver.check()                                    # the bucket is there
    base = target.settings(space.prefix)
    missing = S3Driver(dataclasses.replace(base, bucket="no-such-bucket-dockyard"))
    with pytest.raises(StorageConfigError, match=r"storage\.s3\.bucket: no bucket 'no-such-bucket-dockyard'"):
        await missing.check()
    await missing.close()
    unreachable = S3Driver(dataclasses.replace(base, endpoint_url="http://127.0.0.1:9"))
    started = time.monotonic()
    with pytest.raises(StorageConfigError, match=r"storage\.s3\.endpoint_url: cannot reach http://127\.0\.0\.1:9"):
        await unreachable.check()
    assert time.monotonic() - started < 30
    await unreachable.close()


async def test_encryption_the_endpoint_refuses_stops_start_up_in_one_line(target, space):
    """SSE AES256 where the endpoint refuses it (Ceph RGW 16.2 over plain
    HTTP: 400 InvalidRequest) fails the start-up check with one line naming
    storage.s3.sse, and a driver that skipped the check gets a StorageError
    (a 500 with an OCI body in the registry), not a crash. Where it is
    accepted (moto) the check passes and its probe object is gone again."""
    encrypted = S3Driver(dataclasses.replace(target.settings(space.prefix), sse="AES256"))
    try:
        if target.accepts_sse:
            await encrypted.check()
            await encrypted.put_content("/e/link", b"x")
            assert (await encrypted.get_content("/e/link")) == b"x"
            await encrypted.delete("/e")
            return
        with pytest.raises(StorageConfigError) as refused:
            await encrypted.check()
        line = str(refused.value)
        assert line.startswith("storage.s3.sse: ") and "AES256" in line and "InvalidRequest" in line, line
        assert "\n" not in line and target.secret_key not in line
        with pytest.raises(StorageError, match="InvalidRequest") as failed:
            await encrypted.put_content("/e/link", b"x")
        assert "\n" not in str(failed.value)
    finally:
        await encrypted.close()


def test_serve_refuses_to_start_on_a_missing_bucket_in_one_line(target, space, tmp_path):
    env = serve_env(target.settings(space.prefix), DOCKYARD_STORAGE_S3_BUCKET="no-such-bucket-dockyard")
    env["DOCKYARD_STORAGE_ROOT"] = str(tmp_path / "root")      # (--storage would mean the filesystem)
    done = subprocess.run([sys.executable, "-m", "puller", "serve", "--host", "127.0.0.1", "--port", "0"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert lines[-1].startswith("dockyard serve: storage.s3.bucket: no bucket 'no-such-bucket-dockyard'"), lines
    assert "Traceback" not in done.stderr and "dockyard-test-secret" not in done.stderr


def test_serve_on_s3_pushes_pulls_and_redirects_to_a_presigned_url(target, space, tmp_path):
    """`dockyard serve` configured through the environment: a blob pushed in
    two chunks is served back, and with storage.redirect a GET answers 307
    to a presigned URL that gives the bytes (HEAD never redirects)."""
    from tests.support.launch import launch_dockyard

    blob = os.urandom(6 * MIB + 7)
    digest = sha256_digest(blob)
    for redirect in ("false", "true"):
        env = serve_env(target.settings(space.prefix), DOCKYARD_STORAGE_REDIRECT=redirect)
        server = launch_dockyard(config={"storage": {"root": str(tmp_path / f"root-{redirect}")}}, env=env,
                                 log_path=tmp_path / f"log-{redirect}")
        try:
            base = server.url

            def request(method: str, url: str, data: bytes | None = None, headers: dict | None = None):
                req = urllib.request.Request(url if url.startswith("http") else base + url, data=data,
                                             method=method, headers=headers or {})

                class NoRedirect(urllib.request.HTTPRedirectHandler):
                    def redirect_request(self, *args, **kwargs):
                        return None

                try:
                    with urllib.request.build_opener(NoRedirect).open(req, timeout=60) as resp:
                        return resp.status, dict(resp.headers), resp.read()
                except urllib.error.HTTPError as err:
                    return err.code, dict(err.headers), err.read()

            if redirect == "false":
                status, headers, _ = request("POST", "/v2/s3/serve/blobs/uploads/")
                assert status == 202, status
                location = headers["Location"]
                half = len(blob) // 2
                status, headers, _ = request("PATCH", location, blob[:half], {
                    "Content-Type": "application/octet-stream", "Content-Range": f"0-{half - 1}"})
                assert status == 202
                location = headers["Location"]
                sep = "&" if "?" in location else "?"
                status, _, _ = request("PUT", f"{location}{sep}digest={digest}", blob[half:], {
                    "Content-Type": "application/octet-stream", "Content-Range": f"{half}-{len(blob) - 1}"})
                assert status == 201
                status, _, body = request("GET", f"/v2/s3/serve/blobs/{digest}")
                assert (status, body) == (200, blob)
            else:
                status, headers, _ = request("GET", f"/v2/s3/serve/blobs/{digest}")
                assert status == 307, status
                status, _, body = request("GET", headers["Location"])   # from S3, not the registry
                assert (status, body) == (200, blob)
                status, headers, _ = request("HEAD", f"/v2/s3/serve/blobs/{digest}")
                assert status == 200 and int(headers["Content-Length"]) == len(blob)
        finally:
            server.stop()


async def test_backend_errors_are_one_line_storage_errors_without_secrets(target, space):
    """NoSuchKey is PathNotFound; a missing bucket, an unreachable endpoint,
    any other answer a StorageError of one line naming the path, with
    neither key nor secret in it (`raise ... from` keeps the botocore error)."""
    from storage.driver import StorageError
    from storage.s3.client import client_config, make_client

    base = target.settings(space.prefix)
    missing = S3Driver(dataclasses.replace(base, bucket="no-such-bucket-dockyard"))
    down = dataclasses.replace(base, endpoint_url="http://user:pw@127.0.0.1:9")
    unreachable = S3Driver(down, client=make_client(down, client_config(down, attempts=1, connect_timeout=2)))
    try:
        for driver, expected in ((missing, "S3 bucket 'no-such-bucket-dockyard' does not exist"),
                                 (unreachable, "S3 endpoint did not answer get_object of /a/b")):
            with pytest.raises(StorageError) as err:
                await driver.get_content("/a/b")
            message = str(err.value)
            assert not isinstance(err.value, PathNotFound)
            assert expected in message and "\n" not in message and err.value.__cause__ is not None
            for secret in (base.secret_access_key, base.access_key_id, "pw"):
                assert secret not in message
        assert "pw" not in str(await _check_message(unreachable))
    finally:
        await missing.close()
        await unreachable.close()


async def _check_message(driver) -> str:
    with pytest.raises(StorageConfigError) as err:
        await driver.check()
    return str(err.value)
