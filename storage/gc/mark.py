"""The mark: what every repository still wants, and what nothing wants.

Per repository, the roots are its tags (and, with `untagged` off, every
revision), every referrer of a kept manifest (`referrers: keep` also keeps
referrers whose subject is gone), and every revision linked at or after the
cutoff (a push in progress links an index's children by digest before the
index that names them). From the roots the walk of the OCI vocabulary
(`storage.oci.content`) follows index children, nested indexes included,
and collects each manifest's config and layers. A manifest the vocabulary
cannot read (Docker schema 1, a foreign tool's document) keeps every digest
its bytes mention: a blob is never collected on a guess.

What the mark leaves unwanted becomes a candidate, with the time its link
or data was last written, if that is before the cutoff:

    T  a tag naming a manifest the repository does not hold
    R  a revision nothing kept reaches (with `untagged` on), or one whose bytes are gone
    L  a layer link no kept manifest of the repository names, or one whose bytes are gone
    B  a blob in the global store that nothing marked

A layer link written at or after the cutoff keeps its blob (a mount or an
upload moments ago). Memory is bounded by the largest repository: the
global sets and the manifest cache live in the pass's MarkSet on disk.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from storage import layout
from storage.driver import PathNotFound, StorageDriver
from storage.gc.markset import MarkSet, chunks
from storage.oci.content import parse_manifest
from storage.oci.errors import DigestInvalid, ManifestInvalid
from storage.store import ContentStore

BATCH = 128                     # storage paths read or stated in one round trip
_DIGEST_TEXT = re.compile(rb"sha(?:256:[0-9a-f]{64}|512:[0-9a-f]{128})")
REFERRER_MODES = ("keep", "follow-subject")


@dataclass(frozen=True)
class MarkPolicy:
    untagged: bool = False          # collect revisions no tag reaches
    referrers: str = "keep"         # keep | follow-subject


@dataclass
class RepoContent:
    """One repository as listed: tags and where they point, revisions,
    layer links, and the referrers index (subject -> referrer digests)."""
    tags: dict[str, str | None]
    revisions: list[str]
    layers: list[str]
    referrers: dict[str, list[str]]
    revision_times: dict[str, float]    # when each revision's link was written


def manifest_children(body: bytes) -> dict:
    """{"b": blobs, "m": child manifests, "s": subject or None} of a
    manifest's bytes; for bytes the vocabulary cannot read, every digest
    they mention as a blob. Pure: for a thread."""
    try:
        doc = parse_manifest(body)
    except (ManifestInvalid, DigestInvalid, ValueError):
        found = sorted({m.decode() for m in _DIGEST_TEXT.findall(body)})
        return {"b": found, "m": [], "s": None}
    blobs, manifests = [], []
    for child in doc.children():
        if child.role == "manifest":
            manifests.append(child.descriptor.digest)
        elif child.role in ("config", "layer"):
            blobs.append(child.descriptor.digest)
    return {"b": blobs, "m": manifests, "s": doc.subject.digest if doc.subject else None}


def _parse_all(bodies: list[tuple[str, bytes]]) -> list[tuple[str, dict]]:
    return [(digest, manifest_children(body)) for digest, body in bodies]


class Marker:
    def __init__(self, store: ContentStore, markset: MarkSet, policy: MarkPolicy, cutoff: float):
        self.store = store
        self.driver: StorageDriver = store.driver
        self.markset = markset
        self.policy = policy
        self.cutoff = cutoff
        self.manifests_read = 0

    # ---- listing -------------------------------------------------------------------
    async def _listed(self, path: str) -> list[str]:
        try:
            return await self.driver.list(path)
        except PathNotFound:
            return []

    async def _listed_many(self, paths: list[str]) -> list[list[str]]:
        out: list[list[str]] = []
        for batch in chunks(paths, 16):
            out += await asyncio.gather(*(self._listed(p) for p in batch))
        return out

    async def list_present(self) -> int:
        """Record every blob in the global store in the mark set; how many."""
        count = 0
        for alg_dir in await self._listed(layout.BLOBS):
            prefixes = await self._listed(alg_dir)
            for batch in chunks(prefixes, 16):
                for listing in await asyncio.gather(*(self._listed(p) for p in batch)):
                    digests = [d for d in (layout.digest_of_blob_dir(p) for p in listing) if d]
                    await self.markset.add_present(digests)
                    count += len(digests)
        return count

    async def repositories(self):
        """Every catalogued repository, page by page."""
        last = None
        while True:
            page = await self.store.catalog.repositories(1000, last)
            for repo in page.items:
                yield repo
            if not page.has_more or not page.items:
                return
            last = page.items[-1]

    async def read_repo(self, repo: str) -> RepoContent:
        tag_names = [p.rsplit("/", 1)[-1] for p in await self._listed(layout.tags_dir(repo))]
        tags: dict[str, str | None] = {}
        for batch in chunks(tag_names, BATCH):
            links = await self.driver.get_many([layout.tag_current_link(repo, t) for t in batch])
            for tag, link in zip(batch, links):
                tags[tag] = _link_digest(link)
        # A revision is its link: CNCF Distribution deletes the link and leaves the directory.
        listed = await self._digest_dirs(layout.manifest_revisions_dir(repo))
        times = await self._mtimes([layout.manifest_revision_link(repo, d) for d in listed])
        revision_times = {d: t for d, t in zip(listed, times) if t is not None}
        revisions = [d for d in listed if d in revision_times]
        layers = await self._digest_dirs(layout.layer_digest_dirs(repo))
        referrers: dict[str, list[str]] = {}
        subject_dirs = [d for listing in await self._listed_many(await self._listed(layout.referrers_root(repo)))
                        for d in listing]
        for subject_dir, entries in zip(subject_dirs, await self._listed_many(subject_dirs)):
            subject = layout.digest_of_dir(subject_dir)
            if subject is not None:
                referrers[subject] = [r for r in (layout.referrer_digest_of_entry(e) for e in entries) if r]
        return RepoContent(tags, revisions, layers, referrers, revision_times)

    async def _digest_dirs(self, base: str) -> list[str]:
        out: list[str] = []
        for listing in await self._listed_many(await self._listed(base)):
            out += [d for d in (layout.digest_of_dir(p) for p in listing) if d]
        return out

    # ---- the walk -------------------------------------------------------------------
    async def children_of(self, digests: list[str]) -> dict[str, dict]:
        """Children of each manifest (cached in the mark set); a manifest
        whose bytes are gone has none."""
        known = await self.markset.get_children(digests)
        missing = [d for d in digests if d not in known]
        for batch in chunks(missing, BATCH):
            bodies = await self.driver.get_many([layout.blob_data(d) for d in batch])
            read = [(d, b) for d, b in zip(batch, bodies) if b is not None]
            self.manifests_read += len(read)
            parsed = await asyncio.to_thread(_parse_all, read)
            await self.markset.put_children(parsed)
            known.update(parsed)
        return known

    async def walk(self, roots, kept_revs: set[str], kept_blobs: set[str]) -> None:
        """Add roots and everything they reach to the kept sets."""
        frontier = list(dict.fromkeys(d for d in roots if d and d not in kept_revs))
        while frontier:
            kept_revs.update(frontier)
            children = await self.children_of(frontier)
            following: list[str] = []
            for digest in frontier:
                found = children.get(digest, {})
                kept_blobs.update(found.get("b", ()))
                following += [m for m in found.get("m", ()) if m not in kept_revs]
            frontier = list(dict.fromkeys(following))

    async def _mtimes(self, paths: list[str]) -> list[float | None]:
        out: list[float | None] = []
        for batch in chunks(paths, BATCH):
            out += [None if i is None else i.mtime for i in await self.driver.stat_files(batch)]
        return out

    # ---- one repository -----------------------------------------------------------------
    async def mark_repo(self, repo: str) -> None:
        """Mark what repo keeps; record its candidates in the mark set."""
        content = await self.read_repo(repo)
        revset = set(content.revisions)
        kept_revs: set[str] = set()
        kept_blobs: set[str] = set()
        roots = {d for d in content.tags.values() if d}
        if not self.policy.untagged:
            roots |= revset
        if self.policy.referrers == "keep":
            roots |= {r for rs in content.referrers.values() for r in rs if r in revset}
        await self.walk(roots, kept_revs, kept_blobs)

        # Fresh revisions and referrers of kept manifests, until nothing new is kept.
        times = content.revision_times
        fresh = {d for d, t in times.items() if d not in kept_revs and t >= self.cutoff}
        await self.walk(fresh, kept_revs, kept_blobs)
        while True:
            following = {r for s in list(kept_revs) for r in content.referrers.get(s, ())
                         if r in revset and r not in kept_revs}
            if not following:
                break
            await self.walk(following, kept_revs, kept_blobs)

        found: list[tuple[str, str, str, float, int]] = []
        present = await self.markset.is_present(sorted(revset | kept_blobs | set(content.layers)
                                                       | {d for d in content.tags.values() if d}))
        # R: unwanted revisions, and wanted ones whose bytes are gone
        for digest in content.revisions:
            if digest in kept_revs and digest in present:
                continue
            when = times[digest]
            if when < self.cutoff:
                found.append(("R", repo, digest, when, 0))
        # T: tags naming a manifest the repository does not hold
        dangling = [t for t, d in content.tags.items() if d is not None and (d not in revset or d not in present)]
        for tag, when in zip(dangling, await self._mtimes([layout.tag_current_link(repo, t) for t in dangling])):
            if when is not None and when < self.cutoff:
                found.append(("T", repo, tag, when, 0))
        # L: links no kept manifest names, or naming bytes that are gone
        suspects = [d for d in content.layers if d not in kept_blobs or d not in present]
        fresh_links = []
        for digest, when in zip(suspects, await self._mtimes([layout.layer_link(repo, d) for d in suspects])):
            if when is None:
                continue
            if when < self.cutoff:
                found.append(("L", repo, digest, when, 0))
            else:
                fresh_links.append(digest)
        await self.markset.add_found(found)
        recorded = {(k, n) for k, _, n, _, _ in found}
        await self.markset.mark([d for d in kept_revs if ("R", d) not in recorded])
        await self.markset.mark(kept_blobs)
        await self.markset.mark(fresh_links)

    async def find_unmarked_blobs(self) -> int:
        """B candidates: blobs present, unmarked, last written before the cutoff; how many."""
        count = 0
        async for rows in self.markset.unmarked_present().batches():
            digests = [r[2] for r in rows]
            found = []
            for batch in chunks(digests, BATCH):
                infos = await self.driver.stat_files([layout.blob_data(d) for d in batch])
                for digest, info in zip(batch, infos):
                    if info is not None and info.mtime < self.cutoff:
                        found.append(("B", "", digest, info.mtime, info.size))
            await self.markset.add_found(found)
            count += len(found)
        return count

    async def mark_all(self) -> int:
        """The whole mark: blobs present, every repository, unmarked blobs; repositories seen."""
        await self.list_present()
        repos = 0
        async for repo in self.repositories():
            await self.mark_repo(repo)
            repos += 1
        await self.find_unmarked_blobs()
        return repos

    # ---- the re-mark after links are deleted (storage.gc.sweep) ------------------------
    async def mark_linked(self, repo: str) -> tuple[set[str], set[str]]:
        """Mark the bytes of everything repo links now, and everything its
        tags and revisions reach; (revisions reached, blobs reached)."""
        content = await self.read_repo(repo)
        kept_revs: set[str] = set()
        kept_blobs: set[str] = set()
        await self.walk(set(content.revisions) | {d for d in content.tags.values() if d}
                        | {r for rs in content.referrers.values() for r in rs}, kept_revs, kept_blobs)
        await self.markset.mark(kept_revs)
        await self.markset.mark(kept_blobs)
        await self.markset.mark(content.layers)
        return kept_revs, kept_blobs


def _link_digest(link: bytes | None) -> str | None:
    if link is None:
        return None
    try:
        return layout.parse_link(link)[0]
    except DigestInvalid:
        return None
