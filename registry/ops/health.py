"""Liveness and readiness, as Kubernetes probes expect them.

/healthz says the process answers. /readyz says storage is reachable and
writable: a small write, read back, delete under the health prefix
(storage.layout.health_probe), cached for a few seconds so a probe every
second costs one storage round trip per PROBE_CACHE per process, and one
probe at a time however many requests ask. `dockyard serve` runs the same
probe before it starts and refuses to start when it fails.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import socket
import time

from aiohttp import web

from storage import layout
from storage.driver import StorageDriver, StorageError

PROBE_CACHE = 3.0          # seconds a readiness answer is reused
PROBE_TIMEOUT = 10.0       # seconds the write-read-delete may take


class ProbeFailed(Exception):
    """Storage failed the write-read-delete; the message says where and why."""


def probe_name() -> str:
    # several replicas probe one bucket at once: each its own file
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64] or "host"
    return f"p{host}-{os.getpid()}-{secrets.token_hex(4)}"


async def probe_storage(driver: StorageDriver) -> None:
    """Write, read back and delete a probe file; ProbeFailed with one line."""
    path = layout.health_probe(probe_name())
    data = secrets.token_bytes(16)
    step = "write"
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            await driver.put_content(path, data, durable=False)
            step = "read"
            if await driver.get_content(path) != data:
                raise ProbeFailed("storage read back other bytes than it was given")
            step = "delete"
            await driver.delete(path)
    except ProbeFailed:
        raise
    except TimeoutError:
        raise ProbeFailed(f"storage {step} did not finish within {PROBE_TIMEOUT:.0f}s") from None
    except (StorageError, OSError) as exc:
        raise ProbeFailed(f"storage {step} failed: {describe(exc)}") from None


def describe(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    filename = getattr(exc, "filename", None)
    text = f"{filename}: {text}" if filename else text
    cause = exc.__cause__
    if cause is not None and not filename and getattr(cause, "filename", None):
        text = f"{cause.filename}: {getattr(cause, 'strerror', None) or cause}"
    return " ".join(text.split())[:300]


class Readiness:
    """The cached answer of /readyz for one process."""

    def __init__(self, driver_of):
        self._driver_of = driver_of     # () -> StorageDriver, once the app has started
        self._checked = float("-inf")
        self._error: str | None = None
        self._lock = asyncio.Lock()

    async def check(self) -> str | None:
        """None when ready, else why not."""
        if time.monotonic() - self._checked < PROBE_CACHE:
            return self._error
        async with self._lock:
            if time.monotonic() - self._checked >= PROBE_CACHE:
                try:
                    await probe_storage(self._driver_of())
                    self._error = None
                except ProbeFailed as exc:
                    self._error = str(exc)
                self._checked = time.monotonic()
        return self._error


READINESS = web.AppKey("readiness", Readiness)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, headers={"Cache-Control": "no-store"})


async def readyz(request: web.Request) -> web.Response:
    error = await request.config_dict[READINESS].check()
    if error is None:
        return web.json_response({"status": "ready"}, headers={"Cache-Control": "no-store"})
    return web.json_response({"status": "not ready", "reason": error}, status=503,
                             headers={"Cache-Control": "no-store"})


def add_health_routes(app: web.Application) -> None:
    for path, handler in (("/healthz", healthz), ("/readyz", readyz)):
        app.router.add_get(path, handler, allow_head=True)
