"""Lifecycle rules the registry enforces on writes: immutable tags and
read-only mode (settings `lifecycle.*`).

- Immutable tags (`lifecycle.immutable_tags`: comma-separated
  "<repository glob>:<tag glob>" rules, e.g. "prod/*:v*,*:release-*"): a
  tag a rule matches can be pushed once; pushing other bytes under it, or
  deleting it (or, by digest, the manifest it names), is DENIED with a
  message naming the rule. Pushing the same bytes again is accepted
  (docker and skopeo re-push on retry). Two first pushes racing each other
  may both land, the later winning, as nothing holds a lock between them.
- Read-only mode (`lifecycle.read_only`): every write (POST, PUT, PATCH,
  DELETE under /v2/) is refused with 405 UNSUPPORTED and a message saying
  the registry is read-only; reads go on. Switched at run time by editing
  the setting and sending `dockyard serve` SIGHUP (every worker re-reads it).
"""

from __future__ import annotations

from registry.lifecycle.rules import (READ_ONLY, ImmutableTags, ReadOnlySwitch, guard_manifest_delete,
                                      guard_manifest_put, read_only_middleware)

__all__ = ["ImmutableTags", "READ_ONLY", "ReadOnlySwitch", "guard_manifest_delete", "guard_manifest_put",
           "read_only_middleware"]
