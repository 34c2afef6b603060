"""The one suite every storage driver passes.

It runs over every driver registered in tests/support/drivers.py and names
none of them: a new driver registers a factory and a cleanup there. Each
test gets a driver on storage of its own under a random prefix (so the
suite may share a bucket with other runs); afterwards the prefix is cleaned
up and must then be empty (the `driver_space` fixture checks it).
"""

from __future__ import annotations

import asyncio
import os

import pytest

from storage.driver import (HIDDEN_PREFIX, MAX_PATH, FileWriter, InvalidOffset, InvalidPath, PathNotFound,
                            StorageDriver, check_path)
from storage.filesystem import FilesystemDriver
from tests.support.drivers import walk


@pytest.fixture
async def driver(driver_space) -> StorageDriver:
    """A driver of each registered kind, on a prefix of its own."""
    return await driver_space.open()


async def read_all(driver: StorageDriver, path: str, **kw) -> bytes:
    return b"".join([chunk async for chunk in driver.reader(path, **kw)])


# ---- whole content ----------------------------------------------------------

async def test_put_get_round_trip(driver):
    payload = bytes(range(256)) * 1000
    await driver.put_content("/a/b/blob", payload)
    assert await driver.get_content("/a/b/blob") == payload
    await driver.put_content("/a/b/blob", b"second")
    assert await driver.get_content("/a/b/blob") == b"second"
    await driver.put_content("/a/empty", b"")
    assert await driver.get_content("/a/empty") == b""
    info = await driver.stat("/a/b/blob")
    assert (info.size, info.is_dir, info.path) == (6, False, "/a/b/blob")
    assert (await driver.stat("/a/b")).is_dir


async def test_no_temp_file_ever_listed(driver):
    await asyncio.gather(*(driver.put_content(f"/d/f{i}", b"x" * (i * 1000)) for i in range(20)))
    assert await walk(driver) == sorted(f"/d/f{i}" for i in range(20))
    if isinstance(driver, FilesystemDriver):  # and nothing left behind on disk either
        assert sorted(os.listdir(os.path.join(driver.root, "d"))) == sorted(f"f{i}" for i in range(20))


async def test_concurrent_readers_see_old_or_new_never_partial(driver):
    old, new = b"o" * 300_000, b"n" * 700_000
    await driver.put_content("/atomic", old)
    seen = set()

    async def write_loop():
        for i in range(30):
            await driver.put_content("/atomic", new if i % 2 == 0 else old)

    async def read_loop():
        for _ in range(60):
            data = await driver.get_content("/atomic")
            assert data in (old, new), f"partial read of {len(data)} bytes"
            seen.add(data[:1])

    await asyncio.gather(write_loop(), read_loop(), read_loop())
    assert seen  # the readers did read


# ---- streams ----------------------------------------------------------------

async def test_reader_offsets_and_lengths(driver):
    payload = os.urandom(50_000)
    await driver.put_content("/r", payload)
    assert await read_all(driver, "/r") == payload
    assert await read_all(driver, "/r", offset=1234) == payload[1234:]
    assert await read_all(driver, "/r", offset=10, length=100) == payload[10:110]
    assert await read_all(driver, "/r", offset=49_990, length=100) == payload[49_990:]
    assert await read_all(driver, "/r", offset=50_000) == b""
    assert await read_all(driver, "/r", length=0) == b""
    chunks = [c async for c in driver.reader("/r", chunk_size=7000)]
    assert len(chunks) == 8 and all(len(c) <= 7000 for c in chunks)
    assert b"".join(chunks) == payload


async def test_reader_invalid_offset(driver):
    await driver.put_content("/r", b"0123456789")
    with pytest.raises(InvalidOffset) as err:
        await read_all(driver, "/r", offset=11)
    assert err.value.offset == 11
    with pytest.raises(InvalidOffset):
        await read_all(driver, "/r", offset=-1)


async def test_open_reader_gives_the_size_before_the_bytes(driver):
    payload = os.urandom(50_000)
    await driver.put_content("/o/blob", payload)
    await driver.put_content("/o/empty", b"")
    opened = await driver.open_reader("/o/blob", chunk_size=7000)
    assert opened.size == len(payload)
    chunks = [c async for c in opened]
    await opened.aclose()
    assert b"".join(chunks) == payload and max(map(len, chunks)) <= 7000
    empty = await driver.open_reader("/o/empty")
    assert empty.size == 0 and [c async for c in empty] == []
    await empty.aclose()
    for absent in ("/o/none", "/o"):               # nothing there, a directory
        with pytest.raises(PathNotFound):
            await driver.open_reader(absent)
    # opened and closed unread (a request refused after the GET went out):
    # nothing is held, and the file reads again
    for _ in range(20):
        await (await driver.open_reader("/o/blob")).aclose()
    assert await read_all(driver, "/o/blob") == payload


async def test_writer_appends_across_sessions(driver):
    w = await driver.writer("/up/data")
    assert isinstance(w, FileWriter) and w.size == 0
    await w.write(b"hello ")
    assert w.size == 6
    await w.close()
    w = await driver.writer("/up/data", append=True)
    assert w.size == 6
    await w.write(b"world")
    await w.write(b"!")
    assert w.size == 12
    await w.commit()
    assert await driver.get_content("/up/data") == b"hello world!"
    assert (await driver.stat("/up/data")).size == 12
    # without append, a writer starts the file afresh
    w = await driver.writer("/up/data")
    await w.write(b"new")
    await w.commit()
    assert await driver.get_content("/up/data") == b"new"


async def test_writer_cancel_discards(driver):
    w = await driver.writer("/up/data")
    await w.write(b"junk")
    await w.cancel()
    with pytest.raises(PathNotFound):
        await driver.stat("/up/data")


async def test_atomic_writer_shows_nothing_before_commit(driver):
    """atomic_writer (offered by drivers that can write in place and show it
    at once, S3): the old content stays whole until commit, which replaces
    it with all the new; cancel and close leave it as it was. 11 MiB cross
    the part boundaries of every S3 test driver (5 MiB parts)."""
    first = await driver.atomic_writer("/aw/file")
    if first is None:
        # The contract's default: callers stage with `writer` and `move`.
        assert type(driver).atomic_writer is StorageDriver.atomic_writer
        return
    await driver.put_content("/aw/file", b"old")
    new = os.urandom(11 << 20)
    await first.write(new[:6 << 20])
    await first.write(new[6 << 20:])
    assert first.size == len(new)
    assert await driver.get_content("/aw/file") == b"old" and (await driver.stat("/aw/file")).size == 3
    await first.commit()
    assert await driver.get_content("/aw/file") == new
    for end in ("cancel", "close"):
        w = await driver.atomic_writer("/aw/file")
        await w.write(os.urandom(6 << 20))
        await getattr(w, end)()
        assert (await driver.stat("/aw/file")).size == len(new), end
    small = await driver.atomic_writer("/aw/new/small")
    await small.write(b"tiny")
    with pytest.raises(PathNotFound):
        await driver.stat("/aw/new/small")
    await small.commit()
    assert await driver.get_content("/aw/new/small") == b"tiny"
    with pytest.raises(InvalidPath):
        await driver.atomic_writer("/aw/" + HIDDEN_PREFIX + "x")


# ---- listing and metadata -----------------------------------------------------

async def test_list_is_sorted_full_paths(driver):
    for name in ["zeta", "alpha", "Mid", "b/inner", "a-b", "a"]:
        await driver.put_content(f"/dir/{name}", b"1")
    assert await driver.list("/dir") == ["/dir/Mid", "/dir/a", "/dir/a-b", "/dir/alpha",
                                         "/dir/b", "/dir/zeta"]
    assert await driver.list("/") == ["/dir"]
    assert await driver.list("/dir/b") == ["/dir/b/inner"]


async def test_listing_and_deleting_over_a_thousand_entries(driver):
    """Object stores answer a listing 1,000 entries a page (and delete 1,000
    keys a request): where pagination bugs live. A directory of 1,130
    entries, files with subdirectories among them (so pages end on both),
    lists whole and sorted, and is deleted whole."""
    entries = [f"e{i:05d}" for i in range(1130)]
    subdirs = set(entries[::37])
    semaphore = asyncio.Semaphore(16)

    async def put(name: str) -> None:
        async with semaphore:
            path = f"/big/{name}/inner" if name in subdirs else f"/big/{name}"
            await driver.put_content(path, name.encode())

    await asyncio.gather(*(put(name) for name in entries))
    assert await driver.list("/big") == [f"/big/{name}" for name in entries]
    assert (await driver.stat(f"/big/{entries[37]}")).is_dir
    assert await driver.get_content(f"/big/{entries[-1]}") == entries[-1].encode()
    deep = entries[37 * 30]                          # a subdirectory on the second page
    assert await driver.list(f"/big/{deep}") == [f"/big/{deep}/inner"]
    await driver.delete("/big")
    with pytest.raises(PathNotFound):
        await driver.list("/big")
    assert await driver.list("/") == []


# ---- changes -------------------------------------------------------------------

async def test_move_replaces_destination(driver):
    await driver.put_content("/src/x", b"source")
    await driver.put_content("/dst/y", b"old")
    await driver.move("/src/x", "/dst/y")
    assert await driver.get_content("/dst/y") == b"source"
    with pytest.raises(PathNotFound):
        await driver.stat("/src/x")
    await driver.put_content("/src/z", b"z")
    await driver.move("/src/z", "/new/deep/dir/z")  # parents are created
    assert await driver.get_content("/new/deep/dir/z") == b"z"


async def test_delete_file_and_tree(driver):
    for p in ["/t/a/1", "/t/a/b/2", "/t/a/b/c/3", "/t/keep"]:
        await driver.put_content(p, b"x")
    await driver.delete("/t/a")
    for p in ["/t/a", "/t/a/1", "/t/a/b/c/3"]:
        with pytest.raises(PathNotFound):
            await driver.stat(p)
    assert await driver.list("/t") == ["/t/keep"]
    await driver.delete("/t/keep")
    try:                                    # emptied: listed empty, or gone (object stores)
        assert await driver.list("/t") == []
    except PathNotFound:
        pass


async def test_path_not_found_everywhere(driver):
    await driver.put_content("/file", b"x")
    with pytest.raises(PathNotFound):
        await driver.get_content("/missing")
    with pytest.raises(PathNotFound):
        await read_all(driver, "/missing")
    with pytest.raises(PathNotFound):
        await driver.stat("/missing/deeper")
    with pytest.raises(PathNotFound):
        await driver.list("/missing")
    with pytest.raises(PathNotFound):
        await driver.list("/file")  # a file is not a directory
    with pytest.raises(PathNotFound):
        await driver.delete("/missing")
    with pytest.raises(PathNotFound):
        await driver.move("/missing", "/elsewhere")
    with pytest.raises(PathNotFound):
        await driver.stat("/elsewhere")


BAD_PATHS = ["", "relative/path", "/a/../b", "/..", "/a/..", "/a//b", "/a/", "/a/./b",
             "/a\x00b", "/.dockyard-tmp-123-abc", "/a/.dockyard-tmp-x/b"]


@pytest.mark.parametrize("bad", BAD_PATHS)
async def test_invalid_paths_rejected(driver, bad):
    with pytest.raises(InvalidPath):
        await driver.put_content(bad, b"x")
    with pytest.raises(InvalidPath):
        await driver.get_content(bad)
    with pytest.raises(InvalidPath):
        await read_all(driver, bad)
    with pytest.raises(InvalidPath):
        await driver.writer(bad)
    with pytest.raises(InvalidPath):
        await driver.stat(bad)
    with pytest.raises(InvalidPath):
        await driver.list(bad)
    with pytest.raises(InvalidPath):
        await driver.delete(bad)
    with pytest.raises(InvalidPath):
        await driver.move(bad, "/ok")
    with pytest.raises(InvalidPath):
        await driver.move("/ok", bad)


@pytest.mark.parametrize("bad", BAD_PATHS + ["/" + "a" * MAX_PATH, f"/x/{HIDDEN_PREFIX}"])
def test_check_path_is_the_contracts_rule(bad):
    """The rule itself, as every driver applies it (StorageDriver.check_path)."""
    with pytest.raises(InvalidPath):
        check_path(bad)
    with pytest.raises(InvalidPath):
        StorageDriver.check_path(bad)


@pytest.mark.parametrize("good", ["/", "/a", "/a/b.c/d-e_f", "/.hidden-but-ordinary", "/a/..b", "/a/b.",
                                  "/" + "a" * (MAX_PATH - 1), "/docker/registry/v2/blobs/sha256/ab/" + "ab" * 32])
def test_check_path_accepts_ordinary_paths(good):
    check_path(good)


@pytest.mark.parametrize("bad", BAD_PATHS)
async def test_invalid_paths_rejected_by_every_operation(driver, bad):
    """The operations test_invalid_paths_rejected does not cover apply the same rule."""
    with pytest.raises(InvalidPath):
        await driver.stat_many(["/ok", bad])
    with pytest.raises(InvalidPath):
        await driver.get_many([bad])
    with pytest.raises(InvalidPath):
        await driver.try_lock(bad)
    with pytest.raises(InvalidPath):
        await driver.open_local(bad)
    with pytest.raises(InvalidPath):
        await driver.writer(bad, append=True)


async def test_root_cannot_be_deleted_or_written(driver):
    await driver.put_content("/x", b"1")
    with pytest.raises(InvalidPath):
        await driver.delete("/")
    with pytest.raises(InvalidPath):
        await driver.put_content("/", b"1")
    assert await driver.get_content("/x") == b"1"


async def test_direct_access_hints(driver):
    await driver.put_content("/blob", b"bytes")
    url = await driver.url_for("/blob")
    assert url is None or isinstance(url, str)
    local = await driver.open_local("/blob")
    if local is not None:
        try:
            assert (local.size, os.pread(local.fd, 100, 0)) == (5, b"bytes")
        finally:
            local.close()
    with pytest.raises(PathNotFound):
        await driver.open_local("/absent")


async def test_put_survives_concurrent_delete_of_its_directory(driver):
    """A tag being re-pointed while another worker deletes the tag: each
    put either lands whole or is deleted afterwards, never fails."""
    async def put_loop():
        for i in range(40):
            await driver.put_content("/tags/t/current/link", b"digest-%d" % i)

    async def delete_loop():
        for _ in range(40):
            try:
                await driver.delete("/tags/t")
            except PathNotFound:
                pass
            await asyncio.sleep(0)

    await asyncio.gather(put_loop(), delete_loop(), put_loop())
    await driver.put_content("/tags/t/current/link", b"final")
    assert await driver.get_content("/tags/t/current/link") == b"final"
    assert await walk(driver) == ["/tags/t/current/link"]


async def test_stat_many(driver):
    await driver.put_content("/m/file", b"12345")
    infos = await driver.stat_many(["/m/file", "/m/absent", "/m", "/m/file/below", "/nowhere/x"])
    assert [None if i is None else (i.path, i.size, i.is_dir) for i in infos] == [
        ("/m/file", 5, False), None, ("/m", 0, True), None, None]
    assert await driver.stat_many([]) == []
    with pytest.raises(InvalidPath):
        await driver.stat_many(["/ok", "relative"])


async def test_stat_files(driver):
    """Like stat_many, but a directory is None: callers ask only about files."""
    await driver.put_content("/m/file", b"12345")
    infos = await driver.stat_files(["/m/file", "/m/absent", "/m", "/m/file/below", "/nowhere/x"])
    assert [None if i is None else (i.path, i.size, i.is_dir) for i in infos] == [
        ("/m/file", 5, False), None, None, None, None]
    assert await driver.stat_files([]) == []
    with pytest.raises(InvalidPath):
        await driver.stat_files(["/ok", "relative"])


async def test_get_many(driver):
    await driver.put_content("/g/a", b"alpha")
    await driver.put_content("/g/b", b"")
    assert await driver.get_many(["/g/a", "/g/absent", "/g/b", "/nowhere/x"]) == [
        b"alpha", None, b"", None]
    assert await driver.get_many([]) == []
    with pytest.raises(InvalidPath):
        await driver.get_many(["/ok", "relative"])


# ---- locks (one request at a time on an upload session) ----------------------

async def test_lock_is_exclusive_until_released(driver):
    await driver.put_content("/s/data", b"")
    first = await driver.try_lock("/s/lock")
    assert first is not None
    assert await driver.try_lock("/s/lock") is None       # held: refused at once
    await first.release()
    second = await driver.try_lock("/s/lock")
    assert second is not None
    async with second:                                    # released on exit
        assert await driver.try_lock("/s/lock") is None
    third = await driver.try_lock("/s/lock")
    assert third is not None
    await third.release()


async def test_lock_never_creates_directories(driver):
    with pytest.raises(PathNotFound):
        await driver.try_lock("/absent/dir/lock")
    with pytest.raises(PathNotFound):
        await driver.stat("/absent")


async def test_lock_of_a_deleted_directory_is_gone(driver):
    """A session finished (its directory deleted) under the lock: whoever
    comes next finds nothing to lock, never a fresh lock on a dead session."""
    await driver.put_content("/sess/data", b"x")
    held = await driver.try_lock("/sess/lock")
    assert held is not None
    await driver.delete("/sess")
    await held.release()
    with pytest.raises(PathNotFound):
        await driver.try_lock("/sess/lock")


async def test_lock_waiters_take_turns(driver):
    """Many contenders, one holder at a time: a counter changed only under
    the lock never sees two holders."""
    await driver.put_content("/turns/data", b"")
    holders, most, taken = 0, 0, 0

    async def contender():
        nonlocal holders, most, taken
        for _ in range(200):
            lock = await driver.try_lock("/turns/lock")
            if lock is None:
                await asyncio.sleep(0.001)
                continue
            holders += 1
            most = max(most, holders)
            await asyncio.sleep(0.001)
            holders -= 1
            taken += 1
            await lock.release()
            if taken >= 20:
                return

    await asyncio.wait_for(asyncio.gather(*(contender() for _ in range(5))), 30)
    assert most == 1 and taken >= 20


# ---- the suite's own check: nothing left behind --------------------------------

async def test_a_cleanup_that_leaves_something_is_caught(tmp_path):
    """The check every test above ends with fails when the cleanup misses objects."""
    from tests.support.drivers import DriverKind, DriverSpace, LeftBehind, driver_kind

    real = driver_kind("filesystem")
    careless = DriverKind("careless", real.factory, cleanup=lambda prefix, scratch: None, stored=real.stored)
    space = DriverSpace(careless, tmp_path)
    await (await space.open()).put_content("/kept/forever", b"x")
    with pytest.raises(LeftBehind, match="/kept/forever"):
        await space.destroy()
    real.cleanup(space.prefix, tmp_path)
    assert real.stored(space.prefix, tmp_path) == []
