"""Pull + unpack: Dockyard vs `docker pull` vs `skopeo copy` + `umoci unpack`.

    python tests/benchmarks/bench_unpack.py [--runs N] [--skip-debian]

Images, served by one local Dockyard registry:
  big4x64   4 layers of 64 MiB random data (gzip)
  debian    a Debian minbase rootfs (debootstrap --variant=minbase, mirror read
            from the apt sources files, cached in ~/.cache/dockyard-bench)
Each tool starts from an empty store every run; best of N wall-clock times.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import BenchError, compile_dockyard, content, launch, need_tool, sh

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dockyard-bench"


def debian_mirror() -> tuple[str, str]:
    """(URI, suite) of the first Debian source in the apt configuration."""
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        text = f.read_text()
        uri = re.search(r"^URIs:\s*(\S+)", text, re.M)
        suite = re.search(r"^Suites:\s*(\S+)", text, re.M)
        if uri and suite and "debian" in uri.group(1) and "security" not in uri.group(1):
            return uri.group(1), suite.group(1)
    listing = Path("/etc/apt/sources.list")
    if listing.exists():
        for line in listing.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb":
                return parts[1], parts[2]
    raise BenchError("no Debian mirror in the apt sources")


def debian_layer() -> bytes:
    """gzip'd tar of a minbase rootfs, built once and cached."""
    CACHE.mkdir(parents=True, exist_ok=True)
    blob = CACHE / "debian-minbase.tar.gz"
    if not blob.exists():
        uri, suite = debian_mirror()
        root = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=CACHE))
        try:
            print(f"debootstrap --variant=minbase {suite} (once, cached in {CACHE})", file=sys.stderr)
            sh(["debootstrap", "--variant=minbase", suite, str(root), uri], timeout=1800)
            tmp = blob.with_suffix(".tmp")
            sh(["sh", "-c", f"tar --numeric-owner --xattrs -C {root} -cf - . | gzip -1 > {tmp}"], timeout=600)
            os.rename(tmp, blob)
        finally:
            subprocess.run(["rm", "-rf", str(root)])
    return blob.read_bytes()


def layout_with(layers_gz: list[bytes], directory: Path) -> content.LayoutImage:
    diff_ids = [content.sha256_digest(gzip.decompress(b)) for b in layers_gz]
    config = content.image_config(diff_ids, cmd=["/bin/sh"])
    return content.write_oci_layout(directory, layers_gz, config, layer_media_type=content.OCI_LAYER_GZIP)


def push_layout(layout: content.LayoutImage, ref: str) -> None:
    sh(["skopeo", "copy", "--dest-tls-verify=false", layout.ref, f"docker://{ref}"], timeout=900)


class Docker:
    def __init__(self, base: Path):
        self.base = base
        exec_root = Path(tempfile.mkdtemp(prefix="dyb-exec-", dir="/tmp"))
        self.sock = exec_root / "d.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.sock}", "DOCKER_CONFIG": str(base / "cfg")}
        self.server = launch.ServerProcess(
            ["dockerd", "--data-root", str(base / "data"), "--exec-root", str(exec_root), "-H",
             f"unix://{self.sock}", "--bridge=none", "--iptables=false", "--ip-masq=false",
             "--insecure-registry", "127.0.0.0/8"],
            ready_check=lambda: subprocess.run(["docker", "version"], env=self.env,
                                               capture_output=True).returncode == 0,
            name="dockerd", grace=20)
        self.exec_root = exec_root

    def start(self):
        self.server.start(timeout=60)

    def run(self, *args):
        proc = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise BenchError(f"docker {' '.join(args)}: {proc.stderr[-1000:]}")
        return proc.stdout

    def stop(self):
        self.server.stop()
        subprocess.run(["sh", "-c", f"grep -o ' {self.base}[^ ]*\\| {self.exec_root}[^ ]*' /proc/mounts "
                        "| sort -r | xargs -r -n1 umount -l"], capture_output=True)
        shutil.rmtree(self.exec_root, ignore_errors=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--skip-debian", action="store_true")
    args = parser.parse_args()
    for tool in ("skopeo", "umoci", "dockerd", "docker"):
        need_tool(tool)
    work = Path(tempfile.mkdtemp(prefix="dy-bench-unpack-"))
    compile_dockyard()
    registry = launch.launch_dockyard(work / "registry")
    docker = Docker(work / "docker")
    docker.start()
    results: list[tuple[str, str, float]] = []
    try:
        images = {"big4x64": [gzip.compress(content.random_tar_layer(64 << 20, f"l{i}.bin"), 1)
                              for i in range(4)]}
        if not args.skip_debian:
            images["debian"] = [debian_layer()]
        for name, blobs in images.items():
            ref = f"{registry.host}/bench/{name}:1"
            push_layout(layout_with(blobs, work / f"layout-{name}"), ref)
            size = sum(len(b) for b in blobs)

            def dockyard_once(i):
                d = work / f"dy-{name}-{i}"
                sh([sys.executable, "-m", "puller", "unpack", "-q", "--plain-http", "--store", str(d / "store"),
                    "--cache", str(d / "cache"), ref, str(d / "bundle")], timeout=900)

            def dockyard_pull_only(i):
                d = work / f"dy-{name}-{i}"
                sh([sys.executable, "-m", "puller", "pull", "-q", "--plain-http", "--store", str(d / "store"), ref],
                   timeout=900)

            def docker_once(i):
                docker.run("pull", "-q", ref)

            def docker_reset(i):
                subprocess.run(["docker", "rmi", "-f", ref], env=docker.env, capture_output=True)

            def umoci_once(i):
                d = work / f"um-{name}-{i}"
                d.mkdir(parents=True, exist_ok=True)
                sh(["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{d}/layout:1"], timeout=900)
                sh(["umoci", "unpack", "--image", f"{d}/layout:1", str(d / "bundle")], timeout=900)

            for tool, fn, reset in (("dockyard pull+unpack", dockyard_once, None),
                                    ("dockyard pull (no unpack)", dockyard_pull_only, None),
                                    ("docker pull", docker_once, docker_reset),
                                    ("skopeo copy + umoci unpack", umoci_once, None)):
                times = []
                for i in range(args.runs):
                    if reset:
                        reset(i)
                    subprocess.run(["sync"])
                    times.append(timed(lambda: fn(i)))
                    subprocess.run(["rm", "-rf", str(work / f"dy-{name}-{i}"), str(work / f"um-{name}-{i}")])
                best = min(times)
                results.append((name, tool, best))
                every = " ".join(f"{t:.2f}" for t in times)
                print(f"{name:8} {tool:28} {best:7.2f} s  (runs: {every}; {size / (1 << 20):.0f} MiB compressed)",
                      file=sys.stderr)
    finally:
        docker.stop()
        registry.stop()
        subprocess.run(["rm", "-rf", str(work)])
    print(f"\n{'image':10}{'tool':30}{'seconds':>9}{'vs docker pull':>16}")
    for name, tool, t in results:
        base = next(x for n, k, x in results if n == name and k == "docker pull")
        print(f"{name:10}{tool:30}{t:9.2f}{base / t:15.2f}x")
    print(json.dumps([{"image": n, "tool": k, "seconds": round(t, 3)} for n, k, t in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
