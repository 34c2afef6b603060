"""Helpers for the registry API tests: a small client speaking the
distribution API over aiohttp's TestClient (media types and digests
come from tests.support.content)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from tests.support.content import (DOCKER_CONFIG, DOCKER_LAYER, DOCKER_LIST, DOCKER_MANIFEST, OCI_CONFIG,
                                   OCI_INDEX, OCI_LAYER, OCI_MANIFEST, digest_of)
from tests.support import rawhttp

__all__ = ["DOCKER_CONFIG", "DOCKER_LAYER", "DOCKER_LIST", "DOCKER_MANIFEST", "OCI_CONFIG", "OCI_INDEX",
           "OCI_LAYER", "OCI_MANIFEST", "Registry", "digest_of", "error_codes", "raw_request",
           "replace_section"]


def error_codes(body: Any) -> list[str]:
    return [e["code"] for e in body["errors"]]


class Registry:
    """A thin helper over aiohttp's TestClient speaking the distribution API."""

    def __init__(self, client):
        self.client = client

    def __getattr__(self, name):  # get/post/put/patch/delete/head/request
        return getattr(self.client, name)

    async def push_blob(self, repo: str, data: bytes, alg: str = "sha256") -> str:
        digest = digest_of(data, alg)
        resp = await self.client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest},
                                      data=data, headers={"Content-Type": "application/octet-stream"})
        assert resp.status == 201, await resp.text()
        return digest

    async def push_manifest(self, repo: str, reference: str, manifest: dict | bytes,
                            media_type: str = OCI_MANIFEST, **params) -> Any:
        body = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        resp = await self.client.put(f"/v2/{repo}/manifests/{reference}", data=body,
                                     headers={"Content-Type": media_type}, params=params or None)
        return resp

    async def push_image(self, repo: str, tag: str | None = "latest", *, layers: list[bytes] | None = None,
                         media_type: str = OCI_MANIFEST, extra: dict | None = None) -> tuple[str, bytes]:
        """Push blobs and a manifest; return (manifest digest, manifest bytes)."""
        layers = [b"layer-" + repo.encode()] if layers is None else layers
        config = json.dumps({"architecture": "amd64", "os": "linux", "repo": repo}).encode()
        docker = media_type == DOCKER_MANIFEST
        manifest = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {"mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
                       "digest": await self.push_blob(repo, config), "size": len(config)},
            "layers": [{"mediaType": DOCKER_LAYER if docker else OCI_LAYER,
                        "digest": await self.push_blob(repo, layer), "size": len(layer)}
                       for layer in layers],
            **(extra or {}),
        }
        body = json.dumps(manifest).encode()
        digest = digest_of(body)
        resp = await self.push_manifest(repo, tag or digest, body, media_type)
        assert resp.status == 201, await resp.text()
        return digest, body


def replace_section(settings, section: str, **values):
    return dataclasses.replace(settings, **{section: dataclasses.replace(getattr(settings, section), **values)})


async def raw_request(client, method: str, path: str, headers: dict[str, str] | None = None,
                      body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send a request exactly as written (no client-side path normalisation)
    to the TestClient's server."""
    return await rawhttp.raw_request((client.server.host, client.server.port), method, path,
                                     headers, body)
