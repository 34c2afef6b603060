"""Fixtures for the registry API tests: the real application over real HTTP
(aiohttp's test server on loopback), on every registered storage driver.

Each test that uses `make_registry` (or `registry`, `small_registry`) runs
once per driver in tests.support.drivers. Storage is keyed by the root the
settings name, as on disk: two registries made with the same root share
their storage, a different root is other storage. A test marked
`filesystem_only` gets the filesystem driver on that very root (so it may
look at the files), as `dockyard serve` would open it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.app import create_app
from registry.settings import LimitsSettings, settings_for_tests
from storage.driver import StorageDriver
from storage.store import ContentStore
from tests.registry.regapi import Registry
from tests.support.drivers import DriverSpace, driver_kind


@pytest.fixture
def settings(tmp_path):
    return settings_for_tests(tmp_path / "storage")


class RegistryFactory:
    """make_registry(settings=None, driver=None, **sections) -> Registry over a fresh app.

    `settings`: whole settings (else settings_for_tests(tmp_path / "storage", **sections)).
    `driver`: None for the test's driver, a registered driver's name, or a
    StorageDriver to use as it is (the caller closes it).
    """

    def __init__(self, aiohttp_client, tmp_path: Path, driver_name: str, filesystem_only: bool,
                 scratch: Path):
        self._client_factory = aiohttp_client
        self._tmp_path = tmp_path
        self._driver_name = driver_name
        self._on_disk = filesystem_only
        self._scratch = scratch
        self._spaces: dict[tuple[str, str], DriverSpace] = {}
        self._clients: list = []

    def _settings(self, settings, sections):
        return settings if settings is not None else settings_for_tests(self._tmp_path / "storage", **sections)

    async def _driver_for(self, root: str, driver: str | StorageDriver | None) -> StorageDriver | None:
        if isinstance(driver, StorageDriver):
            return driver
        if driver is None and self._on_disk:
            return None                  # the app opens the filesystem root its settings name
        name = driver or self._driver_name
        space = self._spaces.get((name, root))
        if space is None:
            space = self._spaces[(name, root)] = DriverSpace(driver_kind(name), self._scratch)
        return await space.open()

    async def __call__(self, settings=None, driver: str | StorageDriver | None = None,
                       **sections) -> Registry:
        settings = self._settings(settings, sections)
        app = create_app(settings, driver=await self._driver_for(settings.storage.root, driver))
        client = await self._client_factory(app)
        self._clients.append(client)
        return Registry(client)

    async def store(self, root: str | Path | None = None, driver: str | None = None) -> ContentStore:
        """A content store on the storage a registry made with this root
        (default: the default root) uses: what another worker sees."""
        root = str(root if root is not None else self._tmp_path / "storage")
        opened = await self._driver_for(root, driver)
        if opened is None:
            from storage.filesystem import FilesystemDriver

            opened = FilesystemDriver(root)
        return ContentStore(opened)

    async def close(self) -> None:
        for client in reversed(self._clients):
            await client.close()
        spaces, self._spaces = self._spaces, {}
        for space in spaces.values():
            await space.destroy()


@pytest.fixture
async def make_registry(aiohttp_client, tmp_path, request, storage_driver_name, driver_scratch):
    """make_registry(settings=None, driver=None, **settings sections) -> Registry
    over a fresh app; `make_registry.store(root)` a ContentStore on its storage."""
    filesystem_only = request.node.get_closest_marker("filesystem_only") is not None
    factory = RegistryFactory(aiohttp_client, tmp_path, storage_driver_name, filesystem_only, driver_scratch)
    yield factory
    await factory.close()


@pytest.fixture
async def registry(make_registry) -> Registry:
    return await make_registry()


@pytest.fixture
async def small_registry(make_registry, tmp_path) -> Registry:
    """Manifest limit of 4 KiB, to test 413 cheaply."""
    return await make_registry(limits=LimitsSettings(max_manifest_bytes=4096))
