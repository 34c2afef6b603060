"""prometheus-client's multiprocess mode for `dockyard serve --workers N`.

Kept apart from registry.ops.metrics on purpose: the supervisor calls this
before the fork and before anything imports prometheus_client, which picks
its value class (in memory, or files in PROMETHEUS_MULTIPROC_DIR) at import
and makes the files of unlabelled figures as they are defined.
"""

from __future__ import annotations

import os
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def prepare_multiprocess(workers: int, metrics_enabled: bool) -> str | None:
    """A clean directory for the workers' figures when there are several
    workers; the directory, or None (one process keeps them in memory)."""
    if workers <= 1 or not metrics_enabled:
        return None
    existing = multiprocess_dir()
    if existing:
        path = Path(existing)
        path.mkdir(parents=True, exist_ok=True)
    else:
        import tempfile

        path = Path(tempfile.mkdtemp(prefix="dockyard-metrics-"))
        os.environ[MULTIPROC_ENV] = str(path)
    for stale in path.glob("*.db"):      # an earlier run's figures would add up with ours
        stale.unlink(missing_ok=True)
    return str(path)


def worker_exited(pid: int) -> None:
    """A worker died: its live gauges (in flight, uploading) stop counting."""
    if multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
