"""Which upstream serves a repository, and under which names.

    hub/library/debian            -> upstream "hub", library/debian upstream
    hub/debian                    -> library/debian (Docker Hub's rule, as Docker spells it)
    library/debian?ns=docker.io   -> the upstream whose namespace is docker.io
    debian (proxy.default = hub)  -> the default upstream, unless a local repository has the name

The cache keeps what it fetched under one local name per upstream
repository (`<prefix>/<upstream name>`), so hub/debian, hub/library/debian
and library/debian?ns=docker.io share one cached copy, listed in the
catalog like any repository.
"""

from __future__ import annotations

from dataclasses import dataclass

from registry.proxy.settings import ProxySettings, UpstreamSettings
from storage.oci.errors import Denied, NameInvalid
from storage.oci.names import validate_name


@dataclass(frozen=True)
class Route:
    upstream: UpstreamSettings
    local: str                   # repository in storage: "hub/library/debian"
    remote: str                  # repository upstream: "library/debian"
    namespace: str | None = None  # the ns= value honoured, echoed as OCI-Namespace


class Router:
    def __init__(self, proxy: ProxySettings):
        self.proxy = proxy
        # longest prefix first, so "ghcr/org" wins over a hypothetical "ghcr"
        self._by_prefix = sorted(proxy.upstreams, key=lambda u: -len(u.prefix))
        self._by_namespace = {u.namespace.lower(): u for u in proxy.upstreams if u.namespace}
        self.default = next((u for u in proxy.upstreams if u.prefix == proxy.default), None)

    def prefixed(self, name: str) -> UpstreamSettings | None:
        """The upstream whose prefix the local name is under."""
        for up in self._by_prefix:
            if name.startswith(up.prefix + "/"):
                return up
        return None

    def by_namespace(self, ns: str | None) -> UpstreamSettings | None:
        return self._by_namespace.get(ns.lower()) if ns else None

    def route(self, up: UpstreamSettings, remote: str, namespace: str | None = None) -> Route:
        """The route of an upstream name; Denied when the upstream does not serve it."""
        if up.docker_hub and "/" not in remote:
            remote = f"library/{remote}"
        local = f"{up.prefix}/{remote}"
        try:
            validate_name(local)
        except NameInvalid:
            raise NameInvalid(f"invalid repository name {local!r}", {"name": local}) from None
        if not up.serves(remote):
            raise Denied(f"repository {remote} is not served by the upstream {up.prefix}",
                         {"name": remote})
        return Route(up, local, remote, namespace)

    def for_prefixed(self, name: str) -> Route | None:
        up = self.prefixed(name)
        if up is None:
            return None
        return self.route(up, name[len(up.prefix) + 1:])
