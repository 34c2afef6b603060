"""Faults the client must survive or refuse, against a real HTTP fault injector."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from puller.client.http import ClientOptions, DigestMismatchError, ManifestError
from puller.transfer.pull import pull
from puller.store import LocalStore

from tests.client.fakeregistry import cdn_app, digest, start_app

REPO_ROOT = Path(__file__).resolve().parents[2]
OPTIONS = ClientOptions(retries=3)


def blobs_dir(store: LocalStore) -> list[str]:
    path = store.root / "blobs" / "sha256"
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


async def test_pull_verifies_and_resolves(fake, tmp_path):
    layers = [os.urandom(300_000), os.urandom(5000)]
    fake.add_image("app/one", "v1", layers)
    store = LocalStore(tmp_path / "store")
    seen = []

    async def on_layer(index, descriptor, path):
        seen.append((index, descriptor["digest"], path.read_bytes() == layers[index]))

    result = await pull(f"{fake.host}/app/one:v1", store=store, options=OPTIONS, on_layer=on_layer)
    assert seen == [(0, digest(layers[0]), True), (1, digest(layers[1]), True)]
    assert store.resolve(f"{fake.host}/app/one:v1") == result.manifest_digest
    _, manifest, config = store.image_for_platform(f"{fake.host}/app/one:v1")
    assert [l["digest"] for l in manifest["layers"]] == [digest(l) for l in layers]
    assert config["rootfs"]["diff_ids"] == [digest(l) for l in layers]
    assert result.bytes_downloaded == sum(map(len, layers)) + len(store.read_blob(result.config_digest))
    # a second pull downloads no blob again
    before = fake.count("GET", "/blobs/")
    again = await pull(f"{fake.host}/app/one:v1", store=store, options=OPTIONS)
    assert again.bytes_downloaded == 0 and fake.count("GET", "/blobs/") == before


async def test_corrupt_blob_is_rejected_and_not_stored(fake, tmp_path):
    layer = os.urandom(200_000)
    fake.add_image("app/corrupt", "v1", [layer])
    fake.corrupt.add(digest(layer))
    store = LocalStore(tmp_path / "store")
    with pytest.raises(DigestMismatchError, match="does not match"):
        await pull(f"{fake.host}/app/corrupt:v1", store=store, options=OPTIONS)
    assert digest(layer).split(":")[1] not in blobs_dir(store)
    assert store.resolve(f"{fake.host}/app/corrupt:v1") is None
    # the bad bytes are not kept for a resume either
    assert not list((store.root / "ingest").glob(f"sha256-{digest(layer)[7:]}.partial*"))


async def test_manifest_not_json_is_rejected(fake, tmp_path):
    fake.add_image("app/notjson", "v1", [b"x"], raw_manifest=b"<html>this is not json</html>")
    with pytest.raises(ManifestError, match="not valid JSON"):
        await pull(f"{fake.host}/app/notjson:v1", store=LocalStore(tmp_path / "s"), options=OPTIONS)


async def test_manifest_over_size_limit_is_rejected(fake, tmp_path):
    huge = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "config": {}, "layers": [], "annotations": {"pad": "x" * (4 * 1024 * 1024)}}).encode()
    fake.add_image("app/huge", "v1", [b"x"], raw_manifest=huge)
    store = LocalStore(tmp_path / "s")
    with pytest.raises(ManifestError, match="limit"):
        await pull(f"{fake.host}/app/huge:v1", store=store, options=OPTIONS)
    assert not store.has_blob(digest(huge))


async def test_dropped_connection_resumes_with_range(fake, tmp_path):
    layer = os.urandom(3 * 1024 * 1024 + 123)
    fake.add_image("app/drop", "v1", [layer])
    fake.drop_after[digest(layer)] = 1024 * 1024 + 17
    store = LocalStore(tmp_path / "store")
    result = await pull(f"{fake.host}/app/drop:v1", store=store, options=OPTIONS)
    assert store.read_blob(digest(layer)) == layer
    gets = [r for r in fake.requests if r.method == "GET" and digest(layer) in r.path]
    assert len(gets) == 2
    assert "Range" not in gets[0].headers
    resumed_from = int(gets[1].headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from <= 1024 * 1024 + 17
    # only the missing part was downloaded again
    assert result.bytes_downloaded < len(layer) + 1024 * 1024


async def test_server_ignoring_range_restarts_cleanly(fake, tmp_path):
    layer = os.urandom(2 * 1024 * 1024)
    fake.add_image("app/norange", "v1", [layer])
    fake.drop_after[digest(layer)] = 700_000
    fake.honour_range = False
    store = LocalStore(tmp_path / "store")
    await pull(f"{fake.host}/app/norange:v1", store=store, options=OPTIONS)
    assert store.read_blob(digest(layer)) == layer


async def test_redirect_to_other_host_drops_authorization(fake, tmp_path):
    cdn_runner, cdn_host = await start_app(cdn_app(fake))
    try:
        fake.redirect_blobs_to = f"http://{cdn_host}"
        fake.basic_auth = ("alice", "s3cret")
        layer = os.urandom(100_000)
        fake.add_image("app/redirect", "v1", [layer])
        from puller.client.auth import Credentials
        options = ClientOptions(credentials=((fake.host, Credentials("alice", "s3cret")),))
        store = LocalStore(tmp_path / "store")
        await pull(f"{fake.host}/app/redirect:v1", store=store, options=options)
        assert store.read_blob(digest(layer)) == layer
        cdn = [r for r in fake.requests if r.path.startswith("cdn:")]
        assert cdn, "the blob was not fetched from the redirect target"
        assert all("Authorization" not in r.headers for r in cdn)
        registry_side = [r for r in fake.requests if "/manifests/" in r.path and r.method == "GET"]
        assert registry_side and all(r.headers.get("Authorization", "").startswith("Basic ") for r in registry_side)
    finally:
        await cdn_runner.cleanup()


async def _run_cli(*args: str, env: dict | None = None, timeout: float = 60):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "puller", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


async def test_wrong_credentials_one_line_exit_1(fake, tmp_path):
    fake.basic_auth = ("alice", "right")
    fake.add_image("app/private", "v1", [b"layer"])
    config_dir = tmp_path / "docker"
    config_dir.mkdir()
    import base64
    (config_dir / "config.json").write_text(json.dumps(
        {"auths": {fake.host: {"auth": base64.b64encode(b"alice:wrong").decode()}}}))
    code, out, err = await _run_cli("pull", "--store", str(tmp_path / "s"), f"{fake.host}/app/private:v1",
                                    env={"DOCKER_CONFIG": str(config_dir)})
    assert code == 1
    # the error is the whole of stderr: no progress summary before it
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dockyard: error:"), err
    assert "authentication" in lines[0]
    # the right credentials from the same config format work
    (config_dir / "config.json").write_text(json.dumps(
        {"auths": {fake.host: {"auth": base64.b64encode(b"alice:right").decode()}}}))
    code, out, err = await _run_cli("pull", "-q", "--store", str(tmp_path / "s"), f"{fake.host}/app/private:v1",
                                    env={"DOCKER_CONFIG": str(config_dir)})
    assert code == 0, err


async def test_json_mode_reports_a_failure_as_json(fake, tmp_path):
    code, out, err = await _run_cli("pull", "--json", "--store", str(tmp_path / "s"),
                                    f"{fake.host}/app/missing:v1")
    assert code == 1
    assert "not found" in json.loads(out)["error"]
    assert len(err.strip().splitlines()) == 1, err


async def test_anonymous_against_private_registry_says_login(fake, tmp_path):
    fake.basic_auth = ("alice", "right")
    fake.add_image("app/private2", "v1", [b"layer"])
    code, _, err = await _run_cli("pull", "--store", str(tmp_path / "s"), f"{fake.host}/app/private2:v1",
                                  env={"DOCKER_CONFIG": str(tmp_path / "none")})
    assert code == 1 and "dockyard login" in err and "Traceback" not in err


async def test_bad_reference_one_line(tmp_path):
    code, _, err = await _run_cli("pull", "--store", str(tmp_path / "s"), "Not/A:Valid:Ref")
    assert code == 1 and err.count("\n") == 1 and "invalid" in err


async def test_sigint_mid_download_leaves_no_partial_blob(fake, tmp_path):
    layer = os.urandom(4 * 1024 * 1024)
    fake.add_image("app/slow", "v1", [layer])
    fake.slow[digest(layer)] = 0.05   # ~1.3 MiB/s: the download is under way for seconds
    store = tmp_path / "store"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "puller", "pull", "--store", str(store), f"{fake.host}/app/slow:v1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    ingest = store / "ingest" / f"sha256-{digest(layer)[7:]}.partial"
    for _ in range(200):                        # wait until bytes are landing (<= 10 s)
        if ingest.exists() and ingest.stat().st_size > 256 * 1024:
            break
        await asyncio.sleep(0.05)
    assert ingest.exists(), "download never started"
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode != 0
    assert digest(layer)[7:] not in [p.name for p in (store / "blobs" / "sha256").iterdir()]
    assert not any(p.name.startswith(".") for p in (store / "blobs" / "sha256").iterdir())
    assert LocalStore(store).resolve(f"{fake.host}/app/slow:v1") is None
    # the staged part is kept and the next pull resumes it with Range
    fake.slow.clear()
    result = await pull(f"{fake.host}/app/slow:v1", store=LocalStore(store), options=OPTIONS)
    assert LocalStore(store).read_blob(digest(layer)) == layer
    last_get = [r for r in fake.requests if r.method == "GET" and digest(layer) in r.path][-1]
    assert last_get.headers.get("Range", "").startswith("bytes=")
    assert result.bytes_downloaded < len(layer)


async def test_platform_selection_from_index(fake, tmp_path):
    amd = fake.add_image("app/multi", "amd64", [b"amd64 layer"], platform={"os": "linux", "architecture": "amd64"})
    arm = fake.add_image("app/multi", "arm64", [b"arm64 layer"],
                         platform={"os": "linux", "architecture": "arm64", "variant": "v8"})
    index = fake.add_index("app/multi", "latest", [amd, arm])
    store = LocalStore(tmp_path / "store")
    result = await pull(f"{fake.host}/app/multi", store=store, platform="linux/arm64", options=OPTIONS)
    assert result.digest == index["digest"] and result.manifest_digest == arm["digest"]
    assert store.has_blob(digest(b"arm64 layer")) and not store.has_blob(digest(b"amd64 layer"))
    with pytest.raises(Exception, match="no image for platform linux/s390x"):
        await pull(f"{fake.host}/app/multi", store=store, platform="linux/s390x", options=OPTIONS)
    store2 = LocalStore(tmp_path / "store2")
    result = await pull(f"{fake.host}/app/multi", store=store2, all_platforms=True, options=OPTIONS)
    assert store2.resolve(f"{fake.host}/app/multi:latest") == index["digest"]
    assert store2.has_blob(digest(b"arm64 layer")) and store2.has_blob(digest(b"amd64 layer"))
    digest_arm, _, config = store2.image_for_platform(f"{fake.host}/app/multi:latest", "linux/arm64")
    assert digest_arm == arm["digest"] and config["architecture"] == "arm64"


async def test_cli_inspect_local_and_remote(fake, tmp_path):
    layer = os.urandom(1000)
    desc = fake.add_image("app/inspect", "v1", [layer])
    store = str(tmp_path / "s")
    code, out, err = await _run_cli("inspect", "--remote", f"{fake.host}/app/inspect:v1")
    assert code == 0, err
    remote = json.loads(out)
    assert remote["digest"] == desc["digest"] and remote["config"]["os"] == "linux"
    code, out, err = await _run_cli("inspect", "--store", store, f"{fake.host}/app/inspect:v1")
    assert code == 1 and "not in the store" in err
    code, out, err = await _run_cli("pull", "--json", "--store", store, f"{fake.host}/app/inspect:v1")
    assert code == 0 and json.loads(out)["layers"][0]["digest"] == digest(layer)
    code, out, err = await _run_cli("inspect", "--store", store, f"{fake.host}/app/inspect:v1")
    assert code == 0 and json.loads(out)["manifest_digest"] == desc["digest"]


async def test_progress_bars_and_summary(fake, tmp_path):
    import io
    from puller.transfer.progress import PlainProgress, RichProgress
    layer = os.urandom(2 * 1024 * 1024)
    fake.add_image("app/progress", "v1", [layer])
    stream = io.StringIO()
    bars = RichProgress(stream)
    await pull(f"{fake.host}/app/progress:v1", store=LocalStore(tmp_path / "a"), options=OPTIONS, progress=bars)
    bars.close("pulled")
    text = stream.getvalue()
    assert digest(layer)[7:19] in text and "MB" in text and "2 blob(s) transferred" in text
    stream = io.StringIO()
    plain = PlainProgress(stream)
    await pull(f"{fake.host}/app/progress:v1", store=LocalStore(tmp_path / "a"), options=OPTIONS, progress=plain)
    plain.close("pulled")
    assert stream.getvalue().count("\n") == 1 and "2 already present" in stream.getvalue()


async def test_blob_longer_than_its_descriptor_is_rejected(fake, tmp_path):
    layer = os.urandom(3 * 1024 * 1024)
    fake.add_image("app/oversize", "v1", [layer])
    fake.oversize.add(digest(layer))
    store = LocalStore(tmp_path / "store")
    with pytest.raises(DigestMismatchError, match="more than"):
        await pull(f"{fake.host}/app/oversize:v1", store=store, options=OPTIONS)
    assert not store.has_blob(digest(layer))
    assert not list((store.root / "ingest").glob(f"sha256-{digest(layer)[7:]}.partial*"))
