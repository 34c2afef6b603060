"""The local store: one OCI image layout shared by every pulled image.

    STORE/oci-layout            {"imageLayoutVersion": "1.0.0"}
    STORE/index.json            one descriptor per reference, annotated with
                                org.opencontainers.image.ref.name = the full
                                normalised reference ("127.0.0.1:5000/busybox:latest")
    STORE/blobs/sha256/<hex>    only complete, verified blobs ever live here
    STORE/ingest/               partial downloads (resumable), never read as blobs

skopeo (`skopeo inspect oci:STORE:REF`) and umoci (`umoci ls --layout STORE`)
read it as an ordinary layout.

API (stable; used by puller.unpack / puller.run):

    store = LocalStore(root=None)                # default $XDG_DATA_HOME/dockyard/store
    store.root                                   # pathlib.Path
    store.blob_path(digest) -> Path
    store.has_blob(digest) -> bool
    store.read_blob(digest, limit=None) -> bytes
    store.read_manifest(digest, media_type=None) -> ImageManifest | ImageIndex   (puller.oci, checked)
    store.read_config(digest) -> dict                                           (puller.oci, checked)
    store.resolve(reference) -> str | None       # digest recorded for a reference (the registry's digest)
    store.image_for_platform(reference, platform=None) -> (manifest_digest, manifest, config)
    store.references() -> list[(ref name, descriptor)]
    store.record(reference, descriptor)          # atomic index.json update
    store.ingest_path(digest) / store.commit_blob(tmp_path, digest)
    store.reclaim_ingest() -> list[str]          # drop what crashed or abandoned pulls left
    store.write_blob(data) -> digest             # small blobs (manifests, configs)

`reference` is either a normalised reference (as `dockyard pull` records) or
anything the user typed: it is normalised with puller.reference when it
parses, and otherwise looked up verbatim (plain OCI layout tags like "v1").
All methods here are synchronous and do blocking I/O: call them from a thread
(asyncio.to_thread) when on the event loop with anything large.

A layout handed to the client (`oci:DIR`) is as untrusted as a registry:
index.json, manifests and configs are checked by puller.oci as they are
read, and a manifest or config larger than `document_limit` is refused
before it is read.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import tempfile
import time

from puller.oci import (MAX_DOCUMENT_SIZE, ContentError, Descriptor, ImageIndex, ImageManifest, parse_config,
                        parse_descriptor, parse_manifest, parse_manifest_object)
from puller.reference import (ReferenceError, choose_platform, host_platform, parse_platform,
                              parse_reference, platform_matches)

REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_VERSION = {"imageLayoutVersion": "1.0.0"}
# when leftovers in ingest/ count as abandoned (see LocalStore.reclaim_ingest)
STALE_TEMP_SECONDS = 3600
STALE_PARTIAL_SECONDS = 7 * 86400

INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}


# Docker media types -> their OCI equivalents, for the OCI view of a Docker image
DOCKER_TO_OCI = {
    "application/vnd.docker.distribution.manifest.v2+json": "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json": "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.container.image.v1+json": "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip":
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
}
# on an index.json entry that is an OCI view: the image as the registry serves it
SOURCE_DIGEST = "io.dockyard.source.digest"
SOURCE_MEDIA_TYPE = "io.dockyard.source.mediaType"
SOURCE_SIZE = "io.dockyard.source.size"


class StoreError(Exception):
    """Something missing or inconsistent in the local store (one line)."""


def default_store_root() -> pathlib.Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return pathlib.Path(base) / "dockyard" / "store"


def split_digest(digest: str) -> tuple[str, str]:
    algorithm, sep, hexpart = digest.partition(":")
    if not sep or not algorithm.isalnum() or not hexpart or not all(c in "0123456789abcdef" for c in hexpart):
        raise StoreError(f"invalid digest {digest!r}")
    return algorithm, hexpart


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def media_type_of(manifest: dict, fallback: str | None = None) -> str:
    if manifest.get("mediaType"):
        return manifest["mediaType"]
    if fallback:
        return fallback
    return ("application/vnd.oci.image.index.v1+json" if "manifests" in manifest
            else "application/vnd.oci.image.manifest.v1+json")


class LocalStore:
    document_limit = MAX_DOCUMENT_SIZE   # manifests and configs are read whole: no larger than this

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = pathlib.Path(root) if root is not None else default_store_root()

    # -- layout -----------------------------------------------------------------
    def ensure(self) -> None:
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "ingest").mkdir(parents=True, exist_ok=True)
        layout = self.root / "oci-layout"
        if not layout.exists():
            self._atomic_write(layout, json.dumps(LAYOUT_VERSION).encode())
        if not (self.root / "index.json").exists():
            with self._index_lock():
                if not (self.root / "index.json").exists():
                    self._write_index({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                                       "manifests": []})

    # -- blobs ------------------------------------------------------------------
    def blob_path(self, digest: str) -> pathlib.Path:
        algorithm, hexpart = split_digest(digest)
        return self.root / "blobs" / algorithm / hexpart

    def has_blob(self, digest: str) -> bool:
        try:
            return self.blob_path(digest).is_file()
        except StoreError:
            return False

    def read_blob(self, digest: str, limit: int | None = None) -> bytes:
        """The blob's bytes; with `limit`, refused unread when it is larger."""
        path = self.blob_path(digest)
        try:
            with open(path, "rb") as handle:
                if limit is not None:
                    size = os.fstat(handle.fileno()).st_size
                    if size > limit:
                        raise ContentError(f"{self.root}: blob {digest} is {size} bytes, more than the "
                                           f"{limit} byte limit of a manifest or config")
                return handle.read()
        except (FileNotFoundError, IsADirectoryError):
            raise StoreError(f"blob {digest} is not in the store {self.root}") from None

    def read_manifest(self, digest: str | Descriptor, media_type: str | None = None) -> ImageManifest | ImageIndex:
        """A stored manifest or index, checked (puller.oci)."""
        if isinstance(digest, Descriptor):
            digest, media_type = digest.digest, media_type or digest.media_type or None
        data = self.read_blob(digest, self.document_limit)
        return parse_manifest(data, media_type, f"{self.root}: manifest {digest}")

    def read_config(self, digest: str) -> dict:
        """A stored image config, checked (puller.oci)."""
        return parse_config(self.read_blob(digest, self.document_limit), f"{self.root}: config {digest}")

    def read_json(self, digest: str) -> dict:
        try:
            return json.loads(self.read_blob(digest))
        except ValueError:
            raise StoreError(f"blob {digest} is not valid JSON") from None

    def ingest_path(self, digest: str) -> pathlib.Path:
        """Where a download of `digest` is staged (kept between runs to resume)."""
        algorithm, hexpart = split_digest(digest)
        return self.root / "ingest" / f"{algorithm}-{hexpart}.partial"

    def reclaim_ingest(self, now: float | None = None) -> list[str]:
        """Remove what crashed or abandoned pulls left behind and return the
        names: temp files and private partials (`.partial.<pid>.<id>`) after
        an hour, resumable partials after a week. A file another process
        holds locked is being written and is never touched."""
        now = time.time() if now is None else now
        removed = []
        for folder in (self.root / "ingest", self.root):
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                name = entry.name
                if name.startswith(".tmp-"):
                    limit = STALE_TEMP_SECONDS
                elif folder.name == "ingest" and ".partial" in name:
                    limit = STALE_PARTIAL_SECONDS if name.endswith(".partial") else STALE_TEMP_SECONDS
                else:
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False) or now - entry.stat().st_mtime < limit:
                        continue
                    with open(entry.path, "rb") as handle:
                        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        os.unlink(entry.path)
                except (BlockingIOError, FileNotFoundError):
                    continue        # in use, or gone meanwhile
                removed.append(name)
        return removed

    def commit_blob(self, staged: pathlib.Path, digest: str) -> pathlib.Path:
        """Move a verified staged file to its final name (atomic rename)."""
        final = self.blob_path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(staged, 0o644)
        os.replace(staged, final)
        return final

    def write_blob(self, data: bytes, digest: str | None = None) -> str:
        """Store small content (manifests, configs); verifies `digest` if given."""
        actual = sha256_digest(data)
        if digest and digest != actual:
            raise StoreError(f"content does not match digest {digest} (got {actual})")
        final = self.blob_path(actual)
        if not final.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            (self.root / "ingest").mkdir(parents=True, exist_ok=True)
            self._atomic_write(final, data, staging=self.root / "ingest")
        return actual

    # -- index.json ---------------------------------------------------------------
    def index(self) -> dict:
        """index.json, every entry a checked descriptor."""
        path = self.root / "index.json"
        try:
            with open(path, "rb") as handle:
                data = handle.read(self.document_limit + 1)
        except FileNotFoundError:
            return {"schemaVersion": 2, "manifests": []}
        if len(data) > self.document_limit:
            raise StoreError(f"{path} exceeds the {self.document_limit} byte limit")
        try:
            body = json.loads(data)
        except (ValueError, RecursionError):
            raise StoreError(f"{path} is not valid JSON") from None
        if isinstance(body, dict) and "manifests" not in body:
            body["manifests"] = []          # an empty layout, as some tools write it
        parse_manifest_object(body, "application/vnd.oci.image.index.v1+json", str(path))
        return body

    def references(self) -> list[tuple[str, dict]]:
        return [((d.get("annotations") or {}).get(REF_NAME, ""), d) for d in self.index().get("manifests", [])]

    def _lookup_names(self, reference: str) -> list[str]:
        names = [reference]
        try:
            ref = parse_reference(reference)
        except ReferenceError:
            return names
        names.insert(0, str(ref))
        if ref.tag and ref.digest:
            names.append(str(ref.with_tag(None).with_digest(ref.digest)))
        return names

    def descriptor(self, reference: str) -> dict | None:
        entries = self.references()
        for name in self._lookup_names(reference):
            for ref_name, desc in entries:
                if ref_name == name:
                    return desc
        # name@digest not recorded as such: the digest itself is enough
        if "@" in reference:
            digest = reference.rsplit("@", 1)[1]
            for _, desc in entries:
                if desc.get("digest") == digest:
                    return desc
            if self.has_blob(digest):
                manifest = self.read_manifest(digest)
                return {"mediaType": manifest.media_type, "digest": digest,
                        "size": self.blob_path(digest).stat().st_size}
        return None

    def source_descriptor(self, reference: str) -> dict | None:
        """The image as its registry serves it (digest preserved): the recorded
        entry, or for a Docker image the original behind its OCI view."""
        desc = self.descriptor(reference)
        if desc is None:
            return None
        annotations = desc.get("annotations") or {}
        if SOURCE_DIGEST in annotations:
            size = annotations.get(SOURCE_SIZE) or "0"
            out = {"mediaType": annotations.get(SOURCE_MEDIA_TYPE), "digest": annotations[SOURCE_DIGEST],
                   "size": int(size) if size.isdigit() and len(size) < 20 else 0}
            if desc.get("platform"):
                out["platform"] = desc["platform"]
            return out
        return desc

    def resolve(self, reference: str) -> str | None:
        desc = self.source_descriptor(reference)
        return desc["digest"] if desc else None

    def oci_view(self, descriptor: dict) -> dict:
        """A Docker manifest (list) rewritten with OCI media types, stored as a
        blob sharing every layer; skopeo and umoci only read OCI entries of
        index.json. OCI content is returned unchanged."""
        media_type = descriptor.get("mediaType")
        if media_type not in DOCKER_TO_OCI:
            return descriptor
        body = self.read_manifest(descriptor["digest"], media_type).json
        if "manifests" in body:
            children = []
            for child in body.get("manifests") or []:
                if self.has_blob(child["digest"]):
                    children.append({**child, **self.oci_view(child)})
            converted = {"schemaVersion": 2, "mediaType": DOCKER_TO_OCI[media_type], "manifests": children}
        else:
            def convert(d: dict) -> dict:
                return {**d, "mediaType": DOCKER_TO_OCI.get(d.get("mediaType"), d.get("mediaType"))}
            converted = {"schemaVersion": 2, "mediaType": DOCKER_TO_OCI[media_type],
                         "config": convert(body["config"]), "layers": [convert(l) for l in body.get("layers") or []]}
            if body.get("annotations"):
                converted["annotations"] = body["annotations"]
        data = json.dumps(converted, separators=(",", ":")).encode()
        digest = self.write_blob(data)
        view = {"mediaType": DOCKER_TO_OCI[media_type], "digest": digest, "size": len(data)}
        if descriptor.get("platform"):
            view["platform"] = descriptor["platform"]
        return view

    def record(self, reference: str, descriptor: dict) -> None:
        """Point `reference` at `descriptor` (replacing an older entry), atomically.
        A Docker image is recorded through its OCI view, annotated with the
        original (see source_descriptor)."""
        self.ensure()
        annotations = dict(descriptor.get("annotations") or {})
        view = self.oci_view(descriptor)
        if view is not descriptor:
            annotations.update({SOURCE_DIGEST: descriptor["digest"], SOURCE_MEDIA_TYPE: descriptor["mediaType"],
                                SOURCE_SIZE: str(descriptor["size"])})
            descriptor = view
        entry = {k: v for k, v in descriptor.items() if k in ("mediaType", "digest", "size", "platform")}
        annotations[REF_NAME] = reference
        entry["annotations"] = annotations
        with self._index_lock():
            index = self.index()
            manifests = [d for d in index.get("manifests", [])
                         if (d.get("annotations") or {}).get(REF_NAME) != reference]
            manifests.append(entry)
            index["manifests"] = manifests
            index.setdefault("schemaVersion", 2)
            self._write_index(index)

    def forget(self, reference: str) -> bool:
        with self._index_lock():
            index = self.index()
            before = len(index.get("manifests", []))
            index["manifests"] = [d for d in index.get("manifests", [])
                                  if (d.get("annotations") or {}).get(REF_NAME) != reference]
            self._write_index(index)
            return len(index["manifests"]) != before

    # -- images -------------------------------------------------------------------
    def image_for_platform(self, reference: str, platform: str | None = None) -> tuple[str, dict, dict]:
        """(manifest digest, manifest, config) of `reference` for one platform
        (default: the host's). Raises StoreError when it is not in the store."""
        desc = self.source_descriptor(reference)
        if desc is None:
            raise StoreError(f"{reference} is not in the store {self.root} (pull it first)")
        top = parse_descriptor(desc, f"{self.root}/index.json: {reference}")
        digest = top.digest
        manifest = self.read_manifest(top)
        from_index = manifest.is_index
        if from_index:
            wanted = parse_platform(platform) if platform else host_platform()
            child = choose_platform([entry.raw for entry in manifest.manifests], wanted)
            if child is None:
                raise StoreError(f"{reference} has no image for platform {wanted}")
            digest = child["digest"]
            manifest = self.read_manifest(digest, child.get("mediaType"))
            if manifest.is_index:
                raise StoreError(f"{reference}: the image for {wanted} is itself an index")
        if manifest.config is None:
            raise StoreError(f"{reference}: manifest {digest} has no image config")
        config = self.read_config(manifest.config.digest)
        if platform and not from_index:
            wanted = parse_platform(platform)
            if not platform_matches({"os": config.get("os"), "architecture": config.get("architecture"),
                                      "variant": config.get("variant")}, wanted):
                raise StoreError(f"{reference} is {config.get('os')}/{config.get('architecture')}, "
                                 f"not {wanted}")
        return digest, manifest.json, config

    # -- helpers ------------------------------------------------------------------
    @contextlib.contextmanager
    def _index_lock(self):
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "ingest").mkdir(exist_ok=True)
        with open(self.root / "ingest" / ".index.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write_index(self, index: dict) -> None:
        self._atomic_write(self.root / "index.json", json.dumps(index, indent=2).encode())

    @staticmethod
    def _atomic_write(path: pathlib.Path, data: bytes, staging: pathlib.Path | None = None) -> None:
        # staged next to the target (or in ingest/ for blobs: nothing partial under blobs/)
        fd, tmp = tempfile.mkstemp(dir=staging or path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
