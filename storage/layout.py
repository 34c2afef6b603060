"""Every storage path Dockyard uses, built in this one module.

    /docker/registry/v2/
    ├── blobs/                                 global, content addressed:
    │   └── <alg>/<hex[0:2]>/<hex>/data        a blob pushed to ten repos is stored once
    ├── _catalog/
    │   └── <repo with "/" as "+">             one empty entry per repository, written
    │                                          when the repo first gets content
    └── repositories/<repo>/
        ├── _layers/<alg>/<hex>/link           blob linked into the repo (content: digest)
        ├── _manifests/
        │   ├── revisions/<alg>/<hex>/link     manifest in the repo (content: its JSON
        │   │                                  descriptor: mediaType as pushed, digest, size)
        │   └── tags/<tag>/current/link        tag -> manifest digest
        ├── _referrers/<alg>/<hex>/            referrers of the subject <alg>:<hex>:
        │   └── <ref-alg>-<ref-hex>.json       one descriptor per referrer (never a shared
        │                                      file, so concurrent pushes never rewrite one)
        └── _uploads/<upload id>/
            ├── data                           bytes received so far (appended in place)
            ├── digest                         "<size> <sha256>" of data's first size bytes
            ├── lock                           held by the one request changing the session
            └── startedat                      ISO 8601 start time (for expiry)

Why it is safe to build paths from client input: every name is checked
against its grammar (`storage.oci.names`) here, before it becomes a path
component. A repository name is lower-case components joined by single
slashes, so it cannot be absolute, hold "..", NUL or an empty component, and
no component can start with "_": the reserved directories above never clash
with a repository called "a/_layers". Tags have no "/" and cannot start with
"."; digests and upload ids are plain [a-z0-9]-style tokens.
"""

from __future__ import annotations

import re

from storage.oci.errors import BlobUploadUnknown
from storage.oci.names import parse_digest, validate_name, validate_tag

_UPLOAD_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")

ROOT = "/docker/registry/v2"
BLOBS = f"{ROOT}/blobs"
REPOSITORIES = f"{ROOT}/repositories"
CATALOG = f"{ROOT}/_catalog"

# "/" never occurs in a catalog entry's file name; "+" never occurs in a repo name.
_CATALOG_SEPARATOR = "+"


# ---- global blobs ------------------------------------------------------
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
