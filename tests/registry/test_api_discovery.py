"""Tags list, catalog (pagination, Link header) and the referrers API."""

from __future__ import annotations

import json
import re

from tests.registry.regapi import OCI_INDEX, OCI_MANIFEST, digest_of, error_codes

LINK_RE = re.compile(r'^<([^>]+)>; rel="next"$')


def next_url(resp) -> str | None:
    link = resp.headers.get("Link")
    if link is None:
        return None
    match = LINK_RE.match(link)
    assert match, link
    return match.group(1)


async def test_tags_list_pagination(registry):
    _, body = await registry.push_image("paged", None)
    tags = ["b", "a", "C", "a1", "0.1", "latest", "v_2", "Z"]
    for tag in tags:
        assert (await registry.push_manifest("paged", tag, body)).status == 201
    expected = sorted(tags)   # ASCII order: digits, upper, lower

    resp = await registry.get("/v2/paged/tags/list")
    assert resp.status == 200
    assert await resp.json() == {"name": "paged", "tags": expected}
    assert "Link" not in resp.headers

    # walk the pages through the Link header
    seen: list[str] = []
    url: str | None = "/v2/paged/tags/list?n=3"
    for _ in range(10):
        resp = await registry.get(url)
        page = (await resp.json())["tags"]
        assert len(page) <= 3
        seen += page
        url = next_url(resp)
        if url is None:
            break
        assert len(page) == 3
        assert url.startswith("/v2/paged/tags/list?")
    assert seen == expected

    resp = await registry.get("/v2/paged/tags/list", params={"n": "2", "last": expected[2]})
    assert (await resp.json())["tags"] == expected[3:5]
    resp = await registry.get("/v2/paged/tags/list", params={"last": expected[-2]})
    assert (await resp.json())["tags"] == expected[-1:]

    resp = await registry.get("/v2/paged/tags/list", params={"n": "0"})
    assert resp.status == 200
    assert (await resp.json())["tags"] == []
    assert "Link" not in resp.headers

    resp = await registry.get("/v2/paged/tags/list", params={"n": str(len(tags))})
    assert len((await resp.json())["tags"]) == len(tags)
    assert "Link" not in resp.headers


async def test_tags_list_errors(registry):
    await registry.push_image("tagerr", "v1")
    for n in ("-1", "abc", "1.5"):
        resp = await registry.get("/v2/tagerr/tags/list", params={"n": n})
        assert resp.status == 400, n
        assert error_codes(await resp.json()) == ["PAGINATION_NUMBER_INVALID"], n
    resp = await registry.get("/v2/unknown/repo/tags/list")
    assert resp.status == 404
    assert error_codes(await resp.json()) == ["NAME_UNKNOWN"]
    resp = await registry.get("/v2/unknown/repo/tags/list", params={"n": "0"})
    assert resp.status == 404


async def test_catalog_pagination(registry):
    repos = ["zeta", "alpha/one", "alpha/two", "beta", "alpha"]
    for repo in repos:
        await registry.push_image(repo, "v1")
    resp = await registry.get("/v2/_catalog")
    assert resp.status == 200
    assert (await resp.json())["repositories"] == sorted(repos)

    seen: list[str] = []
    url: str | None = "/v2/_catalog?n=2"
    for _ in range(10):
        resp = await registry.get(url)
        seen += (await resp.json())["repositories"]
        url = next_url(resp)
        if url is None:
            break
    assert seen == sorted(repos)

    resp = await registry.get("/v2/_catalog", params={"n": "2", "last": "alpha/one"})
    assert (await resp.json())["repositories"] == ["alpha/two", "beta"]
    resp = await registry.get("/v2/_catalog", params={"n": "0"})
    assert (await resp.json())["repositories"] == []
    resp = await registry.get("/v2/_catalog", params={"n": "x"})
    assert resp.status == 400
    assert error_codes(await resp.json()) == ["PAGINATION_NUMBER_INVALID"]


async def test_catalog_limit_adds_link(make_registry):
    from registry.settings import LimitsSettings

    reg = await make_registry(limits=LimitsSettings(catalog_max_entries=2))
    for repo in ("r1", "r2", "r3"):
        await reg.push_image(repo, "v1")
    resp = await reg.get("/v2/_catalog")
    assert (await resp.json())["repositories"] == ["r1", "r2"]
    assert next_url(resp) is not None
    resp = await reg.get(next_url(resp))
    assert (await resp.json())["repositories"] == ["r3"]
    assert "Link" not in resp.headers


async def _push_referrer(registry, repo: str, subject: str, subject_size: int, *,
                         artifact_type: str | None, annotations: dict | None = None,
                         config_type: str = "application/vnd.oci.empty.v1+json") -> tuple[str, int]:
    cfg = await registry.push_blob(repo, b"{}")
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": config_type, "digest": cfg, "size": 2},
                "layers": [], "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": subject_size}}
    if artifact_type:
        manifest["artifactType"] = artifact_type
    if annotations:
        manifest["annotations"] = annotations
    body = json.dumps(manifest).encode()
    resp = await registry.push_manifest(repo, digest_of(body), body)
    assert resp.status == 201
    assert resp.headers["OCI-Subject"] == subject
    return digest_of(body), len(body)


async def test_referrers(registry):
    subject, subject_body = await registry.push_image("refs", "v1")
    sbom, sbom_size = await _push_referrer(registry, "refs", subject, len(subject_body),
                                           artifact_type="application/vnd.example.sbom",
                                           annotations={"org.example.kind": "sbom"})
    sig, _ = await _push_referrer(registry, "refs", subject, len(subject_body), artifact_type=None,
                                  config_type="application/vnd.example.signature.config")

    resp = await registry.get(f"/v2/refs/referrers/{subject}")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == OCI_INDEX
    assert "OCI-Filters-Applied" not in resp.headers
    index = await resp.json()
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    by_digest = {d["digest"]: d for d in index["manifests"]}
    assert set(by_digest) == {sbom, sig}
    assert by_digest[sbom]["artifactType"] == "application/vnd.example.sbom"
    assert by_digest[sbom]["annotations"] == {"org.example.kind": "sbom"}
    assert by_digest[sbom]["size"] == sbom_size
    assert by_digest[sbom]["mediaType"] == OCI_MANIFEST
    # no artifactType: the config media type stands in
    assert by_digest[sig]["artifactType"] == "application/vnd.example.signature.config"

    resp = await registry.get(f"/v2/refs/referrers/{subject}",
                              params={"artifactType": "application/vnd.example.sbom"})
    assert resp.status == 200
    assert resp.headers["OCI-Filters-Applied"] == "artifactType"
    assert [d["digest"] for d in (await resp.json())["manifests"]] == [sbom]

    resp = await registry.get(f"/v2/refs/referrers/{subject}", params={"artifactType": "application/none"})
    assert (await resp.json())["manifests"] == []

    # deleting a referrer removes it from the list
    assert (await registry.delete(f"/v2/refs/manifests/{sbom}")).status == 202
    resp = await registry.get(f"/v2/refs/referrers/{subject}")
    assert [d["digest"] for d in (await resp.json())["manifests"]] == [sig]


async def test_referrers_empty_and_invalid(registry):
    await registry.push_image("norefs", "v1")
    resp = await registry.get(f"/v2/norefs/referrers/{digest_of(b'nothing refers')}")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == OCI_INDEX
    assert (await resp.json()) == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    resp = await registry.get(f"/v2/never/pushed/referrers/{digest_of(b'x')}")
    assert resp.status == 200
    assert (await resp.json())["manifests"] == []
    resp = await registry.get("/v2/norefs/referrers/sha256:bad")
    assert resp.status == 400
    assert error_codes(await resp.json()) == ["DIGEST_INVALID"]
    resp = await registry.get("/v2/norefs/referrers/latest")
    assert resp.status == 400
