"""Every route of the registry, in one table.

Repository names contain slashes, so `name` matches greedily (`.+`) and
the fixed suffix decides: the regex backtracks from the right, so a
repository called "a/blobs", "a/manifests" or "a/tags" still routes by its
last fixed segment ("/v2/a/blobs/blobs/<digest>" is a blob of "a/blobs").
The name is then checked against the spec grammar by the handler
(NAME_INVALID), rather than by the route (which could only say 404).
"""

from __future__ import annotations

from typing import Awaitable, Callable

from aiohttp import web

from registry import blobs, discovery, manifests, uploads

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

NAME = "{name:.+}"
SEGMENT = "[^/]+"

# (method, path, handler): consecutive rows with the same path share one resource.
ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/v2/", discovery.base),
    ("HEAD", "/v2/", discovery.base),
    ("GET", "/v2/_catalog", discovery.catalog),

    ("GET", f"/v2/{NAME}/tags/list", discovery.list_tags),

    ("GET", f"/v2/{NAME}/manifests/{{reference:{SEGMENT}}}", manifests.get_manifest),
    ("HEAD", f"/v2/{NAME}/manifests/{{reference:{SEGMENT}}}", manifests.get_manifest),
    ("PUT", f"/v2/{NAME}/manifests/{{reference:{SEGMENT}}}", manifests.put_manifest),
    ("DELETE", f"/v2/{NAME}/manifests/{{reference:{SEGMENT}}}", manifests.delete_manifest),

    ("POST", f"/v2/{NAME}/blobs/uploads/", uploads.start_upload),
    ("POST", f"/v2/{NAME}/blobs/uploads", uploads.start_upload),
    ("GET", f"/v2/{NAME}/blobs/uploads/{{upload_id:{SEGMENT}}}", uploads.upload_status),
    ("PATCH", f"/v2/{NAME}/blobs/uploads/{{upload_id:{SEGMENT}}}", uploads.patch_upload),
    ("PUT", f"/v2/{NAME}/blobs/uploads/{{upload_id:{SEGMENT}}}", uploads.finish_upload),
    ("DELETE", f"/v2/{NAME}/blobs/uploads/{{upload_id:{SEGMENT}}}", uploads.cancel_upload),

    ("GET", f"/v2/{NAME}/blobs/{{digest:{SEGMENT}}}", blobs.get_blob),
    ("HEAD", f"/v2/{NAME}/blobs/{{digest:{SEGMENT}}}", blobs.get_blob),
    ("DELETE", f"/v2/{NAME}/blobs/{{digest:{SEGMENT}}}", blobs.delete_blob),

    ("GET", f"/v2/{NAME}/referrers/{{digest:{SEGMENT}}}", discovery.referrers),
)


def add_routes(app: web.Application) -> None:
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
