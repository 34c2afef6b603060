"""The content store: blobs, uploads, manifests, tags and referrers on top of
any `StorageDriver`. The registry handlers talk only to this class.

Every path comes from `storage.layout`; this module never builds one.
Errors are the domain errors of `storage.errors` (each names its OCI code).

CONTRACT NOTE: this file was first written as the interface both the storage
and the registry work were built against. Signatures below are the contract;
change them only together with registry/. (Additions since: keyword-only
`size=` on finish_upload/put_blob, `upload_started_at`, `purge_uploads`,
`blob_exists`.)

Several worker processes (or hosts) may share one storage root, so nothing
here keeps state that another process could contradict: upload sessions live
in storage, every mutation is a whole-file atomic write or a move, and the
only in-process caches hold immutable things (manifest bytes by digest, a
running hash that is dropped the moment the stored upload disagrees with it).
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import hashlib
import json
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from storage import layout, names
from storage.driver import PathNotFound, StorageDriver
from storage.errors import (BlobUnknown, BlobUploadInvalid, BlobUploadUnknown, DigestInvalid,
                            ManifestBlobUnknown, ManifestInvalid, ManifestTooLarge,
                            ManifestUnknown, NameUnknown, RangeInvalid, SizeInvalid)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")
IMAGE_MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = IMAGE_MANIFEST_TYPES | INDEX_TYPES
# Content-Types that say nothing: the body's mediaType (or shape) decides.
_GENERIC_CONTENT_TYPES = frozenset({"", "application/json", "application/octet-stream",
                                    "text/plain", "*/*"})

# The OCI empty descriptor: `{}` used as the config of artifacts. The store
# provides it when a manifest needs it, so clients need not upload 2 bytes.
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_BLOB = b"{}"
EMPTY_DIGEST = "sha256:" + hashlib.sha256(EMPTY_BLOB).hexdigest()

_WRITE_BATCH = 1 << 20          # bytes gathered from the network before one write
_HASH_ON_LOOP_LIMIT = 64 << 10  # hash smaller buffers inline, larger in a thread
_DIGEST_RECORD_MIN = 1 << 20   # smaller uploads are cheaper to re-hash than to record
_MAX_HASHERS = 1024             # in-process running hashes kept (an optimisation)
_MAX_MEDIA_TYPES = 16384        # in-process (repo, digest) -> media type entries
_SESSION_LOCK_WAIT = 1.0        # seconds a request waits for a busy upload session
# Real manifests nest 5 levels (index > manifests > descriptor > platform >
# os.features); this leaves room for any extension and none for a parser bomb.
MAX_MANIFEST_DEPTH = 64
# The largest size a descriptor may claim: what any storage can hold (off_t).
MAX_BLOB_SIZE = (1 << 63) - 1
# A mount without `from` looks through at most this many repositories.
_MOUNT_SEARCH_LIMIT = 10_000
_REFERRERS_BATCH = 256          # referrer entries read per storage round trip
_RELINK_TRIES = 3               # re-links of a revision a concurrent delete removed


@dataclass(frozen=True)
class BlobInfo:
    digest: str            # "sha256:<hex>" or "sha512:<hex>"
    size: int


@dataclass(frozen=True)
class UploadStatus:
    repo: str
    upload_id: str
    offset: int            # bytes received so far; next chunk must start here


@dataclass(frozen=True)
class Manifest:
    digest: str
    media_type: str        # exactly the Content-Type it was pushed with
    body: bytes


@dataclass(frozen=True)
class PutManifestResult:
    digest: str
    subject: str | None    # digest of the `subject` descriptor, for OCI-Subject


@dataclass(frozen=True)
class Page:
    items: list[str]
    has_more: bool         # True when a further page exists (Link header)


@dataclass
class StoreLimits:
    max_manifest_bytes: int = 4 * 1024 * 1024
    # digest algorithms accepted for blobs and manifests
    digest_algorithms: tuple[str, ...] = field(default=("sha256", "sha512"))
    # in-process cache of manifest bytes by digest (immutable content only)
    manifest_cache_bytes: int = 64 * 1024 * 1024
    # accept manifests whose layers or index children were never pushed
    # (mirrors of a subset, non-distributable layers); off, as Distribution
    allow_sparse_manifests: bool = False


@dataclass
class _RunningHash:
    """sha256 of an upload's first `offset` bytes, as this process wrote them."""
    hasher: Any
    offset: int


@dataclass(frozen=True)
class _ParsedManifest:
    media_type: str
    blobs: list[str]               # config and layers that must be linked
    children: list[str]            # index entries that must be manifests here
    subject: str | None
    artifact_type: str | None
    annotations: dict[str, str] | None


class _BytesLRU:
    """A byte-bounded LRU for immutable values (keyed by digest)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    def get(self, key: str) -> bytes | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes // 8 or key in self._items:
            return
        self._items[key] = value
        self._bytes += len(value)
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= len(old)


def _paginate(items: list[str], n: int | None, last: str | None) -> Page:
    """items sorted; those after `last`, at most n (n=0: an empty page)."""
    if last:
        items = [i for i in items if i > last]
    if n is None:
        return Page(items, False)
    n = max(n, 0)
    return Page(items[:n], n > 0 and len(items) > n)


async def _hash_update(hasher: Any, data: bytes) -> None:
    if len(data) <= _HASH_ON_LOOP_LIMIT:
        hasher.update(data)
    else:
        await asyncio.to_thread(hasher.update, data)


def _digest_of(alg: str, data: bytes) -> str:
    return f"{alg}:{hashlib.new(alg, data).hexdigest()}"


def _hash_file(path: str, alg: str) -> tuple[str, int]:
    h = hashlib.new(alg)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
            size += len(chunk)
    return f"{alg}:{h.hexdigest()}", size


class ContentStore:
    def __init__(self, driver: StorageDriver, limits: StoreLimits | None = None):
        self.driver = driver
        self.limits = limits or StoreLimits()
        self._hashers: OrderedDict[tuple[str, str], _RunningHash] = OrderedDict()
        self._manifest_bytes = _BytesLRU(self.limits.manifest_cache_bytes)
        # (repo, digest) -> media type of a revision seen in this process.
        # Used only behind a tag just read from storage: tags are deleted
        # before the revision they name, so a live tag vouches for it.
        self._media_types: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._catalogued: set[str] = set()

    # ---- names ---------------------------------------------------------
    @staticmethod
    def validate_name(repo: str) -> None:
        """NameInvalid unless repo matches the spec's grammar
        `[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*(\\/[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*)*`
        and is at most 255 characters."""
        names.validate_name(repo)

    @staticmethod
    def validate_tag(tag: str) -> None:
        """TagInvalid unless tag matches `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`."""
        names.validate_tag(tag)

    @staticmethod
    def parse_digest(digest: str) -> tuple[str, str]:
        """(algorithm, hex) or DigestInvalid (unknown algorithm, bad hex/length)."""
        return names.parse_digest(digest)

    def _parse_digest(self, digest: str) -> tuple[str, str]:
        return names.parse_digest(digest, self.limits.digest_algorithms)

    # ---- small helpers over the driver ----------------------------------
    async def _exists(self, path: str) -> bool:
        try:
            await self.driver.stat(path)
            return True
        except PathNotFound:
            return False

    async def _delete_if_present(self, path: str) -> bool:
        try:
            await self.driver.delete(path)
            return True
        except PathNotFound:
            return False

    async def _register_repo(self, repo: str) -> None:
        """Write the catalog entry the first time repo gets content."""
        if repo in self._catalogued:
            return
        entry = layout.catalog_entry(repo)
        if not await self._exists(entry):
            await self.driver.put_content(entry, b"")
        self._catalogued.add(repo)

    async def _repo_exists(self, repo: str) -> bool:
        return await self._exists(layout.repo_dir(repo))

    # ---- blobs ---------------------------------------------------------
    async def blob_exists(self, digest: str) -> bool:
        """True when the blob's bytes are in the global store (any repo)."""
        self._parse_digest(digest)
        return await self._exists(layout.blob_data(digest))

    async def stat_blob(self, repo: str, digest: str) -> BlobInfo:
        """BlobUnknown unless the blob exists AND is linked into repo (as a
        layer/config, or as a manifest revision: some clients fetch a
        manifest through the blobs endpoint)."""
        names.validate_name(repo)
        self._parse_digest(digest)
        # Both links and the bytes in one storage round trip (HEAD is on
        # every push's path for every blob, GET on every pull's).
        layer, revision, data = await self.driver.stat_many([
            layout.layer_link(repo, digest), layout.manifest_revision_link(repo, digest),
            layout.blob_data(digest)])
        if (layer or revision) and data is not None:
            return BlobInfo(digest, data.size)
        raise BlobUnknown(f"blob unknown to repository {repo}: {digest}", {"digest": digest})

    async def read_blob(self, digest: str, offset: int = 0,
                        length: int | None = None) -> AsyncIterator[bytes]:
        """Stream a blob's bytes from the global store. BlobUnknown if absent;
        the driver's InvalidOffset for an offset past the end (callers check
        ranges against stat_blob first)."""
        self._parse_digest(digest)
        try:
            async for chunk in self.driver.reader(layout.blob_data(digest), offset, length):
                yield chunk
        except PathNotFound as exc:
            raise BlobUnknown(f"blob unknown: {digest}", {"digest": digest}) from exc

    def blob_local_path(self, digest: str) -> str | None:
        """Filesystem path the registry sends blob bodies from, None on object stores."""
        self._parse_digest(digest)
        return self.driver.local_path(layout.blob_data(digest))

    async def blob_url(self, digest: str) -> str | None:
        """A direct download URL (S3 presigned) or None."""
        self._parse_digest(digest)
        return await self.driver.url_for(layout.blob_data(digest))

    async def delete_blob(self, repo: str, digest: str) -> None:
        """Unlink the blob from repo (BlobUnknown if not linked). The global
        bytes are left for garbage collection."""
        names.validate_name(repo)
        self._parse_digest(digest)
        if not await self._delete_if_present(layout.layer_link_dir(repo, digest)):
            raise BlobUnknown(f"blob unknown to repository {repo}: {digest}", {"digest": digest})

    async def mount_blob(self, repo: str, digest: str, from_repo: str | None,
                         readable: Callable[[str], bool] | None = None) -> BlobInfo | None:
        """Link a blob into repo from a repository that has it. With
        from_repo, only if it is linked there; without, only if it is linked
        in some repository `readable` accepts (None: every one). A blob held
        only where the caller may not read, or by no repository at all (its
        links deleted), is None like an unknown one: the registry then starts
        an ordinary upload, and the answer says nothing about other
        repositories."""
        names.validate_name(repo)
        self._parse_digest(digest)
        if from_repo is not None:
            names.validate_name(from_repo)
            if readable is not None and not readable(from_repo):
                return None
            try:
                info = await self.stat_blob(from_repo, digest)
            except BlobUnknown:
                return None
        else:
            info = await self._find_linked_blob(digest, readable)
            if info is None:
                return None
        await self._link_blob(repo, digest)
        return info

    async def _find_linked_blob(self, digest: str,
                                readable: Callable[[str], bool] | None) -> BlobInfo | None:
        """The blob's size when some readable repository links it."""
        data = (await self.driver.stat_many([layout.blob_data(digest)]))[0]
        if data is None:
            return None
        last, searched = None, 0
        while searched < _MOUNT_SEARCH_LIMIT:
            page = await self.list_repositories(1000, last)
            candidates = [r for r in page.items if readable is None or readable(r)]
            searched += len(page.items)
            found = await self.driver.stat_many(
                [path for r in candidates for path in (layout.layer_link(r, digest),
                                                       layout.manifest_revision_link(r, digest))])
            if any(found):
                return BlobInfo(digest, data.size)
            if not page.has_more or not page.items:
                return None
            last = page.items[-1]
        return None

    async def _link_blob(self, repo: str, digest: str) -> None:
        await self.driver.put_content(layout.layer_link(repo, digest), digest.encode())
        await self._register_repo(repo)

    async def _commit_blob(self, src: str, digest: str) -> None:
        """Move verified bytes into the global store by rename, replacing
        whatever is there. A copy already in place is never trusted as is:
        had it been altered (written through a session before this fix, or
        by hand), linking a new push to it would serve other bytes under the
        digest, while the file just hashed is known good. Two processes
        committing one digest at once each rename identical bytes: harmless."""
        try:
            await self.driver.move(src, layout.blob_data(digest))
        except PathNotFound as exc:
            raise BlobUploadUnknown("upload finished or cancelled meanwhile") from exc

    # ---- uploads -------------------------------------------------------
    async def start_upload(self, repo: str) -> UploadStatus:
        """A new upload session, kept in storage (any worker may continue it)."""
        names.validate_name(repo)
        upload_id = str(uuid.uuid4())
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        # Session state is scratch: a session lost to a power failure is just
        # unknown to the client, which starts over.
        await asyncio.gather(
            self.driver.put_content(layout.upload_started_at(repo, upload_id), started.encode(),
                                    durable=False),
            self.driver.put_content(layout.upload_data(repo, upload_id), b"", durable=False))
        self._hashers[(repo, upload_id)] = _RunningHash(hashlib.sha256(), 0)
        self._trim_hashers()
        return UploadStatus(repo, upload_id, 0)

    async def upload_status(self, repo: str, upload_id: str) -> UploadStatus:
        """BlobUploadUnknown for an unknown, finished or cancelled session."""
        return UploadStatus(repo, upload_id, await self._upload_size(repo, upload_id))

    async def upload_started_at(self, repo: str, upload_id: str) -> float:
        """When the session started (seconds since the epoch)."""
        try:
            raw = await self.driver.get_content(layout.upload_started_at(repo, upload_id))
        except PathNotFound as exc:
            raise BlobUploadUnknown(f"upload unknown: {upload_id}", {"uuid": upload_id}) from exc
        return float(calendar.timegm(time.strptime(raw.decode().strip(), "%Y-%m-%dT%H:%M:%SZ")))

    async def _upload_size(self, repo: str, upload_id: str) -> int:
        names.validate_name(repo)
        try:
            return (await self.driver.stat(layout.upload_data(repo, upload_id))).size
        except PathNotFound as exc:
            raise BlobUploadUnknown(f"upload unknown: {upload_id}", {"uuid": upload_id}) from exc

    def _trim_hashers(self) -> None:
        while len(self._hashers) > _MAX_HASHERS:
            self._hashers.popitem(last=False)

    def _take_hasher(self, key: tuple[str, str], offset: int) -> _RunningHash | None:
        """The running hash for an upload if it covers exactly the stored
        bytes; otherwise forget it (another process appended, or a write
        failed half way) and let finish re-hash from storage."""
        running = self._hashers.pop(key, None)
        if running is not None and running.offset == offset:
            return running
        return None

    @contextlib.asynccontextmanager
    async def _session_locked(self, repo: str, upload_id: str) -> AsyncIterator[None]:
        """Hold the session's lock: one request at a time changes a session,
        whichever process or host it reached. A request that finds the
        session busy waits a moment (a client's retry may overlap the end of
        its first try) and then loses: BlobUploadInvalid. A session that is
        gone, or goes while we wait, is BlobUploadUnknown."""
        names.validate_name(repo)
        path = layout.upload_lock(repo, upload_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _SESSION_LOCK_WAIT
        pause = 0.005
        while True:
            try:
                lock = await self.driver.try_lock(path)
            except PathNotFound as exc:
                raise BlobUploadUnknown(f"upload unknown: {upload_id}", {"uuid": upload_id}) from exc
            if lock is not None:
                break
            if loop.time() >= deadline:
                raise BlobUploadInvalid("another request is changing this upload session",
                                        {"uuid": upload_id})
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)
        try:
            yield
        finally:
            await lock.release()

    async def append_upload(self, repo: str, upload_id: str,
                            chunks: AsyncIterator[bytes],
                            start: int | None = None) -> UploadStatus:
        """Append a chunk. With start (from Content-Range), RangeInvalid
        unless start == current offset. Nothing of a chunk that fails half
        way is lost or duplicated for the next try: the offset reported after
        an error is one a client can resume from. Holds the session's lock
        for the whole body (BlobUploadInvalid when another request has it)."""
        async with self._session_locked(repo, upload_id):
            return await self._append(repo, upload_id, chunks, start)

    async def _append(self, repo: str, upload_id: str, chunks: AsyncIterator[bytes],
                      start: int | None) -> UploadStatus:
        """append_upload for a caller that holds the session's lock."""
        size = await self._upload_size(repo, upload_id)
        if start is not None and start != size:
            raise RangeInvalid(f"chunk starts at {start}, upload is at {size}", size)
        key = (repo, upload_id)
        path = layout.upload_data(repo, upload_id)
        writer = await self.driver.writer(path, append=True)
        running = self._take_hasher(key, writer.size)
        if running is None and writer.size == 0:
            # Started by another worker, nothing written yet: hash from here.
            running = _RunningHash(hashlib.sha256(), 0)
        done = False
        try:
            batch = bytearray()
            async for chunk in chunks:
                batch += chunk
                if len(batch) >= _WRITE_BATCH:
                    await self._write_batch(writer, running, bytes(batch))
                    batch.clear()
            if batch:
                await self._write_batch(writer, running, bytes(batch))
            if running is not None and writer.size >= _DIGEST_RECORD_MIN:
                # Another worker may finish this upload: leave it the digest.
                record = f"{writer.size} sha256:{running.hasher.copy().hexdigest()}".encode()
                await asyncio.gather(writer.commit(), self.driver.put_content(
                    layout.upload_digest_record(repo, upload_id), record, durable=False))
            else:
                await writer.commit()
            done = True
        finally:
            if not done:
                # What reached the file stays (the status reports it); the
                # running hash may not match it any more, so it is dropped.
                try:
                    await writer.close()
                except Exception:
                    pass
        if running is not None:
            running.offset = writer.size
            self._hashers[key] = running
            self._trim_hashers()
        return UploadStatus(repo, upload_id, writer.size)

    @staticmethod
    async def _write_batch(writer, running: _RunningHash | None, data: bytes) -> None:
        if running is None:
            await writer.write(data)
        else:
            # Both release the GIL: write and hash in parallel threads.
            await asyncio.gather(writer.write(data), _hash_update(running.hasher, data))

    async def _digest_of_upload(self, repo: str, upload_id: str, alg: str,
                                size: int) -> str:
        running = self._take_hasher((repo, upload_id), size)
        if running is not None and alg == "sha256":
            return f"sha256:{running.hasher.hexdigest()}"
        if alg == "sha256" and size >= _DIGEST_RECORD_MIN:
            recorded = await self._recorded_digest(repo, upload_id, size)
            if recorded is not None:
                return recorded
        path = layout.upload_data(repo, upload_id)
        local = self.driver.local_path(path)
        if local is not None:
            try:
                digest, _ = await asyncio.to_thread(_hash_file, local, alg)
                return digest
            except FileNotFoundError as exc:
                raise BlobUploadUnknown(f"upload unknown: {upload_id}", {"uuid": upload_id}) from exc
        hasher = hashlib.new(alg)
        try:
            async for chunk in self.driver.reader(path, chunk_size=4 << 20):
                await _hash_update(hasher, chunk)
        except PathNotFound as exc:
            raise BlobUploadUnknown(f"upload unknown: {upload_id}", {"uuid": upload_id}) from exc
        return f"{alg}:{hasher.hexdigest()}"

    async def _recorded_digest(self, repo: str, upload_id: str, size: int) -> str | None:
        """The digest another process recorded for exactly `size` bytes of
        this upload, if any. The record is written once its bytes are, and
        an upload only grows, so a record for the current size is current."""
        try:
            raw = await self.driver.get_content(layout.upload_digest_record(repo, upload_id))
            recorded_size, digest = raw.decode().split()
            if int(recorded_size) == size:
                self._parse_digest(digest)
                return digest
        except (PathNotFound, ValueError, UnicodeDecodeError, DigestInvalid):
            pass
        return None

    async def finish_upload(self, repo: str, upload_id: str, digest: str,
                            chunks: AsyncIterator[bytes] | None = None,
                            start: int | None = None, *,
                            size: int | None = None) -> BlobInfo:
        """Append the final chunk (optional), verify the digest (DigestInvalid
        and nothing committed on mismatch, the session stays open), move the
        bytes into the global blob store, link into repo, and delete the
        session, all under the session's lock, so the bytes committed are
        exactly the bytes hashed and no other request can still write them.
        With size, SizeInvalid unless the upload holds exactly that many bytes."""
        self._parse_digest(digest)
        async with self._session_locked(repo, upload_id):
            return await self._finish(repo, upload_id, digest, chunks, start, size)

    async def _finish(self, repo: str, upload_id: str, digest: str,
                      chunks: AsyncIterator[bytes] | None, start: int | None,
                      size: int | None) -> BlobInfo:
        """finish_upload for a caller that holds the session's lock (or owns
        a session nobody else knows of)."""
        alg, _ = self._parse_digest(digest)
        if chunks is not None:
            total = (await self._append(repo, upload_id, chunks, start)).offset
        else:
            total = await self._upload_size(repo, upload_id)
            if start is not None and start != total:
                raise RangeInvalid(f"chunk starts at {start}, upload is at {total}", total)
        if size is not None and size != total:
            raise SizeInvalid(f"upload holds {total} bytes, expected {size}",
                              {"expected": size, "actual": total})
        actual = await self._digest_of_upload(repo, upload_id, alg, total)
        if actual != digest:
            raise DigestInvalid("provided digest did not match uploaded content",
                                {"expected": digest, "actual": actual})
        await self._commit_blob(layout.upload_data(repo, upload_id), digest)
        # The bytes are in place: link them and drop the session together.
        await asyncio.gather(self._link_blob(repo, digest),
                             self._delete_if_present(layout.upload_dir(repo, upload_id)))
        self._hashers.pop((repo, upload_id), None)
        return BlobInfo(digest, total)

    async def cancel_upload(self, repo: str, upload_id: str) -> None:
        async with self._session_locked(repo, upload_id):
            self._hashers.pop((repo, upload_id), None)
            if not await self._delete_if_present(layout.upload_dir(repo, upload_id)):
                raise BlobUploadUnknown(f"upload unknown: {upload_id}", {"uuid": upload_id})

    async def put_blob(self, repo: str, digest: str,
                       chunks: AsyncIterator[bytes], *,
                       size: int | None = None) -> BlobInfo:
        """Monolithic upload in one call (POST ?digest= with a body). Staged
        like any upload, and the session removed whatever happens. Its id is
        never handed out, so no other request can touch it: no lock needed."""
        self._parse_digest(digest)
        status = await self.start_upload(repo)
        try:
            return await self._finish(repo, status.upload_id, digest, chunks, None, size)
        except BaseException:
            self._hashers.pop((repo, status.upload_id), None)
            await self._delete_if_present(layout.upload_dir(repo, status.upload_id))
            raise

    async def purge_uploads(self, repo: str, older_than: float) -> list[str]:
        """Delete sessions of repo started before `older_than` (epoch
        seconds); the ids removed. For garbage collection."""
        try:
            entries = await self.driver.list(layout.uploads_dir(repo))
        except PathNotFound:
            return []
        purged = []
        for entry in entries:
            upload_id = entry.rsplit("/", 1)[-1]
            try:
                started = await self.upload_started_at(repo, upload_id)
            except (BlobUploadUnknown, ValueError):
                started = 0.0  # no or unreadable start time: a crashed start
            if started >= older_than:
                continue
            try:
                lock = await self.driver.try_lock(layout.upload_lock(repo, upload_id))
            except PathNotFound:
                continue                # finished or cancelled meanwhile
            if lock is None:
                continue                # a request is writing it right now: not abandoned
            async with lock:
                if await self._delete_if_present(entry):
                    purged.append(upload_id)
        return purged

    # ---- manifests and tags --------------------------------------------
    def _parse_manifest(self, body: bytes, content_type: str) -> _ParsedManifest:
        try:
            doc = json.loads(body)
        except RecursionError:
            raise ManifestInvalid(f"manifest nests deeper than {MAX_MANIFEST_DEPTH} levels") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ManifestInvalid(f"manifest is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise ManifestInvalid("manifest must be a JSON object")
        if _depth_exceeds(doc, MAX_MANIFEST_DEPTH):
            raise ManifestInvalid(f"manifest nests deeper than {MAX_MANIFEST_DEPTH} levels")
        media_type = _manifest_media_type(content_type, doc)
        kind = media_type.lower()
        if doc.get("schemaVersion") != 2 or isinstance(doc.get("schemaVersion"), bool):
            raise ManifestInvalid("schemaVersion must be 2")
        blobs: list[str] = []
        children: list[str] = []
        if kind in IMAGE_MANIFEST_TYPES:
            config = _descriptor(doc.get("config"), "config")
            layers = doc.get("layers")
            if not isinstance(layers, list):
                raise ManifestInvalid("layers must be a list")
            blobs.append(config["digest"])
            for i, item in enumerate(layers):
                layer = _descriptor(item, f"layers[{i}]")
                if not layer.get("urls"):  # foreign layers live elsewhere
                    blobs.append(layer["digest"])
        else:
            manifests = doc.get("manifests")
            if not isinstance(manifests, list):
                raise ManifestInvalid("manifests must be a list")
            for i, item in enumerate(manifests):
                children.append(_descriptor(item, f"manifests[{i}]")["digest"])
        subject = None
        if "subject" in doc:
            subject = _descriptor(doc["subject"], "subject")["digest"]
        artifact_type = doc.get("artifactType")
        if artifact_type is not None and not isinstance(artifact_type, str):
            raise ManifestInvalid("artifactType must be a string")
        if not artifact_type and kind in IMAGE_MANIFEST_TYPES:
            artifact_type = doc["config"]["mediaType"]
        annotations = doc.get("annotations")
        if annotations is not None and not (
                isinstance(annotations, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in annotations.items())):
            raise ManifestInvalid("annotations must map strings to strings")
        return _ParsedManifest(media_type, blobs, children, subject,
                               artifact_type or None, annotations or None)

    async def _check_references(self, repo: str, parsed: _ParsedManifest) -> None:
        """ManifestBlobUnknown unless every blob is linked in repo and every
        child is a manifest there. Only once everything else is present is
        a missing OCI empty blob provided, so a rejected push links nothing."""
        blobs = list(dict.fromkeys(parsed.blobs))
        children = list(dict.fromkeys(parsed.children))
        # Every link of a 100-layer image in one storage round trip.
        found = await self.driver.stat_many(
            [layout.layer_link(repo, d) for d in blobs]
            + [layout.manifest_revision_link(repo, d) for d in blobs + children])
        layer_links, blob_revisions = found[:len(blobs)], found[len(blobs):2 * len(blobs)]
        child_revisions = found[2 * len(blobs):]
        missing = [d for d, a, b in zip(blobs, layer_links, blob_revisions) if a is None and b is None]
        missing += [d for d, r in zip(children, child_revisions) if r is None]
        needs_empty = EMPTY_DIGEST in missing and EMPTY_DIGEST not in parsed.children
        if needs_empty:
            missing.remove(EMPTY_DIGEST)
        if missing and not self.limits.allow_sparse_manifests:
            raise ManifestBlobUnknown(f"manifest references unknown content: {missing[0]}",
                                      {"digest": missing[0]})
        if needs_empty:
            await self._provide_empty_blob(repo)

    async def _provide_empty_blob(self, repo: str) -> None:
        if not await self._exists(layout.blob_data(EMPTY_DIGEST)):
            await self.driver.put_content(layout.blob_data(EMPTY_DIGEST), EMPTY_BLOB)
        await self._link_blob(repo, EMPTY_DIGEST)

    async def put_manifest(self, repo: str, reference: str, body: bytes,
                           media_type: str,
                           extra_tags: list[str] = ()) -> PutManifestResult:
        """Validate (JSON, media type, size limit, every referenced blob or
        child manifest present in repo -> ManifestInvalid /
        ManifestBlobUnknown), store the bytes as a blob, link the revision,
        point the tag (reference if it is a tag, plus extra_tags), and index
        the `subject` for referrers. reference may be a digest, which must
        match the body (DigestInvalid). ManifestTooLarge (a SizeInvalid)
        over limits.max_manifest_bytes."""
        names.validate_name(repo)
        tags: list[str] = []
        if names.is_digest(reference):
            alg, _ = self._parse_digest(reference)
        else:
            names.validate_tag(reference)
            alg = "sha256"
            tags.append(reference)
        for tag in extra_tags:
            names.validate_tag(tag)
            if tag not in tags:
                tags.append(tag)
        body = bytes(body)
        if len(body) > self.limits.max_manifest_bytes:
            raise ManifestTooLarge(f"manifest is {len(body)} bytes, limit is "
                                   f"{self.limits.max_manifest_bytes}",
                                   {"size": len(body), "limit": self.limits.max_manifest_bytes})
        if len(body) > _HASH_ON_LOOP_LIMIT:
            digest = await asyncio.to_thread(_digest_of, alg, body)
        else:
            digest = _digest_of(alg, body)
        if names.is_digest(reference) and reference != digest:
            raise DigestInvalid("manifest digest does not match the reference",
                                {"expected": reference, "actual": digest})
        if len(body) > _HASH_ON_LOOP_LIMIT:     # a 4 MiB parse would stall every other request
            parsed = await asyncio.to_thread(self._parse_manifest, body, media_type)
        else:
            parsed = self._parse_manifest(body, media_type)
        await self._check_references(repo, parsed)

        if not await self._exists(layout.blob_data(digest)):
            await self.driver.put_content(layout.blob_data(digest), body)
        await self._link_revision(repo, digest, len(body), parsed)
        for tag in tags:
            await self.driver.put_content(layout.tag_current_link(repo, tag), digest.encode())
        # A delete by digest may have removed the revision after we linked it
        # and scanned the tags before ours landed: then link it again, so no
        # tag is left naming nothing. (The delete re-scans the tags after
        # removing the revision, so either it sees our tag or we see its
        # removal: one of the two always repairs.)
        for _ in range(_RELINK_TRIES):
            if not tags or await self._exists(layout.manifest_revision_link(repo, digest)):
                break
            await self._link_revision(repo, digest, len(body), parsed)
        await self._register_repo(repo)
        self._manifest_bytes.put(digest, body)
        self._remember_media_type((repo, digest), parsed.media_type)
        return PutManifestResult(digest, parsed.subject)

    async def _link_revision(self, repo: str, digest: str, size: int,
                             parsed: _ParsedManifest) -> None:
        descriptor = {"mediaType": parsed.media_type, "digest": digest, "size": size}
        await self.driver.put_content(layout.manifest_revision_link(repo, digest),
                                      json.dumps(descriptor).encode())
        if parsed.subject is not None:
            referrer = dict(descriptor)
            if parsed.artifact_type:
                referrer["artifactType"] = parsed.artifact_type
            if parsed.annotations:
                referrer["annotations"] = parsed.annotations
            await self.driver.put_content(layout.referrer_entry(repo, parsed.subject, digest),
                                          json.dumps(referrer).encode())

    async def _resolve(self, repo: str, reference: str) -> str:
        """The manifest digest a tag or digest reference names in repo."""
        names.validate_name(repo)
        if names.is_digest(reference):
            self._parse_digest(reference)
            return reference
        names.validate_tag(reference)
        try:
            return (await self.driver.get_content(layout.tag_current_link(repo, reference))).decode().strip()
        except PathNotFound:
            raise await self._manifest_unknown(repo, reference) from None

    async def _manifest_unknown(self, repo: str, reference: str) -> Exception:
        if not await self._repo_exists(repo):
            return NameUnknown(f"repository name not known to registry: {repo}", {"name": repo})
        return ManifestUnknown(f"manifest unknown: {repo}:{reference}"
                               if not names.is_digest(reference)
                               else f"manifest unknown: {repo}@{reference}",
                               {"reference": reference})

    async def get_manifest(self, repo: str, reference: str) -> Manifest:
        """By tag or digest; ManifestUnknown (NameUnknown for an unknown
        repository). Manifest GET is hot: a tag costs one small read (the
        tag link) when this process has seen the revision, a digest one read
        (the revision link); the bytes come from a cache keyed by digest."""
        digest = await self._resolve(repo, reference)
        key = (repo, digest)
        media_type = None if names.is_digest(reference) else self._media_types.get(key)
        if media_type is None:
            try:
                link = json.loads(await self.driver.get_content(layout.manifest_revision_link(repo, digest)))
            except PathNotFound:
                self._media_types.pop(key, None)
                raise await self._manifest_unknown(repo, reference) from None
            media_type = link["mediaType"]
            self._remember_media_type(key, media_type)
        body = self._manifest_bytes.get(digest)
        if body is None:
            try:
                body = await self.driver.get_content(layout.blob_data(digest))
            except PathNotFound:
                raise await self._manifest_unknown(repo, reference) from None
            self._manifest_bytes.put(digest, body)
        return Manifest(digest, media_type, body)

    def _remember_media_type(self, key: tuple[str, str], media_type: str) -> None:
        self._media_types[key] = media_type
        self._media_types.move_to_end(key)
        while len(self._media_types) > _MAX_MEDIA_TYPES:
            self._media_types.popitem(last=False)

    async def delete_manifest(self, repo: str, reference: str) -> None:
        """By digest: unlink the revision, drop tags pointing at it and its
        referrers entry. By tag: delete only the tag."""
        names.validate_name(repo)
        if not names.is_digest(reference):
            names.validate_tag(reference)
            if not await self._delete_if_present(layout.tag_dir(repo, reference)):
                raise await self._manifest_unknown(repo, reference)
            return
        manifest = await self.get_manifest(repo, reference)
        digest = manifest.digest
        self._media_types.pop((repo, digest), None)
        # Tags first: a crash half way never leaves a tag naming nothing.
        await self._untag(repo, digest)
        subject = _subject_of(manifest.body)
        if subject is not None:
            await self._delete_if_present(layout.referrer_entry(repo, subject, digest))
        if not await self._delete_if_present(layout.manifest_revision_dir(repo, digest)):
            raise await self._manifest_unknown(repo, reference)
        # A push tagging this digest may have landed its tag after the first
        # scan: put_manifest re-checks the revision after tagging, and this
        # second scan catches a tag that landed before that check.
        await self._untag(repo, digest)

    async def _untag(self, repo: str, digest: str) -> None:
        """Delete every tag of repo that names digest."""
        try:
            tag_dirs = await self.driver.list(layout.tags_dir(repo))
        except PathNotFound:
            return
        links = await self.driver.get_many(
            [layout.tag_current_link(repo, path.rsplit("/", 1)[-1]) for path in tag_dirs])
        for path, current in zip(tag_dirs, links):
            if current is not None and current.decode(errors="replace").strip() == digest:
                await self._delete_if_present(layout.tag_dir(repo, path.rsplit("/", 1)[-1]))

    async def list_tags(self, repo: str, n: int | None = None,
                        last: str | None = None) -> Page:
        """Lexically sorted; NameUnknown for a repository that does not exist."""
        names.validate_name(repo)
        try:
            entries = await self.driver.list(layout.tags_dir(repo))
        except PathNotFound:
            if not await self._repo_exists(repo):
                raise NameUnknown(f"repository name not known to registry: {repo}",
                                  {"name": repo}) from None
            entries = []
        return _paginate(sorted(e.rsplit("/", 1)[-1] for e in entries), n, last)

    async def list_repositories(self, n: int | None = None,
                                last: str | None = None) -> Page:
        """The catalog, lexically sorted, without walking blob data."""
        try:
            entries = await self.driver.list(layout.CATALOG)
        except PathNotFound:
            entries = []
        return _paginate(sorted(layout.repo_from_catalog_entry(e) for e in entries), n, last)

    async def referrers(self, repo: str, digest: str, artifact_type: str | None = None,
                        n: int | None = None, last: str | None = None) -> list[dict]:
        """Descriptors (mediaType, digest, size, artifactType, annotations)
        of manifests whose subject is digest, in digest order: those after
        the referrer digest `last`, at most n. Entries are read in batches
        (one storage round trip each) and decoded off the event loop."""
        names.validate_name(repo)
        self._parse_digest(digest)
        try:
            entries = await self.driver.list(layout.referrers_dir(repo, digest))
        except PathNotFound:
            return []
        if last:
            after = layout.referrer_entry(repo, digest, last)   # DigestInvalid for a bad cursor
            entries = [e for e in entries if e > after]
        found: list[dict] = []
        for at in range(0, len(entries), _REFERRERS_BATCH):
            raw = await self.driver.get_many(entries[at:at + _REFERRERS_BATCH])
            batch = await asyncio.to_thread(_decode_referrers, raw, artifact_type)
            found += batch
            if n is not None and len(found) >= n:
                return found[:n]
        return found

def _manifest_media_type(content_type: str, doc: dict) -> str:
    """The media type a manifest is stored (and served) with: the pushed
    Content-Type (parameters dropped), or, when that says nothing, the
    body's mediaType, or its shape."""
    pushed = (content_type or "").split(";", 1)[0].strip()
    body_type = doc.get("mediaType")
    if body_type is not None and not isinstance(body_type, str):
        raise ManifestInvalid("mediaType must be a string")
    if pushed.lower() in _GENERIC_CONTENT_TYPES:
        if body_type:
            chosen = body_type
        elif "manifests" in doc:
            chosen = OCI_INDEX
        elif "config" in doc:
            chosen = OCI_MANIFEST
        else:
            raise ManifestInvalid("cannot tell the manifest's media type")
    else:
        chosen = pushed
        if body_type and body_type.lower() != pushed.lower():
            raise ManifestInvalid(f"mediaType {body_type!r} does not match Content-Type {pushed!r}")
    if chosen.lower() in DOCKER_SCHEMA1:
        raise ManifestInvalid("Docker schema 1 manifests are not supported")
    if chosen.lower() not in MANIFEST_TYPES:
        raise ManifestInvalid(f"unsupported manifest media type: {chosen!r}")
    return chosen if pushed.lower() not in _GENERIC_CONTENT_TYPES else chosen.lower()


def _depth_exceeds(doc: Any, limit: int) -> bool:
    """True when objects and arrays nest more than limit levels (iterative:
    the check itself must not recurse)."""
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _descriptor(value: Any, where: str) -> dict:
    """A descriptor checked for shape: mediaType, digest and size."""
    if not isinstance(value, dict):
        raise ManifestInvalid(f"{where} must be a descriptor object")
    media_type = value.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestInvalid(f"{where}.mediaType must be a non-empty string")
    size = value.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_BLOB_SIZE:
        raise ManifestInvalid(f"{where}.size must be an integer from 0 to {MAX_BLOB_SIZE}")
    try:
        names.parse_digest(value.get("digest"))
    except DigestInvalid as exc:
        raise ManifestInvalid(f"{where}.digest: {exc.message}") from exc
    return value


def _decode_referrers(raw: list[bytes | None], artifact_type: str | None) -> list[dict]:
    out = []
    for data in raw:
        if data is None:
            continue            # deleted meanwhile
        try:
            descriptor = json.loads(data)
        except ValueError:
            continue            # a torn write from a foreign tool
        if isinstance(descriptor, dict) and (
                artifact_type is None or descriptor.get("artifactType") == artifact_type):
            out.append(descriptor)
    return out


def _subject_of(body: bytes) -> str | None:
    try:
        subject = json.loads(body).get("subject")
        digest = subject.get("digest") if isinstance(subject, dict) else None
        if digest:
            names.parse_digest(digest)
        return digest
    except (ValueError, AttributeError, DigestInvalid):
        return None
