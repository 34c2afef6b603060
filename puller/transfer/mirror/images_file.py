"""What to mirror: image references and, per repository, tag patterns.

An images file is YAML (skopeo sync and regsync users will know its shape):

    images:                                   # references, read as `dockyard pull` reads them
      - 127.0.0.1:5000/library/debian:bookworm
      - 127.0.0.1:5000/tools/jq@sha256:<64 hex>
    repositories:
      127.0.0.1:5000/team/app:
        tags: ["v1\\.[0-9]+", "latest"]     # regular expressions, each matching a whole tag
        semver: ">=1.2 <2"                    # and/or a range over tags that are versions

or plain text, one reference per line (`#` starts a comment). Every bad
entry is an ImagesFileError naming its line; all of them are found before
anything is fetched.

    selection = read_images_file(path)      -> Selection
    selection = selection_from_refs(texts)  references given on the command line
    selection.tags_for(repository, tags)    the tags of one repository the patterns pick
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from puller.client.reference import Reference, parse_reference
from puller.errors import ReferenceError
from puller.transfer.mirror.errors import ImagesFileError
from puller.transfer.mirror.semver import Range, RangeError, parse_range, parse_version

if TYPE_CHECKING:          # yaml is loaded by the YAML path only: `--images REF` starts without it
    import yaml

MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_PATTERN_LENGTH = 1000


@dataclass(frozen=True)
class RepositorySpec:
    repository: Reference            # no tag, no digest
    patterns: tuple[re.Pattern, ...]
    semver: Range | None
    line: int

    def picks(self, tag: str) -> bool:
        if any(p.fullmatch(tag) for p in self.patterns):
            return True
        version = parse_version(tag) if self.semver else None
        return version is not None and self.semver.matches(version)


@dataclass
class Selection:
    images: list[Reference] = field(default_factory=list)
    repositories: list[RepositorySpec] = field(default_factory=list)
    settings: dict[str, tuple[str, int]] = field(default_factory=dict)     # key -> (value, line)

    def __bool__(self) -> bool:
        return bool(self.images or self.repositories)


def _reference(text, path: str, line: int, *, repository: bool = False) -> Reference:
    if not isinstance(text, str) or not text.strip():
        raise ImagesFileError(path, line, "an image reference must be a non-empty string")
    try:
        ref = parse_reference(text.strip(), default_tag=not repository)
    except ReferenceError as exc:
        raise ImagesFileError(path, line, str(exc)) from None
    if repository and (ref.tag or ref.digest):
        raise ImagesFileError(path, line, f"{text!r}: a repository key names no tag or digest")
    return ref


def _line(node) -> int:
    return node.start_mark.line + 1


def _scalar(node, path: str, what: str) -> str:
    import yaml
    if not isinstance(node, yaml.ScalarNode):
        raise ImagesFileError(path, _line(node), f"{what} must be a string")
    return node.value


def _repository_spec(key: yaml.Node, value: yaml.Node, path: str) -> RepositorySpec:
    import yaml
    ref = _reference(_scalar(key, path, "a repository"), path, _line(key), repository=True)
    if not isinstance(value, yaml.MappingNode):
        raise ImagesFileError(path, _line(value), f"{ref.name}: expected a mapping with tags and/or semver")
    patterns: list[re.Pattern] = []
    semver = None
    for k, v in value.value:
        name = _scalar(k, path, "a key")
        if name == "tags":
            items = v.value if isinstance(v, yaml.SequenceNode) else [v]
            for item in items:
                text = _scalar(item, path, "a tag pattern")
                if len(text) > MAX_PATTERN_LENGTH:
                    raise ImagesFileError(path, _line(item), "tag pattern too long")
                try:
                    patterns.append(re.compile(text))
                except re.error as exc:
                    raise ImagesFileError(path, _line(item), f"tag pattern {text!r}: {exc}") from None
        elif name == "semver":
            text = _scalar(v, path, "a semver range")
            try:
                semver = parse_range(text)
            except RangeError as exc:
                raise ImagesFileError(path, _line(v), f"semver range {text!r}: {exc}") from None
        else:
            raise ImagesFileError(path, _line(k), f"unknown key {name!r} (expected tags, semver)")
    if not patterns and semver is None:
        raise ImagesFileError(path, _line(key), f"{ref.name}: no tags or semver to pick tags with")
    return RepositorySpec(ref, tuple(patterns), semver, _line(key))


_YAML_KEY = re.compile(r"^(images|repositories)\s*:", re.MULTILINE)


def parse_images_text(text: str, path: str = "images file", settings: tuple[str, ...] = ()) -> Selection:
    """The selection of an images file; with `settings`, those top-level keys
    are allowed too (a sync configuration's), their values kept as text."""
    selection = Selection()
    if not _YAML_KEY.search(text):
        # plain text: one reference per line
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if line:
                selection.images.append(_reference(line, path, number))
        return selection
    import yaml
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ImagesFileError(path, mark.line + 1 if mark else None,
                              f"not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(root, yaml.MappingNode):
        raise ImagesFileError(path, _line(root), "expected a mapping with images and/or repositories")
    for key, value in root.value:
        name = _scalar(key, path, "a key")
        if name == "images":
            if not isinstance(value, yaml.SequenceNode):
                raise ImagesFileError(path, _line(value), "images must be a list of references")
            for item in value.value:
                selection.images.append(_reference(_scalar(item, path, "an image reference"), path, _line(item)))
        elif name == "repositories":
            if not isinstance(value, yaml.MappingNode):
                raise ImagesFileError(path, _line(value), "repositories must map repositories to tag patterns")
            selection.repositories += [_repository_spec(k, v, path) for k, v in value.value]
        elif name in settings:
            selection.settings[name] = (_scalar(value, path, name), _line(value))
        else:
            expected = ", ".join(("images", "repositories") + settings)
            raise ImagesFileError(path, _line(key), f"unknown key {name!r} (expected {expected})")
    return selection


def read_images_file(path: str, settings: tuple[str, ...] = ()) -> Selection:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ImagesFileError(path, None, exc.strerror or str(exc)) from exc
    if len(data) > MAX_FILE_BYTES:
        raise ImagesFileError(path, None, f"larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ImagesFileError(path, None, "not UTF-8 text") from None
    return parse_images_text(text, path, settings)


def selection_from_refs(texts: list[str]) -> Selection:
    return Selection(images=[_reference(t, "command line", None) for t in texts])
