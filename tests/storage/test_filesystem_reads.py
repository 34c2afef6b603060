"""The filesystem driver's stream reads: what the page cache holds is read on
the event loop (preadv with RWF_NOWAIT, which never waits for the disk);
what it does not is read in a thread, and a consumer that stops in the
middle of such a read never leaves a descriptor behind nor has one closed
under a running read.

Pages are pushed out of the page cache with posix_fadvise(DONTNEED) after
an fsync (clean pages are dropped at once), which is what makes the
thread path observable without root or a cache flush of the machine.
"""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from storage.filesystem import FilesystemDriver

SIZE = 3 * (1 << 20) + 12345


def _open_fds(path) -> int:
    """Descriptors of this process open on path: other tests' sockets and
    files closing meanwhile (the whole table's count once went from 30 to
    28 under load) do not move it."""
    target = os.path.realpath(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                count += 1
        except OSError:
            pass                 # closed while we looked
    return count


def _evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def read_threads(monkeypatch):
    """The thread of every preadv(2) (the real call still runs)."""
    seen: list[bool] = []
    real = os.preadv

    def recording(*args):
        seen.append(threading.current_thread() is threading.main_thread())
        return real(*args)

    monkeypatch.setattr(os, "preadv", recording)
    return seen


@pytest.fixture
def stored(tmp_path):
    driver = FilesystemDriver(str(tmp_path / "root"), fsync="off")
    data = os.urandom(SIZE)
    (tmp_path / "root" / "blob").write_bytes(data)
    return driver, tmp_path / "root" / "blob", data


async def _read(driver, path="/blob", **kw) -> bytes:
    return b"".join([bytes(c) async for c in driver.reader(path, **kw)])


async def test_a_cached_file_is_read_on_the_event_loop(stored, read_threads):
    driver, full, data = stored
    full.read_bytes()                       # now in the page cache
    assert await _read(driver, chunk_size=256 << 10) == data
    assert read_threads and all(read_threads), "a cached read went to a thread"


async def test_an_evicted_file_is_read_in_threads_with_the_same_bytes(stored, read_threads):
    driver, full, data = stored
    _evict(full)
    got = await _read(driver, offset=1000, length=SIZE - 2000, chunk_size=1 << 20)
    assert got == data[1000:SIZE - 1000]
    assert not all(read_threads), "nothing was read in a thread: the eviction did not happen"


async def test_without_nowait_reads_every_read_is_a_thread_and_still_exact(stored):
    driver, full, data = stored
    driver._nowait_reads = False            # a kernel or filesystem without RWF_NOWAIT
    assert await _read(driver, offset=7, chunk_size=100_000) == data[7:]


async def test_a_consumer_stopping_mid_read_leaves_no_descriptor(stored):
    driver, full, data = stored
    before = _open_fds(full)
    for cached in (True, False):
        if not cached:
            _evict(full)
        stream = driver.reader("/blob", chunk_size=64 << 10)
        first = await stream.__anext__()
        assert bytes(first) == data[:64 << 10]
        await stream.aclose()
    assert _open_fds(full) == before


async def test_a_consumer_cancelled_during_a_thread_read_closes_after_it(stored):
    driver, full, data = stored
    driver._nowait_reads = False
    before = _open_fds(full)

    async def consume():
        async for _ in driver.reader("/blob", chunk_size=1 << 20):
            await asyncio.sleep(0)

    for _ in range(20):
        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # the reads that were running finish in their threads, then close
    for _ in range(100):
        if _open_fds(full) == before:
            break
        await asyncio.sleep(0.01)
    assert _open_fds(full) == before
