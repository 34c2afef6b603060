"""What the local store holds, and taking things out of it, so that the
store stays an OCI image layout that skopeo and umoci read after any of it.

    images(store) -> [ImageRow]             one row per reference and platform (`dockyard images`)
    reachable(store) -> set[digest]         every blob an index.json entry leads to (the walk of
                                            storage.oci: index -> manifests -> config, layers)
    forget(store, reference) -> digest      the reference's entry removed from index.json
    remove_unreachable(store, ...)          blobs no entry leads to, deleted (`rmi`, `prune`)

A blob younger than `grace` seconds is never deleted as unreachable: a pull
commits blobs before it records its reference, and must not lose them to a
prune running beside it. Deleting a blob is an unlink of a complete file: a
reader that has it open keeps reading it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from puller.errors import ClientError, StoreError
from puller.store.layout import REF_NAME, SOURCE_DIGEST, LocalStore

PRUNE_GRACE_SECONDS = 3600.0


@dataclass(frozen=True)
class ImageRow:
    reference: str
    repository: str
    tag: str
    digest: str              # what the registry calls it (a Docker image's own digest, not its OCI view's)
    platform: str
    size: int                # bytes of its manifest(s), config and layers in the store
    created: str

    def to_json(self) -> dict:
        return {"reference": self.reference, "repository": self.repository, "tag": self.tag,
                "digest": self.digest, "platform": self.platform, "size": self.size, "created": self.created}


def _entry_roots(entry: dict) -> list[str]:
    roots = [entry["digest"]]
    source = (entry.get("annotations") or {}).get(SOURCE_DIGEST)
    if source:
        roots.append(source)
    return roots


def _walk(store: LocalStore, digest: str, seen: set[str], media_type: str | None = None, depth: int = 0) -> None:
    """Every blob reachable from `digest` that the store has (absent ones are skipped:
    a single-platform pull keeps one child of an index)."""
    if digest in seen or not store.has_blob(digest):
        return
    seen.add(digest)
    if depth > 8:
        return
    try:
        manifest = store.read_manifest(digest, media_type)
    except ClientError:         # not a manifest (or not one we read): nothing below it
        return
    for child in manifest.children():
        if child.role in ("manifest", "subject"):
            _walk(store, child.descriptor.digest, seen, child.descriptor.media_type or None, depth + 1)
        elif store.has_blob(child.descriptor.digest):
            seen.add(child.descriptor.digest)


def reachable(store: LocalStore, entries: list[dict] | None = None) -> set[str]:
    seen: set[str] = set()
    for entry in store.index().get("manifests", []) if entries is None else entries:
        for root in _entry_roots(entry):
            _walk(store, root, seen, entry.get("mediaType") if root == entry["digest"] else None)
    return seen


def _split(reference: str) -> tuple[str, str]:
    name, _, digest = reference.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1:]
    return name, "<none>" if not digest else f"@{digest[:19]}"


def images(store: LocalStore) -> list[ImageRow]:
    rows = []
    for name, entry in store.references():
        if not name:
            continue
        repository, tag = _split(name)
        digest = store.resolve(name) or entry["digest"]
        blobs = reachable(store, [entry])
        size = sum(_size(store, d) for d in blobs)
        for platform, created in _platforms(store, entry):
            rows.append(ImageRow(name, repository, tag, digest, platform, size, created))
    return rows


def _size(store: LocalStore, digest: str) -> int:
    try:
        return store.blob_path(digest).stat().st_size
    except OSError:
        return 0


def image_configs(store: LocalStore, entry: dict) -> list[dict]:
    """The config of each image under an index.json entry that the store holds
    (one for an image, one per platform pulled of an index)."""
    out = []
    try:
        top = store.read_manifest(entry["digest"], entry.get("mediaType"))
        manifests = [(d.digest, d.media_type) for d in top.manifests] if top.is_index else [(entry["digest"], None)]
        for digest, media_type in manifests:
            if not store.has_blob(digest):
                continue
            manifest = store.read_manifest(digest, media_type or None)
            if manifest.is_index or manifest.config is None or not store.has_blob(manifest.config.digest):
                continue
            out.append(store.read_config(manifest.config.digest))
    except ClientError:
        pass
    return out


def _platforms(store: LocalStore, entry: dict) -> list[tuple[str, str]]:
    """(os/arch[/variant], created) of each image under the entry that the store holds."""
    out = []
    for config in image_configs(store, entry):
        platform = "/".join(str(p) for p in (config.get("os"), config.get("architecture"),
                                              config.get("variant")) if p)
        out.append((platform or "unknown", str(config.get("created") or "")))
    return out or [("unknown", "")]


def forget(store: LocalStore, reference: str) -> dict:
    """Remove the index.json entry of `reference` (as typed or normalised); its descriptor."""
    names = store._lookup_names(reference)
    with store._index_lock():
        index = store.index()
        manifests = index.get("manifests", [])
        found = next((d for name in names for d in manifests
                      if (d.get("annotations") or {}).get(REF_NAME) == name), None)
        if found is None:
            raise StoreError(f"no such image in the store {store.root}: {reference}")
        index["manifests"] = [d for d in manifests if d is not found]
        store._write_index(index)
    return found


def remove_unreachable(store: LocalStore, *, only: set[str] | None = None,
                       grace: float = PRUNE_GRACE_SECONDS, now: float | None = None) -> tuple[int, int]:
    """Delete blobs that no index entry leads to (limited to `only` when given;
    those younger than `grace` seconds kept); (count, bytes) deleted."""
    now = time.time() if now is None else now
    with store._index_lock():                 # no entry is recorded while we decide
        keep = reachable(store)
        candidates = only if only is not None else set(all_blobs(store.root))
        count = freed = 0
        for digest in sorted(candidates - keep):
            path = store.blob_path(digest)
            try:
                st = path.stat()
                if only is None and now - st.st_mtime < grace:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StoreError(f"cannot remove {path}: {exc.strerror}") from exc
            count += 1
            freed += st.st_size
    return count, freed


def all_blobs(root: Path):
    """The digest of every blob file in the layout."""
    blobs = root / "blobs"
    try:
        algorithms = [a for a in os.listdir(blobs) if (blobs / a).is_dir()]
    except FileNotFoundError:
        return
    for algorithm in algorithms:
        for name in os.listdir(blobs / algorithm):
            if not name.startswith("."):
                yield f"{algorithm}:{name}"


def tree_size(path: Path, seen: set[tuple[int, int]] | None = None) -> int:
    """Bytes of disk a tree uses, each inode counted once (st_blocks, as du does; hard links
    once, also across calls that share `seen`)."""
    seen = set() if seen is None else seen
    total = 0
    try:
        root_dev = os.lstat(path).st_dev
    except OSError:
        return 0
    for directory, dirs, files in os.walk(path):
        mounted = []
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            if st.st_dev != root_dev:          # a mount (a running container's overlay): not ours to count
                mounted.append(name)
                continue
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                total += st.st_blocks * 512
        dirs[:] = [d for d in dirs if d not in mounted]
    return total
