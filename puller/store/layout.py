"""The local store: one OCI image layout shared by every pulled image.

    STORE/oci-layout            {"imageLayoutVersion": "1.0.0"}
    STORE/index.json            one descriptor per reference, annotated with
                                org.opencontainers.image.ref.name = the full
                                normalised reference ("127.0.0.1:5000/busybox:latest")
    STORE/blobs/sha256/<hex>    only complete, verified blobs ever live here
    STORE/ingest/               staged writes and partial downloads (puller.store.ingest)

skopeo (`skopeo inspect oci:STORE:REF`) and umoci (`umoci ls --layout STORE`)
read it as an ordinary layout.

API (stable; used by the transfers and the runtime):

    store = LocalStore(root=None)                # default $XDG_DATA_HOME/dockyard/store
    scratch = LocalStore(tmp, durable=False)     # blobs never flushed (a staging area thrown away after)
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
    store.open_ingest(digest) / store.commit_blob(path, digest) / store.import_blob(path, digest)
    store.reclaim_ingest() -> list[str]          # drop what crashed or abandoned pulls left
    store.write_blob(data) -> digest             # small blobs (manifests, configs)

`reference` is either a normalised reference (as `dockyard pull` records) or
anything the user typed: it is normalised with puller.client.reference when
it parses, and otherwise looked up verbatim (plain OCI layout tags like
"v1"). None names a layout's default image (see default_descriptor).
All methods here are synchronous and do blocking I/O: call them from a thread
(asyncio.to_thread) when on the event loop with anything large. OSError
leaves them as StoreError.

A layout handed to the client (`oci:DIR[:TAG]`, parse_layout_reference) is
as untrusted as a registry: index.json, manifests and configs are checked by
puller.oci as they are read, and a manifest or config larger than
`document_limit` is refused before it is read.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import pathlib
import shutil
from typing import NamedTuple

from puller.client.reference import choose_platform, host_platform, parse_platform, parse_reference, platform_matches
from puller.errors import ContentError, ReferenceError, StoreError, one_line
from puller.oci import (MAX_DOCUMENT_SIZE, Descriptor, ImageIndex, ImageManifest, parse_config, parse_descriptor,
                        parse_json_object, parse_manifest)
from puller.store import ingest
from storage.oci import media
from storage.oci.digests import digest_of
from storage.oci.errors import DigestInvalid

REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_VERSION = {"imageLayoutVersion": "1.0.0"}
LAYOUT_PREFIX = "oci:"
# what `oci:DIR` names in a layout of several images (and what a copy into a layout is named by default)
DEFAULT_LAYOUT_TAG = "latest"

# on an index.json entry that is an OCI view: the image as the registry serves it
SOURCE_DIGEST = "io.dockyard.source.digest"
SOURCE_MEDIA_TYPE = "io.dockyard.source.mediaType"
SOURCE_SIZE = "io.dockyard.source.size"


class LayoutReference(NamedTuple):
    directory: pathlib.Path
    tag: str | None              # None: the layout's default image (LocalStore.default_descriptor)


def parse_layout_reference(text: str) -> LayoutReference | None:
    """`oci:DIR[:TAG]` -> LayoutReference; None for anything else. The tag
    starts at the first colon after the prefix, as containers/image (skopeo)
    reads it, so a reference recorded in a store names itself:
    `oci:STORE:127.0.0.1:5000/app:v1`. A directory holding a colon cannot
    be named (nor can it for skopeo)."""
    if not text.startswith(LAYOUT_PREFIX):
        return None
    directory, _, tag = text[len(LAYOUT_PREFIX):].partition(":")
    return LayoutReference(pathlib.Path(directory), tag or None)


def default_store_root() -> pathlib.Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return pathlib.Path(base) / "dockyard" / "store"


def _store_io(method):
    """OSError from the disk leaves the store as a StoreError (same text)."""
    @functools.wraps(method)
    def mapped(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as exc:
            raise StoreError(one_line(exc)) from exc
    return mapped


class LocalStore:
    document_limit = MAX_DOCUMENT_SIZE   # manifests and configs are read whole: no larger than this

    def __init__(self, root: str | os.PathLike | None = None, *, durable: bool = True):
        self.root = pathlib.Path(root) if root is not None else default_store_root()
        self.durable = durable          # False: blobs are not flushed to disk (a scratch store)

    # -- layout -----------------------------------------------------------------
    @_store_io
    def ensure(self) -> None:
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        ingest.ingest_dir(self.root).mkdir(parents=True, exist_ok=True)
        layout = self.root / "oci-layout"
        if not layout.exists():
            ingest.write_atomic(layout, json.dumps(LAYOUT_VERSION).encode())
        if not (self.root / "index.json").exists():
            with self._index_lock():
                if not (self.root / "index.json").exists():
                    self._write_index({"schemaVersion": 2, "mediaType": media.OCI_INDEX, "manifests": []})

    # -- blobs ------------------------------------------------------------------
    def blob_path(self, digest: str) -> pathlib.Path:
        try:
            return ingest.blob_path(self.root, digest)
        except DigestInvalid as exc:
            raise StoreError(str(exc)) from exc

    def has_blob(self, digest: str) -> bool:
        try:
            return self.blob_path(digest).is_file()
        except StoreError:
            return False

    @_store_io
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

    @_store_io
    def open_blob(self, digest: str):
        """The blob's file, open for reading (a push streams it)."""
        try:
            return open(self.blob_path(digest), "rb")
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
        """A stored JSON document (strict, bounded like a manifest)."""
        return parse_json_object(self.read_blob(digest, self.document_limit), f"{self.root}: blob {digest}")

    # -- ingest (puller.store.ingest) ---------------------------------------------
    def ingest_path(self, digest: str) -> pathlib.Path:
        """Where a download of `digest` is staged (kept between runs to resume)."""
        try:
            return ingest.partial_path(self.root, digest)
        except DigestInvalid as exc:
            raise StoreError(str(exc)) from exc

    @_store_io
    def open_ingest(self, digest: str) -> ingest.IngestFile:
        """The staged file of a download of `digest`, locked for this process."""
        self.ingest_path(digest)                 # a bad digest is a StoreError, not a path
        return ingest.IngestFile(self.root, digest, self.durable)

    @_store_io
    def reclaim_ingest(self, now: float | None = None) -> list[str]:
        return ingest.reclaim(self.root, now)

    @_store_io
    def commit_blob(self, staged: pathlib.Path, digest: str) -> pathlib.Path:
        """Move a verified staged file to its final name (atomic rename)."""
        self.blob_path(digest)
        return ingest.commit(self.root, staged, digest)

    @_store_io
    def import_blob(self, source: pathlib.Path, digest: str) -> int:
        """Copy a blob of another layout in (staged, then committed); its size."""
        staged = ingest.temp_path(self.root)
        try:
            shutil.copyfile(source, staged)
            size = staged.stat().st_size
            self.commit_blob(staged, digest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
            raise
        return size

    @_store_io
    def stage_file(self) -> pathlib.Path:
        """A private file in ingest/ for a blob whose digest is not known yet."""
        return ingest.temp_path(self.root)

    @_store_io
    def write_blob(self, data: bytes, digest: str | None = None) -> str:
        """Store small content (manifests, configs); verifies `digest` if given."""
        actual = digest_of(data)
        if digest and digest != actual:
            raise StoreError(f"content does not match digest {digest} (got {actual})")
        final = self.blob_path(actual)
        if not final.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = ingest.ingest_dir(self.root)
            staging.mkdir(parents=True, exist_ok=True)
            ingest.write_atomic(final, data, staging=staging)
        return actual

    # -- index.json ---------------------------------------------------------------
    @_store_io
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
        body = parse_json_object(data, str(path))
        if "manifests" not in body:
            body["manifests"] = []          # an empty layout, as some tools write it
        parse_manifest(body, media.OCI_INDEX, str(path))
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

    def source_descriptor(self, reference: str | None) -> dict | None:
        """The image as its registry serves it (digest preserved): the recorded
        entry, or for a Docker image the original behind its OCI view."""
        desc = self.default_descriptor() if reference is None else self.descriptor(reference)
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

    def default_descriptor(self) -> dict | None:
        """What a layout reference without a tag names: the layout's only
        image, else the one named DEFAULT_LAYOUT_TAG; None in an empty layout."""
        entries = self.references()
        if len(entries) == 1:
            name, desc = entries[0]
            return (self.descriptor(name) if name else None) or desc
        if not entries:
            return None
        desc = self.descriptor(DEFAULT_LAYOUT_TAG)
        if desc is None:
            raise StoreError(f"{self.root} holds several images: name one (oci:DIR:TAG)")
        return desc

    def resolve(self, reference: str | None) -> str | None:
        desc = self.source_descriptor(reference)
        return desc["digest"] if desc else None

    def oci_view(self, descriptor: dict) -> dict:
        """A Docker manifest (list) rewritten with OCI media types, stored as a
        blob sharing every layer; skopeo and umoci only read OCI entries of
        index.json. OCI content is returned unchanged."""
        media_type = descriptor.get("mediaType")
        if not media.is_manifest(media_type) or media_type not in media.DOCKER_TO_OCI:
            return descriptor
        target = media.DOCKER_TO_OCI[media_type]
        manifest = self.read_manifest(descriptor["digest"], media_type)
        if manifest.is_index:
            children = [{**child.raw, **self.oci_view(child.raw)} for child in manifest.manifests
                        if self.has_blob(child.digest)]
            converted = {"schemaVersion": 2, "mediaType": target, "manifests": children}
        else:
            def convert(d: Descriptor) -> dict:
                kind = d.raw.get("mediaType")
                return {**d.raw, "mediaType": media.DOCKER_TO_OCI.get(kind, kind)}
            converted = {"schemaVersion": 2, "mediaType": target, "config": convert(manifest.config),
                         "layers": [convert(layer) for layer in manifest.layers]}
            if manifest.annotations:
                converted["annotations"] = manifest.annotations
        data = json.dumps(converted, separators=(",", ":")).encode()
        digest = self.write_blob(data)
        view = {"mediaType": target, "digest": digest, "size": len(data)}
        if descriptor.get("platform"):
            view["platform"] = descriptor["platform"]
        return view

    @_store_io
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

    # -- images -------------------------------------------------------------------
    @_store_io
    def image_for_platform(self, reference: str | None, platform: str | None = None) -> tuple[str, dict, dict]:
        """(manifest digest, manifest, config) of `reference` (None: the
        layout's default image) for one platform (default: the host's).
        Raises StoreError when it is not in the store."""
        name = "image" if reference is None else reference
        desc = self.source_descriptor(reference)
        if desc is None:
            raise StoreError(f"{name} is not in the store {self.root} (pull it first)")
        top = parse_descriptor(desc, f"{self.root}/index.json: {name}")
        digest = top.digest
        manifest = self.read_manifest(top)
        from_index = manifest.is_index
        if from_index:
            wanted = parse_platform(platform) if platform else host_platform()
            child = choose_platform([entry.raw for entry in manifest.manifests], wanted)
            if child is None:
                raise StoreError(f"{name} has no image for platform {wanted}")
            digest = child["digest"]
            manifest = self.read_manifest(digest, child.get("mediaType"))
            if manifest.is_index:
                raise StoreError(f"{name}: the image for {wanted} is itself an index")
        if manifest.config is None:
            raise StoreError(f"{name}: manifest {digest} has no image config")
        config = self.read_config(manifest.config.digest)
        if platform and not from_index:
            wanted = parse_platform(platform)
            if not platform_matches({"os": config.get("os"), "architecture": config.get("architecture"),
                                      "variant": config.get("variant")}, wanted):
                raise StoreError(f"{name} is {config.get('os')}/{config.get('architecture')}, "
                                 f"not {wanted}")
        return digest, manifest.json, config

    # -- helpers ------------------------------------------------------------------
    @contextlib.contextmanager
    def _index_lock(self):
        self.root.mkdir(parents=True, exist_ok=True)
        ingest.ingest_dir(self.root).mkdir(exist_ok=True)
        with open(ingest.ingest_dir(self.root) / ".index.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write_index(self, index: dict) -> None:
        ingest.write_atomic(self.root / "index.json", json.dumps(index, indent=2).encode())
