"""Who may do what to which repository: the access policy file.

    groups:
      devs: [builder, deployer]
    rules:
      - repositories: ["team-a/app"]
        users: [reader]
        actions: [pull]
      - repositories: ["team-a/**"]
        groups: [devs]
        actions: [pull, push, delete]
      - repositories: ["public/**"]
        users: [anonymous]
        actions: [pull]
    catalog: [builder]      # who may list /v2/_catalog (registry:catalog:*)

Names. Under `users`, `anonymous` means a request without credentials and
`authenticated` any user with valid credentials; every other name is a
user. `catalog` takes users, groups, `authenticated` and `anonymous`.

Patterns. A repository pattern is matched against the whole name: `*`
matches within one path component (`[^/]*`), `**` matches anything,
slashes included. `team-a/*` matches `team-a/app`, not `team-a/x/y`;
`team-a/**` matches both, but not `team-a` itself.

Deciding. For a user and a repository, the rules that count are those whose
pattern matches the repository AND that name the user (directly, through a
group, or as `authenticated`). The most specific pattern among them
decides; rules with equally specific patterns add up (the union of their
actions). No such rule: no access. Specificity, compared in this order:

    1. a pattern without wildcards beats any pattern with one;
    2. more literal (non-`*`) characters win;
    3. fewer `**` win;
    4. fewer single `*` win.

So `team-a/app` > `team-a/*` > `team-a/**` > `**`. A consequence, by
design: a more specific rule REDUCES what a broader one grants. A member of
`devs` who is also named in the `team-a/app` rule above may only pull
team-a/app.

Anonymous. A user with credentials may always do at least what a request
without credentials may: what `anonymous` rules grant (decided as above for
anonymous) is added to the user's own decision. It is a floor, not one more
competing rule, so making `public/**` pullable by anyone never takes push
away from a team that owns `public/tools` through a broader rule, and no
rule can deny a logged-in user what they could do by not logging in.

`actions_for` runs on every request: patterns are compiled once, and the
answers memoised per (user, repository) in a small LRU on this immutable
Policy. A reloaded policy is a new Policy with an empty memo, so a user
removed from a group loses that group's access at once (Zot
CVE-2025-23208 kept removed group memberships).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from registry.auth.scopes import REPOSITORY_ACTIONS, WILDCARD

ANONYMOUS = "anonymous"
AUTHENTICATED = "authenticated"
BUILTIN_NAMES = frozenset({ANONYMOUS, AUTHENTICATED})

_ALL = frozenset(REPOSITORY_ACTIONS)
_NONE: frozenset[str] = frozenset()
# the OCI name grammar's characters, plus the wildcard
_PATTERN_CHARS = re.compile(r"[a-z0-9._/*-]+")
_MEMO_SIZE = 4096


class PolicyError(ValueError):
    """The policy is unusable: one line naming the file and the problem."""


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    parts = []
    for i, chunk in enumerate(pattern.split("**")):
        if i:
            parts.append(".*")
        parts.append("[^/]*".join(re.escape(piece) for piece in chunk.split("*")))
    return re.compile("".join(parts), re.DOTALL)


def _specificity(pattern: str) -> tuple[bool, int, int, int]:
    """Larger is more specific (see the module docstring)."""
    doubles = pattern.count("**")
    singles = pattern.count("*") - 2 * doubles
    return ("*" not in pattern, len(pattern) - pattern.count("*"), -doubles, -singles)


@dataclass(frozen=True)
class _Rule:
    pattern: str
    regex: re.Pattern[str]
    specificity: tuple[bool, int, int, int]
    users: frozenset[str]
    groups: frozenset[str]
    actions: frozenset[str]


class Policy:
    """An immutable access policy; build it with load_policy, from_mapping or default."""

    def __init__(self, rules: Sequence[_Rule], groups: Mapping[str, frozenset[str]],
                 catalog: frozenset[str], source: str) -> None:
        self.source = source
        # most specific first: a lookup stops below the first tier that decides
        self._rules = tuple(sorted(rules, key=lambda r: r.specificity, reverse=True))
        self._groups = dict(groups)
        self._catalog = catalog
        member_of: dict[str, set[str]] = {}
        for group, members in self._groups.items():
            for member in members:
                member_of.setdefault(member, set()).add(group)
        self._member_of = {user: frozenset(gs) for user, gs in member_of.items()}
        self._memo: OrderedDict[tuple[str | None, str], frozenset[str]] = OrderedDict()
        self._memo_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Policy({self.source!r}, {len(self._rules)} rules, {len(self._groups)} groups)"

    @classmethod
    def default(cls) -> "Policy":
        """No policy file: every authenticated user may do everything,
        catalog included; a request without credentials nothing."""
        return cls.from_mapping({"rules": [{"repositories": ["**"], "users": [AUTHENTICATED],
                                            "actions": [WILDCARD]}],
                                 "catalog": [AUTHENTICATED]}, "default policy")

    @classmethod
    def from_mapping(cls, data: Mapping, source: str = "policy") -> "Policy":
        """Validate a parsed policy; PolicyError on the first problem."""
        return _Builder(source).build(data)

    def groups_of(self, user: str | None) -> frozenset[str]:
        return self._member_of.get(user, _NONE) if user is not None else _NONE

    def may_list_catalog(self, user: str | None) -> bool:
        if ANONYMOUS in self._catalog:
            return True
        if user is None:
            return False
        return (AUTHENTICATED in self._catalog or user in self._catalog
                or not self._catalog.isdisjoint(self.groups_of(user)))

    def actions_for(self, user: str | None, repository: str) -> frozenset[str]:
        """What `user` (None: no credentials) may do to `repository`: a
        subset of {"pull", "push", "delete"}."""
        key = (user, repository)
        with self._memo_lock:
            found = self._memo.get(key)
            if found is not None:
                self._memo.move_to_end(key)
                return found
        found = self._decide(None, repository)
        if user is not None:
            found = found | self._decide(user, repository)
        with self._memo_lock:
            self._memo[key] = found
            if len(self._memo) > _MEMO_SIZE:
                self._memo.popitem(last=False)
        return found

    def _decide(self, user: str | None, repository: str) -> frozenset[str]:
        """The most specific matching rules that name `user` decide; anonymous
        (None) is named only by `anonymous`, a user never by it here."""
        groups = self.groups_of(user)
        best: tuple[bool, int, int, int] | None = None
        granted: set[str] = set()
        for rule in self._rules:
            if best is not None and rule.specificity < best:
                break
            if user is None:
                named = ANONYMOUS in rule.users
            else:
                named = (user in rule.users or AUTHENTICATED in rule.users
                         or not rule.groups.isdisjoint(groups))
            if not named or not rule.regex.fullmatch(repository):
                continue
            if best is None or rule.specificity > best:
                best, granted = rule.specificity, set()
            granted |= rule.actions
        return frozenset(granted)


class _Builder:
    """Strict validation of the mapping, with messages that say where."""

    TOP_KEYS = frozenset({"groups", "rules", "catalog"})
    RULE_KEYS = frozenset({"repositories", "users", "groups", "actions"})

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, problem: str) -> PolicyError:
        return PolicyError(f"{self.source}: {where}: {problem}")

    def names(self, value: Any, where: str) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() == v and v
                                                  for v in value):
            raise self.fail(where, "must be a list of non-empty names (strings)")
        return value

    def build(self, data: Any) -> Policy:
        if not isinstance(data, Mapping):
            raise PolicyError(f"{self.source}: the policy must be a mapping with `rules`")
        unknown = sorted(str(k) for k in set(data) - self.TOP_KEYS)
        if unknown:
            raise self.fail("top level", f"unknown key {unknown[0]!r} "
                                         f"(expected groups, rules, catalog)")
        groups = self.groups(data.get("groups", {}))
        if "rules" not in data:
            raise self.fail("top level", "missing `rules`")
        rules_data = data["rules"]
        if not isinstance(rules_data, list):
            raise self.fail("rules", "must be a list")
        rules = [r for i, entry in enumerate(rules_data) for r in self.rule(entry, i, groups)]
        catalog = frozenset(self.names(data.get("catalog", []), "catalog"))
        return Policy(rules, groups, catalog, self.source)

    def groups(self, data: Any) -> dict[str, frozenset[str]]:
        if not isinstance(data, Mapping):
            raise self.fail("groups", "must map group names to lists of users")
        out = {}
        for name, members in data.items():
            if not isinstance(name, str) or not name:
                raise self.fail("groups", f"group name {name!r} is not a string")
            if name in BUILTIN_NAMES:
                raise self.fail(f"groups.{name}", "is a built-in name, not a group")
            members = self.names(members, f"groups.{name}")
            reserved = BUILTIN_NAMES.intersection(members)
            if reserved:
                raise self.fail(f"groups.{name}", f"{sorted(reserved)[0]!r} is built in, "
                                                  f"not a user; name it in a rule's users")
            out[name] = frozenset(members)
        return out

    def rule(self, data: Any, index: int, groups: Mapping[str, frozenset[str]]) -> list[_Rule]:
        where = f"rules[{index}]"
        if not isinstance(data, Mapping):
            raise self.fail(where, "must be a mapping")
        unknown = sorted(str(k) for k in set(data) - self.RULE_KEYS)
        if unknown:
            raise self.fail(where, f"unknown key {unknown[0]!r} "
                                   f"(expected repositories, users, groups, actions)")
        if "repositories" not in data:
            raise self.fail(where, "has no `repositories`")
        patterns = self.names(data["repositories"], f"{where}.repositories")
        if not patterns:
            raise self.fail(f"{where}.repositories", "is empty")
        users = frozenset(self.names(data.get("users", []), f"{where}.users"))
        rule_groups = frozenset(self.names(data.get("groups", []), f"{where}.groups"))
        if not users and not rule_groups:
            raise self.fail(where, "names no users or groups")
        undefined = sorted(rule_groups - set(groups))
        if undefined:
            raise self.fail(f"{where}.groups", f"group {undefined[0]!r} is not defined")
        if "actions" not in data:
            raise self.fail(where, "has no `actions`")
        actions = self.names(data["actions"], f"{where}.actions")
        if not actions:
            raise self.fail(f"{where}.actions", "is empty")
        for action in actions:
            if action != WILDCARD and action not in REPOSITORY_ACTIONS:
                raise self.fail(f"{where}.actions", f"unknown action {action!r} "
                                                    f"(expected pull, push, delete or *)")
        granted = _ALL if WILDCARD in actions else frozenset(actions)
        return [_Rule(p, _pattern_regex(p), _specificity(p), users, rule_groups, granted)
                for p in (self.pattern(p, f"{where}.repositories") for p in patterns)]

    def pattern(self, pattern: str, where: str) -> str:
        if not _PATTERN_CHARS.fullmatch(pattern):
            raise self.fail(where, f"{pattern!r} is not a repository pattern (lowercase "
                                   f"a-z, 0-9, '.', '_', '-', '/' and '*')")
        if "***" in pattern:
            raise self.fail(where, f"{pattern!r}: use '*' or '**', not '***'")
        if pattern.startswith("/") or pattern.endswith("/") or "//" in pattern:
            raise self.fail(where, f"{pattern!r} has an empty path component")
        return pattern


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice (the second `rules:` would
    otherwise silently replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file (blocking: run it in a thread)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{source}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise PolicyError(f"{source}: not UTF-8") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise PolicyError(f"{source}: {line}invalid YAML: {problem}") from None
    return Policy.from_mapping(data if data is not None else {}, source)
