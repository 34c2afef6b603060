"""Manifests, tags and referrers: a manifest pushed is validated (the OCI
vocabulary's rules, plus every blob and child present in the repository),
stored as a blob, linked as a revision, tagged, and indexed by its subject
for the referrers API.

A manifest is served with the media type its own bytes give
(`stored_media_type`), as CNCF Distribution serves it, since the two share
one layout (storage.layout) and nothing beside the bytes records a type: a
push whose Content-Type its body would not say again (a Docker type on a
body without mediaType) is refused, as Distribution refuses it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable

from storage import layout
from storage.blobs import Blobs, StoreLimits
from storage.catalog import Catalog, Page, paginate
from storage.driver import PathNotFound, StorageDriver, delete_if_present, file_exists
from storage.oci.content import parse_manifest, parse_pushed_manifest, stored_media_type
from storage.oci.digests import EMPTY_DIGEST, digest_of
from storage.oci.errors import (DigestInvalid, ManifestBlobUnknown, ManifestInvalid, ManifestTooLarge,
                                ManifestUnknown, NameUnknown)
from storage.oci.names import is_digest, parse_digest, validate_name, validate_tag

_HASH_ON_LOOP_LIMIT = 64 << 10  # hash and parse smaller manifests inline, larger in a thread
_MAX_MEDIA_TYPES = 16384        # in-process (repo, digest) -> media type entries
_REFERRERS_BATCH = 256          # referrer entries read per storage round trip
_RELINK_TRIES = 3               # re-links of a revision a concurrent delete removed

log = logging.getLogger("dockyard.storage.manifests")


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
    media_type: str                # as pushed (Content-Type, else the body's)
    served_type: str               # as the bytes say (stored_media_type)
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
        return cls(doc.media_type, stored_media_type(doc.json), blobs, children,
                   doc.subject.digest if doc.subject else None, doc.effective_artifact_type,
                   doc.annotations or None)


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
    def __init__(self, driver: StorageDriver, limits: StoreLimits, blobs: Blobs, catalog: Catalog,
                 indexed: Callable[[], Awaitable[None]] | None = None):
        self.driver = driver
        self._indexed = indexed           # returns once the root's index is built
        self.limits = limits
        self.blobs = blobs
        self.catalog = catalog
        self._manifest_bytes = _BytesLRU(limits.manifest_cache_bytes)
        # (repo, digest) -> media type of a revision seen in this process.
        # Used only behind a tag just read from storage: tags are deleted
        # before the revision they name, so a live tag vouches for it.
        self._media_types: OrderedDict[tuple[str, str], str] = OrderedDict()

    async def _check_references(self, repo: str, parsed: _Pushed) -> None:
        """ManifestBlobUnknown unless every blob is linked in repo and every
        child is a manifest there. Only once everything else is present is
        a missing OCI empty blob provided, so a rejected push links nothing."""
        blobs, children = list(dict.fromkeys(parsed.blobs)), list(dict.fromkeys(parsed.children))
        # Every link of a 100-layer image in one storage round trip.
        found = await self.driver.stat_files(
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

    async def _recheck_references(self, repo: str, parsed: _Pushed) -> None:
        """The second look after the revision is linked: garbage collection
        (storage.gc) may have swept a link between the first check and the
        revision's write. A vanished link whose bytes are still there is
        written back (the sweep's re-mark keeps bytes a revision names);
        vanished bytes are ManifestBlobUnknown, so the client pushes them
        again. storage.gc's docstring has the whole argument."""
        if self.limits.allow_sparse_manifests:
            return
        blobs, children = list(dict.fromkeys(parsed.blobs)), list(dict.fromkeys(parsed.children))
        # A sweep deletes links before bytes: a link still there vouches for its
        # bytes, so only what lost its link is looked at further (a push on S3
        # pays one HEAD per reference here, not three).
        found = await self.driver.stat_files([layout.layer_link(repo, d) for d in blobs]
                                             + [layout.manifest_revision_link(repo, d) for d in children])
        lost_blobs = [d for d, f in zip(blobs, found[:len(blobs)]) if f is None]
        lost_children = [d for d, f in zip(children, found[len(blobs):]) if f is None]
        if not lost_blobs and not lost_children:
            return
        n = len(lost_blobs)
        found = await self.driver.stat_files(
            [layout.manifest_revision_link(repo, d) for d in lost_blobs]
            + [layout.blob_data(d) for d in lost_blobs + lost_children])
        as_revisions, data = found[:n], found[n:]
        for at, digest in enumerate(lost_blobs + lost_children):
            if data[at] is None:
                raise ManifestBlobUnknown(f"manifest references unknown content: {digest} "
                                          f"(collected while this push was in progress: push it again)",
                                          {"digest": digest})
        for digest, revision in zip(lost_blobs, as_revisions):
            if revision is None:
                await self.driver.put_content(layout.layer_link(repo, digest), layout.link_content(digest))
        for digest in lost_children:
            await self.driver.put_content(layout.manifest_revision_link(repo, digest),
                                          layout.link_content(digest))

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
        if parsed.served_type.lower() != parsed.media_type.lower():
            raise ManifestInvalid(f"Content-Type is {parsed.media_type!r} but the manifest does not say "
                                  f"so: set its mediaType (a manifest's type is read from its bytes)")
        await self._check_references(repo, parsed)

        await self.blobs.put_small(digest, body)
        await self._link_revision(repo, digest, len(body), parsed)
        for tag in tags:
            # the index link first, then current, as Distribution writes a tag
            await self.driver.put_content(layout.tag_index_link(repo, tag, digest), layout.link_content(digest))
            await self.driver.put_content(layout.tag_current_link(repo, tag), layout.link_content(digest))
        # A delete by digest may have removed the revision after we linked it
        # and scanned the tags before ours landed: then link it again, so no
        # tag is left naming nothing. (The delete re-scans the tags after
        # removing the revision, so either it sees our tag or we see its
        # removal: one of the two always repairs.)
        for _ in range(_RELINK_TRIES):
            if not tags or await file_exists(self.driver, layout.manifest_revision_link(repo, digest)):
                break
            await self._link_revision(repo, digest, len(body), parsed)
        await self._recheck_references(repo, parsed)
        await self.catalog.register(repo)
        self._manifest_bytes.put(digest, body)
        self._remember_media_type((repo, digest), parsed.served_type)
        return PutManifestResult(digest, parsed.subject)

    async def _link_revision(self, repo: str, digest: str, size: int,
                             parsed: _Pushed) -> None:
        await self.driver.put_content(layout.manifest_revision_link(repo, digest), layout.link_content(digest))
        if parsed.subject is not None:
            referrer = _referrer(parsed.served_type, digest, size, parsed.artifact_type, parsed.annotations)
            await self.driver.put_content(layout.referrer_entry(repo, parsed.subject, digest), referrer)

    async def _resolve(self, repo: str, reference: str) -> str:
        """The manifest digest a tag or digest reference names in repo."""
        validate_name(repo)
        if is_digest(reference):
            self.blobs.check_digest(reference)
            return reference
        validate_tag(reference)
        try:
            link = await self.driver.get_content(layout.tag_current_link(repo, reference))
        except PathNotFound:
            raise await self._manifest_unknown(repo, reference) from None
        return layout.parse_link(link)[0]

    async def _manifest_unknown(self, repo: str, reference: str) -> Exception:
        if not await self.catalog.has(repo):
            return NameUnknown(f"repository name not known to registry: {repo}", {"name": repo})
        return ManifestUnknown(f"manifest unknown: {repo}:{reference}"
                               if not is_digest(reference)
                               else f"manifest unknown: {repo}@{reference}",
                               {"reference": reference})

    async def get(self, repo: str, reference: str) -> Manifest:
        """By tag or digest; ManifestUnknown (NameUnknown for an unknown
        repository). Manifest GET is hot: a tag costs one small read (the
        tag link) when this process has seen the revision, a digest one read
        (the revision link); the bytes come from a cache keyed by digest."""
        digest = await self._resolve(repo, reference)
        key = (repo, digest)
        media_type = self._media_types.get(key)
        if media_type is None or is_digest(reference):
            # a digest is looked up in the repository every time: the cache only vouches behind a tag
            try:
                link = await self.driver.get_content(layout.manifest_revision_link(repo, digest))
            except PathNotFound:
                self._media_types.pop(key, None)
                raise await self._manifest_unknown(repo, reference) from None
            media_type = layout.parse_link(link)[1] or media_type   # an old JSON link names it
        body = self._manifest_bytes.get(digest)
        if body is None:
            try:
                body = await self.driver.get_content(layout.blob_data(digest))
            except PathNotFound:
                raise await self._manifest_unknown(repo, reference) from None
            self._manifest_bytes.put(digest, body)
        if media_type is None:
            if len(body) > _HASH_ON_LOOP_LIMIT:
                media_type = await asyncio.to_thread(stored_media_type, body)
            else:
                media_type = stored_media_type(body)
        self._remember_media_type(key, media_type)
        return Manifest(digest, media_type, body)

    def _remember_media_type(self, key: tuple[str, str], media_type: str) -> None:
        self._media_types[key] = media_type
        self._media_types.move_to_end(key)
        while len(self._media_types) > _MAX_MEDIA_TYPES:
            self._media_types.popitem(last=False)

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
        self._media_types.pop((repo, digest), None)
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
        if self._indexed is not None:
            await self._indexed()       # referrers pushed to CNCF Distribution are indexed first
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

    async def reindex(self, repo: str) -> None:
        """For the one-time index build (storage.indexing): rewrite
        Dockyard's old JSON revision links as bare digests, and index the
        subject of every revision for referrers (CNCF Distribution keeps no
        such index). Revisions are read in batches, decoded off the loop."""
        revisions: list[str] = []
        for alg_dir in await _listed(self.driver, layout.manifest_revisions_dir(repo)):
            revisions += await _listed(self.driver, alg_dir)
        digests = [d for d in (_digest_of_dir(r) for r in revisions) if d is not None]
        for at in range(0, len(digests), _REFERRERS_BATCH):
            batch = digests[at:at + _REFERRERS_BATCH]
            links = await self.driver.get_many([layout.manifest_revision_link(repo, d) for d in batch])
            bodies = await self.driver.get_many([layout.blob_data(d) for d in batch])
            rewrites, referrers = await asyncio.to_thread(_reindex_plan, repo, batch, links, bodies)
            present = await self.driver.stat_files([path for path, _ in referrers])
            for path, data in rewrites + [r for r, there in zip(referrers, present) if there is None]:
                await self.driver.put_content(path, data)


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


def _referrer(media_type: str, digest: str, size: int, artifact_type: str | None,
              annotations: dict | None) -> bytes:
    """A referrers index entry: the descriptor the referrers API lists."""
    descriptor: dict = {"mediaType": media_type, "digest": digest, "size": size}
    if artifact_type:
        descriptor["artifactType"] = artifact_type
    if annotations:
        descriptor["annotations"] = annotations
    return json.dumps(descriptor).encode()


async def _listed(driver: StorageDriver, path: str) -> list[str]:
    try:
        return await driver.list(path)
    except PathNotFound:
        return []


def _digest_of_dir(path: str) -> str | None:
    """The digest a revision directory (.../<alg>/<hex>) stands for, None for a stray name."""
    alg_dir, _, hex_ = path.rpartition("/")
    digest = f"{alg_dir.rsplit('/', 1)[-1]}:{hex_}"
    return digest if is_digest(digest) else None


def _reindex_plan(repo: str, digests: list[str], links: list[bytes | None],
                  bodies: list[bytes | None]) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """(link rewrites, referrer entries) for a batch of revisions: pure, for a thread."""
    rewrites, referrers = [], []
    for digest, link, body in zip(digests, links, bodies):
        if link is None or body is None:
            continue                # deleted meanwhile, or a revision whose bytes are gone
        served = stored_media_type(body)
        try:
            _, recorded = layout.parse_link(link)
        except DigestInvalid:
            log.warning("storage index: %s@%s: unreadable revision link left as it is", repo, digest)
            continue
        if recorded is not None:
            if recorded.lower() == served.lower():
                rewrites.append((layout.manifest_revision_link(repo, digest), layout.link_content(digest)))
            else:   # the bytes would say otherwise: keep the type it was served with
                served = recorded
                log.warning("storage index: %s@%s was pushed as %s, its bytes say %s: its JSON "
                            "revision link is kept (CNCF Distribution cannot read it)",
                            repo, digest, recorded, served)
        try:
            doc = parse_manifest(body, served)
        except ManifestInvalid:
            continue                # schema 1, or not a manifest we can read: no subject
        if doc.subject is not None:
            referrers.append((layout.referrer_entry(repo, doc.subject.digest, digest),
                              _referrer(served, digest, len(body), doc.effective_artifact_type,
                                        doc.annotations or None)))
    return rewrites, referrers
