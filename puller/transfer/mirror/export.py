"""`dockyard mirror export`: images from registries into one bundle
(puller.transfer.mirror.bundle).

    result = await export_bundle(selection, "bundle.tar", options=..., platform=None, referrers=True,
                                 compress=False, fmt="oci-archive", sign_key=None, have=None,
                                 progress=progress)

Every image of the selection (references, and the tags the patterns pick
from each repository's tag list) is walked whole first (walk.walk_image:
every platform of an index unless `platform` narrows it to one; referrers
with `referrers`), so the bundle manifest is complete before a blob is
fetched. With `have` (an inventory of the far side, or a previous bundle's
manifest) the bundle carries only what the far side lacks:

    an image the far side has under the same tag       nothing (unchanged)
    an image it has by digest in that repository        its top manifest only, to tag it (present)
    any other image                                     all its manifests; its blobs unless the far
                                                        side holds them (prerequisites, not carried)

Blobs are fetched concurrently (puller.transfer.pull.BlobFetcher: verified,
resumable): for a plain bundle straight into their members of the tar, whose
places are known up front (puller.transfer.mirror.regions); for a zstd one,
or volumes of at most `max_size` bytes, into a staging layout beside the
output first, then through zstd or copied in the kernel (copy_file_range). Nothing is visible under the output's
name until the bundle is complete; what an export killed midway left beside
it is removed by the next export to it (puller.transfer.mirror.leftovers).
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import shutil
import tempfile
import time
from dataclasses import dataclass, field

from puller.client.http import ClientOptions, FetchedManifest, RegistryClient
from puller.client.reference import Reference, host_platform, parse_platform
from puller.errors import StoreError, one_line
from puller.oci import Descriptor
from puller.store import REF_NAME, LocalStore
from puller.transfer.mirror import leftovers
from puller.transfer.mirror.bundle import (BUNDLE_MANIFEST, BUNDLE_SIGNATURE, BundleImage, BundleManifest,
                                           BundleWriter, blob_member)
from puller.transfer.mirror.errors import MirrorError
from puller.transfer.mirror.images_file import Selection
from puller.transfer.mirror.regions import BundleRegions
from puller.transfer.mirror.inventory import Have
from puller.transfer.mirror.listing import expand
from puller.transfer.mirror.walk import ImageTree, walk_image
from puller.transfer.progress import Progress
from puller.transfer.pull import BlobFetcher
from puller.transfer.tasks import gather_all_or_cancel, to_the_end
from storage.oci import media
from storage.oci.digests import digest_of


@dataclass
class ExportResult:
    output: str
    images: list[dict] = field(default_factory=list)     # source, digest, state (carried|present|unchanged)
    referrers: int = 0
    manifests: int = 0
    blobs: int = 0
    prerequisites: int = 0
    carried_bytes: int = 0
    bundle_bytes: int = 0
    signed: bool = False
    volumes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dict(self.__dict__, seconds=round(self.seconds, 3))


class _Plan:
    """The bundle manifest under construction, and where each carried blob is read from."""

    def __init__(self, have: Have | None):
        self.have = have
        self.manifest = BundleManifest()
        self.documents: dict[str, FetchedManifest] = {}
        self.sources: dict[str, tuple[Reference, Descriptor]] = {}
        self.states: list[dict] = []
        self.layout_entries: list[tuple[str, FetchedManifest]] = []      # (ref name, root)
        self.referrers: set[tuple[str, str]] = set()                      # (repository, digest) carried

    def _carry_manifest(self, manifest: FetchedManifest) -> None:
        self.manifest.manifests[manifest.digest] = (len(manifest.data), manifest.media_type)
        self.documents[manifest.digest] = manifest

    def _carry_tree(self, tree: ImageTree) -> None:
        for manifest in tree.manifests.values():
            self._carry_manifest(manifest)
        for digest, descriptor in tree.blobs.items():
            where = self.have.where(digest) if self.have else None
            if where is not None:
                self.manifest.prerequisites.setdefault(digest, (descriptor.size, where))
            else:
                self.manifest.blobs[digest] = descriptor.size
                self.sources.setdefault(digest, (tree.ref, descriptor))

    def add(self, tree: ImageTree) -> None:
        ref, root = tree.ref, tree.root
        repo, tag = ref.repository, ref.tag
        have = self.have
        state = "carried"
        if have is not None and tag and have.tags.get(repo, {}).get(tag) == root.digest:
            state = "unchanged"
        elif have is not None and have.manifest_in(root.digest, repo):
            state = "present"
            self._carry_manifest(root)
        else:
            self._carry_tree(tree)
            if tag or ref.digest:
                self.layout_entries.append((str(ref), root))
        if state != "unchanged":
            self.manifest.images.append(BundleImage(repository=repo, digest=root.digest, size=len(root.data),
                                                    media_type=root.media_type, source=str(ref), tag=tag,
                                                    present=state == "present"))
        self.states.append({"source": str(ref), "digest": root.digest, "state": state})
        for referrer in tree.all_trees():
            if referrer is tree or (have is not None and have.manifest_in(referrer.root.digest, repo)) \
                    or (repo, referrer.root.digest) in self.referrers:
                continue                      # two tags of one image share their referrers
            self.referrers.add((repo, referrer.root.digest))
            self._carry_tree(referrer)
            self.manifest.images.append(BundleImage(repository=repo, digest=referrer.root.digest,
                                                    size=len(referrer.root.data),
                                                    media_type=referrer.root.media_type,
                                                    source=f"{ref.name}@{referrer.root.digest}",
                                                    subject=referrer.subject))


def _layout_index(plan: _Plan) -> bytes:
    entries = []
    for name, root in plan.layout_entries:
        entries.append({"mediaType": root.media_type, "digest": root.digest, "size": len(root.data),
                        "annotations": {REF_NAME: name}})
    return json.dumps({"schemaVersion": 2, "mediaType": media.OCI_INDEX, "manifests": entries}).encode()


def _docker_manifest(plan: _Plan) -> bytes:
    """manifest.json as `docker save` writes it beside an OCI layout (what `docker load` reads)."""
    entries = []
    for name, root in plan.layout_entries:
        if root.is_index or root.parsed.config is None:
            continue
        tags = [name] if "@" not in name else []
        entries.append({"Config": blob_member(root.parsed.config.digest), "RepoTags": tags,
                        "Layers": [blob_member(layer.digest) for layer in root.parsed.layers]})
    return json.dumps(entries).encode()


def _write_members(writer: BundleWriter, plan: _Plan, manifest_bytes: bytes, signature: dict | None, fmt: str,
                   add_blob) -> None:
    """Every member in order; add_blob(name, digest, size) puts each blob's."""
    writer.add_bytes(BUNDLE_MANIFEST, manifest_bytes)
    if signature is not None:
        writer.add_bytes(BUNDLE_SIGNATURE, json.dumps(signature).encode())
    writer.add_bytes("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
    for digest, document in plan.documents.items():
        writer.add_bytes(blob_member(digest), document.data)
    for digest, size in plan.manifest.blobs.items():
        add_blob(blob_member(digest), digest, size)
    writer.add_bytes("index.json", _layout_index(plan))
    if fmt == "docker-archive":
        writer.add_bytes("manifest.json", _docker_manifest(plan))


def _write_bundle(output: pathlib.Path, plan: _Plan, staging: LocalStore, manifest_bytes: bytes,
                  signature: dict | None, compress: bool, fmt: str, max_size: int | None,
                  advance) -> list[pathlib.Path]:
    writer = BundleWriter(output, compress, max_size=max_size, bundle_id=digest_of(manifest_bytes))
    try:
        _write_members(writer, plan, manifest_bytes, signature, fmt,
                       lambda name, digest, size: writer.add_file(name, staging.blob_path(digest), size, advance))
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def _open_in_place(output: pathlib.Path, plan: _Plan, manifest_bytes: bytes, signature: dict | None,
                   fmt: str) -> tuple[BundleWriter, BundleRegions]:
    """A plain bundle with every member but the blobs' bytes written, and where those go."""
    writer = BundleWriter(output, bundle_id=digest_of(manifest_bytes))
    try:
        offsets: dict[str, int] = {}
        _write_members(writer, plan, manifest_bytes, signature, fmt,
                       lambda name, digest, size: offsets.__setitem__(digest, writer.reserve(name, size)))
        return writer, BundleRegions(writer.flush(), offsets)
    except BaseException:
        writer.abort()
        raise


async def _fetch_in_place(client: RegistryClient, output: pathlib.Path, plan: _Plan, manifest_bytes: bytes,
                          signature: dict | None, fmt: str, progress: Progress) -> list[pathlib.Path]:
    """Blobs downloaded straight into their members (puller.transfer.mirror.regions): one write of each byte."""
    writer, regions = await asyncio.to_thread(_open_in_place, output, plan, manifest_bytes, signature, fmt)
    try:
        fetcher = BlobFetcher(client, regions, progress)
        await gather_all_or_cancel(fetcher.fetch(ref, descriptor) for ref, descriptor in plan.sources.values())
        return await asyncio.to_thread(writer.commit)
    except BaseException:
        await to_the_end(writer.abort)
        raise


def _staging(output: pathlib.Path) -> tuple[pathlib.Path, int]:
    """A fresh staging directory beside the output, locked while this process lives."""
    try:
        directory = pathlib.Path(tempfile.mkdtemp(prefix=leftovers.staging_prefix(output), dir=output.parent))
    except OSError as exc:
        raise StoreError(one_line(exc)) from exc
    fd = os.open(directory, os.O_RDONLY)
    leftovers.hold(fd)
    return directory, fd


def _drop_staging(directory: pathlib.Path, fd: int) -> None:
    shutil.rmtree(directory, True)
    os.close(fd)


async def export_bundle(selection: Selection, output: str, *, options: ClientOptions | None = None,
                        client: RegistryClient | None = None, platform: str | None = None,
                        referrers: bool = False, compress: bool = False, fmt: str = "oci-archive",
                        sign_key: str | None = None, have: Have | None = None, max_size: int | None = None,
                        progress: Progress | None = None) -> ExportResult:
    started = time.perf_counter()
    progress = progress or Progress()
    signing = key = None
    if sign_key:        # `cryptography` costs a start-up some 20 ms: only a signed export loads it
        from puller.transfer.mirror import signing
        key = await asyncio.to_thread(signing.load_private_key, sign_key)
    if fmt == "docker-archive" and compress:
        raise MirrorError("--format docker-archive is read by `docker load` uncompressed: drop --zstd")
    wanted = parse_platform(platform) if platform else (host_platform() if fmt == "docker-archive" else None)
    output_path = pathlib.Path(output)
    # what exports to this output that were killed left behind goes first
    await asyncio.to_thread(leftovers.remove_stale, output_path)
    own = client is None
    client = client or RegistryClient(options)
    try:
        refs = await expand(client, selection)
        if not refs:
            raise MirrorError("the selection names no image (no tag matched the patterns)")
        trees = await gather_all_or_cancel(walk_image(client, ref, platform=wanted, referrers=referrers)
                                           for ref in refs)
        plan = _Plan(have)
        for tree in trees:
            plan.add(tree)
        plan.manifest.format = fmt
        manifest_bytes = await asyncio.to_thread(plan.manifest.to_json)
        signature = signing.sign(manifest_bytes, key) if key is not None else None
        if not compress and max_size is None:
            try:
                paths = await _fetch_in_place(client, output_path, plan, manifest_bytes, signature, fmt, progress)
                size = sum(p.stat().st_size for p in paths)
            except OSError as exc:
                raise StoreError(f"{output_path}: {one_line(exc)}") from exc
        else:
            paths, size = await _fetch_staged(client, output_path, plan, manifest_bytes, signature, compress, fmt,
                                              max_size, progress)
    finally:
        if own:
            await client.close()
    bundle = plan.manifest
    return ExportResult(output=str(output_path), images=plan.states,
                        referrers=sum(1 for i in bundle.images if i.subject), manifests=len(bundle.manifests),
                        blobs=len(bundle.blobs), prerequisites=len(bundle.prerequisites),
                        carried_bytes=bundle.carried_bytes, bundle_bytes=size, signed=signature is not None,
                        volumes=[str(p) for p in paths] if max_size else [],
                        seconds=time.perf_counter() - started)


async def _fetch_staged(client: RegistryClient, output_path: pathlib.Path, plan: _Plan, manifest_bytes: bytes,
                        signature: dict | None, compress: bool, fmt: str, max_size: int | None,
                        progress: Progress) -> tuple[list[pathlib.Path], int]:
    """Blobs fetched into a staging store first, then written through zstd or into volumes."""
    staging_dir, lock = await asyncio.to_thread(_staging, output_path)
    try:
        # scratch: the bundle is flushed once written, the staging directory removed
        staging = LocalStore(staging_dir, durable=False)
        await asyncio.to_thread(staging.ensure)
        fetcher = BlobFetcher(client, staging, progress)
        await gather_all_or_cancel(fetcher.fetch(ref, descriptor) for ref, descriptor in plan.sources.values())
        loop = asyncio.get_running_loop()
        total = sum(plan.manifest.blobs.values())
        progress.start("bundle", f"writing {output_path.name}", total)

        def advance(n: int) -> None:
            loop.call_soon_threadsafe(progress.advance, "bundle", n)
        try:
            paths = await asyncio.to_thread(_write_bundle, output_path, plan, staging, manifest_bytes,
                                            signature, compress, fmt, max_size, advance)
            return paths, sum(p.stat().st_size for p in paths)
        except OSError as exc:
            raise StoreError(f"{output_path}: {one_line(exc)}") from exc
    finally:
        await asyncio.to_thread(_drop_staging, staging_dir, lock)
