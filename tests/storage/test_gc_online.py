"""Garbage collection while the registry serves, as operators run it: two
`dockyard serve` replicas over one storage (one filesystem root, one Ceph
S3 bucket) behind a round-robin proxy, four clients pushing and deleting
over real HTTP, and `dockyard gc` passes (and the replicas' own gc.interval
passes) running throughout; and `dockyard gc` killed with SIGKILL at each
phase and started again.

Afterwards every remaining tag pulls completely with the right digests, and
once pushes stop a pass with grace 0 leaves exactly the blobs the remaining
tags reference: nothing unreferenced before the window remains.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from storage import layout
from storage.driver import PathNotFound
from storage.store import ContentStore
from tests.support import REPO_ROOT
from tests.support.content import MANIFEST_ACCEPT, OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, sha256_digest
from tests.support.launch import dockyard_command
from tests.support.registry_http import http_request, push_blob, put_manifest
from tests.support.replicas import ReplicaSet, backend_names, backend_storage, open_storage_driver

CLIENTS = 4
LOAD_SECONDS = 8.0              # clients push and delete at least this long, until GC collected
LOAD_LIMIT = 45.0               # something during the load, and at most this long ...
LOAD_ROUNDS = 150               # ... or this many rounds each, whichever ends first
GRACE = 2                       # whole seconds: S3 keeps times to the second
SHARED_LAYER = b"a base layer every client's images share " * 64


def gc_env(tmpdir: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TMPDIR": str(tmpdir)}


def run_gc(config: Path, tmpdir: Path, *extra: str, timeout: float = 120) -> dict:
    done = subprocess.run([*dockyard_command(), "gc", "--config", str(config), "--json", "--quiet", *extra],
                          capture_output=True, text=True, timeout=timeout, env=gc_env(tmpdir), cwd=REPO_ROOT)
    assert done.returncode in (0, 3), done.stderr     # 3: another pass held the lock
    return json.loads(done.stdout)


def image(seed: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    config = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed}).encode()
    own = f"layer of {seed} ".encode() * 50
    blobs = [(sha256_digest(b), b) for b in (config, SHARED_LAYER, own)]
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": blobs[0][0], "size": len(config)},
                "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": len(b)} for d, b in blobs[1:]]}
    return json.dumps(manifest, sort_keys=True).encode(), blobs


def push_like_docker(url: str, repo: str, tag: str, manifest: bytes, blobs) -> str | None:
    """HEAD each blob, upload the missing ones, PUT the manifest; one retry
    from the start when the registry answers MANIFEST_BLOB_UNKNOWN (what
    docker does after a failed push). The digest, None if both tries failed."""
    for _ in range(2):
        for digest, data in blobs:
            if http_request("HEAD", f"{url}/v2/{repo}/blobs/{digest}").status != 200:
                push_blob(url, repo, data)
        put = put_manifest(url, repo, tag, manifest)
        if put.status == 201:
            return put.headers["Docker-Content-Digest"]
        assert put.status == 400 and b"MANIFEST_BLOB_UNKNOWN" in put.body, (put.status, put.body[:300])
    return None


def pull_completely(url: str, repo: str, tag: str) -> list[str]:
    """Every digest the tag reaches, each fetched and checked; [manifest, blobs...]."""
    got = http_request("GET", f"{url}/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST_ACCEPT})
    assert got.status == 200, (repo, tag, got.status, got.body[:300])
    digest = got.headers["Docker-Content-Digest"]
    assert sha256_digest(got.body) == digest
    doc = json.loads(got.body)
    reached = [digest]
    for d in [doc["config"], *doc["layers"]]:
        blob = http_request("GET", f"{url}/v2/{repo}/blobs/{d['digest']}")
        assert blob.status == 200, (repo, tag, d["digest"], blob.status)
        assert sha256_digest(blob.body) == d["digest"] and len(blob.body) == d["size"]
        reached.append(d["digest"])
    return reached


class Client(threading.Thread):
    """Pushes an image a round to its own repository, and deletes (by
    digest) every other one it pushed, for a bounded time and count."""

    def __init__(self, url: str, number: int, deadline: float, stop: threading.Event):
        super().__init__(daemon=True)
        self.url, self.repo, self.deadline, self.stop = url, f"load/client-{number}", deadline, stop
        self.kept: dict[str, str] = {}
        self.deleted_layers: list[str] = []     # the own layer of each image deleted
        self.failed_pushes = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for round_ in range(LOAD_ROUNDS):
                if time.monotonic() > self.deadline or self.stop.is_set():
                    break
                tag = f"r{round_}"
                manifest, blobs = image(f"{self.repo}-{round_}-{uuid.uuid4().hex[:6]}")
                digest = push_like_docker(self.url, self.repo, tag, manifest, blobs)
                if digest is None:
                    self.failed_pushes += 1
                    continue
                if round_ % 2:
                    deleted = http_request("DELETE", f"{self.url}/v2/{self.repo}/manifests/{digest}")
                    assert deleted.status == 202, (deleted.status, deleted.body[:300])
                    self.deleted_layers.append(blobs[2][0])
                else:
                    self.kept[tag] = digest
        except BaseException as exc:       # reported by the test
            self.error = exc


async def stored_blobs(driver) -> set[str]:
    out = set()
    for alg_dir in await _listed(driver, layout.BLOBS):
        for prefix in await _listed(driver, alg_dir):
            out |= {d for d in (layout.digest_of_blob_dir(p) for p in await _listed(driver, prefix)) if d}
    return out


async def blobs_in(storage) -> set[str]:
    """The blobs a fresh driver on the storage lists."""
    driver = open_storage_driver(storage)
    try:
        return await stored_blobs(driver)
    finally:
        await driver.close()


async def _listed(driver, path: str) -> list[str]:
    try:
        return await driver.list(path)
    except PathNotFound:
        return []


@pytest.fixture(params=backend_names())
def shared_storage(request, tmp_path):
    with backend_storage(request.param, tmp_path) as storage:
        yield storage


def test_gc_while_four_clients_push_and_delete_on_two_replicas(shared_storage, tmp_path):
    gc_settings = {"gc": {"interval": 2, "grace": GRACE, "untagged": True}}
    with ReplicaSet(shared_storage, tmp_path / "replicas", settings=gc_settings) as replicas:
        config = tmp_path / "replicas" / "replica-0.yml"
        url = replicas.proxy.url
        started = time.monotonic()
        stop = threading.Event()
        clients = [Client(url, n, started + LOAD_LIMIT, stop) for n in range(CLIENTS)]
        for client in clients:
            client.start()
        passes, collected = [], set()
        while any(c.is_alive() for c in clients) and time.monotonic() < started + LOAD_LIMIT + 60:
            passes.append(run_gc(config, tmp_path))
            deleted_layers = {d for c in clients for d in list(c.deleted_layers)}
            collected |= deleted_layers - asyncio.run(blobs_in(shared_storage))
            if collected and time.monotonic() - started >= LOAD_SECONDS:
                stop.set()
        for client in clients:
            client.join(60)
            assert not client.is_alive()
            assert client.error is None, client.error
        assert len(passes) >= 2, passes      # the replicas' own passes hold the lock now and then
        # collected while the clients pushed (by these passes or the replicas' own), not only after
        assert collected, "no deleted image's layer was collected during the load"

        # Pushes stopped: a pass with grace 0 (the operator's choice then) leaves only what tags reach.
        time.sleep(1.1)
        final = run_gc(config, tmp_path, "--grace", "0")
        for _ in range(30):                # a replica's own pass has the lock: again, bounded
            if not final["busy"]:
                break
            time.sleep(0.5)
            final = run_gc(config, tmp_path, "--grace", "0")
        assert not final["busy"]
        referenced: set[str] = set()
        for client in clients:
            assert client.kept, "no image survived the load"
            for tag in client.kept:
                for replica in replicas.urls:
                    reached = pull_completely(replica, client.repo, tag)
                referenced |= set(reached)
        left = asyncio.run(blobs_in(shared_storage))
        assert left == referenced, (sorted(left - referenced)[:5], sorted(referenced - left)[:5])
        assert sum(c.failed_pushes for c in clients) == 0, [c.failed_pushes for c in clients]


# ---- SIGKILL at each phase ------------------------------------------------------------

KILL_AT = ("purge", "mark", "record", "sweep: links", "sweep: re-mark", "sweep: blobs")
# On S3 a killed pass's lock lives out its lease (10 s) before the next pass
# may start: two phases there, the one cut between record and sweep and the
# one cut in the middle of deleting bytes; every phase on the filesystem.
KILL_AT_S3 = ("record", "sweep: blobs")


async def _push(store: ContentStore, repo: str, tag: str, seed: str) -> list[str]:
    manifest, blobs = image(seed)
    for digest, data in blobs:
        async def body(data=data):
            yield data
        await store.uploads.put(repo, digest, body())
    return [(await store.manifests.put(repo, tag, manifest, OCI_MANIFEST)).digest] + [d for d, _ in blobs]


async def _add_garbage(store: ContentStore, count: int, seed: str) -> None:
    for n in range(count):
        digests = await _push(store, "garbage", f"g{n}", f"{seed}-{n}")
        await store.manifests.delete("garbage", digests[0])


async def _check_consistent(store: ContentStore, kept: dict[str, list[str]]) -> None:
    """Every kept tag's manifest and blobs are there, linked, with their bytes."""
    for tag, digests in kept.items():
        manifest = await store.manifests.get("kept", tag)
        assert manifest.digest == digests[0]
        for digest in digests[1:]:
            info = await store.blobs.stat("kept", digest)
            data = b"".join([c async for c in store.blobs.read(digest)])
            assert sha256_digest(data) == digest and len(data) == info.size


def _kill_at(config: Path, tmpdir: Path, phase: str) -> int:
    """Start a pass, SIGKILL it as it announces phase; its exit status.
    A pass that finds the lock still held by the last one killed is tried again."""
    deadline = time.monotonic() + 30
    while True:
        status = _start_and_kill(config, tmpdir, phase)
        if status != 3 or time.monotonic() > deadline:
            return status
        time.sleep(1)


def _start_and_kill(config: Path, tmpdir: Path, phase: str) -> int:
    proc = subprocess.Popen([*dockyard_command(), "gc", "--config", str(config), "--grace", "0", "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=gc_env(tmpdir), cwd=REPO_ROOT)
    try:
        for line in proc.stderr:
            if line.strip() == f"gc: {phase}":
                proc.send_signal(signal.SIGKILL)
                break
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_gc_killed_at_each_phase_and_restarted_leaves_the_store_consistent(shared_storage, tmp_path):
    config = tmp_path / "gc.yml"
    storage = dict(shared_storage)
    if storage["driver"] == "filesystem":
        storage["root"] = str(storage["root"])
    config.write_text(yaml.safe_dump({"storage": storage}))
    gc_tmp = tmp_path / "gc-tmp"
    gc_tmp.mkdir()

    async def build() -> dict[str, list[str]]:
        store = ContentStore(open_storage_driver(shared_storage))
        try:
            kept = {f"v{n}": await _push(store, "kept", f"v{n}", f"kept-{n}") for n in range(5)}
            await _add_garbage(store, 40, "first")
            return kept
        finally:
            await store.close()

    kept = asyncio.run(build())
    time.sleep(1.1)
    killed = 0
    phases = KILL_AT if storage["driver"] == "filesystem" else KILL_AT_S3
    for phase in phases:
        status = _kill_at(config, gc_tmp, phase)
        killed += status == -signal.SIGKILL

        async def check_and_refill(phase=phase) -> None:
            store = ContentStore(open_storage_driver(shared_storage))
            try:
                await _check_consistent(store, kept)
                await _add_garbage(store, 5, phase)
            finally:
                await store.close()

        asyncio.run(check_and_refill())
        time.sleep(1.1)
    assert killed == len(phases)
    assert any(p.name.startswith("dockyard-gc-") for p in gc_tmp.iterdir())   # what a killed pass leaves
    final = run_gc(config, gc_tmp, "--grace", "0")
    for _ in range(15):             # S3: the last killed pass's lease runs out first
        if not final["busy"]:
            break
        time.sleep(1)
        final = run_gc(config, gc_tmp, "--grace", "0")
    assert final["blobs_deleted"] > 0 and not final["busy"]
    assert not any(p.name.startswith("dockyard-gc-") for p in gc_tmp.iterdir())

    async def after() -> set[str]:
        store = ContentStore(open_storage_driver(shared_storage))
        try:
            await _check_consistent(store, kept)
            assert await _listed(store.driver, layout.GC_RUNS) == []
            return await stored_blobs(store.driver)
        finally:
            await store.close()

    assert asyncio.run(after()) == {d for digests in kept.values() for d in digests}
