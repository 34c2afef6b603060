"""Dockyard vs CNCF Distribution, side by side on loopback, same clients.

    python tests/benchmarks/bench_registry.py [--workers 1,2] [--quick] [--json]
                                              [--only pull_big,blob_get_one,...]

Each registry gets fresh storage and the same sequence: skopeo push and pull
of a 4 x 64 MiB image and of a 100-small-layer image, four concurrent pulls,
manifest GET and tags list requests/second with wrk, and blob GET MB/s with
curl. The table gives every value per registry and, for each Dockyard
column, ratio = how many times better Dockyard is than Distribution
(ratio > 1: Dockyard better; for times that is Distribution's time / Dockyard's).

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
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import (
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

    def __post_init__(self) -> None:
        if not self.pull_repeats:
            object.__setattr__(self, "pull_repeats", self.repeats)

    @staticmethod
    def of(quick: bool) -> "Plan":
        if quick:
            return Plan(4, 16 * MiB, 30, 16 * 1024, 1, 2, 3, 100)
        return Plan(4, 64 * MiB, 100, 16 * 1024, 5, 5, 5, 330, pull_repeats=9)


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


class Bench:
    """The measurements. Each step runs on every registry before the next step
    starts: timed skopeo and curl steps run by run, registries taking turns;
    the wrk steps registry by registry, the order rotating from step to step,
    so a busy moment on the machine does not land on one registry only."""

    STEPS = ("push_big", "push_small", "pull_big", "pull_small", "pull_four",
             "manifest_get", "tags_list", "blob_get_one", "blob_get_four")   # the table's row order

    def __init__(self, servers: dict[str, launch.RegistryServer], images: Images, plan: Plan,
                 skopeo: Skopeo, work: Path, only: frozenset[str] = frozenset()):
        self.servers, self.images, self.plan, self.skopeo, self.work = servers, images, plan, skopeo, work
        self.only = only
        self.rows: dict[str, Row] = {}
        self.deadline = time.perf_counter() + plan.budget_seconds
        self.skipped: list[str] = []

    def run(self) -> list[Row]:
        interleaved = [self.push_big, self.push_small, self.pull_big, self.pull_small, self.pull_four,
                       self.blob_get_one, self.blob_get_four]
        steps = [getattr(self, name) for name in self.STEPS if not self.only or name in self.only]
        self.seed()
        labels = list(self.servers)
        for n, step in enumerate(steps):
            if time.perf_counter() > self.deadline:
                self.skipped = [s.__name__ for s in steps[n:]]
                print(f"time budget spent: skipping {', '.join(self.skipped)}", file=sys.stderr)
                break
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
        for server in self.servers.values():
            if "push_big" not in self.only:
                push_fresh(self.skopeo, self.images.big[0], server.host, "bench/big0")
            if "push_small" not in self.only:
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
                    once, value, cleanup=None) -> None:
        """Time `once(label, server, run)` `runs` times on every registry,
        registries taking turns run by run (the order rotating), and record
        value(median seconds) per registry: a busy spell on the machine then
        hits every registry alike instead of one registry's whole step.
        After each run, untimed: cleanup(label, run) and sync(2), so no run
        pays for the previous one's files or dirty pages."""
        labels = list(self.servers)
        times: dict[str, list[float]] = {label: [] for label in labels}
        for run in range(runs):
            for label in labels[run % len(labels):] + labels[:run % len(labels)]:
                server = self.servers[label]
                times[label].append(timed(lambda: once(label, server, run)))
                if cleanup is not None:
                    cleanup(label, run)
                os.sync()
        for label in labels:
            self.record(label, name, unit, higher, value(statistics.median(times[label])))
            print(f"  {'':>14}  runs (s): {' '.join(f'{t:.2f}' for t in times[label])}", file=sys.stderr)

    # every timed push sends blobs this registry has never seen
    def push_big(self) -> None:
        self.interleaved(
            f"push {self.big_name} (skopeo)", "MB/s", True, self.plan.repeats,
            lambda label, server, i: push_fresh(self.skopeo, self.images.big[i], server.host, f"bench/big{i}"),
            lambda seconds: self.images.big_bytes / MiB / seconds)

    def push_small(self) -> None:
        self.interleaved(
            f"push {self.small_name} (skopeo)", "s", False, self.plan.repeats,
            lambda label, server, i: push_fresh(self.skopeo, self.images.small[i], server.host,
                                                f"bench/small{i}"),
            lambda seconds: seconds)

    def _pull_dir(self, label: str, n: int = 0) -> Path:
        return self.work / f"pull-{label.replace(' ', '_').replace('=', '')}-{n}"

    def _remove_pull(self, label: str, run: int, dirs: int = 1) -> None:
        for i in range(dirs * run, dirs * (run + 1)):
            shutil.rmtree(self._pull_dir(label, i), ignore_errors=True)

    # every timed pull writes into a directory of its own (no rm inside the timing)
    def pull_big(self) -> None:
        self.interleaved(
            f"pull {self.big_name} (skopeo)", "MB/s", True, self.plan.pull_repeats,
            lambda label, server, i: pull_into(self.skopeo, f"docker://{server.host}/bench/big0:big",
                                               self._pull_dir(label, i)),
            lambda seconds: self.images.big_bytes / MiB / seconds, cleanup=self._remove_pull)

    def pull_small(self) -> None:
        self.interleaved(
            f"pull {self.small_name} (skopeo)", "s", False, self.plan.pull_repeats,
            lambda label, server, i: pull_into(self.skopeo, f"docker://{server.host}/bench/small0:small",
                                               self._pull_dir(label, i)),
            lambda seconds: seconds, cleanup=self._remove_pull)

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

    def manifest_get(self, label: str, server: launch.RegistryServer) -> None:
        result = self._wrk(label, f"{server.url}/v2/bench/big0/manifests/big",
                           [f"Accept: {content.MANIFEST_ACCEPT}"])
        self.record(label, "manifest GET (wrk -t2 -c32)", "req/s", True, result.requests_per_second)
        if result.latency_p99_ms is not None:
            self.record(label, "manifest GET p99 latency", "ms", False, result.latency_p99_ms)

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2",
                        help="Dockyard worker counts to run, comma-separated (default 1,2)")
    parser.add_argument("--quick", action="store_true", help="smaller images, shorter runs")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--workdir", help="where to put images and storage (default: a temp dir)")
    parser.add_argument("--only", default="", metavar="STEPS",
                        help=f"run only these steps, comma-separated ({', '.join(Bench.STEPS)}); "
                             "images they read are pushed untimed first")
    args = parser.parse_args(argv)
    only = frozenset(s.strip() for s in args.only.split(",") if s.strip())
    if only - set(Bench.STEPS):
        parser.error(f"unknown step {sorted(only - set(Bench.STEPS))[0]!r}; steps: {', '.join(Bench.STEPS)}")
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        parser.error("--workers takes numbers, e.g. 1,2")
    plan = Plan.of(args.quick)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]

    work = Path(args.workdir or tempfile.mkdtemp(prefix="dy-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    servers: list[launch.RegistryServer] = []
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
        bench = Bench(by_label, images, plan, skopeo, work, only)
        rows = {row.name: row for row in bench.run()}

        total = time.perf_counter() - started
        load = (round(load_before, 2), round(os.getloadavg()[0], 2))
        if args.json:
            print(rows_as_json(list(rows.values()), targets, BASELINE, quick=args.quick, skipped=bench.skipped,
                               cpus=os.cpu_count(), seconds=round(total, 1), load_average=load))
        else:
            print(f"\nDockyard vs CNCF Distribution 2.8, loopback, {os.cpu_count()} CPUs, "
                  f"{'quick' if args.quick else 'full'} run in {total:.0f}s, "
                  f"load average {load[0]:.2f} at start, {load[1]:.2f} at end")
            print("ratio = how many times better Dockyard is than Distribution "
                  "(>1: Dockyard better; ↑ higher is better, ↓ lower is better)\n")
            print(format_table(list(rows.values()), targets, BASELINE))
            if bench.skipped:
                print(f"\n(time budget spent: not measured: {', '.join(bench.skipped)})")
        return 0
    except BenchError as exc:
        print(f"bench_registry: {exc}", file=sys.stderr)
        for server in servers:
            if server.kind == "dockyard":
                print(f"--- {server.kind} log (tail) ---\n{server.log()[-3000:]}", file=sys.stderr)
        return 1
    finally:
        for server in servers:
            server.stop()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
