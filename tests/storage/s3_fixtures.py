"""Fixtures of the S3-only storage tests (test_s3_*.py import them): each
test runs once per registered S3 endpoint (tests.support.s3: moto's server
and the session's Ceph RADOS Gateway), on a prefix of its own that must
hold no object and no multipart upload afterwards."""

from __future__ import annotations

import pytest

from storage.s3 import S3Driver
from tests.support.drivers import DriverSpace, driver_kind
from tests.support.s3 import s3_driver_names, s3_target

S3_KINDS = s3_driver_names()
# No S3 endpoint registered is a broken test setup, not a reason to skip:
# CI registers moto and Ceph, and DOCKYARD_TEST_DRIVERS only narrows them.
requires_s3 = pytest.mark.skipif(not S3_KINDS, reason="no S3 storage driver selected (DOCKYARD_TEST_DRIVERS)")


@pytest.fixture(params=S3_KINDS or ["none"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def target(kind):
    return s3_target(kind)


@pytest.fixture
async def space(kind, driver_scratch):
    """A prefix of this test's; afterwards it must hold no object and no upload."""
    space = DriverSpace(driver_kind(kind), driver_scratch)
    yield space
    await space.destroy()


@pytest.fixture
async def driver(space) -> S3Driver:
    return await space.open()


async def read_all(driver, path: str) -> bytes:
    return b"".join([c async for c in driver.reader(path)])
