"""Fixtures for the registry API tests: the real application over real HTTP
(aiohttp's test server on loopback) with filesystem storage in tmp_path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from registry.app import create_app  # noqa: E402
from registry.settings import LimitsSettings, settings_for_tests  # noqa: E402
from regapi import Registry  # noqa: E402


@pytest.fixture
def settings(tmp_path):
    return settings_for_tests(tmp_path / "storage")


@pytest.fixture
def make_registry(aiohttp_client, tmp_path):
    """make_registry(**settings sections) -> Registry over a fresh app."""

    async def make(settings=None, **sections) -> Registry:
        if settings is None:
            settings = settings_for_tests(tmp_path / "storage", **sections)
        return Registry(await aiohttp_client(create_app(settings)))

    return make


@pytest.fixture
async def registry(make_registry) -> Registry:
    return await make_registry()


@pytest.fixture
async def small_registry(make_registry, tmp_path) -> Registry:
    """Manifest limit of 4 KiB, to test 413 cheaply."""
    return await make_registry(limits=LimitsSettings(max_manifest_bytes=4096))
