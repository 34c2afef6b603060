"""`dockyard gc` as a command: settings as `serve` takes them (file,
DOCKYARD_* environment, flags), one line and a non-zero status for bad
ones, a report on stdout (--json), progress on stderr."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

from storage.filesystem import FilesystemDriver
from storage.store import ContentStore
from tests.support import REPO_ROOT
from tests.support.launch import dockyard_command


def dockyard_gc(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*dockyard_command(), "gc", *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})})


def test_bad_settings_are_one_line_and_status_2(tmp_path):
    missing = dockyard_gc("--storage", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "does not exist" in missing.stderr
    negative = dockyard_gc("--storage", str(tmp_path), env={"DOCKYARD_GC_GRACE": "-5"})
    assert negative.returncode == 2 and "gc.grace" in negative.stderr and "Traceback" not in negative.stderr
    config = tmp_path / "c.yml"
    config.write_text("gc:\n  referrers: sometimes\n")
    mode = dockyard_gc("--config", str(config), "--storage", str(tmp_path))
    assert mode.returncode == 2 and "gc.referrers must be one of keep, follow-subject" in mode.stderr


def test_dry_run_reports_and_keeps_everything(tmp_path):
    async def fill() -> str:
        store = ContentStore(FilesystemDriver(str(tmp_path)))
        data = b"nothing references this blob"
        digest = "sha256:" + __import__("hashlib").sha256(data).hexdigest()

        async def body():
            yield data
        await store.uploads.put("app", digest, body())
        await store.close()
        return digest

    digest = asyncio.run(fill())
    dry = dockyard_gc("--storage", str(tmp_path), "--grace", "0", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert report["dry_run"] and report["would_delete"] == {"B": 1, "L": 1} and report["blobs_deleted"] == 0
    data_file = tmp_path / "docker/registry/v2/blobs/sha256" / digest[7:9] / digest[7:] / "data"
    assert data_file.exists()
    real = dockyard_gc("--storage", str(tmp_path), "--grace", "0")
    assert real.returncode == 0, real.stderr
    assert "deleted 1 blobs" in real.stdout and "gc: mark" in real.stderr
    assert not data_file.exists()
    quiet = dockyard_gc("--storage", str(tmp_path), "--grace", "0", "--quiet")
    assert quiet.stderr == "" and "deleted 0 blobs" in quiet.stdout
