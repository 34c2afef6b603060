"""The filesystem driver's fsync policy: what each mode flushes.

fsync calls are counted by wrapping os.fsync (the real call still runs):
the policy is about which files and directories are flushed, which no
observable behaviour short of a power cut shows.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat

import pytest

from storage import layout
from storage.filesystem import FilesystemDriver
from storage.store import ContentStore


@pytest.fixture
def fsyncs(monkeypatch):
    """Every fsync as 'dir' or 'file', in call order."""
    calls: list[str] = []
    real = os.fsync

    def counting(fd):
        calls.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        return real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


@pytest.mark.parametrize("mode, durable, expected", [
    ("data", True, ["file"]),
    ("data", False, []),
    # the file, its two new directories (built hidden), the parent they were renamed into
    ("full", True, ["file", "dir", "dir", "dir"]),
    ("full", False, ["file", "dir", "dir", "dir"]),
    ("off", True, []),
])
async def test_put_content(tmp_path, fsyncs, mode, durable, expected):
    driver = FilesystemDriver(str(tmp_path), fsync=mode)
    await driver.put_content("/a/b/c", b"x", durable=durable)
    assert fsyncs == expected
    assert await driver.get_content("/a/b/c") == b"x"


@pytest.mark.parametrize("mode, expected", [("data", 1), ("full", 1), ("off", 0)])
async def test_writer_commit_syncs_file_data(tmp_path, fsyncs, mode, expected):
    driver = FilesystemDriver(str(tmp_path), fsync=mode)
    os.makedirs(tmp_path / "w")
    writer = await driver.writer("/w/f")
    await writer.write(b"data")
    await writer.commit()
    assert fsyncs.count("file") == expected


async def test_blob_push_syncs_blob_data_and_link_only(tmp_path, fsyncs):
    """Default policy, blobs pushed in sessions: the bytes and the repo link
    are flushed (and the catalog entry, once per repository); the session's
    scratch files and directories are not."""
    store = ContentStore(FilesystemDriver(str(tmp_path)))

    async def push(data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()

        async def body():
            yield data

        upload = await store.uploads.start("r")
        await store.uploads.append("r", upload.upload_id, body())
        await store.uploads.finish("r", upload.upload_id, digest)
        return digest

    await push(b"first")
    assert fsyncs == ["file", "file", "file"]     # bytes, link, catalog entry
    fsyncs.clear()
    data = os.urandom(1000)
    digest = await push(data)
    assert fsyncs == ["file", "file"]              # bytes, link
    blob = tmp_path / layout.blob_data(digest).lstrip("/")
    assert blob.read_bytes() == data


def test_unknown_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fsync must be one of"):
        FilesystemDriver(str(tmp_path), fsync="sometimes")


async def test_reclaim_leftovers_removes_old_hidden_writes_only(tmp_path):
    """What interrupted puts leave (hidden temp files, hidden staging trees)
    goes once old enough; fresh ones (a put in progress) and everything
    visible stay."""
    import time

    from storage.filesystem import TEMP_PREFIX
    driver = FilesystemDriver(str(tmp_path))
    await driver.put_content("/repo/tags/v1/current/link", b"sha256:aa")
    tags = tmp_path / "repo" / "tags"
    old_file = tags / "v1" / "current" / f"{TEMP_PREFIX}1-old"
    old_tree = tags / f"{TEMP_PREFIX}2-old" / "current"
    fresh_file = tags / f"{TEMP_PREFIX}3-fresh"
    old_tree.mkdir(parents=True)
    (old_tree / "link").write_bytes(b"sha256:bb")
    old_file.write_bytes(b"partial")
    fresh_file.write_bytes(b"in progress")
    now = time.time()
    for path in (old_file, old_tree.parent):
        os.utime(path, (now - 7200, now - 7200))
    assert await driver.reclaim_leftovers(now - 3600) == 2
    assert not old_file.exists() and not old_tree.parent.exists()
    assert fresh_file.exists()
    assert await driver.get_content("/repo/tags/v1/current/link") == b"sha256:aa"
    assert await driver.list("/repo/tags") == ["/repo/tags/v1"]


def test_upload_lock_holds_across_processes(tmp_path):
    """The lock of one worker process excludes another's (flock), and is
    dropped by the kernel when its holder dies."""
    import subprocess
    import sys
    import textwrap

    driver = FilesystemDriver(str(tmp_path / "root"))
    asyncio.run(driver.put_content("/u/data", b""))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import asyncio, sys, time
        from storage.filesystem import FilesystemDriver
        async def main():
            lock = await FilesystemDriver({str(tmp_path / 'root')!r}).try_lock("/u/lock")
            print("held" if lock else "busy", flush=True)
            time.sleep(60)
        asyncio.run(main())
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert asyncio.run(driver.try_lock("/u/lock")) is None
    finally:
        holder.kill()
        holder.wait()

    async def after_death():
        lock = await driver.try_lock("/u/lock")
        assert lock is not None
        await lock.release()

    asyncio.run(after_death())
