"""Read-only mode switched at run time (issue: lifecycle): edit
`lifecycle.read_only` in the config file and send `dockyard serve` SIGHUP;
every worker re-reads its settings and refuses writes (405 UNSUPPORTED,
distribution spec "Error Codes") or takes them again, while pulls go on."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import yaml

from tests.support.registry_http import http_request, push_blob

pytestmark = pytest.mark.interop


def _write(path, read_only: bool) -> None:
    path.write_text(yaml.safe_dump({"lifecycle": {"read_only": read_only}}))


def _upload_statuses(server, n: int = 12) -> list[int]:
    # fresh connections, so both workers of a --workers 2 server answer some
    return [http_request("POST", f"{server.url}/v2/switch/me/blobs/uploads/").status for _ in range(n)]


def _until(server, want: int, timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        statuses = _upload_statuses(server)
        if set(statuses) == {want} or time.monotonic() > deadline:
            return statuses
        time.sleep(0.2)


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_switches_read_only_mode_in_every_worker(start_dockyard, tmp_path, workers):
    config = tmp_path / "dockyard.yml"
    _write(config, False)
    server = start_dockyard(config=config, workers=workers)
    digest = push_blob(server.url, "switch/me", b"pulled all along")
    assert set(_upload_statuses(server)) == {202}

    _write(config, True)
    os.kill(server.server.proc.pid, signal.SIGHUP)
    assert set(_until(server, 405)) == {405}
    refused = http_request("PUT", f"{server.url}/v2/switch/me/manifests/v1", body=b"{}",
                           headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert refused.status == 405
    error = json.loads(refused.body)["errors"][0]
    assert error["code"] == "UNSUPPORTED" and "read-only mode" in error["message"]
    pulled = http_request("GET", f"{server.url}/v2/switch/me/blobs/{digest}")
    assert pulled.status == 200 and pulled.body == b"pulled all along"

    _write(config, False)
    os.kill(server.server.proc.pid, signal.SIGHUP)
    assert set(_until(server, 202)) == {202}


def test_a_broken_config_on_sighup_keeps_the_mode(start_dockyard, tmp_path):
    config = tmp_path / "dockyard.yml"
    _write(config, True)
    server = start_dockyard(config=config)
    assert set(_upload_statuses(server, 3)) == {405}
    config.write_text("lifecycle: [read_only\n")             # a YAML error
    os.kill(server.server.proc.pid, signal.SIGHUP)
    time.sleep(1.0)
    assert set(_upload_statuses(server, 3)) == {405}
    assert "settings not re-read" in server.log()
