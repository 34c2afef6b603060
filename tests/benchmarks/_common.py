"""Shared benchmark helpers: timing, wrk and curl drivers, the comparison table.

Benchmarks are scripts (`python tests/benchmarks/bench_*.py`), not pytest
tests; they reuse `tests.support` for servers and images (re-exported here
as `content`, `launch`, `peers` and `REPO_ROOT`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

# The one bootstrap of the test tree: a script run as
# `python tests/benchmarks/bench_X.py` has its own directory on sys.path (so
# `import _common` works) but not the checkout, which `tests.support` needs.
_CHECKOUT = str(Path(__file__).resolve().parents[2])
if _CHECKOUT not in sys.path:
    sys.path.insert(0, _CHECKOUT)

from tests.support import REPO_ROOT, content, launch, peers  # noqa: E402  (re-exported for the bench scripts)

MiB = 1024 * 1024


class BenchError(RuntimeError):
    """A benchmark step failed: the numbers would be meaningless."""


def compile_dockyard() -> None:
    """Byte-compile the checkout's packages, as `pip install` does: with
    PYTHONDONTWRITEBYTECODE set, a timed `dockyard` run would otherwise
    compile its modules anew every time."""
    import compileall
    for package in ("puller", "registry", "storage"):
        compileall.compile_dir(str(REPO_ROOT / package), quiet=1)


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise BenchError(f"{name} is not installed (bash tests/run.sh installs the peers)")
    return path


def sh(argv: Sequence[str], timeout: float = 300) -> str:
    """Run a command; BenchError with its stderr when it fails."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(map(str, argv))} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(n: int, fn: Callable[[], object], before: Callable[[], object] | None = None) -> float:
    """The fastest of n timed calls (less noise from a 2-core machine); `before`
    runs untimed ahead of each call (e.g. to reset state)."""
    times = []
    for _ in range(n):
        if before:
            before()
        times.append(timed(fn))
    return min(times)


def parallel(n: int, fn: Callable[[int], object]) -> list:
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(fn, range(n)))


# ---- wrk ---------------------------------------------------------------------------

@dataclass(frozen=True)
class WrkResult:
    requests_per_second: float
    requests: int
    non_2xx: int
    errors: int
    latency_p99_ms: float | None


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk(url: str, *, threads: int = 2, connections: int = 32, seconds: int = 5,
        headers: Sequence[str] = (), timeout: int | None = None) -> WrkResult:
    """Run wrk against url (http:// or https://; wrk checks no certificate);
    requests/second plus the failures it saw. `timeout`: seconds before wrk
    counts a request as timed out (its default is 2)."""
    argv = [need_tool("wrk"), f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if timeout is not None:
        argv += ["--timeout", f"{timeout}s"]
    for header in headers:
        argv += ["-H", header]
    out = sh([*argv, url], timeout=seconds + 60)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rps or not total:
        raise BenchError(f"cannot read wrk output:\n{out}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s|m)\b", out)
    return WrkResult(
        requests_per_second=float(rps.group(1)),
        requests=int(total.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        errors=sum(int(g) for g in errors.groups()) if errors else 0,
        latency_p99_ms=_ms(*p99.groups()) if p99 else None,
    )


# ---- blob downloads ------------------------------------------------------------------

def curl_download(url: str, expected_size: int, extra: Sequence[str] = ()) -> float:
    """Seconds to GET url into /dev/null; BenchError unless exactly expected_size bytes came.
    `extra`: more curl arguments (-H for a header, --cacert for https)."""
    out = sh([need_tool("curl"), "-s", "-f", "-o", "/dev/null", "-w", "%{size_download} %{time_total}",
              *extra, url], timeout=120)
    size, seconds = out.split()
    if int(float(size)) != expected_size:
        raise BenchError(f"{url}: got {size} bytes, expected {expected_size}")
    return float(seconds)


# ---- results table ---------------------------------------------------------------------

@dataclass
class Row:
    """One measured quantity on every target. `higher_is_better` says the direction."""
    name: str
    unit: str
    higher_is_better: bool
    values: dict[str, float] = field(default_factory=dict)   # target label -> value

    def ratio(self, target: str, baseline: str) -> float | None:
        """How many times better `target` is than `baseline` (>1: target better)."""
        a, b = self.values.get(target), self.values.get(baseline)
        if not a or not b:
            return None
        return a / b if self.higher_is_better else b / a


def format_table(rows: Sequence[Row], targets: Sequence[str], baseline: str) -> str:
    """Plain-text table: one column per target, and a ratio to the baseline for the others."""
    header = ["measure", "unit"]
    for target in targets:
        header.append(target)
        if target != baseline:
            header.append(f"ratio {target}")
    lines = [header]
    for row in rows:
        cells = [row.name, row.unit + (" ↑" if row.higher_is_better else " ↓")]
        for target in targets:
            value = row.values.get(target)
            cells.append("-" if value is None else (f"{value:,.0f}" if value >= 100 else f"{value:.2f}"))
            if target != baseline:
                ratio = row.ratio(target, baseline)
                cells.append("-" if ratio is None else f"{ratio:.2f}x")
        lines.append(cells)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                             for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def rows_as_json(rows: Sequence[Row], targets: Sequence[str], baseline: str, **meta) -> str:
    return json.dumps({
        "baseline": baseline,
        "targets": list(targets),
        "ratio_meaning": "ratio > 1 means the target is better than the baseline",
        **meta,
        "rows": [{**asdict(row), "ratios": {t: row.ratio(t, baseline) for t in targets if t != baseline}}
                 for row in rows],
    }, indent=2)


# ---- the client benchmarks' shared command line and setup (bench_pull, bench_push, bench_mirror)

def client_bench_parser(doc: str | None) -> "argparse.ArgumentParser":
    import argparse
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", choices=["dockyard", "distribution"], default="dockyard")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="4 x 16 MiB instead of 4 x 64 MiB, one run")
    parser.add_argument("--no-debian", action="store_true")
    parser.add_argument("--json", action="store_true")
    return parser


@dataclass
class ClientBench:
    """What a client benchmark's run shares: its plan, the image cache, the
    peer and the environment every command runs in."""
    repeats: int
    size: int            # bytes of each of the big image's four layers
    cache: Path
    skopeo: str
    workdir: Path
    dockyard: list[str]
    env: dict[str, str]
    policy: Path         # a containers policy accepting anything, for skopeo

    @classmethod
    def setup(cls, args, name: str) -> "ClientBench":
        import os
        import tempfile
        cache = Path(os.environ.get("DOCKYARD_BENCH_CACHE") or Path.home() / ".cache" / "dockyard-bench")
        cache.mkdir(parents=True, exist_ok=True)
        skopeo = need_tool("skopeo")
        compile_dockyard()
        workdir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        policy = workdir / "policy.json"
        policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
        return cls(repeats=1 if args.quick else args.repeats, size=(16 if args.quick else 64) * MiB,
                   cache=cache, skopeo=skopeo, workdir=workdir, dockyard=[*launch.dockyard_command()],
                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT),
                        "DOCKER_CONFIG": str(workdir / "no-docker-config")},
                   policy=policy)
