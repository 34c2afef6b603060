"""Containers started by `dockyard run`, found again by `ps`, `logs`, `stop`
and `rm`: each is its bundle under CACHE/containers/<id>/ with

    dockyard.json   what was started (image, command, runtime, created, detached, --rm)
    shim.pid        a detached container's shim (below)
    container.log   a detached container's stdout and stderr
    exit.json       its exit code once it ended (128+n for a signal n)

A detached container (`run --detach`) is run by a shim: `python -m
puller.runtime.shim BUNDLE`, in a session of its own, with `<runtime> run`
in the foreground under it, as `dockyard run` does. It outlives the command
that started it, keeps the exit code and, for --rm, removes the bundle.
There is no daemon: the shim is the container's only keeper, and it is
reached by signals (its user owns it, also when rootless): SIGTERM and the
other forwarded signals go on to PID 1, SIGUSR2 becomes SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from puller.runtime.errors import RunError

RECORD, EXIT, LOG, SHIM_PID = "dockyard.json", "exit.json", "container.log", "shim.pid"
KILL_SIGNAL = signal.SIGUSR2        # what a shim turns into SIGKILL for its container
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class Container:
    id: str
    bundle: Path
    image: str
    command: list[str]
    created: float
    detached: bool
    status: str                 # running | exited | created
    exit_code: int | None

    def to_json(self) -> dict:
        return {"id": self.id, "image": self.image, "command": self.command,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
                "status": self.status, "exit_code": self.exit_code, "detached": self.detached,
                "bundle": str(self.bundle)}


def _write_json(path: Path, document: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document))
    os.rename(tmp, path)       # a reader sees the old record or the new one, never half


def _read_json(path: Path) -> dict | None:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def write_record(bundle: Path, *, container_id: str, image: str, args: list[str], runtime, detached: bool,
                 remove: bool) -> None:
    _write_json(bundle / RECORD, {
        "id": container_id, "image": image, "command": args, "created": time.time(), "detached": detached,
        "remove": remove, "runtime": {"name": runtime.name, "path": runtime.path,
                                      "state_root": str(runtime.state_root), "rootless": runtime.rootless}})


def write_exit(bundle: Path, code: int) -> None:
    _write_json(bundle / EXIT, {"code": code, "finished": time.time()})


def runtime_of(record: dict):
    from puller.runtime.run import Runtime
    r = record["runtime"]
    return Runtime(r["name"], r["path"], Path(r["state_root"]), rootless=bool(r.get("rootless")))


def shim_alive(bundle: Path) -> int | None:
    """The pid of the bundle's shim if it still runs (checked by its command line, not only the pid)."""
    try:
        pid = int((bundle / SHIM_PID).read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if b"puller.runtime.shim" in cmdline and os.fsencode(str(bundle)) in cmdline else None


def describe(bundle: Path) -> Container | None:
    record = _read_json(bundle / RECORD)
    if record is None or not isinstance(record.get("id"), str):
        return None
    ended = _read_json(bundle / EXIT)
    if ended is not None:
        status, code = "exited", ended.get("code")
    elif record.get("detached") and shim_alive(bundle):
        status, code = "running", None
    elif not record.get("detached") and _foreground_alive(record):
        status, code = "running", None
    else:
        status, code = "created", None
    return Container(record["id"], bundle, str(record.get("image", "")), list(record.get("command") or []),
                     float(record.get("created") or 0), bool(record.get("detached")), status, code)


def _foreground_alive(record: dict) -> bool:
    from puller.runtime.run import _runtime_state
    state = _runtime_state(runtime_of(record), record["id"])
    return state is not None and state.get("status") in ("running", "created", "paused")


def list_containers(containers: Path) -> list[Container]:
    try:
        bundles = sorted(p for p in containers.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []
    found = [c for c in map(describe, bundles) if c is not None]
    return sorted(found, key=lambda c: c.created, reverse=True)


def find(containers: Path, name: str) -> Container:
    """By name (the ID) or a unique prefix of it, as docker takes them."""
    listed = list_containers(containers)
    exact = [c for c in listed if c.id == name]
    matches = exact or ([c for c in listed if c.id.startswith(name)] if name else [])
    if not matches:
        raise RunError(f"no such container: {name}")
    if len(matches) > 1:
        raise RunError(f"container name {name!r} is ambiguous ({len(matches)} match)")
    return matches[0]


# ---- detached runs ---------------------------------------------------------------------------------


def start_detached(bundle: Path, container_id: str, runtime) -> None:
    """Start the shim for a prepared bundle; return once the container runs (or already ended)."""
    log = os.open(bundle / LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        shim = subprocess.Popen([sys.executable, "-m", "puller.runtime.shim", str(bundle)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                                    _source_root(), os.environ.get("PYTHONPATH")]))})
    finally:
        os.close(log)
    (bundle / SHIM_PID).write_text(str(shim.pid))
    from puller.runtime.run import _runtime_state
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if (bundle / EXIT).exists() or shim.poll() is not None:
            return
        state = _runtime_state(runtime, container_id)
        if state is not None and state.get("status") == "running":
            return
        time.sleep(0.02)
    raise RunError(f"container {container_id} did not start within {START_TIMEOUT:.0f} s "
                   f"(see {bundle / LOG})")


def _source_root() -> str:
    """Where this package is imported from, so the shim imports the same code."""
    return str(Path(__file__).resolve().parents[2])


def shim_main(bundle: Path) -> int:
    from puller.runtime.run import remove_bundle, run_bundle, _runtime_state, unmount
    record = _read_json(bundle / RECORD)
    if record is None:
        print(f"dockyard shim: no {RECORD} in {bundle}", file=sys.stderr)
        return 1
    runtime = runtime_of(record)
    container_id = record["id"]
    code = 127
    try:
        code = run_bundle(runtime, bundle, container_id, tty=False, translated={KILL_SIGNAL: signal.SIGKILL})
    finally:
        if _runtime_state(runtime, container_id) is not None:
            subprocess.run(runtime.argv("delete", "--force", container_id), capture_output=True)
        unmount(bundle / "rootfs")
        if record.get("remove"):
            remove_bundle(bundle)
        else:
            write_exit(bundle, code)
    return 0


# ---- stop / rm -------------------------------------------------------------------------------------


def stop(container: Container, timeout: float) -> None:
    """SIGTERM to PID 1, then after `timeout` seconds SIGKILL (as `docker stop -t`)."""
    if container.status != "running":
        return
    if container.detached:
        pid = shim_alive(container.bundle)
        if pid is None:
            return
        _signal(pid, signal.SIGTERM)
        if not _wait_gone(container, timeout):
            _signal(pid, KILL_SIGNAL)
            if not _wait_gone(container, 10):
                raise RunError(f"container {container.id} did not stop")
        return
    record = _read_json(container.bundle / RECORD) or {}
    runtime = runtime_of(record)
    subprocess.run(runtime.argv("kill", container.id, "TERM"), capture_output=True)
    if not _wait_gone(container, timeout):
        subprocess.run(runtime.argv("kill", container.id, "KILL"), capture_output=True)
        _wait_gone(container, 10)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _wait_gone(container: Container, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        now = describe(container.bundle)
        if now is None or now.status != "running":
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def remove(container: Container, force: bool) -> None:
    from puller.runtime.run import remove_bundle
    if container.status == "running":
        if not force:
            raise RunError(f"container {container.id} is running: stop it first, or use rm -f")
        stop(container, 0)
    remove_bundle(container.bundle)
