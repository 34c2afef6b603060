"""/healthz, /readyz and the start-up storage probe, on real `dockyard serve`
processes. Kubernetes probes: a liveness probe restarts a process that does
not answer, a readiness probe takes a replica out of its Service while it
answers anything but 2xx."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from tests.support import REPO_ROOT
from tests.support.launch import dockyard_command, free_port
from tests.support.registry_http import http_request, push_blob

HEALTH_DIR = ("docker", "registry", "v2", "_dockyard", "health")
PROBE_CACHE = 3.0     # registry.ops.health.PROBE_CACHE


def _serve(*args: str, env=None, timeout: float = 30) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([*dockyard_command(), "serve", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})})


@pytest.mark.timeout(90)
def test_readyz_follows_storage_and_healthz_does_not(start_dockyard, tmp_path):
    server = start_dockyard(tmp_path / "storage")
    health = server.storage.joinpath(*HEALTH_DIR)
    assert http_request("GET", f"{server.url}/healthz").status == 200
    ready = http_request("GET", f"{server.url}/readyz")
    assert ready.status == 200 and ready.json() == {"status": "ready"}
    assert ready.headers["Cache-Control"] == "no-store"
    assert list(health.iterdir()) == [], "the probe left its file behind"

    # storage stops being writable: a file where the probe's directory goes
    shutil.rmtree(health)
    health.write_bytes(b"in the way")
    deadline = time.monotonic() + PROBE_CACHE + 10
    while True:
        answer = http_request("GET", f"{server.url}/readyz")
        if answer.status != 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert answer.status == 503, "readiness did not notice unwritable storage"
    body = answer.json()
    assert body["status"] == "not ready" and "write failed" in body["reason"]
    assert http_request("GET", f"{server.url}/healthz").status == 200   # alive all the same

    health.unlink()
    deadline = time.monotonic() + PROBE_CACHE + 10
    while http_request("GET", f"{server.url}/readyz").status != 200:
        assert time.monotonic() < deadline, "readiness did not come back with storage"
        time.sleep(0.5)
    # the probes are outside /v2/ and need no credentials; the API still works
    push_blob(server.url, "health/app", b"after the outage")


@pytest.mark.timeout(60)
def test_readyz_is_cached_between_probes(start_dockyard, tmp_path):
    """Probes every 100 ms cost one storage round trip per PROBE_CACHE: the
    storage-operation figures count the probe's writes."""
    server = start_dockyard(tmp_path / "storage")

    def probe_writes() -> float:
        text = http_request("GET", f"{server.url}/metrics").body.decode()
        for line in text.splitlines():
            if line.startswith("dockyard_storage_operation_duration_seconds_count") \
                    and 'operation="put_content"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = probe_writes()
    start = time.monotonic()
    asked = 0
    while time.monotonic() - start < 2.0 and asked < 40:
        assert http_request("GET", f"{server.url}/readyz").status == 200
        asked += 1
        time.sleep(0.05)
    writes = probe_writes() - before
    assert asked >= 10
    assert 1 <= writes <= 2, f"{asked} readiness requests made {writes} probe writes"


def test_start_refuses_unwritable_storage_with_one_line(tmp_path):
    root = tmp_path / "storage"
    blocker = root.joinpath(*HEALTH_DIR)
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"")            # the probe cannot make its directory
    proc = _serve("--storage", str(root), "--port", str(free_port()))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"dockyard serve: storage is not usable ({root}): storage write failed")
    assert "listening" not in proc.stdout


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root writes through permissions")
def test_start_refuses_read_only_storage_root(tmp_path):
    root = tmp_path / "storage"
    root.mkdir()
    root.chmod(0o500)
    try:
        proc = _serve("--storage", str(root), "--port", str(free_port()))
    finally:
        root.chmod(0o700)
    assert proc.returncode == 2
    assert "storage is not usable" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_health_routes_answer_json(start_dockyard, tmp_path):
    server = start_dockyard(tmp_path / "storage")
    answer = http_request("GET", f"{server.url}/healthz")
    assert json.loads(answer.body) == {"status": "ok"}
    assert http_request("HEAD", f"{server.url}/readyz").status == 200
