"""Where a push or a copy reads an image from (ImageSource):

    LayoutSource(store, name)        the local store, or any OCI layout (`oci:DIR[:TAG]`)
    RegistrySource(client, ref)      another registry (used by copy)
    open_layout_source(kind, ...)    an `oci:` layout or a `docker save` archive (puller.transfer.archive)
    parse_source(text)               what a push/copy source names

A source hands out manifests by descriptor (checked by puller.oci) and blob
bytes by range; it may name repositories of the destination registry that
already hold a blob, so the push mounts it instead of uploading it.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator

from puller.client.http import FetchedManifest, RegistryClient
from puller.client.reference import Reference, parse_reference
from puller.errors import ClientError, ContentError, ReferenceError, StoreError, one_line
from puller.oci import Descriptor, parse_descriptor
from puller.store import LocalStore, parse_layout_reference
from storage.oci import digests

MiB = 1024 * 1024


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

    def __init__(self, store: LocalStore, name: str | None):
        self.store = store
        self.tag = name or None          # None: the layout's default image
        self.name = name or ""

    def _root_descriptor(self) -> Descriptor:
        desc = self.store.source_descriptor(self.tag)
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
        if not digests.matches(data, digest):
            raise StoreError(f"store blob {digest} is corrupt")
        return FetchedManifest.from_bytes(data, digest, descriptor.media_type or None, where)

    async def chunks(self, descriptor: Descriptor, start: int, length: int) -> AsyncIterator[bytes]:
        handle = await asyncio.to_thread(self.store.open_blob, descriptor.digest)
        try:
            await asyncio.to_thread(handle.seek, start)
            remaining = length
            while remaining > 0:
                try:
                    data = await asyncio.to_thread(handle.read, min(MiB, remaining))
                except OSError as exc:
                    raise StoreError(f"store blob {descriptor.digest}: {one_line(exc)}") from exc
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


def parse_source(text: str) -> tuple[str, str, str | None]:
    """Split a push/copy source: ("store", ref, None), ("oci", dir, tag),
    ("docker-archive", file, image), ("docker", ref, None). An oci: source
    is read by the one layout parser (puller.store.parse_layout_reference)."""
    layout = parse_layout_reference(text)
    if layout is not None:
        return "oci", str(layout.directory), layout.tag
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
        return LayoutSource(LocalStore(location), name)
    if kind == "docker-archive":
        if not pathlib.Path(location).is_file():
            raise StoreError(f"{location}: no such file")
        from puller.transfer.archive import docker_archive_layout
        layout = docker_archive_layout(location, workdir, name)
        return LayoutSource(layout, "image")
    raise StoreError(f"unsupported source {kind}")

