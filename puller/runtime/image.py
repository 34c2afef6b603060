"""An image made ready to unpack or run: its layers in order, from the local
store (pulled if missing) or an OCI layout, into the snapshot cache.

    layers, config = await prepare_image(ref, store=..., cache=..., ...)

With a snapshot cache, layers are applied WHILE the pull downloads the next
ones (pull's `on_layer`, in order); the whole chain is checked against the
image config's diff IDs at the end (SnapshotCache.ensure).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Callable

from puller.runtime.errors import UnpackError, os_errors_mapped
from puller.runtime.options import ApplyOptions, Layer
from puller.runtime.snapshots import SnapshotCache
from storage.oci.content import parse_manifest
from storage.oci.errors import OciError


def default_cache_dir(store_root: Path) -> Path:
    return Path(os.environ.get("DOCKYARD_UNPACK_CACHE") or store_root.parent / "unpacked")


def layer_sequence(manifest: dict, config: dict, blob_path: Callable[[str], Path]) -> list[Layer]:
    """(blob path, media type, diff ID) for each layer of an image."""
    try:
        parsed = parse_manifest(manifest)
    except OciError as exc:
        raise UnpackError(str(exc)) from None
    layers = () if parsed.is_index else parsed.layers
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if len(layers) != len(diff_ids):
        raise UnpackError(f"image has {len(layers)} layers but its config lists {len(diff_ids)} diff IDs")
    return [(blob_path(layer.digest), layer.media_type, diff_id) for layer, diff_id in zip(layers, diff_ids)]


class _LayerPipeline:
    """pull's on_layer: each verified layer goes into the snapshot cache, in
    order, while later layers still download. A layer that arrives while the
    one before it is still being applied is STAGED meanwhile (decompressed,
    verified, its files written: puller.runtime.stage), so the heavy
    work of several layers runs at once, one per core; placing a staged layer
    on its parent snapshot is mostly renames. Diff IDs are checked again
    against the image config at the end (SnapshotCache.ensure)."""

    def __init__(self, cache: SnapshotCache, options: ApplyOptions, parallel: int | None = None):
        self.cache = cache
        self.options = options
        workers = parallel or max(1, os.cpu_count() or 1)
        self.slots = asyncio.Semaphore(workers)  # layers being staged at once
        self.max_waiting = 2 * workers           # staged layers (entry lists in memory) not placed yet
        self.waiting = 0
        self.tasks: list[asyncio.Task] = []

    async def __call__(self, index: int, descriptor: dict, path: Path) -> None:
        for task in self.tasks:  # a failed layer stops the pull
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()
        parent = self.tasks[-1] if self.tasks else None
        self.tasks.append(asyncio.ensure_future(self._layer(parent, descriptor, Path(path))))

    async def _layer(self, parent_task: asyncio.Task | None, descriptor: dict, path: Path) -> str:
        media_type = descriptor.get("mediaType", "")
        known = await asyncio.to_thread(self.cache.known_diff_id, descriptor["digest"])
        staged = None
        counted = False
        try:
            if parent_task is not None and known is None:  # a known layer is likely cached already
                async with self.slots:  # never held while waiting for another layer
                    # past the cap, apply in one pass later rather than wait (which could deadlock)
                    if not parent_task.done() and self.waiting < self.max_waiting:
                        self.waiting += 1
                        counted = True
                        staged = await asyncio.to_thread(self.cache.stage, path, media_type, None, self.options)
            try:
                parent = await parent_task if parent_task is not None else None
            except BaseException:
                await asyncio.to_thread(self.cache.discard, staged)  # a staged tree: rmtree off the loop
                raise
            # the chain itself takes no slot: it is the critical path, one layer at a time
            return await asyncio.to_thread(self.cache.apply_next, parent, path, media_type, known,
                                           self.options, blob_digest=descriptor["digest"], staged=staged)
        finally:
            if counted:
                self.waiting -= 1

    async def finish(self, failed: bool) -> None:
        """Wait for every layer handed over; raise the first layer error
        unless the pull itself failed (its error is the one to report)."""
        results = await asyncio.gather(*self.tasks, return_exceptions=True)
        if not failed:
            for result in results:
                if isinstance(result, BaseException):
                    raise result


@os_errors_mapped
async def prepare_image(ref: str, *, store, cache: SnapshotCache | None, platform: str | None = None,
                        client_options=None, progress=None, options: ApplyOptions | None = None,
                        pull_if_missing: bool = True) -> tuple[list[Layer], dict]:
    """(layers, image config) of ref, pulled into the store if needed, or
    read from an OCI layout with `oci:DIR[:TAG]` (puller.store's parser);
    with a cache, the chain snapshot is built by the time this returns."""
    from puller.store import LocalStore, StoreError, parse_layout_reference
    options = options or ApplyOptions()
    layout = parse_layout_reference(ref)
    if layout is not None:
        source = LocalStore(layout.directory)
        if not (source.root / "index.json").is_file():
            raise UnpackError(f"{layout.directory} is not an OCI image layout")
        _, manifest, config = await asyncio.to_thread(source.image_for_platform, layout.tag, platform)
        blob_path = source.blob_path
    else:
        try:
            _, manifest, config = await asyncio.to_thread(store.image_for_platform, ref, platform)
        except StoreError:
            if not pull_if_missing:
                raise
            from puller.transfer.pull import pull
            pipeline = _LayerPipeline(cache, options) if cache is not None else None
            try:
                await pull(ref, store=store, platform=platform, options=client_options, progress=progress,
                           on_layer=pipeline)
            except BaseException:
                if pipeline is not None:
                    await pipeline.finish(failed=True)
                raise
            if pipeline is not None:
                await pipeline.finish(failed=False)
            _, manifest, config = await asyncio.to_thread(store.image_for_platform, ref, platform)
        blob_path = store.blob_path
    layers = layer_sequence(manifest, config, blob_path)
    if cache is not None:
        await asyncio.to_thread(cache.ensure, layers, options)  # verifies the diff IDs
    return layers, config

