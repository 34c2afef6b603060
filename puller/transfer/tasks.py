"""Task helpers the transfers share."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def gather_all_or_cancel(aws) -> list:
    """gather(), but the first failure cancels the rest: thousands of index
    children must not go on fetching after one of them failed."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def to_the_end(job: Callable[[], object]) -> None:
    """Run blocking clean-up in a thread to its end, even if cancelled meanwhile
    (a cancelled to_thread that had not started would never run)."""
    running = asyncio.ensure_future(asyncio.to_thread(job))
    try:
        await asyncio.shield(running)
    except asyncio.CancelledError:
        await running
        raise
