"""What the far side holds, so a delta carries only what it lacks.

`dockyard mirror inventory REGISTRY[/PREFIX] --output HAVE.json`, run on the
disconnected side, lists every repository under PREFIX (the catalog), its
tags, and by digest every manifest and blob their trees name, each with one
repository it was seen in (a mount source on import). Repository names are
written relative to PREFIX, as a bundle names them. Bounded: at most
`max_entries` digests; past that the listing stops and says `truncated`
(a shorter inventory only makes a delta larger, never wrong).

    {"inventoryVersion": 1, "registry": "...", "prefix": "...", "created": "...", "truncated": false,
     "repositories": {"team/app": {"tags": {"v1": "sha256:..."}}},
     "manifests": {"sha256:...": "team/app"}, "blobs": {"sha256:...": "team/app"}}

    have = await take_inventory(client, target, max_entries)    -> Have
    have = Have.load(path) / Have.from_bundle(manifest)          (--have, --since)
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import time
from dataclasses import dataclass, field

from puller.client.http import RegistryClient
from puller.client.reference import Reference
from puller.errors import NotFoundError, one_line
from puller.transfer.mirror.bundle import BundleManifest
from puller.transfer.mirror.errors import MirrorError
from puller.transfer.mirror.listing import list_repositories, list_tags
from puller.transfer.mirror.target import Target
from puller.transfer.mirror.walk import walk_image
from storage.oci.errors import OciError
from storage.oci.names import parse_digest, validate_name, validate_tag

INVENTORY_VERSION = 1
DEFAULT_MAX_ENTRIES = 1_000_000
MAX_INVENTORY_BYTES = 512 * 1024 * 1024


@dataclass
class Have:
    """Digests the far side holds (with a repository each), and its tags."""
    manifests: dict[str, str] = field(default_factory=dict)
    blobs: dict[str, str] = field(default_factory=dict)
    tags: dict[str, dict[str, str]] = field(default_factory=dict)      # repository -> tag -> digest
    repositories_of: dict[str, set[str]] = field(default_factory=dict, repr=False)   # manifest -> repositories
    truncated: bool = False

    def where(self, digest: str) -> str | None:
        return self.blobs.get(digest) or self.manifests.get(digest)

    def manifest_in(self, digest: str, repository: str) -> bool:
        return repository in self.repositories_of.get(digest, ())

    def add_manifest(self, digest: str, repository: str) -> None:
        self.manifests.setdefault(digest, repository)
        self.repositories_of.setdefault(digest, set()).add(repository)

    @property
    def entries(self) -> int:
        return len(self.manifests) + len(self.blobs)

    def to_json(self, registry: str, prefix: str) -> bytes:
        repositories = {r: {"tags": t} for r, t in sorted(self.tags.items())}
        for digest, repos in self.repositories_of.items():
            for repo in repos:
                repositories.setdefault(repo, {"tags": {}}).setdefault("manifests", []).append(digest)
        return json.dumps({"inventoryVersion": INVENTORY_VERSION, "registry": registry, "prefix": prefix,
                           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "truncated": self.truncated, "repositories": repositories,
                           "manifests": self.manifests, "blobs": self.blobs}, indent=1).encode()

    @classmethod
    def load(cls, path: str) -> "Have":
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_INVENTORY_BYTES + 1)
        except OSError as exc:
            raise MirrorError(f"{path}: {one_line(exc)}") from exc
        if len(data) > MAX_INVENTORY_BYTES:
            raise MirrorError(f"{path}: larger than {MAX_INVENTORY_BYTES} bytes")
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            raise MirrorError(f"{path}: not valid JSON") from None
        if not isinstance(doc, dict) or doc.get("inventoryVersion") != INVENTORY_VERSION:
            raise MirrorError(f"{path}: not a dockyard inventory (inventoryVersion {INVENTORY_VERSION})")
        have = cls(truncated=doc.get("truncated") is True)
        try:
            for key, target in (("manifests", have.manifests), ("blobs", have.blobs)):
                entries = doc.get(key) or {}
                if not isinstance(entries, dict):
                    raise ValueError(f"{key} must be an object")
                for digest, repo in entries.items():
                    parse_digest(digest)
                    target[digest] = validate_name(repo)
            repositories = doc.get("repositories") or {}
            if not isinstance(repositories, dict):
                raise ValueError("repositories must be an object")
            for repo, entry in repositories.items():
                validate_name(repo)
                tags = (entry or {}).get("tags") or {}
                if not isinstance(tags, dict):
                    raise ValueError(f"repositories.{repo}.tags must be an object")
                for tag, digest in tags.items():
                    validate_tag(tag)
                    parse_digest(digest)
                    have.tags.setdefault(repo, {})[tag] = digest
                    have.add_manifest(digest, repo)
                for digest in (entry or {}).get("manifests") or []:
                    parse_digest(digest)
                    have.add_manifest(digest, repo)
        except (OciError, ValueError, TypeError, AttributeError) as exc:
            raise MirrorError(f"{path}: {one_line(exc)}") from None
        return have

    @classmethod
    def from_bundle(cls, manifest: BundleManifest) -> "Have":
        """What the far side holds once a previous bundle was imported: what
        it carried and what it built on."""
        have = cls()
        repo_of = {image.digest: image.repository for image in manifest.images}
        fallback = manifest.images[0].repository if manifest.images else "library/unknown"
        for image in manifest.images:
            have.add_manifest(image.digest, image.repository)
            if image.tag:
                have.tags.setdefault(image.repository, {})[image.tag] = image.digest
        for digest in manifest.manifests:
            have.manifests.setdefault(digest, repo_of.get(digest, fallback))
        for digest in manifest.blobs:
            have.blobs.setdefault(digest, fallback)
        for digest, (_, repo) in manifest.prerequisites.items():
            have.blobs.setdefault(digest, repo)
        return have


async def take_inventory(client: RegistryClient, target: Target, max_entries: int = DEFAULT_MAX_ENTRIES) -> Have:
    have = Have()
    repositories = [r for r in await list_repositories(client, target.registry) if target.holds(r)]
    for repository in sorted(repositories):
        relative = target.relative(repository)
        ref = Reference(target.registry, repository)
        try:
            tags = await list_tags(client, ref)
        except NotFoundError:
            continue                        # listed, then deleted
        for tag in sorted(tags):
            if have.entries >= max_entries:
                have.truncated = True
                return have
            try:
                tree = await walk_image(client, ref.with_tag(tag))
            except NotFoundError:
                continue
            have.tags.setdefault(relative, {})[tag] = tree.root.digest
            for digest in tree.manifests:
                have.add_manifest(digest, relative)
            for digest in tree.blobs:
                have.blobs.setdefault(digest, relative)
    return have


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """data as the file at path, renamed into place whole."""
    path = pathlib.Path(path)
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, path)
        except BaseException:
            os.unlink(temp)
            raise
    except OSError as exc:
        raise MirrorError(f"{path}: {one_line(exc)}") from exc
