"""References parsed the way Docker parses them; the local store's layout."""

from __future__ import annotations

import json
import os

import pytest

from puller.client.reference import (ReferenceError, choose_platform, is_loopback, parse_platform, parse_reference)
from puller.store import REF_NAME, LocalStore, default_store_root
from storage.oci.digests import digest_of as sha256_digest

HEX = "a" * 64


@pytest.mark.parametrize("text, normalised, api_host", [
    ("busybox", "docker.io/library/busybox:latest", "registry-1.docker.io"),
    ("library/busybox:1.36", "docker.io/library/busybox:1.36", "registry-1.docker.io"),
    ("user/app", "docker.io/user/app:latest", "registry-1.docker.io"),
    ("index.docker.io/user/app:v1", "docker.io/user/app:v1", "registry-1.docker.io"),
    ("docker.io/busybox", "docker.io/library/busybox:latest", "registry-1.docker.io"),
    ("localhost/app", "localhost/app:latest", "localhost"),
    ("localhost:5000/a/b/c:t", "localhost:5000/a/b/c:t", "localhost:5000"),
    ("127.0.0.1:5000/busybox:latest", "127.0.0.1:5000/busybox:latest", "127.0.0.1:5000"),
    ("[::1]:5000/ns/app:v2", "[::1]:5000/ns/app:v2", "[::1]:5000"),
    ("registry.example.com/ns/app", "registry.example.com/ns/app:latest", "registry.example.com"),
    (f"busybox@sha256:{HEX}", f"docker.io/library/busybox@sha256:{HEX}", "registry-1.docker.io"),
    (f"h.io:443/x:tag@sha256:{HEX}", f"h.io:443/x:tag@sha256:{HEX}", "h.io:443"),
    ("a-b__c/e.f", "docker.io/a-b__c/e.f:latest", "registry-1.docker.io"),
])
def test_parse_like_docker(text, normalised, api_host):
    ref = parse_reference(text)
    assert str(ref) == normalised and ref.api_host == api_host


def test_digest_wins_and_parts():
    ref = parse_reference(f"127.0.0.1:5000/ns/app:v1@sha256:{HEX}")
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == ("127.0.0.1:5000", "ns/app", "v1", f"sha256:{HEX}")
    assert ref.identifier == f"sha256:{HEX}"


@pytest.mark.parametrize("bad", [
    "", " busybox", "Busybox/App", "docker.io/UPPER", "app:", "app:-x", "app:" + "t" * 129, "app@sha256:abc",
    "app@sha256:" + "A" * 64, "app@md5:" + "a" * 32, "a//b", "a/b/", "/a", "app@", "-app", "app..x",
    "host:port:bad/x", "x" * 256 + "/y",
])
def test_bad_references_are_one_line_errors(bad):
    with pytest.raises(ReferenceError) as info:
        parse_reference(bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("host, loopback", [
    ("localhost", True), ("localhost:5000", True), ("127.0.0.1:5000", True), ("127.9.9.9", True),
    ("[::1]:5000", True), ("::1", True), ("10.0.0.1:5000", False), ("registry.example.com", False),
    ("128.0.0.1", False),
])
def test_loopback_detection(host, loopback):
    assert is_loopback(host) is loopback


def test_platform_choice():
    entries = [
        {"digest": "a", "platform": {"os": "linux", "architecture": "amd64"}},
        {"digest": "b", "platform": {"os": "linux", "architecture": "arm", "variant": "v6"}},
        {"digest": "c", "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
        {"digest": "d", "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"digest": "e", "platform": {"os": "unknown", "architecture": "unknown"}},
    ]
    assert choose_platform(entries, parse_platform("linux/amd64"))["digest"] == "a"
    assert choose_platform(entries, parse_platform("linux/arm64"))["digest"] == "d"
    assert choose_platform(entries, parse_platform("linux/arm64/v8"))["digest"] == "d"
    assert choose_platform(entries, parse_platform("linux/arm"))["digest"] == "c"
    assert choose_platform(entries, parse_platform("linux/arm/v6"))["digest"] == "b"
    assert choose_platform(entries, parse_platform("linux/s390x")) is None
    with pytest.raises(ReferenceError):
        parse_platform("linux")


def test_default_store_root_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_store_root() == tmp_path / "dockyard" / "store"
    assert LocalStore().root == tmp_path / "dockyard" / "store"


def test_store_layout_records_and_replaces_atomically(tmp_path):
    store = LocalStore(tmp_path / "s")
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    config_digest = store.write_blob(config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": config_digest, "size": len(config)}, "layers": []}).encode()
    digest = store.write_blob(manifest)
    desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": len(manifest)}
    store.record("127.0.0.1:5000/app:v1", desc)
    store.record("127.0.0.1:5000/app:v2", desc)
    store.record("127.0.0.1:5000/app:v1", desc)
    assert json.loads((store.root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    names = [d["annotations"][REF_NAME] for d in json.loads((store.root / "index.json").read_text())["manifests"]]
    assert sorted(names) == ["127.0.0.1:5000/app:v1", "127.0.0.1:5000/app:v2"]
    # lookups normalise what the user typed
    assert store.resolve("127.0.0.1:5000/app:v1") == digest
    assert store.resolve("127.0.0.1:5000/app:v3") is None
    got_digest, got_manifest, got_config = store.image_for_platform("127.0.0.1:5000/app:v1")
    assert got_digest == digest and got_config["architecture"] == "amd64"
    with pytest.raises(Exception, match="not linux/arm64"):
        store.image_for_platform("127.0.0.1:5000/app:v1", "linux/arm64")
    # nothing temporary is left next to blobs
    assert all(not p.name.startswith(".") for p in (store.root / "blobs" / "sha256").iterdir())
    with pytest.raises(Exception, match="does not match"):
        store.write_blob(b"abc", sha256_digest(b"abd"))


def test_reclaim_ingest_keeps_what_is_in_use(tmp_path):
    """What crashed pulls left in ingest/ goes; what is fresh, resumable or
    locked by a running pull stays."""
    import fcntl
    import time
    from puller.store import STALE_PARTIAL_SECONDS, STALE_TEMP_SECONDS
    store = LocalStore(tmp_path)
    store.ensure()
    ingest = tmp_path / "ingest"
    now = time.time()
    ages = {
        "sha256-aa.partial": 60,                                  # resumable, recent
        "sha256-bb.partial": STALE_PARTIAL_SECONDS + 60,          # abandoned a week ago
        "sha256-cc.partial.4242.deadbeef": STALE_TEMP_SECONDS + 60,   # a crashed pull's private file
        "sha256-dd.partial.4243.feedface": 60,                    # a private file just made
        ".tmp-old": STALE_TEMP_SECONDS + 60,
        "sha256-ee.partial": STALE_PARTIAL_SECONDS + 60,          # old, but a pull holds it
    }
    for name, age in ages.items():
        path = ingest / name
        path.write_bytes(b"x")
        os.utime(path, (now - age, now - age))
    (tmp_path / ".tmp-index").write_bytes(b"{}")
    os.utime(tmp_path / ".tmp-index", (now - STALE_TEMP_SECONDS - 60,) * 2)
    with open(ingest / "sha256-ee.partial", "ab") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        removed = store.reclaim_ingest(now=now)
    assert sorted(removed) == [".tmp-index", ".tmp-old", "sha256-bb.partial", "sha256-cc.partial.4242.deadbeef"]
    assert sorted(p.name for p in ingest.iterdir()) == [".index.lock", "sha256-aa.partial",
                                                        "sha256-dd.partial.4243.feedface", "sha256-ee.partial"]
    assert (tmp_path / "index.json").exists() and (tmp_path / "oci-layout").exists()


def test_docker_image_recorded_through_oci_view(tmp_path):
    store = LocalStore(tmp_path / "s")
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    layer = os.urandom(100)
    layer_digest = store.write_blob(layer)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": store.write_blob(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": layer_digest,
                    "size": 100}]}).encode()
    digest = store.write_blob(manifest)
    store.record("h:1/app:v1", {"mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                                "digest": digest, "size": len(manifest)})
    entry = store.descriptor("h:1/app:v1")
    assert entry["mediaType"] == "application/vnd.oci.image.manifest.v1+json" and entry["digest"] != digest
    view = store.read_json(entry["digest"])
    assert view["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert view["layers"][0]["digest"] == layer_digest
    # the registry's own digest and manifest remain what the API answers
    assert store.resolve("h:1/app:v1") == digest
    assert store.image_for_platform("h:1/app:v1")[0] == digest


async def test_copy_between_oci_layouts(tmp_path):
    from tests.support.content import write_oci_layout
    from puller.transfer.copy import copy
    image = write_oci_layout(tmp_path / "a", layer_sizes=[5000, 70_000], tag="v1")
    result = await copy(f"oci:{tmp_path / 'a'}:v1", f"oci:{tmp_path / 'b'}:copied")
    assert result.digest == image.digest
    dest = LocalStore(tmp_path / "b")
    assert dest.resolve("copied") == image.digest
    for layer in image.layers:
        assert dest.read_blob(layer) == LocalStore(tmp_path / "a").read_blob(layer)
    with pytest.raises(Exception, match="is not in"):
        await copy(f"oci:{tmp_path / 'a'}:nope", f"oci:{tmp_path / 'c'}:x")
