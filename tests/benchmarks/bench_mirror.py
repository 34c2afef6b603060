"""Mirror bundle speed, side by side with skopeo, in one run:

    export  `dockyard mirror export --images REF -o B`   vs `skopeo copy docker://REF oci-archive:B`
    import  `dockyard mirror import B --to REGISTRY`      vs `skopeo copy oci-archive:B docker://...`
    sync    `dockyard mirror sync CONFIG`                  vs `skopeo sync --src yaml`: every image into an
            empty registry, then again with nothing to do

    python tests/benchmarks/bench_mirror.py [--registry dockyard|distribution] [--repeats N]
                                            [--quick] [--no-debian] [--json]

Images are those of bench_pull.py (4 x 64 MiB random layers; a debootstrap
Debian root filesystem in one layer). Every import goes to a registry
started on empty storage (not timed), so every blob crosses the wire. The
runs of the two tools alternate and the best of N is kept. Ratio > 1 means
dockyard is faster than skopeo. After the table: the sizes of a full bundle
and of the delta bundle after one layer of the big image changed (skopeo
has no delta: it carries the whole image again).
"""

from __future__ import annotations

import json
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (BenchError, ClientBench, MiB, Row, client_bench_parser, content, format_table,
                     rows_as_json, timed)
from bench_pull import big_layout, debian_layout, start_registry
from bench_push import layout_bytes, run

BASELINE = "skopeo"
TARGETS = ["dockyard", "skopeo"]


def changed_layout(cache: Path, base: Path, size: int) -> Path:
    """The big image with its last layer replaced: what a one-layer update looks like."""
    directory = cache / f"{base.name}-changed"
    if not (directory / "index.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix="changed-", dir=cache))
        blobs = sorted((p for p in (base / "blobs" / "sha256").iterdir() if p.stat().st_size > size // 2),
                       key=lambda p: p.name)
        layers = [p.read_bytes() for p in blobs[:3]]
        layers.append(content.gzip_bytes(content.random_tar_layer(size, name="layer3.bin")))
        content.write_oci_layout(tmp, layers, tag="big", layer_media_type=content.OCI_LAYER_GZIP)
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
    return directory


def sync_rows(source, names: list[str], workdir: Path, env: dict, dockyard: list, skopeo: str,
              policy: Path, repeats: int, kind: str, total: int) -> list[Row]:
    """A first sync of every image into an empty registry (timed, best of N, a fresh
    target each time), then a sync that finds everything already there."""
    config = workdir / "sync.yml"
    skopeo_config = workdir / "skopeo-sync.yml"
    skopeo_config.write_text(f"{source.host}:\n  tls-verify: false\n  images:\n"
                             + "".join(f"    bench/{name}: ['1']\n" for name in names))

    def commands(target) -> dict[str, list]:
        config.write_text(f"target: {target.host}/dy\nimages:\n"
                          + "".join(f"  - {source.host}/bench/{name}:1\n" for name in names))
        return {"dockyard": [*dockyard, "mirror", "sync", "-q", config],
                "skopeo": [skopeo, "--policy", policy, "sync", "--src", "yaml", "--dest", "docker",
                           "--dest-tls-verify=false", skopeo_config, f"{target.host}/sk"]}

    full: dict[str, list[float]] = {tool: [] for tool in TARGETS}
    for attempt in range(repeats):
        for tool in TARGETS:
            storage = workdir / f"sync-full-{tool}-{attempt}"
            storage.mkdir()
            target = start_registry(kind, storage)
            try:
                full[tool].append(timed(lambda: run(commands(target)[tool], env)))
            finally:
                target.stop()
                shutil.rmtree(storage, ignore_errors=True)
    rows = [Row(f"sync {len(names)} images ({total / MiB:.0f} MiB)", "s", False,
                {tool: min(v) for tool, v in full.items()})]
    (workdir / "sync-target").mkdir()
    target = start_registry(kind, workdir / "sync-target")
    try:
        argvs = commands(target)
        for argv in argvs.values():
            run(argv, env)                                  # the first sync copies: not timed
        times = {tool: min(timed(lambda: run(argv, env)) for _ in range(repeats)) for tool, argv in argvs.items()}
        rows.append(Row(f"no-change sync ({len(names)} images)", "s", False, times))
        # the same, as a round of a running `--interval` sync (no interpreter start-up)
        rows.append(Row("  a round of --interval", "s", False,
                        {"dockyard": interval_round(argvs["dockyard"], env, repeats), "skopeo": times["skopeo"]}))
    finally:
        target.stop()
    return rows


def interval_round(argv: list, env: dict, repeats: int) -> float:
    """The fastest of `repeats` rounds (after the first) of `mirror sync --interval`, as each
    round's summary times itself; stopped with SIGTERM (bounded: 120 s)."""
    argv = [str(a) for a in argv if a != "-q"] + ["--json", "--interval", "0.05"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    rounds: list[dict] = []
    deadline = time.monotonic() + 120
    try:
        while len(rounds) < repeats + 1 and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 0.5)[0]:
                rounds.append(json.loads(proc.stdout.readline()))      # --json: one line per round
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    if len(rounds) < repeats + 1:
        raise BenchError(f"mirror sync --interval: {len(rounds)} rounds in 120 s ({proc.stderr.read()[-500:]!r})")
    return min(r["seconds"] for r in rounds[1:])


def main() -> int:
    parser = client_bench_parser(__doc__)
    args = parser.parse_args()
    bench = ClientBench.setup(args, "mirror")
    repeats, size, cache, skopeo = bench.repeats, bench.size, bench.cache, bench.skopeo
    workdir, dockyard, env, policy = bench.workdir, bench.dockyard, bench.env, bench.policy
    skopeo_copy = [skopeo, "--policy", str(policy), "copy", "-q", "--preserve-digests",
                   "--src-tls-verify=false", "--dest-tls-verify=false"]
    try:
        images = {"big": (big_layout(cache, 4, size), "big")}
        if not args.no_debian:
            images["debian"] = (debian_layout(cache), "debian")
        (workdir / "source").mkdir()
        source = start_registry(args.registry, workdir / "source")
        rows = []
        sizes: list[str] = []
        try:
            for name, (layout, tag) in images.items():
                run([*dockyard, "push", "-q", f"oci:{layout}:{tag}", f"{source.host}/bench/{name}:1"], env)
            for name, (layout, tag) in images.items():
                total = layout_bytes(layout)
                ref = f"{source.host}/bench/{name}:1"
                bundles = {tool: workdir / f"{name}-{tool}.tar" for tool in TARGETS}
                export = {
                    "dockyard": [*dockyard, "mirror", "export", "-q", "--images", ref, "--output",
                                 bundles["dockyard"]],
                    "skopeo": [*skopeo_copy, f"docker://{ref}", f"oci-archive:{bundles['skopeo']}:{ref}"],
                }
                times: dict[str, list[float]] = {tool: [] for tool in TARGETS}
                imports: dict[str, list[float]] = {tool: [] for tool in TARGETS}
                for attempt in range(repeats):
                    for tool in TARGETS:
                        bundles[tool].unlink(missing_ok=True)
                        times[tool].append(timed(lambda: run(export[tool], env)))
                        storage = workdir / f"import-{tool}-{name}-{attempt}"
                        storage.mkdir()
                        registry = start_registry(args.registry, storage)
                        try:
                            argv = ([*dockyard, "mirror", "import", "-q", bundles[tool], "--to",
                                     f"{registry.host}/mirror"] if tool == "dockyard" else
                                    [*skopeo_copy, f"oci-archive:{bundles[tool]}",
                                     f"docker://{registry.host}/mirror/bench/{name}:1"])
                            imports[tool].append(timed(lambda: run(argv, env)))
                        finally:
                            registry.stop()
                            shutil.rmtree(storage, ignore_errors=True)
                for operation, measured in (("export", times), ("import", imports)):
                    row = Row(f"{operation} {name} ({total / MiB:.0f} MiB)", "s", False,
                              {t: min(v) for t, v in measured.items()})
                    rows.append(row)
                    rows.append(Row(f"  {name} throughput", "MiB/s", True,
                                    {t: total / MiB / v for t, v in row.values.items() if v}))
                sizes.append(f"full bundle of {name}: dockyard {bundles['dockyard'].stat().st_size / MiB:.1f} MiB, "
                             f"skopeo {bundles['skopeo'].stat().st_size / MiB:.1f} MiB")
            rows += sync_rows(source, list(images), workdir, env, dockyard, skopeo, policy, repeats, args.registry,
                              sum(layout_bytes(layout) for layout, _ in images.values()))
            # one layer of the big image changes: the delta against the full bundle
            changed = changed_layout(cache, images["big"][0], size)
            run([*dockyard, "push", "-q", f"oci:{changed}:big", f"{source.host}/bench/big:1"], env)
            delta = workdir / "big-delta.tar"
            run([*dockyard, "mirror", "export", "-q", "--images", f"{source.host}/bench/big:1", "--since",
                 workdir / "big-dockyard.tar", "--output", delta], env)
            sizes.append(f"delta after one layer of big changed: dockyard {delta.stat().st_size / MiB:.1f} MiB "
                         f"(skopeo carries the whole image again: {layout_bytes(changed) / MiB:.1f} MiB)")
        finally:
            source.stop()
        if args.json:
            print(rows_as_json(rows, TARGETS, BASELINE, registry=args.registry, repeats=repeats, sizes=sizes))
        else:
            print(f"\nmirror bundles from and to a local {args.registry} registry on loopback, best of {repeats} "
                  f"(ratio = how many times faster than {BASELINE})\n")
            print(format_table(rows, TARGETS, BASELINE))
            print()
            print("\n".join(sizes))
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
