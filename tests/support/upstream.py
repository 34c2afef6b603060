"""An upstream for the pull-through cache tests: CNCF Distribution with its
access log on (so the tests count what reached it), images pushed into it,
and a tampering front for the faults a real upstream or network gives.

    upstream = launch_upstream(workdir)                 # RegistryServer, access log on
    image = push_image(upstream.url, "library/app", "v1", [layer1, layer2])
    upstream_requests(upstream, "GET", f"/v2/library/app/blobs/{digest}")   # from its log

    front = TamperFront(upstream.url)                   # in-process aiohttp, loopback
    await front.start()
    front.mode = "corrupt" | "cut" | "redirect" | "challenge" | "pass"
    front.authorizations                                # Authorization of each request it saw
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import aiohttp
from aiohttp import web

from tests.support.content import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, sha256_digest
from tests.support.launch import RegistryServer, launch_distribution
from tests.support.registry_http import push_blob, put_manifest

_ACCESS_LINE = re.compile(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d{3})')


def launch_upstream(workdir: str | Path, *, auth=None) -> RegistryServer:
    """Distribution on loopback with an access log line per request."""
    return launch_distribution(workdir, auth=auth, log_level="info",
                               config={"log": {"accesslog": {"disabled": False}}})


def upstream_requests(server: RegistryServer, method: str, path: str) -> int:
    """How many `method path` requests (query ignored) Distribution's access log shows."""
    count = 0
    for line in server.log().splitlines():
        match = _ACCESS_LINE.search(line)
        if match and match.group(1) == method and match.group(2).split("?", 1)[0] == path:
            count += 1
    return count


@dataclass(frozen=True)
class PushedImage:
    repo: str
    tag: str
    digest: str                  # of the manifest
    manifest: bytes
    config: str
    layers: tuple[str, ...]      # digests

    @property
    def blobs(self) -> tuple[str, ...]:
        return (self.config, *self.layers)


def push_image(base_url: str, repo: str, tag: str, layers: Sequence[bytes],
               label: str = "") -> PushedImage:
    """An OCI image pushed by hand over HTTP (headers and auth as the caller's URL allows)."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Labels": {"t": label}},
                         "rootfs": {"type": "layers", "diff_ids": [sha256_digest(l) for l in layers]}},
                        sort_keys=True).encode()
    config_digest = push_blob(base_url, repo, config)
    layer_digests = tuple(push_blob(base_url, repo, layer) for layer in layers)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": len(l)}
                   for d, l in zip(layer_digests, layers)],
    }, sort_keys=True).encode()
    result = put_manifest(base_url, repo, tag, manifest)
    assert result.status == 201, (result.status, result.body[:300])
    return PushedImage(repo, tag, sha256_digest(manifest), manifest, config_digest, layer_digests)


class TamperFront:
    """A reverse proxy in front of an upstream that, for blob GETs, can
    corrupt one byte ("corrupt"), close the connection half way ("cut"),
    or redirect to `redirect_to` + the same path ("redirect"); "challenge"
    answers every request 401 with a bearer challenge whose token server is
    at `redirect_to`. Every
    request's Authorization header is recorded, by the Host it was sent to."""

    def __init__(self, upstream_url: str, host: str = "127.0.0.1"):
        self.upstream_url = upstream_url.rstrip("/")
        self.host = host
        self.mode = "pass"
        self.redirect_to = ""
        self.authorizations: list[tuple[str, str | None]] = []     # (Host, Authorization)
        self.blob_gets = 0
        self.delay = 0.0             # seconds slept after each 64 KiB of a blob body
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> "TamperFront":
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self._session = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        self.authorizations.append((request.host, request.headers.get("Authorization")))
        if self.mode == "challenge":
            # a bearer challenge naming the token server at redirect_to
            return web.Response(status=401, headers={
                "WWW-Authenticate": f'Bearer realm="{self.redirect_to}/token",service="up"'})
        is_blob_get = request.method == "GET" and "/blobs/sha256:" in request.path
        if is_blob_get:
            self.blob_gets += 1
        if is_blob_get and self.mode == "redirect":
            return web.Response(status=307, headers={"Location": self.redirect_to + request.path_qs})
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        body = await request.read()
        async with self._session.request(request.method, self.upstream_url + request.path_qs,
                                         headers=headers, data=body or None,
                                         allow_redirects=False) as upstream:
            out_headers = {k: v for k, v in upstream.headers.items()
                           if k.lower() not in ("transfer-encoding", "connection", "content-encoding")}
            location = out_headers.get("Location")
            if location and location.startswith(self.upstream_url):
                out_headers["Location"] = self.url + location[len(self.upstream_url):]
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            if request.method == "HEAD":
                await response.prepare(request)
                return response
            await response.prepare(request)
            sent = 0
            total = upstream.content_length or 0
            async for piece in upstream.content.iter_chunked(64 * 1024):
                if is_blob_get and self.mode == "cut" and sent + len(piece) >= total // 2:
                    await response.write(piece[: max(total // 2 - sent, 0)])
                    request.transport.abort()
                    return response
                if is_blob_get and self.mode == "corrupt" and sent <= total // 2 < sent + len(piece):
                    at = total // 2 - sent
                    piece = piece[:at] + bytes([piece[at] ^ 0xFF]) + piece[at + 1:]
                sent += len(piece)
                await response.write(piece)
                if is_blob_get and self.delay:
                    await asyncio.sleep(self.delay)
            await response.write_eof()
            return response
