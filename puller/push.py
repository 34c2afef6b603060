"""`dockyard push`: send an image to a registry.

Sources (ImageSource):
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
import gzip
import hashlib
import json
import os
import pathlib
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from puller.http import TRANSIENT_ERRORS, ClientError, FetchedManifest, RegistryClient, TransportError, digest_of
from puller.oci import MAX_DOCUMENT_SIZE, ContentError, Descriptor, check_document_size, parse_descriptor
from puller.progress import Progress
from puller.pull import gather_all_or_cancel
from puller.reference import Reference, parse_reference, ReferenceError
from puller.store import LocalStore, StoreError

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MiB = 1024 * 1024


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


class ImageSource:
    """Where an image comes from: manifests by digest, blob bytes by range."""

    name = "source"

    async def root(self) -> FetchedManifest:
        raise NotImplementedError

    async def manifest(self, descriptor: Descriptor) -> FetchedManifest | None:
        """The manifest of `descriptor`, or None when the source lacks it."""
        raise NotImplementedError

    def chunks(self, descriptor: Descriptor, start: int, length: int) -> AsyncIterator[bytes]:
        raise NotImplementedError

    def mount_candidates(self, digest: str, dest: Reference) -> list[str]:
        """Repositories of dest's registry that are known to hold `digest`."""
        return []


class LayoutSource(ImageSource):
    """An image in an OCI layout (the local store is one)."""

    def __init__(self, store: LocalStore, name: str):
        self.store = store
        self.name = name

    def _root_descriptor(self) -> Descriptor:
        desc = self.store.source_descriptor(self.name) if self.name else None
        if desc is None and not self.name:
            entries = self.store.references()
            if len(entries) == 1:
                desc = self.store.source_descriptor(entries[0][0]) or entries[0][1]
            elif entries:
                raise StoreError(f"{self.store.root} holds several images: name one (oci:DIR:TAG)")
        if desc is None:
            raise StoreError(f"{self.name or 'image'} is not in {self.store.root}")
        return parse_descriptor(desc, f"{self.store.root}/index.json: {self.name or 'image'}")

    async def root(self) -> FetchedManifest:
        desc = await asyncio.to_thread(self._root_descriptor)
        root = await self.manifest(desc)
        if root is None:
            raise StoreError(f"{self.store.root}: manifest {desc.digest} of {self.name or 'image'} is missing")
        return root

    async def manifest(self, descriptor: Descriptor) -> FetchedManifest | None:
        digest = descriptor.digest
        if not await asyncio.to_thread(self.store.has_blob, digest):
            return None
        where = f"{self.store.root}: manifest {digest}"
        data = await asyncio.to_thread(self.store.read_blob, digest, self.store.document_limit)
        if digest_of(data, digest.split(":")[0]) != digest:
            raise StoreError(f"store blob {digest} is corrupt")
        return FetchedManifest.from_bytes(data, digest, descriptor.media_type or None, where)

    async def chunks(self, descriptor: Descriptor, start: int, length: int) -> AsyncIterator[bytes]:
        path = self.store.blob_path(descriptor.digest)
        handle = await asyncio.to_thread(open, path, "rb")
        try:
            await asyncio.to_thread(handle.seek, start)
            remaining = length
            while remaining > 0:
                data = await asyncio.to_thread(handle.read, min(MiB, remaining))
                if not data:
                    raise StoreError(f"store blob {descriptor.digest} is shorter than its descriptor")
                remaining -= len(data)
                yield data
        finally:
            await asyncio.to_thread(handle.close)

    def mount_candidates(self, digest: str, dest: Reference) -> list[str]:
        out = []
        for name, desc in self.store.references():
            try:
                ref = parse_reference(name)
            except ReferenceError:
                continue
            if ref.registry != dest.registry or ref.repository == dest.repository:
                continue
            try:
                manifest = self.store.read_manifest(parse_descriptor(desc, "index.json entry"))
            except (StoreError, ContentError):
                continue
            if manifest.is_index:
                continue
            if any(b.digest == digest for b in manifest.blobs) and ref.repository not in out:
                out.append(ref.repository)
        return out


class RegistrySource(ImageSource):
    """An image in a registry (copy streams blobs from it)."""

    def __init__(self, client: RegistryClient, ref: Reference):
        self.client = client
        self.ref = ref
        self.name = str(ref)

    async def root(self) -> FetchedManifest:
        return await self.client.get_manifest(self.ref, self.ref.identifier)

    async def manifest(self, descriptor: Descriptor) -> FetchedManifest | None:
        manifest = await self.client.get_manifest(self.ref, descriptor.digest)
        if len(manifest.data) != descriptor.size:
            raise ContentError(f"manifest {self.ref.name}@{descriptor.digest}: {len(manifest.data)} bytes, "
                               f"but its index entry says {descriptor.size}")
        return manifest

    async def chunks(self, descriptor: Descriptor, start: int, length: int) -> AsyncIterator[bytes]:
        digest = descriptor.digest
        headers_offset = start
        received = 0
        async with self.client.blob(self.ref, digest, headers_offset) as response:
            skip = start if (start and response.status == 200) else 0
            async for data in response.iter_body():
                if skip:
                    cut = min(skip, len(data))
                    data, skip = data[cut:], skip - cut
                    if not data:
                        continue
                if received + len(data) >= length:
                    yield data[:length - received]
                    return
                received += len(data)
                yield data
        if received < length:
            raise ClientError(f"blob {digest}: source ended after {received} of {length} bytes")

    def mount_candidates(self, digest: str, dest: Reference) -> list[str]:
        if self.ref.registry == dest.registry and self.ref.repository != dest.repository:
            return [self.ref.repository]
        return []


# -- docker save archives ------------------------------------------------------------

def _archive_member(tar: tarfile.TarFile, name: str, archive) -> "tarfile.ExFileObject":
    try:
        member = tar.extractfile(name)
    except KeyError:
        member = None
    if member is None:
        raise StoreError(f"{archive}: {name} is missing from the archive")
    return member


def _archive_entry(entries, image: str | None, archive) -> tuple[str, list[str]]:
    """(config member, layer members) of the chosen image of manifest.json."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise StoreError(f"{archive}: manifest.json is not a list of images")
    if not entries:
        raise StoreError(f"{archive}: archive holds no image")
    entry = entries[0]
    if image:
        for candidate in entries:
            tags = candidate.get("RepoTags")
            if isinstance(tags, list) and image in tags:
                entry = candidate
                break
        else:
            raise StoreError(f"{archive}: no image tagged {image}")
    config, layers = entry.get("Config"), entry.get("Layers")
    if not isinstance(config, str) or not isinstance(layers, list) or not all(isinstance(l, str) for l in layers):
        raise StoreError(f"{archive}: manifest.json names no Config file and Layers list")
    return config, layers


def docker_archive_layout(archive: str | os.PathLike, workdir: str | os.PathLike,
                          image: str | None = None) -> LocalStore:
    """Convert a `docker save` tarball into an OCI layout under `workdir`
    (Docker v2 schema 2 manifest, gzip layers; diff_ids stay those of the
    config). Returns the layout; its single entry is named "image"."""
    store = LocalStore(workdir)
    store.ensure()
    with tarfile.open(archive) as tar:
        try:
            entries = json.loads(_archive_member(tar, "manifest.json", archive).read(MAX_DOCUMENT_SIZE + 1))
        except (StoreError, ValueError, RecursionError):
            raise StoreError(f"{archive}: not a docker save archive (no readable manifest.json)") from None
        config_name, layer_names = _archive_entry(entries, image, archive)
        config_bytes = _archive_member(tar, config_name, archive).read(MAX_DOCUMENT_SIZE + 1)
        if len(config_bytes) > MAX_DOCUMENT_SIZE:
            raise StoreError(f"{archive}: {config_name} exceeds the {MAX_DOCUMENT_SIZE} byte limit of a config")
        layers = []
        for member_name in layer_names:
            source = _archive_member(tar, member_name, archive)
            staged = store.root / "ingest" / "archive-layer.partial"
            hasher = hashlib.sha256()
            size = 0
            with open(staged, "wb") as out:
                head = source.read(2)
                compressed = head == b"\x1f\x8b"
                if compressed:
                    writer = out
                else:
                    writer = gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0)
                data = head
                while data:
                    writer.write(data)
                    data = source.read(MiB)
                if writer is not out:
                    writer.close()
            with open(staged, "rb") as handle:
                while block := handle.read(MiB):
                    hasher.update(block)
                    size += len(block)
            digest = "sha256:" + hasher.hexdigest()
            store.commit_blob(staged, digest)
            layers.append({"mediaType": DOCKER_LAYER_GZIP, "digest": digest, "size": size})
    config_digest = store.write_blob(config_bytes)
    manifest = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                "config": {"mediaType": DOCKER_CONFIG, "digest": config_digest, "size": len(config_bytes)},
                "layers": layers}
    data = json.dumps(manifest, indent=3).encode()
    digest = store.write_blob(data)
    store.record("image", {"mediaType": DOCKER_MANIFEST, "digest": digest, "size": len(data)})
    return store


# -- the push itself -----------------------------------------------------------------

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


def parse_source(text: str) -> tuple[str, str, str | None]:
    """Split a push/copy source: ("store", ref, None), ("oci", dir, tag),
    ("docker-archive", file, image), ("docker", ref, None)."""
    if text.startswith("oci:"):
        rest = text[4:]
        directory, sep, tag = rest.partition(":")
        return "oci", directory, (tag or None)
    if text.startswith("docker-archive:"):
        rest = text[len("docker-archive:"):]
        path, sep, image = rest.partition(":")
        return "docker-archive", path, (image or None)
    if text.startswith("docker://"):
        return "docker", text[len("docker://"):], None
    return "store", text, None


def open_layout_source(kind: str, location: str, name: str | None, workdir: pathlib.Path) -> LayoutSource:
    if kind == "oci":
        if not (pathlib.Path(location) / "index.json").is_file():
            raise StoreError(f"{location} is not an OCI image layout (no index.json)")
        return LayoutSource(LocalStore(location), name or "")
    if kind == "docker-archive":
        if not pathlib.Path(location).is_file():
            raise StoreError(f"{location}: no such file")
        layout = docker_archive_layout(location, workdir, name)
        return LayoutSource(layout, "image")
    raise StoreError(f"unsupported source {kind}")

