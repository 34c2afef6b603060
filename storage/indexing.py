"""The one-time index build: what Dockyard keeps beside CNCF Distribution's
layout (catalog entries, the referrers index) made from what a root holds,
and Dockyard's old JSON revision links rewritten as bare digests
(storage.layout says why each exists).

It runs once per storage root, not once per process: the first process
that needs it (a catalog or referrers request, the upload purge, start-up)
takes the storage lock `layout.INDEX_LOCK`, walks `repositories/`, hands
each repository to the store, and writes `layout.INDEXED` last. Everyone
else waits for that file, and takes the build over if the lock frees
without it (its holder died: flock and S3 leases die with their holder).
Every write is idempotent (an entry written twice is the same entry), so a
build cut off half way is simply done again. The walk is bounded by
MAX_DIRECTORIES; a wait by WAIT_LIMIT seconds, after which the caller goes on
with whatever index there is rather than failing the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from storage import layout
from storage.driver import PathNotFound, StorageDriver, file_exists

log = logging.getLogger("dockyard.storage.indexing")

MAX_DIRECTORIES = 1_000_000   # directories under repositories/ one build looks at
WAIT_LIMIT = 600.0            # seconds a caller waits for another process's build
_POLL = 0.2                   # seconds between looks at another process's build
_LIST_BATCH = 16              # directories listed at once (object stores: one request each)

RepositoryHook = Callable[[str], Awaitable[None]]


class Indexing:
    def __init__(self, driver: StorageDriver, index_repository: RepositoryHook):
        self.driver = driver
        self.index_repository = index_repository
        self._done = False
        self._task: asyncio.Task | None = None

    async def ensure(self) -> None:
        """Return once the root is indexed (or WAIT_LIMIT passed). Callers
        in one process share one attempt; a failed attempt is retried by
        the next caller."""
        if self._done:
            return
        if self._task is None or (self._task.done() and self._task.exception() is not None):
            self._task = asyncio.create_task(self._run())
        # shield: one caller giving up (a client hanging up) does not stop it for the others
        await asyncio.shield(self._task)

    async def _run(self) -> None:
        deadline = time.monotonic() + WAIT_LIMIT
        while not await file_exists(self.driver, layout.INDEXED):
            # try_lock needs its directory: a tiny file makes it (and says what it is)
            if not await file_exists(self.driver, layout.OWN_README):
                await self.driver.put_content(layout.OWN_README, layout.OWN_README_TEXT)
            lock = await self.driver.try_lock(layout.INDEX_LOCK)
            if lock is not None:
                async with lock:
                    if not await file_exists(self.driver, layout.INDEXED):
                        await self._build()
                break
            if time.monotonic() > deadline:
                log.warning("storage index: another process's build did not finish in %.0f s; "
                            "going on without waiting", WAIT_LIMIT)
                return              # not done: the next caller looks again
            await asyncio.sleep(_POLL)
        self._done = True

    async def _build(self) -> None:
        started = time.monotonic()
        repositories = 0
        async for repo in self._repositories():
            await self.index_repository(repo)
            repositories += 1
        await self.driver.put_content(layout.INDEXED, f"{time.time():.0f}\n".encode())
        log.info("storage index: %d repositories indexed in %.1f s", repositories,
                 time.monotonic() - started)

    async def _repositories(self):
        """Every repository under repositories/, breadth first: a directory
        with manifests or layer links (a repository may also hold others,
        "a" and "a/b")."""
        frontier, seen = [layout.REPOSITORIES], 0
        while frontier:
            batch, frontier = frontier[:_LIST_BATCH], frontier[_LIST_BATCH:]
            seen += len(batch)
            if seen > MAX_DIRECTORIES:
                log.warning("storage index: stopped after %d directories under %s",
                            MAX_DIRECTORIES, layout.REPOSITORIES)
                return
            listings = await asyncio.gather(*(self._list(d) for d in batch))
            for directory, children in zip(batch, listings):
                if directory != layout.REPOSITORIES and layout.is_repository(children):
                    yield layout.repo_from_dir(directory)
                frontier += [c for c in children if layout.may_hold_repositories(c)]

    async def _list(self, directory: str) -> list[str]:
        try:
            return await self.driver.list(directory)
        except PathNotFound:
            return []           # a file, or gone meanwhile
