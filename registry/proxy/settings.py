"""The `proxy:` section: upstream registries whose repositories this
registry serves as a pull-through cache.

    proxy:
      upstreams:
        - prefix: hub                  # local repositories hub/** come from it
          url: https://registry-1.docker.io
          namespace: docker.io         # the ?ns= value (containerd mirrors) that selects it
          username: someone            # optional; also DOCKYARD_PROXY_UPSTREAM_HUB_USERNAME
          password: secret             # or password_file, or DOCKYARD_PROXY_UPSTREAM_HUB_PASSWORD
          revalidate: 300              # seconds a cached tag is trusted before one HEAD upstream
      default: hub                     # unprefixed names (Docker's registry-mirrors)
      allow_hosts: ["registry-1.docker.io", "auth.docker.io", "*.cloudflare.docker.com"]

Checked once at start (`check_proxy`): every problem is a one-line
SettingsError naming the key. Secrets never appear in a repr or a message.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import urlsplit

# The hosts Docker Hub answers on; the `library/` rule applies to them.
DOCKER_HUB_HOSTS = ("registry-1.docker.io", "index.docker.io", "docker.io")
DOCKER_HUB_NAMESPACE = "docker.io"
_PREFIX_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
ENV_CREDENTIALS = "DOCKYARD_PROXY_UPSTREAM_{}_{}"
CREDENTIALS_ENV_PREFIX = "DOCKYARD_PROXY_UPSTREAM_"


class ProxyConfigError(ValueError):
    """A bad `proxy.*` value (the settings loader words it as a SettingsError)."""


@dataclass(frozen=True)
class UpstreamSettings:
    prefix: str = ""               # local repository prefix: "hub" serves hub/**
    url: str = ""                  # http(s)://host[:port] of the upstream registry
    namespace: str = ""            # the ns= value that selects this upstream ("docker.io")
    username: str = ""
    password: str = field(default="", repr=False)
    password_file: str = ""        # a file holding the password (a mounted secret)
    revalidate: int = 300          # seconds a cached tag is served without asking upstream
    timeout: int = 15              # seconds to connect, and between two reads, upstream
    repositories: tuple[str, ...] = ()   # upstream repository globs served; empty: all

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc.lower()

    @property
    def docker_hub(self) -> bool:
        """Docker Hub's naming rules apply: a one-component name is library/NAME."""
        return (urlsplit(self.url).hostname or "") in DOCKER_HUB_HOSTS or \
            self.namespace.lower() == DOCKER_HUB_NAMESPACE

    def serves(self, remote: str) -> bool:
        return not self.repositories or any(fnmatch.fnmatchcase(remote, g) for g in self.repositories)


@dataclass(frozen=True)
class ProxySettings:
    upstreams: tuple[UpstreamSettings, ...] = ()
    default: str = ""              # prefix of the upstream unprefixed names come from
    # Hosts the cache may contact, for upstreams and the redirects they send
    # ("host", "host:port", "*.domain"). Empty: each upstream's own host only,
    # and redirects only back to it.
    allow_hosts: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.upstreams)


def host_allowed(host: str, port: int | None, allow_hosts: tuple[str, ...]) -> bool:
    """True when host (lower-case name or address) and port match an entry."""
    host = host.lower().strip("[]")
    for entry in allow_hosts:
        name, entry_port = _split_entry(entry.lower().strip())
        if entry_port and port is not None and entry_port != str(port):
            continue
        if name.startswith("*."):
            if host.endswith(name[1:]) and host != name[2:]:
                return True
        elif host == name:
            return True
    return False


def _split_entry(entry: str) -> tuple[str, str]:
    """("host", "port" or "") of "host", "host:port", "[v6]" or "[v6]:port"."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, port
    return entry, ""


def check_proxy(proxy: ProxySettings) -> None:
    """ProxyConfigError for the first bad value."""
    prefixes: set[str] = set()
    namespaces: set[str] = set()
    for i, up in enumerate(proxy.upstreams):
        key = f"proxy.upstreams[{i}]"
        if not up.prefix or not _PREFIX_RE.match(up.prefix):
            raise ProxyConfigError(f"{key}.prefix must be a repository path like 'hub' or 'ghcr/org', "
                                   f"got {up.prefix!r}")
        for other in prefixes:
            if up.prefix == other or up.prefix.startswith(other + "/") or other.startswith(up.prefix + "/"):
                raise ProxyConfigError(f"{key}.prefix {up.prefix!r} overlaps the prefix {other!r}")
        prefixes.add(up.prefix)
        try:
            parts = urlsplit(up.url)
            parts.port
        except ValueError:
            raise ProxyConfigError(f"{key}.url is not a valid URL: {up.url!r}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ProxyConfigError(f"{key}.url must be an http(s)://host[:port] URL, got {up.url!r}")
        if parts.path.strip("/") or parts.query or parts.username or parts.password:
            raise ProxyConfigError(f"{key}.url must be scheme://host[:port] only (no path, query or "
                                   f"user), got {parts.scheme}://{parts.hostname}...")
        if proxy.allow_hosts and not host_allowed(parts.hostname, parts.port or _default_port(parts.scheme),
                                                  proxy.allow_hosts):
            raise ProxyConfigError(f"{key}.url host {parts.hostname} is not in proxy.allow_hosts")
        if up.namespace:
            ns = up.namespace.lower()
            if ns in namespaces:
                raise ProxyConfigError(f"{key}.namespace {up.namespace!r} names two upstreams")
            namespaces.add(ns)
        if up.revalidate < 0:
            raise ProxyConfigError(f"{key}.revalidate must be 0 or more seconds")
        if up.timeout < 1:
            raise ProxyConfigError(f"{key}.timeout must be at least 1 second")
        if up.password and up.password_file:
            raise ProxyConfigError(f"{key}: set password or password_file, not both")
    if proxy.default and proxy.default not in prefixes:
        raise ProxyConfigError(f"proxy.default {proxy.default!r} is not the prefix of an upstream")


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def _env_name(prefix: str, what: str) -> str:
    return ENV_CREDENTIALS.format(re.sub(r"[^A-Za-z0-9]", "_", prefix).upper(), what)


def check_credentials_env(proxy: ProxySettings, environ: Mapping[str, str]) -> None:
    """ProxyConfigError for a DOCKYARD_PROXY_UPSTREAM_* variable that names
    no configured upstream's USERNAME or PASSWORD (a typo would otherwise
    pull anonymously)."""
    known = {_env_name(up.prefix, what) for up in proxy.upstreams for what in ("USERNAME", "PASSWORD")}
    for name in sorted(environ):
        if name.startswith(CREDENTIALS_ENV_PREFIX) and name not in known:
            raise ProxyConfigError(f"unknown environment variable {name} (not the USERNAME or PASSWORD "
                                   f"of a proxy.upstreams prefix)")


def upstream_credentials(up: UpstreamSettings, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(username, password) of an upstream: DOCKYARD_PROXY_UPSTREAM_<PREFIX>_USERNAME /
    _PASSWORD over the file's keys, password_file read now. ProxyConfigError
    when the file cannot be read (its content never in the message)."""
    environ = os.environ if environ is None else environ
    username = environ.get(_env_name(up.prefix, "USERNAME"), up.username)
    password = environ.get(_env_name(up.prefix, "PASSWORD"), "")
    if not password and up.password_file:
        try:
            with open(up.password_file, encoding="utf-8") as handle:
                password = handle.read().rstrip("\r\n")
        except OSError as exc:
            raise ProxyConfigError(f"proxy upstream {up.prefix}: cannot read password_file "
                                   f"{up.password_file}: {exc.strerror or exc}") from None
    elif not password:
        password = up.password
    if password and not username:
        raise ProxyConfigError(f"proxy upstream {up.prefix}: a password needs a username")
    return username, password
