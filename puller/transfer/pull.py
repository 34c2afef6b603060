"""`dockyard pull`: fetch an image into the local store.

    result = await pull("127.0.0.1:5000/busybox:latest", store=LocalStore(),
                        platform=None, all_platforms=False, options=ClientOptions(),
                        progress=None, on_layer=None)

Tag -> manifest (OCI and Docker media types); an index is narrowed to one
platform (the host's, or `platform` "os/arch[/variant]"), or kept whole
with `all_platforms` (its children fetched a bounded number at a time, see
puller.client.http). Every manifest is checked whole by puller.oci before anything
is stored or downloaded: each descriptor has a digest and an integer size,
which bounds its download byte for byte, and a config no larger than the
manifest cap (it is read whole later). Layers download concurrently
(options.concurrency), each streamed to its ingest file (puller.store.ingest),
hashed on the way (1 MiB steps, off the event loop), verified for size AND
digest (a byte past the size is never written), then committed into blobs/ -
a partial blob never has a final name. A dropped connection resumes with a
Range request from what is already staged (also across runs); blobs already
in the store are not downloaded again.

`on_layer(index, descriptor, blob_path)` is awaited for each layer of the
chosen platform's manifest IN LAYER ORDER (index 0 first), as soon as that
layer and every layer before it are verified in the store - so unpacking can
start while later layers still download. Calls never overlap.

index.json then records the reference (full normalised name in
org.opencontainers.image.ref.name): the platform manifest for a single
platform pull, the index itself with `all_platforms`. A Docker-typed image
is recorded through an OCI view (same blobs, OCI media types) so skopeo and
umoci can read it; `LocalStore.resolve` / `image_for_platform` still answer
with the registry's own digest and manifest (see LocalStore.source_descriptor).

PullResult: reference (normalised), digest (what the tag resolved to),
manifest_digest (chosen platform), media_type (of manifest_digest), layers
(list of descriptors), config_digest, bytes_downloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from puller.client.http import ClientOptions, FetchedManifest, RegistryClient
from puller.client.policy import TRANSIENT_ERRORS
from puller.client.reference import (Reference, choose_platform, describe_platform, host_platform, parse_platform,
                                     parse_reference)
from puller.errors import (CertificateError, ClientError, ContentError, DigestMismatchError, StoreError,
                           TransportError, TransportFailure, one_line)
from puller.oci import Descriptor, check_document_size
from puller.store import LocalStore
from puller.store.ingest import IngestFile
from puller.transfer.progress import Progress
from puller.transfer.tasks import gather_all_or_cancel, to_the_end

OnLayer = Callable[[int, dict, pathlib.Path], Awaitable[None]]
EARLY_SYNC_BYTES = 16 * 1024 * 1024     # written-back steps of a download (see _download)


@dataclass
class PullResult:
    reference: str
    digest: str
    manifest_digest: str
    media_type: str
    layers: list[dict]
    config_digest: str
    bytes_downloaded: int = 0
    platforms: list[str] = field(default_factory=list)
    seconds: float = 0.0                 # wall time of the pull itself (no interpreter start-up)

    def to_json(self) -> dict:
        return {"reference": self.reference, "digest": self.digest, "manifest_digest": self.manifest_digest,
                "media_type": self.media_type, "config_digest": self.config_digest,
                "layers": self.layers, "bytes_downloaded": self.bytes_downloaded,
                "platforms": self.platforms, "seconds": round(self.seconds, 4)}


def _range_starts_at(response, offset: int) -> bool:
    content_range = response.headers.get("Content-Range", "")
    if not content_range:
        return True  # a 206 without Content-Range: trust the Range we asked for
    try:
        return int(content_range.split()[1].split("-")[0]) == offset
    except (IndexError, ValueError):
        return False


class BlobFetcher:
    """Downloads blobs of one repository into a store: bounded concurrency,
    one download per digest at a time, verified, resumable. The caller has
    run `store.ensure()` (pull does, before the first fetch)."""

    def __init__(self, client: RegistryClient, store: LocalStore, progress: Progress | None = None):
        self.client = client
        self.store = store
        self.progress = progress or Progress()
        self.semaphore = asyncio.Semaphore(max(1, client.options.concurrency))
        self._inflight: dict[str, asyncio.Task] = {}
        self.bytes_downloaded = 0

    def fetch(self, ref: Reference, descriptor: Descriptor, label: str | None = None) -> "asyncio.Task[pathlib.Path]":
        """Download the blob of a checked descriptor (puller.oci): its size
        bounds what is written, byte for byte."""
        digest = descriptor.digest
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.ensure_future(self._fetch(ref, descriptor, label or digest[7:19]))
            self._inflight[digest] = task
        return task

    async def _fetch(self, ref: Reference, descriptor: Descriptor, label: str) -> pathlib.Path:
        digest, size = descriptor.digest, descriptor.size
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ContentError(f"blob {digest}: no usable size")   # never unbounded
        if not digest.startswith("sha256:"):
            # the store's layout and tools reading it expect sha256 blobs
            raise DigestMismatchError(f"blob {digest}: only sha256 blobs are supported")
        final = self.store.blob_path(digest)
        if await asyncio.to_thread(final.is_file):
            self.progress.start(digest, label, size)
            self.progress.done(digest, skipped=True)
            return final
        async with self.semaphore:
            self.progress.start(digest, label, size)
            staged = await self._open_staged(digest)
            drop = drop_if_empty = False
            try:
                try:
                    await self._download(ref, digest, size, staged)
                except OSError as exc:          # the disk, not the network
                    raise StoreError(one_line(exc)) from exc
                await asyncio.to_thread(self.store.commit_blob, staged.path, digest)
            except DigestMismatchError:
                drop = True             # bad bytes are not worth resuming from
                raise
            except BaseException:
                # a refused redirect, a denied blob, an interrupt: keep what
                # can be resumed, but no empty partial
                drop_if_empty = True
                raise
            finally:
                await to_the_end(lambda: staged.release(drop, drop_if_empty))
        self.progress.done(digest)
        return final

    async def _open_staged(self, digest: str) -> IngestFile:
        """The locked ingest file, opened in a thread; a cancel meanwhile
        (a sibling download failed) still closes it, and drops it if empty."""
        opening = asyncio.ensure_future(asyncio.to_thread(self.store.open_ingest, digest))
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                staged = await opening
                await to_the_end(lambda: staged.release(drop_if_empty=True))
            raise

    async def _download(self, ref: Reference, digest: str, size: int, staged: IngestFile) -> None:
        chunk = self.client.options.chunk_size
        offset = await asyncio.to_thread(staged.size)
        if offset > size:
            await asyncio.to_thread(staged.truncate)
            offset = 0
        hasher = await asyncio.to_thread(staged.resume_hasher, offset, chunk)
        resumed_from_disk = offset > 0
        failures = 0
        # The disk writes back what has arrived while the rest downloads, so
        # the closing fdatasync has only the tail to wait for.
        syncing: asyncio.Future | None = None
        synced_to = offset
        while True:
            if offset == size:
                break
            if offset:
                self.progress.reset(digest, offset)
            pending: asyncio.Future | None = None
            try:
                async with self.client.blob(ref, digest, offset) as response:
                    if offset and response.status == 206 and not _range_starts_at(response, offset):
                        raise DigestMismatchError(f"blob {digest}: registry answered a different range than "
                                                  f"bytes={offset}-")
                    if offset and response.status == 200:
                        # the server ignored Range: start again from zero
                        await asyncio.to_thread(staged.truncate)
                        hasher, offset = staged.fresh_hasher(), 0
                        self.progress.reset(digest, 0)
                    if response.content_length is not None and response.content_length > size - offset:
                        raise DigestMismatchError(f"blob {digest}: registry announced {response.content_length} "
                                                  f"bytes from offset {offset}, more than its size {size} allows")
                    await asyncio.to_thread(staged.seek, offset)
                    # chunks as they came off the socket (no joins on the loop);
                    # written and hashed in a thread once ~1 MiB has gathered
                    parts: list[bytes] = []
                    gathered = 0
                    async for data in response.iter_body():
                        if not data:
                            continue
                        parts.append(data)
                        gathered += len(data)
                        if offset + gathered > size:     # checked before a byte of it is written
                            raise DigestMismatchError(f"blob {digest}: registry sent more than {size} bytes")
                        if gathered >= chunk:
                            if pending is not None:
                                await pending
                            pending = asyncio.ensure_future(asyncio.to_thread(staged.append, hasher, parts))
                            if offset - synced_to >= EARLY_SYNC_BYTES and (syncing is None or syncing.done()):
                                syncing = asyncio.ensure_future(asyncio.to_thread(staged.write_back))
                                synced_to = offset
                            offset += gathered
                            self.bytes_downloaded += gathered
                            self.progress.advance(digest, gathered)
                            parts, gathered = [], 0
                    if pending is not None:
                        await pending
                        pending = None
                    if parts:
                        await asyncio.to_thread(staged.append, hasher, parts)
                        offset += gathered
                        self.bytes_downloaded += gathered
                        self.progress.advance(digest, gathered)
                    if offset < size:
                        raise TransportFailure(f"connection closed after {offset} of {size} bytes")
            except CertificateError:
                raise                           # no retry makes a certificate trusted
            except TRANSIENT_ERRORS + (TransportError,) as exc:
                if pending is not None:
                    with contextlib.suppress(Exception):
                        await pending
                    pending = None
                # keep what arrived: write nothing partial under a final name,
                # and continue from the staged size with Range
                await asyncio.to_thread(staged.flush)
                failures += 1
                if failures > self.client.options.retries:
                    raise TransportError(f"blob {digest}: download failed after {failures} attempts "
                                         f"({offset} of {size} bytes): {exc}") from exc
                await asyncio.sleep(min(0.1 * 2 ** failures, 2))
                offset = await asyncio.to_thread(staged.size)
                continue
            finally:
                for running in (pending, syncing):
                    if running is not None:
                        with contextlib.suppress(BaseException):
                            await running
        await asyncio.to_thread(staged.sync)
        actual = f"{hasher.name}:{hasher.hexdigest()}"
        if actual != digest or offset != size:
            await asyncio.to_thread(staged.truncate)
            if resumed_from_disk:
                # a stale or corrupt partial from an earlier run: one fresh attempt
                self.progress.reset(digest, 0)
                await self._download(ref, digest, size, staged)
                return
            staged.unlink()
            raise DigestMismatchError(f"blob {digest}: content does not match its digest (got {actual}, "
                                      f"{offset} bytes); not stored")


async def fetch_checked_manifest(client: RegistryClient, ref: Reference, identifier: str,
                                 descriptor: Descriptor | None = None) -> FetchedManifest:
    """GET a manifest and check it whole (pull stores it once every manifest
    of the image passed). With `descriptor` (an index entry), the manifest
    must have the size it declares; a manifest whose config, or an index
    whose child manifests, could not be read within the client's cap is
    refused."""
    manifest = await client.get_manifest(ref, identifier)
    if descriptor is not None and len(manifest.data) != descriptor.size:
        raise ContentError(f"manifest {ref.name}@{descriptor.digest}: {len(manifest.data)} bytes, "
                           f"but its index entry says {descriptor.size}")
    limit = client.options.max_manifest_size
    what = f"manifest {ref.name}@{manifest.digest}"
    if manifest.is_index:
        for i, entry in enumerate(manifest.parsed.manifests):
            check_document_size(entry, limit, f"{what}: manifests[{i}]")
    elif manifest.parsed.config is not None:
        check_document_size(manifest.parsed.config, limit, f"{what}: config")
    return manifest


def _pick(entries: tuple[Descriptor, ...], wanted) -> Descriptor | None:
    chosen = choose_platform([e.raw for e in entries], wanted)
    return next((e for e in entries if e.raw is chosen), None)


def _planned_blobs(manifests: list[FetchedManifest]) -> list[tuple[Descriptor, str]]:
    """(descriptor, label) of every blob to fetch (every size already
    checked: by puller.oci, and the config's against the cap on manifests,
    since it is read whole later)."""
    planned = []
    for manifest in manifests:
        if manifest.is_index:
            continue
        for child in manifest.parsed.children():      # a subject is another image's, not this one's
            blob = child.descriptor
            if child.role == "config":
                planned.append((blob, "config"))
            elif child.role == "layer" and not blob.non_distributable:
                # non-distributable layers come from their own URLs, to whoever needs them
                planned.append((blob, blob.digest[7:19]))
    return planned


async def pull(reference: str, *, store: LocalStore, platform: str | None = None, all_platforms: bool = False,
               options: ClientOptions | None = None, progress: Progress | None = None,
               on_layer: OnLayer | None = None, client: RegistryClient | None = None,
               record_as: str | None = None) -> PullResult:
    started = time.perf_counter()
    ref = parse_reference(reference)
    wanted = parse_platform(platform) if platform else host_platform()
    progress = progress or Progress()
    own_client = client is None
    client = client or RegistryClient(options)
    # store writes run beside the network; every one is awaited before the end
    prepared = asyncio.ensure_future(asyncio.to_thread(lambda: (store.ensure(), store.reclaim_ingest())))
    manifest_writes: list[asyncio.Future] = [prepared]
    try:
        fetcher = BlobFetcher(client, store, progress)
        top = await fetch_checked_manifest(client, ref, ref.identifier)
        platforms_pulled: list[str] = []
        chosen = top
        chosen_desc = top.descriptor()
        children: list[FetchedManifest] = [top]
        if top.is_index:
            entries = top.parsed.manifests
            pick = _pick(entries, wanted)
            if pick is None:
                available = ", ".join(sorted({describe_platform(e.platform) for e in entries})) or "none"
                raise ClientError(f"{ref}: no image for platform {wanted} (available: {available})")
            targets = list({e.digest: e for e in entries}.values()) if all_platforms else [pick]
            # as many at once as the client allows per registry (RegistryClient.manifest_slots)
            children = await gather_all_or_cancel(
                fetch_checked_manifest(client, ref, e.digest, e) for e in targets)
            chosen = next(m for d, m in zip(targets, children) if d.digest == pick.digest)
            chosen_desc = {"mediaType": chosen.media_type, "digest": pick.digest, "size": pick.size}
            if pick.platform:
                chosen_desc["platform"] = pick.platform
            if pick.annotations:
                chosen_desc["annotations"] = pick.annotations
            platforms_pulled = [describe_platform(d.platform) for d in targets]

        # every manifest passed: stored (fsynced, beside the downloads), and
        # every blob fetched, layers of the chosen one first
        for manifest in {m.digest: m for m in [top, *children]}.values():
            manifest_writes.append(asyncio.ensure_future(
                asyncio.to_thread(store.write_blob, manifest.data, manifest.digest)))
        ordered = sorted(children, key=lambda m: m.digest != chosen.digest)
        planned = _planned_blobs(ordered)
        # the ingest clean-up must be over before a download opens a partial it could take
        await prepared
        blob_tasks: dict[str, asyncio.Task] = {}
        for desc, label in planned:
            if desc.digest not in blob_tasks:
                blob_tasks[desc.digest] = fetcher.fetch(ref, desc, label)
        layers = () if chosen.is_index else chosen.parsed.layers
        try:
            if on_layer is not None:
                for index, layer in enumerate(layers):
                    task = blob_tasks.get(layer.digest)
                    if task is None:
                        continue
                    path = await task
                    await on_layer(index, layer.raw, path)
            await asyncio.gather(*blob_tasks.values(), *manifest_writes)
        except BaseException:
            for task in blob_tasks.values():
                task.cancel()
            await asyncio.gather(*blob_tasks.values(), *manifest_writes, return_exceptions=True)
            raise

        name = record_as or str(ref)
        if top.is_index and all_platforms:
            await asyncio.to_thread(store.record, name, top.descriptor())
        else:
            await asyncio.to_thread(store.record, name, chosen_desc)
        config = None if chosen.is_index else chosen.parsed.config
        return PullResult(reference=str(ref), digest=top.digest, manifest_digest=chosen.digest,
                          media_type=chosen.media_type, layers=[layer.raw for layer in layers],
                          config_digest=config.digest if config else "", bytes_downloaded=fetcher.bytes_downloaded,
                          platforms=platforms_pulled, seconds=time.perf_counter() - started)
    finally:
        await asyncio.gather(*manifest_writes, return_exceptions=True)
        if own_client:
            await client.close()


__all__ = ["pull", "PullResult", "BlobFetcher", "OnLayer"]
