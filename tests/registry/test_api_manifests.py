"""Manifests: push/pull/head/delete of every manifest kind, and every error."""

from __future__ import annotations

import hashlib
import json

from tests.registry.regapi import (DOCKER_LIST, DOCKER_MANIFEST, OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST,
                    digest_of, error_codes)


async def test_push_and_pull_oci_manifest_by_tag_and_digest(registry):
    digest, body = await registry.push_image("library/alpine", "3.19")
    for reference in ("3.19", digest):
        resp = await registry.get(f"/v2/library/alpine/manifests/{reference}",
                                  headers={"Accept": OCI_MANIFEST})
        assert resp.status == 200
        assert await resp.read() == body            # byte for byte as pushed
        assert resp.headers["Content-Type"] == OCI_MANIFEST
        assert resp.headers["Docker-Content-Digest"] == digest
        assert resp.headers["Content-Length"] == str(len(body))
        head = await registry.head(f"/v2/library/alpine/manifests/{reference}")
        assert head.status == 200
        assert head.headers["Content-Length"] == str(len(body))
        assert head.headers["Docker-Content-Digest"] == digest
        assert head.headers["Content-Type"] == OCI_MANIFEST
        assert await head.read() == b""


async def test_put_response_headers(registry):
    config = b'{"os":"linux"}'
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": await registry.push_blob("hdrs", config),
                           "size": len(config)}, "layers": []}
    body = json.dumps(manifest, indent=3).encode()   # unusual formatting is kept as is
    resp = await registry.push_manifest("hdrs", "v1", body)
    assert resp.status == 201
    digest = digest_of(body)
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["Location"] == f"/v2/hdrs/manifests/{digest}"
    assert "OCI-Subject" not in resp.headers
    got = await registry.get(resp.headers["Location"])
    assert await got.read() == body


async def test_content_type_is_echoed_whatever_accept_says(registry):
    digest, body = await registry.push_image("docker/img", "v1", media_type=DOCKER_MANIFEST)
    resp = await registry.get("/v2/docker/img/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == DOCKER_MANIFEST
    assert await resp.read() == body
    resp = await registry.get("/v2/docker/img/manifests/v1")   # no Accept at all
    assert resp.headers["Content-Type"] == DOCKER_MANIFEST


async def test_indexes_and_manifest_lists(registry):
    amd, amd_body = await registry.push_image("multi", None, layers=[b"amd64"])
    arm, arm_body = await registry.push_image("multi", None, layers=[b"arm64"])
    for media_type, child_type, tag in ((OCI_INDEX, OCI_MANIFEST, "oci"), (DOCKER_LIST, OCI_MANIFEST, "docker")):
        index = {"schemaVersion": 2, "mediaType": media_type, "manifests": [
            {"mediaType": child_type, "digest": amd, "size": len(amd_body),
             "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": child_type, "digest": arm, "size": len(arm_body),
             "platform": {"architecture": "arm64", "os": "linux"}}]}
        body = json.dumps(index).encode()
        resp = await registry.push_manifest("multi", tag, body, media_type)
        assert resp.status == 201, await resp.text()
        resp = await registry.get(f"/v2/multi/manifests/{tag}")
        assert resp.headers["Content-Type"] == media_type
        assert await resp.read() == body


async def test_index_with_missing_child_is_rejected(registry):
    missing = digest_of(b"no such manifest")
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": missing, "size": 10}]}
    resp = await registry.push_manifest("badindex", "v1", index, OCI_INDEX)
    assert resp.status == 400
    assert error_codes(await resp.json()) == ["MANIFEST_BLOB_UNKNOWN"]


async def test_manifest_referencing_missing_blob(registry):
    config = b"{}"
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": await registry.push_blob("missing", config),
                           "size": 2},
                "layers": [{"mediaType": OCI_LAYER, "digest": digest_of(b"never pushed"), "size": 12}]}
    resp = await registry.push_manifest("missing", "v1", manifest)
    assert resp.status == 400
    assert error_codes(await resp.json()) == ["MANIFEST_BLOB_UNKNOWN"]
    assert (await registry.get("/v2/missing/manifests/v1")).status == 404


async def test_malformed_manifests(registry):
    cases = [b"{not json", b"[]", b'{"schemaVersion": 2, "mediaType": "' + OCI_MANIFEST.encode() + b'"}',
             json.dumps({"schemaVersion": 1}).encode(), b""]
    for body in cases:
        resp = await registry.push_manifest("malformed", "v1", body, OCI_MANIFEST)
        assert resp.status == 400, body
        assert error_codes(await resp.json()) == ["MANIFEST_INVALID"], body


async def test_manifest_digest_mismatch(registry):
    digest, body = await registry.push_image("mismatch", None)
    wrong = digest_of(b"other")
    resp = await registry.push_manifest("mismatch", wrong, body)
    assert resp.status == 400
    assert error_codes(await resp.json()) == ["DIGEST_INVALID"]
    assert (await registry.get(f"/v2/mismatch/manifests/{wrong}")).status == 404


async def test_oversized_manifest_is_413(small_registry):
    config = b"{}"
    cfg = await small_registry.push_blob("big", config)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": cfg, "size": 2}, "layers": [],
                "annotations": {"pad": "x" * 5000}}
    resp = await small_registry.push_manifest("big", "v1", manifest)
    assert resp.status == 413
    assert error_codes(await resp.json()) == ["SIZE_INVALID"]

    # the same without Content-Length (chunked): cut off while reading
    body = json.dumps(manifest).encode()

    async def chunked():
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    resp = await small_registry.put("/v2/big/manifests/v1", data=chunked(),
                                    headers={"Content-Type": OCI_MANIFEST})
    assert resp.status == 413
    assert (await small_registry.get("/v2/big/manifests/v1")).status == 404


async def test_four_mebibyte_manifest_is_accepted(registry):
    cfg = await registry.push_blob("huge", b"{}")
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": cfg, "size": 2}, "layers": [],
                "annotations": {}}
    base = len(json.dumps(manifest).encode())
    manifest["annotations"]["pad"] = "x" * (4 * 1024 * 1024 - base - 12)
    body = json.dumps(manifest).encode()
    assert len(body) <= 4 * 1024 * 1024
    resp = await registry.push_manifest("huge", "v1", body)
    assert resp.status == 201, await resp.text()
    got = await registry.get("/v2/huge/manifests/v1")
    assert await got.read() == body


async def test_invalid_tag_and_name(registry):
    _, body = await registry.push_image("tags", None)
    for tag in ("-bad", "." + "a", "a" * 129, "bad+tag"):
        resp = await registry.push_manifest("tags", tag, body)
        assert resp.status == 400, tag
        assert error_codes(await resp.json()) == ["TAG_INVALID"], tag
    resp = await registry.get("/v2/tags/manifests/bad+tag")
    assert resp.status == 400
    assert error_codes(await resp.json()) == ["TAG_INVALID"]
    resp = await registry.push_manifest("bad..name", "v1", body)
    assert resp.status == 400
    assert error_codes(await resp.json()) == ["NAME_INVALID"]
    resp = await registry.get("/v2/UPPER/manifests/v1")
    assert resp.status == 400
    assert error_codes(await resp.json()) == ["NAME_INVALID"]


async def test_unknown_manifest_and_repository(registry):
    await registry.push_image("exists", "v1")
    resp = await registry.get("/v2/exists/manifests/v2")
    assert resp.status == 404
    assert error_codes(await resp.json()) == ["MANIFEST_UNKNOWN"]
    resp = await registry.get(f"/v2/exists/manifests/{digest_of(b'x')}")
    assert resp.status == 404
    assert error_codes(await resp.json()) == ["MANIFEST_UNKNOWN"]
    resp = await registry.get("/v2/does/not/exist/manifests/v1")
    assert resp.status == 404
    assert error_codes(await resp.json())[0] in ("NAME_UNKNOWN", "MANIFEST_UNKNOWN")


async def test_push_by_digest_with_tag_parameters(registry):
    digest, body = await registry.push_image("tagparams", None)
    resp = await registry.push_manifest("tagparams", digest, body, tag=["1.2.3", "1.2", "latest"])
    assert resp.status == 201
    assert [t.strip() for t in resp.headers["OCI-Tag"].split(",")] == ["1.2.3", "1.2", "latest"]
    resp = await registry.get("/v2/tagparams/tags/list")
    assert (await resp.json())["tags"] == ["1.2", "1.2.3", "latest"]
    for tag in ("1.2.3", "1.2", "latest"):
        resp = await registry.get(f"/v2/tagparams/manifests/{tag}")
        assert resp.headers["Docker-Content-Digest"] == digest
    resp = await registry.push_manifest("tagparams", digest, body, tag=["ok", "-bad"])
    assert resp.status == 400
    assert error_codes(await resp.json()) == ["TAG_INVALID"]


async def test_sha512_manifest(registry):
    cfg = await registry.push_blob("five12m", b"{}")
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": cfg, "size": 2}, "layers": []}
    body = json.dumps(manifest).encode()
    digest = "sha512:" + hashlib.sha512(body).hexdigest()
    resp = await registry.push_manifest("five12m", digest, body, tag="v512")
    assert resp.status == 201, await resp.text()
    assert resp.headers["Docker-Content-Digest"] == digest
    resp = await registry.get(f"/v2/five12m/manifests/{digest}")
    assert resp.status == 200
    assert await resp.read() == body


async def test_subject_sets_oci_subject_header(registry):
    subject, subject_body = await registry.push_image("withsubject", "v1")
    artifact = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.sbom",
                "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                           "digest": await registry.push_blob("withsubject", b"{}"), "size": 2},
                "layers": [],
                "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": len(subject_body)}}
    body = json.dumps(artifact).encode()
    resp = await registry.push_manifest("withsubject", digest_of(body), body)
    assert resp.status == 201
    assert resp.headers["OCI-Subject"] == subject


async def test_subject_may_be_pushed_before_its_target(registry):
    absent = digest_of(b"subject pushed later")
    artifact = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                           "digest": await registry.push_blob("early", b"{}"), "size": 2},
                "layers": [], "subject": {"mediaType": OCI_MANIFEST, "digest": absent, "size": 100}}
    resp = await registry.push_manifest("early", "sig", artifact)
    assert resp.status == 201
    assert resp.headers["OCI-Subject"] == absent


async def test_delete_tag_keeps_manifest(registry):
    digest, body = await registry.push_image("deltag", "v1")
    resp = await registry.push_manifest("deltag", "v2", body)
    assert resp.status == 201
    resp = await registry.delete("/v2/deltag/manifests/v1")
    assert resp.status == 202
    assert (await registry.get("/v2/deltag/manifests/v1")).status == 404
    assert (await registry.get("/v2/deltag/manifests/v2")).status == 200
    assert (await registry.get(f"/v2/deltag/manifests/{digest}")).status == 200
    resp = await registry.get("/v2/deltag/tags/list")
    assert (await resp.json())["tags"] == ["v2"]


async def test_delete_manifest_by_digest(registry):
    digest, body = await registry.push_image("delman", "v1")
    resp = await registry.delete(f"/v2/delman/manifests/{digest}")
    assert resp.status == 202
    for reference in (digest, "v1"):
        resp = await registry.get(f"/v2/delman/manifests/{reference}")
        assert resp.status == 404, reference
        assert error_codes(await resp.json()) == ["MANIFEST_UNKNOWN"]
    resp = await registry.delete(f"/v2/delman/manifests/{digest}")
    assert resp.status == 404
    assert error_codes(await resp.json()) == ["MANIFEST_UNKNOWN"]
    resp = await registry.delete("/v2/delman/manifests/nosuchtag")
    assert resp.status == 404
    resp = await registry.delete(f"/v2/nosuchrepo/manifests/{digest}")
    assert resp.status == 404


async def test_sparse_manifests_only_when_allowed(make_registry, tmp_path):
    """Spec, Pushing Manifests: a registry MAY reject a manifest whose blobs
    are unknown. Dockyard does by default; `allow_sparse_manifests` accepts
    them (the conformance suite's sparse data set)."""
    from registry.settings import ValidationSettings, settings_for_tests

    settings = settings_for_tests(tmp_path / "sparse",
                                  validation=ValidationSettings(allow_sparse_manifests=True))
    reg = await make_registry(settings)
    cfg = await reg.push_blob("sparse", b"{}")
    image = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
             "config": {"mediaType": OCI_CONFIG, "digest": cfg, "size": 2},
             "layers": [{"mediaType": OCI_LAYER, "digest": digest_of(b"not here"), "size": 8}]}
    resp = await reg.push_manifest("sparse", "image", image)
    assert resp.status == 201, await resp.text()
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": digest_of(b"no such child"), "size": 13,
         "platform": {"architecture": "arm64", "os": "linux"}}]}
    resp = await reg.push_manifest("sparse", "index", index, OCI_INDEX)
    assert resp.status == 201, await resp.text()
    assert (await reg.get("/v2/sparse/manifests/index")).status == 200
