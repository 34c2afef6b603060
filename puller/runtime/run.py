"""Getting an image ready to run, and running it with runc or crun.

    layers, config = await prepare_image(ref, store=..., cache=..., ...)
        the image in the local store (pulled if missing, or read from an OCI
        layout with `oci:DIR[:TAG]`); with a snapshot cache, layers are applied
        WHILE the pull downloads the next ones (pull's `on_layer`, in order)
    code = run_container(layers, config, settings, cache=..., runtime=..., ...)
        a fresh bundle under CACHE/containers/<id>/ (rootfs: an overlay mount
        over the cached snapshot when root, else a private copy), then
        `<runtime> run --bundle DIR ID` with our stdin/stdout/stderr, the
        container's exit status returned; --rm removes state and bundle.

Runtimes: runc or crun found on PATH (first of the two unless one is named).
crun refuses cgroup "hybrid" hosts whose cgroup2 hierarchy holds a controller;
there it runs in a private mount namespace in which /sys/fs/cgroup/unified is
unmounted, so it sees plain cgroup v1 (nothing changes on the host).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from puller.runtime.apply import ApplyOptions, UnpackError, layer_sequence
from puller.runtime.spec import (ConfigError, Layer, RunSettings, SnapshotCache, materialize, new_trees_here,
                                 runtime_config, write_bundle_files)

RUNTIMES = ("runc", "crun")
NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")


class RunError(UnpackError):
    """The container could not be started (one line for the user)."""


# ---- the image ------------------------------------------------------------------------------


def default_cache_dir(store_root: Path) -> Path:
    return Path(os.environ.get("DOCKYARD_UNPACK_CACHE") or store_root.parent / "unpacked")


def parse_layout_ref(ref: str) -> tuple[Path, str] | None:
    """`oci:DIR[:TAG]` -> (DIR, TAG); None for registry references."""
    if not ref.startswith("oci:"):
        return None
    rest = ref[4:]
    directory, sep, tag = rest.rpartition(":")
    if not sep or "/" in tag or not tag:
        directory, tag = rest, "latest"
    return Path(directory), tag


class _LayerPipeline:
    """pull's on_layer: each verified layer goes into the snapshot cache, in
    order, while later layers still download. A layer that arrives while the
    one before it is still being applied is STAGED meanwhile (decompressed,
    verified, its files written: puller.unpack.StagedLayer), so the heavy
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


async def prepare_image(ref: str, *, store, cache: SnapshotCache | None, platform: str | None = None,
                        client_options=None, progress=None, options: ApplyOptions | None = None,
                        pull_if_missing: bool = True) -> tuple[list[Layer], dict]:
    """(layers, image config) of ref, pulled into the store if needed; with a
    cache, the chain snapshot is built by the time this returns."""
    from puller.store import LocalStore, StoreError
    options = options or ApplyOptions()
    layout = parse_layout_ref(ref)
    if layout is not None:
        source = LocalStore(layout[0])
        if not (source.root / "index.json").is_file():
            raise UnpackError(f"{layout[0]} is not an OCI image layout")
        _, manifest, config = await asyncio.to_thread(source.image_for_platform, layout[1], platform)
        blob_path = source.blob_path
    else:
        try:
            _, manifest, config = await asyncio.to_thread(store.image_for_platform, ref, platform)
        except StoreError:
            if not pull_if_missing:
                raise
            from puller.pull import pull
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


# ---- runtimes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    name: str
    path: str
    state_root: Path

    def argv(self, *args: str) -> list[str]:
        base = [self.path, "--root", str(self.state_root), *args]
        if self.name == "crun" and _crun_needs_legacy_view():
            script = 'umount -l /sys/fs/cgroup/unified 2>/dev/null; exec "$@"'
            return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script,
                    "crun", *base]
        return base


def _crun_needs_legacy_view() -> bool:
    try:
        return bool(Path("/sys/fs/cgroup/unified/cgroup.controllers").read_text().strip())
    except OSError:
        return False


def find_runtime(name: str | None = None) -> Runtime:
    names = (name,) if name else RUNTIMES
    if name and name not in RUNTIMES:
        raise RunError(f"unknown runtime {name!r} (runc or crun)")
    for candidate in names:
        path = shutil.which(candidate)
        if path:
            base = Path("/run/dockyard") if os.geteuid() == 0 else \
                Path(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/dockyard-{os.getuid()}")
            return Runtime(candidate, path, base / candidate)
    raise RunError(f"no OCI runtime found on PATH (install {' or '.join(names)})")


# ---- rootfs for a container ---------------------------------------------------------------------


def _overlay_supported() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        return "overlay" in Path("/proc/filesystems").read_text()
    except OSError:
        return False


def mount_overlay(lower: Path, bundle: Path) -> bool:
    """rootfs = overlay(lower=snapshot, upper=bundle/upper); False if the kernel says no."""
    upper, work, rootfs = bundle / "upper", bundle / "work", bundle / "rootfs"
    for d in (upper, work, rootfs):
        d.mkdir(exist_ok=True)
    os.chmod(upper, 0o755)
    os.chmod(rootfs, 0o755)
    if any(c in str(p) for p in (lower, upper, work) for c in ",:\\"):
        return False
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(rootfs)],
                          capture_output=True)
    return proc.returncode == 0


def unmount(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["umount", str(path)], capture_output=True)
        if os.path.ismount(path):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remove_bundle(bundle: Path) -> None:
    unmount(bundle / "rootfs")
    shutil.rmtree(bundle, ignore_errors=True)


# ---- run -----------------------------------------------------------------------------------------


def run_container(layers: Sequence[Layer], image_config: dict, settings: RunSettings, *,
                  cache: SnapshotCache, runtime: Runtime, name: str | None = None, remove: bool = False,
                  options: ApplyOptions | None = None, use_overlay: bool | None = None) -> int:
    """Create a bundle for this image, run it in the foreground, return its exit code."""
    container_id = name or uuid.uuid4().hex
    if not NAME_RE.match(container_id):
        raise RunError(f"invalid container name {container_id!r}")
    containers = cache.root / "containers"
    containers.mkdir(mode=0o700, exist_ok=True)
    new_trees_here(containers)
    bundle = containers / container_id
    if bundle.exists():
        if _runtime_state(runtime, container_id) is not None:
            raise RunError(f"container name {container_id!r} is already in use")
        remove_bundle(bundle)  # left over by a run that ended without --rm
    bundle.mkdir(mode=0o700)
    try:
        snapshot = cache.ensure(layers, options)
        overlay = _overlay_supported() if use_overlay is None else use_overlay
        if not (overlay and mount_overlay(snapshot, bundle)):
            for d in ("rootfs", "upper", "work"):
                if (bundle / d).is_dir() and not os.path.ismount(bundle / d):
                    shutil.rmtree(bundle / d)
            materialize(snapshot, bundle / "rootfs")
        config, files = runtime_config(image_config, bundle / "rootfs", bundle, settings, container_id)
        write_bundle_files(bundle, config, files)
    except BaseException:
        remove_bundle(bundle)
        raise
    runtime.state_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    argv = runtime.argv("run", "--bundle", str(bundle), container_id)
    try:
        proc = subprocess.Popen(argv)
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:
                continue  # the runtime got the SIGINT too and forwards it
    finally:
        if _runtime_state(runtime, container_id) is not None:
            subprocess.run(runtime.argv("delete", "--force", container_id), capture_output=True)
        unmount(bundle / "rootfs")
        if remove:
            remove_bundle(bundle)
    return code


def _runtime_state(runtime: Runtime, container_id: str) -> dict | None:
    proc = subprocess.run(runtime.argv("state", container_id), capture_output=True)
    if proc.returncode != 0:
        return None
    try:
        return json.loads(proc.stdout)
    except ValueError:
        return None


__all__ = ["prepare_image", "run_container", "find_runtime", "Runtime", "RunError", "ConfigError",
           "default_cache_dir", "parse_layout_ref"]
