"""Running an image with runc or crun.

    code = run_container(layers, config, settings, cache=..., runtime=..., ...)
        a fresh bundle under CACHE/containers/<id>/ (rootfs: an overlay mount
        over the cached snapshot, else a private copy), then `<runtime> run
        --bundle DIR ID` with our stdin/stdout/stderr and signals forwarded
        (puller.runtime.signals), the container's exit status returned; --rm
        removes state and bundle; --detach hands the bundle to a shim
        (puller.runtime.containers).

The overlay (lower: the snapshot, upper: the bundle's own directory) costs
O(1), as containerd does it: as root, and as an ordinary user inside the user
namespace puller.runtime.rootless makes, where the kernel allows it. Where
the kernel refuses it, the rootfs is a private copy (puller.runtime.tree.materialize).

Runtimes: runc or crun found on PATH (first of the two unless one is named).
crun refuses cgroup "hybrid" hosts whose cgroup2 hierarchy holds a controller;
there it runs in a private mount namespace in which /sys/fs/cgroup/unified is
unmounted (rootless: hidden under a tmpfs), so it sees plain cgroup v1
(nothing changes on the host). `--init` mounts the host's static tini.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from puller.runtime import containers, rootless
from puller.runtime.errors import RunError, os_errors_mapped
from puller.runtime.options import ApplyOptions, Layer
from puller.runtime.snapshots import SnapshotCache
from puller.runtime.spec import RunSettings, runtime_config, write_bundle_files
from puller.runtime.tree import materialize, new_trees_here

RUNTIMES = ("runc", "crun")
NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")


# ---- runtimes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    name: str
    path: str
    state_root: Path

    rootless: bool = False

    def argv(self, *args: str) -> list[str]:
        base = [self.path, "--root", str(self.state_root), *args]
        if self.name == "crun" and self.rootless:
            # no cgroup it could write from a user namespace; the hybrid check (below) still runs,
            # and the host's cgroup2 mount, locked in our namespace, cannot be unmounted: hidden
            # under an empty tmpfs instead, in the namespace of this one command
            base = [self.path, "--cgroup-manager=disabled", *base[1:]]
            if _crun_needs_legacy_view():
                script = 'mount -t tmpfs -o ro,size=4k tmpfs /sys/fs/cgroup/unified; exec "$@"'
                return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "crun", *base]
            return base
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
            mode = rootless.current()
            if mode is not None:
                return Runtime(candidate, path, rootless.state_root(mode, candidate), rootless=True)
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


# ---- --init --------------------------------------------------------------------------------------

INIT_CANDIDATES = ("docker-init", "tini-static", "catatonit")


def find_init() -> str:
    """A statically linked init on the host (tini as docker ships it, or
    catatonit): mounted into the container, it must not need the image's libc."""
    for name in INIT_CANDIDATES:
        path = shutil.which(name)
        if path and _is_static_elf(os.path.realpath(path)):
            return os.path.realpath(path)
    raise RunError(f"--init needs a statically linked init on PATH ({', '.join(INIT_CANDIDATES)}; "
                   "Debian's tini package has tini-static)")


def _is_static_elf(path: str) -> bool:
    """An ELF executable without a PT_INTERP program header (no dynamic loader)."""
    import struct
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:         # 64-bit only
                return False
            order = "<" if head[5] == 1 else ">"
            phoff, = struct.unpack_from(order + "Q", head, 32)
            phentsize, phnum = struct.unpack_from(order + "HH", head, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except (OSError, struct.error):
        return False
    PT_INTERP = 3
    return len(table) == phentsize * phnum and all(
        struct.unpack_from(order + "I", table, i * phentsize)[0] != PT_INTERP for i in range(phnum))


# ---- run -----------------------------------------------------------------------------------------


def create_bundle(layers: Sequence[Layer], image_config: dict, settings: RunSettings, *,
                  cache: SnapshotCache, runtime: Runtime, container_id: str,
                  options: ApplyOptions | None = None, use_overlay: bool | None = None) -> Path:
    """CACHE/containers/<id>/ with its rootfs (overlay or copy) and config.json."""
    if not NAME_RE.match(container_id):
        raise RunError(f"invalid container name {container_id!r}")
    parent = containers_dir(cache)
    parent.mkdir(mode=0o700, exist_ok=True)
    new_trees_here(parent)
    bundle = parent / container_id
    if bundle.exists():
        if _runtime_state(runtime, container_id) is not None or containers.describe(bundle) is not None:
            raise RunError(f"container name {container_id!r} is already in use (dockyard rm {container_id})")
        remove_bundle(bundle)  # a half-made bundle, left by a run that was killed
    bundle.mkdir(mode=0o700)
    try:
        snapshot = cache.ensure(layers, options)
        (bundle / "lower").write_text(snapshot.name)   # kept by prune while the bundle lives
        overlay = _overlay_supported() if use_overlay is None else use_overlay
        if not (overlay and mount_overlay(snapshot, bundle)):
            for d in ("rootfs", "upper", "work"):
                if (bundle / d).is_dir() and not os.path.ismount(bundle / d):
                    shutil.rmtree(bundle / d)
            materialize(snapshot, bundle / "rootfs")
        config, files = runtime_config(image_config, bundle / "rootfs", bundle, settings, container_id)
        mode = rootless.current()
        rootless.check_process_user(mode, config)
        rootless.adapt_config(mode, config)
        write_bundle_files(bundle, config, files)
    except BaseException:
        remove_bundle(bundle)
        raise
    return bundle


def containers_dir(cache: SnapshotCache) -> Path:  # (each bundle: puller.runtime.containers)
    return cache.root / "containers"


@os_errors_mapped
def run_container(layers: Sequence[Layer], image_config: dict, settings: RunSettings, *,
                  cache: SnapshotCache, runtime: Runtime, name: str | None = None, remove: bool = False,
                  options: ApplyOptions | None = None, use_overlay: bool | None = None,
                  detach: bool = False, image: str = "") -> int:
    """Create a bundle for this image, run it in the foreground, return its exit
    code (128+n when a signal n ended PID 1, as Docker reports it). With
    `detach`, a shim runs it in the background (puller.runtime.containers)
    and 0 is returned once it runs."""
    container_id = name or uuid.uuid4().hex
    if detach and settings.tty:
        raise RunError("--detach with -t is not supported (there is no attach)")
    if detach and settings.network == "slirp4netns":
        raise RunError("--detach with --network slirp4netns is not supported")
    with contextlib.ExitStack() as network:
        if settings.network == "slirp4netns":
            from puller.runtime.network import slirp_network
            settings = dataclasses.replace(settings, network_path=network.enter_context(slirp_network()))
        bundle = create_bundle(layers, image_config, settings, cache=cache, runtime=runtime,
                               container_id=container_id, options=options, use_overlay=use_overlay)
        runtime.state_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        args = json.loads((bundle / "config.json").read_text())["process"]["args"]
        containers.write_record(bundle, container_id=container_id, image=image, args=args, runtime=runtime,
                                detached=detach, remove=remove)
        if detach:
            try:
                containers.start_detached(bundle, container_id, runtime)
            except BaseException:
                _kill_shim_and_remove(bundle)
                raise
            return 0
        code = 127
        try:
            code = run_bundle(runtime, bundle, container_id, tty=settings.tty)
            return code
        finally:
            # `run` in the foreground deletes its container as it ends: only one
            # it left behind (killed, or failed half way) has a state directory
            # (runc and crun keep <root>/<id>); asking `<runtime> state` every
            # time cost ~15 ms of a ~200 ms `run --rm`
            if (runtime.state_root / container_id).exists() and \
                    _runtime_state(runtime, container_id) is not None:
                subprocess.run(runtime.argv("delete", "--force", container_id), capture_output=True)
            unmount(bundle / "rootfs")
            if remove:
                remove_bundle(bundle)
            else:
                containers.write_exit(bundle, code)


def _kill_shim_and_remove(bundle: Path) -> None:
    pid = containers.shim_alive(bundle)
    if pid is not None:
        os.kill(pid, containers.KILL_SIGNAL)
    remove_bundle(bundle)


def run_bundle(runtime: Runtime, bundle: Path, container_id: str, *, tty: bool,
               stdout=None, stderr=None, translated: dict[int, int] | None = None) -> int:
    """`<runtime> run` in the foreground with signals forwarded (puller.runtime.signals).

    With a terminal (-t) the runtime shares our process group: it reads our
    terminal (in raw mode, so a typed ^C is a byte for the container, not a
    signal). Without one it gets its own process group, so a Ctrl-C at our
    terminal reaches only us and is forwarded once; the container's stdin is
    then ours unless that is a terminal (it could not read it from a
    background group: /dev/null, as `docker run` without -i)."""
    from puller.runtime.signals import forward_signals
    argv = runtime.argv("run", "--bundle", str(bundle), container_id)
    stdin = None
    if not tty and _is_terminal(0):
        stdin = subprocess.DEVNULL
    proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr,
                            process_group=None if tty else 0)
    with forward_signals(lambda sig: runtime.argv("kill", container_id, sig), container_id, proc, tty=tty,
                         translated=translated):
        code = proc.wait()
    return 128 - code if code < 0 else code  # the runtime itself ended by a signal


def _is_terminal(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _runtime_state(runtime: Runtime, container_id: str) -> dict | None:
    proc = subprocess.run(runtime.argv("state", container_id), capture_output=True)
    if proc.returncode != 0:
        return None
    try:
        return json.loads(proc.stdout)
    except ValueError:
        return None
