"""Typed application state shared by the handlers (aiohttp `web.AppKey`)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from registry.filesend import Waiting
from registry.settings import Settings
from storage.store import ContentStore

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", ContentStore)
FILE_SEND_POOL = web.AppKey("file_send_pool", ThreadPoolExecutor)
FILE_SENDS_WAITING = web.AppKey("file_sends_waiting", Waiting)
