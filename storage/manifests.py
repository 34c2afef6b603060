"""Manifests, tags and referrers: a manifest pushed is validated (the OCI
vocabulary's rules, plus every blob and child present in the repository),
stored as a blob, linked as a revision, tagged, and indexed by its subject
for the referrers API."""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from dataclasses import dataclass

from storage import layout
from storage.blobs import Blobs, StoreLimits
from storage.catalog import Catalog, Page, paginate
from storage.driver import PathNotFound, StorageDriver, delete_if_present, exists
from storage.oci.content import parse_pushed_manifest
from storage.oci.digests import EMPTY_DIGEST, digest_of
from storage.oci.errors import (DigestInvalid, ManifestBlobUnknown, ManifestTooLarge,
                                ManifestUnknown, NameUnknown)
from storage.oci.names import is_digest, parse_digest, validate_name, validate_tag

_HASH_ON_LOOP_LIMIT = 64 << 10  # hash and parse smaller manifests inline, larger in a thread
_REFERRERS_BATCH = 256          # referrer entries read per storage round trip
_RELINK_TRIES = 3               # re-links of a revision a concurrent delete removed


@dataclass(frozen=True)
class Manifest:
    digest: str
    media_type: str        # exactly the Content-Type it was pushed with
    body: bytes


@dataclass(frozen=True)
class PutManifestResult:
    digest: str
    subject: str | None    # digest of the `subject` descriptor, for OCI-Subject


@dataclass(frozen=True)
class _Pushed:
    """What the store needs of a pushed manifest, read by the vocabulary's rules."""
    media_type: str
    blobs: list[str]               # config and layers that must be linked
    children: list[str]            # index entries that must be manifests here
    subject: str | None
    artifact_type: str | None
    annotations: dict[str, str] | None

    @classmethod
    def parse(cls, body: bytes, content_type: str) -> "_Pushed":
        doc = parse_pushed_manifest(body, content_type)
        blobs, children = [], []
        for child in doc.children():
            if child.role == "manifest":
                children.append(child.descriptor.digest)
            elif child.role == "config" or (child.role == "layer" and not child.descriptor.urls):
                blobs.append(child.descriptor.digest)   # a layer with urls lives elsewhere
        return cls(doc.media_type, blobs, children, doc.subject.digest if doc.subject else None,
                   doc.effective_artifact_type, doc.annotations or None)


class _BytesLRU:
    """A byte-bounded LRU for immutable values (keyed by digest)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    def get(self, key: str) -> bytes | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes // 8 or key in self._items:
            return
        self._items[key] = value
        self._bytes += len(value)
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= len(old)


class Manifests:
    def __init__(self, driver: StorageDriver, limits: StoreLimits, blobs: Blobs, catalog: Catalog):
        self.driver = driver
        self.limits = limits
        self.blobs = blobs
        self.catalog = catalog
        # Only bytes by digest are cached: they never change. A revision's
        # media type does (the same bytes pushed again under another
        # Content-Type, on any replica), so it is read from storage each time.
        self._manifest_bytes = _BytesLRU(limits.manifest_cache_bytes)

    async def _check_references(self, repo: str, parsed: _Pushed) -> None:
        """ManifestBlobUnknown unless every blob is linked in repo and every
        child is a manifest there. Only once everything else is present is
        a missing OCI empty blob provided, so a rejected push links nothing."""
        blobs, children = list(dict.fromkeys(parsed.blobs)), list(dict.fromkeys(parsed.children))
        # Every link of a 100-layer image in one storage round trip.
        found = await self.driver.stat_many(
            [layout.layer_link(repo, d) for d in blobs]
            + [layout.manifest_revision_link(repo, d) for d in blobs + children])
        layer_links, blob_revisions = found[:len(blobs)], found[len(blobs):2 * len(blobs)]
        child_revisions = found[2 * len(blobs):]
        missing = [d for d, a, b in zip(blobs, layer_links, blob_revisions) if a is None and b is None]
        missing += [d for d, r in zip(children, child_revisions) if r is None]
        needs_empty = EMPTY_DIGEST in missing and EMPTY_DIGEST not in parsed.children
        if needs_empty:
            missing.remove(EMPTY_DIGEST)
        if missing and not self.limits.allow_sparse_manifests:
            raise ManifestBlobUnknown(f"manifest references unknown content: {missing[0]}",
                                      {"digest": missing[0]})
        if needs_empty:
            await self.blobs.provide_empty(repo)

    async def put(self, repo: str, reference: str, body: bytes,
                           media_type: str,
                           extra_tags: list[str] = ()) -> PutManifestResult:
        """Validate (JSON, media type, size limit, every referenced blob or
        child manifest present in repo -> ManifestInvalid /
        ManifestBlobUnknown), store the bytes as a blob, link the revision,
        point the tag (reference if it is a tag, plus extra_tags), and index
        the `subject` for referrers. reference may be a digest, which must
        match the body (DigestInvalid). ManifestTooLarge (a SizeInvalid)
        over limits.max_manifest_bytes."""
        validate_name(repo)
        tags: list[str] = []
        if is_digest(reference):
            alg, _ = self.blobs.check_digest(reference)
        else:
            validate_tag(reference)
            alg = "sha256"
            tags.append(reference)
        for tag in extra_tags:
            validate_tag(tag)
            if tag not in tags:
                tags.append(tag)
        body = bytes(body)
        if len(body) > self.limits.max_manifest_bytes:
            raise ManifestTooLarge(f"manifest is {len(body)} bytes, limit is "
                                   f"{self.limits.max_manifest_bytes}",
                                   {"size": len(body), "limit": self.limits.max_manifest_bytes})
        if len(body) > _HASH_ON_LOOP_LIMIT:
            digest = await asyncio.to_thread(digest_of, body, alg)
        else:
            digest = digest_of(body, alg)
        if is_digest(reference) and reference != digest:
            raise DigestInvalid("manifest digest does not match the reference",
                                {"expected": reference, "actual": digest})
        if len(body) > _HASH_ON_LOOP_LIMIT:     # a 4 MiB parse would stall every other request
            parsed = await asyncio.to_thread(_Pushed.parse, body, media_type)
        else:
            parsed = _Pushed.parse(body, media_type)
        await self._check_references(repo, parsed)

        await self.blobs.put_small(digest, body)
        await self._link_revision(repo, digest, len(body), parsed)
        for tag in tags:
            await self.driver.put_content(layout.tag_current_link(repo, tag), digest.encode())
        # A delete by digest may have removed the revision after we linked it
        # and scanned the tags before ours landed: then link it again, so no
        # tag is left naming nothing. (The delete re-scans the tags after
        # removing the revision, so either it sees our tag or we see its
        # removal: one of the two always repairs.)
        for _ in range(_RELINK_TRIES):
            if not tags or await exists(self.driver, layout.manifest_revision_link(repo, digest)):
                break
            await self._link_revision(repo, digest, len(body), parsed)
        await self.catalog.register(repo)
        self._manifest_bytes.put(digest, body)
        return PutManifestResult(digest, parsed.subject)

    async def _link_revision(self, repo: str, digest: str, size: int,
                             parsed: _Pushed) -> None:
        descriptor = {"mediaType": parsed.media_type, "digest": digest, "size": size}
        await self.driver.put_content(layout.manifest_revision_link(repo, digest),
                                      json.dumps(descriptor).encode())
        if parsed.subject is not None:
            referrer = dict(descriptor)
            if parsed.artifact_type:
                referrer["artifactType"] = parsed.artifact_type
            if parsed.annotations:
                referrer["annotations"] = parsed.annotations
            await self.driver.put_content(layout.referrer_entry(repo, parsed.subject, digest),
                                          json.dumps(referrer).encode())

    async def _resolve(self, repo: str, reference: str) -> str:
        """The manifest digest a tag or digest reference names in repo."""
        validate_name(repo)
        if is_digest(reference):
            self.blobs.check_digest(reference)
            return reference
        validate_tag(reference)
        try:
            return (await self.driver.get_content(layout.tag_current_link(repo, reference))).decode().strip()
        except PathNotFound:
            raise await self._manifest_unknown(repo, reference) from None

    async def _manifest_unknown(self, repo: str, reference: str) -> Exception:
        if not await self.catalog.has(repo):
            return NameUnknown(f"repository name not known to registry: {repo}", {"name": repo})
        return ManifestUnknown(f"manifest unknown: {repo}:{reference}"
                               if not is_digest(reference)
                               else f"manifest unknown: {repo}@{reference}",
                               {"reference": reference})

    async def get(self, repo: str, reference: str) -> Manifest:
        """By tag or digest; ManifestUnknown (NameUnknown for an unknown
        repository). Manifest GET is hot: a tag costs two small reads (the
        tag link, the revision link), a digest one (the revision link); the
        bytes come from a cache keyed by digest."""
        digest = await self._resolve(repo, reference)
        try:
            link = json.loads(await self.driver.get_content(layout.manifest_revision_link(repo, digest)))
        except PathNotFound:
            raise await self._manifest_unknown(repo, reference) from None
        media_type = link["mediaType"]
        body = self._manifest_bytes.get(digest)
        if body is None:
            try:
                body = await self.driver.get_content(layout.blob_data(digest))
            except PathNotFound:
                raise await self._manifest_unknown(repo, reference) from None
            self._manifest_bytes.put(digest, body)
        return Manifest(digest, media_type, body)

    async def delete(self, repo: str, reference: str) -> None:
        """By digest: unlink the revision, drop tags pointing at it and its
        referrers entry. By tag: delete only the tag."""
        validate_name(repo)
        if not is_digest(reference):
            validate_tag(reference)
            if not await delete_if_present(self.driver, layout.tag_dir(repo, reference)):
                raise await self._manifest_unknown(repo, reference)
            return
        manifest = await self.get(repo, reference)
        digest = manifest.digest
        # Tags first: a crash half way never leaves a tag naming nothing.
        await self._untag(repo, digest)
        subject = _subject_of(manifest.body)
        if subject is not None:
            await delete_if_present(self.driver, layout.referrer_entry(repo, subject, digest))
        if not await delete_if_present(self.driver, layout.manifest_revision_dir(repo, digest)):
            raise await self._manifest_unknown(repo, reference)
        # A push tagging this digest may have landed its tag after the first
        # scan: put_manifest re-checks the revision after tagging, and this
        # second scan catches a tag that landed before that check.
        await self._untag(repo, digest)

    async def _untag(self, repo: str, digest: str) -> None:
        """Delete every tag of repo that names digest."""
        try:
            tag_dirs = await self.driver.list(layout.tags_dir(repo))
        except PathNotFound:
            return
        links = await self.driver.get_many(
            [layout.tag_current_link(repo, path.rsplit("/", 1)[-1]) for path in tag_dirs])
        for path, current in zip(tag_dirs, links):
            if current is not None and current.decode(errors="replace").strip() == digest:
                await delete_if_present(self.driver, layout.tag_dir(repo, path.rsplit("/", 1)[-1]))

    async def tags(self, repo: str, n: int | None = None,
                        last: str | None = None) -> Page:
        """Lexically sorted; NameUnknown for a repository that does not exist."""
        validate_name(repo)
        try:
            entries = await self.driver.list(layout.tags_dir(repo))
        except PathNotFound:
            if not await self.catalog.has(repo):
                raise NameUnknown(f"repository name not known to registry: {repo}",
                                  {"name": repo}) from None
            entries = []
        return paginate(sorted(e.rsplit("/", 1)[-1] for e in entries), n, last)

    async def referrers(self, repo: str, digest: str, artifact_type: str | None = None,
                        n: int | None = None, last: str | None = None) -> list[dict]:
        """Descriptors (mediaType, digest, size, artifactType, annotations)
        of manifests whose subject is digest, in digest order: those after
        the referrer digest `last`, at most n. Entries are read in batches
        (one storage round trip each) and decoded off the event loop."""
        validate_name(repo)
        self.blobs.check_digest(digest)
        try:
            entries = await self.driver.list(layout.referrers_dir(repo, digest))
        except PathNotFound:
            return []
        if last:
            after = layout.referrer_entry(repo, digest, last)   # DigestInvalid for a bad cursor
            entries = [e for e in entries if e > after]
        found: list[dict] = []
        for at in range(0, len(entries), _REFERRERS_BATCH):
            raw = await self.driver.get_many(entries[at:at + _REFERRERS_BATCH])
            batch = await asyncio.to_thread(_decode_referrers, raw, artifact_type)
            found += batch
            if n is not None and len(found) >= n:
                return found[:n]
        return found


def _decode_referrers(raw: list[bytes | None], artifact_type: str | None) -> list[dict]:
    out = []
    for data in raw:
        if data is None:
            continue            # deleted meanwhile
        try:
            descriptor = json.loads(data)
        except ValueError:
            continue            # a torn write from a foreign tool
        if isinstance(descriptor, dict) and (
                artifact_type is None or descriptor.get("artifactType") == artifact_type):
            out.append(descriptor)
    return out


def _subject_of(body: bytes) -> str | None:
    try:
        subject = json.loads(body).get("subject")
        digest = subject.get("digest") if isinstance(subject, dict) else None
        if digest:
            parse_digest(digest)
        return digest
    except (ValueError, AttributeError, DigestInvalid):
        return None
