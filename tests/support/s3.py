"""S3 endpoints as registered storage drivers (tests.support.drivers).

`register_s3(name, endpoint, access_key, secret_key, bucket, region)` adds
any S3 endpoint and bucket to every storage test: each test's space is a
random key prefix in the bucket, its driver an `S3Driver` over that prefix,
its cleanup deletes through the driver (which aborts the multipart uploads
its files own) and then every key left under the prefix, and what is
`stored` there is every key under the prefix, hidden ones included, AND
every multipart upload in progress under it, so an upload the driver lost
track of fails the test as a leftover.

`endpoint` may be a URL or a callable returning one, so a server is only
started when a test first uses it; the bucket is created then if missing.

`moto_endpoint()` is such a callable: moto's S3 server (moto[server] from
the venv, its S3 backend served directly) on 127.0.0.1 and a free port,
started once for the test session and stopped when it ends. moto checks no signatures at all and ignores some
conditions (see tests/storage/test_s3_driver.py); a real S3 (Ceph RGW)
registers the same way.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from storage.config import MIB, S3Settings
from storage.driver import PathNotFound

Endpoint = str | Callable[[], str]


class S3Target:
    """One endpoint and bucket: settings, a raw client, and the three
    callables a driver registration needs."""

    def __init__(self, endpoint: Endpoint, access_key: str, secret_key: str, bucket: str, region: str,
                 part_size: int = 5 * MIB, accepts_sse: bool = True, **driver_options):
        self._endpoint = endpoint
        # whether the endpoint stores objects with SSE AES256 as the tests reach it
        self.accepts_sse = accepts_sse
        self.access_key, self.secret_key = access_key, secret_key
        self.bucket, self.region = bucket, region
        self.part_size = part_size
        self.driver_options = driver_options
        self._lock = threading.Lock()
        self._ready_endpoint: str | None = None
        self._client = None

    @property
    def endpoint(self) -> str:
        """The endpoint URL, the server started and the bucket made on first use."""
        with self._lock:
            if self._ready_endpoint is None:
                url = self._endpoint() if callable(self._endpoint) else self._endpoint
                client = self._make_client(url)
                try:
                    client.head_bucket(Bucket=self.bucket)
                except Exception:
                    client.create_bucket(Bucket=self.bucket)
                self._client, self._ready_endpoint = client, url
            return self._ready_endpoint

    def _make_client(self, url: str):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=url, region_name=self.region, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, signature_version="s3v4", max_pool_connections=16,
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"))

    @property
    def client(self):
        """A boto3 client of its own (not a driver's): what the tests look with."""
        self.endpoint
        return self._client

    def settings(self, prefix: str, **overrides) -> S3Settings:
        values = dict(bucket=self.bucket, region=self.region, endpoint_url=self.endpoint, prefix=prefix,
                      access_key_id=self.access_key, secret_access_key=self.secret_key,
                      part_size=self.part_size, addressing_style="path")
        values.update(overrides)
        return S3Settings(**values)

    def driver(self, prefix: str, **options):
        from storage.s3 import S3Driver

        return S3Driver(self.settings(prefix), **{**self.driver_options, **options})

    # ---- the registration's callables ------------------------------------------
    def factory(self, prefix: str, scratch: Path):
        return self.driver(prefix)

    async def cleanup(self, prefix: str, scratch: Path) -> None:
        driver = self.driver(prefix)
        try:
            try:
                children = await driver.list("/")
            except PathNotFound:
                children = []
            for child in children:
                try:
                    await driver.delete(child)
                except PathNotFound:
                    pass
        finally:
            await driver.close()
        await asyncio.to_thread(self._delete_keys, prefix)

    def _delete_keys(self, prefix: str) -> None:
        keys = self.keys(prefix)
        for start in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": k} for k in keys[start:start + 1000]], "Quiet": True})

    async def stored(self, prefix: str, scratch: Path) -> list[str]:
        return await asyncio.to_thread(self._stored, prefix)

    def _stored(self, prefix: str) -> list[str]:
        root = prefix.strip("/") + "/"
        out = ["/" + k[len(root):] for k in self.keys(prefix)]
        out += [f"/{u['Key'][len(root):]} (multipart upload {u['UploadId'][:12]}... in progress)"
                for u in self.uploads(prefix)]
        return out

    def keys(self, prefix: str) -> list[str]:
        """Every key under the space's prefix, hidden ones included."""
        root = prefix.strip("/") + "/"
        keys, token = [], None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": root}
            if token:
                kwargs["ContinuationToken"] = token
            response = self.client.list_objects_v2(**kwargs)
            keys += [o["Key"] for o in response.get("Contents", ())]
            if not response.get("IsTruncated"):
                return keys
            token = response["NextContinuationToken"]

    def uploads(self, prefix: str) -> list[dict]:
        """Every multipart upload in progress under the space's prefix."""
        root = prefix.strip("/") + "/"
        out, kwargs = [], {"Bucket": self.bucket, "Prefix": root}
        while True:
            response = self.client.list_multipart_uploads(**kwargs)
            out += response.get("Uploads", [])
            if not response.get("IsTruncated"):
                return out
            kwargs.update(KeyMarker=response["NextKeyMarker"], UploadIdMarker=response["NextUploadIdMarker"])


_TARGETS: dict[str, S3Target] = {}


def register_s3(name: str, endpoint: Endpoint, access_key: str, secret_key: str, bucket: str, region: str,
                **options) -> S3Target:
    """Register an S3 endpoint and bucket as storage driver `name` (see the
    module docstring); options: part_size, accepts_sse (False: the endpoint
    refuses SSE AES256 over the tests' plain HTTP), and S3Driver keyword
    arguments."""
    from tests.support.drivers import register_driver    # which imports this module to register s3-moto

    target = S3Target(endpoint, access_key, secret_key, bucket, region, **options)
    register_driver(name, target.factory, target.cleanup, stored=target.stored)
    _TARGETS[name] = target
    return target


def s3_target(name: str) -> S3Target:
    """The endpoint and bucket registered as `name`."""
    return _TARGETS[name]


# ---- moto ---------------------------------------------------------------------------

_MOTO: dict[str, object] = {}
_MOTO_LOCK = threading.Lock()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# moto's S3 backend served on its own: moto_server's dispatcher looks up the
# service of every request among all of moto's (a third of its time per
# request), and werkzeug's HTTP/1.0 handler closes every connection.
_MOTO_SERVER = """
import logging, sys
from werkzeug.serving import WSGIRequestHandler, run_simple
from moto.moto_server.werkzeug_app import create_backend_app

class KeepAlive(WSGIRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_request(self, *args, **kwargs):
        pass

logging.getLogger("werkzeug").setLevel(logging.ERROR)
run_simple("127.0.0.1", int(sys.argv[1]), create_backend_app("s3"), threaded=True, request_handler=KeepAlive)
"""


def moto_endpoint() -> str:
    """The URL of this test session's moto S3 server, started on first call."""
    with _MOTO_LOCK:
        if "url" not in _MOTO:
            port = _free_port()
            log = tempfile.NamedTemporaryFile(prefix="dockyard-moto-", suffix=".log", delete=False)
            proc = subprocess.Popen([sys.executable, "-c", _MOTO_SERVER, str(port)], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONWARNINGS": "ignore"})
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(url, timeout=1).close()     # ListBuckets
                    break
                except urllib.error.HTTPError:
                    break                                             # answering
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        proc.kill()
                        raise RuntimeError(f"the moto S3 server did not start (log: {log.name})") from None
                    time.sleep(0.05)
            _MOTO.update(url=url, proc=proc, log=log.name)
            atexit.register(_stop_moto)
        return str(_MOTO["url"])


def _stop_moto() -> None:
    proc = _MOTO.get("proc")
    if isinstance(proc, subprocess.Popen) and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
    log = _MOTO.get("log")
    if isinstance(log, str):
        try:
            os.unlink(log)
        except OSError:
            pass
