"""Typed application state shared by the handlers (aiohttp `web.AppKey`),
and the one way a background loop lives as long as the app serves."""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Awaitable, Callable

from aiohttp import web

from registry.filesend import Waiting
from registry.settings import Settings
from storage.store import ContentStore

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", ContentStore)
FILE_SEND_POOL = web.AppKey("file_send_pool", ThreadPoolExecutor)
FILE_SENDS_WAITING = web.AppKey("file_sends_waiting", Waiting)


def background(loop: Callable[[web.Application], Awaitable[None]] | None):
    """A cleanup_ctx running loop(app) as a task while the app serves and
    cancelling it at shutdown; None (the feature is off): nothing runs."""
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(loop(app)) if loop is not None else None
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return ctx
