"""Delivery of the event outbox (registry.ops.events) to webhook endpoints.

Every process looks at the outbox every events.poll_interval seconds and,
oldest first, claims an entry by taking its lock (storage's try_lock holds
across processes and hosts, and a holder that dies loses it), POSTs it,
and on a 2xx deletes the entry before letting go of the lock: a replica
that claims it next finds it gone. Anything else (an error status, a
timeout, a refused connection) leaves the entry for a later attempt, after
events.backoff seconds, doubled each failure up to events.backoff_max.

An endpoint's address must be public: private, loopback, link-local (the
cloud metadata address among them), multicast, reserved and unspecified
addresses are refused unless events.allow lists the host or a network
holding the address (Harbor CVE-2020-13788). The check is in the resolver
the connection uses, so a name that resolves to a public address when
checked and a private one when connecting is refused too; redirects are
not followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver

from registry.ops.events import CLOUDEVENTS_TYPE, DISTRIBUTION_TYPE
from registry.settings import EventsSettings
from registry.state import STORE, background
from storage import layout
from storage.driver import PathNotFound, StorageDriver, StorageError

log = logging.getLogger("dockyard.events")


class EndpointRefused(Exception):
    """The endpoint's address is not allowed."""


class AllowList:
    def __init__(self, entries: tuple[str, ...]):
        self.hosts = {e.lower() for e in entries if not _network(e)}
        self.networks = [n for n in map(_network, entries) if n is not None]

    def host_allowed(self, host: str) -> bool:
        return host.lower() in self.hosts

    def address_allowed(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        if any(ip in net for net in self.networks):
            return True
        if getattr(ip, "ipv4_mapped", None):
            ip = ip.ipv4_mapped
        return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local
                                     or ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def _network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return None


class CheckedResolver(AbstractResolver):
    """Resolves as usual, then keeps only allowed addresses (none: refused)."""

    def __init__(self, allow: AllowList):
        self.allow = allow
        self.inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        found = await self.inner.resolve(host, port, family)
        if self.allow.host_allowed(host):
            return found
        kept = [entry for entry in found if self.allow.address_allowed(entry["host"])]
        if not kept:
            raise EndpointRefused(f"{host} resolves only to addresses events.allow does not list "
                                  f"({', '.join(sorted({e['host'] for e in found}))})")
        return kept

    async def close(self) -> None:
        await self.inner.close()


class Deliverer:
    """One process's share of delivering the outbox."""

    def __init__(self, driver: StorageDriver, settings: EventsSettings):
        self.driver = driver
        self.settings = settings
        self.allow = AllowList(settings.allow)
        self.headers = {ep.url: _headers(ep.headers) for ep in settings.endpoints}
        self.timeouts = {ep.url: ep.timeout for ep in settings.endpoints}
        self.failures: dict[str, tuple[int, float]] = {}    # entry -> (failures, next attempt)
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Deliverer":
        connector = aiohttp.TCPConnector(resolver=CheckedResolver(self.allow), limit=16)
        self.session = aiohttp.ClientSession(connector=connector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    async def pending(self) -> list[str]:
        try:
            paths = await self.driver.list(layout.EVENT_OUTBOX)
        except PathNotFound:
            return []
        return sorted(path.rsplit("/", 1)[1] for path in paths)

    async def run_once(self) -> int:
        """One pass over the outbox; how many entries this process delivered."""
        delivered = 0
        now = time.monotonic()
        for entry_id in await self.pending():
            failures = self.failures.get(entry_id)
            if failures is not None and failures[1] > now:
                continue
            try:
                if await self._deliver(entry_id):
                    delivered += 1
            except (StorageError, OSError) as exc:
                log.warning("event %s: storage: %s", entry_id, exc)
        return delivered

    async def _deliver(self, entry_id: str) -> bool:
        try:
            lock = await self.driver.try_lock(layout.event_lock(entry_id))
        except PathNotFound:
            return False          # delivered by another replica meanwhile
        if lock is None:
            return False          # another replica is delivering it
        try:
            try:
                record = json.loads(await self.driver.get_content(layout.event_record(entry_id)))
            except PathNotFound:
                return False
            if record["url"] not in self.headers:
                log.warning("event %s: endpoint %s is no longer configured; dropped", entry_id, record["url"])
                await self.driver.delete(layout.event_entry(entry_id))
                return False
            if await self._post(entry_id, record):
                await self.driver.delete(layout.event_entry(entry_id))
                self.failures.pop(entry_id, None)
                return True
            count = self.failures.get(entry_id, (0, 0.0))[0] + 1
            wait = min(self.settings.backoff * 2 ** (count - 1), self.settings.backoff_max)
            self.failures[entry_id] = (count, time.monotonic() + wait)
            return False
        finally:
            with contextlib.suppress(StorageError, OSError):
                await lock.release()

    def check_literal(self, host: str) -> None:
        """An address in the URL itself: aiohttp connects to it without asking the resolver."""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return
        if not (self.allow.host_allowed(host) or self.allow.address_allowed(host)):
            raise EndpointRefused(f"{host} is an address events.allow does not list")

    async def _post(self, entry_id: str, record: dict[str, Any]) -> bool:
        url = record["url"]
        content_type = DISTRIBUTION_TYPE if record.get("format") == "distribution" else CLOUDEVENTS_TYPE
        headers = {**self.headers[url], "Content-Type": content_type}
        body = json.dumps(record["body"], separators=(",", ":")).encode()
        try:
            self.check_literal(urlsplit(url).hostname or "")
            async with self.session.post(url, data=body, headers=headers, allow_redirects=False,
                                         timeout=aiohttp.ClientTimeout(total=self.timeouts[url])) as answer:
                await answer.read()
                if 200 <= answer.status < 300:
                    return True
                log.warning("event %s to %s: HTTP %d; will retry", entry_id, _safe(url), answer.status)
        except EndpointRefused as exc:
            log.warning("event %s to %s refused: %s", entry_id, _safe(url), exc)
        except aiohttp.ClientConnectorError as exc:
            cause = exc.__cause__ or exc.os_error
            if isinstance(cause, EndpointRefused):
                log.warning("event %s to %s refused: %s", entry_id, _safe(url), cause)
            else:
                log.warning("event %s to %s: %s; will retry", entry_id, _safe(url), exc.os_error)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("event %s to %s: %s; will retry", entry_id, _safe(url),
                        type(exc).__name__ if isinstance(exc, asyncio.TimeoutError) else exc)
        return False


def _headers(lines: tuple[str, ...]) -> dict[str, str]:
    return {name.strip(): value.strip() for name, value in (line.split(":", 1) for line in lines)}


def _safe(url: str) -> str:
    """An endpoint URL for a log line: no user info, no query (either may hold a secret)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def delivery_context(settings: EventsSettings):
    """cleanup_ctx: the delivery loop, when endpoints are configured."""
    return background((lambda app: _loop(app, settings)) if settings.endpoints else None)


async def _loop(app: web.Application, settings: EventsSettings) -> None:
    async with Deliverer(app[STORE].driver, settings) as deliverer:
        while True:
            try:
                await deliverer.run_once()
            except Exception:  # keep delivering next time; never take the server down
                log.exception("event delivery pass failed")
            await asyncio.sleep(settings.poll_interval)
