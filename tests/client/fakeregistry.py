"""A small fault-injecting registry for client tests (real HTTP on loopback).

It serves manifests and blobs the way the distribution spec says (Range,
Docker-Content-Digest, 401 challenges) and can misbehave on purpose:
serve bytes that do not match a digest, drop the connection in the middle of
a blob, redirect blob downloads to another origin, be slow, demand Basic auth.
Every request is recorded (method, path, headers) so tests can check what
the client really sent, and so is the largest number of client connections
open at once (`peak_connections`).
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass, field

from aiohttp import web

from tests.support.content import OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST
from tests.support.content import sha256_digest as digest

__all__ = ["OCI_CONFIG", "OCI_INDEX", "OCI_LAYER", "OCI_MANIFEST", "FakeRegistry", "Recorded", "cdn_app",
           "digest", "serve_blob", "start_app"]


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict


@dataclass
class FakeRegistry:
    manifests: dict = field(default_factory=dict)     # (repo, ref) -> (bytes, media type)
    blobs: dict = field(default_factory=dict)         # digest -> bytes
    corrupt: set = field(default_factory=set)         # digests served with wrong bytes
    oversize: set = field(default_factory=set)        # digests served with extra bytes at the end
    chunked: set = field(default_factory=set)         # digests served without Content-Length (chunked)
    drop_after: dict = field(default_factory=dict)    # digest -> byte count; drop once there
    slow: dict = field(default_factory=dict)          # digest -> seconds to wait per 64 KiB
    redirect_blobs_to: str | None = None              # base URL of another origin
    basic_auth: tuple[str, str] | None = None
    challenge: str | None = None                      # a WWW-Authenticate to answer every request with
    honour_range: bool = True
    requests: list = field(default_factory=list)
    peak_connections: int = 0
    _open: set = field(default_factory=set, repr=False)   # server-side transports of client connections

    # -- content -----------------------------------------------------------------
    def add_blob(self, data: bytes) -> dict:
        self.blobs[digest(data)] = data
        return {"digest": digest(data), "size": len(data)}

    def add_image(self, repo: str, tag: str, layers: list[bytes], *, platform: dict | None = None,
                  raw_manifest: bytes | None = None) -> dict:
        config = json.dumps({"architecture": (platform or {}).get("architecture", "amd64"),
                             "os": "linux", "rootfs": {"type": "layers",
                                                       "diff_ids": [digest(l) for l in layers]}}).encode()
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, **self.add_blob(config)},
                    "layers": [{"mediaType": OCI_LAYER, **self.add_blob(l)} for l in layers]}
        body = raw_manifest if raw_manifest is not None else json.dumps(manifest).encode()
        self.manifests[(repo, tag)] = (body, OCI_MANIFEST)
        self.manifests[(repo, digest(body))] = (body, OCI_MANIFEST)
        desc = {"mediaType": OCI_MANIFEST, "digest": digest(body), "size": len(body)}
        if platform:
            desc["platform"] = platform
        return desc

    def add_index(self, repo: str, tag: str, children: list[dict]) -> dict:
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}).encode()
        self.manifests[(repo, tag)] = (body, OCI_INDEX)
        self.manifests[(repo, digest(body))] = (body, OCI_INDEX)
        return {"mediaType": OCI_INDEX, "digest": digest(body), "size": len(body)}

    def count(self, method: str, fragment: str) -> int:
        return sum(1 for r in self.requests if r.method == method and fragment in r.path)

    # -- HTTP --------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record, self._auth])
        app.router.add_get("/v2/", self._base)
        app.router.add_route("*", r"/v2/{name:.+}/manifests/{ref}", self._manifest)
        app.router.add_route("*", r"/v2/{name:.+}/blobs/{digest}", self._blob)
        return app

    @web.middleware
    async def _record(self, request, handler):
        self.requests.append(Recorded(request.method, request.path_qs, dict(request.headers)))
        if request.transport is not None:
            # a new connection always carries a request at once: counting here sees every peak
            self._open = {t for t in self._open if not t.is_closing()}
            self._open.add(request.transport)
            self.peak_connections = max(self.peak_connections, len(self._open))
        return await handler(request)

    @web.middleware
    async def _auth(self, request, handler):
        if self.challenge and not request.headers.get("Authorization"):
            return web.json_response({"errors": [{"code": "UNAUTHORIZED", "message": "token required"}]},
                                     status=401, headers={"WWW-Authenticate": self.challenge})
        if self.basic_auth:
            expected = "Basic " + base64.b64encode(":".join(self.basic_auth).encode()).decode()
            if request.headers.get("Authorization") != expected:
                return web.json_response({"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                                         status=401, headers={"WWW-Authenticate": 'Basic realm="fake, registry"'})
        return await handler(request)

    async def _base(self, request):
        return web.json_response({})

    async def _manifest(self, request):
        key = (request.match_info["name"], request.match_info["ref"])
        if key not in self.manifests:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]},
                                     status=404)
        body, media_type = self.manifests[key]
        headers = {"Content-Type": media_type, "Docker-Content-Digest": digest(body)}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(body))})
        return web.Response(body=body, headers=headers)

    async def _blob(self, request):
        blob_digest = request.match_info["digest"]
        if blob_digest not in self.blobs:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown"}]},
                                     status=404)
        if self.redirect_blobs_to and request.method == "GET":
            raise web.HTTPTemporaryRedirect(f"{self.redirect_blobs_to}/cdn/{blob_digest}")
        return await serve_blob(self, request, blob_digest)


async def serve_blob(registry: FakeRegistry, request: web.Request, blob_digest: str) -> web.StreamResponse:
    data = registry.blobs[blob_digest]
    if blob_digest in registry.corrupt:
        data = bytes([data[0] ^ 0xFF]) + data[1:]
    if blob_digest in registry.oversize:
        data = data + b"and some more bytes than the descriptor said"
    start = 0
    status = 200
    rng = request.headers.get("Range")
    if rng and registry.honour_range and rng.startswith("bytes="):
        start = int(rng[6:].split("-")[0])
        status = 206
    headers = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": blob_digest,
               "Content-Length": str(len(data) - start), "Accept-Ranges": "bytes"}
    if blob_digest in registry.chunked and request.method == "GET":
        del headers["Content-Length"]
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
    if request.method == "HEAD":
        return web.Response(status=200, headers=headers)
    response = web.StreamResponse(status=status, headers=headers)
    await response.prepare(request)
    drop_at = registry.drop_after.pop(blob_digest, None)
    delay = registry.slow.get(blob_digest, 0)
    position = start
    step = 64 * 1024
    while position < len(data):
        end = min(position + step, len(data))
        if drop_at is not None and end >= drop_at > position:
            await response.write(data[position:drop_at])
            await asyncio.sleep(0.05)
            request.transport.close()  # the registry "crashes" mid-layer
            raise asyncio.CancelledError()
        await response.write(data[position:end])
        position = end
        if delay:
            await asyncio.sleep(delay)
    await response.write_eof()
    return response


def cdn_app(registry: FakeRegistry) -> web.Application:
    """Another origin that serves blobs (where the registry redirects)."""
    async def handler(request):
        registry.requests.append(Recorded(request.method, "cdn:" + request.path_qs, dict(request.headers)))
        return await serve_blob(registry, request, request.match_info["digest"])
    app = web.Application()
    app.router.add_get("/cdn/{digest}", handler)
    return app


async def start_app(app: web.Application, host: str = "127.0.0.1",
                    ssl_context=None) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0, ssl_context=ssl_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"{host}:{port}"
