"""The content store: blobs, uploads, manifests (with tags and referrers)
and the catalog, each a part of its own module, on top of any
`StorageDriver`. The registry handlers, `dockyard gc` and any offline tool
open one with `ContentStore(driver, limits)` and talk to its parts:

    store.blobs       storage.blobs      stat, read, open_local, url, link, mount, unlink
    store.uploads     storage.uploads    start, status, append, finish, cancel, put, purge
    store.manifests   storage.manifests  put, get, delete, tags, referrers
    store.catalog     storage.catalog    repositories, has
    store.indexing    storage.indexing   ensure: the one-time index build of a root

Every path comes from `storage.layout`; no part builds one. Errors are the
OCI vocabulary's (`storage.oci.errors`, each names its code).

Several worker processes (or hosts) may share one storage root, so nothing
here keeps state that another process could contradict: upload sessions live
in storage and are changed under a lock kept there, every other mutation is
a whole-file atomic write or a move, and the only in-process caches hold
immutable things (manifest bytes by digest, a running hash that is dropped
the moment the stored upload disagrees with it).
"""

from __future__ import annotations

import logging

from storage.blobs import BlobInfo, Blobs, StoreLimits
from storage.catalog import Catalog, Page
from storage.driver import StorageDriver
from storage.indexing import Indexing
from storage.manifests import Manifest, Manifests, PutManifestResult
from storage.oci.errors import NameInvalid
from storage.oci.names import validate_name
from storage.uploads import Uploads, UploadStatus

log = logging.getLogger("dockyard.storage.store")

__all__ = ["BlobInfo", "ContentStore", "Manifest", "Page", "PutManifestResult", "StoreLimits",
           "UploadStatus"]


class ContentStore:
    def __init__(self, driver: StorageDriver, limits: StoreLimits | None = None):
        self.driver = driver
        self.limits = limits or StoreLimits()
        self.indexing = Indexing(driver, self._index_repository)
        self.catalog = Catalog(driver, self.indexing.ensure)
        self.blobs = Blobs(driver, self.limits, self.catalog)
        self.uploads = Uploads(driver, self.blobs)
        self.manifests = Manifests(driver, self.limits, self.blobs, self.catalog, self.indexing.ensure)

    async def _index_repository(self, repo: str) -> None:
        """What the index build (storage.indexing) does for each repository."""
        try:
            validate_name(repo)
        except NameInvalid:
            log.warning("storage index: skipped %r, not a repository name Dockyard serves", repo)
            return
        await self.catalog.register(repo)
        await self.manifests.reindex(repo)

    async def purge_uploads(self, older_than: float) -> int:
        """Delete upload sessions started before older_than (epoch seconds)
        in every catalogued repository; how many."""
        count, last = 0, None
        for _ in range(1_000_000):  # pages of the catalog, bounded
            page = await self.catalog.repositories(1000, last)
            for repo in page.items:
                count += len(await self.uploads.purge(repo, older_than))
            if not page.has_more or not page.items:
                break
            last = page.items[-1]
        return count

    async def reclaim_leftovers(self, older_than: float) -> int:
        """Remove what interrupted writes left hidden before older_than; how many."""
        return await self.driver.reclaim_leftovers(older_than)

    async def close(self) -> None:
        await self.driver.close()
