"""Storage settings and the one factory that opens storage from them.

The registry, `dockyard gc` and any offline tool open storage here, never
through the web app. The settings are typed and frozen; `registry.settings`
loads them (YAML, environment, flags) under the `storage.` keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from storage.blobs import StoreLimits
from storage.driver import StorageDriver
from storage.filesystem import FSYNC_MODES
from storage.store import ContentStore

DRIVERS = ("filesystem", "s3")


class StorageConfigError(ValueError):
    """A storage setting that cannot work, in one line naming its key."""


def default_storage_root() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "dockyard", "registry")


@dataclass(frozen=True)
class S3Settings:
    bucket: str = ""
    region: str = ""
    endpoint_url: str = ""         # for S3-compatible services (MinIO, Ceph)
    prefix: str = ""               # key prefix inside the bucket
    access_key_id: str = ""        # empty: the usual AWS credential chain
    secret_access_key: str = ""
    presign_expires: int = 1200


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
    filesystem: FilesystemSettings = field(default_factory=FilesystemSettings)
    s3: S3Settings = field(default_factory=S3Settings)

    def check(self) -> None:
        """StorageConfigError for settings no driver could open."""
        if self.driver not in DRIVERS:
            raise StorageConfigError(f"storage.driver must be one of {', '.join(DRIVERS)}, "
                                     f"got {self.driver!r}")
        if self.driver == "filesystem" and not self.root:
            raise StorageConfigError("storage.root must be set for the filesystem driver")
        if self.filesystem.fsync not in FSYNC_MODES:
            raise StorageConfigError(f"storage.filesystem.fsync must be one of {', '.join(FSYNC_MODES)}, "
                                     f"got {self.filesystem.fsync!r}")
        if self.driver == "s3" and not self.s3.bucket:
            raise StorageConfigError("storage.s3.bucket must be set for the s3 driver")


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


def open_store(settings: StorageSettings, limits: StoreLimits | None = None) -> ContentStore:
    """A content store over the driver the settings name."""
    return ContentStore(open_driver(settings), limits)
