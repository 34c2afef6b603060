"""The authenticated and TLS targets of bench_registry.py, beside its plain ones.

For every plain registry the bench runs (CNCF Distribution, Dockyard w=N),
three more processes serve the SAME storage root, read-only (the images were
pushed to the plain one): Bearer tokens over HTTP, no auth over TLS, and
Bearer tokens over TLS. The four variants of one registry therefore read the
same files from the same page cache; only auth and TLS differ.

    Distribution  `auth: token` trusting the test issuer of tests/support/tokens.py
                  (RS256, the issuer's certificate in the x5c header, its
                  certificate as rootcertbundle); TLS by http.tls.certificate/key.
                  Its token is signed by that issuer directly: Distribution
                  has no token service.
    Dockyard      `auth.mode: token`. Issuer "own" (the default): its built-in
                  token service (an ES256 key made under the storage root,
                  users from an htpasswd file, pull on bench/** from a policy
                  file), the token fetched from its /auth/token with Basic
                  credentials. Issuer "test": auth.token.issue false, trusting
                  the same test issuer as Distribution (auth.token.trusted_keys
                  = its PEM certificate), with the same kind of token.
                  TLS by tls.cert/tls.key.

Both serve one certificate (EC P-256) from a throwaway CA (tests/support/tls.py).
Tokens live TOKEN_LIFETIME seconds (Dockyard: auth.token.lifetime and
max_lifetime), far longer than a run; `check()` refuses a token that would not
outlive it. The htpasswd file holds one user per bcrypt cost measured
(`bench-c5`, `bench-c10`, ...), each entry at its own cost, as `htpasswd -B -C N`
writes it (`htpasswd -B` alone: cost 5).
"""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import yaml

from _common import REPO_ROOT, BenchError, content, launch
from tests.support.auth import basic, bearer, claims_of, write_htpasswd, write_policy
from tests.support.tls import CertificateAuthority, ServerFiles
from tests.support.tokens import TokenIssuer, TokenServer

TOKEN_LIFETIME = 3600                 # seconds; Dockyard's auth.token.lifetime = max_lifetime
REPOSITORY = "bench/big0"
SCOPE = f"repository:{REPOSITORY}:pull"
# Where Distribution's (and, with the test issuer, Dockyard's) challenge sends
# clients. Nobody follows it here: the bench signs those tokens itself.
UNSERVED_REALM = "http://127.0.0.1:9/token"
PASSWORD = "bench-secret-0"

PLAIN, BEARER, PLAIN_TLS, BEARER_TLS = "no auth, HTTP", "Bearer, HTTP", "no auth, TLS", "Bearer, TLS"
VARIANTS = (PLAIN, BEARER, PLAIN_TLS, BEARER_TLS)
ISSUERS = ("own", "test")


def user_for(cost: int) -> str:
    return f"bench-c{cost}"


class HttpsRegistryServer(launch.RegistryServer):
    """A RegistryServer that serves HTTPS."""

    @property
    def url(self) -> str:
        return f"https://{self.host}"


def group_cpu_seconds(leader: int) -> float:
    """User + system CPU seconds of every live process in the process group
    `leader` leads (a server and its workers: ServerProcess starts each in a
    session of its own), threads included."""
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue                # gone meanwhile
        # after the command: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        if int(fields[2]) == leader:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Endpoint:
    """One variant of one registry, as a client reaches it."""
    url: str                        # http://HOST:PORT or https://HOST:PORT
    headers: tuple[str, ...] = ()   # "Authorization: Bearer ..." on the Bearer variants
    cacert: Path | None = None      # https: the CA to trust
    pid: int | None = None          # the server's process group, for its CPU time

    def cpu_seconds(self) -> float:
        return group_cpu_seconds(self.pid) if self.pid else 0.0

    @property
    def tls(self) -> bool:
        return self.url.startswith("https://")

    def curl_args(self) -> list[str]:
        args: list[str] = []
        for header in self.headers:
            args += ["-H", header]
        if self.cacert is not None:
            # HTTP/1.1 on both: Distribution (Go) would offer curl HTTP/2 over
            # TLS, aiohttp does not; wrk speaks HTTP/1.1 only as well
            args += ["--cacert", str(self.cacert), "--http1.1"]
        return args


def _https_ready(url: str, context: ssl.SSLContext):
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, context=context, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True             # 401: up, and asking for a token
        except OSError:
            return False
    return check


def launch_dockyard_https(storage: Path, *, workers: int, config: Path, tls: ServerFiles,
                          log_path: Path) -> HttpsRegistryServer:
    """`dockyard serve` over HTTPS (tls.* in `config`) from this checkout, as
    launch.launch_dockyard starts it, waiting for /v2/ over HTTPS."""
    port = launch.free_port()
    argv = [*launch.dockyard_command(), "serve", "--config", str(config), "--host", "127.0.0.1",
            "--port", str(port), "--storage", str(storage), "--workers", str(workers)]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    server = launch.ServerProcess(argv, ready_check=_https_ready(f"https://127.0.0.1:{port}/v2/",
                                                                 tls.client_context()),
                                  env=env, cwd=REPO_ROOT, log_path=log_path, name="dockyard")
    server.start(30)
    return HttpsRegistryServer("dockyard", f"127.0.0.1:{port}", storage, server, config)


def _get(url: str, headers: Mapping[str, str], context: ssl.SSLContext | None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


class AuthTargets:
    """The Bearer, TLS and Bearer+TLS variants of each plain registry."""

    def __init__(self, work: Path, plain: Mapping[str, launch.RegistryServer], *,
                 issuer: str = "own", costs: Sequence[int] = (5,)):
        if issuer not in ISSUERS:
            raise ValueError(f"issuer must be one of {ISSUERS}")
        self.work = work
        self.plain = dict(plain)
        self.issuer_mode = issuer
        self.costs = tuple(costs)
        self.servers: list[launch.RegistryServer] = []
        self.endpoints: dict[str, dict[str, Endpoint]] = {}
        self.token_urls: dict[str, str] = {}       # Dockyard label -> its /auth/token URL (own issuer)
        self.expires_at: dict[str, float] = {}     # label -> its token's exp
        self.token_chars: dict[str, int] = {}      # label -> its token's length (x5c makes it long)
        self._checked = False

    # ---- set-up --------------------------------------------------------------------

    def start(self) -> None:
        work = self.work
        work.mkdir(parents=True, exist_ok=True)
        self.tls = CertificateAuthority(work / "tls").issue()
        (work / "issuer").mkdir(exist_ok=True)
        self.issuer = TokenIssuer(work / "issuer", service=TokenServer.SERVICE, issuer=TokenServer.ISSUER,
                                  expires_in=TOKEN_LIFETIME)
        token_server = TokenServer(self.issuer)
        token_server.realm = UNSERVED_REALM
        self.distribution_auth = token_server.distribution_auth()
        self.htpasswd = self._write_htpasswd(work / "htpasswd")
        self.policy = write_policy(work / "policy.yml", {
            "groups": {"bench": [user_for(c) for c in self.costs]},
            "rules": [{"repositories": ["bench/**"], "groups": ["bench"], "actions": ["pull"]}],
        })
        for label, server in self.plain.items():
            if server.kind == "distribution":
                self._start_distribution(label, server)
            else:
                self._start_dockyard(label, server)

    def _write_htpasswd(self, path: Path) -> Path:
        lines = []
        for cost in self.costs:
            one = write_htpasswd(path.with_suffix(f".c{cost}"), {user_for(cost): PASSWORD}, cost=cost)
            lines.append(one.read_text().strip())
            one.unlink()
        path.write_text("\n".join(lines) + "\n")
        return path

    def _remember(self, server: launch.RegistryServer) -> launch.RegistryServer:
        self.servers.append(server)
        return server

    def _start_distribution(self, label: str, plain: launch.RegistryServer) -> None:
        storage = {"storage": {"filesystem": {"rootdirectory": str(plain.storage)}}}
        tls = {"http": {"tls": {"certificate": str(self.tls.cert), "key": str(self.tls.key)}}}
        bearer_http = self._remember(launch.launch_distribution(
            self.work / "distribution-bearer", auth=self.distribution_auth, config=storage))
        plain_tls = self._remember(self._https(launch.launch_distribution(
            self.work / "distribution-tls", config={**storage, **tls})))
        bearer_tls = self._remember(self._https(launch.launch_distribution(
            self.work / "distribution-bearer-tls", auth=self.distribution_auth, config={**storage, **tls})))
        token = self._test_token()
        self._endpoints(label, plain, bearer_http, plain_tls, bearer_tls, token)

    @staticmethod
    def _https(server: launch.RegistryServer) -> HttpsRegistryServer:
        return HttpsRegistryServer(server.kind, server.host, server.storage, server.server, server.config)

    def _dockyard_config(self, name: str, tls: bool) -> Path:
        token: dict = {"lifetime": TOKEN_LIFETIME, "max_lifetime": TOKEN_LIFETIME}
        settings: dict = {"auth": {"mode": "token", "token": token}}
        if self.issuer_mode == "own":
            settings["auth"].update(htpasswd=str(self.htpasswd), policy=str(self.policy))
        else:
            token.update(issue=False, realm=UNSERVED_REALM, issuer=TokenServer.ISSUER,
                         service=TokenServer.SERVICE, trusted_keys=str(self.issuer.bundle))
        if tls:
            settings["tls"] = {"cert": str(self.tls.cert), "key": str(self.tls.key)}
        path = self.work / f"{name}.yml"
        path.write_text(yaml.safe_dump(settings, sort_keys=False))
        return path

    def _start_dockyard(self, label: str, plain: launch.RegistryServer) -> None:
        workers = int(label.split("=")[1])
        stem = f"dockyard-w{workers}"
        plain_tls = self._remember(launch_dockyard_https(
            plain.storage, workers=workers, config=self._plain_tls_config(stem), tls=self.tls,
            log_path=self.work / f"{stem}-tls.log"))
        bearer_http = self._remember(launch.launch_dockyard(
            plain.storage, workers=workers, config=self._dockyard_config(f"{stem}-bearer", tls=False),
            log_path=self.work / f"{stem}-bearer.log"))
        bearer_tls = self._remember(launch_dockyard_https(
            plain.storage, workers=workers, config=self._dockyard_config(f"{stem}-bearer-tls", tls=True),
            tls=self.tls, log_path=self.work / f"{stem}-bearer-tls.log"))
        if self.issuer_mode == "own":
            self.token_urls[label] = f"{bearer_http.url}/auth/token?service=dockyard&scope={SCOPE}"
            token = self._own_token(label, self.costs[0])
        else:
            token = self._test_token()
        self._endpoints(label, plain, bearer_http, plain_tls, bearer_tls, token)

    def _plain_tls_config(self, stem: str) -> Path:
        path = self.work / f"{stem}-tls.yml"
        path.write_text(yaml.safe_dump({"tls": {"cert": str(self.tls.cert), "key": str(self.tls.key)}}))
        return path

    def _endpoints(self, label: str, plain, bearer_http, plain_tls, bearer_tls, token: str) -> None:
        header = (f"Authorization: {bearer(token)}",)
        ca = self.tls.ca_cert
        self.endpoints[label] = {
            PLAIN: Endpoint(plain.url, pid=plain.server.pid),
            BEARER: Endpoint(bearer_http.url, header, pid=bearer_http.server.pid),
            PLAIN_TLS: Endpoint(plain_tls.url, (), ca, pid=plain_tls.server.pid),
            BEARER_TLS: Endpoint(bearer_tls.url, header, ca, pid=bearer_tls.server.pid),
        }
        self.expires_at[label] = float(claims_of(token)["exp"])
        self.token_chars[label] = len(token)

    # ---- tokens ----------------------------------------------------------------------

    def _test_token(self) -> str:
        return self.issuer.issue("bench", [{"type": "repository", "name": REPOSITORY, "actions": ["pull"]}])

    def basic_header(self, cost: int) -> str:
        return f"Authorization: {basic(user_for(cost), PASSWORD)}"

    def _own_token(self, label: str, cost: int) -> str:
        status, _, body = _get(self.token_urls[label], {"Authorization": basic(user_for(cost), PASSWORD)}, None)
        if status != 200:
            raise BenchError(f"{label}: /auth/token answered {status}: {body[:300]!r}")
        answer = json.loads(body)
        if answer.get("expires_in", 0) < TOKEN_LIFETIME:
            raise BenchError(f"{label}: token lives {answer.get('expires_in')}s, not {TOKEN_LIFETIME}s")
        return answer["token"]

    # ---- checks ----------------------------------------------------------------------

    def check(self, must_live: float) -> None:
        """Once, after the images are stored: every variant serves the manifest
        with its credentials, the Bearer ones refuse a request without a token
        with a Bearer challenge, and every token outlives `must_live` seconds."""
        if self._checked:
            return
        context = self.tls.client_context()
        for label, variants in self.endpoints.items():
            left = self.expires_at[label] - time.time()
            if left < must_live:
                raise BenchError(f"{label}: the token expires in {left:.0f}s, before the run ends")
            for variant, endpoint in variants.items():
                url = f"{endpoint.url}/v2/{REPOSITORY}/manifests/big"
                ctx = context if endpoint.tls else None
                headers = {"Accept": content.MANIFEST_ACCEPT}
                for header in endpoint.headers:
                    name, _, value = header.partition(": ")
                    headers[name] = value
                status, _, body = _get(url, headers, ctx)
                if status != 200:
                    raise BenchError(f"{label} {variant}: manifest GET answered {status}: {body[:300]!r}")
                if endpoint.headers:
                    status, answer_headers, _ = _get(url, {"Accept": content.MANIFEST_ACCEPT}, ctx)
                    challenge = answer_headers.get("WWW-Authenticate", answer_headers.get("Www-Authenticate", ""))
                    if status != 401 or not challenge.startswith("Bearer "):
                        raise BenchError(f"{label} {variant}: without a token: {status} {challenge!r}, "
                                         "not 401 with a Bearer challenge")
        for label, url in self.token_urls.items():
            for cost in self.costs:
                status, _, body = _get(url, {"Authorization": basic(user_for(cost), PASSWORD)}, None)
                if status != 200:
                    raise BenchError(f"{label}: /auth/token for {user_for(cost)} answered {status}")
        self._checked = True

    # ---- what the table's notes say ------------------------------------------------------

    def describe(self) -> list[str]:
        dockyard = ("its own token service (ES256 key under the storage root; token from its "
                    f"/auth/token with Basic credentials, scope {SCOPE})" if self.issuer_mode == "own" else
                    "auth.token.issue false, trusting the test issuer (RS256, x5c; same token kind "
                    "as Distribution's)")
        return [
            f"Bearer rows: Dockyard verifies tokens of {dockyard}; Distribution `auth: token` trusts the "
            "test issuer (RS256, issuer certificate in x5c, rootcertbundle), token signed by that issuer "
            "directly.",
            f"Tokens live {TOKEN_LIFETIME}s (Dockyard auth.token.lifetime = max_lifetime = {TOKEN_LIFETIME}); "
            "one token per registry for the whole run; their lengths (every request carries one): "
            + ", ".join(f"{label} {n:,} chars" for label, n in self.token_chars.items()) + ".",
            "TLS rows: one EC P-256 certificate from a throwaway CA for both; curl --http1.1 (Distribution "
            "would offer curl HTTP/2); wrk is HTTP/1.1.",
            "Each registry's four variants are separate processes on the same storage root.",
        ]
