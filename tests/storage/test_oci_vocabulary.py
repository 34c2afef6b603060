"""The shared OCI vocabulary (storage.oci): the grammar, digests, and the
manifest rules both halves rely on (image spec manifest.md, image-index.md,
descriptor.md; CVE-2021-41190 for the ambiguity rule)."""

from __future__ import annotations

import json

import pytest

from storage.oci import content, digests, media, names
from storage.oci.errors import DigestInvalid, ManifestInvalid, NameInvalid, TagInvalid

CONFIG = {"mediaType": media.OCI_CONFIG, "digest": digests.EMPTY_DIGEST, "size": 2}
LAYER = {"mediaType": media.OCI_LAYER, "digest": digests.digest_of(b"layer"), "size": 5}


def pushed(doc: dict, content_type: str = "") -> content.Manifest:
    return content.parse_pushed_manifest(json.dumps(doc).encode(), content_type)


def test_grammar():
    assert names.validate_name("a/b-c/d__e.f") == "a/b-c/d__e.f"
    for bad in ("", "A", "a//b", "/a", "a/", "a/../b", "a" * 256, "a_", "_a"):
        with pytest.raises(NameInvalid):
            names.validate_name(bad)
    with pytest.raises(NameInvalid, match="lowercase"):
        names.validate_name("Busybox")
    with pytest.raises(TagInvalid):
        names.validate_tag(".hidden")
    assert names.parse_digest(digests.EMPTY_DIGEST)[0] == "sha256"
    for bad in ("sha256:abc", "md5:" + "a" * 32, "sha256:" + "A" * 64, "nope", None):
        with pytest.raises(DigestInvalid):
            names.parse_digest(bad)
    assert names.split_reference("host:5000/a/b:v1@" + digests.EMPTY_DIGEST) == (
        "host:5000/a/b", "v1", digests.EMPTY_DIGEST)
    assert names.split_reference("host:5000/a/b") == ("host:5000/a/b", None, None)


def test_digests():
    assert digests.digest_of(b"{}") == digests.EMPTY_DIGEST
    assert digests.matches(b"layer", LAYER["digest"]) and not digests.matches(b"other", LAYER["digest"])
    assert digests.digest_of(b"x", "sha512").startswith("sha512:")


def test_walk_yields_every_child_with_its_role():
    subject = {"mediaType": media.OCI_MANIFEST, "digest": digests.digest_of(b"s"), "size": 1}
    manifest = pushed({"schemaVersion": 2, "mediaType": media.OCI_MANIFEST, "config": CONFIG,
                       "layers": [LAYER, LAYER], "subject": subject})
    assert [(c.role, c.descriptor.digest) for c in manifest.children()] == [
        ("config", CONFIG["digest"]), ("layer", LAYER["digest"]), ("layer", LAYER["digest"]),
        ("subject", subject["digest"])]
    assert manifest.effective_artifact_type == media.OCI_CONFIG
    index = pushed({"schemaVersion": 2, "manifests": [{**subject, "platform": {"os": "linux"}}]})
    assert index.is_index and index.media_type == media.OCI_INDEX
    assert [c.role for c in index.children()] == ["manifest"]


@pytest.mark.parametrize("doc", [
    {"schemaVersion": 2, "config": CONFIG, "layers": [], "manifests": []},            # no mediaType
    {"schemaVersion": 2, "mediaType": media.OCI_INDEX, "manifests": [], "layers": []},
    {"schemaVersion": 2, "mediaType": media.OCI_MANIFEST, "config": CONFIG, "layers": [],
     "manifests": []},
])
def test_ambiguous_documents_are_refused_both_ways(doc):
    """CVE-2021-41190: content that could be read as a manifest and as an index."""
    with pytest.raises(ManifestInvalid):
        pushed(doc)
    with pytest.raises(ManifestInvalid):
        content.parse_manifest(json.dumps(doc), None)


def test_pushed_media_type_rules():
    doc = {"schemaVersion": 2, "config": CONFIG, "layers": []}
    assert pushed(doc).media_type == media.OCI_MANIFEST                       # from the shape
    assert pushed(doc, media.DOCKER_MANIFEST + "; charset=utf-8").media_type == media.DOCKER_MANIFEST
    with pytest.raises(ManifestInvalid, match="does not match"):
        pushed({**doc, "mediaType": media.OCI_MANIFEST}, media.DOCKER_MANIFEST)
    with pytest.raises(ManifestInvalid, match="schema 1"):
        pushed(doc, "application/vnd.docker.distribution.manifest.v1+prettyjws")
    with pytest.raises(ManifestInvalid, match="schemaVersion"):
        pushed({**doc, "schemaVersion": True})
    with pytest.raises(ManifestInvalid, match="mediaType"):
        pushed({**doc, "layers": [{"digest": LAYER["digest"], "size": 5}]})   # a pushed descriptor is typed
    # a reader tolerates an untyped descriptor and a missing schemaVersion
    read = content.parse_manifest(json.dumps({"config": CONFIG, "layers": [{"digest": LAYER["digest"], "size": 5}]}))
    assert read.layers[0].media_type == ""


@pytest.mark.parametrize("size", [-1, 2 ** 63, 1.5, "5", True, None])
def test_descriptor_sizes_bound_downloads(size):
    with pytest.raises(ManifestInvalid, match="size"):
        content.parse_descriptor({**LAYER, "size": size}, "layer")


def test_nesting_and_constants_are_refused():
    deep = '{"a":' * 70 + "1" + "}" * 70
    with pytest.raises(ManifestInvalid, match="deeper"):
        content.parse_json_object(deep, "doc")
    with pytest.raises(ManifestInvalid, match="deeper"):
        content.parse_json_object("[" * 100_000 + "]" * 100_000, "doc")
    with pytest.raises(ManifestInvalid, match="JSON"):
        content.parse_json_object('{"size": NaN}', "doc")
