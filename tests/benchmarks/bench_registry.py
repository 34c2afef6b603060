"""Dockyard vs CNCF Distribution, side by side on loopback, same clients.

    python tests/benchmarks/bench_registry.py [--workers 1,2] [--quick] [--json]
                                              [--only pull_big,blob_get_one,...|auth|s3]
                                              [--dockyard-issuer own|test] [--bcrypt-costs 5,10]
                                              [--s3-store bluestore|memstore]

Each registry gets fresh storage and the same sequence: skopeo push and pull
of a 4 x 64 MiB image and of a 100-small-layer image, four concurrent pulls,
manifest GET and tags list requests/second with wrk, and blob GET MB/s with
curl. The table gives every value per registry and, for each Dockyard
column, ratio = how many times better Dockyard is than Distribution
(ratio > 1: Dockyard better; for times that is Distribution's time / Dockyard's).

The auth steps (`--only auth` runs the three) compare each registry with
itself and with the other, each in four variants serving one storage root:
no auth and Bearer tokens, over HTTP and over TLS (tests/benchmarks/_auth.py
says how each is set up). auth_manifest_get: manifest GET requests/second with
wrk, and Bearer/no auth, the median of the rounds' ratios (each round runs
every variant of a registry back to back); also the server's CPU time per
request (user + system of its process group, from /proc) and the ratio it
gives, which a shared machine's load moves far less than requests/second.
auth_blob_get: blob GET MB/s with
curl. auth_token: Dockyard's /auth/token requests/second with Basic
credentials, one row per bcrypt cost; every such request is one bcrypt check
(the token service remembers no password), so that is the honest cost of a
login. Distribution has no token service: "-" in its column.

The S3 steps (`--only s3` runs the five) put every registry on one local
Ceph RADOS Gateway (tests/benchmarks/_s3.py): Distribution on its own S3
driver, Dockyard on storage.driver s3, each registry twice, blob GET
redirect on and off, each process in a bucket of its own. Rows "S3,
redirect on|off: ..." are the push and pull steps above on those processes
(`s3_repeats` runs each); "S3: manifest GET" the wrk step on the redirect-on
ones. Before the first timed pull every process is checked to answer a blob
GET as its setting says (307 to the gateway, or the bytes) and its bucket to
hold the pushed bytes.

Timed skopeo and curl steps run several times (fresh images for pushes, fresh
target directories for pulls), the registries taking turns run by run, and
report the median. The machine's load average at start and end is printed: on a
shared machine, compare runs only at similar load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import _auth
import _s3
from _common import (
    REPO_ROOT,
    BenchError,
    MiB,
    Row,
    content,
    curl_download,
    format_table,
    launch,
    need_tool,
    parallel,
    rows_as_json,
    sh,
    timed,
    wrk,
)

BASELINE = "Distribution"


@dataclass(frozen=True)
class Plan:
    big_layers: int          # layers of the big image
    big_layer_size: int      # bytes each
    small_layers: int        # layers of the many-small-layers image
    small_layer_size: int
    repeats: int             # timed runs of each step; the median is reported
    wrk_seconds: int
    blob_fetches: int
    budget_seconds: float    # no new step starts after this (a loaded machine stays bounded)
    pull_repeats: int = 0    # runs of the single-pull steps (client-bound, the noisiest); 0: repeats
    auth_rounds: int = 3     # rounds of the auth manifest step (every variant of every registry per round)
    s3_repeats: int = 0      # runs of each S3 push and pull step (at most repeats); 0: repeats

    def __post_init__(self) -> None:
        if not self.pull_repeats:
            object.__setattr__(self, "pull_repeats", self.repeats)
        if not self.s3_repeats:
            object.__setattr__(self, "s3_repeats", self.repeats)

    @staticmethod
    def of(quick: bool) -> "Plan":
        if quick:
            return Plan(4, 16 * MiB, 30, 16 * 1024, 1, 2, 3, 100, auth_rounds=1)
        return Plan(4, 64 * MiB, 100, 16 * 1024, 5, 5, 5, 330, pull_repeats=9, s3_repeats=3)

    def with_auth(self) -> "Plan":
        """More time budget for the auth steps: their wrk runs alone take
        rounds x registries x 4 variants x wrk_seconds."""
        return replace(self, budget_seconds=self.budget_seconds + (300 if self.auth_rounds > 1 else 60))

    def with_s3(self) -> "Plan":
        """More time budget for the S3 steps: each registry twice (redirect
        on and off), on an object store slower than a local disk."""
        return replace(self, budget_seconds=self.budget_seconds + (1500 if self.s3_repeats > 1 else 200))

    def s3_capacity(self, images: "Images", registries: int) -> int:
        """Bytes the Ceph OSD must hold: every S3 push of the run (both
        variants of every registry), twice (an upload and its content-addressed
        copy coexist until the gateway's garbage collector runs), plus 1 GiB."""
        pushed = (images.big_bytes + images.small_bytes) * self.s3_repeats * registries * 2
        return 2 * pushed + 1024 * MiB


@dataclass(frozen=True)
class Images:
    """`repeats` distinct copies of each image: skopeo remembers where it saw a
    blob and mounts it instead of uploading, so a timed push needs blobs the
    registry has never seen."""
    big: tuple[content.LayoutImage, ...]
    small: tuple[content.LayoutImage, ...]
    big_bytes: int
    small_bytes: int


def make_images(work: Path, plan: Plan) -> Images:
    big = tuple(content.write_oci_layout(work / f"big{i}", tag="big",
                                         layer_sizes=[plan.big_layer_size] * plan.big_layers)
                for i in range(plan.repeats))
    small = tuple(content.write_oci_layout(work / f"small{i}", tag="small",
                                           layer_sizes=[plan.small_layer_size] * plan.small_layers)
                  for i in range(plan.repeats))

    def size(image: content.LayoutImage) -> int:
        blobs = image.path / "blobs" / "sha256"
        return sum((blobs / d.split(":")[1]).stat().st_size for d in image.layers)

    return Images(big, small, size(big[0]), size(small[0]))


class Skopeo:
    def __init__(self, policy: Path):
        self.binary = need_tool("skopeo")
        self.policy = policy

    def copy(self, src: str, dest: str, *extra: str) -> None:
        sh([self.binary, "--policy", str(self.policy), "copy", "-q", "--src-tls-verify=false",
            "--dest-tls-verify=false", *extra, src, dest], timeout=300)


def push_fresh(skopeo: Skopeo, image: content.LayoutImage, host: str, repo: str) -> str:
    """Push to a repository name never used before: every blob is really uploaded."""
    dest = f"docker://{host}/{repo}:{image.tag}"
    skopeo.copy(image.ref, dest, "--preserve-digests")
    return dest


def pull_into(skopeo: Skopeo, remote: str, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    skopeo.copy(remote, f"oci:{target}:x", "--dest-oci-accept-uncompressed-layers")


class Bench(_s3.S3Steps):
    """The measurements. Each step runs on every registry before the next step
    starts: timed skopeo and curl steps run by run, registries taking turns;
    the wrk steps registry by registry, the order rotating from step to step,
    so a busy moment on the machine does not land on one registry only."""

    AUTH_STEPS = ("auth_manifest_get", "auth_blob_get", "auth_token")
    S3_STEPS = ("s3_push_big", "s3_push_small", "s3_pull_big", "s3_pull_small", "s3_manifest_get")
    STEPS = ("push_big", "push_small", "pull_big", "pull_small", "pull_four",
             "manifest_get", "tags_list", "blob_get_one", "blob_get_four",
             *AUTH_STEPS, *S3_STEPS)   # the table's row order
    GROUPS = {"auth": AUTH_STEPS, "s3": S3_STEPS}    # --only names that stand for several steps

    def __init__(self, servers: dict[str, launch.RegistryServer], images: Images, plan: Plan,
                 skopeo: Skopeo, work: Path, only: frozenset[str] = frozenset(),
                 auth: _auth.AuthTargets | None = None, s3: _s3.S3Targets | None = None):
        self.servers, self.images, self.plan, self.skopeo, self.work = servers, images, plan, skopeo, work
        self.only = only
        self.auth = auth
        self.s3 = s3
        self.rows: dict[str, Row] = {}
        self.deadline = time.perf_counter() + plan.budget_seconds
        self.skipped: list[str] = []
        self.loads: list[tuple[str, float]] = []      # (step, 1-minute load average as it started)
        self.notes: list[str] = []

    @classmethod
    def selected(cls, only: frozenset[str]) -> list[str]:
        """The steps to run, in table order (all of them when `only` is empty)."""
        names = set().union(*(cls.GROUPS.get(name, (name,)) for name in only)) if only else set(cls.STEPS)
        return [name for name in cls.STEPS if name in names]

    def run(self) -> list[Row]:
        interleaved = [self.push_big, self.push_small, self.pull_big, self.pull_small, self.pull_four,
                       self.blob_get_one, self.blob_get_four,
                       *(getattr(self, n) for n in (*self.AUTH_STEPS, *self.S3_STEPS))]
        steps = [getattr(self, name) for name in self.selected(self.only)]
        self.seed()
        labels = list(self.servers)
        for n, step in enumerate(steps):
            if time.perf_counter() > self.deadline:
                self.skipped = [s.__name__ for s in steps[n:]]
                print(f"time budget spent: skipping {', '.join(self.skipped)}", file=sys.stderr)
                break
            self.loads.append((step.__name__, os.getloadavg()[0]))
            print(f"{step.__name__} (load average {self.loads[-1][1]:.2f})", file=sys.stderr)
            if step in interleaved:
                step()
                continue
            order = labels[n % len(labels):] + labels[:n % len(labels)]
            for label in order:
                step(label, self.servers[label])
        return list(self.rows.values())

    def seed(self) -> None:
        """Untimed: the images later steps read, when the push steps that
        would have stored them are not run."""
        if not self.only:
            return
        selected = set(self.selected(self.only))
        plain = set(self.STEPS) - set(self.S3_STEPS)
        s3 = [s for _, servers in self.s3.variants() for s in servers.values()] if self.s3 else []
        for servers, prefix, needed in ((self.servers.values(), "", plain), (s3, "s3_", set(self.S3_STEPS))):
            if not selected & needed:
                continue
            for server in servers:
                if f"{prefix}push_big" not in selected:
                    push_fresh(self.skopeo, self.images.big[0], server.host, "bench/big0")
                if f"{prefix}push_small" not in selected and f"{prefix}pull_small" in selected:
                    push_fresh(self.skopeo, self.images.small[0], server.host, "bench/small0")

    def record(self, label: str, name: str, unit: str, higher: bool, value: float) -> None:
        self.rows.setdefault(name, Row(name, unit, higher)).values[label] = value
        print(f"  {label:>14}  {name:<34} {value:10.2f} {unit}", file=sys.stderr)

    @property
    def big_name(self) -> str:
        return f"{self.plan.big_layers}x{self.plan.big_layer_size // MiB}MiB image"

    @property
    def small_name(self) -> str:
        return f"{len(self.images.small[0].layers)}-layer image"

    def interleaved(self, name: str, unit: str, higher: bool, runs: int,
                    once, value, cleanup=None, servers: dict[str, launch.RegistryServer] | None = None) -> None:
        """Time `once(label, server, run)` `runs` times on every registry,
        registries taking turns run by run (the order rotating), and record
        value(median seconds) per registry: a busy spell on the machine then
        hits every registry alike instead of one registry's whole step.
        After each run, untimed: cleanup(label, run) and sync(2), so no run
        pays for the previous one's files or dirty pages. `servers`: the
        registries to run on (default: the plain ones)."""
        servers = self.servers if servers is None else servers
        labels = list(servers)
        times: dict[str, list[float]] = {label: [] for label in labels}
        for run in range(runs):
            for label in labels[run % len(labels):] + labels[:run % len(labels)]:
                server = servers[label]
                times[label].append(timed(lambda: once(label, server, run)))
                if cleanup is not None:
                    cleanup(label, run)
                os.sync()
        for label in labels:
            self.record(label, name, unit, higher, value(statistics.median(times[label])))
            print(f"  {'':>14}  runs (s): {' '.join(f'{t:.2f}' for t in times[label])}", file=sys.stderr)

    # every timed push sends blobs this registry has never seen; `servers`,
    # `title` and `runs`: the S3 steps' registries, row-name prefix and runs
    def push_big(self, servers=None, title: str = "", runs: int = 0) -> None:
        self.interleaved(
            f"{title}push {self.big_name} (skopeo)", "MB/s", True, runs or self.plan.repeats,
            lambda label, server, i: push_fresh(self.skopeo, self.images.big[i], server.host, f"bench/big{i}"),
            lambda seconds: self.images.big_bytes / MiB / seconds, servers=servers)

    def push_small(self, servers=None, title: str = "", runs: int = 0) -> None:
        self.interleaved(
            f"{title}push {self.small_name} (skopeo)", "s", False, runs or self.plan.repeats,
            lambda label, server, i: push_fresh(self.skopeo, self.images.small[i], server.host,
                                                f"bench/small{i}"),
            lambda seconds: seconds, servers=servers)

    def _pull_dir(self, label: str, n: int = 0) -> Path:
        return self.work / f"pull-{label.replace(' ', '_').replace('=', '')}-{n}"

    def _remove_pull(self, label: str, run: int, dirs: int = 1) -> None:
        for i in range(dirs * run, dirs * (run + 1)):
            shutil.rmtree(self._pull_dir(label, i), ignore_errors=True)

    # every timed pull writes into a directory of its own (no rm inside the timing)
    def pull_big(self, servers=None, title: str = "", runs: int = 0) -> None:
        self.interleaved(
            f"{title}pull {self.big_name} (skopeo)", "MB/s", True, runs or self.plan.pull_repeats,
            lambda label, server, i: pull_into(self.skopeo, f"docker://{server.host}/bench/big0:big",
                                               self._pull_dir(label, i)),
            lambda seconds: self.images.big_bytes / MiB / seconds, cleanup=self._remove_pull, servers=servers)

    def pull_small(self, servers=None, title: str = "", runs: int = 0) -> None:
        self.interleaved(
            f"{title}pull {self.small_name} (skopeo)", "s", False, runs or self.plan.pull_repeats,
            lambda label, server, i: pull_into(self.skopeo, f"docker://{server.host}/bench/small0:small",
                                               self._pull_dir(label, i)),
            lambda seconds: seconds, cleanup=self._remove_pull, servers=servers)

    def pull_four(self) -> None:
        runs = max(1, (self.plan.repeats + 1) // 2)

        def once(label: str, server: launch.RegistryServer, run: int) -> None:
            remote = f"docker://{server.host}/bench/big0:big"
            parallel(4, lambda i: pull_into(self.skopeo, remote, self._pull_dir(label, 4 * run + i)))

        self.interleaved("4 concurrent pulls, big image", "MB/s", True, runs, once,
                         lambda seconds: 4 * self.images.big_bytes / MiB / seconds,
                         cleanup=lambda label, run: self._remove_pull(label, run, 4))

    def _wrk(self, label: str, url: str, headers: list[str]):
        result = wrk(url, seconds=self.plan.wrk_seconds, headers=headers)
        if result.non_2xx or result.errors:
            raise BenchError(f"{label}: {url}: {result.non_2xx} non-2xx answers, {result.errors} socket errors")
        return result

    def manifest_get(self, label: str, server: launch.RegistryServer, title: str = "") -> None:
        result = self._wrk(label, f"{server.url}/v2/bench/big0/manifests/big",
                           [f"Accept: {content.MANIFEST_ACCEPT}"])
        self.record(label, f"{title}manifest GET (wrk -t2 -c32)", "req/s", True, result.requests_per_second)
        if result.latency_p99_ms is not None:
            self.record(label, f"{title}manifest GET p99 latency", "ms", False, result.latency_p99_ms)

    def tags_list(self, label: str, server: launch.RegistryServer) -> None:
        result = self._wrk(label, f"{server.url}/v2/bench/big0/tags/list", [])
        self.record(label, "tags list (wrk -t2 -c32)", "req/s", True, result.requests_per_second)

    def _blob(self, server: launch.RegistryServer) -> tuple[str, int]:
        image = self.images.big[0]
        layer = image.layers[0]
        size = (image.path / "blobs" / "sha256" / layer.split(":")[1]).stat().st_size
        return f"{server.url}/v2/bench/big0/blobs/{layer}", size

    # a run is a few fetches in a row: one 64 MiB fetch is over too fast to time alone
    def blob_get_one(self) -> None:
        size = self._blob(next(iter(self.servers.values())))[1]
        fetches = 4

        def once(label: str, server: launch.RegistryServer, run: int) -> None:
            url = self._blob(server)[0]
            for _ in range(fetches):
                curl_download(url, size)

        self.interleaved("blob GET, one client (curl)", "MB/s", True, self.plan.blob_fetches, once,
                         lambda seconds: fetches * size / MiB / seconds)

    def blob_get_four(self) -> None:
        size = self._blob(next(iter(self.servers.values())))[1]
        fetches = 2

        def once(label: str, server: launch.RegistryServer, run: int) -> None:
            url = self._blob(server)[0]
            parallel(4, lambda _: [curl_download(url, size) for _ in range(fetches)])

        self.interleaved("blob GET, 4 clients (curl)", "MB/s", True, self.plan.blob_fetches, once,
                         lambda seconds: 4 * fetches * size / MiB / seconds)

    # ---- auth: each registry in four variants (tests/benchmarks/_auth.py) ------------------

    def _auth_targets(self) -> _auth.AuthTargets:
        if self.auth is None:
            raise BenchError("the auth steps need the auth targets (main starts them)")
        # every token must outlive what is left of the run (budget, plus a margin for the last step)
        self.auth.check(must_live=max(0.0, self.deadline - time.perf_counter()) + 600)
        return self.auth

    @staticmethod
    def _rotated(items, n: int) -> list:
        items = list(items)
        return items[n % len(items):] + items[:n % len(items)]

    def auth_manifest_get(self) -> None:
        """wrk on every variant of every registry, `auth_rounds` rounds: a
        round runs one registry's four variants back to back (the order
        rotating), so Bearer and no auth of one registry are measured close
        in time; the registries take turns as well."""
        auth = self._auth_targets()
        labels = list(self.servers)
        runs: dict[tuple[str, str], list] = {(label, v): [] for label in labels for v in _auth.VARIANTS}
        cpu: dict[tuple[str, str], list[float]] = {key: [] for key in runs}     # server µs per request
        for round_ in range(self.plan.auth_rounds):
            for label in self._rotated(labels, round_):
                for variant in self._rotated(_auth.VARIANTS, round_):
                    endpoint = auth.endpoints[label][variant]
                    before = endpoint.cpu_seconds()
                    result = self._wrk(f"{label} {variant}", f"{endpoint.url}/v2/{_auth.REPOSITORY}/manifests/big",
                                       [f"Accept: {content.MANIFEST_ACCEPT}", *endpoint.headers])
                    runs[label, variant].append(result)
                    cpu[label, variant].append((endpoint.cpu_seconds() - before) * 1e6 / max(1, result.requests))
        for label in labels:
            for scheme, plain, token in (("HTTP", _auth.PLAIN, _auth.BEARER),
                                         ("TLS", _auth.PLAIN_TLS, _auth.BEARER_TLS)):
                for variant in (plain, token):
                    rps = [r.requests_per_second for r in runs[label, variant]]
                    self.record(label, f"manifest GET, {variant} (wrk -t2 -c32)", "req/s", True,
                                statistics.median(rps))
                    print(f"  {'':>14}  rounds (req/s): {' '.join(f'{x:,.0f}' for x in rps)}", file=sys.stderr)
                ratios = [t.requests_per_second / p.requests_per_second
                          for p, t in zip(runs[label, plain], runs[label, token])]
                self.record(label, f"manifest GET, Bearer / no auth, {scheme}", "x", True,
                            statistics.median(ratios))
                print(f"  {'':>14}  rounds: {' '.join(f'{x:.3f}' for x in ratios)}", file=sys.stderr)
                p99 = [r.latency_p99_ms for r in runs[label, token] if r.latency_p99_ms is not None]
                if p99:
                    self.record(label, f"manifest GET, Bearer, {scheme} p99 latency", "ms", False,
                                statistics.median(p99))
                # server CPU per request: what the ratio of throughputs would be on an idle machine
                for variant in (plain, token):
                    self.record(label, f"manifest GET, {variant}, server CPU/request", "µs", False,
                                statistics.median(cpu[label, variant]))
                    print(f"  {'':>14}  rounds (µs): {' '.join(f'{x:.0f}' for x in cpu[label, variant])}",
                          file=sys.stderr)
                kept = [p / t for p, t in zip(cpu[label, plain], cpu[label, token]) if t]
                if kept:
                    self.record(label, f"manifest GET, Bearer / no auth by server CPU, {scheme}", "x", True,
                                statistics.median(kept))

    def auth_blob_get(self) -> None:
        """The blob GET of blob_get_one (one curl client, 4 fetches of the
        big image's first layer a run) on every variant; a run goes through
        every variant of every registry, in the order auth_manifest_get
        uses; the median run."""
        auth = self._auth_targets()
        image = self.images.big[0]
        layer = image.layers[0]
        size = (image.path / "blobs" / "sha256" / layer.split(":")[1]).stat().st_size
        fetches = 4
        labels = list(self.servers)
        times: dict[tuple[str, str], list[float]] = {(label, v): [] for label in labels for v in _auth.VARIANTS}
        cpu: dict[tuple[str, str], list[float]] = {key: [] for key in times}   # server ms per MiB sent
        for run in range(self.plan.blob_fetches):
            for label, variant in ((label, variant) for label in self._rotated(labels, run)
                                   for variant in self._rotated(_auth.VARIANTS, run)):
                endpoint = auth.endpoints[label][variant]
                url, args = f"{endpoint.url}/v2/{_auth.REPOSITORY}/blobs/{layer}", endpoint.curl_args()
                before = endpoint.cpu_seconds()
                times[label, variant].append(timed(lambda: [curl_download(url, size, args)
                                                            for _ in range(fetches)]))
                cpu[label, variant].append((endpoint.cpu_seconds() - before) * 1e3 / (fetches * size / MiB))
                os.sync()
        for label in labels:
            for variant in _auth.VARIANTS:
                seconds = statistics.median(times[label, variant])
                self.record(label, f"blob GET, {variant}, one client (curl)", "MB/s", True,
                            fetches * size / MiB / seconds)
                print(f"  {'':>14}  runs (s): {' '.join(f'{t:.2f}' for t in times[label, variant])}",
                      file=sys.stderr)
                # what the throughput would follow on an idle machine: the server's CPU per byte
                self.record(label, f"blob GET, {variant}, server CPU/MiB", "ms", False,
                            statistics.median(cpu[label, variant]))

    def auth_token(self) -> None:
        """Dockyard's /auth/token (GET, Basic, one pull scope) with wrk, one
        user per bcrypt cost; Distribution has no token service."""
        auth = self._auth_targets()
        if not auth.token_urls:
            self.notes.append("token endpoint rows: not measured (Dockyard ran without its own "
                              "token service: --dockyard-issuer test)")
            return
        import bcrypt

        for cost in auth.costs:
            hashed = bcrypt.hashpw(b"x" * 16, bcrypt.gensalt(rounds=cost))
            checks = max(3, 400 >> cost)
            seconds = timed(lambda: [bcrypt.checkpw(b"x" * 16, hashed) for _ in range(checks)]) / checks
            self.notes.append(f"bcrypt cost {cost}: one check {seconds * 1000:.1f} ms in this process "
                              f"(one thread), so at most ~{os.cpu_count() / seconds:,.0f} logins/s on "
                              f"{os.cpu_count()} cores")
        labels = [label for label in self.servers if label in auth.token_urls]
        for n, cost in enumerate(auth.costs):
            for label in self._rotated(labels, n):
                result = wrk(auth.token_urls[label], threads=2, connections=8, seconds=self.plan.wrk_seconds,
                             headers=[auth.basic_header(cost)], timeout=30)
                if result.non_2xx or result.errors:
                    raise BenchError(f"{label}: /auth/token at cost {cost}: {result.non_2xx} non-2xx answers, "
                                     f"{result.errors} socket errors")
                self.record(label, f"token GET, Basic, bcrypt cost {cost} (wrk -t2 -c8)", "req/s", True,
                            result.requests_per_second)
                if result.latency_p99_ms is not None:
                    self.record(label, f"token GET, bcrypt cost {cost} p99 latency", "ms", False,
                                result.latency_p99_ms)


def dockyard_code() -> str:
    """Where the Dockyard the bench launches comes from: its packages as a
    child started like launch.launch_dockyard starts one imports them (this
    checkout's, whatever the venv's editable install points at), and the
    checkout's commit. BenchError when they are not this checkout's."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([*launch.dockyard_command()[:1], "-c",
                          "import registry, storage, puller; print(registry.__file__); print(puller.__file__)"],
                         env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    files = [Path(line) for line in out.stdout.split()]
    if out.returncode != 0 or len(files) != 2 or not all(f.is_relative_to(REPO_ROOT) for f in files):
        raise BenchError(f"the launched dockyard would not import this checkout ({REPO_ROOT}): "
                         f"{out.stdout.strip()} {out.stderr.strip()[-500:]}")
    git = subprocess.run(["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%h"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "registry", "storage",
                            "puller"], capture_output=True, text=True).stdout.strip()
    return f"{REPO_ROOT} at {git.stdout.strip() or '?'}{' (server code modified)' if dirty else ''}"


def target_lines(rows: dict[str, Row], targets: list[str]) -> list[str]:
    """The auth issue's targets, per Dockyard column: Bearer manifest GET at
    least 0.9x of no auth and ahead of Distribution's Bearer figure; blob GET
    over TLS at least Distribution's over TLS."""
    def value(name: str, target: str) -> float | None:
        row = rows.get(name)
        return row.values.get(target) if row else None

    lines = []
    for target in targets:
        if target == BASELINE:
            continue
        for scheme in ("HTTP", "TLS"):
            for how in ("", " by server CPU"):
                kept = value(f"manifest GET, Bearer / no auth{how}, {scheme}", target)
                if kept is not None:
                    lines.append(f"{target}: manifest GET {scheme}, Bearer / no auth{how} {kept:.3f}x "
                                 f"(target >= 0.9): {'met' if kept >= 0.9 else 'MISSED'}")
            name = f"manifest GET, Bearer, {scheme} (wrk -t2 -c32)"
            ours, theirs = value(name, target), value(name, BASELINE)
            if ours and theirs:
                lines.append(f"{target}: manifest GET {scheme}, Bearer {ours:,.0f} vs Distribution {theirs:,.0f} "
                             f"req/s ({ours / theirs:.2f}x, target > 1): {'met' if ours > theirs else 'MISSED'}")
        for variant in ("no auth, TLS", "Bearer, TLS"):
            name = f"blob GET, {variant}, one client (curl)"
            ours, theirs = value(name, target), value(name, BASELINE)
            if ours and theirs:
                lines.append(f"{target}: blob GET, {variant}, {ours:,.0f} vs Distribution {theirs:,.0f} MB/s "
                             f"({ours / theirs:.2f}x, target >= 1): {'met' if ours >= theirs else 'MISSED'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2",
                        help="Dockyard worker counts to run, comma-separated (default 1,2)")
    parser.add_argument("--quick", action="store_true", help="smaller images, shorter runs")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--workdir", help="where to put images and storage (default: a temp dir)")
    parser.add_argument("--only", default="", metavar="STEPS",
                        help=f"run only these steps, comma-separated ({', '.join(Bench.STEPS)}; "
                             f"auth: {', '.join(Bench.AUTH_STEPS)}); images they read are pushed untimed first")
    parser.add_argument("--dockyard-issuer", choices=_auth.ISSUERS, default="own",
                        help="auth steps: Dockyard with its own token service (own, the default) or "
                             "trusting the test issuer Distribution trusts (test)")
    parser.add_argument("--bcrypt-costs", default="5,10", metavar="COSTS",
                        help="auth_token: bcrypt costs of the htpasswd entries, comma-separated (default 5,10: "
                             "`htpasswd -B`'s default, and the README's ~70 ms cost); the first also "
                             "logs in for the Bearer steps' token")
    parser.add_argument("--s3-store", choices=_s3.STORES, default="bluestore",
                        help="S3 steps: where the Ceph OSD keeps objects (default bluestore: a sparse file "
                             "in the work directory; memstore: its memory, about twice what is stored)")
    args = parser.parse_args(argv)
    only = frozenset(s.strip() for s in args.only.split(",") if s.strip())
    known = set(Bench.STEPS) | set(Bench.GROUPS)
    if only - known:
        parser.error(f"unknown step {sorted(only - known)[0]!r}; steps: {', '.join(Bench.STEPS)}, "
                     f"or {', '.join(Bench.GROUPS)}")
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
        costs = [int(c) for c in args.bcrypt_costs.split(",") if c.strip()]
    except ValueError:
        parser.error("--workers and --bcrypt-costs take numbers, e.g. 1,2")
    if not costs or not all(4 <= c <= 31 for c in costs):
        parser.error("--bcrypt-costs: bcrypt costs are 4..31")
    with_auth = bool(set(Bench.selected(only)) & set(Bench.AUTH_STEPS))
    with_s3 = bool(set(Bench.selected(only)) & set(Bench.S3_STEPS))
    plan = Plan.of(args.quick)
    if with_auth:
        plan = plan.with_auth()
    if with_s3:
        plan = plan.with_s3()
    started = time.perf_counter()
    load_before = os.getloadavg()[0]

    work = Path(args.workdir or tempfile.mkdtemp(prefix="dy-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    servers: list[launch.RegistryServer] = []
    s3 = None
    try:
        need_tool("docker-registry"), need_tool("wrk"), need_tool("curl")
        policy = work / "policy.json"
        policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
        skopeo = Skopeo(policy)
        print(f"preparing images in {work} ...", file=sys.stderr)
        images = make_images(work, plan)

        targets = [BASELINE] + [f"Dockyard w={w}" for w in workers]
        by_label: dict[str, launch.RegistryServer] = {}
        for label in targets:
            if label == BASELINE:
                server = launch.launch_distribution(work / "distribution")
            else:
                n = int(label.split("=")[1])
                server = launch.launch_dockyard(work / f"dockyard-w{n}", workers=n,
                                                 log_path=work / f"dockyard-w{n}.log")
            servers.append(server)
            by_label[label] = server
            print(f"{label}: {server.url}", file=sys.stderr)
        code = dockyard_code()
        print(f"Dockyard code: {code}", file=sys.stderr)
        auth = None
        if with_auth:
            auth = _auth.AuthTargets(work / "auth", by_label, issuer=args.dockyard_issuer, costs=costs)
            try:
                auth.start()
            finally:
                servers.extend(auth.servers)
            for label, variants in auth.endpoints.items():
                print(f"{label}: " + ", ".join(f"{v} {e.url}" for v, e in variants.items()), file=sys.stderr)
        if with_s3:
            s3 = _s3.S3Targets(work / "s3", targets, store=args.s3_store,
                               capacity=plan.s3_capacity(images, len(targets)))
            s3.start()
            for variant, variant_servers in s3.variants():
                print(f"S3, {variant}: " + ", ".join(f"{label} {server.url}"
                                                     for label, server in variant_servers.items()),
                      file=sys.stderr)
        bench = Bench(by_label, images, plan, skopeo, work, only, auth, s3)
        rows = {row.name: row for row in bench.run()}
        notes = [*(auth.describe() if auth else []), *(s3.describe() if s3 else []), *bench.notes]
        goals = target_lines(rows, targets) if auth else []

        total = time.perf_counter() - started
        load = (round(load_before, 2), round(os.getloadavg()[0], 2))
        if args.json:
            print(rows_as_json(list(rows.values()), targets, BASELINE, quick=args.quick, skipped=bench.skipped,
                               cpus=os.cpu_count(), seconds=round(total, 1), load_average=load,
                               load_by_step=dict(bench.loads), dockyard=code, notes=notes, targets_met=goals))
        else:
            print(f"\nDockyard vs CNCF Distribution 2.8, loopback, {os.cpu_count()} CPUs, "
                  f"{'quick' if args.quick else 'full'} run in {total:.0f}s, "
                  f"load average {load[0]:.2f} at start, {load[1]:.2f} at end")
            print(f"Dockyard: {code}")
            print("ratio = how many times better Dockyard is than Distribution "
                  "(>1: Dockyard better; ↑ higher is better, ↓ lower is better)\n")
            print(format_table(list(rows.values()), targets, BASELINE))
            if bench.skipped:
                print(f"\n(time budget spent: not measured: {', '.join(bench.skipped)})")
            if bench.loads:
                print("\nload average (1 min) as each step started: "
                      + ", ".join(f"{name} {value:.2f}" for name, value in bench.loads))
            for note in notes:
                print(f"- {note}")
            if goals:
                print("\ntargets:")
                for line in goals:
                    print(f"  {line}")
        return 0
    except BenchError as exc:
        print(f"bench_registry: {exc}", file=sys.stderr)
        for server in [*servers, *(s3.servers if s3 else [])]:
            if server.kind == "dockyard":
                print(f"--- {server.kind} log (tail) ---\n{server.log()[-3000:]}", file=sys.stderr)
        return 1
    finally:
        for server in servers:
            server.stop()
        if s3 is not None:
            s3.stop()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
