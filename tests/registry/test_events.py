"""Events and webhooks on real `dockyard serve` processes and a real HTTP
receiver on loopback: CloudEvents 1.0 and Distribution's envelope, filters,
retries, at-least-once through a restart, one delivery with two replicas,
and the address allow-list (Harbor CVE-2020-13788: a webhook aimed at an
internal address)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from registry.ops.webhooks import AllowList
from tests.support.registry_http import http_request, push_blob, put_manifest
from tests.support.content import OCI_MANIFEST

OUTBOX = ("docker", "registry", "v2", "_dockyard", "events", "outbox")


class Receiver:
    """An HTTP endpoint recording what it was sent; `status` is what it
    answers, `hold` makes it sit on requests until released."""

    def __init__(self):
        self.received: list[dict] = []
        self.status = 200
        self.hold = threading.Event()
        self.hold.set()
        self.arrived = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.arrived.set()
                receiver.hold.wait(30)
                receiver.received.append({"headers": dict(self.headers), "body": json.loads(body),
                                          "status": receiver.status})
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def delivered(self) -> list[dict]:
        return [r for r in self.received if 200 <= r["status"] < 300]

    def wait_for(self, count: int, timeout: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.delivered()) < count:
            assert time.monotonic() < deadline, f"{len(self.delivered())} of {count} events arrived"
            time.sleep(0.1)
        return self.delivered()

    def close(self):
        self.hold.set()
        self.server.shutdown()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def _config(root: Path, endpoints: list[dict], **events) -> dict:
    return {"storage": {"root": str(root)},
            "events": {"endpoints": endpoints, "allow": ["127.0.0.1/32"], "backoff": 1, "backoff_max": 2,
                       **events}}


def _push_image(url: str, repo: str, tag: str) -> str:
    config = b'{"architecture":"amd64","os":"linux"}'
    layer = os.urandom(64)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": push_blob(url, repo, config), "size": len(config)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": push_blob(url, repo, layer), "size": len(layer)}]}
    answer = put_manifest(url, repo, tag, manifest)
    assert answer.status == 201
    return answer.headers["Docker-Content-Digest"]


def _outbox(root: Path) -> list[str]:
    path = root.joinpath(*OUTBOX)
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


@pytest.mark.timeout(90)
def test_cloudevents_for_push_tag_pull_delete_with_filters(start_dockyard, tmp_path, receiver):
    root = tmp_path / "storage"
    server = start_dockyard(root, config=_config(root, [
        {"url": receiver.url, "headers": ["Authorization: Bearer hook-secret-5"],
         "repositories": ["team-a/*"]}]))
    digest = _push_image(server.url, "team-a/app", "v1")
    _push_image(server.url, "team-b/app", "v1")                 # filtered out
    got = http_request("GET", f"{server.url}/v2/team-a/app/manifests/v1", headers={"Accept": OCI_MANIFEST,
                                                                               "X-Request-ID": "pull-1"})
    assert got.status == 200
    assert http_request("DELETE", f"{server.url}/v2/team-a/app/manifests/{digest}").status == 202
    events = [r["body"] for r in receiver.wait_for(6)]
    time.sleep(1.5)
    assert len(receiver.delivered()) == 6, [e["type"] for e in events]
    types = [e["type"] for e in events]
    assert types == ["dev.dockyard.blob.push", "dev.dockyard.blob.push", "dev.dockyard.manifest.push",
                     "dev.dockyard.manifest.tag", "dev.dockyard.manifest.pull", "dev.dockyard.manifest.delete"]
    for event in events:
        assert event["specversion"] == "1.0" and event["id"] and event["source"] and event["time"]
        assert event["data"]["repository"] == "team-a/app"
    pushed = events[2]
    assert pushed["subject"] == "team-a/app:v1" and pushed["data"]["digest"] == digest
    assert pushed["data"]["mediaType"] == OCI_MANIFEST
    assert events[5]["data"]["digest"] == digest
    headers = receiver.delivered()[0]["headers"]
    assert headers["Content-Type"] == "application/cloudevents+json"
    assert headers["Authorization"] == "Bearer hook-secret-5"
    assert _outbox(root) == []
    assert "hook-secret-5" not in server.log()


@pytest.mark.timeout(60)
def test_distribution_envelope_and_action_filter(start_dockyard, tmp_path, receiver):
    root = tmp_path / "storage"
    server = start_dockyard(root, config=_config(root, [{"url": receiver.url, "actions": ["push"]}],
                                                 format="distribution"))
    digest = _push_image(server.url, "dist/app", "latest")
    http_request("GET", f"{server.url}/v2/dist/app/manifests/latest", headers={"Accept": OCI_MANIFEST})
    delivered = receiver.wait_for(3)
    time.sleep(1.5)
    assert len(receiver.delivered()) == 3            # the pull and the tag were filtered out
    assert delivered[0]["headers"]["Content-Type"] == "application/vnd.docker.distribution.events.v1+json"
    manifest_event = delivered[2]["body"]["events"][0]
    assert manifest_event["action"] == "push"
    target = manifest_event["target"]
    assert target["repository"] == "dist/app" and target["digest"] == digest and target["tag"] == "latest"
    assert target["mediaType"] == OCI_MANIFEST and target["length"] == target["size"] > 0
    assert target["url"].endswith("/v2/dist/app/manifests/latest")
    assert manifest_event["request"]["method"] == "PUT" and manifest_event["source"]["instanceID"]


@pytest.mark.timeout(90)
def test_failed_deliveries_are_retried_until_2xx(start_dockyard, tmp_path, receiver):
    root = tmp_path / "storage"
    receiver.status = 503
    server = start_dockyard(root, config=_config(root, [{"url": receiver.url, "actions": ["delete"]}]))
    push_blob(server.url, "retry/app", b"blob to delete")
    from tests.support.content import sha256_digest

    assert http_request("DELETE", f"{server.url}/v2/retry/app/blobs/{sha256_digest(b'blob to delete')}").status == 202
    deadline = time.monotonic() + 20
    while len(receiver.received) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert len(_outbox(root)) == 1, "an unanswered event left the outbox"
    receiver.status = 200
    delivered = receiver.wait_for(1)
    ids = {r["body"]["id"] for r in receiver.received}
    assert len(ids) == 1, "a retry is the same event, with the same id"
    assert delivered[0]["body"]["type"] == "dev.dockyard.blob.delete"
    deadline = time.monotonic() + 5
    while _outbox(root):
        assert time.monotonic() < deadline, "delivered, but still in the outbox"
        time.sleep(0.1)
    assert "HTTP 503; will retry" in server.log()


@pytest.mark.timeout(90)
def test_restart_mid_delivery_loses_nothing(start_dockyard, tmp_path, receiver):
    root = tmp_path / "storage"
    config = _config(root, [{"url": receiver.url, "actions": ["tag"], "timeout": 30}])
    first = start_dockyard(root, config=config)
    receiver.hold.clear()                      # the first delivery hangs in the receiver
    _push_image(first.url, "crash/app", "v1")
    assert receiver.arrived.wait(20), "no delivery was attempted"
    os.killpg(first.server.pid, signal.SIGKILL)   # the registry dies mid-delivery
    first.server.proc.wait(10)
    pending = _outbox(root)
    assert len(pending) == 1
    receiver.hold.set()                        # the hung request now answers into a dead socket
    second = start_dockyard(root, config=config)
    delivered = receiver.wait_for(1)
    assert delivered[-1]["body"]["subject"] == "crash/app:v1"
    assert delivered[-1]["body"]["id"] == pending[0]
    deadline = time.monotonic() + 10
    while _outbox(root):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    second.stop()


@pytest.mark.timeout(120)
def test_two_replicas_deliver_each_event_once(start_dockyard, tmp_path, receiver):
    root = tmp_path / "storage"
    config = _config(root, [{"url": receiver.url, "actions": ["tag"]}])
    a = start_dockyard(root, config=config)
    b = start_dockyard(root, config=config)
    tags = [f"t{n}" for n in range(12)]
    for n, tag in enumerate(tags):
        _push_image((a if n % 2 else b).url, "replicas/app", tag)
    receiver.wait_for(len(tags), timeout=40)
    time.sleep(3)                              # more passes of both replicas: nothing comes twice
    subjects = [r["body"]["subject"] for r in receiver.delivered()]
    assert sorted(subjects) == sorted(f"replicas/app:{t}" for t in tags), subjects
    assert len({r["body"]["id"] for r in receiver.delivered()}) == len(tags)
    assert _outbox(root) == []


@pytest.mark.timeout(60)
def test_private_endpoints_refused_unless_allowed(start_dockyard, tmp_path, receiver):
    root = tmp_path / "storage"
    config = _config(root, [{"url": receiver.url}])
    config["events"]["allow"] = []             # loopback is not allowed by default
    server = start_dockyard(root, config=config)
    push_blob(server.url, "ssrf/app", b"x")
    deadline = time.monotonic() + 4
    while "events.allow does not list" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert receiver.received == [], "an event reached a loopback endpoint events.allow does not list"
    assert "127.0.0.1 is an address events.allow does not list" in server.log()
    assert len(_outbox(root)) == 1             # kept: listing the address later delivers it


@pytest.mark.parametrize("address, allowed", [
    ("8.8.8.8", True), ("127.0.0.1", False), ("10.1.2.3", False), ("192.168.0.1", False),
    ("169.254.169.254", False), ("::1", False), ("fd00:ec2::254", False), ("::ffff:127.0.0.1", False),
    ("0.0.0.0", False), ("224.0.0.1", False), ("100.64.0.1", False), ("2001:4860:4860::8888", True),
])
def test_allow_list_refuses_private_and_metadata_addresses(address, allowed):
    assert AllowList(()).address_allowed(address) is allowed
    assert AllowList(("0.0.0.0/0", "::/0")).address_allowed(address) is True


def test_allow_list_takes_hosts_and_networks():
    allow = AllowList(("hooks.internal", "10.0.0.0/8"))
    assert allow.host_allowed("HOOKS.internal") and not allow.host_allowed("other.internal")
    assert allow.address_allowed("10.9.9.9") and not allow.address_allowed("192.168.1.1")
