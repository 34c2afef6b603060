"""Fixtures of the client tests."""

from __future__ import annotations

import pytest

from tests.client.fakeregistry import FakeRegistry, start_app


@pytest.fixture
async def fake():
    """A scriptable registry on loopback (tests.client.fakeregistry); `.host` is its address."""
    registry = FakeRegistry()
    runner, host = await start_app(registry.app())
    registry.host = host
    yield registry
    await runner.cleanup()
