"""`dockyard run` with real runc and crun, image pulled from a Dockyard registry."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from tests.support import REPO_ROOT
from tests.support.content import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, gzip_bytes, sha256_digest
from tests.support.peers import busybox_path, require_root, require_tool
from tests.support.registry_http import push_blob, put_manifest

pytestmark = pytest.mark.interop

APPLETS = ("sh", "env", "id", "pwd", "cat", "echo", "ls", "sort", "grep")


def _layer() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(busybox_path(), arcname="bin/busybox")
        for a in APPLETS:
            info = tarfile.TarInfo(f"bin/{a}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
        for name, data in (("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n"),
                           ("etc/group", b"root:x:0:\nalice:x:1000:\nstaff:x:50:alice\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_ref(dockyard_registry):
    require_root()
    layer = _layer()
    blob = gzip_bytes(layer)
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": ["FOO=bar", "PATH=/bin"], "User": "alice", "WorkingDir": "/home/alice/work",
                         "Cmd": ["/bin/sh", "-c", "id; pwd; env | sort"]},
              "rootfs": {"type": "layers", "diff_ids": [sha256_digest(layer)]}}
    config_bytes = json.dumps(config).encode()
    repo = "unpack-tests/runner"
    push_blob(dockyard_registry.url, repo, blob)
    push_blob(dockyard_registry.url, repo, config_bytes)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config_bytes), "size": len(config_bytes)},
                "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": sha256_digest(blob), "size": len(blob)}]}
    assert put_manifest(dockyard_registry.url, repo, "v1", manifest).status == 201
    return f"{dockyard_registry.host}/{repo}:v1"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("run")
    return {"store": base / "store", "cache": base / "cache", "vol": base / "vol"}


def dockyard_run(dirs, runtime, ref, *args, input=None, extra=()):
    argv = [sys.executable, "-m", "puller", "run", "--plain-http", "--store", str(dirs["store"]),
            "--cache", str(dirs["cache"]), "--runtime", runtime, "-q", *extra, ref, *args]
    return subprocess.run(argv, capture_output=True, input=input, cwd=REPO_ROOT, timeout=120)


@pytest.fixture(params=["runc", "crun"])
def runtime(request):
    require_tool(request.param)
    return request.param


def test_env_workdir_and_user_from_image(dirs, runtime, image_ref):
    proc = dockyard_run(dirs, runtime, image_ref, extra=("--rm", "-e", "EXTRA=1"))
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    assert "uid=1000(alice) gid=1000(alice) groups=50(staff)" in out
    assert "\n/home/alice/work\n" in out
    assert "FOO=bar" in out and "EXTRA=1" in out and "PATH=/bin" in out and "HOME=/home/alice" in out


def test_volume_persists_between_runs(dirs, runtime, image_ref):
    vol = dirs["vol"] / runtime
    vol.mkdir(parents=True, exist_ok=True)  # a host path must exist (a missing one is an error)
    w = dockyard_run(dirs, runtime, image_ref, "/bin/sh", "-c", "echo persisted-$0 > /vol/f", runtime,
                     extra=("--rm", "-u", "0", "-v", f"{vol}:/vol"))
    assert w.returncode == 0, w.stderr.decode()
    r = dockyard_run(dirs, runtime, image_ref, "/bin/cat", "/vol/f", extra=("--rm", "-v", f"{vol}:/vol:ro"))
    assert r.returncode == 0 and r.stdout.decode() == f"persisted-{runtime}\n"
    assert (vol / "f").read_text() == f"persisted-{runtime}\n"


def test_exit_code_and_stdin(dirs, runtime, image_ref):
    proc = dockyard_run(dirs, runtime, image_ref, "/bin/sh", "-c", "cat; exit 42", input=b"from stdin",
                        extra=("--rm",))
    assert proc.returncode == 42 and proc.stdout == b"from stdin"


def test_private_network_and_rm(dirs, runtime, image_ref):
    proc = dockyard_run(dirs, runtime, image_ref, "/bin/cat", "/proc/net/dev", extra=("--rm", "--name", f"net-{runtime}"))
    assert proc.returncode == 0
    ifaces = [l.split(":")[0].strip() for l in proc.stdout.decode().splitlines()[2:]]
    assert ifaces == ["lo"]
    assert not (dirs["cache"] / "containers" / f"net-{runtime}").exists()


def test_missing_runtime_is_one_line_error(dirs, image_ref, tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}
    argv = [sys.executable, "-m", "puller", "run", "--store", str(dirs["store"]), "--runtime", "runc", image_ref]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        "dockyard: error: no OCI runtime found on PATH (install runc)"]
