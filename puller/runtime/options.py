"""What a caller can ask of the applier (bounds, privileges, decompressor),
what one applied layer reports back, and what a layer is to the runtime."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# (blob path, media type, diff ID or None): one layer, in the order applied
Layer = tuple[Path, str, str | None]


@dataclass(frozen=True)
class UnpackLimits:
    """Bounds on what one layer may make us do."""
    max_layer_bytes: int = 64 << 30        # uncompressed tar stream per layer
    max_entries: int = 5_000_000           # tar entries per layer
    max_header_bytes: int = 1 << 20        # one PAX / GNU long-name record


@dataclass(frozen=True)
class ApplyOptions:
    limits: UnpackLimits = field(default_factory=UnpackLimits)
    as_root: bool | None = None            # None: os.geteuid() == 0
    decompressor: str = "auto"             # "auto" (fastest in-process) | "pipe" (pigz -dc) | "zlib"
    shared_inodes: bool = False            # inodes may be shared with cached snapshots (puller.runtime.apply)
    force_portable_resolver: bool = False  # tests: use the O_NOFOLLOW walk, not openat2

    @property
    def root_privileges(self) -> bool:
        return os.geteuid() == 0 if self.as_root is None else self.as_root


@dataclass
class LayerStats:
    diff_id: str = ""
    uncompressed_bytes: int = 0
    entries: int = 0
    skipped_devices: int = 0
    copied_up: int = 0
