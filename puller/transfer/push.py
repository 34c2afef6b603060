"""`dockyard push`: send an image to a registry.

Sources (ImageSource, puller.transfer.sources):
    LayoutSource(store, name)        the local store, or any OCI layout (`oci:DIR[:TAG]`)
    docker_archive_layout(file, dir) a `docker save` tarball, converted to a layout first
    RegistrySource(client, ref)      another registry (used by copy)

    await push_image(source, client, dest_ref, tags=[...], progress=...) -> PushResult

For each manifest (children of an index first, the index last): every blob
is HEADed; a missing one is mounted from another repository of the same
registry when the source knows one (`?mount=&from=`, asking for the push
scope first and the source's pull scope second), else uploaded (one PUT for
small blobs, PATCH chunks with Content-Range for large ones). Children are
put by digest, the top manifest under each tag (or by digest).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from puller.client.http import FetchedManifest, RegistryClient
from puller.client.policy import TRANSIENT_ERRORS
from puller.client.reference import Reference
from puller.errors import CertificateError, ClientError, TransportError
from puller.oci import Descriptor, check_document_size
from puller.transfer.progress import Progress
from puller.transfer.sources import ImageSource
from puller.transfer.tasks import gather_all_or_cancel


@dataclass
class PushResult:
    reference: str
    digest: str
    media_type: str
    tags: list[str] = field(default_factory=list)
    blobs_uploaded: int = 0
    blobs_mounted: int = 0
    blobs_existing: int = 0
    bytes_uploaded: int = 0
    manifests: list[str] = field(default_factory=list)
    subject_headers: dict = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "subject_headers"}


class _Pusher:
    def __init__(self, source: ImageSource, client: RegistryClient, dest: Reference,
                 progress: Progress, result: PushResult):
        self.source = source
        self.client = client
        self.dest = dest
        self.progress = progress
        self.result = result
        self.semaphore = asyncio.Semaphore(max(1, client.options.concurrency))
        self._blobs: dict[str, asyncio.Task] = {}
        self.subject_headers: dict[str, str | None] = {}   # manifest digest -> OCI-Subject answered

    def blob(self, descriptor: Descriptor) -> asyncio.Task:
        digest = descriptor.digest
        if digest not in self._blobs:
            self._blobs[digest] = asyncio.ensure_future(self._push_blob(descriptor))
        return self._blobs[digest]

    async def _push_blob(self, descriptor: Descriptor) -> None:
        digest, size = descriptor.digest, descriptor.size
        async with self.semaphore:
            label = digest[7:19]
            self.progress.start(digest, label, size)
            if await self.client.blob_size(self.dest, digest, push=True) is not None:
                self.result.blobs_existing += 1
                self.progress.done(digest, skipped=True)
                return
            # a layout source reads its index and manifests to answer: off the loop
            candidates = await asyncio.to_thread(self.source.mount_candidates, digest, self.dest)
            for repository in candidates[:1]:
                location = await self.client.start_upload(self.dest, mount=digest, mount_from=repository)
                if location is None:
                    self.result.blobs_mounted += 1
                    self.progress.done(digest, skipped=True)
                    return
                break
            else:
                location = await self.client.start_upload(self.dest)
            for attempt in range(3):
                sent = 0

                def advance(n: int) -> None:
                    nonlocal sent
                    sent += n
                    self.result.bytes_uploaded += n
                    self.progress.advance(digest, n)
                try:
                    await self.client.upload_blob(self.dest, location, digest, size,
                                                  lambda start, length: self.source.chunks(descriptor, start, length),
                                                  on_progress=advance)
                    break
                except CertificateError:
                    raise
                except TRANSIENT_ERRORS + (TransportError,):
                    # an upload session cannot be trusted after a broken body: start a new one
                    self.result.bytes_uploaded -= sent
                    self.progress.reset(digest, 0)
                    if attempt == 2:
                        raise
                    await asyncio.sleep(0.2 * 2 ** attempt)
                    location = await self.client.start_upload(self.dest)
            self.result.blobs_uploaded += 1
            self.progress.done(digest)

    async def manifest_tree(self, manifest: FetchedManifest, tags: list[str] | None = None) -> None:
        """Push the blobs and children of `manifest`, then the manifest itself."""
        if manifest.is_index:
            children = list({c.digest: c for c in manifest.parsed.manifests}.values())
            for child in children:
                check_document_size(child, self.client.options.max_manifest_size,
                                    f"manifest {child.digest} listed in {manifest.digest}")
            # the registry client bounds manifest requests per registry however many children there are
            fetched = await gather_all_or_cancel(self.source.manifest(c) for c in children)
            missing = [c.digest for c, m in zip(children, fetched) if m is None]
            if missing:
                raise ClientError(f"{self.source.name}: index {manifest.digest} lacks {len(missing)} of its "
                                  f"manifests locally (pull with --all-platforms first)")
            await gather_all_or_cancel(self.manifest_tree(child) for child in fetched)
        else:
            await gather_all_or_cancel(self.blob(b) for b in manifest.parsed.blobs if not b.non_distributable)
        for identifier in (tags or [manifest.digest]):
            answer = await self.client.put_manifest(self.dest, identifier, manifest.data, manifest.media_type)
            self.subject_headers[manifest.digest] = answer.get("subject")
        self.result.manifests.append(manifest.digest)


async def push_image(source: ImageSource, client: RegistryClient, dest: Reference, *,
                     tags: list[str] | None = None, progress: Progress | None = None,
                     root: FetchedManifest | None = None) -> PushResult:
    progress = progress or Progress()
    root = root or await source.root()
    if tags is None:
        tags = [dest.tag] if dest.tag and not dest.digest else []
    if dest.digest and dest.digest != root.digest:
        raise ClientError(f"{dest}: the image to push has digest {root.digest}")
    result = PushResult(reference=str(dest), digest=root.digest, media_type=root.media_type, tags=list(tags))
    pusher = _Pusher(source, client, dest, progress, result)
    await pusher.manifest_tree(root, tags or None)
    result.subject_headers = pusher.subject_headers
    return result
