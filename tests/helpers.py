"""Shared test helpers: peer tools, ports, server processes, test images.

Used by the fixtures in `tests/conftest.py`, by test files of every room and
by the benchmarks. Names here are a contract for the other test folders:
add, do not rename.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
INTEROP_ENV = "DOCKYARD_REQUIRE_INTEROP"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
# What a modern client sends when it GETs a manifest.
MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))


# ---- peer tools ------------------------------------------------------------

def interop_required() -> bool:
    """True when a missing peer tool must fail the test instead of skipping it."""
    return os.environ.get(INTEROP_ENV, "") not in ("", "0", "false", "no")


def missing_peer(reason: str) -> None:
    """Fail (CI, DOCKYARD_REQUIRE_INTEROP=1) or skip (a developer's laptop)."""
    if interop_required():
        pytest.fail(f"{reason} ({INTEROP_ENV}=1)", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """Absolute path of the peer tool `name`, or fail/skip the test."""
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
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError:
        missing_peer(f"python module {name!r} is not installed")


def require_root() -> None:
    if os.geteuid() != 0:
        missing_peer("needs root")


def busybox_path() -> str:
    """The statically linked busybox (busybox-static): runs in an empty rootfs."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        if Path(candidate).is_file():
            out = subprocess.run(["file", "-L", candidate], capture_output=True, text=True) \
                if shutil.which("file") else None
            if out is None or "statically linked" in out.stdout or "static-pie" in out.stdout:
                return candidate
    missing_peer("busybox-static is not installed")
    raise AssertionError("unreachable")


# ---- processes and ports -----------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 free at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(url: str, timeout: float = 2.0, headers: Mapping[str, str] | None = None) -> int:
    """HTTP status of a GET to url (4xx/5xx included); raises OSError when nothing answers."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_for_http(url: str, timeout: float = 20.0, proc: subprocess.Popen | None = None,
                  ok: Sequence[int] | None = None) -> int:
    """Wait until url answers over HTTP (any status, or one of `ok`).

    Stops early with RuntimeError when `proc` exits; TimeoutError after `timeout`.
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


def run(argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 300,
        check: bool = True, input: bytes | None = None, cwd: str | Path | None = None
        ) -> subprocess.CompletedProcess:
    """Run a command, capture text output; on failure raise with both streams shown."""
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


class ServerProcess:
    """A subprocess serving something: started, waited for, logged, stopped.

    The log (stdout+stderr) goes to a file so it can be read after a failure.
    `stop()` sends SIGTERM to the process group, then SIGKILL after `grace`.
    """

    def __init__(self, argv: Sequence[str], *, ready_url: str | None = None,
                 ready_check=None, env: Mapping[str, str] | None = None,
                 cwd: str | Path | None = None, log_path: str | Path | None = None,
                 name: str | None = None, grace: float = 10.0):
        self.argv = [str(a) for a in argv]
        self.ready_url = ready_url
        self.ready_check = ready_check      # callable() -> bool, alternative to ready_url
        self.env = {**os.environ, **(env or {})}
        self.cwd = str(cwd) if cwd else None
        self.name = name or Path(self.argv[0]).name
        self.grace = grace
        # a log we made ourselves is removed at stop(); its text stays readable via log()
        self._own_log = log_path is None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix=f"dy-{self.name}-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self._kept_log: str | None = None
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "ServerProcess":
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            log.close()
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
        """SIGTERM the process group, SIGKILL after the grace period; returns the exit code."""
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
        # children that outlived the leader (e.g. worker processes)
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
    """A running registry on loopback: Dockyard or CNCF Distribution."""
    kind: str                   # "dockyard" | "distribution"
    host: str                   # "127.0.0.1:PORT", as clients write it in references
    storage: Path               # its storage root
    server: ServerProcess = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def log(self) -> str:
        return self.server.log()

    def stop(self) -> None:
        self.server.stop()


def dockyard_command() -> list[str]:
    """How to run `dockyard` from this checkout, installed or not."""
    return [sys.executable, "-m", "puller"]


def launch_dockyard(storage: str | Path, *, port: int | None = None, workers: int | None = None,
                    extra_args: Iterable[str] = (), env: Mapping[str, str] | None = None,
                    log_path: str | Path | None = None, timeout: float = 30.0) -> RegistryServer:
    """Start `dockyard serve` on 127.0.0.1 with the given storage; wait for /v2/."""
    port = port or free_port()
    storage = Path(storage)
    storage.mkdir(parents=True, exist_ok=True)
    argv = [*dockyard_command(), "serve", "--host", "127.0.0.1", "--port", str(port),
            "--storage", str(storage)]
    if workers is not None:
        argv += ["--workers", str(workers)]
    argv += list(extra_args)
    child_env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                 "PYTHONUNBUFFERED": "1", **(env or {})}
    server = ServerProcess(argv, ready_url=f"http://127.0.0.1:{port}/v2/", env=child_env,
                           cwd=REPO_ROOT, log_path=log_path, name="dockyard")
    server.start(timeout)
    return RegistryServer("dockyard", f"127.0.0.1:{port}", storage, server)


DISTRIBUTION_CONFIG = """\
version: 0.1
log:
  level: {log_level}
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  headers:
    X-Content-Type-Options: [nosniff]
"""


def launch_distribution(workdir: str | Path, *, port: int | None = None, log_level: str = "warn",
                        auth: str | None = None, timeout: float = 30.0) -> RegistryServer:
    """Start CNCF Distribution (`docker-registry`, Debian) with filesystem storage under workdir.
    `auth`: the body of an `auth:` section (YAML indented by two spaces), e.g. token or htpasswd."""
    binary = require_tool("docker-registry")
    port = port or free_port()
    workdir = Path(workdir)
    root = workdir / "storage"
    root.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.yml"
    text = DISTRIBUTION_CONFIG.format(log_level=log_level, root=root, port=port)
    config.write_text(text + (f"auth:\n{auth}" if auth else ""))
    server = ServerProcess([binary, "serve", str(config)], ready_url=f"http://127.0.0.1:{port}/v2/",
                           log_path=workdir / "registry.log", name="docker-registry")
    server.start(timeout)
    return RegistryServer("distribution", f"127.0.0.1:{port}", root, server)


# ---- content -------------------------------------------------------------------

def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_layer(files: Mapping[str, bytes], *, mode: int = 0o644, mtime: int = 0) -> bytes:
    """An uncompressed tar of regular files (parent directories added), reproducible."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        seen: set[str] = set()
        for name in sorted(files):
            parts = name.strip("/").split("/")
            for i in range(1, len(parts)):
                directory = "/".join(parts[:i])
                if directory not in seen:
                    seen.add(directory)
                    info = tarfile.TarInfo(directory)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
                    tar.addfile(info)
            data = files[name]
            info = tarfile.TarInfo(name.strip("/"))
            info.size, info.mode, info.mtime = len(data), mode, mtime
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def random_tar_layer(size: int, name: str = "data.bin") -> bytes:
    """A valid tar layer holding one file of `size` random (incompressible) bytes."""
    return tar_layer({name: os.urandom(size)})


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1, mtime=0)


def image_config(diff_ids: Sequence[str], *, architecture: str = "amd64", os_name: str = "linux",
                 cmd: Sequence[str] = ("/bin/sh",), variant: str | None = None) -> dict:
    config: dict = {
        "architecture": architecture,
        "os": os_name,
        "config": {"Cmd": list(cmd), "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created_by": "dockyard tests"} for _ in diff_ids],
    }
    if variant:
        config["variant"] = variant
    return config


class OciLayoutWriter:
    """Writes an OCI image layout (oci-layout, index.json, blobs/sha256/...).

    blob() / image() / index() add content and return descriptors; tag() puts a
    descriptor in index.json (with org.opencontainers.image.ref.name); close()
    writes index.json.
    """

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        (self.dir / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.dir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        self.entries: list[dict] = []

    def blob(self, data: bytes, media_type: str, **extra) -> dict:
        digest = sha256_digest(data)
        path = self.dir / "blobs" / "sha256" / digest.split(":", 1)[1]
        if not path.exists():
            path.write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    def image(self, layers: Sequence[bytes], config: dict | bytes | None = None, *,
              layer_media_type: str = OCI_LAYER_TAR, platform: dict | None = None,
              annotations: Mapping[str, str] | None = None, subject: dict | None = None,
              artifact_type: str | None = None, config_media_type: str = OCI_CONFIG) -> dict:
        """Add an image manifest; layers are blob bytes (already compressed if the
        media type says so). Without config, one is made from the layers' diff_ids."""
        if config is None:
            diff_ids = [sha256_digest(gzip.decompress(l) if layer_media_type.endswith("gzip") else l)
                        for l in layers]
            arch = (platform or {}).get("architecture", "amd64")
            config = image_config(diff_ids, architecture=arch, variant=(platform or {}).get("variant"))
        config_bytes = config if isinstance(config, bytes) else json.dumps(config, sort_keys=True).encode()
        manifest: dict = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": self.blob(config_bytes, config_media_type),
            "layers": [self.blob(layer, layer_media_type) for layer in layers],
        }
        if artifact_type:
            manifest["artifactType"] = artifact_type
        if subject:
            manifest["subject"] = subject
        if annotations:
            manifest["annotations"] = dict(annotations)
        extra = {"platform": platform} if platform else {}
        return self.blob(json.dumps(manifest, sort_keys=True).encode(), OCI_MANIFEST, **extra)

    def index(self, manifests: Sequence[dict]) -> dict:
        body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(manifests)}
        return self.blob(json.dumps(body, sort_keys=True).encode(), OCI_INDEX)

    def tag(self, name: str, descriptor: dict) -> None:
        entry = {k: v for k, v in descriptor.items() if k != "platform"}
        entry["annotations"] = {"org.opencontainers.image.ref.name": name}
        self.entries.append(entry)

    def close(self) -> None:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.entries}
        (self.dir / "index.json").write_text(json.dumps(index))


@dataclass(frozen=True)
class LayoutImage:
    path: Path                  # the layout directory
    tag: str
    manifest: dict              # the manifest descriptor (digest, size, mediaType)
    layers: tuple[str, ...]     # layer digests

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    @property
    def ref(self) -> str:
        """skopeo/umoci reference: oci:DIR:TAG"""
        return f"oci:{self.path}:{self.tag}"


def write_oci_layout(directory: str | Path, layers: Sequence[bytes] | None = None,
                     config: dict | bytes | None = None, *, tag: str = "latest",
                     layer_sizes: Sequence[int] | None = None,
                     layer_media_type: str = OCI_LAYER_TAR) -> LayoutImage:
    """An OCI image layout with one tagged image.

    Give `layers` as blob bytes, or `layer_sizes` for random tar layers of about
    those sizes (each a valid tar of one random file).
    """
    if layers is None:
        layers = [random_tar_layer(size, name=f"layer{i}.bin") for i, size in enumerate(layer_sizes or [1024])]
    writer = OciLayoutWriter(directory)
    descriptor = writer.image(layers, config, layer_media_type=layer_media_type)
    writer.tag(tag, descriptor)
    writer.close()
    return LayoutImage(Path(directory), tag, descriptor, tuple(sha256_digest(l) for l in layers))


# ---- docker images ----------------------------------------------------------------

def build_busybox_image(docker, tag: str, *, run_step: str | None = "echo hello > /hello.txt",
                        extra_files: Mapping[str, bytes] | None = None,
                        workdir: str | Path | None = None) -> str:
    """Build `tag` FROM scratch with /bin/busybox (busybox-static) and its applets.

    `docker` is the `dockerd` fixture (its .run(*args)). A RUN step (default:
    write /hello.txt) adds a second layer. Returns the image ID.
    """
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="dy-build-") as tmp:
            return build_busybox_image(docker, tag, run_step=run_step, extra_files=extra_files,
                                       workdir=tmp)
    busybox = busybox_path()
    context = Path(workdir)
    context.mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, context / "busybox")
    lines = ["FROM scratch", "COPY busybox /bin/busybox",
             'RUN ["/bin/busybox", "--install", "-s", "/bin"]']
    for name, data in (extra_files or {}).items():
        target = context / "files" / name.strip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        lines.append(f"COPY files/{name.strip('/')} /{name.strip('/')}")
    if run_step:
        lines.append(f"RUN {run_step}")
    lines.append('CMD ["/bin/sh"]')
    (context / "Dockerfile").write_text("\n".join(lines) + "\n")
    docker.run("build", "-q", "-t", tag, str(context), timeout=300)
    return docker.run("image", "inspect", "-f", "{{.Id}}", tag).stdout.strip()


# ---- raw registry HTTP (for hand-made requests a client tool cannot make) -----------

@dataclass(frozen=True)
class HttpResult:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def http_request(method: str, url: str, body: bytes | None = None,
                 headers: Mapping[str, str] | None = None, timeout: float = 60) -> HttpResult:
    """One HTTP request; any status is returned, never raised."""
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return HttpResult(response.status, response.headers, response.read())
    except urllib.error.HTTPError as exc:
        return HttpResult(exc.code, exc.headers, exc.read())


def push_blob(base_url: str, repo: str, data: bytes) -> str:
    """POST an upload then PUT it whole with ?digest=; returns the digest."""
    digest = sha256_digest(data)
    started = http_request("POST", f"{base_url}/v2/{repo}/blobs/uploads/", b"",
                           {"Content-Length": "0"})
    assert started.status == 202, (started.status, started.body[:500])
    location = started.headers["Location"]
    if location.startswith("/"):
        location = base_url + location
    sep = "&" if "?" in location else "?"
    done = http_request("PUT", f"{location}{sep}digest={digest}", data,
                        {"Content-Type": "application/octet-stream"})
    assert done.status == 201, (done.status, done.body[:500])
    return digest


def put_manifest(base_url: str, repo: str, reference: str, manifest: dict | bytes,
                 media_type: str = OCI_MANIFEST) -> HttpResult:
    body = manifest if isinstance(manifest, bytes) else json.dumps(manifest, sort_keys=True).encode()
    return http_request("PUT", f"{base_url}/v2/{repo}/manifests/{reference}", body,
                        {"Content-Type": media_type})
