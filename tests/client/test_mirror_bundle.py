"""`dockyard mirror export|import|inventory` between real registries on
loopback (Dockyard and CNCF Distribution, each as source and target): round
trips through a signed bundle, deltas from an inventory or a previous
bundle, refusals that push nothing, and an import killed with SIGKILL.

The images are pushed by hand (tests.support.registry_http), so the client
under test is not what put them there. Spec references: OCI distribution
spec 1.1 "Listing Referrers" and "Pushing Manifests with Subject" (the
referrers API and the tag schema fallback), image spec image-layout.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from tests.support import REPO_ROOT
from tests.support.content import (OCI_EMPTY, OCI_INDEX, OCI_LAYER_TAR, OCI_MANIFEST, OCI_CONFIG, image_config,
                                   random_tar_layer, sha256_digest, tar_layer)
from tests.support.launch import dockyard_command
from tests.support.peers import run
from tests.support.registry_http import http_request, push_blob, put_manifest

pytestmark = pytest.mark.interop

SIGNATURE_TYPE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM_TYPE = "application/spdx+json"
PAIRS = [("dockyard_registry", "distribution_registry"), ("distribution_registry", "dockyard_registry")]


# ---- helpers (also used by tests/interop/test_mirror_interop.py) ----------------------

def dockyard(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    return run([*dockyard_command(), *args], timeout=timeout, check=check,
               env={"PYTHONPATH": str(REPO_ROOT), "DOCKER_CONFIG": "/nonexistent-dockyard-config"})


def dockyard_json(*args: str, **kw) -> dict:
    return json.loads(dockyard(*args, "--json", **kw).stdout)


def kill_when(argv: list[str], condition, timeout: float = 60) -> None:
    """Run a dockyard command and SIGKILL it once condition() holds (polled; bounded)."""
    proc = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None and not condition():
            time.sleep(0.01)
        assert proc.poll() is None, f"{argv[2:4]} ended before it could be killed: {proc.stderr.read()!r}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _body(document: dict) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def push_image(url: str, repo: str, layers: list[bytes], tag: str | None = None, *,
               architecture: str = "amd64") -> dict:
    """An OCI image of uncompressed tar layers, pushed blob by blob; its descriptor."""
    config = _body(image_config([sha256_digest(l) for l in layers], architecture=architecture))
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": push_blob(url, repo, config), "size": len(config)},
                "layers": [{"mediaType": OCI_LAYER_TAR, "digest": push_blob(url, repo, l), "size": len(l)}
                           for l in layers]}
    body = _body(manifest)
    digest = sha256_digest(body)
    answer = put_manifest(url, repo, tag or digest, body, OCI_MANIFEST)
    assert answer.status == 201, answer.body
    return {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body),
            "platform": {"os": "linux", "architecture": architecture}}


def push_index(url: str, repo: str, tag: str, children: list[dict]) -> dict:
    body = _body({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children})
    answer = put_manifest(url, repo, tag, body, OCI_INDEX)
    assert answer.status == 201, answer.body
    return {"mediaType": OCI_INDEX, "digest": sha256_digest(body), "size": len(body)}


def push_referrer(url: str, repo: str, subject: dict, artifact_type: str, payload: bytes) -> dict:
    """An artifact manifest whose subject is `subject`; where the registry
    answers no OCI-Subject (no referrers API), the tag schema index is kept
    as a client would (spec: "Pushing Manifests with Subject")."""
    push_blob(url, repo, b"{}")
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
                "config": {"mediaType": OCI_EMPTY, "digest": sha256_digest(b"{}"), "size": 2},
                "layers": [{"mediaType": artifact_type, "digest": push_blob(url, repo, payload),
                            "size": len(payload)}],
                "subject": {k: subject[k] for k in ("mediaType", "digest", "size")}}
    body = _body(manifest)
    digest = sha256_digest(body)
    answer = put_manifest(url, repo, digest, body, OCI_MANIFEST)
    assert answer.status == 201, answer.body
    descriptor = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body), "artifactType": artifact_type}
    if "OCI-Subject" not in answer.headers:
        tag = subject["digest"].replace(":", "-")
        current = http_request("GET", f"{url}/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_INDEX})
        listed = current.json()["manifests"] if current.status == 200 else []
        push_index(url, repo, tag, listed + [descriptor])
    return descriptor


def manifest_head(url: str, repo: str, ref: str) -> str | None:
    answer = http_request("HEAD", f"{url}/v2/{repo}/manifests/{ref}",
                          headers={"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"})
    return answer.headers.get("Docker-Content-Digest") if answer.status == 200 else None


def blob_present(url: str, repo: str, digest: str) -> bool:
    return http_request("HEAD", f"{url}/v2/{repo}/blobs/{digest}").status == 200


def referrer_digests(url: str, repo: str, digest: str) -> set[str]:
    """What the registry lists as referrers of digest: the API, else the tag schema."""
    answer = http_request("GET", f"{url}/v2/{repo}/referrers/{digest}")
    if answer.status != 200:
        answer = http_request("GET", f"{url}/v2/{repo}/manifests/{digest.replace(':', '-')}",
                              headers={"Accept": OCI_INDEX})
        if answer.status != 200:
            return set()
    return {m["digest"] for m in answer.json()["manifests"]}


def write_key(path: Path, kind: str = "ed25519") -> tuple[Path, Path]:
    """(private, public) PEM files of a fresh key."""
    key = ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" else ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    public = path.with_suffix(".pub")
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return path, public


def bundle_members(bundle: Path) -> dict[str, int]:
    with tarfile.open(bundle) as tar:
        return {m.name: m.size for m in tar.getmembers() if m.isfile()}


def bundle_manifest(bundle: Path) -> dict:
    with tarfile.open(bundle) as tar:
        return json.loads(tar.extractfile("dockyard-bundle.json").read())


def multiarch_with_referrers(url: str, repo: str, tag: str = "v1") -> dict:
    """An index of amd64 and arm64 sharing a base layer, with a signature on
    the index and an SBOM on the amd64 image. Digests by role."""
    base = tar_layer({"etc/os-release": b"ID=test\n" + os.urandom(2048)})
    amd64 = push_image(url, repo, [base, random_tar_layer(50_000, "amd64.bin")], architecture="amd64")
    arm64 = push_image(url, repo, [base, random_tar_layer(50_000, "arm64.bin")], architecture="arm64")
    index = push_index(url, repo, tag, [amd64, arm64])
    signature = push_referrer(url, repo, index, SIGNATURE_TYPE, b'{"sig": "' + os.urandom(8).hex().encode() + b'"}')
    sbom = push_referrer(url, repo, amd64, SBOM_TYPE, b'{"spdxVersion": "SPDX-2.3"}')
    return {"index": index["digest"], "amd64": amd64["digest"], "arm64": arm64["digest"],
            "signature": signature["digest"], "sbom": sbom["digest"], "base": sha256_digest(base)}


@pytest.fixture(params=PAIRS, ids=["dockyard-to-distribution", "distribution-to-dockyard"])
def pair(request):
    source, target = request.param
    return request.getfixturevalue(source), request.getfixturevalue(target)


# ---- round trips ----------------------------------------------------------------------

def test_round_trip_multiarch_index_with_signature_and_sbom(pair, tmp_path):
    source, target = pair
    repo, prefix = unique("mirror/app"), unique("airgap")
    image = multiarch_with_referrers(source.url, repo)
    key, public = write_key(tmp_path / "signing.pem")
    bundle = tmp_path / "bundle.tar"

    exported = dockyard_json("mirror", "export", "--images", f"{source.host}/{repo}:v1", "--referrers",
                             "--sign-key", str(key), "--output", str(bundle))
    assert exported["signed"] and exported["referrers"] == 2
    members = bundle_members(bundle)
    listed = bundle_manifest(bundle)
    # blobs once: the base layer shared by both platforms is one member
    assert sum(1 for name in members if name == f"blobs/sha256/{image['base'][7:]}") == 1
    assert {image[k] for k in ("index", "amd64", "arm64", "signature", "sbom")} <= \
        {m["digest"] for m in listed["manifests"]}
    assert listed["prerequisites"] == []
    for entry in listed["blobs"] + listed["manifests"]:
        assert members[f"blobs/sha256/{entry['digest'][7:]}"] == entry["size"]
    index_json = json.loads(tarfile.open(bundle).extractfile("index.json").read())
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in index_json["manifests"]] == \
        [f"{source.host}/{repo}:v1"]

    imported = dockyard_json("mirror", "import", str(bundle), "--to", f"{target.host}/{prefix}",
                             "--verify-key", str(public))
    assert imported["signature"] == "verified"
    dest = f"{prefix}/{repo}"
    assert imported["tags"] == [f"{target.host}/{dest}:v1"]
    assert manifest_head(target.url, dest, "v1") == image["index"]          # digests preserved
    for role in ("amd64", "arm64", "signature", "sbom"):
        assert manifest_head(target.url, dest, image[role]) == image[role]
    assert image["signature"] in referrer_digests(target.url, dest, image["index"])
    assert image["sbom"] in referrer_digests(target.url, dest, image["amd64"])

    # a second import moves nothing
    again = dockyard_json("mirror", "import", str(bundle), "--to", f"{target.host}/{prefix}")
    assert again["bytes_uploaded"] == 0 and again["blobs_uploaded"] == 0 and again["manifests_pushed"] == 0
    assert again["signature"] == "unchecked"


def test_platform_narrows_an_index_to_one_image(dockyard_registry, distribution_registry, tmp_path):
    repo = unique("mirror/plat")
    image = multiarch_with_referrers(dockyard_registry.url, repo)
    bundle = tmp_path / "arm.tar.zst"
    exported = dockyard_json("mirror", "export", "--images", f"{dockyard_registry.host}/{repo}:v1",
                             "--platform", "linux/arm64", "--zstd", "--output", str(bundle))
    assert exported["images"][0]["digest"] == image["arm64"]
    assert bundle.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"          # zstd frame magic
    prefix = unique("plat")
    dockyard("mirror", "import", str(bundle), "--to", f"{distribution_registry.host}/{prefix}", "-q")
    dest = f"{prefix}/{repo}"
    assert manifest_head(distribution_registry.url, dest, "v1") == image["arm64"]
    assert manifest_head(distribution_registry.url, dest, image["amd64"]) is None


def test_images_file_tag_regex_and_semver(dockyard_registry, distribution_registry, tmp_path):
    repo = unique("mirror/tags")
    url = dockyard_registry.url
    for tag in ("1.0.0", "1.4.2", "2.0.0", "1.5.0-rc.1", "latest", "nightly-1", "nightly-2", "other"):
        push_image(url, repo, [tar_layer({"tag": tag.encode()})], tag)
    images = tmp_path / "images.yml"
    images.write_text(f"repositories:\n  {dockyard_registry.host}/{repo}:\n"
                      f"    tags: ['nightly-[0-9]+', latest]\n    semver: '>=1.0 <2'\n")
    bundle = tmp_path / "tags.tar"
    exported = dockyard_json("mirror", "export", "--images", str(images), "--output", str(bundle))
    assert sorted(i["source"].rsplit(":", 1)[1] for i in exported["images"]) == \
        ["1.0.0", "1.4.2", "latest", "nightly-1", "nightly-2"]


def test_images_file_errors_name_their_line(tmp_path):
    images = tmp_path / "images.yml"
    images.write_text("images:\n  - 127.0.0.1:5000/ok:v1\n  - 127.0.0.1:5000/NOT OK\n")
    failed = dockyard("mirror", "export", "--images", str(images), "--output", str(tmp_path / "b.tar"),
                      check=False)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [f"dockyard: error: {images}:3: invalid reference "
                                                  f"'127.0.0.1:5000/NOT OK': invalid repository name: 'NOT OK'"]
    images.write_text("repositories:\n  127.0.0.1:5000/app:\n    tags: ['v1']\n    semver: '>=x.1'\n")
    failed = dockyard("mirror", "export", "--images", str(images), "--output", str(tmp_path / "b.tar"),
                      check=False)
    assert failed.returncode == 1 and f"{images}:4: semver range" in failed.stderr
    assert not (tmp_path / "b.tar").exists()


# ---- deltas ---------------------------------------------------------------------------

def _two_versions(url: str, repo: str) -> tuple[list[bytes], list[bytes]]:
    """v1 and v2 of one image: three layers, the last one changed in v2."""
    layers = [random_tar_layer(200_000, f"l{i}.bin") for i in range(3)]
    changed = layers[:2] + [random_tar_layer(200_000, "l2.bin")]
    push_image(url, repo, layers, "v1")
    return layers, changed


@pytest.mark.parametrize("how", ["have", "since"])
def test_delta_after_one_layer_changed_carries_only_that_layer(pair, tmp_path, how):
    source, target = pair
    repo, prefix = unique("mirror/delta"), unique("delta")
    layers, changed = _two_versions(source.url, repo)
    ref = f"{source.host}/{repo}:v1"
    full = tmp_path / "full.tar"
    dockyard("mirror", "export", "--images", ref, "--output", str(full), "-q")
    dockyard("mirror", "import", str(full), "--to", f"{target.host}/{prefix}", "-q")

    new = push_image(source.url, repo, changed, "v1")                  # v1 moves to the new image
    if how == "have":
        have = tmp_path / "have.json"
        listed = dockyard_json("mirror", "inventory", f"{target.host}/{prefix}", "--output", str(have))
        assert listed["repositories"] == 1 and not listed["truncated"]
        delta_args = ["--have", str(have)]
    else:
        delta_args = ["--since", str(full)]
    delta = tmp_path / "delta.tar"
    exported = dockyard_json("mirror", "export", "--images", ref, *delta_args, "--output", str(delta))
    listed = bundle_manifest(delta)
    config = json.loads(http_request("GET", f"{source.url}/v2/{repo}/manifests/v1",
                                     headers={"Accept": OCI_MANIFEST}).body)["config"]["digest"]
    assert {b["digest"] for b in listed["blobs"]} == {sha256_digest(changed[2]), config}
    assert [m["digest"] for m in listed["manifests"]] == [new["digest"]]
    assert {p["digest"] for p in listed["prerequisites"]} == {sha256_digest(l) for l in layers[:2]}
    assert exported["carried_bytes"] < sum(len(l) for l in changed)
    assert os.path.getsize(delta) < os.path.getsize(full) / 2

    imported = dockyard_json("mirror", "import", str(delta), "--to", f"{target.host}/{prefix}")
    assert imported["blobs_uploaded"] == 2
    assert manifest_head(target.url, f"{prefix}/{repo}", "v1") == new["digest"]

    # nothing changed since: the next delta carries no image at all
    again = dockyard_json("mirror", "export", "--images", ref, "--since", str(delta), "--output",
                          str(tmp_path / "none.tar"))
    assert [i["state"] for i in again["images"]] == ["unchanged"] and again["blobs"] == 0


def test_delta_onto_a_registry_missing_its_base_is_refused_before_any_push(pair, tmp_path):
    source, target = pair
    repo, prefix = unique("mirror/base"), unique("base")
    layers, changed = _two_versions(source.url, repo)
    full = tmp_path / "full.tar"
    ref = f"{source.host}/{repo}:v1"
    dockyard("mirror", "export", "--images", ref, "--output", str(full), "-q")
    push_image(source.url, repo, changed, "v1")
    delta = tmp_path / "delta.tar"
    dockyard("mirror", "export", "--images", ref, "--since", str(full), "--output", str(delta), "-q")

    elsewhere = unique("empty")                     # the full bundle was never imported here
    failed = dockyard("mirror", "import", str(delta), "--to", f"{target.host}/{elsewhere}", check=False)
    assert failed.returncode == 1
    line = failed.stderr.strip()
    assert line.startswith("dockyard: error: ") and "lacks 2 prerequisite(s)" in line and "\n" not in line
    for layer in layers[:2]:
        assert sha256_digest(layer) in line
    dest = f"{elsewhere}/{repo}"
    assert not blob_present(target.url, dest, sha256_digest(changed[2]))   # not even the carried layer
    assert manifest_head(target.url, dest, "v1") is None


# ---- damaged bundles ------------------------------------------------------------------

def _rewrite_member(bundle: Path, name: str, change) -> None:
    """Change one member's bytes in place (same length), as a damaged medium would."""
    with tarfile.open(bundle) as tar:
        member = tar.getmember(name)
        offset, size = member.offset_data, member.size
    with open(bundle, "r+b") as handle:
        handle.seek(offset)
        data = bytearray(handle.read(size))
        change(data)
        assert len(data) == size
        handle.seek(offset)
        handle.write(data)


def test_corrupted_blob_is_refused_and_nothing_is_tagged(pair, tmp_path):
    source, target = pair
    repo, prefix = unique("mirror/corrupt"), unique("corrupt")
    big = random_tar_layer(3 * 1024 * 1024, "big.bin")
    push_image(source.url, repo, [tar_layer({"a": b"a"}), big], "v1")
    bundle = tmp_path / "b.tar"
    dockyard("mirror", "export", "--images", f"{source.host}/{repo}:v1", "--output", str(bundle), "-q")

    def flip(data: bytearray) -> None:
        data[len(data) // 2] ^= 0xFF
    _rewrite_member(bundle, f"blobs/sha256/{sha256_digest(big)[7:]}", flip)
    failed = dockyard("mirror", "import", str(bundle), "--to", f"{target.host}/{prefix}", check=False)
    assert failed.returncode == 1
    assert "does not match its digest" in failed.stderr and len(failed.stderr.strip().splitlines()) == 1
    dest = f"{prefix}/{repo}"
    assert manifest_head(target.url, dest, "v1") is None
    assert not blob_present(target.url, dest, sha256_digest(big))


def test_tampered_bundle_manifest_is_refused(dockyard_registry, tmp_path):
    repo, prefix = unique("mirror/tamper"), unique("tamper")
    push_image(dockyard_registry.url, repo, [tar_layer({"a": b"tamper"})], "v1")
    key, public = write_key(tmp_path / "k.pem", "ecdsa")
    bundle = tmp_path / "b.tar"
    dockyard("mirror", "export", "--images", f"{dockyard_registry.host}/{repo}:v1", "--sign-key", str(key),
             "--output", str(bundle), "-q")

    def retag(data: bytearray) -> None:
        data[:] = bytes(data).replace(b'"tag": "v1"', b'"tag": "v6"')
    _rewrite_member(bundle, "dockyard-bundle.json", retag)
    failed = dockyard("mirror", "import", str(bundle), "--to", f"{dockyard_registry.host}/{prefix}",
                      "--verify-key", str(public), check=False)
    assert failed.returncode == 1 and "does not match its signature" in failed.stderr
    assert manifest_head(dockyard_registry.url, f"{prefix}/{repo}", "v6") is None
    # another key: refused as such
    _, other = write_key(tmp_path / "other.pem")
    failed = dockyard("mirror", "import", str(bundle), "--to", f"{dockyard_registry.host}/{prefix}",
                      "--verify-key", str(other), check=False)
    assert failed.returncode == 1 and "signed by another key" in failed.stderr
    assert http_request("GET", f"{dockyard_registry.url}/v2/{prefix}/{repo}/tags/list").status == 404


def test_unsigned_bundle_is_refused_with_verify_key(dockyard_registry, tmp_path):
    repo = unique("mirror/unsigned")
    push_image(dockyard_registry.url, repo, [tar_layer({"a": b"u"})], "v1")
    _, public = write_key(tmp_path / "k.pem")
    bundle = tmp_path / "b.tar"
    dockyard("mirror", "export", "--images", f"{dockyard_registry.host}/{repo}:v1", "--output", str(bundle), "-q")
    failed = dockyard("mirror", "import", str(bundle), "--to", f"{dockyard_registry.host}/x",
                      "--verify-key", str(public), "--json", check=False)
    assert failed.returncode == 1 and "not signed" in json.loads(failed.stdout)["error"]


# ---- interrupted import ---------------------------------------------------------------

def test_import_killed_midway_resumes_without_resending(dockyard_registry, start_dockyard, tmp_path):
    target = start_dockyard()
    repo = unique("mirror/kill")
    layers = [random_tar_layer(12 * 1024 * 1024, f"l{i}.bin") for i in range(8)]
    push_image(dockyard_registry.url, repo, layers, "v1")
    bundle = tmp_path / "b.tar"
    dockyard("mirror", "export", "--images", f"{dockyard_registry.host}/{repo}:v1", "--output", str(bundle), "-q")
    digests = [sha256_digest(l) for l in layers]

    argv = [*dockyard_command(), "mirror", "import", str(bundle), "--to", f"{target.host}/k", "-q",
            "--concurrency", "1"]
    kill_when(argv, lambda: blob_present(target.url, f"k/{repo}", digests[1]))
    landed = [d for d in digests if blob_present(target.url, f"k/{repo}", d)]
    assert 2 <= len(landed) < len(digests)
    assert manifest_head(target.url, f"k/{repo}", "v1") is None           # no tag before its image is whole

    again = dockyard_json("mirror", "import", str(bundle), "--to", f"{target.host}/k", "--concurrency", "1")
    sizes = dict(zip(digests, map(len, layers)))
    assert again["blobs_existing"] >= len(landed)
    assert again["bytes_uploaded"] <= sum(sizes[d] for d in digests if d not in landed) + 4096   # + the config
    assert manifest_head(target.url, f"k/{repo}", "v1") is not None


# ---- volumes --------------------------------------------------------------------------

@pytest.mark.parametrize("compress", [False, True], ids=["tar", "zstd"])
def test_volumes_of_a_size_limit_import_in_any_order(dockyard_registry, distribution_registry, tmp_path, compress):
    repo, prefix = unique("mirror/vol"), unique("vol")
    layers = [random_tar_layer(700_000, f"v{i}.bin") for i in range(3)]
    image = push_image(dockyard_registry.url, repo, layers, "v1")
    limit = 256 * 1024
    output = tmp_path / "media" / "bundle.tar"
    output.parent.mkdir()
    exported = dockyard_json("mirror", "export", "--images", f"{dockyard_registry.host}/{repo}:v1",
                             "--max-size", "256K", *(["--zstd"] if compress else []), "--output", str(output))
    volumes = sorted(output.parent.iterdir())
    assert [str(v) for v in volumes] == exported["volumes"] and len(volumes) >= 8
    assert all(v.stat().st_size <= limit for v in volumes) and not output.exists()

    # volumes renamed and handed over backwards: their headers say where each belongs
    shuffled = []
    for number, volume in enumerate(reversed(volumes)):
        shuffled.append(volume.rename(tmp_path / f"disc-{number}"))
    missing = dockyard("mirror", "import", *map(str, shuffled[1:]), "--to", f"{distribution_registry.host}/{prefix}",
                       check=False)
    assert missing.returncode == 1 and "missing" in missing.stderr
    imported = dockyard_json("mirror", "import", *map(str, shuffled), "--to", f"{distribution_registry.host}/{prefix}")
    assert imported["blobs_uploaded"] == 4
    assert manifest_head(distribution_registry.url, f"{prefix}/{repo}", "v1") == image["digest"]


# ---- registry to registry -------------------------------------------------------------

def test_sync_twice_moves_nothing_the_second_time_and_goes_on_past_a_failure(pair, tmp_path):
    source, target = pair
    repo, prefix = unique("mirror/sync"), unique("sync")
    image = multiarch_with_referrers(source.url, repo)
    for tag in ("1.0.0", "1.1.0", "2.0.0"):
        push_image(source.url, repo, [tar_layer({"v": tag.encode()}), random_tar_layer(100_000)], tag)
    config = tmp_path / "sync.yml"
    config.write_text(f"target: {target.host}/{prefix}\nreferrers: true\n"
                      f"images:\n  - {source.host}/{repo}:v1\n  - {source.host}/{repo}:gone\n"
                      f"repositories:\n  {source.host}/{repo}:\n    semver: '^1'\n")
    first = dockyard("mirror", "sync", str(config), "--json", check=False)
    assert first.returncode == 1                               # :gone failed, the rest went on
    assert first.stderr.strip().splitlines() == [f"dockyard: error: {source.host}/{repo}:gone: "
                                                 f"manifest {source.host}/{repo}:gone: not found"]
    summary = json.loads(first.stdout)
    assert (summary["copied"], summary["failed"]) == (3, 1) and summary["bytes_transferred"] > 200_000
    dest = f"{prefix}/{repo}"
    assert manifest_head(target.url, dest, "v1") == image["index"]
    assert image["signature"] in referrer_digests(target.url, dest, image["index"])
    assert manifest_head(target.url, dest, "1.1.0") and manifest_head(target.url, dest, "2.0.0") is None

    second = json.loads(dockyard("mirror", "sync", str(config), "--json", check=False).stdout)
    assert (second["copied"], second["unchanged"], second["bytes_transferred"]) == (0, 3, 0)


def test_delta_for_a_new_tag_of_an_image_the_far_side_has_carries_its_manifest_alone(pair, tmp_path):
    source, target = pair
    repo, prefix = unique("mirror/retag"), unique("retag")
    layers, _ = _two_versions(source.url, repo)
    full = tmp_path / "full.tar"
    dockyard("mirror", "export", "--images", f"{source.host}/{repo}:v1", "--output", str(full), "-q")
    dockyard("mirror", "import", str(full), "--to", f"{target.host}/{prefix}", "-q")
    digest = manifest_head(source.url, repo, "v1")
    body = http_request("GET", f"{source.url}/v2/{repo}/manifests/v1", headers={"Accept": OCI_MANIFEST}).body
    assert put_manifest(source.url, repo, "stable", body).status == 201

    have = tmp_path / "have.json"
    dockyard("mirror", "inventory", f"{target.host}/{prefix}", "--output", str(have), "-q")
    delta = tmp_path / "delta.tar"
    exported = dockyard_json("mirror", "export", "--images", f"{source.host}/{repo}:v1",
                             f"{source.host}/{repo}:stable", "--have", str(have), "--output", str(delta))
    assert [i["state"] for i in exported["images"]] == ["unchanged", "present"]
    listed = bundle_manifest(delta)
    assert listed["blobs"] == [] and [m["digest"] for m in listed["manifests"]] == [digest]
    imported = dockyard_json("mirror", "import", str(delta), "--to", f"{target.host}/{prefix}")
    assert imported["bytes_uploaded"] == 0
    assert manifest_head(target.url, f"{prefix}/{repo}", "stable") == digest
    # onto a registry that never had it: refused, naming the manifest
    failed = dockyard("mirror", "import", str(delta), "--to", f"{target.host}/{unique('none')}", check=False)
    assert failed.returncode == 1 and f"manifest {digest}" in failed.stderr


def test_import_mounts_a_blob_shared_across_repositories(pair, tmp_path):
    source, target = pair
    first, second, prefix = unique("mirror/one"), unique("mirror/two"), unique("mount")
    base = random_tar_layer(400_000, "base.bin")
    push_image(source.url, first, [base, tar_layer({"one": b"1"})], "v1")
    push_image(source.url, second, [base, tar_layer({"two": b"2"})], "v1")
    bundle = tmp_path / "b.tar"
    dockyard("mirror", "export", "--images", f"{source.host}/{first}:v1", f"{source.host}/{second}:v1",
             "--output", str(bundle), "-q")
    assert sum(1 for name in bundle_members(bundle) if name.endswith(sha256_digest(base)[7:])) == 1
    imported = dockyard_json("mirror", "import", str(bundle), "--to", f"{target.host}/{prefix}",
                             "--concurrency", "1")
    assert imported["blobs_mounted"] == 1                   # the base layer, into the second repository
    assert imported["bytes_uploaded"] < 2 * len(base)
    assert blob_present(target.url, f"{prefix}/{second}", sha256_digest(base))
    assert manifest_head(target.url, f"{prefix}/{second}", "v1")
