"""The registry application factory."""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import time
from typing import Any, AsyncIterator

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from registry.auth.gate import auth_middleware
from registry.auth.runtime import AUTH, AuthRuntime, auth_context
from registry.auth.service import token_app
from registry.errors import error_middleware
from registry.filesend import Waiting, make_pool
from registry.lifecycle import READ_ONLY, ReadOnlySwitch, read_only_middleware
from registry.ops.events import events_middleware
from registry.ops.health import READINESS, Readiness, add_health_routes
from registry.ops.metrics import InstrumentedDriver, add_metrics_route
from registry.ops.middleware import echo_request_id, ops_middleware
from registry.ops.requestlog import AccessWriter
from registry.ops.webhooks import delivery_context
from registry.proxy import handlers as pull_through
from registry.routes import add_routes
from registry.settings import Settings, SettingsError, UploadsSettings
from registry.state import FILE_SEND_POOL, FILE_SENDS_WAITING, SETTINGS, STORE, background
from storage.config import StorageConfigError, check_driver, open_driver
from storage.driver import StorageDriver
from storage.store import ContentStore

log = logging.getLogger("dockyard.registry")

# Manifests are read with their own limit; upload bodies are streamed from
# request.content, which client_max_size does not bound. This only guards
# request.read()/post(), which no handler uses on a blob.
_CLIENT_MAX_SIZE_SLACK = 64 * 1024
# hidden leftovers of interrupted storage writes older than this are removed
# with each upload purge pass
LEFTOVER_AGE = 3600


def create_app(settings: Settings, driver: StorageDriver | None = None) -> web.Application:
    """The registry as an aiohttp application. `driver` overrides the one the
    settings name (tests use it to run the API over another backend)."""
    runtime = AuthRuntime(settings)
    read_only = ReadOnlySwitch(settings.lifecycle.read_only)
    access_writer = AccessWriter(settings.log.format)
    app = web.Application(
        middlewares=[ops_middleware(metrics_on=settings.metrics.enabled, access_log=settings.http.access_log,
                                    log_format=settings.log.format, writer=access_writer),
                     error_middleware,
                     *([events_middleware(settings.events)] if settings.events.endpoints else []),
                     auth_middleware(lambda: runtime.gate),
                     read_only_middleware(lambda: read_only.on),
                     pull_through.push_guard],
        client_max_size=settings.limits.max_manifest_bytes + _CLIENT_MAX_SIZE_SLACK,
        handler_args={"max_field_size": 16384},
    )
    app[SETTINGS] = settings
    app[AUTH] = runtime
    app[READ_ONLY] = read_only
    app.cleanup_ctx.append(_store_context(settings, driver))
    app.cleanup_ctx.append(auth_context(runtime))
    pull_through.install(app, settings)      # after the store: it wraps it
    app.cleanup_ctx.append(_upload_purger(settings))
    app.cleanup_ctx.append(delivery_context(settings.events))
    app.cleanup_ctx.append(_garbage_collector(settings))
    app.on_shutdown.append(_stop_waiting_sends)
    app.on_response_prepare.append(echo_request_id)
    app.on_cleanup.append(lambda app: _flush(access_writer))
    add_routes(app)
    add_ops_routes(app, settings)
    if runtime.issues_tokens:
        app.add_subapp("/auth/", token_app(lambda: runtime.service))
    return app


async def _flush(writer: AccessWriter) -> None:
    writer.flush()


def add_ops_routes(app: web.Application, settings: Settings) -> None:
    """/healthz, /readyz and (unless metrics.addr names a listener of its
    own) /metrics: outside /v2/, so the auth gate lets them through."""
    app[READINESS] = Readiness(lambda: app[STORE].driver)
    add_health_routes(app)
    if settings.metrics.enabled and not settings.metrics.addr:
        add_metrics_route(app, settings.metrics.token_file)


def ops_app(settings: Settings, main: web.Application) -> web.Application:
    """The metrics.addr listener's app: /metrics and the probes of `main`."""
    app = web.Application(middlewares=[ops_middleware(metrics_on=False, access_log=False)])
    app[READINESS] = main[READINESS]
    add_health_routes(app)
    if settings.metrics.enabled:
        add_metrics_route(app, settings.metrics.token_file)
    app.on_response_prepare.append(echo_request_id)
    return app


class ServerLog(logging.LoggerAdapter):
    """aiohttp's server logger ('aiohttp.server'), for `web.AppRunner(logger=...)`.

    aiohttp logs every malformed request (bad request line, oversized
    header, broken chunked body) and some client hang-ups as ERROR with a
    traceback: a flood of bad requests became a flood of tracebacks. Those
    are the client's doing: one line at debug level. Anything else (a bug
    in a handler that escaped the error middleware) keeps its traceback."""

    def __init__(self, logger: logging.Logger | None = None):
        super().__init__(logger or logging.getLogger("aiohttp.server"), {})

    def exception(self, msg: Any, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if _clients_fault(exc):
            self.logger.debug("%s: %s", _format(msg, args), describe_client_error(exc))
        else:
            self.logger.error(msg, *args, exc_info=exc_info, **kwargs)

    def debug(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        exc = kwargs.pop("exc_info", None)
        if isinstance(exc, BaseException):
            self.logger.debug("%s: %s", _format(msg, args), describe_client_error(exc))
        else:
            self.logger.debug(msg, *args, **kwargs)


def _clients_fault(exc: BaseException | None) -> bool:
    return isinstance(exc, (HttpProcessingError, ConnectionError))


def _format(msg: Any, args: tuple) -> str:
    try:
        return str(msg) % args if args else str(msg)
    except (TypeError, ValueError):
        return str(msg)


def describe_client_error(exc: BaseException) -> str:
    """One short line for a client's malformed request or hang-up."""
    if isinstance(exc, HttpProcessingError):
        text = f"{exc.code} {exc.message}"
    else:
        text = str(exc)
    text = " ".join(text.split())
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(exc).__name__}: {text}"


def _store_context(settings: Settings, driver: StorageDriver | None):
    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        own = driver is None
        active = None
        try:
            active = open_driver(settings.storage) if own else driver
            if own:
                await check_driver(active)     # S3: bucket, credentials, endpoint
        except StorageConfigError as exc:
            if own and active is not None:
                await active.close()
            raise SettingsError(str(exc)) from None
        timed = InstrumentedDriver(active) if settings.metrics.enabled else active
        app[STORE] = ContentStore(timed, settings.store_limits())
        app[FILE_SEND_POOL] = make_pool()
        app[FILE_SENDS_WAITING] = Waiting()
        try:
            yield
        finally:
            app[FILE_SEND_POOL].shutdown(wait=False, cancel_futures=True)
            if own:
                await active.close()

    return store_ctx


async def _stop_waiting_sends(app: web.Application) -> None:
    # Blob sends stuck on a reader that reads nothing end now; sends that
    # are moving get the drain time to finish.
    app[FILE_SENDS_WAITING].stop()


def _upload_purger(settings: Settings):
    """A background task deleting abandoned upload sessions."""
    return background((lambda app: _purge_loop(app[STORE], settings.uploads))
                      if settings.uploads.purge_interval > 0 else None)


async def _purge_loop(store: ContentStore, uploads: UploadsSettings) -> None:
    # Workers start together: spread their passes over the interval.
    await asyncio.sleep(random.uniform(0, uploads.purge_interval))
    while True:
        try:
            purged = await store.purge_uploads(time.time() - uploads.max_age)
            if purged:
                log.info("purged %d abandoned upload sessions", purged)
            # a write lives for moments: hidden leftovers an hour old are a crash's
            reclaimed = await store.reclaim_leftovers(time.time() - LEFTOVER_AGE)
            if reclaimed:
                log.info("removed %d leftovers of interrupted writes", reclaimed)
        except Exception:  # keep purging next time; never take the server down
            log.exception("upload purge failed")
        await asyncio.sleep(uploads.purge_interval)


# ---- garbage collection inside serve (gc.interval) ---------------------------------

def _garbage_collector(settings: Settings):
    """A background pass every gc.interval seconds; passes of every worker
    and replica share the storage's GC lock, so one runs at a time."""
    return background((lambda app: _gc_loop(app[STORE], settings)) if settings.gc.interval > 0 else None)


async def _gc_loop(store: ContentStore, settings: Settings) -> None:
    from registry.gc_cli import gc_policy
    from storage.gc import collect_garbage

    policy = gc_policy(settings)
    await asyncio.sleep(random.uniform(0, settings.gc.interval))
    while True:
        try:
            await collect_garbage(store, policy)
        except Exception:  # next time again; never take the server down
            log.exception("garbage collection pass failed")
        await asyncio.sleep(settings.gc.interval)
