"""Prometheus figures of the registry, and /metrics.

With `dockyard serve --workers N` every worker writes its figures to files
in one directory (prometheus-client's multiprocess mode), which /metrics of
any worker adds up. The supervisor names the directory in
PROMETHEUS_MULTIPROC_DIR before it forks (registry.ops.multiproc).

Metric names are listed in README.md (Monitoring). Label values are the
route's pattern ("/v2/{name}/blobs/{digest}"), never a repository name or
digest, so the number of series stays bounded.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from aiohttp import web
from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)

from registry.ops.multiproc import multiprocess_dir
from storage.driver import (FileInfo, FileWriter, LocalFile, PathNotFound, SizedStream, StorageDriver,
                            StorageLock)

# seconds; a manifest GET is ~1 ms, a big blob PUT many seconds
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0, 300.0)
_STORAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)

REQUEST_DURATION = Histogram(
    "dockyard_http_request_duration_seconds",
    "Requests by route, method and status, and their latency (to the end of the body).",
    ("route", "method", "status"), buckets=_LATENCY_BUCKETS)
REQUEST_BYTES = Counter("dockyard_http_request_bytes", "Request body bytes received.", ("route", "method"))
RESPONSE_BYTES = Counter("dockyard_http_response_bytes", "Response body bytes sent.", ("route", "method"))
IN_FLIGHT = Gauge("dockyard_http_requests_in_flight", "Requests being handled.",
                  multiprocess_mode="livesum")
UPLOADS_IN_PROGRESS = Gauge("dockyard_upload_requests_in_progress",
                            "Upload requests (POST, PATCH, PUT of a blob upload) moving bytes now.",
                            multiprocess_mode="livesum")
UPLOAD_DURATION = Histogram("dockyard_upload_request_duration_seconds",
                            "Duration of upload requests (POST, PATCH, PUT of a blob upload).",
                            ("method",), buckets=_LATENCY_BUCKETS)
STORAGE_DURATION = Histogram("dockyard_storage_operation_duration_seconds",
                             "Storage driver operations and their latency.", ("driver", "operation"),
                             buckets=_STORAGE_BUCKETS)
STORAGE_ERRORS = Counter("dockyard_storage_operation_errors",
                         "Storage driver operations that raised (not-found answers excluded).",
                         ("driver", "operation"))
TOKENS_ISSUED = Counter("dockyard_auth_tokens_issued", "Tokens the built-in token service issued.")
AUTH_FAILURES = Counter("dockyard_auth_failures",
                        "Requests with credentials that were refused (401) or denied (403).",
                        ("status",))


def _exposition() -> bytes:
    if multiprocess_dir():
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def _metrics_handler(token_file: str):
    secret: list[bytes] = []

    async def metrics(request: web.Request) -> web.Response:
        if token_file:
            if not secret:
                secret.append(await asyncio.to_thread(_read_secret, token_file))
            offered = request.headers.get("Authorization", "")
            if not hmac.compare_digest(offered.encode(), b"Bearer " + secret[0]):
                return web.Response(status=401, text="401 unauthorized\n",
                                    headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
        # multiprocess mode reads every worker's files: not on the loop
        body = await asyncio.to_thread(_exposition)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return metrics


def _read_secret(path: str) -> bytes:
    return Path(path).read_bytes().strip()


def add_metrics_route(app: web.Application, token_file: str) -> None:
    app.router.add_get("/metrics", _metrics_handler(token_file))


# ---- storage operations ---------------------------------------------------------

class InstrumentedDriver(StorageDriver):
    """A driver that times every operation of the driver it wraps."""

    def __init__(self, inner: StorageDriver):
        self.inner = inner
        self.name = inner.name
        self.local_files = inner.local_files
        self._children: dict[str, tuple[Any, Any]] = {}

    def __getattr__(self, attr: str) -> Any:      # driver-specific extras
        return getattr(self.inner, attr)

    def _series(self, op: str) -> tuple[Any, Any]:
        series = self._children.get(op)
        if series is None:
            series = self._children[op] = (STORAGE_DURATION.labels(self.name, op),
                                           STORAGE_ERRORS.labels(self.name, op))
        return series

    async def _timed(self, op: str, call):
        duration, errors = self._series(op)
        start = time.perf_counter()
        try:
            return await call
        except PathNotFound:        # an answer, not a failure
            raise
        except Exception:
            errors.inc()
            raise
        finally:
            duration.observe(time.perf_counter() - start)

    # Every operation passes its arguments through as they came: the
    # contract grows keywords (try_lock's caller_checks_dir) and a wrapper
    # must not be the one place that refuses them.
    def check_path(self, path: str) -> None:
        self.inner.check_path(path)

    async def get_content(self, *args: Any, **kwargs: Any) -> bytes:
        return await self._timed("get_content", self.inner.get_content(*args, **kwargs))

    async def put_content(self, *args: Any, **kwargs: Any) -> None:
        return await self._timed("put_content", self.inner.put_content(*args, **kwargs))

    def reader(self, *args: Any, **kwargs: Any) -> AsyncIterator[bytes]:
        # a stream: its pace is the client's, not the storage's
        return self.inner.reader(*args, **kwargs)

    async def open_reader(self, *args: Any, **kwargs: Any) -> SizedStream:
        # the opening is timed (S3: the GET's answer); the stream is the client's pace
        return await self._timed("open_reader", self.inner.open_reader(*args, **kwargs))

    async def writer(self, *args: Any, **kwargs: Any) -> FileWriter:
        return await self._timed("writer", self.inner.writer(*args, **kwargs))

    async def atomic_writer(self, *args: Any, **kwargs: Any) -> FileWriter | None:
        return await self._timed("atomic_writer", self.inner.atomic_writer(*args, **kwargs))

    async def try_lock(self, *args: Any, **kwargs: Any) -> StorageLock | None:
        return await self._timed("try_lock", self.inner.try_lock(*args, **kwargs))

    async def get_many(self, *args: Any, **kwargs: Any) -> list[bytes | None]:
        return await self._timed("get_many", self.inner.get_many(*args, **kwargs))

    async def stat(self, *args: Any, **kwargs: Any) -> FileInfo:
        return await self._timed("stat", self.inner.stat(*args, **kwargs))

    async def stat_many(self, *args: Any, **kwargs: Any) -> list[FileInfo | None]:
        return await self._timed("stat_many", self.inner.stat_many(*args, **kwargs))

    async def stat_files(self, *args: Any, **kwargs: Any) -> list[FileInfo | None]:
        return await self._timed("stat_files", self.inner.stat_files(*args, **kwargs))

    async def list(self, *args: Any, **kwargs: Any) -> list[str]:
        return await self._timed("list", self.inner.list(*args, **kwargs))

    async def move(self, *args: Any, **kwargs: Any) -> None:
        return await self._timed("move", self.inner.move(*args, **kwargs))

    async def delete(self, *args: Any, **kwargs: Any) -> None:
        return await self._timed("delete", self.inner.delete(*args, **kwargs))

    async def url_for(self, *args: Any, **kwargs: Any) -> str | None:
        return await self._timed("url_for", self.inner.url_for(*args, **kwargs))

    async def open_local(self, *args: Any, **kwargs: Any) -> LocalFile | None:
        return await self._timed("open_local", self.inner.open_local(*args, **kwargs))

    async def reclaim_leftovers(self, *args: Any, **kwargs: Any) -> int:
        return await self._timed("reclaim_leftovers", self.inner.reclaim_leftovers(*args, **kwargs))

    async def close(self) -> None:
        await self.inner.close()
