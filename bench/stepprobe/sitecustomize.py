"""Names what holds a node's event loop: bench/scale.py --steps puts this directory on the
nodes' PYTHONPATH, and each loop step (one callback or one task step) that uses more than
SWARMNODE_STEP_PROBE_MS of the loop thread's CPU is logged with what ran it.

CPU time of the thread, not wall time: on a machine running 40 nodes on two cores most of a
step's wall time is waiting for a CPU, which says nothing about the step itself. The node's
own `swarmnode_loop_held_seconds` says how much was held; this says by what.
"""

from __future__ import annotations

import asyncio.events
import logging
import os
import time


def _what(handle: asyncio.events.Handle) -> str:
    """The task's coroutine, or the callback's name."""
    cb = getattr(handle, "_callback", None)
    owner = getattr(cb, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        return f"task {getattr(coro, '__qualname__', repr(coro))}"
    return f"callback {getattr(cb, '__qualname__', repr(cb))}"


def _install(limit_s: float) -> None:
    run = asyncio.events.Handle._run
    log = logging.getLogger("swarmnode.steps")

    def timed(self: asyncio.events.Handle) -> None:
        t0 = time.thread_time()
        run(self)
        used = time.thread_time() - t0
        if used > limit_s:
            log.warning("loop step %.1f ms cpu: %s", used * 1000, _what(self))

    asyncio.events.Handle._run = timed  # type: ignore[method-assign]


if os.environ.get("SWARMNODE_STEP_PROBE_MS"):
    _install(float(os.environ["SWARMNODE_STEP_PROBE_MS"]) / 1000)
