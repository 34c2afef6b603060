"""Fixtures shared by every test folder: registries (Dockyard, CNCF
Distribution) on loopback, a private Docker daemon, podman and skopeo.

Fixture names are a contract for the other rooms' tests: add, do not rename.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import helpers` from any test folder

from helpers import (  # noqa: E402
    RegistryServer,
    ServerProcess,
    docker_ping,
    launch_distribution,
    launch_dockyard,
    missing_peer,
    require_root,
    require_tool,
    run,
)


# ---- registries ---------------------------------------------------------------

@pytest.fixture(scope="session")
def dockyard_registry(tmp_path_factory) -> RegistryServer:
    """One Dockyard for the session: `.url`, `.host` ("127.0.0.1:PORT"), `.storage`.

    Shared by many tests: use repository names unique to your test.
    """
    server = launch_dockyard(tmp_path_factory.mktemp("dockyard-storage"),
                             log_path=tmp_path_factory.mktemp("dockyard-log") / "dockyard.log")
    yield server
    server.stop()


@pytest.fixture
def start_dockyard(tmp_path_factory) -> Callable[..., RegistryServer]:
    """Factory: start_dockyard(storage=None, workers=None, extra_args=(), env=None, port=None)
    starts a private Dockyard (own storage unless given) stopped after the test."""
    started: list[RegistryServer] = []

    def start(storage=None, **opts) -> RegistryServer:
        storage = storage or tmp_path_factory.mktemp("dockyard-own")
        opts.setdefault("log_path", tmp_path_factory.mktemp("dockyard-log") / "dockyard.log")
        server = launch_dockyard(storage, **opts)
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture(scope="session")
def distribution_registry(tmp_path_factory) -> RegistryServer:
    """CNCF Distribution 2.8 (`docker-registry`) on loopback, filesystem storage, delete enabled."""
    server = launch_distribution(tmp_path_factory.mktemp("distribution"))
    yield server
    server.stop()


# ---- docker ---------------------------------------------------------------------

@dataclass
class DockerDaemon:
    """A private dockerd; `.run("push", ref)` drives it with the docker CLI."""
    cli: str
    socket_path: Path
    data_root: Path
    exec_root: Path
    server: ServerProcess = field(repr=False)

    @property
    def env(self) -> dict[str, str]:
        return {"DOCKER_HOST": f"unix://{self.socket_path}",
                "DOCKER_CONFIG": str(self.data_root.parent / "client-config"),
                "DOCKER_BUILDKIT": "0"}

    def run(self, *args: str, timeout: float = 300, check: bool = True,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        return run([self.cli, *args], env=self.env, timeout=timeout, check=check, input=input)

    @property
    def containerd_socket(self) -> Path:
        """The containerd this dockerd started for itself (or the system one it joined)."""
        own = self.exec_root / "containerd" / "containerd.sock"
        return own if own.exists() else Path("/run/containerd/containerd.sock")

    def ctr(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        """containerd's own CLI on that socket, in a namespace of its own (not docker's "moby")."""
        return run([require_tool("ctr"), "--address", str(self.containerd_socket),
                    "--namespace", "dockyard-tests", *args], timeout=timeout, check=check)


def _docker_cli(dockerd: str) -> str:
    # Prefer the CLI shipped next to the daemon (same package, same API version).
    sibling = Path(dockerd).resolve().parent.parent / "bin" / "docker"
    if sibling.is_file():
        return str(sibling)
    return require_tool("docker")


def _unmount_under(path: Path) -> None:
    """Lazily unmount whatever a stopped daemon left mounted below path (deepest first)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    prefix = str(path.resolve())
    targets = [line.split()[1] for line in mounts if len(line.split()) > 1]
    for target in sorted((t for t in targets if t == prefix or t.startswith(prefix + "/")),
                         key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory) -> DockerDaemon:
    """A session-scoped private Docker daemon (no bridge, no iptables), trusting
    plain-HTTP registries on 127.0.0.0/8."""
    require_root()
    daemon = require_tool("dockerd")
    cli = _docker_cli(daemon)
    base = tmp_path_factory.mktemp("dockerd")
    data_root = base / "data"
    data_root.mkdir()
    (base / "client-config").mkdir()
    # exec-root holds unix sockets: keep its path short (108-byte limit)
    exec_root = Path(tempfile.mkdtemp(prefix="dy-exec-", dir="/tmp"))
    socket_path = base / "docker.sock"
    if len(str(socket_path)) > 100:
        socket_path = exec_root / "docker.sock"
    argv = [daemon, "--data-root", str(data_root), "--exec-root", str(exec_root),
            "-H", f"unix://{socket_path}", "--pidfile", str(base / "docker.pid"),
            "--bridge=none", "--iptables=false", "--ip-masq=false", "--ip-forward=false",
            "--insecure-registry", "127.0.0.0/8", "--userland-proxy=false"]
    server = ServerProcess(argv, ready_check=lambda: docker_ping(socket_path),
                           log_path=base / "dockerd.log", name="dockerd", grace=20)
    try:
        server.start(timeout=60)
    except RuntimeError as exc:
        missing_peer(f"dockerd did not start: {exc}")
    helper = DockerDaemon(cli, socket_path, data_root, exec_root, server)
    yield helper
    # remove containers first so the daemon releases their mounts
    try:
        ids = helper.run("ps", "-aq", timeout=30, check=False).stdout.split()
        if ids:
            helper.run("rm", "-f", *ids, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        pass
    server.stop()
    _unmount_under(exec_root)
    _unmount_under(data_root)
    shutil.rmtree(exec_root, ignore_errors=True)


# ---- podman and skopeo ----------------------------------------------------------

@dataclass
class Podman:
    """podman as root with private storage; loopback registries without TLS."""
    binary: str
    root: Path
    runroot: Path
    policy: Path            # our own signature policy: accept anything (test images are unsigned)

    def base_args(self) -> list[str]:
        return [self.binary, "--root", str(self.root), "--runroot", str(self.runroot),
                "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return run([*self.base_args(), *args], timeout=timeout, check=check,
                   env={"REGISTRY_AUTH_FILE": str(self.root.parent / "auth.json")})

    def push(self, source: str, dest: str, *extra: str) -> subprocess.CompletedProcess:
        return self.run("push", "--tls-verify=false", "--signature-policy", str(self.policy),
                        *extra, source, dest)

    def pull(self, ref: str, *extra: str) -> subprocess.CompletedProcess:
        return self.run("pull", "--tls-verify=false", "--signature-policy", str(self.policy), *extra, ref)


@pytest.fixture(scope="session")
def podman(tmp_path_factory) -> Podman:
    require_root()
    binary = require_tool("podman")
    base = tmp_path_factory.mktemp("podman")
    # runroot holds sockets and locks: short path
    runroot = Path(tempfile.mkdtemp(prefix="dy-podrun-", dir="/tmp"))
    helper = Podman(binary, base / "root", runroot, base / "policy.json")
    helper.policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    (base / "auth.json").write_text('{"auths": {}}')
    yield helper
    subprocess.run([*helper.base_args(), "system", "reset", "--force"], capture_output=True, timeout=120,
                   stdin=subprocess.DEVNULL)
    _unmount_under(base)
    _unmount_under(runroot)
    shutil.rmtree(runroot, ignore_errors=True)


@dataclass
class Skopeo:
    """skopeo with TLS verification off (loopback registries speak plain HTTP)."""
    binary: str
    policy: Path

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return run([self.binary, "--policy", str(self.policy), *args], timeout=timeout, check=check)

    def copy(self, src: str, dest: str, *extra: str, timeout: float = 300,
             check: bool = True) -> subprocess.CompletedProcess:
        return self.run("copy", "--src-tls-verify=false", "--dest-tls-verify=false", *extra,
                        src, dest, timeout=timeout, check=check)

    def inspect(self, ref: str, *extra: str) -> subprocess.CompletedProcess:
        return self.run("inspect", "--tls-verify=false", *extra, ref)


@pytest.fixture(scope="session")
def skopeo(tmp_path_factory) -> Skopeo:
    binary = require_tool("skopeo")
    policy = tmp_path_factory.mktemp("skopeo") / "policy.json"
    policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    return Skopeo(binary, policy)


def pytest_report_header(config) -> str:
    from helpers import interop_required
    return f"dockyard: interop peers {'REQUIRED' if interop_required() else 'optional (skip when missing)'}"
