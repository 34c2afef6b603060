"""Test content made by hand: digests, media types, tar layers, image
configs and OCI image layouts on disk.

The media type strings are written out here on purpose rather than imported
from the code under test: a typo there must fail a test, not pass it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER = OCI_LAYER_TAR
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
# What a modern client sends when it GETs a manifest.
MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))


def digest_of(data: bytes, alg: str = "sha256") -> str:
    """"<alg>:<hex>" of data, for any hashlib algorithm (sha256, sha512)."""
    return f"{alg}:{hashlib.new(alg, data).hexdigest()}"


def sha256_digest(data: bytes) -> str:
    return digest_of(data, "sha256")


def tar_layer(files: Mapping[str, bytes], *, mode: int = 0o644, mtime: int = 0) -> bytes:
    """An uncompressed, reproducible tar of regular files; each file's parent
    directories come first as entries of their own."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        seen: set[str] = set()
        for name in sorted(files):
            parts = name.strip("/").split("/")
            for depth in range(1, len(parts)):
                directory = "/".join(parts[:depth])
                if directory in seen:
                    continue
                seen.add(directory)
                info = tarfile.TarInfo(directory)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
                tar.addfile(info)
            data = files[name]
            info = tarfile.TarInfo(name.strip("/"))
            info.size, info.mode, info.mtime = len(data), mode, mtime
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def random_tar_layer(size: int, name: str = "data.bin") -> bytes:
    """A valid tar layer holding one file of `size` random (incompressible) bytes."""
    return tar_layer({name: os.urandom(size)})


def gzip_bytes(data: bytes) -> bytes:
    """gzip, fast and reproducible (no timestamp)."""
    return gzip.compress(data, compresslevel=1, mtime=0)


def image_config(diff_ids: Sequence[str], *, architecture: str = "amd64", os_name: str = "linux",
                 cmd: Sequence[str] = ("/bin/sh",), variant: str | None = None) -> dict:
    """An OCI image config over layers with these diff_ids."""
    config: dict = {
        "architecture": architecture,
        "os": os_name,
        "config": {"Cmd": list(cmd), "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created_by": "dockyard tests"} for _ in diff_ids],
    }
    if variant:
        config["variant"] = variant
    return config


def _canonical(document: dict) -> bytes:
    return json.dumps(document, sort_keys=True).encode()


class OciLayoutWriter:
    """Builds an OCI image layout directory (oci-layout, index.json, blobs/sha256/).

    `blob()`, `image()` and `index()` store content and return its
    descriptor; `tag()` lists a descriptor in index.json under a
    `org.opencontainers.image.ref.name`; `close()` writes index.json.
    """

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        (self.dir / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.dir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        self.entries: list[dict] = []

    def blob(self, data: bytes, media_type: str, **extra) -> dict:
        digest = sha256_digest(data)
        path = self.dir / "blobs" / "sha256" / digest.split(":", 1)[1]
        if not path.exists():
            path.write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    def image(self, layers: Sequence[bytes], config: dict | bytes | None = None, *,
              layer_media_type: str = OCI_LAYER_TAR, platform: dict | None = None,
              annotations: Mapping[str, str] | None = None, subject: dict | None = None,
              artifact_type: str | None = None, config_media_type: str = OCI_CONFIG) -> dict:
        """Store an image manifest over `layers` (blob bytes, compressed when
        the media type says so). Without `config`, one is derived from the
        layers' diff_ids and the platform."""
        if config is None:
            gzipped = layer_media_type.endswith("gzip")
            diff_ids = [sha256_digest(gzip.decompress(layer) if gzipped else layer) for layer in layers]
            config = image_config(diff_ids, architecture=(platform or {}).get("architecture", "amd64"),
                                  variant=(platform or {}).get("variant"))
        config_bytes = config if isinstance(config, bytes) else _canonical(config)
        manifest: dict = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": self.blob(config_bytes, config_media_type),
            "layers": [self.blob(layer, layer_media_type) for layer in layers],
        }
        if artifact_type:
            manifest["artifactType"] = artifact_type
        if subject:
            manifest["subject"] = subject
        if annotations:
            manifest["annotations"] = dict(annotations)
        extra = {"platform": platform} if platform else {}
        return self.blob(_canonical(manifest), OCI_MANIFEST, **extra)

    def index(self, manifests: Sequence[dict]) -> dict:
        body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(manifests)}
        return self.blob(_canonical(body), OCI_INDEX)

    def tag(self, name: str, descriptor: dict) -> None:
        entry = {key: value for key, value in descriptor.items() if key != "platform"}
        entry["annotations"] = {"org.opencontainers.image.ref.name": name}
        self.entries.append(entry)

    def close(self) -> None:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.entries}
        (self.dir / "index.json").write_text(json.dumps(index))


@dataclass(frozen=True)
class LayoutImage:
    path: Path                  # the layout directory
    tag: str
    manifest: dict              # the manifest's descriptor (digest, size, mediaType)
    layers: tuple[str, ...]     # layer digests, in order

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    @property
    def ref(self) -> str:
        """The image as skopeo and umoci name it: oci:DIR:TAG."""
        return f"oci:{self.path}:{self.tag}"


def write_oci_layout(directory: str | Path, layers: Sequence[bytes] | None = None,
                     config: dict | bytes | None = None, *, tag: str = "latest",
                     layer_sizes: Sequence[int] | None = None,
                     layer_media_type: str = OCI_LAYER_TAR) -> LayoutImage:
    """An OCI image layout holding one tagged image.

    Pass `layers` as blob bytes, or `layer_sizes` for random tar layers of
    about those sizes (each a valid tar of one random file).
    """
    if layers is None:
        layers = [random_tar_layer(size, name=f"layer{i}.bin")
                  for i, size in enumerate(layer_sizes or [1024])]
    writer = OciLayoutWriter(directory)
    descriptor = writer.image(layers, config, layer_media_type=layer_media_type)
    writer.tag(tag, descriptor)
    writer.close()
    return LayoutImage(Path(directory), tag, descriptor, tuple(sha256_digest(layer) for layer in layers))


async def chunks(*parts: bytes):
    """parts as the async iterator of byte chunks a request body is read as."""
    for part in parts:
        yield part
