"""An image in a registry, whole: every manifest of its tree (an index's
children, or one platform's), every blob they list, and with `referrers`
the manifests attached to any of them (OCI 1.1 referrers API, or the
`sha256-<hex>` tag schema where the registry has no API; the client
library chooses), recursively to a bounded depth.

    tree = await walk_image(client, ref, platform=None, referrers=False)

Manifests are checked whole by puller.oci on the way (fetch_checked_manifest:
sizes bounded, index entries' sizes kept); nothing is downloaded but
manifests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from puller.client.http import FetchedManifest, RegistryClient
from puller.client.reference import Platform, Reference, choose_platform, describe_platform
from puller.errors import ClientError, ContentError
from puller.oci import Descriptor
from puller.transfer.pull import fetch_checked_manifest
from puller.transfer.tasks import gather_all_or_cancel

MAX_INDEX_DEPTH = 4         # an index of indexes, as a few multi-arch tools write
MAX_REFERRER_DEPTH = 4      # a signature of an SBOM of an image, and so on


@dataclass
class ImageTree:
    ref: Reference                          # where it was read
    root: FetchedManifest                   # the image (a platform's manifest when narrowed)
    manifests: dict[str, FetchedManifest] = field(default_factory=dict)   # children first, root last
    blobs: dict[str, Descriptor] = field(default_factory=dict)            # configs and layers
    referrers: list["ImageTree"] = field(default_factory=list)
    subject: str | None = None              # for a referrer: what it is attached to

    def all_trees(self):
        yield self
        for child in self.referrers:
            yield from child.all_trees()


async def _collect(client: RegistryClient, ref: Reference, manifest: FetchedManifest, tree: ImageTree,
                   depth: int) -> None:
    if manifest.is_index:
        if depth >= MAX_INDEX_DEPTH:
            raise ContentError(f"manifest {ref.name}@{manifest.digest}: indexes nest deeper than {MAX_INDEX_DEPTH}")
        entries = list({e.digest: e for e in manifest.parsed.manifests}.values())
        children = await gather_all_or_cancel(fetch_checked_manifest(client, ref, e.digest, e) for e in entries)
        for child in children:
            await _collect(client, ref, child, tree, depth + 1)
    else:
        for blob in manifest.parsed.blobs:
            # a non-distributable layer comes from its own URLs, to whoever needs it
            if not blob.non_distributable:
                tree.blobs.setdefault(blob.digest, blob)
    tree.manifests.setdefault(manifest.digest, manifest)


async def walk_image(client: RegistryClient, ref: Reference, *, platform: Platform | None = None,
                     referrers: bool = False, identifier: str | None = None, depth: int = 0,
                     subject: str | None = None) -> ImageTree:
    root = await fetch_checked_manifest(client, ref, identifier or ref.identifier)
    if platform is not None and root.is_index:
        chosen = choose_platform([e.raw for e in root.parsed.manifests], platform)
        pick = next((e for e in root.parsed.manifests if e.raw is chosen), None)
        if pick is None:
            available = ", ".join(sorted({describe_platform(e.platform) for e in root.parsed.manifests})) or "none"
            raise ClientError(f"{ref}: no image for platform {platform} (available: {available})")
        root = await fetch_checked_manifest(client, ref, pick.digest, pick)
    tree = ImageTree(ref=ref, root=root, subject=subject)
    await _collect(client, ref, root, tree, 0)
    if referrers and depth < MAX_REFERRER_DEPTH:
        seen: set[str] = set()
        for digest in list(tree.manifests):
            for descriptor in await client.referrers(ref, digest):
                if descriptor.digest in seen or descriptor.digest in tree.manifests:
                    continue
                seen.add(descriptor.digest)
                tree.referrers.append(await walk_image(client, ref, referrers=True, identifier=descriptor.digest,
                                                       depth=depth + 1, subject=digest))
    return tree
