"""Names what holds a node's event loop. bench/scale.py --steps puts this directory on the
nodes' PYTHONPATH; with SWARMNODE_STEP_PROBE_MS set, it logs, each with what ran it:

- each loop step (one callback or one task step) that used more of the loop thread's CPU;
- each loop pass (the steps one turn runs between two polls, while a timer that fell due
  waits) that used more, with its longest steps: short steps in a row hold a timer too;
- each step that spent more off the CPU by its own doing -- its wall time less its CPU time
  and its wait for a CPU (the thread's schedstat): blocked in a syscall such as an fsync, or
  waiting for the GIL while another thread holds it;
- each SQLite transaction (swarmnode.db.transaction) that took more wall time, by module.

CPU time of the thread, not wall time: on a machine running 40 nodes on two cores most of a
step's wall time is waiting for a CPU, which says nothing about the step itself. The node's
own `swarmnode_loop_held_seconds` says how much was held; this says by what.
"""

from __future__ import annotations

import asyncio.base_events
import asyncio.events
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any


def _what(handle: asyncio.events.Handle) -> str:
    """The task's coroutine, or the callback's name."""
    cb = getattr(handle, "_callback", None)
    owner = getattr(cb, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        return f"task {getattr(coro, '__qualname__', repr(coro))}"
    return f"callback {getattr(cb, '__qualname__', repr(cb))}"


def _waited(fd: int) -> float:
    """Seconds this thread has waited for a CPU so far (its schedstat's second field)."""
    return int(os.pread(fd, 128, 0).split()[1]) / 1e9


def _time_transactions(limit_s: float, log: logging.Logger) -> int:
    """Wrap the node's SQLite transactions (`swarmnode.db.transaction`, once the node's
    modules are in) to log those over the limit in wall time, with the module that ran them:
    a commit's fsync on the loop thread is one way to block it. How many it wrapped."""
    db = sys.modules.get("swarmnode.db")
    if db is None:
        return 0
    original = db.transaction

    def wrap(where: str) -> Any:
        @contextlib.contextmanager
        def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            t0 = time.perf_counter()
            with original(*args, **kwargs) as conn:
                yield conn
            wall = time.perf_counter() - t0
            if wall > limit_s:
                log.warning("db transaction %.1f ms wall: %s", wall * 1000, where)
        return timed

    users = [m for m in list(sys.modules.values())
             if getattr(m, "transaction", None) is original]
    for module in users:
        module.transaction = wrap(module.__name__)
    return len(users)


def _install(limit_s: float) -> None:
    run = asyncio.events.Handle._run
    run_once = asyncio.base_events.BaseEventLoop._run_once
    log = logging.getLogger("swarmnode.steps")
    current: list[tuple[float, asyncio.events.Handle]] = []  # this pass's steps
    patched: list[int] = []
    schedstat = os.open("/proc/thread-self/schedstat", os.O_RDONLY)  # (the loop's thread)

    def timed(self: asyncio.events.Handle) -> None:
        t0, c0, w0 = time.perf_counter(), time.thread_time(), _waited(schedstat)
        run(self)
        used = time.thread_time() - c0
        # off the CPU by its own doing: blocked in a syscall (an fsync), on the GIL, a lock
        blocked = time.perf_counter() - t0 - used - (_waited(schedstat) - w0)
        current.append((used, self))
        if used > limit_s:
            log.warning("loop step %.1f ms cpu: %s", used * 1000, _what(self))
        if blocked > limit_s:
            log.warning("loop step %.1f ms blocked: %s", blocked * 1000, _what(self))

    def timed_pass(self: asyncio.base_events.BaseEventLoop) -> None:
        if not patched:
            patched.append(_time_transactions(limit_s, log))
        current.clear()
        t0 = time.thread_time()
        run_once(self)
        used = time.thread_time() - t0
        if used > limit_s:
            top = sorted(current, key=lambda step: -step[0])[:3]
            log.warning("loop pass %.1f ms cpu, %d steps: %s", used * 1000, len(current),
                        "; ".join(f"{_what(h)} {u * 1000:.1f}" for u, h in top))
        current.clear()

    asyncio.events.Handle._run = timed  # type: ignore[method-assign]
    asyncio.base_events.BaseEventLoop._run_once = timed_pass  # type: ignore[method-assign]


if os.environ.get("SWARMNODE_STEP_PROBE_MS"):
    _install(float(os.environ["SWARMNODE_STEP_PROBE_MS"]) / 1000)
