"""Dockyard's online garbage collection vs CNCF Distribution's offline one.

    python tests/benchmarks/bench_gc.py [--manifests 10000] [--blobs 50000] [--quick] [--json]

Builds one synthetic store in the layout both share (storage/layout.py):
repositories of small images (a config and layers each, blobs of 64 bytes),
a fifth of the manifests deleted by digest (their blobs unreferenced), all
files dated a day back. Two copies: `dockyard gc --grace 0` runs on one,
`docker-registry garbage-collect` (offline: nothing serves the root while it
runs) on the other, in the same run. Rows: wall time, Dockyard's mark and
sweep phases, peak memory (the process's maximum RSS, from wait4), blobs
deleted (both must agree). Then pushes: N small images pushed to a
`dockyard serve` on the collected copy, once alone and once while GC passes
run over the same root; Distribution cannot collect while serving, "-".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common
from _common import REPO_ROOT, BenchError, Row, format_table, need_tool, rows_as_json
from tests.support.launch import dockyard_command, distribution_config, free_port, launch_dockyard
from tests.support.registry_http import push_blob, put_manifest

V2 = "docker/registry/v2"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _blob(root: Path, data: bytes) -> str:
    hex_ = hashlib.sha256(data).hexdigest()
    _write(root / V2 / "blobs/sha256" / hex_[:2] / hex_ / "data", data)
    return f"sha256:{hex_}"


def _link(path: Path, digest: str) -> None:
    _write(path, digest.encode())


def build_store(root: Path, manifests: int, blobs: int) -> dict:
    """The synthetic store; what it holds and how much of it is garbage."""
    repos = max(1, manifests // 100)
    per_manifest = max(2, blobs // manifests)
    garbage_blobs = deleted = 0
    for n in range(manifests):
        repo = f"bench/repo-{n % repos:04d}"
        repo_dir = root / V2 / "repositories" / repo
        digests = [_blob(root, f"blob {n} {k} ".encode().ljust(64, b"."))  for k in range(per_manifest)]
        for d in digests:
            _link(repo_dir / "_layers/sha256" / d[7:] / "link", d)
        doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
               "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digests[0], "size": 64},
               "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": 64}
                          for d in digests[1:]]}
        manifest = _blob(root, json.dumps(doc).encode())
        if n % 5 == 4:                      # deleted by digest: revision and tag gone, links left
            deleted += 1
            garbage_blobs += per_manifest + 1
            continue
        _link(repo_dir / "_manifests/revisions/sha256" / manifest[7:] / "link", manifest)
        tag_dir = repo_dir / "_manifests/tags" / f"t{n // repos}"
        _link(tag_dir / "index/sha256" / manifest[7:] / "link", manifest)
        _link(tag_dir / "current/link", manifest)
    for r in range(repos):
        _write(root / V2 / "_catalog" / f"bench+repo-{r:04d}", b"")
    _write(root / V2 / "_dockyard/indexed-v1", b"0\n")
    old = time.time() - 86400
    for dirpath, _, files in os.walk(root):
        for name in files:
            os.utime(os.path.join(dirpath, name), (old, old))
    return {"manifests": manifests, "blobs": manifests * (per_manifest + 1), "deleted_manifests": deleted,
            "garbage_blobs": garbage_blobs}


def run_measured(argv: list[str], env: dict | None = None) -> tuple[float, int, str, str]:
    """(wall seconds, peak RSS in MiB, stdout, stderr) of a command."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=REPO_ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise BenchError(f"{argv[0]} {argv[1]} failed ({proc.returncode}): {stderr[-1500:]}")
    return wall, usage.ru_maxrss // 1024, stdout, stderr


def count_blobs(root: Path) -> int:
    return sum(1 for _ in (root / V2 / "blobs").glob("sha256/*/*/data"))


def push_images(url: str, count: int, tag_prefix: str) -> float:
    """Seconds to push `count` small images (fresh blobs each), 4 clients at once."""
    def one(n: int) -> None:
        config = json.dumps({"architecture": "amd64", "os": "linux", "n": n, "p": tag_prefix}).encode()
        layer = os.urandom(4096)
        digests = [push_blob(url, "bench/pushed", config), push_blob(url, "bench/pushed", layer)]
        doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
               "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digests[0],
                          "size": len(config)},
               "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digests[1],
                           "size": len(layer)}]}
        put = put_manifest(url, "bench/pushed", f"{tag_prefix}{n}", doc)
        if put.status != 201:
            raise BenchError(f"push failed: {put.status} {put.body[:200]}")

    started = time.perf_counter()
    _common.parallel(4, lambda k: [one(n) for n in range(k, count, 4)])
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifests", type=int, default=10_000)
    parser.add_argument("--blobs", type=int, default=50_000)
    parser.add_argument("--pushes", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="1,000 manifests, 5,000 blobs, 50 pushes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.manifests, args.blobs, args.pushes = 1000, 5000, 50
    registry_bin = need_tool("docker-registry")
    _common.compile_dockyard()
    work = Path(tempfile.mkdtemp(prefix="bench-gc-"))
    try:
        print(f"building {args.manifests} manifests / {args.blobs} blobs ...", file=sys.stderr)
        built = build_store(work / "dockyard", args.manifests, args.blobs)
        shutil.copytree(work / "dockyard", work / "distribution", symlinks=True)
        before = count_blobs(work / "dockyard")
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TMPDIR": str(work)}

        dy_wall, dy_rss, dy_out, _ = run_measured(
            [*dockyard_command(), "gc", "--storage", str(work / "dockyard"), "--grace", "0", "--json", "--quiet"], env)
        report = json.loads(dy_out)
        config = work / "distribution.yml"
        import yaml
        config.write_text(yaml.safe_dump(distribution_config(work / "distribution", free_port(), "error")))
        di_wall, di_rss, _, _ = run_measured([registry_bin, "garbage-collect", str(config)])
        dy_deleted = before - count_blobs(work / "dockyard")
        di_deleted = before - count_blobs(work / "distribution")
        if dy_deleted != built["garbage_blobs"] or di_deleted != built["garbage_blobs"]:
            raise BenchError(f"blobs deleted disagree: expected {built['garbage_blobs']}, "
                             f"Dockyard {dy_deleted}, Distribution {di_deleted}")

        # Pushes with and without GC passes running over the same root.
        server = launch_dockyard(work / "dockyard", log_path=work / "serve.log")
        try:
            alone = push_images(server.url, args.pushes, "alone-")
            stop = threading.Event()
            passes = []

            def gc_loop() -> None:
                while not stop.is_set():
                    passes.append(run_measured([*dockyard_command(), "gc", "--storage", str(work / "dockyard"),
                                                "--grace", "3600", "--json", "--quiet"], env)[0])

            runner = threading.Thread(target=gc_loop)
            runner.start()
            time.sleep(0.5)
            during = push_images(server.url, args.pushes, "during-")
            stop.set()
            runner.join()
        finally:
            server.stop()

        rows = [
            Row("GC wall time (whole store)", "s", False, {"dockyard": dy_wall, "distribution": di_wall}),
            Row("  mark", "s", False, {"dockyard": report["phases"].get("mark", 0)}),
            Row("  sweep", "s", False, {"dockyard": report["phases"].get("sweep", 0)}),
            Row("GC peak memory (max RSS)", "MiB", False, {"dockyard": dy_rss, "distribution": di_rss}),
            Row("blobs deleted", "count", True, {"dockyard": dy_deleted, "distribution": di_deleted}),
            Row(f"{args.pushes} pushes, no GC", "s", False, {"dockyard": alone}),
            Row(f"{args.pushes} pushes, GC passes running", "s", False, {"dockyard": during}),
        ]
        slowdown = during / alone if alone else None
        load = os.getloadavg()
        meta = {"store": built, "gc_passes_during_pushes": len(passes), "push_slowdown": slowdown,
                "load_average": load}
        if args.json:
            print(rows_as_json(rows, ["dockyard", "distribution"], "distribution", **meta))
        else:
            print(format_table(rows, ["dockyard", "distribution"], "distribution"))
            print(f"\nstore: {built}; pushes during GC / alone = {slowdown:.2f}x "
                  f"({len(passes)} GC passes ran meanwhile); load average {load[0]:.2f} {load[1]:.2f}")
        return 0
    except BenchError as exc:
        print(f"bench_gc: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
