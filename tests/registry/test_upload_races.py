"""Two requests on one upload session at once, against `dockyard serve`
over real sockets (one and two worker processes).

OCI distribution spec, "Pushing a blob in chunks" and "Closing an upload":
a session is a sequence of chunks and one closing PUT. A request that
arrives while another is changing the session must lose (BLOB_UPLOAD_INVALID
or BLOB_UPLOAD_UNKNOWN), never be answered 201, and whatever happens every
blob in storage hashes to its name.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from pathlib import Path

import pytest

from tests.support.content import sha256_digest
from tests.support.rawhttp import RawRequest, request

REPO = "races/app"


def start_session(host: str, repo: str = REPO) -> str:
    status, headers, _ = request(host, "POST", f"/v2/{repo}/blobs/uploads/")
    assert status == 202, status
    return headers["location"]


def with_query(location: str, query: str) -> str:
    return location + ("&" if "?" in location else "?") + query


def error_code(body: bytes) -> str:
    return json.loads(body)["errors"][0]["code"]


def blobs_hash_to_their_names(storage: Path) -> dict[str, int]:
    """Every blob file in storage, checked; {digest: size}."""
    found = {}
    for data in (storage / "docker/registry/v2/blobs").glob("*/*/*/data"):
        algorithm, hex_ = data.parts[-4], data.parts[-2]
        actual = hashlib.new(algorithm, data.read_bytes()).hexdigest()
        assert actual == hex_, f"blob {algorithm}:{hex_} holds bytes hashing to {actual}"
        found[f"{algorithm}:{hex_}"] = data.stat().st_size
    return found


@pytest.fixture(params=[1, 2], ids=["1-worker", "2-workers"])
def registry(request, start_dockyard):
    return start_dockyard(workers=request.param)


def test_patch_left_open_cannot_write_into_the_committed_blob(registry):
    """The attack: a second PATCH sends only its headers, the session is
    finished from another connection, then the PATCH body arrives. Before
    the fix the finish answered 201 and the body landed in the blob's file."""
    good = b"the real bytes of D\n" * 1000
    digest = sha256_digest(good)
    location = start_session(registry.host)
    assert request(registry.host, "PATCH", location, good)[0] == 202

    open_patch = RawRequest(registry.host, "PATCH", location, {
        "Content-Length": "5", "Content-Type": "application/octet-stream"})
    time.sleep(0.3)                        # the server is inside the PATCH, waiting for its body
    status, _, body = request(registry.host, "PUT", with_query(location, f"digest={digest}"))
    assert status != 201
    assert (status, error_code(body)) in ((400, "BLOB_UPLOAD_INVALID"), (404, "BLOB_UPLOAD_UNKNOWN"))

    open_patch.send(b"EVIL!")
    assert open_patch.response()[0] == 202                 # the session took the bytes...
    status, _, body = request(registry.host, "PUT", with_query(location, f"digest={digest}"))
    assert (status, error_code(body)) == (400, "DIGEST_INVALID")   # ...so D is not what it holds
    blobs_hash_to_their_names(registry.storage)

    # Whoever pushes D next gets D.
    status, _, _ = request(registry.host, "POST", f"/v2/other/app/blobs/uploads/?digest={digest}", good)
    assert status == 201
    assert request(registry.host, "GET", f"/v2/other/app/blobs/{digest}")[2] == good
    assert blobs_hash_to_their_names(registry.storage) == {digest: len(good)}


def test_finish_during_a_paused_patch_is_refused(registry):
    """One PATCH pauses half way; a status GET shows what arrived; a finish
    for exactly those bytes must not commit while the PATCH can still write."""
    first = random.Random(1).randbytes(3 << 20)
    rest = b"tail that arrives after the finish"
    location = start_session(registry.host)
    patch = RawRequest(registry.host, "PATCH", location, {
        "Content-Length": str(len(first) + len(rest)), "Content-Type": "application/octet-stream"})
    patch.send(first)
    offset = 0
    for _ in range(100):                                   # until the server has written some
        status, headers, _ = request(registry.host, "GET", location)
        assert status == 204
        offset = int(headers["range"].split("-")[1]) + 1
        if offset > 1:
            break
        time.sleep(0.05)
    assert offset > 1
    prefix_digest = sha256_digest(first[:offset])
    status, _, body = request(registry.host, "PUT", with_query(location, f"digest={prefix_digest}"))
    assert (status, error_code(body)) == (400, "BLOB_UPLOAD_INVALID")
    patch.send(rest)
    assert patch.response()[0] == 202
    whole = first + rest
    status, headers, _ = request(registry.host, "PUT", with_query(location, f"digest={sha256_digest(whole)}"))
    assert status == 201
    assert blobs_hash_to_their_names(registry.storage) == {sha256_digest(whole): len(whole)}


def test_two_finishes_with_the_last_chunk_commit_once(registry):
    """A client retrying its final PUT: both carry the same last chunk.
    Before the fix both could answer 201 and leave the blob a byte too long."""
    for trial in range(4):
        data = random.Random(trial).randbytes(256 << 10)
        digest = sha256_digest(data)
        location = start_session(registry.host, f"races/finish{trial}")
        assert request(registry.host, "PATCH", location, data[:-1])[0] == 202
        last = len(data) - 1
        finishes = [RawRequest(registry.host, "PUT", with_query(location, f"digest={digest}"), {
            "Content-Length": "1", "Content-Range": f"{last}-{last}",
            "Content-Type": "application/octet-stream"}) for _ in range(2)]
        for finish in finishes:
            finish.send(data[-1:])
        answers = [finish.response() for finish in finishes]
        statuses = sorted(status for status, _, _ in answers)
        assert statuses.count(201) == 1, statuses
        for status, _, body in answers:
            if status != 201:
                assert (status, error_code(body)) in (
                    (400, "BLOB_UPLOAD_INVALID"), (404, "BLOB_UPLOAD_UNKNOWN"), (416, "BLOB_UPLOAD_INVALID"))
        got = request(registry.host, "GET", f"/v2/races/finish{trial}/blobs/{digest}")[2]
        assert got == data
    blobs_hash_to_their_names(registry.storage)


def test_random_interleavings_of_patch_finish_and_cancel(start_dockyard):
    """Several connections drive a few shared sessions at random, across two
    worker processes, each body sent in two pieces with a pause between.
    Afterwards every blob hashes to its name and every 201 is readable."""
    registry = start_dockyard(workers=2)
    rng = random.Random(20261201)
    streams = [rng.randbytes(1 << 20) for _ in range(4)]      # session i only ever sends stream i
    sessions = [start_session(registry.host) for _ in streams]
    guard = threading.Lock()
    committed: dict[str, bytes] = {}
    outcomes: list[int] = []
    deadline = time.monotonic() + 45

    def offset_of(location: str) -> int | None:
        status, headers, _ = request(registry.host, "GET", location)
        if status != 204:
            return None
        return int(headers["range"].split("-")[1]) + (0 if headers["range"] == "0-0" else 1)

    def client(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(25):
            if time.monotonic() > deadline:
                return
            i = r.randrange(len(sessions))
            with guard:
                location = sessions[i]
            offset = offset_of(location)
            if offset is None:                    # finished or cancelled: begin anew
                with guard:
                    if sessions[i] == location:
                        sessions[i] = start_session(registry.host)
                continue
            stream = streams[i]
            action = r.choice(["patch", "patch", "stream", "finish", "finish-chunk", "cancel"])
            chunk = stream[offset:offset + r.randrange(2, 96 << 10)]
            headers = {"Content-Type": "application/octet-stream"}
            if action in ("patch", "finish-chunk") and chunk:
                headers["Content-Range"] = f"{offset}-{offset + len(chunk) - 1}"
            if action == "cancel":
                status = request(registry.host, "DELETE", location)[0]
            elif action == "finish":
                content = stream[:offset]
                req = RawRequest(registry.host, "PUT", with_query(location, f"digest={sha256_digest(content)}"),
                                 {"Content-Length": "0"})
                status = req.response()[0]
                if status == 201:
                    with guard:
                        committed[sha256_digest(content)] = content
            else:
                target = stream[:offset] + chunk
                method, path = ("PATCH", location) if action in ("patch", "stream") else (
                    "PUT", with_query(location, f"digest={sha256_digest(target)}"))
                req = RawRequest(registry.host, method, path, {**headers, "Content-Length": str(len(chunk))})
                half = len(chunk) // 2
                req.send(chunk[:half])
                time.sleep(r.uniform(0, 0.05))
                req.send(chunk[half:])
                status = req.response()[0]
                if status == 201:
                    with guard:
                        committed[sha256_digest(target)] = target
            with guard:
                outcomes.append(status)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)

    stored = blobs_hash_to_their_names(registry.storage)
    assert set(outcomes) <= {201, 202, 204, 400, 404, 416}, sorted(set(outcomes))
    assert committed, "no upload was ever finished: the test drove nothing"
    assert 400 in outcomes or 404 in outcomes or 416 in outcomes, "no request ever lost a race"
    for digest, content in committed.items():
        assert stored[digest] == len(content)
        assert request(registry.host, "GET", f"/v2/{REPO}/blobs/{digest}")[2] == content
