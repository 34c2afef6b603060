"""What metrics and JSON access logs cost: Dockyard with both on against
both off, and CNCF Distribution beside them, in one run on loopback.

    python tests/benchmarks/bench_ops.py [--workers 1] [--rounds 3] [--seconds 5] [--json]

Rows: manifest GET requests/second (wrk -t2 -c32) and blob GET MB/s (curl,
a 64 MiB blob four times in a row). Each round runs every target back to
back, in turn; the table gives the median of the rounds. The ratio column
of "ops on" is against "ops off" (target: at least 0.95x); Distribution's
column has its ratio against "ops off" too, for scale. The access lines go
to a log file, as they would to journald or a container log.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import MiB, Row, content, curl_download, format_table, launch, need_tool, rows_as_json, wrk

from tests.support.registry_http import push_blob, put_manifest

OFF, ON, PEER = "Dockyard ops off", "Dockyard ops on", "Distribution"
BLOB_SIZE = 64 * MiB
FETCHES = 4


def seed(url: str, blob: bytes) -> str:
    config = b"{}"
    config_digest = push_blob(url, "bench/ops", config)
    layer = push_blob(url, "bench/ops", blob)
    manifest = {"schemaVersion": 2, "mediaType": content.OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": config_digest, "size": len(config)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": layer, "size": len(blob)}]}
    assert put_manifest(url, "bench/ops", "latest", manifest).status == 201
    return layer


def hot_path_cost() -> dict[str, float]:
    """Microseconds a request spends in the figures and the access line,
    measured in this process (what the req/s rows mean, without the noise)."""
    import asyncio

    from registry.ops import metrics
    from registry.ops.middleware import _Series
    from registry.ops.requestlog import AccessWriter

    series, n = _Series(), 50_000
    start = time.perf_counter()
    for _ in range(n):
        metrics.IN_FLIGHT.inc()
        series.observe("/v2/{name}/manifests/{reference}", "GET", 200, 0.0004, 1000, 0)
        metrics.IN_FLIGHT.dec()
    figures = (time.perf_counter() - start) / n * 1e6

    async def lines() -> float:
        with open(os.devnull, "w") as sink:
            writer = AccessWriter("json", stream=sink)
            fields = {"remote": "127.0.0.1", "method": "GET", "path": "/v2/bench/ops/manifests/latest",
                      "query": "", "route": "/v2/{name}/manifests/{reference}", "status": 200,
                      "bytes_sent": 1000, "bytes_received": 0, "duration_ms": 0.4, "user_agent": "wrk"}
            began = time.perf_counter()
            for _ in range(n):
                writer.write('127.0.0.1 "GET /v2/bench/ops/manifests/latest" 200 1000 0.4ms', dict(fields),
                             "0123456789abcdef0123456789abcdef", time.time())
            writer.flush()
            return (time.perf_counter() - began) / n * 1e6

    return {"figures": figures, "json access line": asyncio.run(lines())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1, help="Dockyard worker processes (default 1)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5, help="seconds of each wrk run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    need_tool("wrk"), need_tool("curl"), need_tool("docker-registry")
    work = Path(tempfile.mkdtemp(prefix="dy-bench-ops-"))
    load_before = os.getloadavg()[0]
    blob = os.urandom(BLOB_SIZE)
    servers = {}
    try:
        servers[OFF] = launch.launch_dockyard(work / "off", workers=args.workers,
                                              env={"DOCKYARD_METRICS_ENABLED": "false"},
                                              log_path=work / "off.log")
        servers[ON] = launch.launch_dockyard(work / "on", workers=args.workers,
                                             extra_args=("--access-log", "--log-format", "json"),
                                             log_path=work / "on.log")
        servers[PEER] = launch.launch_distribution(work / "distribution")
        layers = {label: seed(server.url, blob) for label, server in servers.items()}
        rps: dict[str, list[float]] = {label: [] for label in servers}
        mbs: dict[str, list[float]] = {label: [] for label in servers}
        for round_ in range(args.rounds):
            order = list(servers)[round_ % 3:] + list(servers)[:round_ % 3]
            for label in order:
                url = servers[label].url
                result = wrk(f"{url}/v2/bench/ops/manifests/latest", seconds=args.seconds,
                             headers=[f"Accept: {content.OCI_MANIFEST}"])
                if result.non_2xx or result.errors:
                    raise RuntimeError(f"{label}: {result.non_2xx} non-2xx, {result.errors} errors")
                rps[label].append(result.requests_per_second)
                start = time.perf_counter()
                for _ in range(FETCHES):
                    curl_download(f"{url}/v2/bench/ops/blobs/{layers[label]}", BLOB_SIZE)
                mbs[label].append(FETCHES * BLOB_SIZE / MiB / (time.perf_counter() - start))
        access_lines = sum(1 for line in (work / "on.log").read_text().splitlines()
                           if '"logger":"dockyard.access"' in line)
        if access_lines < sum(1 for _ in range(args.rounds)):
            raise RuntimeError("the ops-on server wrote no access lines")
    finally:
        for server in servers.values():
            server.stop()
    rows = [Row("manifest GET (wrk -t2 -c32)", "req/s", True,
                {label: statistics.median(v) for label, v in rps.items()}),
            Row(f"blob GET, one client (curl, {FETCHES} x 64 MiB)", "MB/s", True,
                {label: statistics.median(v) for label, v in mbs.items()})]
    targets = [OFF, ON, PEER]
    costs = hot_path_cost()
    load = f"load average {load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end"
    if args.json:
        print(rows_as_json(rows, targets, OFF, workers=args.workers, rounds=args.rounds, load=load,
                           access_lines=access_lines, hot_path_us=costs))
    else:
        print(f"workers {args.workers}, {args.rounds} rounds, medians; {load}; "
              f"{access_lines} JSON access lines written by the ops-on server")
        print(format_table(rows, targets, OFF))
        print("hot path per request, in-process: " + ", ".join(f"{k} {v:.1f} us" for k, v in costs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
