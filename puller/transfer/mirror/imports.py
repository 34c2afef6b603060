"""`dockyard mirror import BUNDLE --to REGISTRY[/PREFIX]`.

In this order, so that a refusal pushes nothing and an interruption never
leaves a tag naming something absent:

1. the bundle manifest is read and, with `verify_key`, its signature
   checked; every manifest and blob it lists must be a member of the size
   it says, and every manifest must hash to its digest and parse
   (puller.oci);
2. every prerequisite (what a delta builds on and does not carry) is HEADed
   in the target: if any is missing the import stops, naming them;
3. repository by repository (a few of its images at a time), each
   image's tree is pushed by digest (puller.transfer.push.push_image:
   blobs the target has are skipped, blobs another repository of the
   target holds are mounted, the rest stream from the bundle and are hashed
   on the way, the last piece held back until the digest matches;
   manifests children-first); an image whose top manifest the target
   already has is not pushed again, so a second run sends nothing that
   landed;
4. referrers, after what they refer to (and the referrers tag where the
   target does not index subjects itself);
5. tags, last of all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from puller.client.http import ClientOptions, FetchedManifest, RegistryClient
from puller.client.reference import Reference
from puller.errors import DigestMismatchError
from puller.oci import Descriptor, parse_descriptor
from puller.transfer.mirror.bundle import BundleImage, BundleManifest, BundleReader, Member, blob_member, manifest_of
from puller.transfer.mirror.errors import BundleError, PrerequisiteError
from puller.transfer.mirror.listing import manifest_digest
from puller.transfer.mirror.target import Target
from puller.transfer.progress import Progress
from puller.transfer.push import push_image
from puller.transfer.sources import ImageSource
from puller.transfer.tasks import gather_all_or_cancel
from storage.oci import digests

MiB = 1024 * 1024
CHECKS_IN_FLIGHT = 8
IMAGES_IN_FLIGHT = 4             # images of one repository pushed at once


@dataclass
class ImportResult:
    target: str
    signature: str                       # verified | unchecked | absent
    images: list[dict] = field(default_factory=list)     # reference, digest, state (pushed|present|tagged)
    referrers: int = 0
    manifests_pushed: int = 0
    blobs_uploaded: int = 0
    blobs_mounted: int = 0
    blobs_existing: int = 0
    bytes_uploaded: int = 0
    bytes_skipped: int = 0
    tags: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dict(self.__dict__, seconds=round(self.seconds, 3))


def _read_and_hash(reader: BundleReader, member: Member, start: int, length: int, hasher) -> bytes:
    data = reader.pread(member, start, length)
    if hasher is not None:
        hasher.update(data)
    return data


class BundleSource(ImageSource):
    """Images of a bundle, for push_image: manifests verified up front, blob
    bytes read at their offsets and hashed as they stream."""

    def __init__(self, reader: BundleReader, documents: dict[str, FetchedManifest], mounts: dict[str, list[str]]):
        self.reader = reader
        self.documents = documents
        self.mounts = mounts                     # digest -> repositories of the target holding it
        self.name = str(reader.path)
        self._hashing: dict[str, list] = {}      # digest -> [next offset, hasher]

    async def manifest(self, descriptor: Descriptor) -> FetchedManifest | None:
        return self.documents.get(descriptor.digest)

    async def chunks(self, descriptor: Descriptor, start: int, length: int) -> AsyncIterator[bytes]:
        digest = descriptor.digest
        member = self.reader.members.get(blob_member(digest))
        if member is None:
            raise BundleError(f"blob {digest} is neither in the bundle nor in the target")
        if member.size != descriptor.size:
            raise BundleError(f"{self.name}: blob {digest} is {member.size} bytes, its descriptor says "
                              f"{descriptor.size}")
        state = [0, digests.hasher_for(digest)] if start == 0 else self._hashing.get(digest)
        if state is not None and state[0] != start:
            state = None                         # read out of order: the registry checks the digest alone
        self._hashing[digest] = state
        position, end = start, start + length
        while position < end:
            n = min(MiB, end - position)
            data = await asyncio.to_thread(_read_and_hash, self.reader, member, position, n,
                                           state[1] if state else None)
            position += n
            if state is not None:
                state[0] = position
                if position == member.size and state[1].hexdigest() != digest.split(":", 1)[1]:
                    # the last piece is never sent: the registry cannot commit a blob under a wrong name
                    raise DigestMismatchError(f"{self.name}: blob {digest} does not match its digest "
                                              f"(the bundle is damaged); its upload was abandoned")
            yield data

    def mount_candidates(self, digest: str, dest: Reference) -> list[str]:
        return [r for r in self.mounts.get(digest, []) if r != dest.repository]


def _verified_documents(reader: BundleReader, bundle: BundleManifest) -> dict[str, FetchedManifest]:
    """Every listed member present at its size; every manifest hashing to its digest."""
    for digest, size in list(bundle.blobs.items()) + [(d, s) for d, (s, _) in bundle.manifests.items()]:
        member = reader.members.get(blob_member(digest))
        if member is None:
            raise BundleError(f"{reader.path}: {digest} is listed but not in the bundle")
        if member.size != size:
            raise BundleError(f"{reader.path}: {digest} is {member.size} bytes, the bundle manifest says {size}")
    documents = {}
    for digest, (size, media_type) in bundle.manifests.items():
        data = reader.read(blob_member(digest), max(size, 1))
        if not digests.matches(data, digest):
            raise BundleError(f"{reader.path}: manifest {digest} does not match its digest (the bundle is damaged)")
        documents[digest] = FetchedManifest.from_bytes(data, digest, media_type, f"{reader.path}: manifest {digest}")
    return documents


def _tree_blobs(documents: dict[str, FetchedManifest], digest: str, depth: int = 0) -> set[str]:
    manifest = documents.get(digest)
    if manifest is None or depth > 8:
        return set()
    if manifest.is_index:
        out = set()
        for child in manifest.parsed.manifests:
            out |= _tree_blobs(documents, child.digest, depth + 1)
        return out
    return {b.digest for b in manifest.parsed.blobs}


async def _bounded(jobs, limit: int = CHECKS_IN_FLIGHT) -> list:
    slots = asyncio.Semaphore(limit)

    async def one(job):
        async with slots:
            return await job
    return await gather_all_or_cancel(one(j) for j in jobs)


async def _missing_prerequisites(client: RegistryClient, target: Target, bundle: BundleManifest) -> list[str]:
    async def blob_missing(digest: str, repository: str) -> str | None:
        ref = target.ref(repository)
        return None if await client.blob_size(ref, digest) is not None else f"blob {digest} ({ref.name})"

    async def manifest_missing(image: BundleImage) -> str | None:
        ref = target.ref(image.repository)
        return None if await manifest_digest(client, ref, image.digest) else f"manifest {image.digest} ({ref.name})"
    jobs = [blob_missing(d, r) for d, (_, r) in bundle.prerequisites.items()]
    jobs += [manifest_missing(i) for i in bundle.images if i.present]
    return [m for m in await _bounded(jobs) if m]


async def import_bundle(path: str | list[str], to: str, *, options: ClientOptions | None = None,
                        client: RegistryClient | None = None, verify_key: str | None = None,
                        progress: Progress | None = None) -> ImportResult:
    started = time.perf_counter()
    progress = progress or Progress()
    target = Target.parse(to)
    public = None
    if verify_key:      # `cryptography` costs a start-up some 20 ms: only a checked import loads it
        from puller.transfer.mirror import signing
        public = await asyncio.to_thread(signing.load_public_key, verify_key)
    reader = await asyncio.to_thread(BundleReader.open, path)
    own = client is None
    client = client or RegistryClient(options)
    try:
        bundle, data, signature = await asyncio.to_thread(manifest_of, reader)
        if public is not None:
            signing.verify(data, signature, public)
        documents = await asyncio.to_thread(_verified_documents, reader, bundle)
        result = ImportResult(target=str(target), signature="verified" if public else
                              ("unchecked" if signature is not None else "absent"))
        missing = await _missing_prerequisites(client, target, bundle)
        if missing:
            raise PrerequisiteError(str(target), missing)
        mounts: dict[str, list[str]] = {}
        for digest, (_, repository) in bundle.prerequisites.items():
            mounts.setdefault(digest, []).append(target.ref(repository).repository)
        source = BundleSource(reader, documents, mounts)
        # repository by repository, so a blob one of them received is mounted into the next;
        # within one, its images a few at a time (their blobs share the client's --concurrency)
        by_repository: dict[str, list[BundleImage]] = {}
        for image in bundle.images:
            if not image.subject:
                by_repository.setdefault(image.repository, []).append(image)
        for images in by_repository.values():
            await _bounded((_push_one(client, target, source, i, documents, result, progress) for i in images),
                           IMAGES_IN_FLIGHT)
        # referrers one at a time, after their subjects: the tag schema is read-modify-write
        for image in [i for i in bundle.images if i.subject]:
            await _push_one(client, target, source, image, documents, result, progress)
        for image in bundle.images:
            if image.tag:
                await _tag(client, target, image, documents[image.digest], result)
        result.bytes_skipped = max(0, sum(bundle.blobs.values()) - result.bytes_uploaded)
        result.seconds = time.perf_counter() - started
        return result
    finally:
        await asyncio.to_thread(reader.close)
        if own:
            await client.close()


async def _push_one(client: RegistryClient, target: Target, source: BundleSource, image: BundleImage,
                    documents: dict[str, FetchedManifest], result: ImportResult, progress: Progress) -> None:
    dest = target.ref(image.repository)
    name = f"{dest.name}@{image.digest}"
    if image.subject:
        result.referrers += 1
    if image.present or await manifest_digest(client, dest, image.digest):
        result.images.append({"reference": name, "digest": image.digest, "state": "present"})
    else:
        root = documents[image.digest]
        pushed = await push_image(source, client, dest, tags=[], progress=progress, root=root)
        result.manifests_pushed += len(pushed.manifests)
        result.blobs_uploaded += pushed.blobs_uploaded
        result.blobs_mounted += pushed.blobs_mounted
        result.blobs_existing += pushed.blobs_existing
        result.bytes_uploaded += pushed.bytes_uploaded
        result.images.append({"reference": name, "digest": image.digest, "state": "pushed"})
        subject = root.parsed.subject
        if image.subject and subject and not pushed.subject_headers.get(root.digest):
            # the target does not index subjects: keep its referrers tag (the tag schema) up to date
            from puller.transfer.copy import add_to_referrers_tag      # (pull, layouts: not for every import)
            descriptor = parse_descriptor(root.descriptor(), "referrer")
            await add_to_referrers_tag(client, dest, subject.digest, descriptor, root)
    for digest in _tree_blobs(documents, image.digest):
        repos = source.mounts.setdefault(digest, [])
        if dest.repository not in repos:
            repos.append(dest.repository)


async def _tag(client: RegistryClient, target: Target, image: BundleImage, root: FetchedManifest,
               result: ImportResult) -> None:
    dest = target.ref(image.repository, image.tag)
    if await manifest_digest(client, dest, image.tag) != image.digest:
        await client.put_manifest(dest, image.tag, root.data, root.media_type)
    result.tags.append(str(dest))


__all__ = ["BundleSource", "ImportResult", "import_bundle"]
