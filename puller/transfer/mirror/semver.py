"""Semantic versions in tags, and ranges over them (semver.org 2.0.0 for
the versions; the range grammar npm and regsync users write):

    v1.2.3  1.2.3-rc.1  1.2  1          tags read as versions (a leading v allowed)
    >=1.2 <2   ^1.2.3   ~1.4   1.x   =1.2.3   1.2 || 2.0     ranges

A range is alternatives joined by `||`, each a set of comparators that must
all hold. A missing or `x` part is a wildcard: `1.2` is `>=1.2.0 <1.3.0`.
Pre-releases match only a range that names a pre-release of the same
major.minor.patch (as npm does), so `>=1.0` never picks `2.0.0-rc.1`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_VERSION = re.compile(r"v?(0|[1-9]\d*)(?:\.(0|[1-9]\d*))?(?:\.(0|[1-9]\d*))?"
                      r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?")
_PARTIAL = re.compile(r"v?(\d+|[xX*])(?:\.(\d+|[xX*]))?(?:\.(\d+|[xX*]))?(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?")
_COMPARATOR = re.compile(r"(>=|<=|>|<|=|\^|~)?(.+)")


@dataclass(frozen=True, order=False)
class Version:
    core: tuple[int, int, int]
    pre: tuple = ()

    def key(self) -> tuple:
        # a release sorts after its pre-releases; numeric identifiers before alphanumeric ones
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.pre)
        return self.core + ((1,) if not self.pre else (0,) + pre)


def parse_version(tag: str) -> Version | None:
    """The version a tag names, or None ("latest", "1.2.3.4", "01.2")."""
    match = _VERSION.fullmatch(tag)
    if not match:
        return None
    major, minor, patch, pre = match.groups()
    return Version((int(major), int(minor or 0), int(patch or 0)), tuple(pre.split(".")) if pre else ())


class RangeError(ValueError):
    pass


@dataclass(frozen=True)
class _Bound:
    op: str             # ">=", ">", "<", "<=", "="
    version: Version

    def holds(self, v: Version) -> bool:
        a, b = v.key(), self.version.key()
        return {">=": a >= b, ">": a > b, "<": a < b, "<=": a <= b, "=": a == b}[self.op]


def _wild(part: str | None) -> bool:
    return part is None or part in ("x", "X", "*")


def _comparator(op: str, text: str) -> list[_Bound]:
    match = _PARTIAL.fullmatch(text)
    if not match:
        raise RangeError(f"{text!r} is not a version")
    major, minor, patch, pre = match.groups()
    parts = [major, minor, patch]
    known = 0
    for part in parts:
        if _wild(part):
            break
        known += 1
    if any(not _wild(p) for p in parts[known:]):
        raise RangeError(f"{text!r}: a wildcard must come last")
    nums = [int(p) for p in parts[:known]] + [0] * (3 - known)
    low = Version(tuple(nums), tuple(pre.split(".")) if pre else ())

    def bump(index: int) -> Version:
        core = nums[:index] + [nums[index] + 1] + [0] * (2 - index)
        return Version(tuple(core))
    if known == 0:
        return [] if op in ("", "=", "^", "~", ">=", "<=") else [_Bound("<", Version((0, 0, 0)))]
    if op in ("", "="):
        return [_Bound("=", low)] if known == 3 else [_Bound(">=", low), _Bound("<", bump(known - 1))]
    if op == "^":
        first = next((i for i, n in enumerate(nums[:known]) if n), known - 1)
        return [_Bound(">=", low), _Bound("<", bump(min(first, known - 1)))]
    if op == "~":
        return [_Bound(">=", low), _Bound("<", bump(1 if known >= 2 else 0))]
    if op == ">" and known < 3:
        return [_Bound(">=", bump(known - 1))]
    if op == "<=" and known < 3:
        return [_Bound("<", bump(known - 1))]
    return [_Bound(op, low)]


@dataclass(frozen=True)
class Range:
    text: str
    alternatives: tuple[tuple[_Bound, ...], ...]

    def matches(self, version: Version) -> bool:
        for bounds in self.alternatives:
            if not all(b.holds(version) for b in bounds):
                continue
            if version.pre and not any(b.version.pre and b.version.core == version.core for b in bounds):
                continue
            return True
        return False


def parse_range(text: str) -> Range:
    if not isinstance(text, str) or not text.strip():
        raise RangeError("a semver range must be a non-empty string")
    alternatives = []
    for alternative in text.split("||"):
        alternative = alternative.strip()
        hyphen = re.fullmatch(r"(\S+)\s+-\s+(\S+)", alternative)
        if hyphen:                                  # "1.2 - 1.4": both ends included
            bounds = _comparator(">=", hyphen.group(1)) + _comparator("<=", hyphen.group(2))
        else:
            alternative = re.sub(r"(>=|<=|>|<|=|\^|~)\s+", r"\1", alternative)
            if not alternative:
                raise RangeError(f"{text!r} has an empty alternative")
            bounds = []
            for token in alternative.split():
                match = _COMPARATOR.fullmatch(token)
                bounds += _comparator(match.group(1) or "", match.group(2))
        alternatives.append(tuple(bounds))
    return Range(text, tuple(alternatives))
