"""The proxy a connection goes through, from the environment, as Docker
and skopeo (Go's net/http) read it:

    HTTPS_PROXY / https_proxy   http://[user:password@]proxy:port, for https:// registries (a CONNECT tunnel)
    HTTP_PROXY / http_proxy     the same, for plain-HTTP registries (requests name the whole URL)
    NO_PROXY / no_proxy         comma-separated: `*`, host names (`example.com` also covers its
                                subdomains, `.example.com` only them), IP addresses, CIDR ranges, each
                                with an optional :port

Loopback registries (localhost, 127.0.0.0/8, ::1) never go through a proxy,
as with Go.

    proxy = proxy_for("https", host, port)          -> Proxy | None
    sock = await open_tunnel(proxy, host, port)      a connected socket, past the proxy's 200
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import socket
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from puller.client.reference import is_loopback
from puller.errors import TransportError

MAX_PROXY_HEAD = 64 * 1024


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    authorization: str | None = None      # Proxy-Authorization, from the URL's user:password

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    def headers(self) -> list[tuple[str, str]]:
        """What a request sent to the proxy itself carries (plain HTTP)."""
        return [("Proxy-Authorization", self.authorization)] if self.authorization else []


def _env(name: str, environ) -> str:
    return environ.get(name) or environ.get(name.lower()) or ""


def _parse(value: str) -> Proxy:
    parts = urlsplit(value if "://" in value else f"http://{value}")
    if parts.scheme != "http" or not parts.hostname:
        raise TransportError(f"unsupported proxy {value!r}: expected http://HOST:PORT")
    auth = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        auth = "Basic " + base64.b64encode(pair.encode()).decode()
    return Proxy(parts.hostname, parts.port or 80, auth)


def _excluded(host: str, port: int, no_proxy: str) -> bool:
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        name, want_port = entry, None
        if entry.startswith("[") and "]" in entry:                 # [::1]:5000
            name, _, rest = entry[1:].partition("]")
            want_port = rest[1:] if rest.startswith(":") else None
        elif entry.count(":") == 1:
            name, want_port = entry.split(":")
        if want_port and want_port != str(port):
            continue
        try:
            if ipaddress.ip_address(host) in ipaddress.ip_network(name, strict=False):
                return True
            continue
        except ValueError:
            pass
        if name.startswith("."):
            if host.endswith(name):
                return True
        elif host == name or host.endswith("." + name):
            return True
    return False


def proxy_for(scheme: str, host: str, port: int, environ=os.environ) -> Proxy | None:
    if is_loopback(host):
        return None
    value = _env("HTTPS_PROXY" if scheme == "https" else "HTTP_PROXY", environ)
    if not value or _excluded(host.lower(), port, _env("NO_PROXY", environ)):
        return None
    return _parse(value)


async def open_tunnel(proxy: Proxy, host: str, port: int) -> socket.socket:
    """A TCP connection to host:port through the proxy (CONNECT, RFC 9110
    section 9.3.6). OSError when the proxy cannot be reached; TransportError
    when it refuses the tunnel (not worth a retry)."""
    loop = asyncio.get_running_loop()
    last: OSError | None = None
    sock = None
    for family, kind, proto, _, address in await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            break
        except OSError as exc:
            sock.close()
            sock, last = None, exc
    if sock is None:
        raise last or OSError(f"cannot resolve proxy {proxy.host}")
    try:
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
        if proxy.authorization:
            head += f"Proxy-Authorization: {proxy.authorization}\r\n"
        await loop.sock_sendall(sock, (head + "\r\n").encode())
        answer = b""
        # the server speaks only after our TLS hello: nothing follows the proxy's head
        while b"\r\n\r\n" not in answer:
            piece = await loop.sock_recv(sock, 4096)
            if not piece:
                raise ConnectionResetError(f"proxy {proxy} closed the connection before answering CONNECT")
            answer += piece
            if len(answer) > MAX_PROXY_HEAD:
                raise TransportError(f"proxy {proxy}: answer to CONNECT too large")
        status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
        fields = status_line.split(" ", 2)
        if len(fields) < 2 or not fields[1].isdigit() or not 200 <= int(fields[1]) < 300:
            raise TransportError(f"proxy {proxy} refused a tunnel to {authority}: {status_line.strip()}")
        return sock
    except BaseException:
        sock.close()
        raise
