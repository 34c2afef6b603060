"""Prometheus /metrics on real `dockyard serve` processes: requests by
route, method and status add up across --workers, bytes in and out, storage
operations, token issuance and auth failures, the separate metrics.addr
listener and its bearer secret."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import pytest

from registry.ops import metrics
from registry.ops.metrics import InstrumentedDriver
from storage.driver import PathNotFound, StorageError
from storage.filesystem import FilesystemDriver
from tests.support.auth import USERS, basic, write_htpasswd
from tests.support.content import sha256_digest
from tests.support.launch import free_port
from tests.support.registry_http import http_request, push_blob

MANIFEST_ROUTE = "/v2/{name}/manifests/{reference}"
BLOB_ROUTE = "/v2/{name}/blobs/{digest}"


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """{(name, {label: value}): value} of a text exposition."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        assert match, line
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        out[(match.group(1), labels)] = float(match.group(3))
    return out


def value(figures, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in figures.items() if n == name and want <= set(ls))


def scrape(url: str, headers=None) -> dict:
    answer = http_request("GET", f"{url}/metrics", headers=headers)
    assert answer.status == 200, answer.body
    assert answer.headers["Content-Type"].startswith("text/plain")
    return parse(answer.body.decode())


@pytest.mark.timeout(120)
def test_two_workers_add_up(start_dockyard, tmp_path):
    figures_dir = tmp_path / "figures"
    server = start_dockyard(tmp_path / "storage", workers=2,
                            env={"PROMETHEUS_MULTIPROC_DIR": str(figures_dir)})
    data = os.urandom(200_000)
    digest = push_blob(server.url, "m/app", data)
    before = scrape(server.url)
    gets = 60
    start = time.monotonic()
    for _ in range(gets):               # a new connection each: the kernel spreads them
        assert http_request("GET", f"{server.url}/v2/m/app/blobs/{digest}").status == 200
        assert http_request("GET", f"{server.url}/v2/m/app/manifests/absent").status == 404
        assert time.monotonic() - start < 60
    after = scrape(server.url)
    # both workers served (each keeps a file of its own figures)
    writers = {p.stem.rsplit("_", 1)[1] for p in figures_dir.glob("histogram_*.db")}
    assert len(writers) == 2, sorted(p.name for p in figures_dir.iterdir())

    count = "dockyard_http_request_duration_seconds_count"
    assert value(after, count, route=BLOB_ROUTE, method="GET", status="200") \
        - value(before, count, route=BLOB_ROUTE, method="GET", status="200") == gets
    assert value(after, count, route=MANIFEST_ROUTE, method="GET", status="404") \
        - value(before, count, route=MANIFEST_ROUTE, method="GET", status="404") == gets
    sent = value(after, "dockyard_http_response_bytes_total", route=BLOB_ROUTE, method="GET") \
        - value(before, "dockyard_http_response_bytes_total", route=BLOB_ROUTE, method="GET")
    assert sent == gets * len(data)
    assert value(after, "dockyard_http_request_bytes_total", method="PUT") >= len(data)
    # latency buckets are cumulative and end with every request
    inf = value(after, "dockyard_http_request_duration_seconds_bucket", route=BLOB_ROUTE, le="+Inf")
    assert inf == value(after, count, route=BLOB_ROUTE)
    # storage operations were timed, by driver and operation
    assert value(after, "dockyard_storage_operation_duration_seconds_count", driver="filesystem",
                 operation="move") >= 1
    assert value(after, "dockyard_http_requests_in_flight") == 1     # this scrape


@pytest.mark.timeout(60)
def test_auth_failures_and_issued_tokens(start_dockyard, tmp_path):
    users = write_htpasswd(tmp_path / "htpasswd", USERS)
    server = start_dockyard(tmp_path / "storage", extra_args=("--auth", "token", "--htpasswd", str(users)))
    before = scrape(server.url)
    token_url = f"{server.url}/auth/token?service=dockyard&scope=repository:a/b:pull"
    assert http_request("GET", token_url, headers={"Authorization": basic("reader", USERS["reader"])}).status == 200
    assert http_request("GET", token_url, headers={"Authorization": basic("reader", "wrong")}).status == 401
    assert http_request("GET", f"{server.url}/v2/").status == 401        # a challenge, no failure
    assert http_request("GET", f"{server.url}/v2/", headers={"Authorization": "Bearer forged"}).status == 401
    after = scrape(server.url)
    assert value(after, "dockyard_auth_tokens_issued_total") - value(before, "dockyard_auth_tokens_issued_total") == 1
    assert value(after, "dockyard_auth_failures_total", status="401") \
        - value(before, "dockyard_auth_failures_total", status="401") == 2


@pytest.mark.timeout(60)
def test_metrics_addr_and_bearer_secret(start_dockyard, tmp_path):
    secret = tmp_path / "metrics-secret"
    secret.write_text("scrape-me-7f3a\n")
    ops_port = free_port()
    server = start_dockyard(tmp_path / "storage", config={
        "storage": {"root": str(tmp_path / "storage")},
        "metrics": {"addr": f"127.0.0.1:{ops_port}", "token_file": str(secret)}})
    ops = f"http://127.0.0.1:{ops_port}"
    assert http_request("GET", f"{server.url}/metrics").status == 404      # not on the public port
    refused = http_request("GET", f"{ops}/metrics")
    assert refused.status == 401 and "Bearer" in refused.headers["WWW-Authenticate"]
    assert http_request("GET", f"{ops}/metrics", headers={"Authorization": "Bearer wrong"}).status == 401
    assert http_request("GET", f"{ops}/readyz").status == 200
    assert http_request("GET", f"{server.url}/readyz").status == 200
    figures = scrape(ops, headers={"Authorization": "Bearer scrape-me-7f3a"})
    # the public port's requests are counted; the metrics listener's own are not
    assert value(figures, "dockyard_http_request_duration_seconds_count", route="/readyz") == 1


def test_metrics_can_be_switched_off(start_dockyard, tmp_path):
    server = start_dockyard(tmp_path / "storage", env={"DOCKYARD_METRICS_ENABLED": "false"})
    assert http_request("GET", f"{server.url}/metrics").status == 404
    assert http_request("GET", f"{server.url}/healthz").status == 200


def test_storage_errors_count_failures_not_absent_paths(tmp_path):
    """A real filesystem driver under the wrapper: a write into a path that is
    a file fails and counts; a read of an absent path is an answer, not an error."""
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    driver = InstrumentedDriver(FilesystemDriver(str(tmp_path)))
    errors = metrics.STORAGE_ERRORS.labels("filesystem", "move")
    misses = metrics.STORAGE_ERRORS.labels("filesystem", "get_content")
    calls = metrics.STORAGE_DURATION.labels("filesystem", "get_content")

    async def run() -> None:
        failed, missed, timed = errors._value.get(), misses._value.get(), _count_of(calls)
        with pytest.raises(StorageError):
            await driver.move("/dir", "/dir/sub/inside")     # into itself: EINVAL
        with pytest.raises(PathNotFound):
            await driver.get_content("/absent")
        await driver.put_content("/present", b"y")
        assert await driver.get_content("/present") == b"y"
        assert errors._value.get() == failed + 1
        assert misses._value.get() == missed
        assert _count_of(calls) == timed + 2
        await driver.close()

    asyncio.run(run())


def _count_of(histogram_child) -> float:
    return sum(bucket.get() for bucket in histogram_child._buckets)  # noqa: SLF001
