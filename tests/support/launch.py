"""Processes the tests start and stop: a generic `ServerProcess`, and the
two registries on loopback, Dockyard (`dockyard serve`) and CNCF
Distribution (`docker-registry`).

Both launchers take a YAML settings file as well as flags: `config=` is a
path to a file used as it is, or a mapping written to a file first (for
Distribution, merged over the default test configuration). Flags given
beside it win, as they do on the command line.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

from tests.support import REPO_ROOT
from tests.support.peers import require_tool

ConfigArg = str | os.PathLike | Mapping[str, Any] | None


# ---- ports and readiness ------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(url: str, timeout: float = 2.0, headers: Mapping[str, str] | None = None) -> int:
    """Status of a GET to url, 4xx and 5xx included; OSError when nothing answers."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_for_http(url: str, timeout: float = 20.0, proc: subprocess.Popen | None = None,
                  ok: Sequence[int] | None = None) -> int:
    """Wait until url answers over HTTP (any status, or one of `ok`).

    RuntimeError as soon as `proc` exits; TimeoutError after `timeout`.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            status = http_status(url, timeout=1.0)
            if ok is None or status in ok:
                return status
            last = f"HTTP {status}"
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s (last: {last})")


# ---- a server process ---------------------------------------------------------

class ServerProcess:
    """A child process serving something: started, waited for, logged, stopped.

    Its stdout and stderr go to a log file, readable with `log()` during
    the test and after it fails. The child leads a process group of its own;
    `stop()` sends SIGTERM to the group, SIGKILL after `grace` seconds, and
    SIGKILL once more for children that outlived their leader (workers).
    """

    def __init__(self, argv: Sequence[str], *, ready_url: str | None = None,
                 ready_check: Callable[[], bool] | None = None, env: Mapping[str, str] | None = None,
                 cwd: str | Path | None = None, log_path: str | Path | None = None,
                 name: str | None = None, grace: float = 10.0):
        self.argv = [str(a) for a in argv]
        self.ready_url = ready_url
        self.ready_check = ready_check      # alternative to ready_url
        self.env = {**os.environ, **(env or {})}
        self.cwd = str(cwd) if cwd else None
        self.name = name or Path(self.argv[0]).name
        self.grace = grace
        # A log this object created is removed by stop(); its text stays readable through log().
        self._own_log = log_path is None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix=f"dy-{self.name}-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self._kept_log: str | None = None
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "ServerProcess":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        try:
            if self.ready_url:
                wait_for_http(self.ready_url, timeout, proc=self.proc)
            elif self.ready_check:
                deadline = time.monotonic() + timeout
                while not self.ready_check():
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"exited with {self.proc.returncode}")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"not ready within {timeout:.0f}s")
                    time.sleep(0.1)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{self.name} did not start: {exc}\n"
                               f"command: {' '.join(self.argv)}\n--- log ---\n{self.log()[-6000:]}"
                               ) from None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        if self._kept_log is not None:
            return self._kept_log
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> int | None:
        """Stop the process group; the leader's exit code (None if never started)."""
        if self.proc is None:
            self._drop_own_log()
            return None
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(self.grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(10)
        self._signal(signal.SIGKILL)
        self._drop_own_log()
        return self.proc.returncode

    def _drop_own_log(self) -> None:
        if self._own_log and self._kept_log is None:
            self._kept_log = self.log()
            self.log_path.unlink(missing_ok=True)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "ServerProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- registries under test ----------------------------------------------------

@dataclass
class RegistryServer:
    """A registry running on loopback: Dockyard or CNCF Distribution."""
    kind: str                   # "dockyard" | "distribution"
    host: str                   # "127.0.0.1:PORT", as clients write it in references
    storage: Path               # its storage root
    server: ServerProcess = field(repr=False)
    config: Path | None = None  # the settings file it was started with, if any

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def log(self) -> str:
        return self.server.log()

    def stop(self) -> None:
        self.server.stop()


def _load_config(config: ConfigArg) -> dict:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    return yaml.safe_load(Path(config).read_text()) or {}


def _merged(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict:
    """base with extra laid over it, mappings merged key by key."""
    out = copy.deepcopy(dict(base))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _config_file(config: ConfigArg, directory: Path, name: str) -> Path | None:
    """The settings file to pass: the given file, or the mapping written as YAML."""
    if config is None:
        return None
    if isinstance(config, Mapping):
        path = directory / name
        path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        return path
    return Path(config)


def _dig(config: Mapping[str, Any], *keys: str) -> Any:
    node: Any = config
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def dockyard_command() -> list[str]:
    """How to run `dockyard` from this checkout, installed or not."""
    return [sys.executable, "-m", "puller"]


def launch_dockyard(storage: str | Path | None = None, *, port: int | None = None,
                    workers: int | None = None, extra_args: Iterable[str] = (),
                    env: Mapping[str, str] | None = None, log_path: str | Path | None = None,
                    config: ConfigArg = None, timeout: float = 30.0) -> RegistryServer:
    """Start `dockyard serve` on loopback and wait until /v2/ answers.

    `storage` becomes `--storage`; `config` a `--config` file (a path, or a
    mapping of settings written next to the storage root). What the file
    leaves unset comes from flags: 127.0.0.1, a free port, and `storage`,
    which is required unless the file names `storage.root`.
    """
    settings = _load_config(config)
    host = _dig(settings, "http", "host")
    port = port or _dig(settings, "http", "port") or free_port()
    root = storage if storage is not None else _dig(settings, "storage", "root")
    if root is None:
        raise ValueError("launch_dockyard needs a storage root (storage= or storage.root in config)")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    config_path = _config_file(config, root.parent, f"dockyard-{root.name}.yml")

    argv = [*dockyard_command(), "serve"]
    if config_path is not None:
        argv += ["--config", str(config_path)]
    if host is None:
        argv += ["--host", "127.0.0.1"]
    argv += ["--port", str(port)]
    if storage is not None:
        argv += ["--storage", str(root)]
    if workers is not None:
        argv += ["--workers", str(workers)]
    argv += list(extra_args)
    child_env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                 "PYTHONUNBUFFERED": "1", **(env or {})}
    ready_host = "127.0.0.1" if host in (None, "0.0.0.0", "") else host
    server = ServerProcess(argv, ready_url=f"http://{ready_host}:{port}/v2/", env=child_env,
                           cwd=REPO_ROOT, log_path=log_path, name="dockyard")
    server.start(timeout)
    return RegistryServer("dockyard", f"{ready_host}:{port}", root, server, config_path)


def distribution_config(root: str | Path, port: int, log_level: str = "warn") -> dict:
    """The CNCF Distribution settings the tests use: filesystem storage under
    root, deletes on, no upload purging, loopback only."""
    return {
        "version": "0.1",
        "log": {"level": log_level, "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"127.0.0.1:{port}", "headers": {"X-Content-Type-Options": ["nosniff"]}},
    }


def launch_distribution(workdir: str | Path, *, port: int | None = None, log_level: str = "warn",
                        auth: str | Mapping[str, Any] | None = None, config: ConfigArg = None,
                        env: Mapping[str, str] | None = None, timeout: float = 30.0) -> RegistryServer:
    """Start CNCF Distribution (`docker-registry`, Debian's package) with its
    files under workdir and wait until /v2/ answers.

    `auth` is the `auth:` section: a mapping, or YAML text indented by two
    spaces (`"  htpasswd:\\n    realm: r\\n    path: /f\\n"`). `config` is a
    file used as it is (its `http.addr` says where it listens), or a mapping
    merged over `distribution_config()`. `env`: variables set (over this
    process's) for it.
    """
    binary = require_tool("docker-registry")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if config is not None and not isinstance(config, Mapping):
        path = Path(config)
        settings = _load_config(path)
        addr = _dig(settings, "http", "addr") or ":5000"
        address, _, port_text = addr.rpartition(":")
        listen = f"{address or '127.0.0.1'}:{port_text}"
        root = Path(_dig(settings, "storage", "filesystem", "rootdirectory") or workdir / "storage")
    else:
        port = port or free_port()
        root = workdir / "storage"
        root.mkdir(parents=True, exist_ok=True)
        settings = distribution_config(root, port, log_level)
        if auth is not None:
            section = auth if isinstance(auth, Mapping) else yaml.safe_load(f"auth:\n{auth}")["auth"]
            settings["auth"] = copy.deepcopy(dict(section))
        settings = _merged(settings, config or {})
        listen = settings["http"]["addr"]
        root = Path(_dig(settings, "storage", "filesystem", "rootdirectory") or root)
        path = workdir / "config.yml"
        path.write_text(yaml.safe_dump(settings, sort_keys=False))
    server = ServerProcess([binary, "serve", str(path)], ready_url=f"http://{listen}/v2/", env=env,
                           log_path=workdir / "registry.log", name="docker-registry")
    server.start(timeout)
    return RegistryServer("distribution", listen, root, server, path)
