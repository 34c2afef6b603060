"""Dockyard vs CNCF Distribution, side by side on loopback, same clients.

    python tests/benchmarks/bench_registry.py [--workers 1,2] [--quick] [--json]

Each registry gets fresh storage and the same sequence: skopeo push and pull
of a 4 x 64 MiB image and of a 100-small-layer image, four concurrent pulls,
manifest GET and tags list requests/second with wrk, and blob GET MB/s with
curl. The table gives every value per registry and, for each Dockyard
column, ratio = how many times better Dockyard is than Distribution
(ratio > 1: Dockyard better; for times that is Distribution's time / Dockyard's).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    MiB,
    BenchError,
    Row,
    best_of,
    curl_download,
    format_table,
    helpers,
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
    repeats: int             # best-of for push/pull timings
    wrk_seconds: int
    blob_fetches: int

    @staticmethod
    def of(quick: bool) -> "Plan":
        if quick:
            return Plan(4, 16 * MiB, 30, 16 * 1024, 1, 2, 3)
        return Plan(4, 64 * MiB, 100, 16 * 1024, 2, 5, 5)


@dataclass(frozen=True)
class Images:
    big: helpers.LayoutImage
    small: helpers.LayoutImage
    big_bytes: int
    small_bytes: int


def make_images(work: Path, plan: Plan) -> Images:
    big = helpers.write_oci_layout(work / "big", layer_sizes=[plan.big_layer_size] * plan.big_layers,
                                   tag="big")
    small = helpers.write_oci_layout(work / "small",
                                     layer_sizes=[plan.small_layer_size] * plan.small_layers, tag="small")

    def size(image: helpers.LayoutImage) -> int:
        blobs = image.path / "blobs" / "sha256"
        return sum((blobs / d.split(":")[1]).stat().st_size for d in image.layers)

    return Images(big, small, size(big), size(small))


class Skopeo:
    def __init__(self, policy: Path):
        self.binary = need_tool("skopeo")
        self.policy = policy

    def copy(self, src: str, dest: str, *extra: str) -> None:
        sh([self.binary, "--policy", str(self.policy), "copy", "-q", "--src-tls-verify=false",
            "--dest-tls-verify=false", *extra, src, dest], timeout=300)


def push_fresh(skopeo: Skopeo, image: helpers.LayoutImage, host: str, repo: str) -> str:
    """Push to a repository name never used before: every blob is really uploaded."""
    dest = f"docker://{host}/{repo}:{image.tag}"
    skopeo.copy(image.ref, dest, "--preserve-digests")
    return dest


def pull_into(skopeo: Skopeo, remote: str, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    skopeo.copy(remote, f"oci:{target}:x", "--dest-oci-accept-uncompressed-layers")


def measure(label: str, server: helpers.RegistryServer, rows: dict[str, Row], images: Images,
            plan: Plan, skopeo: Skopeo, work: Path) -> None:
    host, url = server.host, server.url

    def record(name: str, unit: str, higher: bool, value: float) -> None:
        rows.setdefault(name, Row(name, unit, higher)).values[label] = value
        print(f"  {label:>16}  {name:<34} {value:10.2f} {unit}", file=sys.stderr)

    counter = iter(range(1_000_000))
    big_mib = images.big_bytes / MiB
    small_n = len(images.small.layers)

    # push: a fresh repo each time, so blobs are uploaded, not found
    push_big = best_of(plan.repeats, lambda: push_fresh(skopeo, images.big, host, f"bench/big{next(counter)}"))
    record(f"push {plan.big_layers}x{plan.big_layer_size // MiB}MiB image (skopeo)", "MB/s", True,
           big_mib / push_big)
    # a later push reuses the same blob store: dedup path; keep one reference repo
    big_remote = push_fresh(skopeo, images.big, host, "bench/big")
    push_small = best_of(plan.repeats, lambda: push_fresh(skopeo, images.small, host,
                                                          f"bench/small{next(counter)}"))
    record(f"push {small_n}-layer image (skopeo)", "s", False, push_small)
    small_remote = push_fresh(skopeo, images.small, host, "bench/small")

    pulled = work / f"pull-{label.replace(' ', '_')}"
    pull_big = best_of(plan.repeats, lambda: pull_into(skopeo, big_remote, pulled))
    record(f"pull {plan.big_layers}x{plan.big_layer_size // MiB}MiB image (skopeo)", "MB/s", True,
           big_mib / pull_big)
    pull_small = best_of(plan.repeats, lambda: pull_into(skopeo, small_remote, pulled))
    record(f"pull {small_n}-layer image (skopeo)", "s", False, pull_small)

    def pull_four() -> None:
        parallel(4, lambda i: pull_into(skopeo, big_remote, work / f"{pulled.name}-{i}"))
    four = timed(pull_four)
    record("4 concurrent pulls, big image", "MB/s", True, 4 * big_mib / four)
    for i in range(4):
        shutil.rmtree(work / f"{pulled.name}-{i}", ignore_errors=True)
    shutil.rmtree(pulled, ignore_errors=True)

    manifest = wrk(f"{url}/v2/bench/big/manifests/big", seconds=plan.wrk_seconds,
                   headers=[f"Accept: {helpers.MANIFEST_ACCEPT}"])
    if manifest.non_2xx or manifest.errors:
        raise BenchError(f"{label}: manifest GET had {manifest.non_2xx} non-2xx, {manifest.errors} errors")
    record("manifest GET (wrk -c32)", "req/s", True, manifest.requests_per_second)
    if manifest.latency_p99_ms is not None:
        record("manifest GET p99 latency", "ms", False, manifest.latency_p99_ms)
    tags = wrk(f"{url}/v2/bench/big/tags/list", seconds=plan.wrk_seconds)
    if tags.non_2xx or tags.errors:
        raise BenchError(f"{label}: tags list had {tags.non_2xx} non-2xx, {tags.errors} errors")
    record("tags list (wrk -c32)", "req/s", True, tags.requests_per_second)

    layer = images.big.layers[0]
    layer_size = (images.big.path / "blobs" / "sha256" / layer.split(":")[1]).stat().st_size
    blob_url = f"{url}/v2/bench/big/blobs/{layer}"
    seconds = sum(curl_download(blob_url, layer_size) for _ in range(plan.blob_fetches))
    record("blob GET, one client (curl)", "MB/s", True, plan.blob_fetches * layer_size / MiB / seconds)
    start = time.perf_counter()
    parallel(4, lambda _: [curl_download(blob_url, layer_size) for _ in range(plan.blob_fetches)])
    elapsed = time.perf_counter() - start
    record("blob GET, 4 clients (curl)", "MB/s", True, 4 * plan.blob_fetches * layer_size / MiB / elapsed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2",
                        help="Dockyard worker counts to run, comma-separated (default 1,2)")
    parser.add_argument("--quick", action="store_true", help="smaller images, shorter runs")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--workdir", help="where to put images and storage (default: a temp dir)")
    args = parser.parse_args(argv)
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        parser.error("--workers takes numbers, e.g. 1,2")
    plan = Plan.of(args.quick)
    started = time.perf_counter()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="dy-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    servers: list[helpers.RegistryServer] = []
    try:
        need_tool("docker-registry"), need_tool("wrk"), need_tool("curl")
        policy = work / "policy.json"
        policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
        skopeo = Skopeo(policy)
        print(f"preparing images in {work} ...", file=sys.stderr)
        images = make_images(work, plan)

        rows: dict[str, Row] = {}
        targets = [BASELINE] + [f"Dockyard w={w}" for w in workers]
        for label in targets:
            if label == BASELINE:
                server = helpers.launch_distribution(work / "distribution")
            else:
                n = int(label.split("=")[1])
                server = helpers.launch_dockyard(work / f"dockyard-w{n}", workers=n,
                                                 log_path=work / f"dockyard-w{n}.log")
            servers.append(server)
            print(f"{label}: {server.url}", file=sys.stderr)
            try:
                measure(label, server, rows, images, plan, skopeo, work)
            finally:
                server.stop()
                # free the disk between targets: 4 x 64 MiB per push adds up
                shutil.rmtree(server.storage, ignore_errors=True)

        total = time.perf_counter() - started
        if args.json:
            print(rows_as_json(list(rows.values()), targets, BASELINE, quick=args.quick,
                               cpus=os.cpu_count(), seconds=round(total, 1)))
        else:
            print(f"\nDockyard vs CNCF Distribution 2.8, loopback, {os.cpu_count()} CPUs, "
                  f"{'quick' if args.quick else 'full'} run in {total:.0f}s")
            print("ratio = how many times better Dockyard is than Distribution "
                  "(>1: Dockyard better; ↑ higher is better, ↓ lower is better)\n")
            print(format_table(list(rows.values()), targets, BASELINE))
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
