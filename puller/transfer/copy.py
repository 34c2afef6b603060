"""`dockyard copy SRC DST`: copy an image, digests unchanged.

SRC: a registry reference (`docker://REF` or plain `REF`), `oci:DIR[:TAG]`,
     `docker-archive:FILE`.
DST: a registry reference or `oci:DIR[:TAG]`.

Every platform of an index is copied (the index digest is preserved). With
`referrers`, manifests attached to the copied ones (the referrers API, or
the `sha256-<hex>` referrers tag when the API answers 404) are copied too,
recursively; when the destination does not index subjects itself (no
OCI-Subject header on the manifest PUT), its referrers tag is updated.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import shutil
import tempfile
from dataclasses import dataclass, field

from puller.client.http import FetchedManifest, RegistryClient
from puller.client.reference import Reference, parse_reference
from puller.errors import ClientError, ContentError, NotFoundError, StoreError, one_line
from puller.oci import Descriptor
from puller.store import DEFAULT_LAYOUT_TAG, LocalStore
from puller.transfer.progress import Progress
from puller.transfer.pull import pull
from puller.transfer.push import push_image
from puller.transfer.sources import ImageSource, LayoutSource, RegistrySource, open_layout_source, parse_source
from storage.oci import media

MAX_REFERRER_DEPTH = 4


@dataclass
class CopyResult:
    source: str
    destination: str
    digest: str
    media_type: str
    manifests: list[str] = field(default_factory=list)
    referrers: list[str] = field(default_factory=list)
    bytes_transferred: int = 0

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _registry_ref(text: str) -> Reference:
    return parse_reference(text[len("docker://"):] if text.startswith("docker://") else text)


async def copy(source: str, destination: str, *, options=None, referrers: bool = False,
               progress: Progress | None = None, client: RegistryClient | None = None) -> CopyResult:
    progress = progress or Progress()
    own = client is None
    client = client or RegistryClient(options)
    try:
        workdir = pathlib.Path(tempfile.mkdtemp(prefix="dockyard-copy-"))
    except OSError as exc:
        raise StoreError(one_line(exc)) from exc
    try:
        src_kind, src_loc, src_name = parse_source(source)
        if src_kind == "store":
            src_kind = "docker"
        dst_kind, dst_loc, dst_name = parse_source(destination)
        if dst_kind == "store":
            dst_kind = "docker"
        if dst_kind == "docker-archive":
            raise ClientError("docker-archive: is supported as a source only")

        if dst_kind == "oci":
            return await _copy_to_layout(client, src_kind, src_loc, src_name, dst_loc, dst_name, source,
                                         destination, progress, workdir)

        dest_ref = _registry_ref(dst_loc)
        if src_kind == "docker":
            src_ref = _registry_ref(src_loc)
            image_source: ImageSource = RegistrySource(client, src_ref)
        else:
            image_source = await asyncio.to_thread(open_layout_source, src_kind, src_loc, src_name, workdir)
            src_ref = None
        root = await image_source.root()
        tags = [dest_ref.tag] if dest_ref.tag and not dest_ref.digest else []
        pushed = await push_image(image_source, client, dest_ref, tags=tags, progress=progress, root=root)
        result = CopyResult(source=source, destination=str(dest_ref), digest=root.digest,
                            media_type=root.media_type, manifests=list(pushed.manifests),
                            bytes_transferred=pushed.bytes_uploaded)
        if referrers:
            if src_ref is None:
                raise ClientError("--referrers needs a registry source")
            await copy_referrers(client, src_ref, dest_ref, list(pushed.manifests), result, progress, 0)
        return result
    finally:
        await asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True)  # may hold an unpacked archive
        if own:
            await client.close()


async def copy_referrers(client: RegistryClient, src: Reference, dest: Reference, digests: list[str],
                          result: CopyResult, progress: Progress, depth: int) -> None:
    if depth >= MAX_REFERRER_DEPTH:
        return
    source = RegistrySource(client, src)
    for digest in digests:
        found = await client.referrers(src, digest)
        for descriptor in found:
            if descriptor.digest in result.referrers:
                continue
            manifest = await client.get_manifest(src, descriptor.digest)
            pushed = await push_image(source, client, dest.with_tag(None), tags=[], progress=progress,
                                      root=manifest)
            result.referrers.append(manifest.digest)
            result.bytes_transferred += pushed.bytes_uploaded
            subject = manifest.parsed.subject
            if subject and not pushed.subject_headers.get(manifest.digest):
                await add_to_referrers_tag(client, dest, subject.digest, descriptor, manifest)
            await copy_referrers(client, src, dest, [manifest.digest], result, progress, depth + 1)


async def add_to_referrers_tag(client: RegistryClient, dest: Reference, subject_digest: str,
                                descriptor: Descriptor, manifest: FetchedManifest) -> None:
    """The referrers tag schema: an index tagged sha256-<hex> listing referrers."""
    tag = subject_digest.replace(":", "-")
    try:
        current = await client.get_manifest(dest, tag)
    except NotFoundError:
        current = None
    if current is not None and not current.is_index:
        raise ContentError(f"{dest.name}: the referrers tag {tag} is not an index")
    listed = current.parsed.manifests if current is not None else ()
    entries = [m.raw for m in listed if m.digest != manifest.digest]
    entry = {"mediaType": manifest.media_type, "digest": manifest.digest, "size": len(manifest.data)}
    artifact_type = manifest.parsed.effective_artifact_type or descriptor.artifact_type
    if artifact_type:
        entry["artifactType"] = artifact_type
    if manifest.parsed.annotations:
        entry["annotations"] = manifest.parsed.annotations
    entries.append(entry)
    body = json.dumps({"schemaVersion": 2, "mediaType": media.OCI_INDEX, "manifests": entries}).encode()
    await client.put_manifest(dest, tag, body, media.OCI_INDEX)


async def _copy_to_layout(client, src_kind, src_loc, src_name, dst_dir, dst_name, source, destination,
                          progress, workdir) -> CopyResult:
    dest_store = LocalStore(dst_dir)
    name = dst_name or DEFAULT_LAYOUT_TAG     # what `oci:DIR` reads back when the layout holds several
    if src_kind == "docker":
        ref = _registry_ref(src_loc)
        pulled = await pull(str(ref), store=dest_store, all_platforms=True, progress=progress,
                            client=client, record_as=name)
        manifests = [pulled.digest] + ([pulled.manifest_digest] if pulled.manifest_digest != pulled.digest else [])
        return CopyResult(source=source, destination=destination, digest=pulled.digest,
                          media_type=pulled.media_type if pulled.digest == pulled.manifest_digest else media.OCI_INDEX,
                          manifests=manifests, bytes_transferred=pulled.bytes_downloaded)
    layout: LayoutSource = await asyncio.to_thread(open_layout_source, src_kind, src_loc, src_name, workdir)
    root = await layout.root()
    copied: list[str] = []
    total = 0

    def copy_tree(manifest_digest: str, media_type: str | None = None) -> None:
        nonlocal total
        manifest = layout.store.read_manifest(manifest_digest, media_type)
        children = [manifest_digest]
        if manifest.is_index:
            for child in manifest.manifests:
                copy_tree(child.digest, child.media_type or None)
        else:
            children.extend(blob.digest for blob in manifest.blobs
                            if not blob.non_distributable or layout.store.has_blob(blob.digest))
        for digest in children:
            if dest_store.has_blob(digest):
                continue
            if not layout.store.has_blob(digest):
                raise StoreError(f"{src_loc}: blob {digest} is missing")
            total += dest_store.import_blob(layout.store.blob_path(digest), digest)
        copied.append(manifest_digest)

    def run() -> None:
        dest_store.ensure()
        copy_tree(root.digest, root.media_type)
        dest_store.record(name, root.descriptor())
    await asyncio.to_thread(run)
    return CopyResult(source=source, destination=destination, digest=root.digest, media_type=root.media_type,
                      manifests=copied, bytes_transferred=total)
