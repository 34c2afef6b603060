"""Pull speed: `dockyard pull` vs `skopeo copy docker://... oci:...` vs `docker pull`,
side by side against one local registry, in one run.

    python tests/benchmarks/bench_pull.py [--registry dockyard|distribution] [--quick]
                                          [--repeats N] [--no-debian] [--no-docker] [--json]

Images:
  big     4 x 64 MiB layers of random (incompressible) bytes
  debian  a real Debian root filesystem: `debootstrap --variant=minbase bookworm`
          from the mirror configured in /etc/apt, tarred and gzipped into one
          layer (tests.support.debian); cached between runs under
          $DOCKYARD_BENCH_CACHE (default ~/.cache/dockyard-bench)

Every run starts from an empty destination (fresh store / layout / docker
image store), so all bytes cross the wire each time; the best of N runs is
kept. skopeo and dockyard only download and verify; docker pull also
decompresses and extracts layers (shown for reference). Ratio > 1 means
dockyard is faster than the baseline (skopeo).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import (BenchError, ClientBench, MiB, Row, client_bench_parser, content, format_table,
                     launch, need_tool, peers, rows_as_json, sh, timed)

from tests.support.debian import debian_layer  # noqa: E402  (built once, cached by its inputs)

BASELINE = "skopeo"
# "dockyard transfer": the same dockyard runs, timed inside the process (the pull
# without the Python interpreter's start-up and imports)
TARGETS = ["dockyard", "dockyard transfer", "skopeo", "docker"]


def big_layout(cache: Path, layers: int, size: int) -> Path:
    directory = cache / f"big-{layers}x{size // MiB}MiB"
    if not (directory / "index.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix="big-", dir=cache))
        blobs = [content.gzip_bytes(content.random_tar_layer(size, name=f"layer{i}.bin")) for i in range(layers)]
        content.write_oci_layout(tmp, blobs, tag="big", layer_media_type=content.OCI_LAYER_GZIP)
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
    return directory


def debian_layout(cache: Path) -> Path:
    directory = cache / "debian-slim-layout"
    if not (directory / "index.json").is_file():
        layer = debian_layer(cache).read_bytes()
        diff_id = content.sha256_digest(gzip.decompress(layer))
        config = content.image_config([diff_id], cmd=["/bin/bash"])
        config["config"]["Env"] = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
        tmp = Path(tempfile.mkdtemp(prefix="debian-", dir=cache))
        content.write_oci_layout(tmp, [layer], config, tag="debian", layer_media_type=content.OCI_LAYER_GZIP)
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
    return directory


def start_registry(kind: str, workdir: Path):
    if kind == "distribution":
        return launch.launch_distribution(workdir / "distribution")
    return launch.launch_dockyard(workdir / "dockyard-storage", log_path=workdir / "dockyard.log")


def start_dockerd(workdir: Path):
    """A private dockerd (no bridge, no iptables) trusting loopback registries."""
    daemon = need_tool("dockerd")
    data_root = workdir / "docker-data"
    data_root.mkdir()
    exec_root = Path(tempfile.mkdtemp(prefix="dy-bexec-", dir="/tmp"))
    sock = exec_root / "docker.sock"

    argv = [daemon, "--data-root", str(data_root), "--exec-root", str(exec_root), "-H", f"unix://{sock}",
            "--pidfile", str(workdir / "docker.pid"), "--bridge=none", "--iptables=false", "--ip-masq=false",
            "--ip-forward=false", "--insecure-registry", "127.0.0.0/8", "--userland-proxy=false"]
    server = launch.ServerProcess(argv, ready_check=lambda: peers.docker_ping(sock),
                                   log_path=workdir / "dockerd.log", name="dockerd", grace=20)
    server.start(60)
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}", "DOCKER_CONFIG": str(workdir / "docker-client")}
    return server, env, exec_root


def best(repeats: int, run, reset) -> float:
    times = []
    for _ in range(repeats):
        reset()
        times.append(timed(run))
    return min(times)


def main() -> int:
    parser = client_bench_parser(__doc__)
    parser.add_argument("--no-docker", action="store_true")
    args = parser.parse_args()
    bench = ClientBench.setup(args, "pull")
    repeats, size, cache, skopeo = bench.repeats, bench.size, bench.cache, bench.skopeo
    workdir, dockyard, env, policy = bench.workdir, bench.dockyard, bench.env, bench.policy
    registry = start_registry(args.registry, workdir)
    docker = None
    try:
        images = {"big": big_layout(cache, 4, size)}
        if not args.no_debian:
            images["debian"] = debian_layout(cache)
        if not args.no_docker:
            try:
                docker = start_dockerd(workdir)
            except (BenchError, RuntimeError) as exc:
                print(f"docker column skipped: {exc}", file=sys.stderr)
        rows = []
        for name, layout in images.items():
            tag = "big" if name == "big" else "debian"
            ref = f"{registry.host}/bench/{name}:1"
            subprocess.run([*dockyard, "push", "-q", f"oci:{layout}:{tag}", ref], env=env, check=True)
            total = sum(int(l["size"]) for l in json.loads(subprocess.run(
                [*dockyard, "inspect", "--remote", ref], env=env, check=True, capture_output=True,
                text=True).stdout)["manifest"]["layers"])
            row = Row(f"pull {name} ({total / MiB:.0f} MiB)", "s", False)
            store = workdir / "store"
            out = workdir / "oci-out"

            def clear(path: Path) -> None:
                shutil.rmtree(path, ignore_errors=True)
            inner: list[float] = []

            def dockyard_pull() -> None:
                out = subprocess.run([*dockyard, "pull", "--json", "--store", str(store), ref], env=env,
                                     check=True, capture_output=True, text=True).stdout
                inner.append(json.loads(out)["seconds"])
            row.values["dockyard"] = best(repeats, dockyard_pull, lambda: clear(store))
            row.values["dockyard transfer"] = min(inner)
            row.values["skopeo"] = best(repeats, lambda: sh(
                [skopeo, "--policy", str(policy), "copy", "-q", "--src-tls-verify=false", f"docker://{ref}",
                 f"oci:{out}:{tag}"], timeout=900), lambda: clear(out))
            if docker:
                _, denv, _ = docker

                def docker_reset() -> None:
                    subprocess.run(["docker", "rmi", "-f", ref], env=denv, capture_output=True)
                    subprocess.run(["docker", "image", "prune", "-f"], env=denv, capture_output=True)
                row.values["docker"] = best(repeats, lambda: subprocess.run(
                    ["docker", "pull", "-q", ref], env=denv, check=True, capture_output=True), docker_reset)
            rows.append(row)
            mibps = Row(f"  {name} throughput", "MiB/s", True,
                        {t: total / MiB / v for t, v in row.values.items() if v})
            rows.append(mibps)
        targets = [t for t in TARGETS if any(t in r.values for r in rows)]
        if args.json:
            print(rows_as_json(rows, targets, BASELINE, registry=args.registry, repeats=repeats))
        else:
            print(f"\npull from a local {args.registry} registry on loopback, best of {repeats} "
                  f"(ratio = how many times faster than {BASELINE}; docker pull also extracts layers)\n")
            print(format_table(rows, targets, BASELINE))
        return 0
    finally:
        if docker:
            server, _, exec_root = docker
            server.stop()
            subprocess.run(["umount", "-l", str(workdir / "docker-data")], capture_output=True)
            shutil.rmtree(exec_root, ignore_errors=True)
        registry.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
