"""The few distribution API reads the mirror needs beyond the client
library's: tags and catalog lists (and the references an images file's
patterns pick from them: expand) (paged by `n` and the Link header,
distribution spec "Listing Tags" / "Listing Repositories"), and a HEAD
that says whether a manifest is present without fetching it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

from puller.client.auth import Scope
from puller.client.http import RegistryClient, read_document
from puller.client.reference import Reference
from puller.errors import ContentError
from puller.oci import parse_json_object
from storage.oci import media

if TYPE_CHECKING:          # the images file (and yaml) is not for an import's start-up
    from puller.transfer.mirror.images_file import Selection

PAGE = 1000
MAX_PAGES = 10_000                  # a registry that pages forever ends the listing with an error
_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


def _next_page(response, host: str) -> str | None:
    link = response.headers.get("Link")
    match = _NEXT.search(link or "")
    if not match:
        return None
    target = urljoin(response.url, match.group(1))
    parts = urlsplit(target)
    # the next page is asked of the same registry, by path: never another host
    return parts.path + (f"?{parts.query}" if parts.query else "")


async def _paged(client: RegistryClient, host: str, path: str, key: str, scopes: list[Scope],
                 what: str) -> list[str]:
    out: list[str] = []
    url: str | None = f"{path}?n={PAGE}"
    for _ in range(MAX_PAGES):
        async with client.request("GET", host, url, scopes=scopes) as response:
            if response.status != 200:
                raise await client.error_for(response, what)
            doc = parse_json_object(await read_document(response, client.options.max_manifest_size, what), what)
            url = _next_page(response, host)
        items = doc.get(key) or []
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ContentError(f"{what}: {key} is not a list of strings")
        out += items
        if url is None:
            return out
    raise ContentError(f"{what}: more than {MAX_PAGES} pages")


async def list_tags(client: RegistryClient, ref: Reference) -> list[str]:
    return await _paged(client, ref.api_host, f"/v2/{ref.repository}/tags/list", "tags",
                        [Scope.repository(ref.repository, "pull")], f"tags of {ref.name}")


async def list_repositories(client: RegistryClient, host: str) -> list[str]:
    return await _paged(client, host, "/v2/_catalog", "repositories", [Scope("registry", "catalog", ("*",))],
                        f"catalog of {host}")


async def expand(client: RegistryClient, selection: Selection) -> list[Reference]:
    """The references of the selection: as listed, then each pattern's tags, in order, once each."""
    refs = list(selection.images)
    for spec in selection.repositories:
        tags = await list_tags(client, spec.repository)
        refs += [spec.repository.with_tag(t) for t in sorted(tags) if spec.picks(t)]
    return list(dict.fromkeys(refs))


async def manifest_digest(client: RegistryClient, ref: Reference, identifier: str) -> str | None:
    """The digest `identifier` names in the repository, or None when absent (HEAD)."""
    async with client.manifest_slots(ref.api_host):
        async with client.request("HEAD", ref.api_host, f"/v2/{ref.repository}/manifests/{identifier}",
                                  scopes=[Scope.repository(ref.repository, "pull")],
                                  headers={"Accept": media.MANIFEST_ACCEPT}) as response:
            if response.status == 404:
                return None
            if response.status != 200:
                raise await client.error_for(response, f"manifest {ref.name}:{identifier}")
            return response.headers.get("Docker-Content-Digest") or identifier


__all__ = ["list_repositories", "list_tags", "manifest_digest"]
