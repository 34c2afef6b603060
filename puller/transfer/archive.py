"""`docker save` tarballs as OCI layouts, so a push reads them like any
layout: a Docker v2 schema 2 manifest over the archive's config, its layers
gzip-compressed (as they are, or compressed here), diff_ids unchanged.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tarfile

from puller.errors import StoreError, one_line
from puller.oci import MAX_DOCUMENT_SIZE
from puller.store import LocalStore
from storage.oci import media

MiB = 1024 * 1024


def _archive_member(tar: tarfile.TarFile, name: str, archive) -> "tarfile.ExFileObject":
    try:
        member = tar.extractfile(name)
    except KeyError:
        member = None
    if member is None:
        raise StoreError(f"{archive}: {name} is missing from the archive")
    return member


def _archive_entry(entries, image: str | None, archive) -> tuple[str, list[str]]:
    """(config member, layer members) of the chosen image of manifest.json."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise StoreError(f"{archive}: manifest.json is not a list of images")
    if not entries:
        raise StoreError(f"{archive}: archive holds no image")
    entry = entries[0]
    if image:
        for candidate in entries:
            tags = candidate.get("RepoTags")
            if isinstance(tags, list) and image in tags:
                entry = candidate
                break
        else:
            raise StoreError(f"{archive}: no image tagged {image}")
    config, layers = entry.get("Config"), entry.get("Layers")
    if not isinstance(config, str) or not isinstance(layers, list) or not all(isinstance(l, str) for l in layers):
        raise StoreError(f"{archive}: manifest.json names no Config file and Layers list")
    return config, layers


def docker_archive_layout(archive: str | os.PathLike, workdir: str | os.PathLike,
                          image: str | None = None) -> LocalStore:
    """Convert a `docker save` tarball into an OCI layout under `workdir`
    (Docker v2 schema 2 manifest, gzip layers; diff_ids stay those of the
    config). Returns the layout; its single entry is named "image"."""
    try:
        return _convert(archive, LocalStore(workdir), image)
    except tarfile.ReadError as exc:
        raise StoreError(f"{archive}: not a docker save archive (not a tar file)") from exc
    except tarfile.TarError as exc:       # a truncated or damaged one
        raise StoreError(f"{archive}: {one_line(exc)}") from exc
    except OSError as exc:
        raise StoreError(one_line(exc)) from exc


def _convert(archive, store: LocalStore, image: str | None) -> LocalStore:
    store.ensure()
    with tarfile.open(archive) as tar:
        try:
            entries = json.loads(_archive_member(tar, "manifest.json", archive).read(MAX_DOCUMENT_SIZE + 1))
        except (StoreError, ValueError, RecursionError):
            raise StoreError(f"{archive}: not a docker save archive (no readable manifest.json)") from None
        config_name, layer_names = _archive_entry(entries, image, archive)
        config_bytes = _archive_member(tar, config_name, archive).read(MAX_DOCUMENT_SIZE + 1)
        if len(config_bytes) > MAX_DOCUMENT_SIZE:
            raise StoreError(f"{archive}: {config_name} exceeds the {MAX_DOCUMENT_SIZE} byte limit of a config")
        layers = []
        for member_name in layer_names:
            source = _archive_member(tar, member_name, archive)
            staged = store.stage_file()
            hasher = hashlib.sha256()
            size = 0
            with open(staged, "wb") as out:
                head = source.read(2)
                compressed = head == b"\x1f\x8b"
                if compressed:
                    writer = out
                else:
                    writer = gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0)
                data = head
                while data:
                    writer.write(data)
                    data = source.read(MiB)
                if writer is not out:
                    writer.close()
            with open(staged, "rb") as handle:
                while block := handle.read(MiB):
                    hasher.update(block)
                    size += len(block)
            digest = f"{hasher.name}:{hasher.hexdigest()}"
            store.commit_blob(staged, digest)
            layers.append({"mediaType": media.DOCKER_LAYER, "digest": digest, "size": size})
    config_digest = store.write_blob(config_bytes)
    manifest = {"schemaVersion": 2, "mediaType": media.DOCKER_MANIFEST,
                "config": {"mediaType": media.DOCKER_CONFIG, "digest": config_digest, "size": len(config_bytes)},
                "layers": layers}
    data = json.dumps(manifest, indent=3).encode()
    digest = store.write_blob(data)
    store.record("image", {"mediaType": media.DOCKER_MANIFEST, "digest": digest, "size": len(data)})
    return store
