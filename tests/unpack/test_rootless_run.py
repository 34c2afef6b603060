"""`dockyard run` as an unprivileged user the test creates, with real runc
and crun: a user namespace mapped from /etc/subuid and /etc/subgid through
newuidmap/newgidmap, or the user's single ID (runtime-spec config-linux.md
"User namespace mappings"); env, cwd, user, ownership inside the namespace,
a volume, an exit code, signals forwarded (128+n); the sysctl named when
user namespaces are forbidden; a state directory someone else made refused."""

from __future__ import annotations

import gzip
import io
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from puller.runtime.rootless import blocking_sysctl
from tests.support import REPO_ROOT
from tests.support.content import OCI_LAYER_GZIP, OciLayoutWriter, gzip_bytes, image_config, sha256_digest
from tests.support.hostnet import GATEWAY_ANSWERS, REFUSED, loopback_answer, slirp_probe
from tests.support.peers import busybox_path, missing_peer, require_root, require_tool

APPLETS = ("sh", "id", "cat", "ls", "sleep", "echo", "env", "pwd", "true", "stat", "wget", "ping")
SUBID_START = 1_800_000_000          # far above what useradd hands out
SUBID_COUNT = 65536


# ---- a unit test of the sysctl check (a fake /proc/sys) --------------------------------------

@pytest.mark.parametrize("rel,value,named", [
    ("user/max_user_namespaces", "0", "user.max_user_namespaces is 0"),
    ("kernel/unprivileged_userns_clone", "0", "kernel.unprivileged_userns_clone is 0"),
    ("kernel/apparmor_restrict_unprivileged_userns", "1", "kernel.apparmor_restrict_unprivileged_userns is 1"),
])
def test_blocking_sysctl_is_named(tmp_path, rel, value, named):
    assert blocking_sysctl(tmp_path) is None            # nothing there: nothing forbids
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(value + "\n")
    assert blocking_sysctl(tmp_path).startswith(named)
    (tmp_path / rel).write_text("15000\n" if value == "0" else "0\n")
    assert blocking_sysctl(tmp_path) is None


# ---- real runs -------------------------------------------------------------------------------

def _layer() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name, data=None, kind=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, link=""):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid, info.linkname = kind, mode, uid, gid, link
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
        add("bin", kind=tarfile.DIRTYPE, mode=0o755)
        add("bin/busybox", Path(busybox_path()).read_bytes(), mode=0o755)
        for applet in APPLETS:
            add(f"bin/{applet}", kind=tarfile.SYMTYPE, link="busybox")
        add("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n")
        add("etc/group", b"root:x:0:\nalice:x:1000:\n")
        add("home/alice", kind=tarfile.DIRTYPE, mode=0o750, uid=1000, gid=1000)
        add("home/alice/owned", b"mine\n", uid=1000, gid=1000, mode=0o600)
    return buf.getvalue()


def _python_for(user: str) -> list[str]:
    """An interpreter the user may run, with this checkout and its packages on the path."""
    candidates = [sys.executable, f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"]
    for exe in candidates:
        probe = subprocess.run(["runuser", "-u", user, "--", exe, "-c", "import sys; print(sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == str(tuple(sys.version_info[:2])):
            return [exe]
    missing_peer(f"no Python {sys.version_info[0]}.{sys.version_info[1]} that user {user} can run")
    raise AssertionError("unreachable")


class User:
    def __init__(self, name: str, subids: bool, base: Path):
        self.name, self.subids = name, subids
        subprocess.run(["userdel", "-r", name], capture_output=True)
        # no automatic ranges: this test writes its own (or none)
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", "-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0", name],
                       check=True, capture_output=True)
        self.uid = pwd.getpwnam(name).pw_uid
        _drop_subids(name)
        if subids:
            for path in ("/etc/subuid", "/etc/subgid"):
                with open(path, "a") as f:
                    f.write(f"{name}:{SUBID_START + (self.uid % 1000) * SUBID_COUNT}:{SUBID_COUNT}\n")
        self.base = base / name
        self.base.mkdir()
        os.chown(self.base, self.uid, self.uid)
        self.python = _python_for(name)
        self.pythonpath = os.pathsep.join([str(REPO_ROOT)] + [p for p in sys.path if "site-packages" in p])

    def argv(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.name, "--", "env", f"HOME={self.base}", f"PYTHONPATH={self.pythonpath}",
                "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", *self.python, "-m", "puller", *args]

    def run_argv(self, runtime: str, image: str, *args: str, extra=()) -> list[str]:
        return self.argv("run", "-q", "--rm", "--runtime", runtime, "--store", str(self.base / "store"),
                         *extra, image, *args)

    def remove(self) -> None:
        _drop_subids(self.name)
        shutil.rmtree(f"/tmp/dockyard-{self.uid}", ignore_errors=True)
        subprocess.run(["userdel", "-r", self.name], capture_output=True)


def _drop_subids(name: str) -> None:
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            lines = Path(path).read_text().splitlines(keepends=True)
        except FileNotFoundError:
            continue
        Path(path).write_text("".join(l for l in lines if not l.startswith(f"{name}:")))


@pytest.fixture(scope="module")
def base():
    """A directory the test users can reach (pytest's tmp_path is root's alone)."""
    require_root()
    for tool in ("useradd", "runuser", "unshare", "newuidmap", "newgidmap"):
        require_tool(tool)
    path = Path(tempfile.mkdtemp(prefix="dockyard-rootless-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def image(base) -> str:
    layer = gzip_bytes(_layer())
    config = image_config([sha256_digest(gzip.decompress(layer))])
    config["config"] = {"Env": ["FOO=from-image", "PATH=/bin"], "User": "alice", "WorkingDir": "/home/alice",
                        "Cmd": ["/bin/sh", "-c", "id; pwd; echo FOO=$FOO"]}
    writer = OciLayoutWriter(base / "layout")
    writer.tag("v1", writer.image([layer], config, layer_media_type=OCI_LAYER_GZIP))
    writer.close()
    subprocess.run(["chmod", "-R", "a+rX", str(base / "layout")], check=True)
    return f"oci:{base / 'layout'}:v1"


@pytest.fixture(scope="module")
def mapped(base):
    user = User("dockyard-rl-sub", True, base)
    yield user
    user.remove()


@pytest.fixture(scope="module")
def single(base):
    user = User("dockyard-rl-one", False, base)
    yield user
    user.remove()


@pytest.fixture(params=["runc", "crun"])
def runtime(request) -> str:
    require_tool(request.param)
    return request.param


def _run(argv, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.interop
def test_rootless_env_cwd_user_ownership_volume_and_exit_code(mapped, image, runtime):
    proc = _run(mapped.run_argv(runtime, image, extra=("-e", "EXTRA=set")))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["uid=1000(alice) gid=1000(alice)", "/home/alice", "FOO=from-image"]
    # the image's owners hold inside the namespace: alice reads her 0600 file
    own = _run(mapped.run_argv(runtime, image, "/bin/sh", "-c", 'stat -c "%u:%g %a" /home/alice/owned; '
                               'cat /home/alice/owned; echo "$EXTRA"', extra=("-e", "EXTRA=set")))
    assert own.returncode == 0, own.stderr
    assert own.stdout.splitlines() == ["1000:1000 600", "mine", "set"]
    volume = mapped.base / f"vol-{runtime}"
    volume.mkdir()
    os.chown(volume, mapped.uid, mapped.uid)
    w = _run(mapped.run_argv(runtime, image, "/bin/sh", "-c", "echo written > /data/f; exit 42",
                             extra=("-u", "0", "-v", f"{volume}:/data")))
    assert w.returncode == 42, w.stderr
    assert (volume / "f").read_text() == "written\n"
    assert (volume / "f").stat().st_uid == mapped.uid       # root inside is the user outside


@pytest.mark.interop
def test_rootless_network_is_loopback_only(mapped, image):
    proc = _run(mapped.run_argv("runc", image, "/bin/cat", "/proc/net/dev"))
    assert proc.returncode == 0, proc.stderr
    assert [l.split(":")[0].strip() for l in proc.stdout.splitlines()[2:]] == ["lo"]


@pytest.mark.interop
def test_rootless_slirp4netns_routes_out_but_not_to_the_host_loopback(mapped, image):
    require_tool("slirp4netns")
    with loopback_answer(b"host\n") as port:
        proc = _run(mapped.run_argv("runc", image, "/bin/sh", "-c", slirp_probe(port),
                                    extra=("-u", "0", "--network", "slirp4netns")))
    tun_usable = subprocess.run(["runuser", "-u", mapped.name, "--", "sh", "-c", "exec 3<>/dev/net/tun"],
                                capture_output=True).returncode == 0
    if not tun_usable:   # this host keeps the tun device root's (mode 0600): the error must say so
        mode = os.stat("/dev/net/tun").st_mode & 0o777
        assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
            f"dockyard: error: --network slirp4netns needs /dev/net/tun readable and writable by this user "
            f"(mode {mode:04o} here); use --network none, or make it 0666 as distributions do"]
        return
    assert proc.returncode == 0, proc.stderr
    routes = [line.split() for line in proc.stdout.splitlines() if line.startswith("tap0")]
    assert ["tap0", "00000000", "0202000A"] in [r[:3] for r in routes]     # default route via 10.0.2.2
    assert GATEWAY_ANSWERS in proc.stdout
    assert "nameserver 10.0.2.3" in proc.stdout
    assert REFUSED in proc.stdout and "host\n" not in proc.stdout.replace("host-", "")


def _wait_ready(proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == "ready":
            return
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"container never got ready: {proc.stderr.read()}")


@pytest.mark.interop
@pytest.mark.parametrize("sig,extra,script,code", [
    (signal.SIGTERM, (), "trap 'exit 9' TERM; echo ready; while true; do sleep 0.1; done", 9),
    (signal.SIGTERM, ("--init",), "echo ready; sleep 60", 143),
    (signal.SIGINT, ("--init",), "echo ready; sleep 60", 130),
])
def test_rootless_signals_reach_pid1(mapped, image, runtime, sig, extra, script, code):
    # runuser forwards the signal to its child; dockyard is that child's exec
    proc = subprocess.Popen(mapped.run_argv(runtime, image, "/bin/sh", "-c", script, extra=extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    _wait_ready(proc)
    started = time.monotonic()
    dockyard = _dockyard_pid(proc.pid)
    os.kill(dockyard, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert time.monotonic() - started < 15


def _dockyard_pid(runuser_pid: int) -> int:
    """The python process under runuser (env execs it: one child)."""
    children = Path(f"/proc/{runuser_pid}/task/{runuser_pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


@pytest.mark.interop
def test_rootless_detach_ps_stop_rm(mapped, image):
    def dy(*args):
        return _run(mapped.argv(*args, "--store", str(mapped.base / "store")))
    started = _run(mapped.argv("run", "-d", "--name", "rl-bg", "--store", str(mapped.base / "store"), image,
                               "/bin/sh", "-c", "trap 'exit 5' TERM; echo up; while true; do sleep 0.1; done"))
    assert started.returncode == 0 and started.stdout.strip() == "rl-bg", started.stderr
    listed = json.loads(dy("ps", "--json").stdout)
    assert [(c["id"], c["status"]) for c in listed] == [("rl-bg", "running")]
    assert dy("stop", "rl-bg").returncode == 0
    assert json.loads(dy("ps", "-a", "--json").stdout)[0]["exit_code"] == 5
    assert dy("logs", "rl-bg").stdout == "up\n"
    # the rootfs was an overlay over the cached snapshot (a user namespace may mount one), not a copy
    bundle = mapped.base / "unpacked-userns" / "containers" / "rl-bg"
    assert (bundle / "upper").is_dir() and list((bundle / "rootfs").iterdir()) == []
    removed = dy("rm", "rl-bg")          # its rootfs holds files of the user's ID range
    assert removed.returncode == 0, removed.stderr
    assert json.loads(dy("ps", "-a", "--json").stdout) == []


@pytest.mark.interop
def test_single_id_mapping_runs_as_root_and_refuses_other_users(single, image, runtime):
    proc = _run(single.run_argv(runtime, image, "/bin/sh", "-c", "id -u; stat -c %u /home/alice/owned",
                                extra=("-u", "0")))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "0"]      # one ID mapped: every file is root's
    refused = _run(single.run_argv(runtime, image))
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "dockyard: error: user 1000:1000 is not mapped in the user namespace: only root is, as no range for this "
        "user is in /etc/subuid and /etc/subgid (add one, or run with -u 0)"]


@pytest.mark.interop
def test_state_directory_made_by_someone_else_is_refused(single, image):
    state = Path(f"/tmp/dockyard-{single.uid}")
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(mode=0o777)           # made by root, before the user's first run
    os.chmod(state, 0o777)
    try:
        proc = _run(single.run_argv("runc", image, "/bin/true", extra=("-u", "0")))
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines() == [
            f"dockyard: error: {state} is not a private directory of this user: remove it, or set XDG_RUNTIME_DIR"]
    finally:
        shutil.rmtree(state, ignore_errors=True)


@pytest.mark.interop
def test_forbidden_user_namespaces_name_the_sysctl(mapped, image):
    """user.max_user_namespaces=0 set in a namespace of the user's own (the
    host's setting is not touched); dockyard runs there as uid 1000."""
    require_tool("setpriv")
    inner = " ".join(f"'{a}'" for a in [
        "setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups", "--",
        "env", f"HOME={mapped.base}", f"PYTHONPATH={mapped.pythonpath}", *mapped.python, "-m", "puller",
        "run", "-q", "--rm", image])
    argv = ["runuser", "-u", mapped.name, "--", "unshare", "--user", "--map-auto", "--map-root-user", "sh", "-c",
            f"echo 0 > /proc/sys/user/max_user_namespaces && exec {inner}"]
    proc = _run(argv)
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr.strip().splitlines() == [
        "dockyard: error: rootless run needs user namespaces, which this host forbids: user.max_user_namespaces "
        "is 0 (set it to a positive number: sysctl -w user.max_user_namespaces=...)"]
