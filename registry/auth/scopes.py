"""Resource scopes: what a token grants and what a request needs.

    repository:team-a/app:pull,push      (docker-registry/scope.md, "Resource Scope Grammar")
    registry:catalog:*

The name may hold one colon (a host with a port), so the actions are what
follows the last colon and the type what precedes the first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

REPOSITORY = "repository"
REGISTRY = "registry"
CATALOG = "catalog"
WILDCARD = "*"
# the actions a repository scope may name; "*" is all of them
REPOSITORY_ACTIONS = ("pull", "push", "delete")


@dataclass(frozen=True)
class Scope:
    type: str
    name: str
    actions: frozenset[str]

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(sorted(self.actions))}"

    def allows(self, action: str) -> bool:
        return action in self.actions or WILDCARD in self.actions

    def to_claim(self) -> dict:
        """The entry of a token's `access` claim (docker-registry/jwt.md)."""
        return {"type": self.type, "name": self.name, "actions": sorted(self.actions)}


CATALOG_SCOPE = Scope(REGISTRY, CATALOG, frozenset({WILDCARD}))


def repository_scope(name: str, *actions: str) -> Scope:
    return Scope(REPOSITORY, name, frozenset(actions))


def parse_scope(text: str) -> Scope:
    """One resource scope; ValueError when a part is missing. A type with a
    class ("repository(plugin)") keeps its class out of the type."""
    kind, sep, rest = text.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not kind or not name:
        raise ValueError(f"invalid scope {text!r}")
    kind = kind.split("(", 1)[0]
    return Scope(kind, name, frozenset(a for a in actions.split(",") if a))


def parse_scopes(texts: Iterable[str]) -> list[Scope]:
    """Each text may hold several space-separated scopes (the OAuth2 form);
    malformed ones are dropped (a token service grants what it understands)
    and repeated resources merged."""
    merged: dict[tuple[str, str], set[str]] = {}
    for text in texts:
        for part in text.split():
            try:
                scope = parse_scope(part)
            except ValueError:
                continue
            merged.setdefault((scope.type, scope.name), set()).update(scope.actions)
    return [Scope(kind, name, frozenset(actions)) for (kind, name), actions in merged.items()]


def claim_scopes(access: object) -> tuple[Scope, ...]:
    """A token's `access` claim as scopes; ValueError when it is not a list
    of {type, name, actions}."""
    if not isinstance(access, list):
        raise ValueError("access claim is not a list")
    out = []
    for entry in access:
        if not isinstance(entry, dict):
            raise ValueError("access entry is not an object")
        kind, name, actions = entry.get("type"), entry.get("name"), entry.get("actions", [])
        if not isinstance(kind, str) or not isinstance(name, str) or not isinstance(actions, list) \
                or not all(isinstance(a, str) for a in actions):
            raise ValueError("access entry is malformed")
        out.append(Scope(kind, name, frozenset(actions)))
    return tuple(out)
