"""The catalog: which repositories exist, listed without walking blob data
(one empty entry per repository, written when it first gets content).

A root CNCF Distribution filled has no entries: the listing waits for the
one-time index build (storage.indexing) to write them first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable

from storage import layout
from storage.driver import PathNotFound, StorageDriver, exists, file_exists
from storage.oci.names import validate_name


@dataclass(frozen=True)
class Page:
    items: list[str]
    has_more: bool         # True when a further page exists (Link header)


def paginate(items: list[str], n: int | None, last: str | None) -> Page:
    """items sorted; those after `last`, at most n (n=0: an empty page)."""
    if last:
        items = [i for i in items if i > last]
    if n is None:
        return Page(items, False)
    n = max(n, 0)
    return Page(items[:n], n > 0 and len(items) > n)


class Catalog:
    def __init__(self, driver: StorageDriver, indexed: Callable[[], Awaitable[None]] | None = None):
        self.driver = driver
        self._indexed = indexed           # returns once the root's index is built
        self._known: set[str] = set()     # entries this process wrote or saw: never removed

    async def register(self, repo: str) -> None:
        """Write the catalog entry the first time repo gets content."""
        if repo in self._known:
            return
        entry = layout.catalog_entry(repo)
        if not await file_exists(self.driver, entry):
            await self.driver.put_content(entry, b"")
        self._known.add(repo)

    async def has(self, repo: str) -> bool:
        """True when the repository has (or had) content."""
        validate_name(repo)
        return await exists(self.driver, layout.repo_dir(repo))

    async def repositories(self, n: int | None = None, last: str | None = None) -> Page:
        """The catalog, lexically sorted."""
        if self._indexed is not None:
            await self._indexed()
        try:
            entries = await self.driver.list(layout.CATALOG)
        except PathNotFound:
            entries = []
        return paginate(sorted(layout.repo_from_catalog_entry(e) for e in entries), n, last)
