"""One S3 client per driver: the boto3 client, the thread pool its blocking
calls run in (as many threads as the client has connections), the mapping
from driver paths to keys, and the one place botocore errors become the
driver's typed errors (`raise ... from`), one line each, never with a
credential in it."""

from __future__ import annotations

import asyncio
import functools
import http.client
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Callable

import boto3
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, ConnectionClosedError, ConnectTimeoutError,
                                 EndpointConnectionError, NoCredentialsError, ReadTimeoutError)

from storage.config import S3Settings
from storage.driver import HIDDEN_PREFIX, InvalidPath, PathNotFound, StorageError

# Hidden names (the contract's HIDDEN_PREFIX: never listed, refused in a caller's path).
LOCK_PREFIX = HIDDEN_PREFIX + "lock."     # <dir>/.dockyard-tmp-lock.<name>: the lock named <dir>/<name>
DIR_MARKER = HIDDEN_PREFIX + "dir"        # <dir>/.dockyard-tmp-dir: keeps an emptied directory
PROBE = HIDDEN_PREFIX + "probe"           # <prefix>.dockyard-tmp-probe: the start-up check's write, deleted at once

# User metadata of a file whose bytes are still an open multipart upload
# (storage.s3.multipart); HEAD answers with it, so stat costs one request.
META_UPLOAD = "dockyard-upload"
META_SIZE = "dockyard-size"
META_HEADER = "dockyard-header"
META_LEASE = "dockyard-lease"

RETRY_ATTEMPTS = 5
STORAGE_CLASS_MIN = 128 << 10     # smaller objects keep the bucket's default class


class Conflict(StorageError):
    """A conditional write lost: the object changed (or appeared) meanwhile."""


class UploadGone(StorageError):
    """The multipart upload a file's state names no longer exists."""


@dataclass(frozen=True)
class ObjectInfo:
    size: int              # the file's size (a pending file's from its metadata)
    mtime: float
    etag: str
    upload_id: str | None  # set for a pending file (bytes still in a multipart upload)
    metadata: dict

    @property
    def pending(self) -> bool:
        return self.upload_id is not None


def object_info(response: dict) -> ObjectInfo:
    """From a HeadObject/GetObject answer."""
    metadata = {k.lower(): v for k, v in (response.get("Metadata") or {}).items()}
    upload_id = metadata.get(META_UPLOAD) or None
    size = int(metadata[META_SIZE]) if upload_id and META_SIZE in metadata else int(response.get("ContentLength", 0))
    modified = response.get("LastModified")
    return ObjectInfo(size=size, mtime=modified.timestamp() if modified else 0.0,
                      etag=quoted(response.get("ETag", "")), upload_id=upload_id, metadata=metadata)


def quoted(etag: str | None) -> str:
    """ETags as AWS spells them, in quotes (Ceph answers copies without)."""
    etag = (etag or "").strip()
    if not etag:
        return ""
    if etag.startswith("W/"):
        etag = etag[2:]
    return etag if etag.startswith('"') else f'"{etag.strip(chr(34))}"'


# Request parameters that carry an ETag to compare with the stored one.
ETAG_CONDITIONS = ("IfMatch", "IfNoneMatch", "CopySourceIfMatch", "CopySourceIfNoneMatch")


def bare(etag: str) -> str:
    """An ETag as a condition sends it: without quotes. Ceph RGW (16.2)
    compares a PUT's or CompleteMultipartUpload's If-Match with the stored
    ETag as it is, unquoted, so a quoted one never matches there (its GET
    and copy conditions unquote first); AWS S3 and moto strip the quotes
    before comparing (AWS's own CLI examples pass the bare value, and RFC
    7232's weak comparison S3 applies ignores them). The bare form is the
    one every one of them matches; answers are still compared `quoted`."""
    etag = etag.strip()
    if etag.startswith("W/"):
        etag = etag[2:]
    return etag.strip('"')


def bare_conditions(params: dict) -> dict:
    """params with every ETag condition in the form `bare` explains ("*" kept)."""
    if not any(k in params for k in ETAG_CONDITIONS):
        return params
    return {k: bare(v) if k in ETAG_CONDITIONS and v != "*" else v for k, v in params.items()}


def server_time(response: dict) -> float | None:
    """The server's clock (its Date header), for judging a lease by one clock."""
    date = (response.get("ResponseMetadata", {}).get("HTTPHeaders") or {}).get("date")
    if not date:
        return None
    try:
        return parsedate_to_datetime(date).astimezone(timezone.utc).timestamp()
    except (TypeError, ValueError):
        return None


def is_lock_key(key: str) -> bool:
    return key.rsplit("/", 1)[-1].startswith(LOCK_PREFIX)


def is_hidden_name(name: str) -> bool:
    return name.startswith(HIDDEN_PREFIX)


def shown_endpoint(url: str) -> str:
    """An endpoint URL fit for a message: no user:password@ part."""
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        parts = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
    return urllib.parse.urlunsplit(parts)


def one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def error_code(exc: ClientError) -> tuple[str, int | None]:
    error = exc.response.get("Error") or {}
    return str(error.get("Code") or ""), exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def translate(exc: BaseException, op: str, path: str, bucket: str) -> BaseException:
    """The driver's error for a botocore one (others are returned as they are)."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, ClientError):
        code, status = error_code(exc)
        if code in ("NoSuchKey", "404", "NotFound"):
            return PathNotFound(path)
        if code == "NoSuchUpload":
            return UploadGone(f"multipart upload of {path} is gone")
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
            return Conflict(f"{path} changed meanwhile ({code or status})")
        if code == "NoSuchBucket":
            return StorageError(f"S3 bucket {bucket!r} does not exist")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"):
            return StorageError(f"S3 refused {op} of {path}: {code} (check the credentials and the bucket policy)")
        message = one_line((exc.response.get("Error") or {}).get("Message") or "")
        return StorageError(f"S3 {op} of {path} failed: {code or status}" + (f": {message}" if message else ""))
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ReadTimeoutError)):
        return StorageError(f"S3 endpoint did not answer {op} of {path} ({type(exc).__name__})")
    if isinstance(exc, NoCredentialsError):
        return StorageError("no S3 credentials found (storage.s3.access_key_id or the AWS credential chain)")
    if isinstance(exc, BotoCoreError):
        return StorageError(f"S3 {op} of {path} failed: {type(exc).__name__}: {one_line(str(exc))}")
    if isinstance(exc, (OSError, http.client.HTTPException)) or type(exc).__module__.startswith("urllib3"):
        # a body read broken off (urllib3 ProtocolError, IncompleteRead, ...), a full disk
        return StorageError(f"S3 {op} of {path} broke off: {type(exc).__name__}")
    return exc


_SESSION_LOCK = threading.Lock()
_SESSION: boto3.session.Session | None = None


def _session() -> boto3.session.Session:
    """One boto3 session per process: its service models are loaded once,
    whatever number of drivers (tests open hundreds) make clients from it."""
    global _SESSION
    with _SESSION_LOCK:
        if _SESSION is None:
            _SESSION = boto3.session.Session()
        return _SESSION


def client_config(settings: S3Settings, *, attempts: int = RETRY_ATTEMPTS, connect_timeout: float = 10,
                  read_timeout: float = 60) -> Config:
    return Config(
        max_pool_connections=settings.max_connections,
        retries={"mode": "standard", "max_attempts": attempts},   # backoff on throttling, 5xx, resets
        s3={"addressing_style": settings.resolved_addressing_style},
        signature_version="s3v4",
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        tcp_keepalive=True,
        # Checksums only where S3 requires them: S3-compatible services
        # (Ceph RGW before Squid, MinIO of some ages) refuse the aws-chunked
        # trailing checksums newer botocore adds by default. SigV4 signs
        # the payload hash over plain HTTP; TLS covers it otherwise.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


def make_client(settings: S3Settings, config: Config):
    kwargs: dict[str, Any] = {"config": config}
    if settings.endpoint_url:
        kwargs["endpoint_url"] = settings.endpoint_url
    if settings.region:
        kwargs["region_name"] = settings.region
    elif settings.endpoint_url:
        kwargs["region_name"] = "us-east-1"       # what S3-compatible services sign with
    if settings.access_key_id:
        kwargs["aws_access_key_id"] = settings.access_key_id
        kwargs["aws_secret_access_key"] = settings.secret_access_key
    session = _session()
    with _SESSION_LOCK:             # a boto3 session is not thread-safe
        return session.client("s3", **kwargs)


class S3Calls:
    """The client and its pool, for the driver's modules. `call(op, path,
    **params)` runs one S3 operation on the bucket in a worker thread and
    translates its errors; `run(fn, ...)` hops any other blocking work
    (reading a response body) over the same pool."""

    def __init__(self, settings: S3Settings, client=None):
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = settings.key_prefix
        self.pool = ThreadPoolExecutor(max_workers=settings.max_connections, thread_name_prefix="dockyard-s3")
        self.client = client if client is not None else make_client(settings, client_config(settings))
        self._writing: dict[str, list[asyncio.Event]] = {}

    # ---- writers open in this process ------------------------------------------
    def writing(self, path: str) -> asyncio.Event:
        """Mark a writer of path as open: until `done_writing()`, a stat or
        read of path in this process waits for it (a little: `settled`)."""
        event = asyncio.Event()
        self._writing.setdefault(path, []).append(event)
        return event

    def done_writing(self, path: str, event: asyncio.Event) -> None:
        event.set()
        waiting = self._writing.get(path, [])
        if event in waiting:
            waiting.remove(event)
        if not waiting:
            self._writing.pop(path, None)

    async def settled(self, path: str, timeout: float = 1.0) -> None:
        """Wait up to `timeout` for writers of path open in this process.
        What a writer keeps reaches the bucket when it commits or closes,
        not as it comes (as on a filesystem): a status asked right after a
        client broke off a chunk, before the request noticed, must still
        see what the request's writer keeps. A writer still receiving a
        long chunk is not waited for longer: then the answer is what was
        committed, as another replica would answer."""
        waiting = self._writing.get(path)
        if waiting:
            await asyncio.wait([asyncio.ensure_future(e.wait()) for e in list(waiting)], timeout=timeout)

    # ---- keys ----------------------------------------------------------------
    def key(self, path: str) -> str:
        """The key of a file path (already checked); never the root."""
        if path == "/":
            raise InvalidPath(path, "the root is not a file")
        return self.prefix + path[1:]

    def dir_prefix(self, path: str) -> str:
        """The key prefix of a directory's children ("" or "<prefix>a/b/")."""
        return self.prefix if path == "/" else self.prefix + path[1:] + "/"

    def path_of(self, key: str) -> str:
        return "/" + key[len(self.prefix):]

    def lock_key(self, path: str) -> str:
        parent, _, name = path.rpartition("/")
        return self.prefix + (parent[1:] + "/" if parent else "") + LOCK_PREFIX + name

    def marker_key(self, directory: str) -> str:
        return self.dir_prefix(directory) + DIR_MARKER

    # ---- calls ---------------------------------------------------------------
    async def run(self, fn: Callable, *args, op: str = "read", path: str = "/", **kwargs):
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))
        except Exception as exc:
            translated = translate(exc, op, path, self.bucket)
            if translated is exc:
                raise
            raise translated from exc

    async def call(self, op: str, path: str, **params) -> dict:
        return await self.run(getattr(self.client, op), op=op, path=path, Bucket=self.bucket,
                              **bare_conditions(params))

    def content_args(self, size: int | None = None) -> dict:
        """Storage class and encryption of an object of `size` bytes (None:
        a multipart upload, 5 MiB at least). The storage class is for
        objects of 128 KiB or more: the infrequent-access classes bill a
        smaller one as 128 KiB, and links and tags are read all the time."""
        args = self.encryption_args()
        if self.settings.storage_class and (size is None or size >= STORAGE_CLASS_MIN):
            args["StorageClass"] = self.settings.storage_class
        return args

    def encryption_args(self) -> dict:
        """Encryption of every object the driver writes (state and locks too:
        a bucket policy may refuse unencrypted writes)."""
        args: dict[str, str] = {}
        if self.settings.sse:
            args["ServerSideEncryption"] = self.settings.sse
            if self.settings.sse_kms_key_id:
                args["SSEKMSKeyId"] = self.settings.sse_kms_key_id
        return args

    async def head(self, path: str, key: str | None = None) -> ObjectInfo | None:
        """The object at a file path, None if absent."""
        try:
            response = await self.call("head_object", path, Key=key or self.key(path))
        except PathNotFound:
            return None
        return object_info(response)

    async def has_content(self, prefix: str, path: str) -> bool:
        """Whether any object other than a lock lives under a key prefix:
        what makes a directory exist (a lock alone does not)."""
        token = None
        while True:
            params: dict[str, Any] = {"Prefix": prefix, "MaxKeys": 8}
            if token:
                params["ContinuationToken"] = token
            response = await self.call("list_objects_v2", path, **params)
            if any(not is_lock_key(o["Key"]) for o in response.get("Contents", ())):
                return True
            if not response.get("IsTruncated"):
                return False
            token = response["NextContinuationToken"]

    async def all_keys(self, prefix: str, path: str) -> list[dict]:
        """Every object under a key prefix, all pages."""
        out: list[dict] = []
        token = None
        while True:
            params: dict[str, Any] = {"Prefix": prefix}
            if token:
                params["ContinuationToken"] = token
            response = await self.call("list_objects_v2", path, **params)
            out.extend(response.get("Contents", ()))
            if not response.get("IsTruncated"):
                return out
            token = response["NextContinuationToken"]

    async def multipart_uploads(self, prefix: str, path: str) -> list[dict]:
        """Every multipart upload in progress under a key prefix, all pages."""
        out: list[dict] = []
        params: dict[str, Any] = {"Prefix": prefix}
        while True:
            response = await self.call("list_multipart_uploads", path, **params)
            out.extend(response.get("Uploads", ()))
            if not response.get("IsTruncated"):
                return out
            params["KeyMarker"] = response.get("NextKeyMarker", "")
            params["UploadIdMarker"] = response.get("NextUploadIdMarker", "")
            if not params["KeyMarker"] and not params["UploadIdMarker"]:
                return out

    async def abort(self, path: str, key: str, upload_id: str) -> bool:
        """Abort a multipart upload; False when it was gone already (Ceph
        may say NoSuchKey for an upload aborted meanwhile)."""
        try:
            await self.call("abort_multipart_upload", path, Key=key, UploadId=upload_id)
            return True
        except (UploadGone, PathNotFound):
            return False

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.client, "close", None)
        if close is not None:
            close()


def utc_timestamp(value: datetime | None) -> float:
    if value is None:
        return 0.0
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()
