"""Content stores for the storage tests, over every registered driver.

`store`, `other_worker` (a second store on the same storage: what another
worker process sees) and `open_store(limits=None)` run a test once per
driver in tests.support.drivers. A test marked `filesystem_only` runs once,
on the filesystem driver at `root` (tmp_path / "root"), and may read the
files there; `root` is refused to any other test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Awaitable, Callable

import pytest

from storage.blobs import StoreLimits
from storage.driver import StorageDriver
from storage.filesystem import FilesystemDriver
from storage.store import ContentStore
from tests.support.drivers import DriverSpace


def _filesystem_only(request) -> bool:
    return request.node.get_closest_marker("filesystem_only") is not None


@pytest.fixture
def root(request, tmp_path) -> Path:
    """The filesystem root under the stores of a filesystem_only test."""
    if not _filesystem_only(request):
        pytest.fail("a test that looks at files under the root must be marked "
                    "@pytest.mark.filesystem_only(why)", pytrace=False)
    return tmp_path / "root"


@pytest.fixture
def open_store(request, driver_space: DriverSpace, tmp_path) -> Callable[..., Awaitable[ContentStore]]:
    """open_store(limits=None) -> another ContentStore on this test's storage."""
    async def open_(limits: StoreLimits | None = None) -> ContentStore:
        driver: StorageDriver
        if _filesystem_only(request):
            driver = FilesystemDriver(str(tmp_path / "root"))
        else:
            driver = await driver_space.open()
        return ContentStore(driver, limits)

    return open_


@pytest.fixture
async def store(open_store) -> ContentStore:
    return await open_store()


@pytest.fixture
async def other_worker(open_store) -> ContentStore:
    """A second ContentStore on the same storage: what another process sees."""
    return await open_store()
