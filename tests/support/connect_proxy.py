"""A small forward proxy for the client's HTTPS_PROXY and HTTP_PROXY
support, on loopback, in a thread of the test process: CONNECT tunnels
(RFC 9110 section 9.3.6), and plain-HTTP requests in absolute-form (RFC
9112 section 3.2.2), each client connection relayed to the origin its
first request names (a client keeps one connection per origin).

    with ConnectProxy(hosts={"registry.test": "127.0.0.1"}) as proxy:
        proxy.url                 "http://127.0.0.1:PORT" (HTTPS_PROXY)
        proxy.tunnels             ["registry.test:5000", ...]: what clients asked to reach (CONNECT)
        proxy.forwarded           ["GET http://registry.test:5000/v2/", ...]: absolute-form requests
        proxy.bytes_relayed

`hosts` is the proxy's own name resolution (the connected side of an air
gap resolves names at its proxy, not on the machine); a name it lacks is
resolved by the system. `require_auth="user:password"` answers 407 to a
CONNECT without those Basic credentials. Every tunnel is bounded: a
connection idle for `idle_timeout` seconds is closed.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Mapping

MAX_HEAD = 16 * 1024


class ConnectProxy:
    def __init__(self, hosts: Mapping[str, str] | None = None, require_auth: str | None = None,
                 idle_timeout: float = 30.0):
        self.hosts = dict(hosts or {})
        self.require_auth = require_auth
        self.idle_timeout = idle_timeout
        self.tunnels: list[str] = []
        self.forwarded: list[str] = []
        self.refused: list[str] = []
        self.bytes_relayed = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="connect-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ConnectProxy":
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, "127.0.0.1", 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def shutdown():
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "ConnectProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle_timeout)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, OSError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        authority = rest.split(" ", 1)[0]
        fields = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}
        plain = method != "CONNECT"
        if plain:
            if not authority.startswith("http://"):
                self.refused.append(lines[0])
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
                writer.close()
                return
            self.forwarded.append(f"{method} {authority}")
            authority = authority[len("http://"):].split("/", 1)[0]
            if ":" not in authority.rpartition("]")[2]:
                authority += ":80"
        if self.require_auth:
            expected = "Basic " + base64.b64encode(self.require_auth.encode()).decode()
            if fields.get("proxy-authorization") != expected:
                self.refused.append(authority)
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                             b"Proxy-Authenticate: Basic realm=\"proxy\"\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                writer.close()
                return
        name, _, port = authority.rpartition(":")
        name = name.strip("[]")
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(self.hosts.get(name, name), int(port)), self.idle_timeout)
        except (OSError, ValueError, asyncio.TimeoutError):
            self.refused.append(authority)
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        if plain:
            up_writer.write(head)            # origin servers take absolute-form too (RFC 9112 3.2.2)
        else:
            self.tunnels.append(authority)
            writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            await writer.drain()
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer),
                             return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await asyncio.wait_for(reader.read(256 * 1024), self.idle_timeout):
                self.bytes_relayed += len(data)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()
