"""The pass's working sets, in an SQLite file in a private temporary
directory: the blobs present, the blobs marked, the candidates found, the
candidates recorded, and a cache of each manifest's children by digest
(manifests are immutable, so one parse serves every walk of the pass).

It is scratch for one pass, not a metadata database: nothing outside the
pass reads it and it is deleted at the end (a killed pass's directory is
removed by the next pass on the host). It keeps the memory of a pass
bounded whatever the store holds: the sets live on disk, and callers
stream them in pages.

SQLite is blocking file I/O: every call runs on one dedicated thread
(`call`), so a pass inside `serve` never blocks the event loop, and the
connection is only ever used from that thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Iterable, Iterator

_DIR_PREFIX = "dockyard-gc-"
PAGE = 2000                       # rows handed back per page of a streamed query

_SCHEMA = """
CREATE TABLE present   (digest TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE marked    (digest TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE children  (digest TEXT PRIMARY KEY, body TEXT NOT NULL) WITHOUT ROWID;
-- kind: B blob data, L layer link, R manifest revision, T tag; repo "" for B
CREATE TABLE found     (kind TEXT, repo TEXT, name TEXT, mtime REAL, size INTEGER,
                        PRIMARY KEY (kind, repo, name)) WITHOUT ROWID;
CREATE TABLE recorded  (kind TEXT, repo TEXT, name TEXT, PRIMARY KEY (kind, repo, name)) WITHOUT ROWID;
CREATE TABLE deleted   (kind TEXT, repo TEXT, name TEXT, PRIMARY KEY (kind, repo, name)) WITHOUT ROWID;
"""


def remove_stale_dirs(base: str | None = None) -> int:
    """Remove the working directories of passes whose process is gone (a
    pass killed with SIGKILL leaves its own); how many."""
    base = base or tempfile.gettempdir()
    removed = 0
    try:
        names = os.listdir(base)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(_DIR_PREFIX):
            continue
        pid_text = name[len(_DIR_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        shutil.rmtree(os.path.join(base, name), ignore_errors=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MarkSet:
    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dockyard-gc-db")
        self._dir = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
        self._db: sqlite3.Connection | None = None

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def open(self) -> "MarkSet":
        await self.call(self._open)
        return self

    def _open(self) -> None:
        self._db = sqlite3.connect(os.path.join(self._dir, "mark.db"), check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("PRAGMA cache_size=-16384")      # at most 16 MiB of pages in memory
        self._db.executescript(_SCHEMA)

    async def close(self) -> None:
        def close_() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None
            shutil.rmtree(self._dir, ignore_errors=True)
        await self.call(close_)
        self._thread.shutdown(wait=True)

    # ---- writes (each batch in one transaction) -------------------------------------
    def _many(self, sql: str, rows: Iterable[tuple]) -> None:
        assert self._db is not None
        self._db.execute("BEGIN")
        self._db.executemany(sql, rows)
        self._db.execute("COMMIT")

    async def add_present(self, digests: list[str]) -> None:
        await self.call(self._many, "INSERT OR IGNORE INTO present VALUES (?)", [(d,) for d in digests])

    async def mark(self, digests: Iterable[str]) -> None:
        rows = [(d,) for d in digests]
        if rows:
            await self.call(self._many, "INSERT OR IGNORE INTO marked VALUES (?)", rows)

    async def clear_marks(self) -> None:
        await self.call(lambda: self._db.execute("DELETE FROM marked"))

    async def add_found(self, rows: list[tuple[str, str, str, float, int]]) -> None:
        if rows:
            await self.call(self._many, "INSERT OR REPLACE INTO found VALUES (?, ?, ?, ?, ?)", rows)

    async def add_recorded(self, rows: list[tuple[str, str, str]]) -> None:
        if rows:
            await self.call(self._many, "INSERT OR IGNORE INTO recorded VALUES (?, ?, ?)", rows)

    async def add_deleted(self, rows: list[tuple[str, str, str]]) -> None:
        if rows:
            await self.call(self._many, "INSERT OR IGNORE INTO deleted VALUES (?, ?, ?)", rows)

    async def deleted_in(self, repo: str) -> list[tuple[str, str]]:
        """(kind, name) of the links this pass deleted in repo."""
        return await self.call(lambda: self._db.execute(
            "SELECT kind, name FROM deleted WHERE repo = ?", (repo,)).fetchall())

    async def deleted_repos(self) -> list[str]:
        return await self.call(lambda: [r[0] for r in self._db.execute(
            "SELECT DISTINCT repo FROM deleted").fetchall()])

    async def clear_recorded(self) -> None:
        await self.call(lambda: self._db.execute("DELETE FROM recorded"))

    # ---- manifest children cache -------------------------------------------------------
    async def put_children(self, items: list[tuple[str, dict]]) -> None:
        if items:
            await self.call(self._many, "INSERT OR REPLACE INTO children VALUES (?, ?)",
                            [(d, json.dumps(c, separators=(",", ":"))) for d, c in items])

    async def get_children(self, digests: list[str]) -> dict[str, dict]:
        def get() -> dict[str, dict]:
            assert self._db is not None
            out: dict[str, dict] = {}
            for at in range(0, len(digests), 500):
                chunk = digests[at:at + 500]
                marks = ",".join("?" * len(chunk))
                for digest, body in self._db.execute(
                        f"SELECT digest, body FROM children WHERE digest IN ({marks})", chunk):
                    out[digest] = json.loads(body)
            return out
        return await self.call(get) if digests else {}

    # ---- reads ---------------------------------------------------------------------------
    async def is_present(self, digests: list[str]) -> set[str]:
        return await self._members("present", digests)

    async def is_marked(self, digests: list[str]) -> set[str]:
        return await self._members("marked", digests)

    async def _members(self, table: str, digests: list[str]) -> set[str]:
        def get() -> set[str]:
            assert self._db is not None
            out: set[str] = set()
            for at in range(0, len(digests), 500):
                chunk = digests[at:at + 500]
                marks = ",".join("?" * len(chunk))
                out.update(r[0] for r in self._db.execute(
                    f"SELECT digest FROM {table} WHERE digest IN ({marks})", chunk))
            return out
        return await self.call(get) if digests else set()

    def _page(self, sql: str, args: tuple, after: tuple | None) -> list[tuple]:
        """One page of a query whose rows are ordered by their first columns,
        as a keyset: the rows after `after` (None: from the start)."""
        assert self._db is not None
        return self._db.execute(sql, args + (after or ("", "", "")) + (PAGE,)).fetchall()

    def unmarked_present(self) -> "AsyncRows":
        """Blob digests present and not marked, as rows ("B", "", digest)."""
        return AsyncRows(self, "SELECT 'B', '', p.digest FROM present p WHERE p.digest NOT IN "
                               "(SELECT digest FROM marked) AND ('B', '', p.digest) > (?, ?, ?) "
                               "ORDER BY p.digest LIMIT ?", ())

    def found_rows(self) -> "AsyncRows":
        """Every candidate found: (kind, repo, name, mtime, size)."""
        return AsyncRows(self, "SELECT kind, repo, name, mtime, size FROM found WHERE "
                               "(kind, repo, name) > (?, ?, ?) ORDER BY kind, repo, name LIMIT ?", ())

    def sweepable(self, cutoff: float) -> "AsyncRows":
        """Candidates recorded earlier that this pass found again, unchanged
        since before the record's cutoff: (kind, repo, name, mtime, size)."""
        return AsyncRows(self, "SELECT f.kind, f.repo, f.name, f.mtime, f.size FROM found f JOIN recorded r "
                               "ON f.kind = r.kind AND f.repo = r.repo AND f.name = r.name "
                               "WHERE f.mtime < ? AND (f.kind, f.repo, f.name) > (?, ?, ?) "
                               "ORDER BY f.kind, f.repo, f.name LIMIT ?", (cutoff,))


class AsyncRows:
    """A query streamed in pages of PAGE rows (keyset pagination on its
    first three columns), each fetched on the set's thread."""

    def __init__(self, markset: MarkSet, sql: str, args: tuple):
        self.markset, self.sql, self.args = markset, sql, args

    async def batches(self) -> "AsyncIterator[list[tuple]]":
        after: tuple | None = None
        while True:
            rows = await self.markset.call(self.markset._page, self.sql, self.args, after)
            if not rows:
                return
            yield rows
            after = tuple(rows[-1][:3])
            if len(rows) < PAGE:
                return


def chunks(items: list, size: int) -> Iterator[list]:
    for at in range(0, len(items), size):
        yield items[at:at + size]

