"""Background tasks a component owns: kept referenced while they run, cancelled on close;
and waiting for a condition that an event announces changes of.

asyncio keeps only weak references to tasks, so a fire-and-forget task can vanish mid-run;
and a component that stops must not leave its tasks running against closed sockets or stores.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any


class TaskSet:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Cancel every task and wait for each to finish (errors swallowed: we are stopping)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def until(changed: asyncio.Event, cond: Callable[[], bool], timeout: float) -> bool:
    """Wait until `cond()` holds, looking again each time `changed` is set; False when
    `timeout` runs out first. The event is cleared before each look, with no await in
    between, so a change cannot slip past (and many waiters may share one event)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while True:
                changed.clear()
                if cond():
                    return True
                await changed.wait()
    return cond()
