"""The pull-through store: wraps the content store, and fetches what it
lacks from the upstream a route names.

    cache = PullThrough(settings.proxy, store)
    route = await cache.resolve(name, ns)             # None: an ordinary repository
    manifest = await cache.manifest(route, "latest")  # storage.manifests.Manifest
    fetch = await cache.blob(route, digest)           # None: storage has it (serve it as usual)

Manifests: by digest, a cached one is served and the upstream never asked;
by tag, a cached one is served without a request for `revalidate` seconds,
then checked with one HEAD (which Docker Hub does not count as a pull), and
served as cached when the upstream cannot answer (stale-if-error). What
comes from upstream is stored sparse (an index without its children, an
image without its layers): each child and blob is fetched when asked for,
never a whole multi-arch tree up front.

Blobs: one fetch per (upstream, repository, digest) at a time (flights.BlobFetch).
Revalidation times live in this process: after a restart, or in another
worker, a tag is checked once more.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import OrderedDict
from typing import AsyncIterator

from aiohttp import web

from registry.errors import UpstreamUnavailable
from registry.proxy.flights import BlobFetch, Flights
from registry.proxy.routing import Route, Router
from registry.proxy.settings import ProxySettings
from registry.proxy.upstream import Upstream, UpstreamManifest
from storage.driver import StorageError
from storage.manifests import Manifest, Manifests
from storage.oci.errors import (BlobUnknown, DigestInvalid, ManifestInvalid, ManifestUnknown, NameUnknown,
                                OciError, SizeInvalid, TooManyRequests)
from storage.oci.names import is_digest
from storage.store import ContentStore

log = logging.getLogger("dockyard.registry.proxy")

_MAX_VALIDATED = 65536          # (repository, tag) revalidation times kept in memory
# Failures of the upstream that a cached tag survives (stale-if-error).
_UPSTREAM_DOWN = (UpstreamUnavailable, TooManyRequests)


class PullThrough:
    def __init__(self, proxy: ProxySettings, store: ContentStore, environ=None):
        self.proxy = proxy
        self.store = store
        self.router = Router(proxy)
        self.upstreams = {u.prefix: Upstream(u, proxy.allow_hosts, environ) for u in proxy.upstreams}
        # Cached manifests are stored without their children: those come on demand.
        self._sparse = Manifests(store.driver, dataclasses.replace(store.limits, allow_sparse_manifests=True),
                                 store.blobs, store.catalog, store.indexing.ensure)
        self._validated: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._manifest_flights = Flights()
        self._blob_fetches: dict[tuple[str, str, str], BlobFetch] = {}
        self._blob_tasks: set[asyncio.Task] = set()

    async def close(self) -> None:
        await self._manifest_flights.close()
        for task in list(self._blob_tasks):
            task.cancel()
        for task in list(self._blob_tasks):
            with contextlib.suppress(BaseException):
                await task
        for upstream in self.upstreams.values():
            await upstream.close()

    # -- routing -----------------------------------------------------------------------
    async def resolve(self, name: str, ns: str | None) -> Route | None:
        """The route of a request's repository: by ?ns= (an upstream's
        namespace), by prefix, or to the default upstream for an unprefixed
        name no local repository has; None for an ordinary repository."""
        up = self.router.by_namespace(ns)
        if up is not None:
            return self.router.route(up, name, namespace=ns)
        route = self.router.for_prefixed(name)
        if route is not None:
            return route
        default = self.router.default
        if default is not None and not await self.store.catalog.has(name):
            return self.router.route(default, name)
        return None

    def proxied(self, name: str) -> bool:
        """True for a name under an upstream's prefix (where pushes are refused)."""
        return self.router.prefixed(name) is not None

    def upstream(self, route: Route) -> Upstream:
        return self.upstreams[route.upstream.prefix]

    # -- manifests ---------------------------------------------------------------------
    async def _cached(self, local: str, reference: str) -> Manifest | None:
        try:
            return await self.store.manifests.get(local, reference)
        except (ManifestUnknown, NameUnknown):
            return None

    def _fresh(self, route: Route, tag: str) -> bool:
        seen = self._validated.get((route.local, tag))
        return seen is not None and time.monotonic() - seen < route.upstream.revalidate

    def _mark_fresh(self, route: Route, tag: str) -> None:
        key = (route.local, tag)
        self._validated[key] = time.monotonic()
        self._validated.move_to_end(key)
        while len(self._validated) > _MAX_VALIDATED:
            self._validated.popitem(last=False)

    async def manifest(self, route: Route, reference: str) -> Manifest:
        cached = await self._cached(route.local, reference)
        if is_digest(reference):
            if cached is not None:
                return cached                   # content-addressed: never stale
            return await self._fetch_manifest(route, reference)
        if cached is not None and self._fresh(route, reference):
            return cached
        if cached is None:
            return await self._fetch_manifest(route, reference)
        try:
            digest = await self._manifest_flights.join(
                ("head", route.upstream.prefix, route.remote, reference),
                lambda: self.upstream(route).head_manifest(route.remote, reference))
        except _UPSTREAM_DOWN as exc:
            log.warning("serving cached %s:%s: %s", route.local, reference, exc)
            return cached
        if digest is None:
            raise ManifestUnknown(f"manifest unknown to {self.upstream(route).label}: "
                                  f"{route.remote}:{reference}", {"name": route.local, "reference": reference})
        if digest == cached.digest:
            self._mark_fresh(route, reference)
            return cached
        try:
            return await self._fetch_manifest(route, reference)
        except _UPSTREAM_DOWN as exc:          # gone between the HEAD and the GET
            log.warning("serving cached %s:%s: %s", route.local, reference, exc)
            return cached

    async def _fetch_manifest(self, route: Route, reference: str) -> Manifest:
        key = ("get", route.upstream.prefix, route.remote, reference)
        return await self._manifest_flights.join(key, lambda: self._fetch_and_store(route, reference))

    async def _fetch_and_store(self, route: Route, reference: str) -> Manifest:
        fetched: UpstreamManifest = await self.upstream(route).get_manifest(route.remote, reference)
        try:
            await self._sparse.put(route.local, reference, fetched.body, fetched.media_type)
        except (ManifestInvalid, DigestInvalid, SizeInvalid) as exc:
            raise UpstreamUnavailable(f"{self.upstream(route).label} sent a manifest this registry "
                                      f"cannot keep: {exc}", {"upstream": route.upstream.prefix}) from exc
        if not is_digest(reference):
            self._mark_fresh(route, reference)
        return Manifest(fetched.digest, fetched.media_type, fetched.body)

    # -- blobs -------------------------------------------------------------------------
    async def has_blob(self, route: Route, digest: str) -> bool:
        """True when storage can serve the blob in the route's repository. A
        blob cached for another repository is linked here only once this
        repository's upstream confirms it has it (a HEAD): the cache never
        tells one upstream repository what another holds."""
        try:
            await self.store.blobs.stat(route.local, digest)
            return True
        except BlobUnknown:
            pass
        if not await self.store.blobs.exists(digest):
            return False
        if await self.blob_size(route, digest) is None:
            raise self._blob_unknown(route, digest)
        await self.store.blobs.link(route.local, digest)
        return True

    def _blob_unknown(self, route: Route, digest: str) -> BlobUnknown:
        return BlobUnknown(f"blob unknown to {self.upstream(route).label}: {route.remote}@{digest}",
                           {"digest": digest})

    async def blob_size(self, route: Route, digest: str) -> int | None:
        return await self._manifest_flights.join(
            ("blob-head", route.upstream.prefix, route.remote, digest),
            lambda: self.upstream(route).blob_size(route.remote, digest))

    def blob_fetch(self, route: Route, digest: str) -> BlobFetch:
        """The fetch of the blob in flight, joined, or a new one started;
        acquired for the caller (release() it)."""
        key = (route.upstream.prefix, route.remote, digest)
        fetch = self._blob_fetches.get(key)
        if fetch is None or fetch.finished:
            upstream = self.upstream(route)
            fetch = BlobFetch(digest, lambda exc: self._map_blob_error(upstream, route, digest, exc))
            self._blob_fetches[key] = fetch

            async def run() -> None:
                try:
                    await fetch.run(lambda: upstream.open_blob(route.remote, digest),
                                    lambda chunks, size: self._commit_blob(route, digest, chunks, size))
                finally:
                    if self._blob_fetches.get(key) is fetch:
                        del self._blob_fetches[key]

            fetch.acquire()
            # a task of its own: no waiter can cancel it; close() stops it
            task = asyncio.create_task(run())
            self._blob_tasks.add(task)
            task.add_done_callback(self._blob_tasks.discard)
            return fetch
        return fetch.acquire()

    async def _commit_blob(self, route: Route, digest: str, chunks: AsyncIterator[bytes], size: int) -> None:
        await self.store.uploads.put(route.local, digest, chunks, size=size)

    @staticmethod
    def _map_blob_error(upstream: Upstream, route: Route, digest: str, exc: BaseException) -> OciError:
        what = f"blob {route.remote}@{digest}"
        if isinstance(exc, (DigestInvalid, SizeInvalid)):
            log.warning("%s: %s sent content that does not match: nothing cached", what, upstream.label)
            return UpstreamUnavailable(f"{what}: {upstream.label} sent content that does not match "
                                       f"its digest or size; nothing was cached",
                                       {"upstream": route.upstream.prefix})
        if isinstance(exc, StorageError):
            log.error("%s: storage failed while caching: %s", what, exc)
            return OciError("storage backend error")
        if isinstance(exc, OciError):
            return exc
        if not isinstance(exc, Exception):
            return UpstreamUnavailable(f"{what}: the fetch from {upstream.label} was stopped")
        log.warning("%s: fetch from %s broke off: %s", what, upstream.label, exc)
        return upstream.failure(what, exc)


PULL_THROUGH = web.AppKey("pull_through", PullThrough)
