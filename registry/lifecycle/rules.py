"""The rules of registry.lifecycle (its docstring says what each does)."""

from __future__ import annotations

import fnmatch
import functools
import hashlib
from dataclasses import dataclass
from typing import Awaitable, Callable

from aiohttp import web

from storage import layout
from storage.driver import PathNotFound
from storage.oci.errors import Denied, DigestInvalid, Unsupported
from storage.oci.names import is_digest
from storage.store import ContentStore

_WRITES = frozenset(("POST", "PUT", "PATCH", "DELETE"))


class RuleError(ValueError):
    """A lifecycle rule that cannot be read, in one line."""


@dataclass(frozen=True)
class ImmutableTags:
    rules: tuple[tuple[str, str], ...] = ()     # (repository glob, tag glob)

    @classmethod
    @functools.lru_cache(maxsize=8)     # read from the settings on each manifest write
    def parse(cls, text: str) -> "ImmutableTags":
        rules = []
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            repo, sep, tag = item.rpartition(":")
            if not sep or not repo or not tag:
                raise RuleError(f"lifecycle.immutable_tags: {item!r} is not <repository glob>:<tag glob>")
            rules.append((repo, tag))
        return cls(tuple(rules))

    def rule_for(self, repo: str, tag: str) -> str | None:
        """The first rule making repo:tag immutable, as written, or None."""
        for repo_glob, tag_glob in self.rules:
            if fnmatch.fnmatchcase(repo, repo_glob) and fnmatch.fnmatchcase(tag, tag_glob):
                return f"{repo_glob}:{tag_glob}"
        return None


async def _tag_target(store: ContentStore, repo: str, tag: str) -> str | None:
    try:
        return layout.parse_link(await store.driver.get_content(layout.tag_current_link(repo, tag)))[0]
    except (PathNotFound, DigestInvalid):
        return None


async def guard_manifest_put(store: ContentStore, rules: ImmutableTags, repo: str, tags: list[str],
                             body: bytes) -> None:
    """DENIED when the push would point an immutable tag at other bytes."""
    if not rules.rules:
        return
    digest = None
    for tag in tags:
        rule = rules.rule_for(repo, tag)
        if rule is None:
            continue
        current = await _tag_target(store, repo, tag)
        if current is None:
            continue
        digest = digest or f"sha256:{hashlib.sha256(body).hexdigest()}"
        if current != digest:
            raise Denied(f"tag {repo}:{tag} is immutable (lifecycle rule {rule}): it already names "
                         f"{current}; push under a new tag", {"tag": tag, "rule": rule})


async def guard_manifest_delete(store: ContentStore, rules: ImmutableTags, repo: str, reference: str) -> None:
    """DENIED when the delete would remove an immutable tag (by tag, or by
    deleting the manifest an immutable tag names)."""
    if not rules.rules:
        return
    if not is_digest(reference):
        rule = rules.rule_for(repo, reference)
        if rule is not None and await _tag_target(store, repo, reference) is not None:
            raise Denied(f"tag {repo}:{reference} is immutable (lifecycle rule {rule}): it cannot be deleted",
                         {"tag": reference, "rule": rule})
        return
    try:
        tags = [p.rsplit("/", 1)[-1] for p in await store.driver.list(layout.tags_dir(repo))]
    except PathNotFound:
        return
    for tag in tags:
        rule = rules.rule_for(repo, tag)
        if rule is not None and await _tag_target(store, repo, tag) == reference:
            raise Denied(f"manifest {reference} is named by immutable tag {repo}:{tag} "
                         f"(lifecycle rule {rule}): it cannot be deleted", {"tag": tag, "rule": rule})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ReadOnlySwitch:
    """Read-only mode as it stands now: `lifecycle.read_only` at start, then
    what the settings say each time `dockyard serve` gets SIGHUP (it re-reads
    its config file and environment: registry/cli.py), in every worker."""
    on: bool


READ_ONLY = web.AppKey("read_only", ReadOnlySwitch)


def read_only_middleware(read_only: Callable[[], bool]):
    """Refuse every write under /v2/ while read_only() says so (405 UNSUPPORTED)."""
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in _WRITES and request.path.startswith("/v2/") and read_only():
            raise Unsupported("this registry is in read-only mode (lifecycle.read_only): "
                              f"{request.method} is refused; pulls work as usual")
        return await handler(request)

    return middleware
