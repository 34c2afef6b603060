"""deploy/Dockerfile built by the test Docker daemon, offline, FROM a local
Debian bookworm made with debootstrap (tests/support/debian.py) plus
Debian's python3-venv; then `docker run` of it serves /v2/ as a non-root
user with its storage in a volume, and takes a `docker push`.

The Python base (the debootstrap layer imported, python3-venv installed
from the Debian mirror apt already uses) is kept in the test cache as a
`docker save` archive, keyed by the layer it was made from. The Dockyard
build itself runs with no network: its wheels come from the build context.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO_ROOT
from tests.support.debian import debian_layer
from tests.support.launch import free_port, wait_for_http
from tests.support.peers import build_busybox_image, missing_peer
from tests.support.registry_http import http_request

pytestmark = pytest.mark.interop

PYTHON_BASE_RECIPE = 1
PYTHON_BASE = "dockyard-test/debian-python:bookworm"
IMAGE = "dockyard-test/dockyard:local"
UID = "10001"


def _cache() -> Path:
    return Path(os.environ.get("DOCKYARD_TEST_CACHE") or Path.home() / ".cache" / "dockyard-tests")


def _python_base(dockerd, work: Path) -> str:
    layer = debian_layer(_cache(), on_missing=missing_peer)
    saved = _cache() / f"{layer.name.removesuffix('.tar.gz')}-python-{PYTHON_BASE_RECIPE}.docker.tar"
    if saved.is_file():
        dockerd.run("load", "-q", "-i", str(saved), timeout=300)
        return PYTHON_BASE
    dockerd.run("import", str(layer), "dockyard-test/debian:bookworm", timeout=300)
    context = work / "python-base"
    context.mkdir()
    (context / "Dockerfile").write_text(
        "FROM dockyard-test/debian:bookworm\n"
        "RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends"
        " python3-venv && rm -rf /var/lib/apt/lists/*\n")
    dockerd.run("build", "-q", "--network", "host", "-t", PYTHON_BASE, str(context), timeout=900)
    partial = saved.with_suffix(f".{os.getpid()}.partial")
    dockerd.run("save", "-o", str(partial), PYTHON_BASE, timeout=300)
    partial.rename(saved)
    return PYTHON_BASE


def _context(work: Path) -> Path:
    """The checkout's files the Dockerfile copies, and the wheels it installs offline."""
    context = work / "context"
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, context / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("registry", "storage", "puller", "deploy"):
        shutil.copytree(REPO_ROOT / name, context / name, ignore=ignore)
    wheels = context / "deploy" / "wheels"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    # the project's dependencies and its build backend, from this machine's package index
    subprocess.run([*pip, "wheel", "-w", str(wheels), str(context)], check=True, timeout=600,
                   capture_output=True)
    subprocess.run([*pip, "download", "-d", str(wheels), "setuptools>=68", "wheel"], check=True,
                   timeout=600, capture_output=True)
    for built in wheels.glob("dockyard-*.whl"):
        built.unlink()                  # the image builds Dockyard from the sources it copied
    return context


@pytest.fixture(scope="module")
def dockyard_image(dockerd, tmp_path_factory):
    work = tmp_path_factory.mktemp("deploy-image")
    base = _python_base(dockerd, work)
    context = _context(work)
    dockerd.run("build", "-q", "--network", "none", "-f", str(context / "deploy" / "Dockerfile"),
                "--build-arg", f"BASE={base}",
                "--build-arg", "PIP_OPTIONS=--no-index --find-links /src/deploy/wheels",
                "-t", IMAGE, str(context), timeout=900)
    return IMAGE


@pytest.mark.timeout(1800)
def test_image_runs_as_non_root_serves_and_takes_a_push(dockerd, dockyard_image, tmp_path):
    inspect = dockerd.run("image", "inspect", "-f", "{{.Config.User}} {{json .Config.Volumes}}",
                          dockyard_image).stdout.strip()
    assert inspect.startswith(f"{UID}:{UID} ") and "/var/lib/dockyard" in inspect, inspect
    port = free_port()
    name = f"dockyard-deploy-{os.getpid()}"
    dockerd.run("volume", "create", f"{name}-data")
    dockerd.run("run", "-d", "--name", name, "--network", "host",
                "-v", f"{name}-data:/var/lib/dockyard",
                "-e", "DOCKYARD_HTTP_HOST=127.0.0.1", "-e", f"DOCKYARD_HTTP_PORT={port}",
                dockyard_image)
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(f"{url}/v2/", timeout=60, ok=[200])
        except TimeoutError:
            pytest.fail(dockerd.run("logs", name, check=False).stderr[-3000:])
        assert http_request("GET", f"{url}/readyz").status == 200
        whoami = dockerd.run("exec", name, "id", "-u").stdout.strip()
        assert whoami == UID
        # a real push by the Docker client, into the volume
        build_busybox_image(dockerd, f"127.0.0.1:{port}/deploy/busybox:1")
        pushed = dockerd.run("push", f"127.0.0.1:{port}/deploy/busybox:1", timeout=300, check=False)
        assert pushed.returncode == 0, dockerd.run("logs", name, check=False).stderr[-4000:]
        tags = http_request("GET", f"{url}/v2/deploy/busybox/tags/list").json()
        assert tags["tags"] == ["1"]
        owners = dockerd.run("exec", name, "find", "/var/lib/dockyard/registry", "-not", "-user", UID).stdout
        assert owners.strip() == "", f"files not owned by the registry's user:\n{owners}"
        assert "listening on http://127.0.0.1" in dockerd.run("logs", name).stdout
        dockerd.run("stop", "-t", "20", name, timeout=60)
        state = dockerd.run("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
        assert state == "0", "SIGTERM did not stop the registry cleanly"
    finally:
        dockerd.run("rm", "-f", name, check=False)
        dockerd.run("volume", "rm", "-f", f"{name}-data", check=False)
