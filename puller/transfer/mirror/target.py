"""`REGISTRY[/PREFIX]`: where an import lands, or what an inventory lists.
A bundle names repositories relative to it: `team/app` lands at
REGISTRY/PREFIX/team/app.
"""

from __future__ import annotations

from dataclasses import dataclass

from puller.client.reference import DOCKER_HUB, DOCKER_HUB_API, Reference
from puller.errors import ReferenceError
from storage.oci.errors import OciError
from storage.oci.names import is_domain, validate_name


@dataclass(frozen=True)
class Target:
    registry: str
    prefix: str = ""

    @classmethod
    def parse(cls, text: str) -> "Target":
        text = (text or "").strip()
        for scheme in ("docker://", "https://", "http://"):
            if text.startswith(scheme):
                text = text[len(scheme):]
        registry, _, prefix = text.partition("/")
        prefix = prefix.strip("/")
        if not registry or not is_domain(registry):
            raise ReferenceError(f"invalid registry {text!r} (expected REGISTRY[/PREFIX], e.g. 127.0.0.1:5000/mirror)")
        if prefix:
            try:
                validate_name(prefix)
            except OciError:
                raise ReferenceError(f"invalid repository prefix {prefix!r}") from None
        return cls(DOCKER_HUB if registry in ("docker.io", DOCKER_HUB_API) else registry, prefix)

    def __str__(self) -> str:
        return f"{self.registry}/{self.prefix}" if self.prefix else self.registry

    def holds(self, repository: str) -> bool:
        return not self.prefix or repository.startswith(self.prefix + "/")

    def relative(self, repository: str) -> str:
        return repository[len(self.prefix) + 1:] if self.prefix else repository

    def ref(self, relative: str, tag: str | None = None) -> Reference:
        repository = f"{self.prefix}/{relative}" if self.prefix else relative
        try:
            validate_name(repository)
        except OciError:
            raise ReferenceError(f"{self.registry}/{repository} is not a repository name") from None
        return Reference(self.registry, repository, tag)
