"""The registry client library: references, transport, auth and the token
flow, endpoints, and the distribution API over them (puller.client.http).

It holds no command-line wording and prints nothing, so the server can
fetch through it too (a pull-through cache); the CLI is puller.cli.

    from puller.client import RegistryClient, ClientOptions, parse_reference

Names are loaded on first use: `import puller.client.reference` must not
pay for the HTTP stack.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RegistryClient": "puller.client.http", "FetchedManifest": "puller.client.http",
    "ClientOptions": "puller.client.options",
    "Reference": "puller.client.reference", "parse_reference": "puller.client.reference",
    "Credentials": "puller.client.auth", "DockerConfig": "puller.client.auth",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'puller.client' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_EXPORTS)
