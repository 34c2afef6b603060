"""`dockyard mirror sync CONFIG`: registry to registry, once or every
`--interval` seconds, digests preserved.

CONFIG is an images file (puller.transfer.mirror.images_file) with a few
settings beside `images` and `repositories`:

    target: registry.internal:5000/mirror      # REGISTRY[/PREFIX]; team/app lands at PREFIX/team/app
    platform: linux/amd64                       # optional: one platform of each index
    referrers: true                             # optional: signatures, SBOMs, attestations too

Each image costs one manifest request to the target when it is already
there (a HEAD of the tag, compared with the source's digest, both asked at
once), not one per blob; images go a few at a time. A failed image does not stop the others: the run goes on, and its
result lists what failed (the CLI then exits non-zero).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from puller.client.http import ClientOptions, RegistryClient
from puller.client.reference import Reference, parse_platform
from puller.errors import ClientError, NotFoundError, one_line
from puller.transfer.mirror.errors import ImagesFileError
from puller.transfer.mirror.images_file import Selection, read_images_file
from puller.transfer.mirror.listing import expand, manifest_digest
from puller.transfer.mirror.target import Target
from puller.transfer.progress import Progress
from puller.transfer.tasks import gather_all_or_cancel

SETTINGS = ("target", "platform", "referrers")
IMAGES_IN_FLIGHT = 4         # images synced at once (their blobs share the client's --concurrency)


@dataclass(frozen=True)
class SyncConfig:
    selection: Selection
    target: Target
    platform: str | None = None
    referrers: bool = False


def read_sync_config(path: str) -> SyncConfig:
    selection = read_images_file(path, SETTINGS)
    target_text, line = selection.settings.get("target", (None, None))
    if not target_text:
        raise ImagesFileError(path, None, "no target (REGISTRY[/PREFIX]) to sync to")
    try:
        target = Target.parse(target_text)
        platform, platform_line = selection.settings.get("platform", (None, None))
        line = platform_line
        if platform:
            parse_platform(platform)
    except ClientError as exc:
        raise ImagesFileError(path, line, str(exc)) from None
    referrers, line = selection.settings.get("referrers", ("false", None))
    if referrers.lower() not in ("true", "false", "yes", "no"):
        raise ImagesFileError(path, line, f"referrers must be true or false, got {referrers!r}")
    return SyncConfig(selection, target, platform or None, referrers.lower() in ("true", "yes"))


@dataclass
class SyncResult:
    target: str
    images: list[dict] = field(default_factory=list)     # source, destination, digest, state, error
    bytes_transferred: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> list[dict]:
        return [i for i in self.images if i["state"] == "failed"]

    def to_json(self) -> dict:
        return {"target": self.target, "images": self.images, "bytes_transferred": self.bytes_transferred,
                "copied": sum(1 for i in self.images if i["state"] == "copied"),
                "unchanged": sum(1 for i in self.images if i["state"] == "unchanged"),
                "failed": len(self.failed), "seconds": round(self.seconds, 3)}


async def _digests(client: RegistryClient, ref: Reference, dest: Reference, wanted) -> tuple[str, str | None, object]:
    """The source's digest (and root, when a platform was picked) and the
    target's for the tag: both asked at once, one manifest request each."""
    async def source():
        if wanted is None:
            digest = await manifest_digest(client, ref, ref.identifier)
            if digest is None:
                raise NotFoundError(f"manifest {ref.name}:{ref.identifier}: not found")
            return digest, None
        from puller.transfer.mirror.walk import walk_image
        root = (await walk_image(client, ref, platform=wanted)).root
        return root.digest, root

    async def target():
        return await manifest_digest(client, dest, ref.tag) if ref.tag else None
    (digest, root), present = await gather_all_or_cancel([source(), target()])
    return digest, present, root


async def _sync_one(client: RegistryClient, config: SyncConfig, ref: Reference, progress: Progress,
                    entry: dict, result: SyncResult, referrers_turn: asyncio.Lock) -> None:
    dest = config.target.ref(ref.repository, ref.tag)
    entry.update({"destination": str(dest), "digest": None, "state": "failed"})
    wanted = parse_platform(config.platform) if config.platform else None
    try:
        # the transfers are imported once they are needed: a sync that finds
        # everything in place is a few requests, and should start as fast
        digest, present, root = await _digests(client, ref, dest, wanted)
        entry["digest"] = digest
        if ref.tag and present == digest:
            entry["state"] = "unchanged"
            return
        from puller.transfer.copy import CopyResult, copy_referrers
        from puller.transfer.push import push_image
        from puller.transfer.sources import RegistrySource
        source = RegistrySource(client, ref)
        root = root or await client.get_manifest(ref, digest)
        pushed = await push_image(source, client, dest, tags=[ref.tag] if ref.tag else [], progress=progress,
                                  root=root)
        result.bytes_transferred += pushed.bytes_uploaded
        if config.referrers:
            copied = CopyResult(str(ref), str(dest), digest, root.media_type)
            # one image's referrers at a time: two tags of one image update the same
            # referrers tag (the tag schema) read-modify-write
            async with referrers_turn:
                await copy_referrers(client, ref, dest, list(pushed.manifests), copied, progress, 0)
            result.bytes_transferred += copied.bytes_transferred
        entry["state"] = "copied"
    except ClientError as exc:
        entry["error"] = one_line(exc)


async def sync_once(config: SyncConfig, *, options: ClientOptions | None = None,
                    client: RegistryClient | None = None, progress: Progress | None = None) -> SyncResult:
    started = time.perf_counter()
    progress = progress or Progress()
    own = client is None
    client = client or RegistryClient(options)
    result = SyncResult(target=str(config.target))
    try:
        refs = list(config.selection.images)
        for spec in config.selection.repositories:
            try:
                refs += await expand(client, Selection(repositories=[spec]))
            except ClientError as exc:       # one repository unreadable: the others still sync
                result.images.append({"source": spec.repository.name, "destination": None, "digest": None,
                                      "state": "failed", "error": one_line(exc)})
        # images go concurrently, a few at a time (each also bounded per registry by the
        # client's manifest slots); the result keeps the config's order
        slots, referrers_turn = asyncio.Semaphore(IMAGES_IN_FLIGHT), asyncio.Lock()

        async def one(ref: Reference, entry: dict) -> None:
            async with slots:
                await _sync_one(client, config, ref, progress, entry, result, referrers_turn)
        jobs = []
        for ref in dict.fromkeys(refs):
            entry = {"source": str(ref)}
            result.images.append(entry)
            jobs.append(one(ref, entry))
        await gather_all_or_cancel(jobs)
    finally:
        if own:
            await client.close()
    result.seconds = time.perf_counter() - started
    return result
