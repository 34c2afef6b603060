"""Every storage path Dockyard uses, built in this one module.

    /docker/registry/v2/
    ├── blobs/                                 global, content addressed:
    │   └── <alg>/<hex[0:2]>/<hex>/data        a blob pushed to ten repos is stored once
    ├── _catalog/                              (Dockyard's own)
    │   └── <repo with "/" as "+">             one empty entry per repository, written
    │                                          when the repo first gets content
    ├── _dockyard/                             (Dockyard's own)
    │   ├── README                             what this directory is
    │   ├── indexed-v1                         the one-time index build is done (below)
    │   ├── index.lock                         held by the process doing it
    │   ├── health/<probe id>                  readiness probes' write-read-delete (for moments)
    │   └── events/outbox/<entry id>/          one event for one webhook endpoint, until delivered:
    │       ├── event.json                     the endpoint's URL and the event
    │       └── lock                           held by the replica delivering it
    └── repositories/<repo>/
        ├── _layers/<alg>/<hex>/link           blob linked into the repo (content: digest)
        ├── _manifests/
        │   ├── revisions/<alg>/<hex>/link     manifest in the repo (content: digest)
        │   └── tags/<tag>/
        │       ├── current/link               tag -> manifest digest
        │       └── index/<alg>/<hex>/link     every digest the tag named (content: digest)
        ├── _referrers/<alg>/<hex>/            (Dockyard's own) referrers of <alg>:<hex>:
        │   └── <ref-alg>-<ref-hex>.json       one descriptor per referrer (never a shared
        │                                      file, so concurrent pushes never rewrite one)
        └── _uploads/<upload id>/
            ├── data                           bytes received so far (appended in place)
            ├── digest                         "<size> <sha256>" of data's first size bytes
            ├── lock                           held by the one request changing the session
            └── startedat                      ISO 8601 start time (for expiry)

CNCF Distribution's layout, shared both ways. Where the two overlap
(blobs, _layers, _manifests, _uploads' data and startedat) the files are
Distribution 2.8's, byte for byte: a link holds the bare digest, a tag
writes its index link before its current link, and a manifest's media type
is read from its own bytes (`storage.oci.content.stored_media_type`), as
Distribution reads it, so nothing beside the revision link says what it is.
What Dockyard adds lives where Distribution never looks: `_catalog/` and
`_dockyard/` beside `blobs/` and `repositories/` (it reads only those two),
and `_referrers/` inside a repository (its catalog walk and garbage
collector skip every directory starting with "_" but `_manifests`, and
read only files named `link` below that). So Distribution can serve, and
garbage-collect, a root Dockyard filled, and Dockyard can serve a root
Distribution filled once the index build (storage.indexing) has written the
catalog entries and referrers index that Distribution never keeps.

Dockyard before the shared layout wrote a revision link as a JSON
descriptor (mediaType as pushed, digest, size). `parse_link` reads both
forms, so such roots keep working without a migration step, and the index
build rewrites them as bare digests, so Distribution can read them too.

Why it is safe to build paths from client input: every name is checked
against its grammar (`storage.oci.names`) here, before it becomes a path
component. A repository name is lower-case components joined by single
slashes, so it cannot be absolute, hold "..", NUL or an empty component, and
no component can start with "_": the reserved directories above never clash
with a repository called "a/_layers". Tags have no "/" and cannot start with
"."; digests and upload ids are plain [a-z0-9]-style tokens.
"""

from __future__ import annotations

import json
import re

from storage.oci.errors import BlobUploadUnknown, DigestInvalid
from storage.oci.names import parse_digest, validate_name, validate_tag

_UPLOAD_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")

ROOT = "/docker/registry/v2"
BLOBS = f"{ROOT}/blobs"
REPOSITORIES = f"{ROOT}/repositories"
CATALOG = f"{ROOT}/_catalog"
_OWN = f"{ROOT}/_dockyard"
INDEXED = f"{_OWN}/indexed-v1"          # a new index format gets a new name: built again
INDEX_LOCK = f"{_OWN}/index.lock"
OWN_README = f"{_OWN}/README"
HEALTH = f"{_OWN}/health"
EVENT_OUTBOX = f"{_OWN}/events/outbox"
OWN_README_TEXT = (b"Dockyard's own state beside CNCF Distribution's layout (which never reads it);\n"
                   b"see storage/layout.py in Dockyard.\n")

# "/" never occurs in a catalog entry's file name; "+" never occurs in a repo name.
_CATALOG_SEPARATOR = "+"


# ---- global blobs ------------------------------------------------------
def health_probe(probe_id: str) -> str:
    """A readiness probe's file (the id is the server's own, never a client's)."""
    if not _UPLOAD_ID_RE.fullmatch(probe_id):
        raise ValueError(f"bad probe id {probe_id!r}")
    return f"{HEALTH}/{probe_id}"


def event_entry(entry_id: str) -> str:
    """An outbox entry's directory (ids are the server's own: time, then random)."""
    if not _UPLOAD_ID_RE.fullmatch(entry_id):
        raise ValueError(f"bad event entry id {entry_id!r}")
    return f"{EVENT_OUTBOX}/{entry_id}"


def event_record(entry_id: str) -> str:
    return f"{event_entry(entry_id)}/event.json"


def event_lock(entry_id: str) -> str:
    return f"{event_entry(entry_id)}/lock"


def blob_data(digest: str) -> str:
    alg, hex_ = parse_digest(digest)
    return f"{BLOBS}/{alg}/{hex_[:2]}/{hex_}/data"


def blob_dir(digest: str) -> str:
    alg, hex_ = parse_digest(digest)
    return f"{BLOBS}/{alg}/{hex_[:2]}/{hex_}"


# ---- repositories ------------------------------------------------------
def repo_dir(repo: str) -> str:
    validate_name(repo)
    return f"{REPOSITORIES}/{repo}"


def layer_link_dir(repo: str, digest: str) -> str:
    alg, hex_ = parse_digest(digest)
    return f"{repo_dir(repo)}/_layers/{alg}/{hex_}"


def layer_link(repo: str, digest: str) -> str:
    return f"{layer_link_dir(repo, digest)}/link"


def manifest_revision_dir(repo: str, digest: str) -> str:
    alg, hex_ = parse_digest(digest)
    return f"{repo_dir(repo)}/_manifests/revisions/{alg}/{hex_}"


def manifest_revision_link(repo: str, digest: str) -> str:
    return f"{manifest_revision_dir(repo, digest)}/link"


def tags_dir(repo: str) -> str:
    return f"{repo_dir(repo)}/_manifests/tags"


def tag_dir(repo: str, tag: str) -> str:
    validate_tag(tag)
    return f"{tags_dir(repo)}/{tag}"


def tag_current_link(repo: str, tag: str) -> str:
    return f"{tag_dir(repo, tag)}/current/link"


def tag_index_link(repo: str, tag: str, digest: str) -> str:
    alg, hex_ = parse_digest(digest)
    return f"{tag_dir(repo, tag)}/index/{alg}/{hex_}/link"


def manifest_revisions_dir(repo: str) -> str:
    return f"{repo_dir(repo)}/_manifests/revisions"


# ---- link files ----------------------------------------------------------
def link_content(digest: str) -> bytes:
    """What a link file holds: the digest, bare, as Distribution writes it."""
    parse_digest(digest)
    return digest.encode()


def parse_link(data: bytes) -> tuple[str, str | None]:
    """(digest, media type) of a link file's content. The media type is
    None for a bare digest (Distribution's form: the manifest's bytes say
    it) and the one recorded in a JSON descriptor (Dockyard's old form).
    DigestInvalid for content that is neither."""
    text = data.decode("utf-8", errors="replace").strip()
    if not text.startswith("{"):
        parse_digest(text)
        return text, None
    try:
        descriptor = json.loads(text)
        digest, media_type = descriptor["digest"], descriptor["mediaType"]
    except (ValueError, KeyError, TypeError):
        raise DigestInvalid(f"unreadable link: {text[:100]!r}") from None
    if not isinstance(digest, str) or not isinstance(media_type, str):
        raise DigestInvalid(f"unreadable link: {text[:100]!r}")
    parse_digest(digest)
    return digest, media_type


def is_repository(children: list[str]) -> bool:
    """Whether a directory under repositories/ whose children are these
    (as listed) is a repository: it has manifests or linked layers."""
    names = {c.rsplit("/", 1)[-1] for c in children}
    return "_manifests" in names or "_layers" in names


def may_hold_repositories(child: str) -> bool:
    """Whether a listed child of a directory under repositories/ can be,
    or lead to, a repository (no repository name component starts with "_")."""
    return not child.rsplit("/", 1)[-1].startswith("_")


def repo_from_dir(path: str) -> str:
    """The repository name of a directory path under repositories/."""
    return path[len(REPOSITORIES) + 1:]


def referrers_dir(repo: str, subject_digest: str) -> str:
    alg, hex_ = parse_digest(subject_digest)
    return f"{repo_dir(repo)}/_referrers/{alg}/{hex_}"


def referrer_entry(repo: str, subject_digest: str, referrer_digest: str) -> str:
    alg, hex_ = parse_digest(referrer_digest)
    return f"{referrers_dir(repo, subject_digest)}/{alg}-{hex_}.json"


# ---- upload sessions ---------------------------------------------------
def validate_upload_id(upload_id: str) -> None:
    # An id that could not have come from us is simply an unknown session.
    if not isinstance(upload_id, str) or not _UPLOAD_ID_RE.fullmatch(upload_id):
        raise BlobUploadUnknown(f"unknown upload: {upload_id!r}", {"uuid": upload_id})


def upload_dir(repo: str, upload_id: str) -> str:
    validate_upload_id(upload_id)
    return f"{repo_dir(repo)}/_uploads/{upload_id}"


def upload_data(repo: str, upload_id: str) -> str:
    return f"{upload_dir(repo, upload_id)}/data"


def upload_started_at(repo: str, upload_id: str) -> str:
    return f"{upload_dir(repo, upload_id)}/startedat"


def upload_digest_record(repo: str, upload_id: str) -> str:
    """"<size> <digest>": the sha256 of the upload's first <size> bytes, as
    the process that received them computed it, so that a finish landing on
    another worker need not read the whole upload back to hash it."""
    return f"{upload_dir(repo, upload_id)}/digest"


def upload_lock(repo: str, upload_id: str) -> str:
    """The session's lock (StorageDriver.try_lock): PATCH, finish and cancel
    hold it, so one request at a time changes a session, in any process."""
    return f"{upload_dir(repo, upload_id)}/lock"


def uploads_dir(repo: str) -> str:
    return f"{repo_dir(repo)}/_uploads"


# ---- catalog -----------------------------------------------------------
def catalog_entry(repo: str) -> str:
    validate_name(repo)
    return f"{CATALOG}/{repo.replace('/', _CATALOG_SEPARATOR)}"


def repo_from_catalog_entry(path: str) -> str:
    """The repository name a catalog entry path (as listed) stands for."""
    return path.rsplit("/", 1)[-1].replace(_CATALOG_SEPARATOR, "/")
