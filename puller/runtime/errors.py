"""The runtime's errors, under the client's one root; str() of each is one
line for the user.

    ClientError (puller.errors)
     +-- UnpackError              an image could not be unpacked or run
          +-- UnsafeEntry             an entry reaches outside the root, or is malformed
          +-- ReservedPath            a path passes under a directory the caller reserved
          +-- LayerVerificationError  the uncompressed layer does not hash to its diff ID
          +-- LayerTooLarge           past a bound of UnpackLimits (gzip bomb guard)
          +-- CorruptLayer            a truncated or invalid compressed stream or tar archive
          +-- ConfigError             the image config cannot become a runtime config
          +-- RunError                the container could not be started

An OSError (a full disk, a directory we may not write) leaves the runtime's
entry points (prepare_image, write_bundle, run_container, SnapshotCache) as
an UnpackError with the same one line, through `os_errors_mapped`.
"""

from __future__ import annotations

import functools
import inspect

from puller.errors import ClientError, one_line


class UnpackError(ClientError):
    """An image could not be unpacked; str() is one line for the user."""


class UnsafeEntry(UnpackError):
    """An archive entry tries to reach outside the root or is malformed."""


class ReservedPath(UnpackError):
    """A path resolves through a first-level directory the caller reserved
    (confine.resolve_dir); callers turn it into their own message."""

    def __init__(self, name: str):
        super().__init__(f"/{name} is reserved")
        self.name = name


class LayerVerificationError(UnpackError):
    """The uncompressed layer does not hash to its diff ID."""


class LayerTooLarge(UnpackError):
    """The uncompressed layer exceeds the configured limit (gzip bomb guard)."""


class CorruptLayer(UnpackError):
    """The compressed stream or the tar archive is truncated or invalid."""


class ConfigError(UnpackError):
    """The image config (or the user's settings) cannot be turned into a runtime config."""


class RunError(UnpackError):
    """The container could not be started (one line for the user)."""


def os_errors_mapped(fn):
    """Decorate a runtime entry point (a function or a coroutine function):
    an OSError it raises leaves it as an UnpackError saying the same line."""
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def mapped_async(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except OSError as exc:
                raise UnpackError(one_line(exc)) from exc
        return mapped_async

    @functools.wraps(fn)
    def mapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            raise UnpackError(one_line(exc)) from exc
    return mapped
