"""The real peers the tests drive (docker, podman, skopeo, umoci, runc,
crun, CNCF Distribution): finding them, running them, and small helpers
around the Docker daemon, podman and skopeo.

A missing peer skips the test on a developer's machine and fails it where
DOCKYARD_REQUIRE_INTEROP=1 (CI), so a CI image that lost a tool cannot pass
by skipping.
"""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import pytest

if TYPE_CHECKING:
    from tests.support.launch import ServerProcess

INTEROP_ENV = "DOCKYARD_REQUIRE_INTEROP"


def interop_required() -> bool:
    """True when a missing peer must fail the test instead of skipping it."""
    return os.environ.get(INTEROP_ENV, "") not in ("", "0", "false", "no")


def missing_peer(reason: str) -> None:
    """Fail (DOCKYARD_REQUIRE_INTEROP=1) or skip the running test."""
    if interop_required():
        pytest.fail(f"{reason} ({INTEROP_ENV}=1)", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """Absolute path of the peer tool `name` (PATH, then the sbin/bin
    directories a root shell would search), or fail/skip the test."""
    path = shutil.which(name)
    if path is None:
        for directory in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
            candidate = Path(directory) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                path = str(candidate)
                break
    if path is None:
        missing_peer(f"peer tool {name!r} is not installed")
    return path


def require_module(name: str):
    """Import a peer client library (e.g. `oras`), or fail/skip the test."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing_peer(f"python module {name!r} is not installed")


def require_root() -> None:
    if os.geteuid() != 0:
        missing_peer("needs root")


def busybox_path() -> str:
    """The statically linked busybox (busybox-static), which runs in an empty rootfs."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        if not Path(candidate).is_file():
            continue
        if not shutil.which("file"):
            return candidate
        described = subprocess.run(["file", "-L", candidate], capture_output=True, text=True).stdout
        if "statically linked" in described or "static-pie" in described:
            return candidate
    missing_peer("busybox-static is not installed")
    raise AssertionError("unreachable")


def busybox_layer(applets: Sequence[str] = ("sh", "cat", "echo", "uname"),
                  files: Mapping[str, bytes] | None = None) -> bytes:
    """A gzip layer with a static /bin/busybox, /bin/APPLET -> busybox for
    each applet, and `files` ({path: bytes}, mode 0644): a runnable image."""
    import io
    import tarfile

    from tests.support.content import gzip_bytes

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        directory = tarfile.TarInfo("bin")
        directory.type, directory.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(directory)
        data = Path(busybox_path()).read_bytes()
        binary = tarfile.TarInfo("bin/busybox")
        binary.size, binary.mode = len(data), 0o755
        tar.addfile(binary, io.BytesIO(data))
        for applet in applets:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        for path, content in (files or {}).items():
            entry = tarfile.TarInfo(path)
            entry.size, entry.mode = len(content), 0o644
            tar.addfile(entry, io.BytesIO(content))
    return gzip_bytes(buf.getvalue())


def run(argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 300,
        check: bool = True, input: bytes | None = None, cwd: str | Path | None = None
        ) -> subprocess.CompletedProcess:
    """Run a command with its output captured as text. `env` is added to
    the current environment. With `check`, a non-zero exit raises an
    AssertionError that shows the command and the tail of both streams."""
    full_env = None if env is None else {**os.environ, **env}
    proc = subprocess.run([str(a) for a in argv], env=full_env, capture_output=True,
                          timeout=timeout, input=input, cwd=cwd,
                          stdin=None if input is not None else subprocess.DEVNULL)
    proc.stdout = proc.stdout.decode(errors="replace")
    proc.stderr = proc.stderr.decode(errors="replace")
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(map(str, argv))}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


# ---- docker -------------------------------------------------------------------

def docker_ping(socket_path: str | Path) -> bool:
    """True once a Docker daemon answers GET /_ping on its unix socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(str(socket_path))
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in sock.recv(256)
    except OSError:
        return False


def docker_cli_for(dockerd: str) -> str:
    """The docker CLI shipped beside this daemon (same package, same API
    version), else the one on PATH."""
    sibling = Path(dockerd).resolve().parent.parent / "bin" / "docker"
    if sibling.is_file():
        return str(sibling)
    return require_tool("docker")


def unmount_under(path: Path) -> None:
    """Lazily unmount whatever is still mounted at or below path, deepest first
    (what a stopped daemon may leave behind)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    prefix = str(path.resolve())
    targets = [fields[1] for fields in (line.split() for line in mounts) if len(fields) > 1]
    below = [t for t in targets if t == prefix or t.startswith(prefix + "/")]
    for target in sorted(below, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)


@dataclass
class DockerDaemon:
    """A private dockerd; `.run("push", ref)` drives it with the docker CLI."""
    cli: str
    socket_path: Path
    data_root: Path
    exec_root: Path
    server: "ServerProcess" = field(repr=False)

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


def start_docker_daemon(base: Path, extra_args: Sequence[str] = ()) -> DockerDaemon:
    """A private dockerd with its state under `base`: no bridge, no iptables,
    plain HTTP allowed to registries on 127.0.0.0/8 (`extra_args`: more
    dockerd flags, e.g. --registry-mirror). Stop it with `stop_docker_daemon`."""
    from tests.support.launch import ServerProcess

    require_root()
    daemon = require_tool("dockerd")
    cli = docker_cli_for(daemon)
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
            "--insecure-registry", "127.0.0.0/8", "--userland-proxy=false", *extra_args]
    server = ServerProcess(argv, ready_check=lambda: docker_ping(socket_path),
                           log_path=base / "dockerd.log", name="dockerd", grace=20)
    try:
        server.start(timeout=60)
    except RuntimeError as exc:
        shutil.rmtree(exec_root, ignore_errors=True)
        missing_peer(f"dockerd did not start: {exc}")
    return DockerDaemon(cli, socket_path, data_root, exec_root, server)


def stop_docker_daemon(daemon: DockerDaemon) -> None:
    """Remove its containers (so it releases their mounts), stop it, clean up."""
    try:
        ids = daemon.run("ps", "-aq", timeout=30, check=False).stdout.split()
        if ids:
            daemon.run("rm", "-f", *ids, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        pass
    daemon.server.stop()
    unmount_under(daemon.exec_root)
    unmount_under(daemon.data_root)
    shutil.rmtree(daemon.exec_root, ignore_errors=True)


def build_busybox_image(docker, tag: str, *, run_step: str | None = "echo hello > /hello.txt",
                        extra_files: Mapping[str, bytes] | None = None,
                        workdir: str | Path | None = None) -> str:
    """Build `tag` FROM scratch with /bin/busybox (busybox-static) and its applets.

    `docker` is a DockerDaemon (anything with `.run(*args)`). The RUN step
    (default: write /hello.txt) adds a second layer. Returns the image ID.
    """
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="dy-build-") as tmp:
            return build_busybox_image(docker, tag, run_step=run_step, extra_files=extra_files,
                                       workdir=tmp)
    context = Path(workdir)
    context.mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox_path(), context / "busybox")
    lines = ["FROM scratch", "COPY busybox /bin/busybox",
             'RUN ["/bin/busybox", "--install", "-s", "/bin"]']
    for name, data in (extra_files or {}).items():
        relative = name.strip("/")
        target = context / "files" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        lines.append(f"COPY files/{relative} /{relative}")
    if run_step:
        lines.append(f"RUN {run_step}")
    lines.append('CMD ["/bin/sh"]')
    (context / "Dockerfile").write_text("\n".join(lines) + "\n")
    docker.run("build", "-q", "-t", tag, str(context), timeout=300)
    return docker.run("image", "inspect", "-f", "{{.Id}}", tag).stdout.strip()


# ---- podman and skopeo ----------------------------------------------------------

ACCEPT_ANYTHING_POLICY = '{"default": [{"type": "insecureAcceptAnything"}]}'


@dataclass
class Podman:
    """podman as root with private storage; loopback registries without TLS."""
    binary: str
    root: Path
    runroot: Path
    policy: Path            # our own signature policy: accept anything (test images are unsigned)

    def base_args(self) -> list[str]:
        # --tmpdir: libpod's state (default /run/libpod) is private too, so a
        # `system reset` of one podman cannot pull it from under another's run
        return [self.binary, "--root", str(self.root), "--runroot", str(self.runroot),
                "--tmpdir", str(self.runroot / "libpod"),
                "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return run([*self.base_args(), *args], timeout=timeout, check=check,
                   env={"REGISTRY_AUTH_FILE": str(self.root.parent / "auth.json")})

    def push(self, source: str, dest: str, *extra: str) -> subprocess.CompletedProcess:
        return self.run("push", "--tls-verify=false", "--signature-policy", str(self.policy),
                        *extra, source, dest)

    def pull(self, ref: str, *extra: str) -> subprocess.CompletedProcess:
        return self.run("pull", "--tls-verify=false", "--signature-policy", str(self.policy), *extra, ref)

    def reset(self) -> None:
        """Drop every image and container (`podman system reset`), unmount leftovers."""
        subprocess.run([*self.base_args(), "system", "reset", "--force"], capture_output=True,
                       timeout=120, stdin=subprocess.DEVNULL)
        unmount_under(self.root.parent)
        unmount_under(self.runroot)


def make_podman(base: Path) -> Podman:
    """podman with its storage under `base` and a short runroot in /tmp
    (it holds sockets and locks). `reset()` it, then remove `runroot`."""
    require_root()
    binary = require_tool("podman")
    runroot = Path(tempfile.mkdtemp(prefix="dy-podrun-", dir="/tmp"))
    helper = Podman(binary, base / "root", runroot, base / "policy.json")
    helper.policy.write_text(ACCEPT_ANYTHING_POLICY)
    (base / "auth.json").write_text('{"auths": {}}')
    return helper


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


def make_skopeo(directory: Path) -> Skopeo:
    """skopeo with an accept-anything signature policy kept in `directory`."""
    binary = require_tool("skopeo")
    policy = directory / "policy.json"
    policy.write_text(ACCEPT_ANYTHING_POLICY)
    return Skopeo(binary, policy)


# ---- CNCF Distribution (docker-registry) ---------------------------------------------

def distribution_s3_storage(endpoint: str, bucket: str, prefix: str, access_key: str, secret_key: str,
                            region: str = "us-east-1") -> dict:
    """Distribution 2.8's `storage:` section for an S3 endpoint on loopback:
    its keys are `<prefix>/docker/registry/v2/...`, as Dockyard's S3 driver
    with `storage.s3.prefix: <prefix>` writes them (2.8 addresses an
    endpoint it is given path-style)."""
    return {
        "s3": {"accesskey": access_key, "secretkey": secret_key, "region": region,
               "regionendpoint": endpoint, "bucket": bucket, "rootdirectory": f"/{prefix.strip('/')}",
               "secure": False, "v4auth": True},
        "delete": {"enabled": True},
        "cache": {"blobdescriptor": "inmemory"},
        "maintenance": {"uploadpurging": {"enabled": False}},
    }


def distribution_garbage_collect(config: str | Path, *, timeout: float = 300) -> subprocess.CompletedProcess:
    """`docker-registry garbage-collect --dry-run CONFIG` (deletes nothing);
    its exit code is the caller's to check."""
    return run([require_tool("docker-registry"), "garbage-collect", "--dry-run", str(config)],
               timeout=timeout, check=False)
