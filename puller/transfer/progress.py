"""Transfer progress for pull / push / copy: the Progress the transfers
report to (it only counts), and the displays the CLI picks.

    progress = make_progress(mode)   # "auto" | "rich" | "plain" | "quiet" | "json"
    progress.start(key, label, total)  progress.advance(key, n)
    progress.done(key, skipped=False)  progress.close(summary)
    with make_progress(mode) as progress: ...   # closes it; no summary on failure

"auto" shows per-blob bars with bytes and speed (rich) on a terminal and
one summary line otherwise; "quiet" and "json" print nothing while running
(the CLI prints the JSON result itself).
"""

from __future__ import annotations

import sys
import time


class Progress:
    """Counts bytes; draws nothing. Base of every display."""

    def __init__(self):
        self.started = time.monotonic()
        self.bytes = 0
        self.blobs_done = 0
        self.blobs_skipped = 0

    def start(self, key: str, label: str, total: int | None) -> None:
        pass

    def advance(self, key: str, n: int) -> None:
        self.bytes += n

    def reset(self, key: str, completed: int) -> None:
        """A transfer restarted at `completed` bytes (resume or retry)."""

    def done(self, key: str, skipped: bool = False) -> None:
        if skipped:
            self.blobs_skipped += 1
        else:
            self.blobs_done += 1

    def close(self, summary: str | None = None, failed: bool = False) -> None:
        pass

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # a failed transfer ends with the one error line, not a summary
        self.close(None, failed=exc_type is not None)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


class PlainProgress(Progress):
    """No bars: one summary line on stderr at the end."""

    def __init__(self, stream=None):
        super().__init__()
        self.stream = stream or sys.stderr

    def close(self, summary: str | None = None, failed: bool = False) -> None:
        if failed:
            return
        elapsed = max(self.elapsed, 1e-6)
        line = (f"{self.blobs_done} blob(s) transferred, {self.blobs_skipped} already present, "
                f"{human_bytes(self.bytes)} in {elapsed:.1f}s ({human_bytes(self.bytes / elapsed)}/s)")
        if summary:
            line = f"{summary}: {line}"
        print(line, file=self.stream, flush=True)


class RichProgress(PlainProgress):
    """Per-blob bars with bytes and speed (terminal)."""

    def __init__(self, stream=None):
        super().__init__(stream)
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress as Bars, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)
        self._bars = Bars(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                          TransferSpeedColumn(), TimeRemainingColumn(),
                          console=Console(file=self.stream), transient=False)
        self._tasks: dict[str, int] = {}
        self._bars.start()

    def start(self, key: str, label: str, total: int | None) -> None:
        if key not in self._tasks:
            self._tasks[key] = self._bars.add_task(label, total=total)

    def advance(self, key: str, n: int) -> None:
        super().advance(key, n)
        if key in self._tasks:
            self._bars.advance(self._tasks[key], n)

    def reset(self, key: str, completed: int) -> None:
        if key in self._tasks:
            self._bars.update(self._tasks[key], completed=completed)

    def done(self, key: str, skipped: bool = False) -> None:
        super().done(key, skipped)
        task_id = self._tasks.get(key)
        if task_id is None:
            return
        task = next(t for t in self._bars.tasks if t.id == task_id)
        self._bars.update(task_id, completed=task.total or task.completed,
                          description=f"{task.description} (exists)" if skipped else task.description)

    def close(self, summary: str | None = None, failed: bool = False) -> None:
        self._bars.stop()
        super().close(summary, failed)


def make_progress(mode: str = "auto", stream=None) -> Progress:
    stream = stream or sys.stderr
    if mode in ("quiet", "json"):
        return Progress()
    if mode == "plain":
        return PlainProgress(stream)
    if mode == "rich" or (mode == "auto" and stream.isatty()):
        return RichProgress(stream)
    return PlainProgress(stream)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover
