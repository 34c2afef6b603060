"""Push and copy speed, side by side against one kind of local registry, in one run:

    push   `dockyard push oci:...`        vs `skopeo copy oci:... docker://...`
    copy   `dockyard copy SRC DST`        vs `skopeo copy docker://SRC docker://DST`
           (registry to registry: the source holds the image, the destination is fresh)

    python tests/benchmarks/bench_push.py [--registry dockyard|distribution] [--repeats N]
                                          [--quick] [--no-debian] [--json]

Images are those of bench_pull.py (4 x 64 MiB random layers; a debootstrap
Debian root filesystem in one layer), read from OCI layouts. Every timed
push or copy goes to a registry started on empty storage (not timed), so every blob
crosses the wire: neither client can skip a blob the registry already has
or mount it from another repository. The runs of the two clients alternate
and the best of N is kept. Ratio > 1 means dockyard is faster than skopeo.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from _common import (BenchError, ClientBench, MiB, Row, client_bench_parser, format_table,
                     rows_as_json, timed)
from bench_pull import big_layout, debian_layout, start_registry

BASELINE = "skopeo"
TARGETS = ["dockyard", "skopeo"]


def run(argv: list, env: dict) -> None:
    proc = subprocess.run([str(a) for a in argv], env=env, capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(map(str, argv))} failed ({proc.returncode}): {proc.stderr[-2000:]}")


def layout_bytes(layout: Path) -> int:
    return sum(p.stat().st_size for p in (layout / "blobs").rglob("*") if p.is_file())


def main() -> int:
    parser = client_bench_parser(__doc__)
    args = parser.parse_args()
    bench = ClientBench.setup(args, "push")
    repeats, size, cache, skopeo = bench.repeats, bench.size, bench.cache, bench.skopeo
    workdir, dockyard, env, policy = bench.workdir, bench.dockyard, bench.env, bench.policy
    try:
        images = {"big": (big_layout(cache, 4, size), "big")}
        if not args.no_debian:
            images["debian"] = (debian_layout(cache), "debian")
        skopeo_copy = [skopeo, "--policy", str(policy), "copy", "-q", "--preserve-digests",
                       "--src-tls-verify=false", "--dest-tls-verify=false"]
        (workdir / "source").mkdir()
        source = start_registry(args.registry, workdir / "source")
        operations = {
            "push": {
                "dockyard": lambda name, layout, tag, dest: [*dockyard, "push", "-q", f"oci:{layout}:{tag}", dest],
                "skopeo": lambda name, layout, tag, dest: [*skopeo_copy, f"oci:{layout}:{tag}", f"docker://{dest}"],
            },
            "copy": {
                "dockyard": lambda name, layout, tag, dest: [*dockyard, "copy", "-q",
                                                             f"{source.host}/bench/{name}:1", dest],
                "skopeo": lambda name, layout, tag, dest: [*skopeo_copy, f"docker://{source.host}/bench/{name}:1",
                                                           f"docker://{dest}"],
            },
        }
        rows = []
        try:
            for name, (layout, tag) in images.items():
                run([*dockyard, "push", "-q", f"oci:{layout}:{tag}", f"{source.host}/bench/{name}:1"], env)
            for operation, commands in operations.items():
                for name, (layout, tag) in images.items():
                    total = layout_bytes(layout)
                    times: dict[str, list[float]] = {tool: [] for tool in commands}
                    for attempt in range(repeats):
                        for tool, command in commands.items():
                            storage = workdir / f"{operation}-{tool}-{name}-{attempt}"
                            storage.mkdir()
                            registry = start_registry(args.registry, storage)
                            try:
                                argv = command(name, layout, tag, f"{registry.host}/bench/{name}:1")
                                times[tool].append(timed(lambda: run(argv, env)))
                            finally:
                                registry.stop()
                                shutil.rmtree(storage, ignore_errors=True)
                    row = Row(f"{operation} {name} ({total / MiB:.0f} MiB)", "s", False,
                              {t: min(v) for t, v in times.items()})
                    rows.append(row)
                    rows.append(Row(f"  {name} throughput", "MiB/s", True,
                                    {t: total / MiB / v for t, v in row.values.items() if v}))
        finally:
            source.stop()
        if args.json:
            print(rows_as_json(rows, TARGETS, BASELINE, registry=args.registry, repeats=repeats))
        else:
            print(f"\npush and copy to a fresh local {args.registry} registry on loopback, best of {repeats} "
                  f"(ratio = how many times faster than {BASELINE})\n")
            print(format_table(rows, TARGETS, BASELINE))
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
