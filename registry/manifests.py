"""Manifest handlers: GET/HEAD/PUT/DELETE by tag or digest.

The bytes and the Content-Type are returned exactly as pushed: no
conversion, whatever the Accept header says (as Distribution does for
every manifest type it still serves).
"""

from __future__ import annotations

from aiohttp import web

from registry.lifecycle import ImmutableTags, guard_manifest_delete, guard_manifest_put
from registry.protocol import (DIGEST_HEADER, OCI_SUBJECT_HEADER, OCI_TAG_HEADER, absolute,
                               manifest_path, read_limited)
from registry.state import SETTINGS, STORE
from storage.manifests import Manifest
from storage.oci.errors import ManifestTooLarge, Unsupported
from storage.oci.names import parse_digest, validate_name, validate_tag

# Clients may send more tags with ?tag= than this; the URL length limit
# (aiohttp: 8 KiB request line) answers first anyway.
MAX_TAGS_PER_PUSH = 100


def _name_and_reference(request: web.Request) -> tuple[str, str]:
    name = request.match_info["name"]
    reference = request.match_info["reference"]
    validate_name(name)
    if ":" in reference:
        parse_digest(reference)
    else:
        validate_tag(reference)
    return name, reference


async def get_manifest(request: web.Request) -> web.Response:
    name, reference = _name_and_reference(request)
    return manifest_response(request, await request.app[STORE].manifests.get(name, reference))


def manifest_response(request: web.Request, manifest: Manifest) -> web.Response:
    """The GET/HEAD answer for a manifest (also the pull-through cache's)."""
    etag = f'"{manifest.digest}"'
    headers = {
        "Content-Type": manifest.media_type,
        DIGEST_HEADER: manifest.digest,
        "ETag": etag,
    }
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    if request.method == "HEAD":
        headers["Content-Length"] = str(len(manifest.body))
        return web.Response(status=200, headers=headers)
    return web.Response(status=200, body=manifest.body, headers=headers)


async def put_manifest(request: web.Request) -> web.Response:
    name, reference = _name_and_reference(request)
    settings = request.app[SETTINGS]
    tags = request.query.getall("tag", [])
    for tag in tags:
        validate_tag(tag)
    tags = list(dict.fromkeys(tags))[:MAX_TAGS_PER_PUSH]
    limit = settings.limits.max_manifest_bytes
    body = await read_limited(request, limit, ManifestTooLarge(
        f"manifest larger than {limit} bytes", {"limit": limit}))
    media_type = request.headers.get("Content-Type", "").split(";", 1)[0].strip()
    await guard_manifest_put(request.app[STORE], ImmutableTags.parse(settings.lifecycle.immutable_tags), name,
                             ([] if ":" in reference else [reference]) + tags, body)
    result = await request.app[STORE].manifests.put(name, reference, body, media_type,
                                                   extra_tags=tags)
    headers = {
        "Location": absolute(request, manifest_path(name, result.digest)),
        DIGEST_HEADER: result.digest,
    }
    if result.subject:
        headers[OCI_SUBJECT_HEADER] = result.subject
    if tags:
        headers[OCI_TAG_HEADER] = ", ".join(tags)
    return web.Response(status=201, headers=headers)


async def delete_manifest(request: web.Request) -> web.Response:
    name, reference = _name_and_reference(request)
    if not request.app[SETTINGS].storage.delete_enabled:
        raise Unsupported("deletion is disabled on this registry")
    await guard_manifest_delete(request.app[STORE],
                                ImmutableTags.parse(request.app[SETTINGS].lifecycle.immutable_tags), name, reference)
    await request.app[STORE].manifests.delete(name, reference)
    return web.Response(status=202)
