"""Pull-through cache: Dockyard's proxy (`proxy.upstreams`) against CNCF
Distribution in proxy mode (`proxy.remoteurl`), both in front of one
upstream Distribution on loopback, pulled with skopeo.

    python tests/benchmarks/bench_proxy.py [--quick] [--repeats N] [--no-debian] [--json]

Steps, each on both caches (fresh storage for every cold run), the order
alternating from run to run; the best of `--repeats` runs is kept:

  cold pull   the cache has nothing: every blob comes through it from upstream
  warm pull   the same image again: served from the cache
  manifest GET (wrk -t2 -c32) of the cached tag, warm

"direct" is skopeo pulling straight from the upstream: the cold pulls'
ratio to it says what the cache costs on a miss (target: within 1.1x).
Images: 4 x 64 MiB gzipped random layers (`--quick`: 4 x 16 MiB) and the
Debian-based image, both built once into $DOCKYARD_BENCH_CACHE like
bench_pull.py's. Numbers on a shared 2-core machine are noisy: the load
average before and after is printed with the table.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from _common import (BenchError, ClientBench, Row, client_bench_parser, format_table, launch, rows_as_json,
                     sh, timed, wrk)
from bench_pull import big_layout, debian_layout

BASELINE = "Distribution proxy"
DOCKYARD = "Dockyard proxy"
DIRECT = "direct"
TARGETS = [BASELINE, DOCKYARD, DIRECT]
PREFIX = "up"                # Dockyard serves the upstream's library/X as up/library/X
MANIFEST_ACCEPT = ("Accept: application/vnd.oci.image.manifest.v1+json, "
                   "application/vnd.docker.distribution.manifest.v2+json, "
                   "application/vnd.oci.image.index.v1+json")


class Caches:
    """The two caches in front of one upstream, started afresh on demand."""

    def __init__(self, bench: ClientBench, upstream: launch.RegistryServer):
        self.bench, self.upstream = bench, upstream
        self.servers: dict[str, launch.RegistryServer] = {}
        self.generation = 0

    def restart(self) -> None:
        """Both caches with empty storage."""
        self.stop()
        self.generation += 1
        work = self.bench.workdir / f"caches-{self.generation}"
        self.servers[BASELINE] = launch.launch_distribution(
            work / "distribution", config={"proxy": {"remoteurl": self.upstream.url}})
        self.servers[DOCKYARD] = launch.launch_dockyard(
            work / "dockyard-storage", log_path=work / "dockyard.log",
            config={"proxy": {"upstreams": [{"prefix": PREFIX, "url": self.upstream.url}]}})

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.servers.clear()

    def ref(self, label: str, repo: str, tag: str) -> str:
        if label == DIRECT:
            return f"docker://{self.upstream.host}/{repo}:{tag}"
        name = f"{PREFIX}/{repo}" if label == DOCKYARD else repo
        return f"docker://{self.servers[label].host}/{name}:{tag}"

    def manifest_url(self, label: str, repo: str, tag: str) -> str:
        name = f"{PREFIX}/{repo}" if label == DOCKYARD else repo
        return f"{self.servers[label].url}/v2/{name}/manifests/{tag}"


def skopeo_pull(bench: ClientBench, ref: str, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    sh([bench.skopeo, "--policy", str(bench.policy), "copy", "-q", "--src-tls-verify=false", ref,
        f"dir:{target}"], timeout=600)


def main() -> int:
    parser = client_bench_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--wrk-seconds", type=int, default=5)
    args = parser.parse_args()
    bench = ClientBench.setup(args, "proxy")
    load_before = os.getloadavg()
    images = {"4 x 64 MiB" if not args.quick else "4 x 16 MiB":
              ("library/big", "big", big_layout(bench.cache, 4, bench.size))}
    if not args.no_debian:
        images["Debian"] = ("library/debian", "debian", debian_layout(bench.cache))
    upstream = launch.launch_distribution(bench.workdir / "upstream")
    caches = Caches(bench, upstream)
    rows: dict[str, Row] = {}

    def record(name: str, unit: str, higher: bool, label: str, value: float) -> None:
        row = rows.setdefault(name, Row(name, unit, higher))
        best = row.values.get(label)
        row.values[label] = value if best is None else (max(best, value) if higher else min(best, value))

    try:
        for title, (repo, tag, layout) in images.items():
            sh([bench.skopeo, "--policy", str(bench.policy), "copy", "-q", "--dest-tls-verify=false",
                "--preserve-digests", f"oci:{layout}:{tag}", f"docker://{upstream.host}/{repo}:{tag}"],
               timeout=600)
        target = bench.workdir / "pulled"
        for run in range(bench.repeats):
            caches.restart()
            order = [BASELINE, DOCKYARD] if run % 2 == 0 else [DOCKYARD, BASELINE]
            for title, (repo, tag, _) in images.items():
                print(f"run {run + 1}/{bench.repeats}: {title}", file=sys.stderr)
                record(f"cold pull, {title} (skopeo)", "s", False, DIRECT,
                       timed(lambda: skopeo_pull(bench, caches.ref(DIRECT, repo, tag), target)))
                for label in order:
                    record(f"cold pull, {title} (skopeo)", "s", False, label,
                           timed(lambda: skopeo_pull(bench, caches.ref(label, repo, tag), target)))
                for label in order:
                    record(f"warm pull, {title} (skopeo)", "s", False, label,
                           timed(lambda: skopeo_pull(bench, caches.ref(label, repo, tag), target)))
        repo, tag, _ = next(iter(images.values()))
        for label in [BASELINE, DOCKYARD]:
            result = wrk(caches.manifest_url(label, repo, tag), seconds=args.wrk_seconds,
                         headers=[MANIFEST_ACCEPT])
            if result.non_2xx or result.errors:
                raise BenchError(f"{label}: manifest GET had {result.non_2xx} non-2xx answers and "
                                 f"{result.errors} socket errors")
            record("warm manifest GET (wrk -t2 -c32)", "req/s", True, label, result.requests_per_second)
    finally:
        caches.stop()
        upstream.stop()
        shutil.rmtree(bench.workdir, ignore_errors=True)
    ordered = list(rows.values())
    load_after = os.getloadavg()
    if args.json:
        print(rows_as_json(ordered, TARGETS, BASELINE, load_before=load_before, load_after=load_after))
        return 0
    print(format_table(ordered, TARGETS, BASELINE))
    print()
    for row in ordered:
        if row.name.startswith("cold pull"):
            ours, direct = row.values.get(DOCKYARD), row.values.get(DIRECT)
            if ours and direct:
                print(f"{row.name}: Dockyard / direct {ours / direct:.2f}x (target <= 1.1): "
                      f"{'met' if ours / direct <= 1.1 else 'MISSED'}")
        elif row.name.startswith(("warm", )):
            ratio = row.ratio(DOCKYARD, BASELINE)
            if ratio:
                print(f"{row.name}: Dockyard vs Distribution {ratio:.2f}x (target > 1): "
                      f"{'met' if ratio > 1 else 'MISSED'}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (2 shared cores)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench_proxy: {exc}", file=sys.stderr)
        sys.exit(1)
