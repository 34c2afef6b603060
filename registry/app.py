"""The registry application factory."""

from __future__ import annotations

import dataclasses
from typing import AsyncIterator

from aiohttp import web

from registry.errors import error_middleware
from registry.routes import add_routes
from registry.settings import Settings, SettingsError, StorageSettings
from registry.sendfile import make_pool
from registry.state import SENDFILE_POOL, SETTINGS, STORE
from storage.driver import StorageDriver
from storage.store import ContentStore, StoreLimits

# Manifests are read with their own limit; upload bodies are streamed from
# request.content, which client_max_size does not bound. This only guards
# request.read()/post(), which no handler uses on a blob.
_CLIENT_MAX_SIZE_SLACK = 64 * 1024


def open_driver(storage: StorageSettings) -> StorageDriver:
    """The storage driver named by the settings."""
    if storage.driver == "filesystem":
        from storage.filesystem import FilesystemDriver

        return FilesystemDriver(storage.root)
    if storage.driver == "s3":
        try:
            from storage.s3 import S3Driver  # type: ignore[import-not-found]
        except ImportError:
            raise SettingsError("storage.driver s3 is not available in this build") from None
        return S3Driver(storage.s3)
    raise SettingsError(f"unknown storage.driver {storage.driver!r}")


def store_limits(settings: Settings) -> StoreLimits:
    """The content store's limits from the settings. Sparse manifests need a
    store that knows `allow_sparse_manifests`; asking for them without one is
    a settings error rather than a silent no."""
    limits = StoreLimits(max_manifest_bytes=settings.limits.max_manifest_bytes)
    if settings.validation.allow_sparse_manifests:
        if "allow_sparse_manifests" not in {f.name for f in dataclasses.fields(StoreLimits)}:
            raise SettingsError("validation.allow_sparse_manifests is not supported by this "
                                "build's content store")
        limits = dataclasses.replace(limits, allow_sparse_manifests=True)
    return limits


def create_app(settings: Settings, driver: StorageDriver | None = None) -> web.Application:
    """The registry as an aiohttp application. `driver` overrides the one the
    settings name (tests use it to run the API over another backend)."""
    app = web.Application(
        middlewares=[error_middleware],
        client_max_size=settings.limits.max_manifest_bytes + _CLIENT_MAX_SIZE_SLACK,
        handler_args={"max_field_size": 16384},
    )
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_store_context(settings, driver))
    add_routes(app)
    return app


def _store_context(settings: Settings, driver: StorageDriver | None):
    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        own = driver is None
        active = open_driver(settings.storage) if own else driver
        limits = store_limits(settings)
        app[STORE] = ContentStore(active, limits)
        app[SENDFILE_POOL] = make_pool()
        try:
            yield
        finally:
            app[SENDFILE_POOL].shutdown(wait=False, cancel_futures=True)
            if own:
                await active.close()

    return store_ctx
