"""Storage settings and the one factory that opens storage from them.

The registry, `dockyard gc` and any offline tool open storage here, never
through the web app. The settings are typed and frozen; `registry.settings`
loads them (YAML, environment, flags) under the `storage.` keys.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from storage.blobs import StoreLimits
from storage.driver import StorageDriver
from storage.filesystem import FSYNC_MODES
from storage.store import ContentStore

DRIVERS = ("filesystem", "s3")

MIB = 1 << 20
S3_MIN_PART = 5 * MIB              # S3's smallest part (all but the last of an upload)
S3_MAX_PART = 5 * 1024 * MIB       # and its largest
S3_ADDRESSING_STYLES = ("auto", "path", "virtual")
S3_SSE_MODES = ("", "AES256", "aws:kms")
# Archive classes cannot be read without a restore first: a registry on them
# would answer every pull with an error.
S3_UNREADABLE_CLASSES = ("GLACIER", "DEEP_ARCHIVE")
_STORAGE_CLASS_RE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_SIGV4_MAX_EXPIRES = 7 * 24 * 3600


class StorageConfigError(ValueError):
    """A storage setting that cannot work, in one line naming its key."""


def default_storage_root() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "dockyard", "registry")


@dataclass(frozen=True)
class S3Settings:
    bucket: str = ""
    region: str = ""               # empty: the AWS chain's (AWS_REGION, ~/.aws/config), else us-east-1
    endpoint_url: str = ""         # for S3-compatible services (MinIO, Ceph)
    prefix: str = ""               # key prefix inside the bucket ("a/b" and "/a/b/" mean "a/b/")
    access_key_id: str = ""        # empty: the usual AWS credential chain
    secret_access_key: str = ""
    presign_expires: int = 1200    # seconds a presigned (redirect) URL stays valid
    # "path" (https://endpoint/bucket/key), "virtual" (https://bucket.endpoint/key),
    # or "auto": path when endpoint_url is set (what S3-compatible services
    # serve without wildcard DNS), else botocore's choice (virtual on AWS).
    addressing_style: str = "auto"
    # Bytes per multipart part to start with (5 MiB..5 GiB); the driver
    # doubles it every 1,000 parts (storage.s3 documents the rule), and a
    # blob smaller than one part is a single PUT.
    part_size: int = 16 * MIB
    # Of objects of 128 KiB or more (blobs); empty: the bucket's default
    # (STANDARD); e.g. STANDARD_IA, INTELLIGENT_TIERING, or a Ceph placement's class.
    storage_class: str = ""
    sse: str = ""                  # server-side encryption: "", "AES256" or "aws:kms"
    sse_kms_key_id: str = ""       # with sse aws:kms: the key (empty: the account's default key)
    max_connections: int = 32      # HTTP connections to S3 (and threads making calls) per process

    @property
    def key_prefix(self) -> str:
        """The prefix as keys start with it: "" or "a/b/"."""
        stripped = self.prefix.strip("/")
        return f"{stripped}/" if stripped else ""

    @property
    def resolved_addressing_style(self) -> str:
        if self.addressing_style == "auto":
            return "path" if self.endpoint_url else "auto"
        return self.addressing_style

    def check(self) -> None:
        """StorageConfigError for S3 settings that cannot work."""
        if not self.bucket:
            raise StorageConfigError("storage.s3.bucket must be set for the s3 driver")
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            raise StorageConfigError(f"storage.s3.endpoint_url must be an http(s) URL, got {self.endpoint_url!r}")
        inner = self.prefix.strip("/")
        if inner and any(c in ("", ".", "..") for c in inner.split("/")):
            raise StorageConfigError(f"storage.s3.prefix must be plain components joined by '/', "
                                     f"got {self.prefix!r}")
        if bool(self.access_key_id) != bool(self.secret_access_key):
            raise StorageConfigError("storage.s3.access_key_id and storage.s3.secret_access_key "
                                     "must be set together (or both empty for the AWS credential chain)")
        if not 1 <= self.presign_expires <= _SIGV4_MAX_EXPIRES:
            raise StorageConfigError(f"storage.s3.presign_expires must be 1..{_SIGV4_MAX_EXPIRES} seconds "
                                     f"(SigV4's limit), got {self.presign_expires}")
        if self.addressing_style not in S3_ADDRESSING_STYLES:
            raise StorageConfigError(f"storage.s3.addressing_style must be one of "
                                     f"{', '.join(S3_ADDRESSING_STYLES)}, got {self.addressing_style!r}")
        if not S3_MIN_PART <= self.part_size <= S3_MAX_PART:
            raise StorageConfigError(f"storage.s3.part_size must be {S3_MIN_PART} (5 MiB) to "
                                     f"{S3_MAX_PART} (5 GiB) bytes, got {self.part_size}")
        if self.storage_class:
            if not _STORAGE_CLASS_RE.fullmatch(self.storage_class):
                raise StorageConfigError(f"storage.s3.storage_class must be an S3 storage class name "
                                         f"such as STANDARD_IA, got {self.storage_class!r}")
            if self.storage_class in S3_UNREADABLE_CLASSES:
                raise StorageConfigError(f"storage.s3.storage_class {self.storage_class} needs a restore "
                                         "before every read; a registry cannot serve from it")
        if self.sse not in S3_SSE_MODES:
            raise StorageConfigError(f"storage.s3.sse must be empty, AES256 or aws:kms, got {self.sse!r}")
        if self.sse_kms_key_id and self.sse != "aws:kms":
            raise StorageConfigError("storage.s3.sse_kms_key_id needs storage.s3.sse aws:kms")
        if not 1 <= self.max_connections <= 1024:
            raise StorageConfigError(f"storage.s3.max_connections must be 1..1024, got {self.max_connections}")


@dataclass(frozen=True)
class FilesystemSettings:
    # What is fsynced (FSYNC_MODES): "data" file contents
    # before they are committed (Distribution 2.8's policy), "full" directories
    # too, "off" nothing. Renames keep every mode safe against a killed process.
    fsync: str = "data"


@dataclass(frozen=True)
class StorageSettings:
    driver: str = "filesystem"
    root: str = field(default_factory=default_storage_root)
    redirect: bool = False         # GET blob -> 307 to a direct URL when the driver has one
    delete_enabled: bool = True
    # Seconds a blob this process found linked into a repository is served
    # to blob GETs without asking storage again (0: always ask). On S3 each
    # ask is a HEAD costing ~2 ms of botocore and a round trip; a 307 answer
    # took 8.6 ms against Distribution's 1.9 (whose descriptor cache never
    # expires). With several replicas a blob deleted through one stays
    # pullable from another this long; pushes (HEAD) and manifest checks
    # always ask storage.
    pull_cache_seconds: int = 10
    filesystem: FilesystemSettings = field(default_factory=FilesystemSettings)
    s3: S3Settings = field(default_factory=S3Settings)

    def check(self) -> None:
        """StorageConfigError for settings no driver could open."""
        if self.driver not in DRIVERS:
            raise StorageConfigError(f"storage.driver must be one of {', '.join(DRIVERS)}, "
                                     f"got {self.driver!r}")
        if self.driver == "filesystem" and not self.root:
            raise StorageConfigError("storage.root must be set for the filesystem driver")
        if not 0 <= self.pull_cache_seconds <= 3600:
            raise StorageConfigError(f"storage.pull_cache_seconds must be 0..3600, got {self.pull_cache_seconds}")
        if self.filesystem.fsync not in FSYNC_MODES:
            raise StorageConfigError(f"storage.filesystem.fsync must be one of {', '.join(FSYNC_MODES)}, "
                                     f"got {self.filesystem.fsync!r}")
        if self.driver == "s3":
            self.s3.check()


def open_driver(settings: StorageSettings) -> StorageDriver:
    """The storage driver the settings name."""
    settings.check()
    if settings.driver == "filesystem":
        from storage.filesystem import FilesystemDriver

        return FilesystemDriver(settings.root, fsync=settings.filesystem.fsync)
    try:
        from storage.s3 import S3Driver  # type: ignore[import-not-found]
    except ImportError:
        raise StorageConfigError("storage.driver s3 is not available in this build") from None
    return S3Driver(settings.s3)


async def check_driver(driver: StorageDriver) -> None:
    """The start-up check of a driver that has one (S3: the bucket exists,
    the credentials are accepted, the endpoint answers): StorageConfigError
    in one line naming the problem. Drivers without a check pass."""
    check = getattr(driver, "check", None)
    if check is not None:
        await check()


def open_store(settings: StorageSettings, limits: StoreLimits | None = None) -> ContentStore:
    """A content store over the driver the settings name."""
    return ContentStore(open_driver(settings), limits)
