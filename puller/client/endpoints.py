"""What the client knows of each registry host: the scheme it speaks, the
auth challenge of its /v2/, and the credentials to answer it with.

Scheme: HTTPS, except plain HTTP with `plain_http`, or for a loopback
registry (localhost, 127.0.0.0/8, ::1) that does not speak TLS - probed
once per host, as Docker does for insecure registries.

Credentials: those the options name for the registry (or its API host),
else Docker's config (puller.client.auth.DockerConfig).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from puller.client import policy
from puller.client.auth import ANONYMOUS, Challenge, Credentials, DockerConfig, challenges_from_headers
from puller.client.options import ClientOptions
from puller.client.reference import DOCKER_HUB, DOCKER_HUB_API, is_loopback
from puller.client.transport import Transport
from puller.errors import TransportError

PROBE_TIMEOUT = 10.0        # a TLS attempt on a plain loopback port must not hang for the read timeout


@dataclass
class Endpoint:
    base: str                                    # "https://host:port"
    challenges: list[Challenge] = field(default_factory=list)
    credentials: Credentials = ANONYMOUS


class Endpoints:
    """One Endpoint per host, probed once (concurrent callers wait for it)."""

    def __init__(self, options: ClientOptions, transport: Callable[[], Transport]):
        self.options = options
        self._transport = transport
        self._known: dict[str, Endpoint] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._docker_config = DockerConfig(options.docker_config)

    async def get(self, host: str) -> Endpoint:
        endpoint = self._known.get(host)
        if endpoint:
            return endpoint
        async with self._locks.setdefault(host, asyncio.Lock()):
            if host in self._known:
                return self._known[host]
            registry_name = DOCKER_HUB if host == DOCKER_HUB_API else host
            creds = self.options.credentials_for(registry_name) or self.options.credentials_for(host)
            if creds is None:
                creds = await asyncio.to_thread(self._docker_config.get, registry_name)
            endpoint = await self._probe(host)
            endpoint.credentials = creds
            self._known[host] = endpoint
            return endpoint

    async def _probe(self, host: str) -> Endpoint:
        """GET /v2/ to learn the scheme and the auth challenge."""
        transport = self._transport()
        schemes = ["https"]
        if self.options.plain_http:
            schemes = ["http"]
        elif is_loopback(host):
            # as Docker does for a loopback registry: TLS if it speaks TLS, else plain
            parts = urlsplit(f"//{host}")
            if await transport.speaks_tls(parts.hostname, parts.port or 443, timeout=PROBE_TIMEOUT):
                schemes = ["https", "http"]
            else:
                schemes = ["http"]
        last: Exception | None = None
        for scheme in schemes:
            base = f"{scheme}://{host}"
            timeout = PROBE_TIMEOUT if len(schemes) > 1 and scheme == "https" else None
            try:
                async with transport.request("GET", f"{base}/v2/", headers=policy.IDENTITY,
                                             timeout=timeout) as response:
                    await response.read(64 * 1024)
                    challenges = challenges_from_headers(response.headers.getall("WWW-Authenticate"))
                    return Endpoint(base=base, challenges=challenges if response.status == 401 else [])
            except policy.TRANSIENT_ERRORS as exc:
                last = exc  # e.g. TLS spoken to a plain HTTP loopback registry
                continue
        raise TransportError(f"cannot reach registry {host}: {policy.describe(last)}") from last
