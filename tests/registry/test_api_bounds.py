"""Input and output bounds of the API: manifest nesting and sizes, the
referrers page, and what a mount without `from` may reveal."""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.registry.regapi import OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, digest_of, error_codes, replace_section


# ---- manifests (OCI image spec, descriptor.md: size is an int64) -------------------

async def test_deeply_nested_manifest_is_manifest_invalid(registry):
    """100,000 levels used to end in a RecursionError: a 500 and a traceback."""
    for depth in (100_000, 500):
        nested = "[" * depth + "]" * depth
        body = ('{"schemaVersion":2,"mediaType":"%s","config":{},"layers":[],"x":%s}'
                % (OCI_MANIFEST, nested)).encode()
        resp = await registry.push_manifest("bounds/deep", "v1", body)
        assert resp.status == 400, depth
        assert error_codes(await resp.json()) == ["MANIFEST_INVALID"]
        assert "deeper" in (await resp.json())["errors"][0]["message"]


async def test_ordinary_nesting_is_accepted(registry):
    """An index entry with platform features nests five levels: well inside the limit."""
    child, body = await registry.push_image("bounds/nest", None)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{
        "mediaType": OCI_MANIFEST, "digest": child, "size": len(body),
        "platform": {"architecture": "amd64", "os": "linux", "os.features": ["a"]},
        "annotations": {"k": "v"}}], "annotations": {"x": "y"}}
    resp = await registry.push_manifest("bounds/nest", "multi", index, OCI_INDEX)
    assert resp.status == 201, await resp.text()


async def test_descriptor_size_beyond_int64_is_manifest_invalid(registry):
    config = await registry.push_blob("bounds/size", b"{}")
    layer = await registry.push_blob("bounds/size", b"layer")
    for size in (2 ** 70, 2 ** 63, -1):
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, "digest": config, "size": 2},
                    "layers": [{"mediaType": OCI_LAYER, "digest": layer, "size": size}]}
        resp = await registry.push_manifest("bounds/size", "v1", manifest)
        assert resp.status == 400, size
        assert error_codes(await resp.json()) == ["MANIFEST_INVALID"]
    manifest["layers"][0]["size"] = 2 ** 63 - 1       # the largest storable size is fine
    resp = await registry.push_manifest("bounds/size", "v1", manifest)
    assert resp.status == 201, await resp.text()


# ---- referrers (distribution spec, "Listing Referrers": Link rel="next") ----------

async def _push_referrers(registry, repo: str, count: int) -> tuple[str, list[str]]:
    subject, subject_body = await registry.push_image(repo, "v1")
    await registry.push_blob(repo, b"{}")
    digests = []
    for i in range(count):
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "artifactType": "application/vnd.example.sig" if i % 2 else "application/vnd.example.sbom",
                    "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                               "digest": digest_of(b"{}"), "size": 2},
                    "layers": [], "annotations": {"n": str(i)},
                    "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": len(subject_body)}}
        body = json.dumps(manifest).encode()
        resp = await registry.push_manifest(repo, digest_of(body), body)
        assert resp.status == 201
        digests.append(digest_of(body))
    return subject, sorted(digests)


def _next(resp) -> str | None:
    link = resp.headers.get("Link")
    if link is None:
        return None
    assert link.endswith('>; rel="next"')
    return link[1:link.index(">")]


async def test_referrers_are_paginated_with_link(make_registry, settings):
    registry = await make_registry(replace_section(settings, "limits", referrers_max_entries=4))
    subject, digests = await _push_referrers(registry, "bounds/refs", 11)

    seen, url, pages = [], f"/v2/bounds/refs/referrers/{subject}", 0
    while url is not None and pages < 10:
        resp = await registry.get(url)
        assert resp.status == 200
        page = [d["digest"] for d in (await resp.json())["manifests"]]
        assert len(page) <= 4
        seen += page
        url, pages = _next(resp), pages + 1
    assert seen == digests and pages == 3          # 4 + 4 + 3, in digest order, none twice

    resp = await registry.get(f"/v2/bounds/refs/referrers/{subject}", params={"n": "2"})
    assert len((await resp.json())["manifests"]) == 2
    assert parse_qs(urlsplit(_next(resp)).query)["n"] == ["2"]
    resp = await registry.get(f"/v2/bounds/refs/referrers/{subject}", params={"n": "0"})
    assert (await resp.json())["manifests"] == [] and "Link" not in resp.headers

    # a filtered listing pages over the matches and keeps the filter in its link
    sigs, url = [], f"/v2/bounds/refs/referrers/{subject}?artifactType=application/vnd.example.sig"
    while url is not None:
        resp = await registry.get(url)
        assert resp.headers["OCI-Filters-Applied"] == "artifactType"
        page = await resp.json()
        assert all(d["artifactType"] == "application/vnd.example.sig" for d in page["manifests"])
        sigs += [d["digest"] for d in page["manifests"]]
        url = _next(resp)
        assert url is None or "artifactType=" in url
    assert len(sigs) == 5 and sigs == sorted(sigs)

    resp = await registry.get(f"/v2/bounds/refs/referrers/{subject}", params={"last": "nonsense"})
    assert resp.status == 400


@pytest.mark.filesystem_only("the handler's work on the loop does not depend on the driver; 2,000 "
                              "manifest puts take minutes on an object store")
async def test_large_referrers_list_does_not_stall_the_loop(make_registry, settings):
    """2,000 referrers with annotations (a 4 MB list): the answer is one
    capped page, read in batches and decoded and encoded off the event loop,
    so the loop never stops for long while it is built (before: the whole
    list decoded and encoded on the loop, 0.1-0.5 s of standstill)."""
    registry = await make_registry()
    store = await make_registry.store(settings.storage.root)
    subject, subject_body = await registry.push_image("bounds/many", "v1")
    await registry.push_blob("bounds/many", b"{}")
    for i in range(2000):
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/x",
                    "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                               "digest": digest_of(b"{}"), "size": 2}, "layers": [],
                    "annotations": {f"k{j}": "v" * 40 for j in range(50)} | {"n": str(i)},
                    "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": len(subject_body)}}
        await store.manifests.put("bounds/many", f"r{i}", json.dumps(manifest).encode(), OCI_MANIFEST)
    longest = 0.0
    stop = asyncio.Event()

    async def ticker():
        nonlocal longest
        before = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            longest, before = max(longest, now - before), now

    tick = asyncio.create_task(ticker())
    resp = await registry.get(f"/v2/bounds/many/referrers/{subject}")
    body = await resp.read()
    stop.set()
    await tick
    assert len(json.loads(body)["manifests"]) == 1000
    assert longest < 0.08, f"the event loop stood still for {longest:.3f} s"


# ---- mount without `from` (distribution spec, "Mounting a blob") -----------------

async def test_mount_without_from_needs_a_repository_that_links_the_blob(registry):
    data = b"a layer pushed to one repository, then deleted from it"
    digest = await registry.push_blob("bounds/source", data)

    resp = await registry.post("/v2/bounds/target/blobs/uploads/", params={"mount": digest})
    assert resp.status == 201                       # linked in a repository anyone may read
    assert resp.headers["Docker-Content-Digest"] == digest

    # Unlinked everywhere, the bytes still sit in the global store (no GC yet):
    # a mount must not resurrect them nor say they exist.
    assert (await registry.delete(f"/v2/bounds/source/blobs/{digest}")).status == 202
    assert (await registry.delete(f"/v2/bounds/target/blobs/{digest}")).status == 202
    resp = await registry.post("/v2/bounds/thief/blobs/uploads/", params={"mount": digest})
    assert resp.status == 202
    assert (await registry.head(f"/v2/bounds/thief/blobs/{digest}")).status == 404

    unknown = digest_of(b"never pushed anywhere")
    resp_unknown = await registry.post("/v2/bounds/thief/blobs/uploads/", params={"mount": unknown})
    assert resp_unknown.status == 202
    assert set(resp.headers) - {"Date", "Location", "Docker-Upload-UUID"} == \
        set(resp_unknown.headers) - {"Date", "Location", "Docker-Upload-UUID"}
