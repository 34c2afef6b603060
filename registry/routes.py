"""Every route of the registry, in one table.

Repository names contain slashes, so `name` matches greedily (`.+`) and
the fixed suffix decides: the regex backtracks from the right, so a
repository called "a/blobs", "a/manifests" or "a/tags" still routes by its
last fixed segment ("/v2/a/blobs/blobs/<digest>" is a blob of "a/blobs").
The name is then checked against the spec grammar by the handler
(NAME_INVALID), rather than by the route (which could only say 404).

The last column is the access a route needs; the auth middleware
(registry/auth/gate.py) checks it, once, for every route here.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from aiohttp import web

from registry import blobs, discovery, manifests, uploads
from registry.proxy import handlers as pull_through   # GET/HEAD: cache or ordinary
from registry.auth.gate import BASE, CATALOG_ACTION, DELETE, PULL, PUSH, ROUTE_ACTIONS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

NAME = "{name:.+}"
SEGMENT = "[^/]+"

# (method, path, handler): consecutive rows with the same path share one resource.
ROUTES: tuple[tuple[str, str, Handler, str], ...] = (
    ("GET", "/v2/", discovery.base, BASE),
    ("HEAD", "/v2/", discovery.base, BASE),
    ("GET", "/v2/_catalog", discovery.catalog, CATALOG_ACTION),

    ("GET", f"/v2/{NAME}/tags/list", discovery.list_tags, PULL),

    ("GET", f"/v2/{NAME}/manifests/{{reference:{SEGMENT}}}", pull_through.get_manifest, PULL),
    ("HEAD", f"/v2/{NAME}/manifests/{{reference:{SEGMENT}}}", pull_through.get_manifest, PULL),
    ("PUT", f"/v2/{NAME}/manifests/{{reference:{SEGMENT}}}", manifests.put_manifest, PUSH),
    ("DELETE", f"/v2/{NAME}/manifests/{{reference:{SEGMENT}}}", manifests.delete_manifest, DELETE),

    ("POST", f"/v2/{NAME}/blobs/uploads/", uploads.start_upload, PUSH),
    ("POST", f"/v2/{NAME}/blobs/uploads", uploads.start_upload, PUSH),
    ("GET", f"/v2/{NAME}/blobs/uploads/{{upload_id:{SEGMENT}}}", uploads.upload_status, PUSH),
    ("PATCH", f"/v2/{NAME}/blobs/uploads/{{upload_id:{SEGMENT}}}", uploads.patch_upload, PUSH),
    ("PUT", f"/v2/{NAME}/blobs/uploads/{{upload_id:{SEGMENT}}}", uploads.finish_upload, PUSH),
    ("DELETE", f"/v2/{NAME}/blobs/uploads/{{upload_id:{SEGMENT}}}", uploads.cancel_upload, PUSH),

    ("GET", f"/v2/{NAME}/blobs/{{digest:{SEGMENT}}}", pull_through.get_blob, PULL),
    ("HEAD", f"/v2/{NAME}/blobs/{{digest:{SEGMENT}}}", pull_through.get_blob, PULL),
    ("DELETE", f"/v2/{NAME}/blobs/{{digest:{SEGMENT}}}", blobs.delete_blob, DELETE),

    ("GET", f"/v2/{NAME}/referrers/{{digest:{SEGMENT}}}", discovery.referrers, PULL),
)


def add_routes(app: web.Application) -> None:
    actions = {}
    for method, path, handler, access in ROUTES:
        actions[app.router.add_route(method, path, handler)] = access
    app[ROUTE_ACTIONS] = actions
