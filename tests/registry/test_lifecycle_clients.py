"""Lifecycle rules (registry.lifecycle) as real clients meet them: skopeo
pushing to a `dockyard serve` with immutable tags, and to one in
read-only mode, sees the registry's message (distribution spec, "Error
Codes": DENIED, UNSUPPORTED)."""

from __future__ import annotations

import pytest

from registry.settings import SettingsError, load_settings
from tests.support.content import write_oci_layout
from tests.support.registry_http import http_request

pytestmark = pytest.mark.interop


def test_immutable_tag_refuses_overwrite_and_delete_with_its_rule(start_dockyard, skopeo, tmp_path):
    server = start_dockyard(config={"lifecycle": {"immutable_tags": "prod/*:v*"}})
    first = write_oci_layout(tmp_path / "first", layer_sizes=[2000], tag="t")
    second = write_oci_layout(tmp_path / "second", layer_sizes=[3000], tag="t")
    skopeo.copy(first.ref, f"docker://{server.host}/prod/app:v1")
    skopeo.copy(first.ref, f"docker://{server.host}/prod/app:v1")          # the same bytes again: fine
    refused = skopeo.copy(second.ref, f"docker://{server.host}/prod/app:v1", check=False)
    assert refused.returncode != 0
    assert "prod/app:v1 is immutable (lifecycle rule prod/*:v*)" in refused.stderr, refused.stderr
    skopeo.copy(second.ref, f"docker://{server.host}/prod/app:latest")     # no rule: moves freely
    skopeo.copy(first.ref, f"docker://{server.host}/prod/app:latest")
    deleted = http_request("DELETE", f"{server.url}/v2/prod/app/manifests/v1")
    assert deleted.status == 403 and b"DENIED" in deleted.body and b"cannot be deleted" in deleted.body
    digest = http_request("HEAD", f"{server.url}/v2/prod/app/manifests/v1",
                          headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}
                          ).headers["Docker-Content-Digest"]
    by_digest = http_request("DELETE", f"{server.url}/v2/prod/app/manifests/{digest}")
    assert by_digest.status == 403 and b"immutable tag prod/app:v1" in by_digest.body
    inspected = skopeo.inspect(f"docker://{server.host}/prod/app:v1")
    assert digest in inspected.stdout


def test_read_only_mode_refuses_writes_and_serves_pulls(start_dockyard, skopeo, tmp_path):
    writable = start_dockyard()
    image = write_oci_layout(tmp_path / "image", layer_sizes=[2000], tag="t")
    skopeo.copy(image.ref, f"docker://{writable.host}/lib/app:v1")
    writable.stop()
    frozen = start_dockyard(storage=writable.storage, config={"lifecycle": {"read_only": True}})
    refused = skopeo.copy(image.ref, f"docker://{frozen.host}/lib/app:v2", check=False)
    assert refused.returncode != 0 and "read-only mode" in refused.stderr, refused.stderr
    started = http_request("POST", f"{frozen.url}/v2/lib/app/blobs/uploads/", b"")
    assert started.status == 405 and b"UNSUPPORTED" in started.body
    skopeo.copy(f"docker://{frozen.host}/lib/app:v1", f"oci:{tmp_path / 'pulled'}:v1")
    assert (tmp_path / "pulled" / "index.json").exists()


def test_bad_immutable_rule_is_a_settings_error():
    with pytest.raises(SettingsError, match="not <repository glob>:<tag glob>"):
        load_settings(None, environ={"DOCKYARD_LIFECYCLE_IMMUTABLE_TAGS": "prod/*"})
