"""The rough edges of `dockyard unpack` and `dockyard run` a new user hit, each
with real runc/crun: a single host file bind-mounted (`-v FILE:/path`), a
missing host path, named volumes, SIGTERM/SIGINT sent to `dockyard run`
reaching the container's PID 1 (runtime-spec runtime.md "kill"), the exit
code of a signalled container (128+n, as Docker reports it), `--init`, and
`unpack --json`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO_ROOT
from tests.support.content import OCI_LAYER_GZIP, OciLayoutWriter, image_config, sha256_digest
from tests.support.hostnet import GATEWAY_ANSWERS, REFUSED, loopback_answer, slirp_probe
from tests.support.peers import busybox_layer, require_root, require_tool

pytestmark = pytest.mark.interop

APPLETS = ("sh", "cat", "echo", "sleep", "ls", "id", "true", "kill", "wget", "ping", "tty")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    """oci:LAYOUT:v1, a static busybox with a few applets (no registry needed)."""
    base = tmp_path_factory.mktemp("edges-image")
    layer = busybox_layer(APPLETS, files={"etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
                                          "etc/hostname.orig": b"image\n"})
    import gzip
    config = image_config([sha256_digest(gzip.decompress(layer))])
    config["config"] = {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]}
    writer = OciLayoutWriter(base / "layout")
    writer.tag("v1", writer.image([layer], config, layer_media_type=OCI_LAYER_GZIP))
    writer.close()
    return f"oci:{base / 'layout'}:v1"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("edges")
    return {"store": base / "store", "cache": base / "cache", "base": base}


@pytest.fixture(params=["runc", "crun"])
def runtime(request) -> str:
    require_root()
    require_tool(request.param)
    return request.param


def argv(dirs, runtime, image, *args, extra=()) -> list[str]:
    return [sys.executable, "-m", "puller", "run", "--store", str(dirs["store"]), "--cache", str(dirs["cache"]),
            "--runtime", runtime, "-q", "--rm", *extra, image, *args]


def run(dirs, runtime, image, *args, extra=(), timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(argv(dirs, runtime, image, *args, extra=extra), capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=timeout, stdin=subprocess.DEVNULL)


def test_single_file_bind_mount_read_write_and_read_only(dirs, runtime, image):
    host_file = dirs["base"] / f"settings-{runtime}.conf"
    host_file.write_text("from the host\n")
    proc = run(dirs, runtime, image, "/bin/sh", "-c", "cat /etc/app.conf; echo appended >> /etc/app.conf",
               extra=("-v", f"{host_file}:/etc/app.conf"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "from the host\n"
    assert host_file.read_text() == "from the host\nappended\n"
    proc = run(dirs, runtime, image, "/bin/sh", "-c", "echo more >> /etc/app.conf",
               extra=("-v", f"{host_file}:/etc/app.conf:ro"))
    assert proc.returncode != 0 and "Read-only file system" in proc.stderr
    assert host_file.read_text() == "from the host\nappended\n"


def test_missing_host_path_is_one_line_error_and_nothing_is_created(dirs, runtime, image):
    missing = dirs["base"] / "no-such-dir" / "data"
    proc = run(dirs, runtime, image, "/bin/true", extra=("-v", f"{missing}:/data"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"dockyard: error: volume source {missing} does not exist (create it, or use a named volume NAME:CONTAINER)"]
    assert not missing.parent.exists()
    assert not any((dirs["cache"] / "containers").iterdir())


def test_named_volume_lives_in_the_data_directory(dirs, runtime, image):
    name = f"data-{runtime}"
    w = run(dirs, runtime, image, "/bin/sh", "-c", "echo kept > /v/f", extra=("-v", f"{name}:/v"))
    assert w.returncode == 0, w.stderr
    r = run(dirs, runtime, image, "/bin/cat", "/v/f", extra=("-v", f"{name}:/v:ro"))
    assert r.returncode == 0 and r.stdout == "kept\n"
    assert (dirs["store"].parent / "volumes" / name / "f").read_text() == "kept\n"


def _wait_for_line(proc: subprocess.Popen, wanted: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == wanted:
            return
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"no {wanted!r} from the container: {proc.stderr.read()}")


def _start(dirs, runtime, image, script, extra=()) -> subprocess.Popen:
    return subprocess.Popen(argv(dirs, runtime, image, "/bin/sh", "-c", script, extra=extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                            stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("sig", ["TERM", "INT", "HUP", "QUIT", "WINCH"])
def test_signals_to_dockyard_reach_pid1(dirs, runtime, image, sig):
    """Without forwarding, SIGTERM ended dockyard alone (exit -15) and left the
    container running; now PID 1's trap runs and its exit code comes back."""
    proc = _start(dirs, runtime, image, f"trap 'echo got-{sig}; exit 7' {sig}; echo ready; "
                                        "while true; do sleep 0.1; done")
    _wait_for_line(proc, "ready")
    started = time.monotonic()
    proc.send_signal(getattr(signal, f"SIG{sig}"))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 7, err
    assert f"got-{sig}" in out
    assert time.monotonic() - started < 10


def test_third_interrupt_kills_a_pid1_that_ignores_them(dirs, runtime, image):
    """A PID 1 that ignores SIGINT (as any without a handler does: the kernel
    shields a namespace's init); the third Ctrl-C in a row kills it: 128+9."""
    proc = _start(dirs, runtime, image, "trap '' INT; echo ready; while true; do sleep 0.1; done")
    _wait_for_line(proc, "ready")
    for _ in range(2):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None           # ignored: still running
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 137, err
    assert "3 interrupts: killing container" in err


def test_sigint_with_init_gives_130_and_a_shell_pid1_stops_at_once(dirs, runtime, image):
    """A foreground child under a shell (the case that hung ~20 s): with
    --init, tini is PID 1, the shell gets SIGINT as an ordinary process and
    dies of it: 128+2."""
    proc = _start(dirs, runtime, image, "echo ready; sleep 60", extra=("--init",))
    _wait_for_line(proc, "ready")
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert time.monotonic() - started < 10


def test_exit_code_of_a_signalled_container_is_128_plus_n(dirs, runtime, image):
    proc = run(dirs, runtime, image, "/bin/sh", "-c", "kill -TERM $$; sleep 5", extra=("--init",))
    assert proc.returncode == 143, proc.stderr


def test_unpack_json(dirs, image, tmp_path):
    bundle = tmp_path / "bundle"
    proc = subprocess.run([sys.executable, "-m", "puller", "unpack", "--json", "--store", str(dirs["store"]),
                           "--cache", str(dirs["cache"]), image, str(bundle)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["bundle"] == str(bundle) and result["rootfs"] == str(bundle / "rootfs")
    assert json.loads(Path(result["config"]).read_text())["process"]["args"] == ["/bin/sh"]
    assert len(result["diff_ids"]) == 1 and result["diff_ids"][0].startswith("sha256:")
    assert (bundle / "rootfs" / "bin" / "busybox").is_file()
    again = subprocess.run([sys.executable, "-m", "puller", "unpack", "--json", "--store", str(dirs["store"]),
                            image, str(bundle)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert again.returncode == 1
    assert json.loads(again.stdout)["error"].endswith("already exists and is not empty")
    assert os.listdir(bundle) != []


def test_slirp4netns_network_routes_out_but_not_to_the_host_loopback(dirs, runtime, image):
    """--network slirp4netns: a tap device with a default route through
    slirp4netns's gateway, its DNS in resolv.conf, and the host's 127.0.0.1
    not reachable through 10.0.2.2 (a service bound to loopback stays private)."""
    require_tool("slirp4netns")
    with loopback_answer(b"host-secret\n") as port:
        proc = run(dirs, runtime, image, "/bin/sh", "-c", slirp_probe(port), extra=("--network", "slirp4netns"))
    assert proc.returncode == 0, proc.stderr
    routes = [line.split()[:3] for line in proc.stdout.splitlines() if line.startswith("tap0")]
    assert ["tap0", "00000000", "0202000A"] in routes     # default route via 10.0.2.2
    assert GATEWAY_ANSWERS in proc.stdout
    assert "nameserver 10.0.2.3" in proc.stdout.splitlines()
    assert REFUSED in proc.stdout and "host-secret" not in proc.stdout


def test_tty_gives_a_terminal_and_ctrl_c_typed_there_interrupts(dirs, runtime, image):
    """-t: PID 1 has a pseudo-terminal (runtime-spec config.md process.terminal);
    our terminal goes raw, so a typed ^C travels as a byte and the
    container's own terminal turns it into SIGINT for its foreground job."""
    import pty
    import select
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv(dirs, runtime, image, "/bin/sh", "-c", "tty; echo ready; sleep 60; echo not-reached",
                                 extra=("-t",)),
                            stdin=slave, stdout=slave, stderr=slave, cwd=REPO_ROOT, start_new_session=True)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 60
    try:
        while b"ready" not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 4096)
        assert b"/dev/pts/" in seen, seen
        os.write(master, b"\x03")
        code = proc.wait(timeout=30)
        while select.select([master], [], [], 0.2)[0]:
            try:
                seen += os.read(master, 4096)
            except OSError:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert code == 130, seen
    assert b"not-reached" not in seen


def test_run_loads_no_layer_code_until_a_snapshot_is_built():
    """What `dockyard run` imports before it knows whether the image's
    snapshot is cached: none of the layer-application code (tar,
    decompressors; ~40 ms) nor importlib.metadata for --version (~35 ms),
    of a ~200 ms `run --rm` of a cached image (tests/benchmarks/bench_run.py)."""
    probe = ("import sys, puller.cli, puller.runtime.run, puller.runtime.bundle, puller.runtime.snapshots; "
             "puller.cli.build_parser('run'); "
             "print([m for m in ('importlib.metadata', 'puller.runtime.apply', 'puller.runtime.stage', "
             "'puller.runtime.tar', 'zstandard') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
