"""The Debian-based test image: `debootstrap --variant=minbase bookworm`
from the mirror this machine's apt is configured with, as one gzipped tar
layer. Building it takes a minute or more, so it is built once and kept in a
cache keyed by everything it is made from (suite, variant, architecture,
mirror, what the tar leaves out, this recipe's version): change one and a
new layer is built beside the old.

    mirror = debian_mirror()                        the URI of apt's Debian (not security) source
    layer = debian_layer(cache_dir)                 Path to the .tar.gz (built when missing)
    layer = debian_layer(cache_dir, on_missing=f)   f(reason) when debootstrap is absent (tests: missing_peer)

Concurrent builders (two pytest sessions, a benchmark) take a lock on the
cache directory: the second waits and reuses the first's layer. A layer
appears in the cache only complete (written to a temporary name, renamed).
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

SUITE = "bookworm"
VARIANT = "minbase"
RECIPE = 1                       # bump when the way the layer is made changes
# like a published Debian image: no downloaded packages or package lists
EXCLUDES = ("./var/cache/apt/archives/*.deb", "./var/lib/apt/lists/*_*")
BUILD_TIMEOUT = 1800


class DebianImageError(RuntimeError):
    """The layer could not be built (no mirror configured, debootstrap failed)."""


def _sources_uris(text: str) -> list[tuple[str, list[str]]]:
    """(URI, suites) of each stanza of a deb822 .sources file."""
    found = []
    for stanza in re.split(r"\n\s*\n", text):
        uris = re.search(r"^URIs:\s*(.+)$", stanza, re.M)
        suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
        if uris and suites:
            found += [(uri, suites.group(1).split()) for uri in uris.group(1).split()]
    return found


def _list_uris(text: str) -> list[tuple[str, list[str]]]:
    """(URI, [suite]) of each `deb` line of a one-line-style sources.list."""
    found = []
    for line in text.splitlines():
        words = [w for w in re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()]
        if len(words) >= 3 and words[0] == "deb":
            found.append((words[1], [words[2]]))
    return found


def debian_mirror(suite: str = SUITE) -> str:
    """The Debian mirror apt uses for `suite` (never a host written in here)."""
    candidates: list[tuple[str, list[str]]] = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        candidates += _sources_uris(Path(path).read_text())
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        if Path(path).is_file():
            candidates += _list_uris(Path(path).read_text())
    for uri, suites in candidates:
        if suite in suites and "security" not in uri:
            return uri
    raise DebianImageError(f"no Debian {suite} mirror in /etc/apt/sources.list(.d)")


def _architecture() -> str:
    dpkg = shutil.which("dpkg")
    if dpkg:
        return subprocess.run([dpkg, "--print-architecture"], capture_output=True, text=True,
                              check=True).stdout.strip()
    return os.uname().machine


def cache_key(mirror: str, suite: str = SUITE, variant: str = VARIANT) -> str:
    inputs = {"suite": suite, "variant": variant, "arch": _architecture(), "mirror": mirror.rstrip("/"),
              "excludes": EXCLUDES, "recipe": RECIPE}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _build(target: Path, mirror: str, suite: str, variant: str, debootstrap: str) -> None:
    rootfs = Path(tempfile.mkdtemp(prefix="debian-rootfs-", dir=target.parent))
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        proc = subprocess.run([debootstrap, f"--variant={variant}", suite, str(rootfs), mirror],
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise DebianImageError(f"debootstrap failed ({proc.returncode}): {proc.stderr[-2000:]}")
        gzip = shutil.which("pigz") or shutil.which("gzip")
        with open(partial, "wb") as out:
            tar = subprocess.Popen(["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs),
                                    *(f"--exclude={e}" for e in EXCLUDES), "-cf", "-", "."],
                                   stdout=subprocess.PIPE)
            packed = subprocess.run([gzip, "-6", "-n"], stdin=tar.stdout, stdout=out)
            tar.stdout.close()
            if tar.wait() != 0 or packed.returncode != 0:
                raise DebianImageError("tarring the Debian root filesystem failed")
            out.flush()
            os.fsync(out.fileno())
        partial.rename(target)
    finally:
        partial.unlink(missing_ok=True)
        shutil.rmtree(rootfs, ignore_errors=True)


def debian_layer(cache_dir: str | Path, *, suite: str = SUITE, variant: str = VARIANT,
                 on_missing: Callable[[str], None] | None = None) -> Path:
    """The layer for these inputs, built once into cache_dir."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    mirror = debian_mirror(suite)
    target = cache / f"debian-{suite}-{variant}-{cache_key(mirror, suite, variant)}.tar.gz"
    if target.is_file():
        return target
    debootstrap = shutil.which("debootstrap") or next(
        (p for p in ("/usr/sbin/debootstrap", "/sbin/debootstrap") if os.access(p, os.X_OK)), None)
    if debootstrap is None:
        reason = "peer tool 'debootstrap' is not installed (the Debian test image is built with it)"
        if on_missing:
            on_missing(reason)
        raise DebianImageError(reason)
    with open(cache / ".debian-build.lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)         # another builder finishes first
        if not target.is_file():
            _build(target, mirror, suite, variant, debootstrap)
    return target


__all__ = ["DebianImageError", "cache_key", "debian_layer", "debian_mirror"]
