"""Dockyard's unpacked rootfs vs `docker export` of the same image, file by file.

The image is built by a real Docker daemon (FROM scratch + busybox-static +
RUN steps) so its layers carry Docker's own whiteouts, opaque directories,
hard links (including to files of lower layers), symlinks, a fifo, a setuid
file and files owned by a non-root user; it is pushed to a Dockyard registry,
pulled and unpacked by `dockyard unpack`, and compared with `docker export`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.support import REPO_ROOT
from tests.support.peers import busybox_path, require_root

pytestmark = pytest.mark.interop

DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
RUN mkdir -p /data/keep /data/gone /opq/old /etc && echo a > /data/keep/a && echo b > /data/gone/b \\
 && echo old > /opq/old/f && echo base > /base.txt && ln /base.txt /base-link \\
 && echo 'root:x:0:0:root:/root:/bin/sh' > /etc/passwd && echo 'root:x:0:' > /etc/group \\
 && echo 'bob:x:1234:1234::/home/bob:/bin/sh' >> /etc/passwd && echo 'bob:x:1234:' >> /etc/group \\
 && mkdir -p /home/bob/d && echo x > /home/bob/d/f && chown -R bob:bob /home/bob \\
 && mkfifo /fifo && cp /bin/busybox /suid && chmod 4755 /suid && chmod 2750 /home/bob/d \\
 && ln -s /data/keep/a /sym && chmod 700 /data/keep
RUN rm -rf /data/gone /opq && mkdir -p /opq/new && echo new > /opq/new/f \\
 && ln /base.txt /data/lower-link && chmod 755 /data/keep && chown 1234:50 /data \\
 && ln -s ../base.txt /data/relsym && echo changed > /data/keep/a && rm /base-link && touch /home/bob/d/g
"""

# what `docker create` adds to a container's filesystem (the init layer)
DOCKER_ADDED = {".dockerenv", "etc/hostname", "etc/hosts", "etc/resolv.conf", "etc/mtab", "proc", "sys", "dev"}


def _describe_export(tar_path: Path) -> tuple[dict, set]:
    entries, links = {}, {}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            name = m.name.rstrip("/").removeprefix("./")
            if not name or name in DOCKER_ADDED or name.startswith("dev/"):
                continue
            if m.islnk():
                links[name] = m.linkname.rstrip("/").removeprefix("./")
                continue
            if m.isreg():
                content = hashlib.sha256(tar.extractfile(m).read()).hexdigest()
                kind = "file"
            elif m.isdir():
                content, kind = None, "dir"
            elif m.issym():
                content, kind = m.linkname, "symlink"
            elif m.isfifo():
                content, kind = None, "fifo"
            else:
                content, kind = (m.devmajor, m.devminor), "dev"
            entries[name] = (kind, m.mode & 0o7777, m.uid, m.gid, content)
    groups: dict[str, set] = {}
    for name, target in links.items():
        entries[name] = entries[target]
        groups.setdefault(target, {target}).add(name)
    return entries, {frozenset(g) for g in groups.values()}


def _describe_rootfs(root: Path) -> tuple[dict, set]:
    entries, by_inode = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                kind, content = "file", hashlib.sha256(full.read_bytes()).hexdigest()
            elif stat.S_ISDIR(st.st_mode):
                kind, content = "dir", None
            elif stat.S_ISLNK(st.st_mode):
                kind, content = "symlink", os.readlink(full)
            elif stat.S_ISFIFO(st.st_mode):
                kind, content = "fifo", None
            else:
                kind, content = "dev", (os.major(st.st_rdev), os.minor(st.st_rdev))
            entries[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, content)
            if kind != "dir" and st.st_nlink > 1:
                by_inode.setdefault(st.st_ino, set()).add(rel)
    return entries, {frozenset(g) for g in by_inode.values() if len(g) > 1}


def test_unpack_matches_docker_export(dockerd, dockyard_registry, tmp_path):
    require_root()
    context = tmp_path / "ctx"
    context.mkdir()
    shutil.copy2(busybox_path(), context / "busybox")
    (context / "Dockerfile").write_text(DOCKERFILE)
    ref = f"{dockyard_registry.host}/unpack-tests/equivalence:1"
    dockerd.run("build", "-q", "-t", ref, str(context), timeout=300)
    dockerd.run("push", ref, timeout=300)
    cid = dockerd.run("create", ref, "/bin/true").stdout.strip()
    export = tmp_path / "export.tar"
    dockerd.run("export", "-o", str(export), cid)
    dockerd.run("rm", cid)

    bundle = tmp_path / "bundle"
    proc = subprocess.run([sys.executable, "-m", "puller", "unpack", "-q", "--plain-http",
                           "--store", str(tmp_path / "store"), "--cache", str(tmp_path / "cache"),
                           ref, str(bundle)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr

    theirs, their_groups = _describe_export(export)
    ours, our_groups = _describe_rootfs(bundle / "rootfs")
    # the image really exercises what it is meant to
    assert theirs["suid"][1] == 0o4755 and theirs["fifo"][0] == "fifo"
    assert theirs["home/bob/d/f"][2] == 1234 and theirs["data"][2:4] == (1234, 50)
    assert "opq/old" not in theirs and "data/gone" not in theirs and "base-link" not in theirs
    assert any({"base.txt", "data/lower-link"} <= g for g in their_groups)

    only_theirs = sorted(set(theirs) - set(ours))
    only_ours = sorted(set(ours) - set(theirs))
    assert (only_theirs, only_ours) == ([], [])
    diffs = {p: (theirs[p], ours[p]) for p in theirs if theirs[p] != ours[p]}
    assert diffs == {}
    assert their_groups == our_groups
