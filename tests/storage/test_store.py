"""ContentStore over every registered storage driver: uploads, dedupe,
manifests, tags, referrers, catalog, deletes, name escapes, several
"workers" (ContentStore instances or processes) on one storage, and a worker
SIGKILLed mid-upload. Tests that look at the files themselves are
filesystem_only, on a real root."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from storage import layout
from storage.oci.errors import (BlobUnknown, BlobUploadUnknown, DigestInvalid, ManifestBlobUnknown,
                            ManifestInvalid, ManifestTooLarge, ManifestUnknown, NameInvalid,
                            NameUnknown, RangeInvalid, SizeInvalid, TagInvalid)
from storage.driver import StorageError
from storage.filesystem import TEMP_PREFIX
from storage.oci.digests import EMPTY_DIGEST
from storage.oci.media import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from storage.store import ContentStore, StoreLimits
from tests.support.content import chunks as body, sha256_digest as sha256

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


# `store`, `other_worker`, `open_store` and `root`: tests/storage/conftest.py.


def files_under(root: Path, sub: str = "") -> list[str]:
    base = root / sub.lstrip("/") if sub else root
    if not base.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in base.rglob("*") if p.is_file())


def blob_files(root: Path) -> list[str]:
    return files_under(root, layout.BLOBS)


async def push_blob(store: ContentStore, repo: str, data: bytes) -> str:
    digest = sha256(data)
    info = await store.uploads.put(repo, digest, body(data))
    assert info.size == len(data)
    return digest


def descriptor(media_type: str, data: bytes, **extra) -> dict:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data), **extra}


def image_manifest(config: bytes, layers: list[bytes], media_type: str = OCI_MANIFEST,
                   **extra) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": media_type,
           "config": descriptor(CONFIG_TYPE, config),
           "layers": [descriptor(LAYER_TYPE, layer) for layer in layers], **extra}
    return json.dumps(doc).encode()


async def push_image(store: ContentStore, repo: str, tag: str, seed: bytes = b"") -> tuple[str, bytes]:
    config = b'{"architecture":"amd64","os":"linux","seed":"%s"}' % seed
    layer = b"layer bytes " + seed
    await push_blob(store, repo, config)
    await push_blob(store, repo, layer)
    manifest = image_manifest(config, [layer])
    result = await store.manifests.put(repo, tag, manifest, OCI_MANIFEST)
    return result.digest, manifest


# ---- blobs and uploads ---------------------------------------------------------

@pytest.mark.filesystem_only("counts the blob files under the root")
async def test_blob_pushed_to_many_repos_is_stored_once(store, root):
    data = os.urandom(200_000)
    for repo in ("one", "two/sub", "three"):
        digest = await push_blob(store, repo, data)
        assert (await store.blobs.stat(repo, digest)).size == len(data)
    assert blob_files(root) == [layout.blob_data(digest).lstrip("/")]
    with pytest.raises(BlobUnknown):
        await store.blobs.stat("four", digest)  # exists globally, not linked here
    assert b"".join([c async for c in store.blobs.read(digest, 100, 50)]) == data[100:150]
    local = await store.blobs.open_local(digest)
    assert os.pread(local.fd, len(data) + 1, 0) == data
    local.close()


async def test_chunked_upload_continued_by_another_worker(store, other_worker):
    data = os.urandom(3 * 1024 * 1024 + 17)
    a, b, c = data[:1_000_000], data[1_000_000:2_500_000], data[2_500_000:]
    up = await store.uploads.start("lib/app")
    assert (await store.uploads.append("lib/app", up.upload_id, body(a), start=0)).offset == len(a)
    # worker 2 continues: the session lives in storage, not in worker 1
    assert (await other_worker.uploads.status("lib/app", up.upload_id)).offset == len(a)
    await other_worker.uploads.append("lib/app", up.upload_id, body(b[:10], b[10:]), start=len(a))
    # worker 1's running hash is now stale; it must notice and re-hash from storage
    info = await store.uploads.finish("lib/app", up.upload_id, sha256(data), body(c),
                                     start=len(a) + len(b))
    assert info.size == len(data)
    assert b"".join([x async for x in other_worker.blobs.read(info.digest)]) == data
    with pytest.raises(BlobUploadUnknown):
        await other_worker.uploads.status("lib/app", up.upload_id)


@pytest.mark.filesystem_only("looks for blob files under the root")
async def test_digest_mismatch_commits_nothing_and_session_stays(store, root):
    data = b"the real content" * 1000
    up = await store.uploads.start("repo")
    await store.uploads.append("repo", up.upload_id, body(data))
    wrong = sha256(b"something else")
    with pytest.raises(DigestInvalid):
        await store.uploads.finish("repo", up.upload_id, wrong)
    assert blob_files(root) == []
    with pytest.raises(BlobUnknown):
        await store.blobs.stat("repo", wrong)
    assert (await store.catalog.repositories()).items == []
    # the session is still there and can be finished with the right digest
    assert (await store.uploads.status("repo", up.upload_id)).offset == len(data)
    info = await store.uploads.finish("repo", up.upload_id, sha256(data))
    assert (await store.blobs.stat("repo", info.digest)).size == len(data)


@pytest.mark.filesystem_only("looks for blob and session files under the root")
async def test_size_mismatch_commits_nothing(store, root):
    data = b"abc" * 100
    with pytest.raises(SizeInvalid):
        await store.uploads.put("repo", sha256(data), body(data), size=len(data) + 1)
    assert blob_files(root) == []
    assert files_under(root, layout.uploads_dir("repo")) == []  # monolithic session cleaned


@pytest.mark.filesystem_only("looks for blob and session files under the root")
async def test_monolithic_digest_mismatch_leaves_no_session(store, root):
    with pytest.raises(DigestInvalid):
        await store.uploads.put("repo", sha256(b"x"), body(b"y"))
    assert blob_files(root) == [] and files_under(root, layout.uploads_dir("repo")) == []


@pytest.mark.filesystem_only("reads the blob's file name under the root")
async def test_sha512_upload(store, root):
    data = os.urandom(70_000)
    digest = "sha512:" + hashlib.sha512(data).hexdigest()
    info = await store.uploads.put("repo", digest, body(data))
    assert info.digest == digest
    assert (await store.blobs.stat("repo", digest)).size == len(data)
    assert "sha512" in blob_files(root)[0]


async def test_range_invalid_carries_current_offset(store):
    up = await store.uploads.start("repo")
    await store.uploads.append("repo", up.upload_id, body(b"0123456789"), start=0)
    for bad_start in (0, 5, 11):
        with pytest.raises(RangeInvalid) as err:
            await store.uploads.append("repo", up.upload_id, body(b"zz"), start=bad_start)
        assert err.value.offset == 10
        assert err.value.code == "BLOB_UPLOAD_INVALID"
    with pytest.raises(RangeInvalid):
        await store.uploads.finish("repo", up.upload_id, sha256(b"0123456789zz"), body(b"zz"), start=3)
    assert (await store.uploads.status("repo", up.upload_id)).offset == 10
    info = await store.uploads.finish("repo", up.upload_id, sha256(b"0123456789zz"), body(b"zz"), start=10)
    assert info.size == 12


async def test_chunk_failing_half_way_resumes_from_reported_offset(store):
    data = os.urandom(3 * 1024 * 1024)

    async def broken_body():
        yield data[:1_500_000]          # reaches storage (over one write batch)
        yield data[1_500_000:1_600_000]
        raise ConnectionResetError("client went away")

    up = await store.uploads.start("repo")
    with pytest.raises(ConnectionResetError):
        await store.uploads.append("repo", up.upload_id, broken_body(), start=0)
    offset = (await store.uploads.status("repo", up.upload_id)).offset
    assert 0 < offset <= 1_600_000
    info = await store.uploads.finish("repo", up.upload_id, sha256(data), body(data[offset:]), start=offset)
    assert info.size == len(data)


async def test_unknown_cancelled_and_finished_uploads(store):
    with pytest.raises(BlobUploadUnknown):
        await store.uploads.status("repo", "00000000-0000-0000-0000-000000000000")
    for bogus in ("../../etc", "a/b", "", ".hidden", "x" * 300):
        with pytest.raises(BlobUploadUnknown):
            await store.uploads.status("repo", bogus)
    up = await store.uploads.start("repo")
    await store.uploads.cancel("repo", up.upload_id)
    with pytest.raises(BlobUploadUnknown):
        await store.uploads.append("repo", up.upload_id, body(b"x"))
    with pytest.raises(BlobUploadUnknown):
        await store.uploads.cancel("repo", up.upload_id)
    with pytest.raises(BlobUploadUnknown):
        await store.uploads.status("other", (await store.uploads.start("repo")).upload_id)


@pytest.mark.filesystem_only("counts the blob files under the root")
async def test_mount_and_delete_blob(store, root):
    digest = await push_blob(store, "src", b"shared layer")
    assert await store.blobs.mount("dst", digest, from_repo="nowhere") is None
    assert (await store.blobs.mount("dst", digest, from_repo="src")).size == 12
    assert await store.blobs.mount("dst2", digest, from_repo=None) is not None
    assert await store.blobs.mount("dst3", sha256(b"absent"), from_repo=None) is None
    await store.blobs.unlink("dst", digest)
    with pytest.raises(BlobUnknown):
        await store.blobs.stat("dst", digest)
    with pytest.raises(BlobUnknown):
        await store.blobs.unlink("dst", digest)
    assert (await store.blobs.stat("src", digest)).size == 12  # bytes kept for GC
    assert len(blob_files(root)) == 1


# ---- manifests -------------------------------------------------------------------

async def test_manifest_round_trip_keeps_pushed_media_type(store, other_worker):
    digest, manifest = await push_image(store, "app", "v1")
    got = await other_worker.manifests.get("app", "v1")
    assert (got.digest, got.media_type, got.body) == (digest, OCI_MANIFEST, manifest)
    assert (await store.manifests.get("app", digest)).body == manifest
    # Docker schema 2, pushed by digest, echoed with its own type
    config, layer = b'{"docker":1}', b"docker layer"
    await push_blob(store, "app", config)
    await push_blob(store, "app", layer)
    docker = image_manifest(config, [layer], media_type=DOCKER_MANIFEST)
    result = await store.manifests.put("app", sha256(docker), docker, DOCKER_MANIFEST)
    assert (await store.manifests.get("app", result.digest)).media_type == DOCKER_MANIFEST
    # a generic Content-Type: the body's mediaType decides
    generic = image_manifest(config, [], media_type=OCI_MANIFEST)
    await store.manifests.put("app", "generic", generic, "application/json")
    assert (await store.manifests.get("app", "generic")).media_type == OCI_MANIFEST
    # stat_blob also finds manifests (clients fetching them via /blobs/)
    assert (await store.blobs.stat("app", digest)).size == len(manifest)


async def test_manifest_pushed_with_extra_tags(store):
    digest, manifest = await push_image(store, "app", "v1")
    result = await store.manifests.put("app", digest, manifest, OCI_MANIFEST, extra_tags=["a", "b"])
    assert result.digest == digest
    assert (await store.manifests.tags("app")).items == ["a", "b", "v1"]


@pytest.mark.filesystem_only("plants a crashed write's hidden directory under the root")
async def test_interrupted_new_tag_is_never_listed(store, root, monkeypatch):
    """A new tag's directory appears only together with its link: a put cut
    short before the final rename (or a crash that leaves the hidden staging
    directory behind) lists nothing and answers 404."""
    import storage.filesystem as filesystem
    await push_image(store, "app", "v1")
    digest, manifest = await push_image(store, "app", "v2")
    leftover = root / layout.tags_dir("app").lstrip("/") / f"{TEMP_PREFIX}1-crashed" / "current"
    leftover.mkdir(parents=True)
    (leftover / "link").write_text(digest)

    def power_cut(src, dst):
        raise OSError(errno.EIO, "interrupted")
    monkeypatch.setattr(filesystem.os, "rename", power_cut)
    with pytest.raises(StorageError):
        await store.manifests.put("app", "torn", manifest, OCI_MANIFEST)
    monkeypatch.undo()
    assert (await store.manifests.tags("app")).items == ["v1", "v2"]
    assert not (root / layout.tag_dir("app", "torn").lstrip("/")).exists()
    with pytest.raises(ManifestUnknown):
        await store.manifests.get("app", "torn")


async def test_index_requires_children_in_repo(store):
    child, _ = await push_image(store, "multi", "amd64", b"amd64")
    missing = sha256(b"not pushed")
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
             "manifests": [{"mediaType": OCI_MANIFEST, "digest": child, "size": 10,
                            "platform": {"architecture": "amd64", "os": "linux"}},
                           {"mediaType": OCI_MANIFEST, "digest": missing, "size": 10}]}
    with pytest.raises(ManifestBlobUnknown) as err:
        await store.manifests.put("multi", "latest", json.dumps(index).encode(), OCI_INDEX)
    assert err.value.detail == {"digest": missing}
    index["manifests"].pop()
    raw = json.dumps(index).encode()
    result = await store.manifests.put("multi", "latest", raw, OCI_INDEX)
    assert (await store.manifests.get("multi", "latest")).body == raw
    # the child is not in another repository
    with pytest.raises(ManifestBlobUnknown):
        await store.manifests.put("elsewhere", "latest", raw, OCI_INDEX)
    assert result.digest == sha256(raw)


@pytest.mark.filesystem_only("looks for blob files under the root")
@pytest.mark.parametrize("raw, media_type, error", [
    (b"{not json", OCI_MANIFEST, ManifestInvalid),
    (b"[1, 2]", OCI_MANIFEST, ManifestInvalid),
    (json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode(),
     OCI_MANIFEST, ManifestInvalid),                                   # body vs Content-Type
    (json.dumps({"schemaVersion": 2, "layers": []}).encode(), OCI_MANIFEST, ManifestInvalid),
    (json.dumps({"schemaVersion": 1, "name": "x", "fsLayers": []}).encode(),
     "application/vnd.docker.distribution.manifest.v1+prettyjws", ManifestInvalid),
    (json.dumps({"schemaVersion": 2, "manifests": []}).encode(),
     "application/x-unknown", ManifestInvalid),
    (json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                 "config": {"mediaType": CONFIG_TYPE, "digest": "sha256:nothex", "size": 1},
                 "layers": []}).encode(), OCI_MANIFEST, ManifestInvalid),
    (json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                 "config": {"mediaType": CONFIG_TYPE, "digest": sha256(b"c"), "size": -1},
                 "layers": []}).encode(), OCI_MANIFEST, ManifestInvalid),
    (json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                 "config": descriptor(CONFIG_TYPE, b"never pushed"),
                 "layers": []}).encode(), OCI_MANIFEST, ManifestBlobUnknown),
])
async def test_invalid_manifests_rejected_and_nothing_stored(store, root, raw, media_type, error):
    with pytest.raises(error):
        await store.manifests.put("bad", "latest", raw, media_type)
    with pytest.raises(NameUnknown):
        await store.manifests.tags("bad")
    assert blob_files(root) == []


async def test_unknown_layer_rejected(store):
    config = b"{}cfg"
    await push_blob(store, "repo", config)
    raw = image_manifest(config, [b"missing layer"])
    with pytest.raises(ManifestBlobUnknown) as err:
        await store.manifests.put("repo", "t", raw, OCI_MANIFEST)
    assert err.value.detail == {"digest": sha256(b"missing layer")}
    with pytest.raises(ManifestUnknown):
        await store.manifests.get("repo", "t")


async def test_manifest_size_limit_and_digest_reference(open_store):
    small = await open_store(StoreLimits(max_manifest_bytes=100))
    config = b"c"
    await push_blob(small, "repo", config)
    raw = image_manifest(config, [])
    assert len(raw) > 100
    with pytest.raises(ManifestTooLarge) as err:
        await small.manifests.put("repo", "t", raw, OCI_MANIFEST)
    assert isinstance(err.value, SizeInvalid)
    big = await open_store()
    with pytest.raises(DigestInvalid):
        await big.manifests.put("repo", sha256(b"other"), raw, OCI_MANIFEST)
    with pytest.raises(TagInvalid):
        await big.manifests.put("repo", "-bad-tag", raw, OCI_MANIFEST)
    with pytest.raises(TagInvalid):
        await big.manifests.put("repo", "ok", raw, OCI_MANIFEST, extra_tags=["bad/tag"])
    assert (await big.manifests.tags("repo")).items == []


async def test_artifact_with_empty_config_needs_no_config_upload(store):
    subject, _ = await push_image(store, "art", "v1")
    blob = b"sbom contents"
    empty_config = {"mediaType": "application/vnd.oci.empty.v1+json", "digest": EMPTY_DIGEST, "size": 2}
    rejected = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": empty_config,
                           "layers": [descriptor("application/spdx+json", blob)]}).encode()
    with pytest.raises(ManifestBlobUnknown):  # the layer is missing: nothing gets linked
        await store.manifests.put("art", "rejected", rejected, OCI_MANIFEST)
    with pytest.raises(BlobUnknown):
        await store.blobs.stat("art", EMPTY_DIGEST)
    await push_blob(store, "art", blob)
    artifact = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/spdx+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": EMPTY_DIGEST, "size": 2},
        "layers": [descriptor("application/spdx+json", blob)],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 1},
    }).encode()
    result = await store.manifests.put("art", sha256(artifact), artifact, OCI_MANIFEST)
    assert result.subject == subject
    assert (await store.blobs.stat("art", EMPTY_DIGEST)).size == 2


# ---- referrers -------------------------------------------------------------------

async def test_referrers_index_filter_and_delete(store, other_worker):
    config = b'{"sig":true}'
    await push_blob(store, "app", config)
    subject = sha256(b"a manifest pushed later")  # the spec allows any order

    def referrer(artifact_type: str | None, note: str, config_type: str = "application/vnd.cfg") -> bytes:
        doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
               "config": {"mediaType": config_type, "digest": sha256(config), "size": len(config)},
               "layers": [], "annotations": {"note": note},
               "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 123}}
        if artifact_type:
            doc["artifactType"] = artifact_type
        return json.dumps(doc).encode()

    sig, sbom, plain = referrer("application/sig", "1"), referrer("application/sbom", "2"), \
        referrer(None, "3", config_type="application/from-config")
    # concurrent pushes of referrers of one subject, from two workers
    results = await asyncio.gather(store.manifests.put("app", sha256(sig), sig, OCI_MANIFEST),
                                   other_worker.manifests.put("app", sha256(sbom), sbom, OCI_MANIFEST),
                                   store.manifests.put("app", sha256(plain), plain, OCI_MANIFEST))
    assert {r.subject for r in results} == {subject}
    found = await other_worker.manifests.referrers("app", subject)
    assert sorted(d["digest"] for d in found) == sorted(sha256(x) for x in (sig, sbom, plain))
    by_digest = {d["digest"]: d for d in found}
    assert by_digest[sha256(sig)] == {"mediaType": OCI_MANIFEST, "digest": sha256(sig),
                                      "size": len(sig), "artifactType": "application/sig",
                                      "annotations": {"note": "1"}}
    assert by_digest[sha256(plain)]["artifactType"] == "application/from-config"
    filtered = await store.manifests.referrers("app", subject, artifact_type="application/sbom")
    assert [d["digest"] for d in filtered] == [sha256(sbom)]
    assert await store.manifests.referrers("app", sha256(b"nothing refers")) == []
    assert await store.manifests.referrers("no-such-repo", subject) == []
    await store.manifests.delete("app", sha256(sig))
    assert sorted(d["digest"] for d in await store.manifests.referrers("app", subject)) == \
        sorted([sha256(sbom), sha256(plain)])


async def test_index_referrer_without_artifact_type_omits_it(store):
    child, _ = await push_image(store, "app", "v1")
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                        "manifests": [{"mediaType": OCI_MANIFEST, "digest": child, "size": 1}],
                        "subject": {"mediaType": OCI_MANIFEST, "digest": child, "size": 1}}).encode()
    await store.manifests.put("app", "idx", index, OCI_INDEX)
    (entry,) = await store.manifests.referrers("app", child)
    assert entry == {"mediaType": OCI_INDEX, "digest": sha256(index), "size": len(index)}


# ---- tags, catalog, deletes ------------------------------------------------------

async def test_tag_pagination_in_lexical_order(store):
    digest, manifest = await push_image(store, "paged", "v0")
    for tag in ["b", "a", "C", "d", "e", "_x", "1.0"]:
        await store.manifests.put("paged", tag, manifest, OCI_MANIFEST)
    everything = ["1.0", "C", "_x", "a", "b", "d", "e", "v0"]  # ASCIIbetical
    assert (await store.manifests.tags("paged")).items == everything
    page = await store.manifests.tags("paged", n=3)
    assert (page.items, page.has_more) == (["1.0", "C", "_x"], True)
    page = await store.manifests.tags("paged", n=3, last="_x")
    assert (page.items, page.has_more) == (["a", "b", "d"], True)
    page = await store.manifests.tags("paged", n=3, last="d")
    assert (page.items, page.has_more) == (["e", "v0"], False)
    page = await store.manifests.tags("paged", n=2, last="d")
    assert (page.items, page.has_more) == (["e", "v0"], False)
    page = await store.manifests.tags("paged", n=0)
    assert (page.items, page.has_more) == ([], False)
    with pytest.raises(NameUnknown):
        await store.manifests.tags("never/pushed")


@pytest.mark.filesystem_only("lists the catalog directory under the root")
async def test_catalog_is_an_index_with_pagination(store, root):
    for repo in ["zeta", "alpha/one", "alpha", "alpha/two", "mid-dle"]:
        await push_blob(store, repo, b"content")
    await store.uploads.start("only-an-upload")  # an upload alone is no content
    everything = ["alpha", "alpha/one", "alpha/two", "mid-dle", "zeta"]
    assert (await store.catalog.repositories()).items == everything
    page = await store.catalog.repositories(n=2)
    assert (page.items, page.has_more) == (["alpha", "alpha/one"], True)
    page = await store.catalog.repositories(n=2, last="alpha/one")
    assert (page.items, page.has_more) == (["alpha/two", "mid-dle"], True)
    page = await store.catalog.repositories(n=5, last="mid-dle")
    assert (page.items, page.has_more) == (["zeta"], False)
    # the catalog is read from its own flat index, not the repositories tree
    entries = sorted(os.listdir(root / layout.CATALOG.lstrip("/")))
    assert entries == ["alpha", "alpha+one", "alpha+two", "mid-dle", "zeta"]


async def test_delete_by_tag_and_by_digest(store, other_worker):
    digest, manifest = await push_image(store, "del", "v1")
    other, _ = await push_image(store, "del", "keep", b"other")
    await store.manifests.put("del", "v2", manifest, OCI_MANIFEST)
    await store.manifests.put("del", "v3", manifest, OCI_MANIFEST)
    await store.manifests.delete("del", "v3")  # tag only
    assert (await store.manifests.get("del", digest)).digest == digest
    assert (await store.manifests.tags("del")).items == ["keep", "v1", "v2"]
    with pytest.raises(ManifestUnknown):
        await store.manifests.delete("del", "v3")
    await other_worker.manifests.delete("del", digest)
    assert (await store.manifests.tags("del")).items == ["keep"]  # tags of that digest gone
    for ref in (digest, "v1", "v2"):
        with pytest.raises(ManifestUnknown):
            await store.manifests.get("del", ref)  # also from the worker that cached the bytes
    with pytest.raises(ManifestUnknown):
        await store.manifests.delete("del", digest)
    assert (await store.manifests.get("del", "keep")).digest == other
    with pytest.raises(NameUnknown):
        await store.manifests.get("never-pushed", "latest")


@pytest.mark.filesystem_only("checks that nothing is written under or beside the root")
@pytest.mark.parametrize("bad", ["a/../../etc", "../x", "/abs", "a//b", "A", "a/", "",
                                 "a\x00b", ".", "a/./b", "x" * 256, "a/_layers"])
async def test_repository_names_cannot_escape(store, root, tmp_path, bad):
    before = sorted(os.listdir(tmp_path))
    data = b"payload"
    with pytest.raises(NameInvalid):
        await store.uploads.start(bad)
    with pytest.raises(NameInvalid):
        await store.uploads.put(bad, sha256(data), body(data))
    with pytest.raises(NameInvalid):
        await store.blobs.stat(bad, sha256(data))
    with pytest.raises(NameInvalid):
        await store.manifests.put(bad, "latest", b"{}", OCI_MANIFEST)
    with pytest.raises(NameInvalid):
        await store.manifests.get(bad, "latest")
    with pytest.raises(NameInvalid):
        await store.manifests.tags(bad)
    with pytest.raises(NameInvalid):
        await store.blobs.mount("fine", sha256(data), from_repo=bad)
    assert files_under(root) == []
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.filesystem_only("checks that nothing is written under the root")
@pytest.mark.parametrize("bad_ref", ["../../x", "sha256:../../etc", "sha256:" + "A" * 64,
                                     "md5:" + "0" * 32, "sha256:" + "0" * 63, ".tag", "a" * 129])
async def test_references_cannot_escape(store, root, bad_ref):
    with pytest.raises((TagInvalid, DigestInvalid)):
        await store.manifests.get("repo", bad_ref)
    with pytest.raises((TagInvalid, DigestInvalid)):
        await store.manifests.delete("repo", bad_ref)
    if ":" in bad_ref:
        with pytest.raises(DigestInvalid):
            await store.blobs.stat("repo", bad_ref)
        with pytest.raises(DigestInvalid):
            await store.manifests.referrers("repo", bad_ref)
    assert files_under(root) == []


# ---- concurrency and crashes -----------------------------------------------------

@pytest.mark.filesystem_only("reads the blob file and looks for temp files under the root")
async def test_concurrent_pushes_of_same_blob_and_tag(store, other_worker, root):
    data = os.urandom(2 * 1024 * 1024)
    workers = [store, other_worker] * 4
    infos = await asyncio.gather(*(w.uploads.put("race", sha256(data), body(data[:777], data[777:]))
                                   for w in workers))
    assert {i.digest for i in infos} == {sha256(data)}
    config = b'{"race":true}'
    await push_blob(store, "race", config)
    manifests = [image_manifest(config, [data], annotations={"n": str(i)}) for i in range(6)]
    results = await asyncio.gather(*(w.manifests.put("race", "latest", m, OCI_MANIFEST)
                                     for w, m in zip(workers, manifests)))
    winner = await other_worker.manifests.get("race", "latest")
    assert winner.digest in {r.digest for r in results}
    assert winner.body == manifests[[r.digest for r in results].index(winner.digest)]
    blob = layout.blob_data(sha256(data)).lstrip("/")
    assert blob_files(root).count(blob) == 1
    assert hashlib.sha256((root / blob).read_bytes()).hexdigest() == sha256(data).split(":")[1]
    assert files_under(root, layout.uploads_dir("race")) == []
    assert not [p for p in files_under(root) if TEMP_PREFIX in p]


_PUSHER = textwrap.dedent("""
    import asyncio, hashlib, sys
    from storage.filesystem import FilesystemDriver
    from storage.store import ContentStore

    async def main(root, repo, size, mode):
        store = ContentStore(FilesystemDriver(root))
        data = bytes(range(256)) * (size // 256)
        if mode == "push":
            await store.uploads.put(repo, "sha256:" + hashlib.sha256(data).hexdigest(), one(data))
            print("done", flush=True)
            return
        up = await store.uploads.start(repo)
        print(up.upload_id, flush=True)
        async def slow():
            for i in range(0, len(data), 65536):
                yield data[i:i + 65536]
                await asyncio.sleep(0.01)
        await store.uploads.append(repo, up.upload_id, slow())
        print("finished without being killed", flush=True)

    async def one(data):
        yield data

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
""")


def _spawn_pusher(root: Path, repo: str, size: int, mode: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    return subprocess.Popen([sys.executable, "-c", _PUSHER, str(root), repo, str(size), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=str(PROJECT_ROOT))


@pytest.mark.filesystem_only("runs worker processes on the root and reads its files")
async def test_worker_processes_push_same_blob_concurrently(store, root):
    size = 4 * 1024 * 1024
    procs = [_spawn_pusher(root, "multi/proc", size, "push") for _ in range(3)]
    try:
        for p in procs:
            out, err = await asyncio.to_thread(p.communicate, timeout=60)
            assert p.returncode == 0, err.decode()
            assert out.strip() == b"done"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    data = bytes(range(256)) * (size // 256)
    assert (await store.blobs.stat("multi/proc", sha256(data))).size == size
    assert len(blob_files(root)) == 1
    assert not [p for p in files_under(root) if TEMP_PREFIX in p]


@pytest.mark.filesystem_only("SIGKILLs a process writing under the root")
async def test_sigkill_mid_upload_leaves_nothing_visible_and_retry_works(store, root):
    size = 8 * 1024 * 1024  # ~1.3 s of slow appends: plenty of time to kill it
    data = bytes(range(256)) * (size // 256)
    digest = sha256(data)
    proc = _spawn_pusher(root, "crash", size, "upload")
    try:
        upload_id = (await asyncio.to_thread(proc.stdout.readline)).decode().strip()
        assert upload_id, proc.stderr.read().decode()
        partial = root / layout.upload_data("crash", upload_id).lstrip("/")
        deadline = time.monotonic() + 20
        while partial.stat().st_size < 2 * 1024 * 1024 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # nothing of the blob is visible
    assert blob_files(root) == []
    with pytest.raises(BlobUnknown):
        await store.blobs.stat("crash", digest)
    # another worker resumes the killed session from where storage says it is
    offset = (await store.uploads.status("crash", upload_id)).offset
    assert 0 < offset < size
    info = await store.uploads.finish("crash", upload_id, digest, body(data[offset:]), start=offset)
    assert info.size == size
    # and a fresh retry of the whole blob succeeds too (deduplicated)
    assert (await store.uploads.put("crash", digest, body(data))).digest == digest
    assert len(blob_files(root)) == 1


async def test_purge_stale_uploads(store):
    up = await store.uploads.start("stale")
    keep = await store.uploads.start("stale")
    started = await store.uploads.started_at("stale", up.upload_id)
    assert abs(started - time.time()) < 120
    assert sorted(await store.uploads.purge("stale", older_than=started + 3600)) == \
        sorted([up.upload_id, keep.upload_id])
    with pytest.raises(BlobUploadUnknown):
        await store.uploads.status("stale", keep.upload_id)
    fresh = await store.uploads.start("stale")
    assert await store.uploads.purge("stale", older_than=started - 3600) == []
    assert (await store.uploads.status("stale", fresh.upload_id)).offset == 0


@pytest.mark.filesystem_only("looks for blob and session files under the root")
async def test_same_session_finished_twice_concurrently(store, other_worker, root):
    data = os.urandom(3 * 1024 * 1024)
    up = await store.uploads.start("twice")
    await store.uploads.append("twice", up.upload_id, body(data))
    results = await asyncio.gather(store.uploads.finish("twice", up.upload_id, sha256(data)),
                                   other_worker.uploads.finish("twice", up.upload_id, sha256(data)),
                                   return_exceptions=True)
    assert any(not isinstance(r, Exception) for r in results), results
    for r in results:
        assert not isinstance(r, Exception) or isinstance(r, BlobUploadUnknown), r
    assert (await other_worker.blobs.stat("twice", sha256(data))).size == len(data)
    assert blob_files(root) == [layout.blob_data(sha256(data)).lstrip("/")]
    assert files_under(root, layout.uploads_dir("twice")) == []
