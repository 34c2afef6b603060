"""Locks on S3: a lease kept in an object, taken and renewed with
conditional writes, so it holds across every process and host sharing the
bucket and is lost when its holder dies.

The lock named "<dir>/<name>" is the object "<dir>/.dockyard-tmp-lock.<name>"
(hidden: never listed, deleted with its directory). Its body names the
holder (a random token, host and pid) and its metadata the lease.

- take:     PUT If-None-Match: * (only if no lock object exists);
- held:     another holder's lock whose lease has not run out: refused at once (None);
- stale:    a lock not renewed for longer than its lease (its holder died)
            is taken over with PUT If-Match: <its ETag>, so of two takers
            one wins;
- renew:    while held, the holder rewrites it every `renew` seconds with
            If-Match: <its own last ETag>; a 412 or 404 means it was taken
            over or its directory deleted, and renewing stops (never
            re-creating a lock under someone else);
- release:  DELETE (after checking the owner token when the lease may have
            run out since the last renewal).

A lease is judged by the server's clock alone: the lock's Last-Modified
against the Date of the answer that read it, both whole seconds, so it is
stale once more than lease + 1 seconds old; clocks of the hosts do not
matter. Conditional PUTs (If-None-Match: * and If-Match) are what AWS S3
(since 2024), Ceph RGW and moto all support.

A lock never creates its directory: PathNotFound unless some object other
than a lock lives under the directory's prefix, checked right after the
PUT that took it (the directory may be gone, or go meanwhile: then the lock
object is removed again before PathNotFound is raised, so a directory that
is not there never stays visible). A lock still held in a directory being
deleted is refused (None) until the delete removes it, last.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time

from storage.driver import PathNotFound, StorageError, StorageLock
from storage.s3.client import META_LEASE, Conflict, S3Calls, quoted, server_time

log = logging.getLogger("dockyard.storage.s3")

DEFAULT_LEASE = 10.0


def _expired(head: dict, default_lease: float) -> bool:
    try:
        lease = float((head.get("Metadata") or {}).get(META_LEASE, default_lease))
    except ValueError:
        lease = default_lease
    modified = head.get("LastModified")
    if modified is None:
        return True
    now = server_time(head)
    if now is None:
        now = time.time()
    return now - modified.timestamp() > lease + 1.0


class S3Lock(StorageLock):
    def __init__(self, calls: S3Calls, path: str, key: str, token: str, etag: str, lease: float, renew: float,
                 held: set):
        self._calls, self._path, self._key, self._token = calls, path, key, token
        self._etag, self._lease, self._renew = etag, lease, renew
        self._held = held
        self._loop = asyncio.get_running_loop()
        self._renewed_at = self._loop.time()
        self.lost = False
        self._released = False
        self._gone = False
        held.add(self)
        self._task = asyncio.ensure_future(self._renew_loop())

    def _body(self) -> tuple[bytes, dict]:
        return _lock_body(self._token, self._lease)

    async def _renew_loop(self) -> None:
        body, metadata = self._body()
        while True:
            await asyncio.sleep(self._renew)
            try:
                response = await self._calls.call("put_object", self._path, Key=self._key, Body=body,
                                                  Metadata=metadata, IfMatch=self._etag,
                                                  **self._calls.encryption_args())
            except (Conflict, PathNotFound):
                self.lost = True
                log.warning("lock %s was lost (taken over or its directory deleted)", self._path)
                return
            except StorageError as exc:
                if self._loop.time() - self._renewed_at > self._lease:
                    self.lost = True
                    log.warning("lock %s lapsed: could not renew it for its whole lease: %s", self._path, exc)
                    return
                continue
            self._etag, self._renewed_at = quoted(response.get("ETag")), self._loop.time()

    @property
    def key(self) -> str:
        return self._key

    def deleted_with_directory(self) -> None:
        """Its holder deleted the lock's directory, lock object included:
        nothing is left to release (renewing stops too)."""
        self._gone = True
        self._task.cancel()

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._held.discard(self)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        if self.lost or self._gone:
            return
        if self._loop.time() - self._renewed_at > self._lease * 0.8:
            # The lease may have run out: delete only a lock that is still ours.
            try:
                response = await self._calls.call("get_object", self._path, Key=self._key)
                raw = await self._calls.run(response["Body"].read, op="get_object", path=self._path)
                if json.loads(raw).get("owner") != self._token:
                    return
            except PathNotFound:
                return
            except ValueError:
                return
        try:
            await self._calls.call("delete_object", self._path, Key=self._key)
        except PathNotFound:
            pass

    async def abandon(self) -> None:
        """Stop renewing without releasing: what a holder that died leaves."""
        self._released = True
        self._held.discard(self)
        self._task.cancel()


def _lock_body(token: str, lease: float) -> tuple[bytes, dict]:
    body = json.dumps({"owner": token, "host": socket.gethostname(), "pid": os.getpid(),
                       "lease": lease}).encode()
    return body, {META_LEASE: f"{lease:g}"}


async def try_lock(calls: S3Calls, path: str, *, lease: float, renew: float, held: set,
                   check_dir: bool = True) -> S3Lock | None:
    key = calls.lock_key(path)
    parent = path.rsplit("/", 1)[0] or "/"
    prefix = calls.dir_prefix(parent)
    check_dir = check_dir and parent != "/"
    token = secrets.token_hex(16)
    body, metadata = _lock_body(token, lease)
    extra = calls.encryption_args()
    etag = None
    for _ in range(3):
        try:
            response = await calls.call("put_object", path, Key=key, Body=body, Metadata=metadata,
                                        IfNoneMatch="*", **extra)
            etag = quoted(response.get("ETag"))
            break
        except Conflict:
            pass
        try:
            head = await calls.call("head_object", path, Key=key)
        except PathNotFound:
            continue                     # released meanwhile: try again
        if not _expired(head, lease):
            return None                  # held
        try:
            response = await calls.call("put_object", path, Key=key, Body=body, Metadata=metadata,
                                        IfMatch=quoted(head.get("ETag")), **extra)
        except (Conflict, PathNotFound):
            return None                  # another taker was first
        etag = quoted(response.get("ETag"))
        log.info("took over the lock %s from a holder that stopped renewing it", path)
        break
    if etag is None:
        return None
    if check_dir and not await calls.has_content(prefix, path):
        try:
            await calls.call("delete_object", path, Key=key)
        except StorageError:
            pass
        raise PathNotFound(path)
    return S3Lock(calls, path, key, token, etag, lease, renew, held)
