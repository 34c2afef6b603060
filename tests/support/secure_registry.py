"""Dockyard as it runs on a network: HTTPS with a certificate real clients
must verify, and token auth, on a loopback address that Docker does not
treat as insecure.

    with secure_dockyard(tmp_path, users=USERS, policy=EXAMPLE_POLICY) as registry:
        registry.host          "dockyard-auth-1a2b3c4d.test:PORT", as clients write it
        registry.cert_dir      holds ca.crt alone (podman, skopeo: --cert-dir)
        registry.hosts_dir     containerd's hosts directory (ctr --hosts-dir)
        registry.ca_cert       the throwaway authority (ORAS: tls_verify=)
        registry.token("builder", "repository:team-a/app:pull")
        registry.request("GET", "/v2/team-a/app/tags/list", user="builder",
                         scopes=["repository:team-a/app:pull"])

Why not 127.0.0.1: dockerd always counts 127.0.0.0/8 among its insecure
registries; for those it skips certificate verification and falls back to
plain HTTP, so a push there proves nothing about TLS. Dockyard listens on
::1 instead, under a host name of its own that /etc/hosts maps to ::1
alone. Docker reads its trust for a registry from
/etc/docker/certs.d/HOST:PORT/ca.crt (no flag moves it), so the CA goes
there too. Both changes to the machine are undone when the registry stops,
and only they: a line another program added to /etc/hosts meanwhile stays,
a certs.d directory that was there before is never touched.

`DockerClient` drives a test daemon with a client configuration of its
own (DOCKER_CONFIG), so a `docker login` here leaves the config.json that
other tests use alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import yaml

from tests.support import REPO_ROOT
from tests.support.auth import basic, write_htpasswd, write_policy
from tests.support.content import MANIFEST_ACCEPT
from tests.support.launch import ServerProcess, dockyard_command
from tests.support.peers import require_root, run
from tests.support.registry_http import HttpResult
from tests.support.tls import CertificateAuthority, ServerFiles

HOSTS_FILE = Path("/etc/hosts")
DOCKER_CERTS_DIR = Path("/etc/docker/certs.d")
HOSTS_MARK = "# dockyard tests"
SERVICE = "dockyard"            # auth.token.service's default: the audience of tokens
# Go's resolver (dockerd, containerd) trusts what it read of /etc/hosts for
# 5 seconds before it looks at the file again: a daemon that read it just
# before the new line went in does not know the name until then.
GO_HOSTS_CACHE = 5.0

_ANNOUNCED = re.compile(r"listening on https://\[?([0-9A-Fa-f:.]+)\]?:(\d+)")


# ---- the machine: a host name for ::1, Docker's trust for one registry ----------------

def resolved_addresses(name: str) -> set[str]:
    """Every address the system resolver gives for name (empty when none)."""
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return set()
    return {info[4][0] for info in infos}


class HostsEntry:
    """One line "ADDRESS NAME" in /etc/hosts between add() and remove().

    The file is written in place (it may be a bind mount, which a rename
    could not replace). remove() takes out exactly the line add() wrote:
    when nothing else changed the file is byte for byte what it was.
    """

    def __init__(self, name: str, address: str = "::1", path: Path = HOSTS_FILE):
        self.name, self.address, self.path = name, address, Path(path)
        self.line = f"{address}\t{name}\t{HOSTS_MARK}, pid {os.getpid()}"
        self._added: str | None = None

    def add(self) -> "HostsEntry":
        text = self.path.read_text()
        if any(self.name in line.split("#", 1)[0].split()[1:] for line in text.splitlines()):
            raise RuntimeError(f"{self.path} already names {self.name}: not ours to change")
        self._added = ("" if not text or text.endswith("\n") else "\n") + self.line + "\n"
        with open(self.path, "a") as hosts:
            hosts.write(self._added)
        return self

    def remove(self) -> None:
        if self._added is None:
            return
        text = self.path.read_text()
        if text.endswith(self._added):
            kept = text[:-len(self._added)]
        else:
            kept = "".join(line for line in text.splitlines(keepends=True)
                           if line.rstrip("\n") != self.line)
        with open(self.path, "r+") as hosts:
            hosts.write(kept)
            hosts.truncate()
        self._added = None


class InstalledCA:
    """A CA certificate at ROOT/HOST:PORT/ca.crt, where dockerd looks for
    the authorities it trusts for one registry (read again for every
    connection it opens, so no restart is needed). remove() deletes the
    file and the directories install() made."""

    def __init__(self, ca_cert: str | os.PathLike, host: str, root: Path = DOCKER_CERTS_DIR):
        self.source = Path(ca_cert)
        self.dir = Path(root) / host
        self.path = self.dir / "ca.crt"
        self._made: list[Path] = []

    def install(self) -> "InstalledCA":
        if self.dir.exists():
            raise RuntimeError(f"{self.dir} exists already: not ours to change")
        missing, directory = [], self.dir
        while not directory.exists():
            missing.append(directory)
            directory = directory.parent
        for directory in reversed(missing):          # parents first
            directory.mkdir()
            self._made.append(directory)
        shutil.copyfile(self.source, self.path)
        return self

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        for directory in reversed(self._made):       # deepest first
            with contextlib.suppress(OSError):
                directory.rmdir()
        self._made = []

    @contextlib.contextmanager
    def withheld(self) -> Iterator[None]:
        """Without the CA while the block runs (a client that must refuse the server)."""
        self.path.unlink()
        try:
            yield
        finally:
            shutil.copyfile(self.source, self.path)


# ---- the registry ---------------------------------------------------------------------

@dataclass
class SecureRegistry:
    """Dockyard on `address` with TLS and token auth, reached as `host`."""
    name: str                   # the host name clients use; resolves to `address` alone
    address: str                # where it listens ("::1")
    port: int
    storage: Path
    tls: ServerFiles            # the CA, and the certificate the server presents
    cert_dir: Path              # ca.crt alone: podman and skopeo --cert-dir
    hosts_dir: Path             # HOST:PORT/ca.crt inside: ctr --hosts-dir
    users: dict[str, str]
    server: ServerProcess = field(repr=False)
    docker_ca: InstalledCA | None = field(default=None, repr=False)
    _undo: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    @property
    def host(self) -> str:
        return f"{self.name}:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    @property
    def ca_cert(self) -> Path:
        return self.tls.ca_cert

    @property
    def realm(self) -> str:
        return f"{self.url}/auth/token"

    def creds(self, user: str) -> str:
        """"user:password", as skopeo --creds and ctr --user take them."""
        return f"{user}:{self.users[user]}"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_cert))

    def log(self) -> str:
        return self.server.log()

    def stop(self) -> None:
        """Stop the server and undo every change to the machine (idempotent)."""
        self._undo.close()

    # ---- HTTP through the token flow, for checking what the clients did ----

    def raw_request(self, method: str, url: str, *, body: bytes | None = None,
                    headers: Mapping[str, str] | None = None, context: ssl.SSLContext | None = None,
                    timeout: float = 60) -> HttpResult:
        """One HTTPS request trusting this registry's CA (or `context`); any status comes back."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=context or self.ssl_context()))
        request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
        try:
            with opener.open(request, timeout=timeout) as response:
                return HttpResult(response.status, response.headers, response.read())
        except urllib.error.HTTPError as exc:
            return HttpResult(exc.code, exc.headers, exc.read())

    def token_response(self, user: str | None, scopes: Iterable[str] = (), *,
                       password: str | None = None) -> HttpResult:
        """GET /auth/token as `user` (None: anonymously) for these scopes."""
        query = urllib.parse.urlencode([("service", SERVICE), *(("scope", s) for s in scopes)])
        headers = {}
        if user is not None:
            headers["Authorization"] = basic(user, self.users[user] if password is None else password)
        return self.raw_request("GET", f"{self.realm}?{query}", headers=headers)

    def token(self, user: str | None, *scopes: str) -> str:
        got = self.token_response(user, scopes)
        assert got.status == 200, (got.status, got.body[:500])
        return got.json()["token"]

    def request(self, method: str, path: str, *, user: str | None = None,
                scopes: Sequence[str] = (), body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> HttpResult:
        """A request to `path` with a token for `scopes` as `user` (None: an
        anonymous token); with no scopes and no user, no token at all."""
        headers = dict(headers or {})
        if user is not None or scopes:
            headers["Authorization"] = f"Bearer {self.token(user, *scopes)}"
        return self.raw_request(method, f"{self.url}{path}", body=body, headers=headers)

    def manifest(self, repo: str, reference: str, *, user: str) -> tuple[str, dict]:
        """(Docker-Content-Digest, parsed body) of a manifest, read as `user`."""
        got = self.request("GET", f"/v2/{repo}/manifests/{reference}", user=user,
                           scopes=[f"repository:{repo}:pull"], headers={"Accept": MANIFEST_ACCEPT})
        assert got.status == 200, (got.status, got.body[:500])
        return got.headers["Docker-Content-Digest"], got.json()

    def blob(self, repo: str, digest: str, *, user: str) -> bytes:
        got = self.request("GET", f"/v2/{repo}/blobs/{digest}", user=user,
                           scopes=[f"repository:{repo}:pull"])
        assert got.status == 200, (got.status, got.body[:500])
        return got.body

    def tags(self, repo: str, *, user: str) -> list[str]:
        """The repository's tags as `user` sees them ([] when it has none)."""
        got = self.request("GET", f"/v2/{repo}/tags/list", user=user, scopes=[f"repository:{repo}:pull"])
        if got.status == 404:
            return []
        assert got.status == 200, (got.status, got.body[:500])
        return sorted(got.json().get("tags") or [])


def start_secure_dockyard(workdir: str | Path, *, users: Mapping[str, str],
                          policy: Mapping[str, Any] | None = None, auth: str | None = "token",
                          name: str | None = None, address: str = "::1", docker_trust: bool = True,
                          config: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                          timeout: float = 30.0) -> SecureRegistry:
    """Start `dockyard serve` with TLS (a fresh CA under workdir) and `auth`
    (none, htpasswd, token; None: no --auth flag, the server's default)
    on `address`, under a host name /etc/hosts maps to it (made up unless
    given), and trust the CA for Docker (`docker_trust`). Returns once the
    name is fresh in every Go resolver's cache too (GO_HOSTS_CACHE after
    the hosts line went in). `stop()` undoes it all; so does a failure to
    start. Needs root (/etc/hosts, /etc/docker)."""
    require_root()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    name = name or f"dockyard-auth-{uuid.uuid4().hex[:8]}.test"
    undo = contextlib.ExitStack()
    try:
        hosts = HostsEntry(name, address).add()
        hosts_added = time.monotonic()
        undo.callback(hosts.remove)
        found = resolved_addresses(name)
        if found != {address}:
            raise RuntimeError(f"{name} resolves to {sorted(found)}, not to {address} alone")

        tls = CertificateAuthority(workdir / "tls").issue([name, address])
        storage = workdir / "storage"
        storage.mkdir(exist_ok=True)
        argv = [*dockyard_command(), "serve", "--host", address, "--port", "0", "--storage", str(storage),
                "--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
        if auth is not None:
            argv += ["--auth", auth]
        if auth not in (None, "none"):
            argv += ["--htpasswd", str(write_htpasswd(workdir / "htpasswd", users))]
            if policy is not None:
                argv += ["--policy", str(write_policy(workdir / "policy.yml", policy))]
        if config:
            settings = workdir / "dockyard.yml"
            settings.write_text(yaml.safe_dump(dict(config), sort_keys=False))
            argv += ["--config", str(settings)]
        child_env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                     "PYTHONUNBUFFERED": "1", **(env or {})}
        holder: dict[str, ServerProcess] = {}
        server = ServerProcess(argv, ready_check=lambda: bool(_ANNOUNCED.search(holder["server"].log())),
                               env=child_env, cwd=REPO_ROOT, log_path=workdir / "dockyard.log",
                               name="dockyard")
        holder["server"] = server
        undo.callback(server.stop)
        server.start(timeout)
        port = int(_ANNOUNCED.search(server.log()).group(2))
        host = f"{name}:{port}"

        cert_dir = workdir / "cert-dir"
        cert_dir.mkdir(exist_ok=True)
        shutil.copyfile(tls.ca_cert, cert_dir / "ca.crt")
        hosts_dir = workdir / "containerd-hosts"
        (hosts_dir / host).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tls.ca_cert, hosts_dir / host / "ca.crt")
        docker_ca = None
        if docker_trust:
            docker_ca = InstalledCA(tls.ca_cert, host).install()
            undo.callback(docker_ca.remove)
        registry = SecureRegistry(name, address, port, storage, tls, cert_dir, hosts_dir, dict(users),
                                  server, docker_ca, undo)
        base = registry.raw_request("GET", f"{registry.url}/v2/", timeout=10)
        if base.status not in (200, 401):
            raise RuntimeError(f"GET {registry.url}/v2/ answered {base.status}: {base.body[:300]!r}")
        time.sleep(max(0.0, hosts_added + GO_HOSTS_CACHE + 0.5 - time.monotonic()))
        return registry
    except BaseException:
        undo.close()
        raise


@contextlib.contextmanager
def secure_dockyard(workdir: str | Path, **options) -> Iterator[SecureRegistry]:
    """start_secure_dockyard(...) while the block runs."""
    registry = start_secure_dockyard(workdir, **options)
    try:
        yield registry
    finally:
        registry.stop()


# ---- docker with a client configuration of its own ----------------------------------------

@dataclass
class DockerClient:
    """The docker CLI on a test daemon (a DockerDaemon), with its own
    DOCKER_CONFIG directory: what `docker login` writes stays here."""
    daemon: Any
    config_dir: Path

    @property
    def env(self) -> dict[str, str]:
        return {**self.daemon.env, "DOCKER_CONFIG": str(self.config_dir)}

    def run(self, *args: str, timeout: float = 300, check: bool = True,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        return run([self.daemon.cli, *args], env=self.env, timeout=timeout, check=check, input=input)

    def login(self, host: str, user: str, password: str, *, check: bool = True) -> subprocess.CompletedProcess:
        """`docker login --password-stdin` (the password never on the command line)."""
        return self.run("login", "--username", user, "--password-stdin", host,
                        input=password.encode(), check=check, timeout=120)

    def logout(self, host: str, *, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("logout", host, check=check, timeout=60)

    @property
    def config_path(self) -> Path:
        return self.config_dir / "config.json"

    def config(self) -> dict:
        try:
            return json.loads(self.config_path.read_text())
        except FileNotFoundError:
            return {}

    def auth_entry(self, host: str) -> dict | None:
        """What config.json holds for host (auth, identitytoken), or None."""
        return (self.config().get("auths") or {}).get(host)


def docker_client(daemon: Any, directory: str | Path) -> DockerClient:
    """A DockerClient on `daemon` whose configuration lives in `directory`
    (no credential store: logins land in its config.json)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text('{"auths": {}}\n')
    return DockerClient(daemon, directory)
