"""puller.oci: every field of untrusted OCI JSON checked in one place (pure, no I/O)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import puller

from puller.client.tokens import AuthError, token_from_response
from puller.errors import ClientError, ManifestError
from puller.oci import (MAX_DOCUMENT_SIZE, ContentError, Descriptor, ImageIndex, ImageManifest, check_document_size,
                        parse_config, parse_descriptor, parse_json_object, parse_manifest)

D = "sha256:" + "a" * 64
GOOD = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": D, "size": 12}


def manifest(**fields) -> bytes:
    body = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": D, "size": 2},
            "layers": [GOOD]}
    body.update(fields)
    return json.dumps(body).encode()


def test_content_error_is_a_one_line_client_error():
    # the CLIs print every ClientError as one line; ContentError is one of them
    assert issubclass(ContentError, ManifestError) and issubclass(ContentError, ClientError)


def test_good_descriptor_is_typed():
    desc = parse_descriptor({**GOOD, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
                             "annotations": {"a": "b"}, "urls": ["https://example.com/x"]}, "layer 0")
    assert isinstance(desc, Descriptor)
    assert (desc.digest, desc.size, desc.media_type) == (D, 12, GOOD["mediaType"])
    assert desc.urls == ("https://example.com/x",)
    assert desc.platform["architecture"] == "arm64" and desc.raw["annotations"] == {"a": "b"}
    assert parse_descriptor({"digest": D, "size": 2 ** 63 - 1}, "x").size == 2 ** 63 - 1


@pytest.mark.parametrize("size", [-1, None, 1.5, 1e3, "12", True, False, 2 ** 63, [], {}],
                         ids=["negative", "missing", "float", "integral-float", "string", "true", "false",
                              "over-int64", "list", "object"])
def test_size_must_be_an_int64(size):
    obj = {**GOOD, "size": size} if size is not None else {k: v for k, v in GOOD.items() if k != "size"}
    with pytest.raises(ContentError, match="layer 3: (no size|size must be an integer)"):
        parse_descriptor(obj, "layer 3")


@pytest.mark.parametrize("digest, message", [
    (None, "no digest"), (12, "digest must be a string"), ("sha256:abc", "invalid sha256 digest"),
    ("sha256:../../../etc/passwd", "invalid digest"), ("md5:" + "a" * 32, "unsupported digest algorithm"),
    ("sha256:" + "A" * 64, "invalid sha256 digest")])
def test_digest_is_checked(digest, message):
    obj = {**GOOD, "digest": digest} if digest is not None else {"size": 1}
    with pytest.raises(ContentError, match=message):
        parse_descriptor(obj, "layer 0")


@pytest.mark.parametrize("field_, value", [
    ("mediaType", 7), ("mediaType", "text/plain\r\nX-Injected: 1"), ("mediaType", "no-slash"),
    ("urls", "https://x"), ("urls", [1]), ("annotations", ["a"]), ("annotations", {"a": 1}),
    ("platform", "linux/amd64"), ("platform", {"os": 1, "architecture": "amd64"}),
    ("platform", {"os": "linux", "architecture": "amd64", "os.features": "x"}),
    ("artifactType", {}), ("data", 5)])
def test_other_descriptor_fields_are_typed(field_, value):
    with pytest.raises(ContentError, match=f"layer 0.*{field_.split('.')[0]}"):
        parse_descriptor({**GOOD, field_: value}, "layer 0")


@pytest.mark.parametrize("obj", ["sha256:abc", 3, None, [GOOD], True])
def test_descriptor_must_be_an_object(obj):
    with pytest.raises(ContentError, match="must be a JSON object"):
        parse_descriptor(obj, "manifests[0]")


def test_manifest_and_index_parse():
    parsed = parse_manifest(manifest(), None, "m")
    assert isinstance(parsed, ImageManifest) and not parsed.is_index
    assert parsed.config.size == 2 and [l.digest for l in parsed.layers] == [D]
    assert [b.digest for b in parsed.blobs] == [D, D]
    index = parse_manifest(json.dumps({"schemaVersion": 2, "manifests": [GOOD]}).encode(),
                           "application/vnd.oci.image.index.v1+json", "i")
    assert isinstance(index, ImageIndex) and index.is_index and index.manifests[0].size == 12
    # the media type a registry served is used when the document names none; shape decides otherwise
    untyped = parse_manifest(json.dumps({"schemaVersion": 2, "manifests": []}).encode(), None, "i")
    assert untyped.is_index


@pytest.mark.parametrize("body, message", [
    (b"[1, 2]", "not a JSON object"), (b"{\"a\": NaN}", "not valid JSON"), (b"{\"a\": Infinity}", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (manifest(layers=["sha256:" + "a" * 64]), r"layers\[0\]: a descriptor must be a JSON object"),
    (manifest(layers={"0": GOOD}), "layers must be a list"),
    (manifest(layers=[{"size": 3}]), r"layers\[0\]: no digest"),
    (manifest(layers=[{**GOOD, "size": -1}]), r"layers\[0\]: size must be an integer"),
    (manifest(config="sha256:" + "a" * 64), "config: a descriptor must be a JSON object"),
    (manifest(config=None), "without a config"),
    (manifest(schemaVersion=1), "schema 1"), (manifest(schemaVersion="2"), "schemaVersion must be 2"),
    (manifest(subject={"digest": D}), "subject: no size"),
    (manifest(annotations={"a": ["b"]}), "annotations must map strings to strings"),
    (json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": ["x", 1]}).encode(), r"manifests\[0\]: a descriptor must be a JSON object"),
    (json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": {"a": GOOD}}).encode(), "manifests must be a list"),
    (json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json"}).encode(),
     "no manifests list"),
])
def test_bad_documents_are_one_content_error(body, message):
    with pytest.raises(ContentError, match=message) as caught:
        parse_manifest(body, None, "manifest app:v1")
    assert str(caught.value).startswith("manifest app:v1: ") and "\n" not in str(caught.value)


def test_json_nested_too_deep_is_invalid_json():
    # in a child: CPython 3.11's AST checks can trip over a recursion limit hit
    # in the same process, which would break pytest's own failure reports later
    code = ("from puller.oci import ContentError, parse_json_object\n"
            "try:\n    parse_json_object(b'[' * 100000 + b']' * 100000, 'deep')\n"
            "except ContentError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(Path(puller.__file__).resolve().parents[1])})
    assert out.stdout.strip() == "deep: not valid JSON", out.stderr


def test_document_size_cap():
    check_document_size(parse_descriptor({**GOOD, "size": MAX_DOCUMENT_SIZE}, "c"), MAX_DOCUMENT_SIZE, "c")
    with pytest.raises(ContentError, match="declared size 4194305 bytes exceeds the 4194304 byte limit"):
        check_document_size(parse_descriptor({**GOOD, "size": MAX_DOCUMENT_SIZE + 1}, "c"), MAX_DOCUMENT_SIZE,
                            "config")


def test_config_fields_the_client_uses_are_checked():
    good = {"os": "linux", "architecture": "amd64", "rootfs": {"type": "layers", "diff_ids": [D]}, "config": {}}
    assert parse_config(json.dumps(good), "cfg")["rootfs"]["diff_ids"] == [D]
    for bad, message in [({**good, "os": 3}, "os must be a string"),
                         ({**good, "rootfs": []}, "rootfs must be an object"),
                         ({**good, "rootfs": {"diff_ids": "x"}}, "diff_ids must be a list"),
                         ({**good, "rootfs": {"diff_ids": ["../../etc"]}}, r"diff_ids\[0\]: invalid digest"),
                         ({**good, "config": "x"}, "config must be an object")]:
        with pytest.raises(ContentError, match=message):
            parse_config(json.dumps(bad), "cfg")
    with pytest.raises(ContentError, match="not a JSON object"):
        parse_json_object(b'"a string"', "cfg")


# -- token answers (the auth edge) -------------------------------------------------------

@pytest.mark.parametrize("body, message", [
    (["token"], "not a JSON object"), ({"token": 12345}, "not a printable string"),
    ({"token": ["a"]}, "not a printable string"), ({"token": "a\r\nX-Evil: 1"}, "not a printable string"),
    ({"token": ""}, "without a token"), ({}, "without a token")])
def test_bad_token_answers_are_auth_errors(body, message):
    with pytest.raises(AuthError, match=message):
        token_from_response(body, now=0.0)


@pytest.mark.parametrize("expires_in, lifetime", [
    (float("inf"), 86400), (float("-inf"), 60), (float("nan"), 60), (-5, 60), (10 ** 400, 86400),
    (1e300, 86400), ("300", 60), (True, 60), (None, 60), (300, 300), (299.5, 299.5)])
def test_token_lifetime_is_clamped(expires_in, lifetime):
    token = token_from_response({"token": "abc", "expires_in": expires_in}, now=0.0)
    assert token.value == "abc" and token.expires_at == lifetime - 5.0
