"""Container start-to-exit: `dockyard run --rm IMAGE true` for a cached image,
beside `podman run --rm` and `docker run --rm` of the same image, in one run.

    python tests/benchmarks/bench_run.py [--repeats N] [--json] [--no-docker] [--no-podman]

The image (a static busybox) is pushed to a local Dockyard registry and
pulled once by each tool; each then runs it with `--network none` N times
(after one untimed warm-up run that fills caches); the table shows the best
and the median wall-clock times. Run as root: docker needs its daemon; the
rootless rows run dockyard and podman as a user the benchmark creates (with
an /etc/subuid range; removed at the end), docker has none.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import (BenchError, REPO_ROOT, Row, compile_dockyard, content, format_table, launch, peers, rows_as_json,
                     timed)

BASELINE = "dockyard"


def _podman_run_flags() -> list[str]:
    """--network none, and rlimits this nested host lets a container have (it forbids
    raising RLIMIT_NOFILE or RLIMIT_NPROC past ours; podman's defaults are higher);
    runc, as crun refuses this host's hybrid cgroups."""
    import resource
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = min(4096, resource.getrlimit(resource.RLIMIT_NPROC)[1])
    return ["--network", "none", "--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


PODMAN_RUN = _podman_run_flags()


def _push_image(url: str, repo: str) -> None:
    from tests.support.registry_http import push_blob, put_manifest
    layer = peers.busybox_layer(("sh", "true"))
    import gzip
    config = content.image_config([content.sha256_digest(gzip.decompress(layer))])
    config["config"] = {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]}
    config_bytes = json.dumps(config).encode()
    push_blob(url, repo, layer)
    push_blob(url, repo, config_bytes)
    manifest = {"schemaVersion": 2, "mediaType": content.OCI_MANIFEST,
                "config": {"mediaType": content.OCI_CONFIG, "digest": content.sha256_digest(config_bytes),
                           "size": len(config_bytes)},
                "layers": [{"mediaType": content.OCI_LAYER_GZIP, "digest": content.sha256_digest(layer),
                            "size": len(layer)}]}
    result = put_manifest(url, repo, "1", manifest)
    if result.status != 201:
        raise BenchError(f"push of the image failed: {result.status}")


def _run(argv: list[str], env: dict | None = None) -> None:
    proc = subprocess.run(argv, capture_output=True, timeout=300, stdin=subprocess.DEVNULL, env=env)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.decode()[-1500:]}")


def _measure(commands: dict, targets: list[str], repeats: int, label: str) -> list[Row]:
    times: dict[str, list[float]] = {t: [] for t in targets}
    for target in targets:
        _run(*commands[target])                       # warm-up: caches, snapshot, page cache
    for _ in range(repeats):
        for target in targets:                        # interleaved: load spikes hit every tool alike
            argv, target_env = commands[target]
            times[target].append(timed(lambda: _run(argv, target_env)))
    return [Row(f"{label}run --rm IMAGE true, best", "s", False, {t: min(v) for t, v in times.items()}),
            Row(f"{label}run --rm IMAGE true, median", "s", False,
                {t: statistics.median(v) for t, v in times.items()})]


class RootlessUser:
    """An ordinary user with an ID range, for the rootless rows."""
    NAME = "dockyard-bench-rl"
    RANGE = "1900000000:65536"

    def __init__(self, workdir: Path):
        import pwd
        subprocess.run(["userdel", "-r", self.NAME], capture_output=True)
        self._drop_ranges()
        _run(["useradd", "-m", "-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0", self.NAME])
        for path in ("/etc/subuid", "/etc/subgid"):
            with open(path, "a") as f:
                f.write(f"{self.NAME}:{self.RANGE}\n")
        self.home = Path(pwd.getpwnam(self.NAME).pw_dir)
        self.runroot = Path(tempfile.mkdtemp(prefix="dy-bench-rl-", dir="/tmp"))
        shutil.chown(self.runroot, self.NAME, self.NAME)
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        self.python = next((exe for exe in (sys.executable, f"/usr/bin/python{version}")
                            if subprocess.run(["runuser", "-u", self.NAME, "--", exe, "-c", "pass"],
                                              capture_output=True).returncode == 0), None)
        if self.python is None:
            raise BenchError(f"no Python {version} that {self.NAME} can run")
        self.pythonpath = ":".join([str(REPO_ROOT)] + [p for p in sys.path if "site-packages" in p])

    def dockyard(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.NAME, "--", "env", f"HOME={self.home}", f"PYTHONPATH={self.pythonpath}",
                "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", self.python, "-m", "puller", *args]

    def podman(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.NAME, "--", "env", f"HOME={self.home}", "podman", "--root",
                str(self.home / "podman"), "--runroot", str(self.runroot), "--storage-driver", "vfs",
                "--cgroup-manager", "cgroupfs", "--events-backend", "file", *args]

    def _drop_ranges(self) -> None:
        for path in ("/etc/subuid", "/etc/subgid"):
            lines = Path(path).read_text().splitlines(keepends=True) if Path(path).exists() else []
            Path(path).write_text("".join(l for l in lines if not l.startswith(f"{self.NAME}:")))

    def remove(self) -> None:
        subprocess.run(self.podman("system", "reset", "--force"), capture_output=True, timeout=120)
        shutil.rmtree(self.runroot, ignore_errors=True)
        import pwd
        shutil.rmtree(f"/tmp/dockyard-{pwd.getpwnam(self.NAME).pw_uid}", ignore_errors=True)
        subprocess.run(["userdel", "-r", self.NAME], capture_output=True)
        self._drop_ranges()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-docker", action="store_true")
    parser.add_argument("--no-podman", action="store_true")
    parser.add_argument("--no-rootless", action="store_true")
    args = parser.parse_args()
    compile_dockyard()
    import os
    if os.geteuid() != 0:
        raise BenchError("run as root (docker and root podman are measured)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-run-"))
    registry = launch.launch_dockyard(workdir / "registry")
    cleanups = [registry.stop]
    targets = [BASELINE]
    commands: dict[str, tuple[list[str], dict | None]] = {}
    try:
        ref = f"{registry.host}/bench/busybox:1"
        _push_image(registry.url, "bench/busybox")
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DOCKER_CONFIG": str(workdir / "no-docker-config")}
        store = workdir / "dockyard-store"
        _run([*launch.dockyard_command(), "pull", "-q", "--plain-http", "--store", str(store), ref], env)
        commands[BASELINE] = ([*launch.dockyard_command(), "run", "--rm", "-q", "--store", str(store), ref, "true"],
                              env)
        if not args.no_podman:
            (workdir / "podman").mkdir()
            podman = peers.make_podman(workdir / "podman")
            cleanups.append(lambda: (podman.reset(), shutil.rmtree(podman.runroot, ignore_errors=True)))
            podman.pull(ref)
            commands["podman"] = ([*podman.base_args(), "--runtime", "runc", "run", "--rm", *PODMAN_RUN, ref, "true"],
                                  None)
            targets.append("podman")
        if not args.no_docker:
            (workdir / "docker").mkdir()
            daemon = peers.start_docker_daemon(workdir / "docker")
            cleanups.append(lambda: peers.stop_docker_daemon(daemon))
            daemon.run("pull", ref)
            commands["docker"] = ([daemon.cli, "run", "--rm", "--network", "none", ref, "true"],
                                  {**os.environ, **daemon.env})
            targets.append("docker")
        rows = _measure(commands, targets, args.repeats, "")
        if not args.no_rootless:
            user = RootlessUser(workdir)
            cleanups.append(user.remove)
            rootless = {BASELINE: (user.dockyard("run", "--rm", "-q", "--store", str(user.home / "store"),
                                                 ref, "true"), None)}
            _run(user.dockyard("pull", "-q", "--plain-http", "--store", str(user.home / "store"), ref))
            if "podman" in targets:
                _run(user.podman("pull", "--tls-verify=false", ref))
                rootless["podman"] = (user.podman("--runtime", "runc", "run", "--rm", *PODMAN_RUN, ref, "true"), None)
            rows += _measure(rootless, [t for t in targets if t in rootless], args.repeats, "rootless ")
        load = Path("/proc/loadavg").read_text().split()[:3]
        if args.json:
            print(rows_as_json(rows, targets, BASELINE, repeats=args.repeats, loadavg=load))
        else:
            print(f"\nstart-to-exit of a cached busybox image, --network none, {args.repeats} runs each "
                  f"(ratio = dockyard time / peer time: below 1, dockyard is faster); load average {' '.join(load)}\n")
            print(format_table(rows, targets, BASELINE))
        return 0
    finally:
        for cleanup in reversed(cleanups):
            try:
                cleanup()
            except Exception as exc:      # keep cleaning up the rest
                print(f"cleanup: {exc}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
