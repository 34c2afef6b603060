"""`dockyard run --detach` with `ps`, `logs`, `stop` and `rm`, with real runc
and crun: a background container's output kept, its exit code (128+n when
stopped by a signal), a grace period then SIGKILL for a PID 1 that ignores
SIGTERM, `rm` refusing a running container without -f."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.support import REPO_ROOT
from tests.unpack.test_run_edges import dirs, image, runtime  # noqa: F401  (shared fixtures)

pytestmark = pytest.mark.interop


def dockyard(dirs, *args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "puller", *args, "--store", str(dirs["store"]),
                           "--cache", str(dirs["cache"])] if args[0] != "run" else
                          [sys.executable, "-m", "puller", "run", "--store", str(dirs["store"]),
                           "--cache", str(dirs["cache"]), *args[1:]],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, stdin=subprocess.DEVNULL)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def ps(dirs, *flags) -> dict:
    return {c["id"]: c for c in json.loads(dockyard(dirs, "ps", "--json", *flags).stdout)}


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_detach_logs_stop_rm(dirs, runtime, image):
    name = f"bg-{runtime}"
    started = dockyard(dirs, "run", "-d", "-q", "--runtime", runtime, "--name", name, image,
                       "/bin/sh", "-c", "trap 'echo stopping; exit 3' TERM; echo hello-from-bg; "
                       "while true; do sleep 0.1; done")
    assert started.stdout == ""                       # -q: not even the ID
    assert ps(dirs)[name]["status"] == "running"
    wait_for(lambda: "hello-from-bg" in dockyard(dirs, "logs", name).stdout)
    rm = dockyard(dirs, "rm", name, check=False)
    assert rm.returncode == 1 and rm.stderr.strip() == (
        f"dockyard: error: container {name} is running: stop it first, or use rm -f")
    assert dockyard(dirs, "stop", name).stdout.strip() == name
    listed = ps(dirs, "-a")[name]
    assert listed["status"] == "exited" and listed["exit_code"] == 3
    assert name not in ps(dirs)
    assert dockyard(dirs, "logs", name).stdout.splitlines() == ["hello-from-bg", "stopping"]
    again = dockyard(dirs, "run", "-d", "--runtime", runtime, "--name", name, image, "/bin/true", check=False)
    assert again.returncode == 1 and "already in use" in again.stderr
    dockyard(dirs, "rm", name)
    assert name not in ps(dirs, "-a")
    assert not (dirs["cache"] / "containers" / name).exists()
    gone = dockyard(dirs, "logs", name, check=False)
    assert gone.returncode == 1 and gone.stderr.strip() == f"dockyard: error: no such container: {name}"


def test_stop_kills_after_the_grace_period_and_reports_137(dirs, runtime, image):
    name = f"stubborn-{runtime}"
    out = dockyard(dirs, "run", "-d", "--runtime", runtime, "--name", name, image,
                   "/bin/sh", "-c", "trap '' TERM; echo up; while true; do sleep 0.1; done").stdout
    assert out.strip() == name
    started = time.monotonic()
    dockyard(dirs, "stop", "-t", "1", name)
    assert 0.9 < time.monotonic() - started < 20
    assert ps(dirs, "-a")[name]["exit_code"] == 137      # SIGKILL: 128 + 9
    dockyard(dirs, "rm", name)


def test_detached_rm_flag_and_generated_id(dirs, runtime, image):
    out = dockyard(dirs, "run", "-d", "--rm", "--runtime", runtime, image, "/bin/sh", "-c", "sleep 0.3").stdout
    container_id = out.strip()
    assert len(container_id) == 32
    wait_for(lambda: container_id not in ps(dirs, "-a"))
    assert not (dirs["cache"] / "containers" / container_id).exists()
    out = dockyard(dirs, "run", "-d", "--runtime", runtime, image, "/bin/sh", "-c", "sleep 60").stdout.strip()
    dockyard(dirs, "rm", "-f", out[:10])                 # a unique prefix names it
    assert out not in ps(dirs, "-a")


def test_prune_removes_stopped_containers_and_keeps_running_ones(dirs, runtime, image):
    stopped = f"done-{runtime}"
    dockyard(dirs, "run", "-q", "--runtime", runtime, "--name", stopped, image, "/bin/true")
    running = dockyard(dirs, "run", "-d", "--runtime", runtime, image, "/bin/sh", "-c", "sleep 60").stdout.strip()
    listed = ps(dirs, "-a")
    assert listed[stopped]["status"] == "exited" and listed[stopped]["exit_code"] == 0
    pruned = json.loads(dockyard(dirs, "prune", "--json").stdout)
    assert pruned["containers"] == [stopped]
    assert pruned["snapshots"] == 0                 # the running container's snapshot stays
    assert list(ps(dirs, "-a")) == [running]
    dockyard(dirs, "rm", "-f", running)


def test_logs_follow_until_the_container_ends(dirs, runtime, image):
    name = f"talker-{runtime}"
    dockyard(dirs, "run", "-d", "-q", "--runtime", runtime, "--name", name, image,
             "/bin/sh", "-c", "for i in 1 2 3 4 5; do echo line-$i; sleep 0.2; done")
    started = time.monotonic()
    followed = dockyard(dirs, "logs", "-f", name).stdout
    assert followed.splitlines() == [f"line-{i}" for i in range(1, 6)]
    assert time.monotonic() - started < 20
    assert ps(dirs, "-a")[name]["status"] == "exited"
    dockyard(dirs, "rm", name)
