"""The hidden files an export writes beside its output, and how a later
export to the same output tells a dead one's from a live one's.

    .NAME.staging-XXXXXXXX      the blobs fetched so far (a directory)
    .NAME.XXXXXXXX.partial      the bundle (or a volume) being written

The process writing one holds an exclusive flock on it for as long as it
runs; the kernel drops the lock when the process dies, however it dies
(SIGKILL included). So at its start an export removes every such file of its
own output that it can lock: nothing a running export still writes, and
nothing of another output (the names are matched exactly).

    hold(fd)                   lock what this process writes (until fd is closed)
    remove_stale(output)       -> the leftovers removed
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import re
import shutil

STAGING = "staging-"
PARTIAL = ".partial"
_RANDOM = r"[a-z0-9_]{8}"          # what tempfile puts in a name


def staging_prefix(output: pathlib.Path) -> str:
    return f".{output.name}.{STAGING}"


def partial_prefix(output: pathlib.Path) -> str:
    return f".{output.name}."


def hold(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _pattern(output: pathlib.Path) -> re.Pattern:
    name = re.escape(output.name)
    return re.compile(rf"\.{name}\.(?:{STAGING}{_RANDOM}|{_RANDOM}{re.escape(PARTIAL)})")


def _unlocked(path: pathlib.Path) -> bool:
    """Whether nobody holds the lock on path (it is then taken: the caller removes it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale(output: pathlib.Path) -> list[pathlib.Path]:
    """Remove the leftovers of exports to `output` that died; blocking (run it in a thread)."""
    directory = output.parent
    pattern = _pattern(output)
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed                  # no directory yet: the export says so when it writes
    for name in names:
        path = directory / name
        if not pattern.fullmatch(name) or path.is_symlink() or not _unlocked(path):
            continue
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        removed.append(path)
    return removed


__all__ = ["hold", "partial_prefix", "remove_stale", "staging_prefix"]
