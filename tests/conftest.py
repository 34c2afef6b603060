"""Fixtures shared by every test folder: registries (Dockyard, CNCF
Distribution) on loopback, a private Docker daemon, podman and skopeo, a
Ceph S3 gateway, and storage over every registered driver.

Fixture names are a contract for the other rooms' tests: add, do not rename.
The code behind them lives in `tests.support`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest

from tests.support.ceph import CephS3, shared_ceph
from tests.support.drivers import DriverSpace, driver_kind, driver_names
from tests.support.launch import RegistryServer, launch_distribution, launch_dockyard
from tests.support.peers import (DockerDaemon, Podman, Skopeo, interop_required, make_podman, make_skopeo,
                                 start_docker_daemon, stop_docker_daemon)

__all__ = ["CephS3", "DockerDaemon", "Podman", "Skopeo"]


# ---- registries ---------------------------------------------------------------

@pytest.fixture(scope="session")
def dockyard_registry(tmp_path_factory) -> RegistryServer:
    """One Dockyard for the session: `.url`, `.host` ("127.0.0.1:PORT"), `.storage`.

    Shared by many tests: use repository names unique to your test.
    """
    server = launch_dockyard(tmp_path_factory.mktemp("dockyard-storage"),
                             log_path=tmp_path_factory.mktemp("dockyard-log") / "dockyard.log")
    yield server
    server.stop()


@pytest.fixture
def start_dockyard(tmp_path_factory) -> Callable[..., RegistryServer]:
    """Factory: start_dockyard(storage=None, workers=None, extra_args=(), env=None, port=None,
    config=None) starts a private Dockyard (own storage unless given or named by
    the config, a YAML file or a mapping of settings), stopped after the test."""
    started: list[RegistryServer] = []

    def start(storage=None, **opts) -> RegistryServer:
        if storage is None and not (opts.get("config") is not None and _names_root(opts["config"])):
            storage = tmp_path_factory.mktemp("dockyard-own")
        opts.setdefault("log_path", tmp_path_factory.mktemp("dockyard-log") / "dockyard.log")
        server = launch_dockyard(storage, **opts)
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


def _names_root(config) -> bool:
    import yaml

    settings = config if isinstance(config, dict) else yaml.safe_load(Path(config).read_text()) or {}
    return bool((settings.get("storage") or {}).get("root"))


@pytest.fixture(scope="session")
def distribution_registry(tmp_path_factory) -> RegistryServer:
    """CNCF Distribution 2.8 (`docker-registry`) on loopback, filesystem storage, delete enabled."""
    server = launch_distribution(tmp_path_factory.mktemp("distribution"))
    yield server
    server.stop()


# ---- storage drivers ---------------------------------------------------------------

def pytest_generate_tests(metafunc) -> None:
    """A test that uses `storage_driver_name` (through `driver_space`, a
    `store`, a registry...) runs once per registered driver, unless marked
    filesystem_only: then it runs once, on the filesystem driver."""
    if "storage_driver_name" not in metafunc.fixturenames:
        return
    if metafunc.definition.get_closest_marker("filesystem_only"):
        return
    metafunc.parametrize("storage_driver_name", driver_names())


@pytest.fixture
def storage_driver_name() -> str:
    """The registered driver this test runs on (parametrised; see pytest_generate_tests)."""
    return "filesystem"


@pytest.fixture(scope="session")
def driver_scratch(tmp_path_factory) -> Path:
    """One directory for the session's driver spaces (each under its own random prefix)."""
    return tmp_path_factory.mktemp("driver-spaces")


@pytest.fixture
async def driver_space(storage_driver_name, driver_scratch) -> DriverSpace:
    """This test's storage on its driver: `await driver_space.open()` gives a
    driver (another instance on the same storage each call). Afterwards every
    driver is closed, the space cleaned up, and the test errors if anything
    is left."""
    space = DriverSpace(driver_kind(storage_driver_name), driver_scratch)
    yield space
    await space.destroy()


# ---- a Ceph S3 gateway ------------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def _ceph_s3_session(tmp_path_factory):
    """Where the session's Ceph cluster lives if something starts it (the
    `ceph_s3` fixture or the "s3-ceph" storage driver), and its stop at the
    end of the session. Starts nothing by itself."""
    shared_ceph.configure(lambda: tmp_path_factory.mktemp("ceph-s3"))
    yield
    shared_ceph.stop()


@pytest.fixture(scope="session")
def ceph_s3(_ceph_s3_session) -> CephS3:
    """The session's Ceph RADOS Gateway on loopback, started on first use:
    `.endpoint`, `.access_key`, `.secret_key`, `.region`, `.client()` (boto3),
    `.create_bucket(name)`; `shared_ceph.bucket` exists. Shared by many
    tests (and the "s3-ceph" driver): use buckets or keys unique to your test,
    and start a private cluster (tests.support.ceph.start_ceph_s3) to pause it."""
    return shared_ceph.get()


# ---- docker ---------------------------------------------------------------------

@pytest.fixture(scope="session")
def dockerd(tmp_path_factory) -> DockerDaemon:
    """A session-scoped private Docker daemon (no bridge, no iptables), trusting
    plain-HTTP registries on 127.0.0.0/8."""
    daemon = start_docker_daemon(tmp_path_factory.mktemp("dockerd"))
    yield daemon
    stop_docker_daemon(daemon)


# ---- podman and skopeo ----------------------------------------------------------

@pytest.fixture(scope="session")
def podman(tmp_path_factory) -> Podman:
    helper = make_podman(tmp_path_factory.mktemp("podman"))
    yield helper
    helper.reset()
    shutil.rmtree(helper.runroot, ignore_errors=True)


@pytest.fixture(scope="session")
def skopeo(tmp_path_factory) -> Skopeo:
    return make_skopeo(tmp_path_factory.mktemp("skopeo"))


def pytest_report_header(config) -> str:
    return f"dockyard: interop peers {'REQUIRED' if interop_required() else 'optional (skip when missing)'}"
