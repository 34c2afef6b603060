"""Two `dockyard serve` processes over one storage (one filesystem root, the
NFS case, or one S3 bucket), as they run behind a load balancer: what one
replica stored, the other serves at once, and an upload may hop between
them request by request (OCI distribution spec, "Pushing a blob in chunks":
the session is the Location, not a connection or a process).

Each test runs on every backend of tests.support.replicas.backend_names().
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from registry.settings import load_settings
from storage import layout
from storage.driver import PathNotFound
from tests.support import REPO_ROOT
from tests.support.content import (DOCKER_MANIFEST, MANIFEST_ACCEPT, OCI_CONFIG, OCI_LAYER, OCI_MANIFEST,
                                   sha256_digest)
from tests.support.registry_http import http_request, push_blob, put_manifest
from tests.support.replicas import ReplicaSet, backend_names, backend_storage, open_storage_driver

MIB = 1 << 20


@pytest.fixture(params=backend_names())
def replicas(request, tmp_path):
    """Two replicas on one fresh storage of the backend, and the proxy before them."""
    with backend_storage(request.param, tmp_path) as storage:
        replica_set = ReplicaSet(storage, tmp_path / "replicas").start()
        try:
            yield replica_set
        finally:
            replica_set.stop()


def unique(name: str) -> str:
    return f"replicas/{name}-{uuid.uuid4().hex[:8]}"


def absolute(base: str, location: str) -> str:
    return base + location if location.startswith("/") else location


def chunked_upload(urls: list[str], repo: str, data: bytes, chunk: int) -> str:
    """POST on the first replica, each PATCH and the closing PUT on the next
    one in turn, the session's status read on yet another before each PATCH;
    the blob's digest."""
    started = http_request("POST", f"{urls[0]}/v2/{repo}/blobs/uploads/", b"", {"Content-Length": "0"})
    assert started.status == 202, started.body
    location = started.headers["Location"]
    offset, turn = 0, 1
    while offset < len(data):
        piece = data[offset:offset + chunk]
        status = http_request("GET", absolute(urls[turn % len(urls)], location))
        assert status.status == 204, status.body
        assert status.headers["Range"] == f"0-{max(offset - 1, 0)}"
        turn += 1
        patched = http_request("PATCH", absolute(urls[turn % len(urls)], location), piece,
                               {"Content-Type": "application/octet-stream",
                                "Content-Range": f"{offset}-{offset + len(piece) - 1}"})
        assert patched.status == 202, (patched.status, patched.body)
        offset += len(piece)
        assert patched.headers["Range"] == f"0-{offset - 1}"
        location = patched.headers["Location"]
    turn += 1
    digest = sha256_digest(data)
    separator = "&" if "?" in location else "?"
    done = http_request("PUT", f"{absolute(urls[turn % len(urls)], location)}{separator}digest={digest}")
    assert done.status == 201, (done.status, done.body)
    return digest


def image(repo: str, layers: list[bytes], *, marker: str = "") -> tuple[bytes, list[tuple[str, bytes]]]:
    """(manifest bytes, [(digest, blob)] for config and layers) of a small OCI image."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "marker": marker or repo}).encode()
    blobs = [(sha256_digest(b), b) for b in [config, *layers]]
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": blobs[0][0], "size": len(config)},
                "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": len(b)} for d, b in blobs[1:]]}
    return json.dumps(manifest, sort_keys=True).encode(), blobs


def push_image(url: str, repo: str, tag: str, manifest: bytes, blobs: list[tuple[str, bytes]]) -> str:
    for _, blob in blobs:
        push_blob(url, repo, blob)
    put = put_manifest(url, repo, tag, manifest)
    assert put.status == 201, (put.status, put.body)
    return put.headers["Docker-Content-Digest"]


def manifest_at(url: str, repo: str, reference: str):
    return http_request("GET", f"{url}/v2/{repo}/manifests/{reference}", headers={"Accept": MANIFEST_ACCEPT})


def blob_digest_at(url: str, repo: str, digest: str) -> str:
    got = http_request("GET", f"{url}/v2/{repo}/blobs/{digest}")
    assert got.status == 200, (got.status, got.body[:300])
    return sha256_digest(got.body)


# ---- uploads --------------------------------------------------------------------------------

def test_chunked_upload_alternating_between_replicas(replicas):
    """Chunks of 3 MiB over 13 MiB: on S3 (5 MiB parts) a part is filled by
    PATCHes on both replicas, its tail kept in the bucket in between."""
    repo = unique("chunked")
    data = (uuid.uuid4().bytes * (13 * MIB // 16 + 1))[:13 * MIB + 12345]
    digest = chunked_upload(replicas.urls, repo, data, 3 * MIB)
    for url in replicas.urls:
        head = http_request("HEAD", f"{url}/v2/{repo}/blobs/{digest}")
        assert head.status == 200 and int(head.headers["Content-Length"]) == len(data)
        assert blob_digest_at(url, repo, digest) == digest
    # the finished session left nothing behind in storage
    uploads = asyncio.run(_upload_sessions(replicas.storage, repo))
    assert uploads == []


def test_wrong_digest_across_replicas_commits_nothing(replicas):
    """A PUT whose digest does not match what both replicas wrote: 400
    DIGEST_INVALID, and no blob under either digest appears anywhere."""
    repo = unique("bad-digest")
    a, b = replicas.urls
    started = http_request("POST", f"{a}/v2/{repo}/blobs/uploads/", b"", {"Content-Length": "0"})
    location = started.headers["Location"]
    first = http_request("PATCH", absolute(a, location), b"x" * 1000,
                         {"Content-Type": "application/octet-stream", "Content-Range": "0-999"})
    assert first.status == 202
    second = http_request("PATCH", absolute(b, first.headers["Location"]), b"y" * 1000,
                          {"Content-Type": "application/octet-stream", "Content-Range": "1000-1999"})
    assert second.status == 202
    claimed = sha256_digest(b"z" * 2000)
    location = second.headers["Location"]
    separator = "&" if "?" in location else "?"
    done = http_request("PUT", f"{absolute(a, location)}{separator}digest={claimed}")
    assert done.status == 400 and json.loads(done.body)["errors"][0]["code"] == "DIGEST_INVALID"
    actual = sha256_digest(b"x" * 1000 + b"y" * 1000)
    for url in replicas.urls:
        for digest in (claimed, actual):
            assert http_request("HEAD", f"{url}/v2/{repo}/blobs/{digest}").status == 404


async def _upload_sessions(storage, repo: str) -> list[str]:
    driver = open_storage_driver(storage)
    try:
        return await driver.list(layout.uploads_dir(repo))
    except PathNotFound:
        return []
    finally:
        await driver.close()


# ---- manifests and tags ---------------------------------------------------------------------

def test_manifest_and_tag_changes_are_seen_by_the_other_replica_at_once(replicas):
    """Push on one, pull from the other with no pause; move the tag on one,
    the other serves the new target on its very next request; delete on one,
    the other answers 404 at once. Five rounds, the replicas swapping roles."""
    repo = unique("tags")
    urls = replicas.urls
    previous = None
    for round_ in range(5):
        writer, reader = urls[round_ % 2], urls[(round_ + 1) % 2]
        manifest, blobs = image(repo, [f"layer {round_}".encode()], marker=f"round {round_}")
        if previous is not None:            # the reader served the old target: it must not keep it
            assert manifest_at(reader, repo, "current").headers["Docker-Content-Digest"] == previous
        digest = push_image(writer, repo, "current", manifest, blobs)
        got = manifest_at(reader, repo, "current")
        assert got.status == 200 and got.headers["Docker-Content-Digest"] == digest
        assert got.body == manifest and got.headers["Content-Type"] == OCI_MANIFEST
        by_digest = manifest_at(reader, repo, digest)
        assert by_digest.status == 200 and by_digest.body == manifest
        for blob_digest, _ in blobs:
            assert blob_digest_at(reader, repo, blob_digest) == blob_digest
        previous = digest
    tags = json.loads(http_request("GET", f"{urls[1]}/v2/{repo}/tags/list").body)
    assert tags == {"name": repo, "tags": ["current"]}

    deleted = http_request("DELETE", f"{urls[0]}/v2/{repo}/manifests/{previous}")
    assert deleted.status == 202
    for url in urls:
        assert manifest_at(url, repo, "current").status == 404
        assert manifest_at(url, repo, previous).status == 404


def test_manifest_repushed_with_another_media_type_is_refused_by_both(replicas):
    """A manifest's media type is what its bytes say (the layout shared with
    CNCF Distribution records nothing else, storage.layout): the same bytes
    pushed again under a Content-Type they do not say are refused by either
    replica (MANIFEST_INVALID, spec "Pushing Manifests"), and both go on
    serving the type the bytes give, by tag and by digest."""
    repo = unique("media-type")
    a, b = replicas.urls
    config = b'{"architecture":"amd64","os":"linux"}'
    layer = b"a layer of its own"
    for blob in (config, layer):
        push_blob(a, repo, blob)
    body = json.dumps({"schemaVersion": 2,
                       "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                                  "digest": sha256_digest(config), "size": len(config)},
                       "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                                   "digest": sha256_digest(layer), "size": len(layer)}]}).encode()
    assert put_manifest(a, repo, "t", body, OCI_MANIFEST).status == 201
    for url in (a, b):                      # both have now served it as OCI
        assert manifest_at(url, repo, "t").headers["Content-Type"] == OCI_MANIFEST
    for url in (b, a):
        refused = put_manifest(url, repo, "t", body, DOCKER_MANIFEST)
        assert refused.status == 400 and b"MANIFEST_INVALID" in refused.body, (url, refused.status)
    for url in (a, b):
        for reference in ("t", sha256_digest(body)):
            got = manifest_at(url, repo, reference)
            assert got.status == 200 and got.headers["Content-Type"] == OCI_MANIFEST, (url, reference)


def test_concurrent_pushes_of_one_image_to_both_replicas(replicas):
    """Four clients, two on each replica, push the same image (same blobs,
    manifest and tag) at once, for three rounds of a new image each: every
    push succeeds, both replicas serve the last image whole, the tag list
    holds one tag, every blob hashes to its name and no upload session or
    multipart upload is left behind."""
    repo = unique("concurrent")
    urls = replicas.urls
    deadline = time.monotonic() + 120
    for round_ in range(3):
        assert time.monotonic() < deadline, "concurrent pushes took over 120 s"
        manifest, blobs = image(repo, [uuid.uuid4().bytes * 4096, f"small {round_}".encode()],
                                marker=f"round {round_}")
        barrier = threading.Barrier(4)

        def push(url: str) -> str:
            barrier.wait(30)
            return push_image(url, repo, "latest", manifest, blobs)

        with ThreadPoolExecutor(4) as pool:
            digests = list(pool.map(push, urls * 2))
        assert len(set(digests)) == 1
        for url in urls:
            got = manifest_at(url, repo, "latest")
            assert got.status == 200 and got.body == manifest
            for digest, _ in blobs:
                assert blob_digest_at(url, repo, digest) == digest
    for url in urls:
        assert json.loads(http_request("GET", f"{url}/v2/{repo}/tags/list").body)["tags"] == ["latest"]
    assert asyncio.run(_upload_sessions(replicas.storage, repo)) == []
    if replicas.storage["driver"] == "s3":
        from tests.support.s3 import S3Target

        s3 = replicas.storage["s3"]
        target = S3Target(s3["endpoint_url"], s3["access_key_id"], s3["secret_access_key"], s3["bucket"],
                          s3["region"])
        assert target.uploads(s3["prefix"]) == []


# ---- through the proxy ------------------------------------------------------------------------

def test_push_and_pull_through_the_round_robin_proxy(replicas):
    """One keep-alive connection through the proxy, so consecutive requests
    of one push land on alternate replicas: a chunked upload, a manifest,
    and the pull back."""
    import http.client

    repo = unique("proxied")
    proxy = replicas.proxy
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
    try:
        def send(method: str, path: str, body: bytes = b"", headers: dict | None = None):
            conn.request(method, path, body=body, headers={"Content-Length": str(len(body)), **(headers or {})})
            response = conn.getresponse()
            return response.status, response.headers, response.read()

        data = uuid.uuid4().bytes * (MIB // 8)          # 2 MiB in four chunks
        status, headers, _ = send("POST", f"/v2/{repo}/blobs/uploads/")
        assert status == 202
        location = headers["Location"]
        for offset in range(0, len(data), MIB // 2):
            piece = data[offset:offset + MIB // 2]
            status, headers, body = send("PATCH", location, piece,
                                         {"Content-Range": f"{offset}-{offset + len(piece) - 1}",
                                          "Content-Type": "application/octet-stream"})
            assert status == 202, body
            location = headers["Location"]
        digest = sha256_digest(data)
        status, _, body = send("PUT", f"{location}{'&' if '?' in location else '?'}digest={digest}")
        assert status == 201, body
        manifest, blobs = image(repo, [data])
        status, _, body = send("PUT", f"/v2/{repo}/manifests/v1", manifest, {"Content-Type": OCI_MANIFEST})
        assert status == 400 and b"MANIFEST_BLOB_UNKNOWN" in body      # the config is not there yet
        push_blob(proxy.url, repo, blobs[0][1])
        status, _, body = send("PUT", f"/v2/{repo}/manifests/v1", manifest, {"Content-Type": OCI_MANIFEST})
        assert status == 201, body
        for _ in range(2):                                  # once from each replica
            status, _, body = send("GET", f"/v2/{repo}/manifests/v1", headers={"Accept": OCI_MANIFEST})
            assert status == 200 and body == manifest
            status, _, body = send("GET", f"/v2/{repo}/blobs/{digest}")
            assert status == 200 and sha256_digest(body) == digest
    finally:
        conn.close()
    assert min(proxy.served) >= 6, proxy.served


def test_the_replicas_program_serves_until_sigterm(tmp_path):
    """`python -m tests.support.replicas` (what run-replicas.sh starts for
    the conformance suite): it prints the replicas and the proxy, serves
    through the proxy from one shared root, and on SIGTERM stops them and
    exits 0."""
    import signal
    import subprocess
    import sys

    from tests.support.launch import wait_for_http

    argv = [sys.executable, "-m", "tests.support.replicas", "--filesystem", str(tmp_path / "root"),
            "--workdir", str(tmp_path / "work")]
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while not (lines and lines[-1].startswith("proxy: ")):
            assert time.monotonic() < deadline and proc.poll() is None, lines
            lines.append(proc.stdout.readline().strip())
        replica_urls = [line.split(" ", 1)[1] for line in lines if line.startswith("replica: ")]
        proxy_url = lines[-1].split(" ", 1)[1]
        assert len(replica_urls) == 2
        digest = push_blob(proxy_url, "replicas/program", b"through the proxy")
        for url in replica_urls:
            assert http_request("HEAD", f"{url}/v2/replicas/program/blobs/{digest}").status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "requests per replica: [" in proc.stdout.read()
        for url in [*replica_urls, proxy_url]:
            with pytest.raises((OSError, TimeoutError, RuntimeError)):
                wait_for_http(f"{url}/v2/", timeout=0.5)
    finally:
        if proc.poll() is None:             # SIGTERM first: it stops the replicas it started
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


# ---- the deployment -------------------------------------------------------------------------

def _dockyard_reads(name: str) -> bool:
    """Whether `dockyard serve` reads the environment variable `name` (asked of its own loader)."""
    from registry.settings import Settings, _env_overrides

    return bool(_env_overrides(Settings, {name: "x"}))


def test_deploy_compose_runs_two_replicas_on_one_bucket_behind_a_balancer():
    """deploy/compose.yml (Compose v2 format; nothing is pulled here, so it
    is checked by reading it): two replicas with identical settings, every
    DOCKYARD_* name one Dockyard reads, on the bucket of the store service;
    the balancer alone publishes a port and names both replicas in its
    configuration; anything else is a one-shot job the replicas wait for."""
    compose = yaml.safe_load((REPO_ROOT / "deploy" / "compose.yml").read_text())
    services = compose["services"]
    replicas = [n for n, s in services.items() if "DOCKYARD_STORAGE_DRIVER" in (s.get("environment") or {})]
    assert len(replicas) == 2, list(services)
    envs, loaded = [], []
    for name in replicas:
        service = services[name]
        env = {k: str(v) for k, v in service["environment"].items()}
        unknown = sorted(k for k in env if not _dockyard_reads(k))
        assert not unknown, f"{name}: not Dockyard settings: {unknown}"
        settings = load_settings(environ=env)
        assert settings.storage.driver == "s3" and settings.storage.s3.bucket
        assert settings.http.host == "0.0.0.0"
        assert "ports" not in service, f"{name}: replicas are reached through the balancer only"
        envs.append(env)
        loaded.append(settings)
    assert envs[0] == envs[1], "replicas must share every setting (one bucket, one key)"
    for key in ("DOCKYARD_STORAGE_S3_ACCESS_KEY_ID", "DOCKYARD_STORAGE_S3_SECRET_ACCESS_KEY"):
        assert envs[0][key].startswith("${"), f"{key} comes from the environment, not the file"

    endpoint = loaded[0].storage.s3.endpoint_url
    store, _, store_port = endpoint.removeprefix("http://").rstrip("/").partition(":")
    assert store in services, f"{endpoint} names no service"
    assert store_port in [str(p).split(":")[-1] for p in services[store].get("expose", [])], \
        f"{store} must listen on {store_port}"

    publishing = [n for n, s in services.items() if s.get("ports")]
    assert len(publishing) == 1, publishing
    balancer = services[publishing[0]]
    port = loaded[0].http.port
    assert [str(p).split(":")[-1] for p in balancer["ports"]] == [str(port)]
    mounts = [v.split(":")[0] for v in balancer["volumes"] if str(v).startswith("./")]
    assert len(mounts) == 1, "the balancer's configuration comes from deploy/"
    config_text = (REPO_ROOT / "deploy" / mounts[0]).read_text()
    for name in replicas:
        assert f"server {name}:{port};" in config_text, f"{mounts[0]} must name {name}:{port}"
        assert store in services[name]["depends_on"]

    others = set(services) - set(replicas) - {store, publishing[0]}
    for name in others:
        assert services[name].get("restart") == "no", f"{name}: only one-shot jobs besides these"
        for replica in replicas:
            assert services[replica]["depends_on"][name]["condition"] == "service_completed_successfully"
