"""Event-loop lag: how late the loop wakes a timer, and how much of that its own steps caused.

Everything a node does on time -- heartbeats every 100 ms, a 400 ms election timeout, SWIM
probes -- runs on one asyncio loop, so a step that holds the loop for 50 ms delays all of them;
a few such steps in a row cost a leader its followers. A timer set `interval` ahead records how
much later than asked it fired: a step of X ms shows as a lag of at least X - `interval`.

On a machine with more runnable processes than cores a lag also holds the time the loop's
thread waited for a CPU, which no change to the node can remove (40 nodes on two cores wait
hundreds of milliseconds). Linux counts that wait per thread (/proc/thread-self/schedstat,
"time spent waiting on a runqueue"), so the monitor also records the lag *held*: the lag less
the wait in the same window -- what the loop's own steps took, computing, blocked in a system
call (an fsync) or waiting for the GIL another thread of the node held. Each lag and each held
lag go to a histogram (Prometheus: p99 and friends); the worst of each to `worst`/`held_worst`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass

#: How often the monitor wakes. 20 ms resolves the 50 ms steps that matter, at 50 wake-ups a
#: second (about 2 ms of CPU per second).
INTERVAL_S = 0.02
#: Lag buckets (seconds): 1 ms is noise, 50 ms a step to find, a second a node in trouble.
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: The calling thread's scheduler counters: on-CPU ns, runqueue-wait ns, timeslices.
SCHEDSTAT = "/proc/thread-self/schedstat"


class RunqueueWait:
    """The seconds the thread that opened it has waited for a CPU so far (`read`), from the
    kernel's per-thread scheduler counters; opened once, read with pread (2 us)."""

    def __init__(self, path: str = SCHEDSTAT) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.read()
        except (OSError, IndexError, ValueError):
            self.close()
            raise OSError(f"{path} holds no runqueue wait") from None

    def read(self) -> float:
        return int(os.pread(self._fd, 128, 0).split()[1]) / 1e9

    def close(self) -> None:
        os.close(self._fd)


@dataclass
class LoopLag:
    """Measures the lag of the running loop while `run` runs (a timer `interval` ahead, set
    again at each wake-up); `observe` receives each lag and `observe_held` each held lag (see
    the module's docstring)."""

    observe: Callable[[float], None]
    observe_held: Callable[[float], None] = lambda held: None
    interval: float = INTERVAL_S
    worst: float = 0.0
    """The largest lag seen since start (seconds)."""
    held_worst: float = 0.0
    """The largest held lag seen since start (seconds)."""
    wakeups: int = 0

    async def run(self, waited: Callable[[], float] | None = None) -> None:
        """`waited` reads the loop thread's runqueue wait; by default the kernel's counter,
        opened here because it is per thread. Without one every lag counts as held."""
        loop = asyncio.get_running_loop()
        counter = None
        if waited is None:
            try:
                counter = RunqueueWait()
                waited = counter.read
            except OSError:  # not Linux, or no schedstats in this kernel
                waited = lambda: 0.0  # noqa: E731
        before = waited()
        handle: asyncio.TimerHandle | None = None

        def wake(asked: float) -> None:  # a bare timer: no task or future per wake-up
            nonlocal before, handle
            lag = max(loop.time() - asked, 0.0)
            now = waited()
            self.record(lag, max(lag - (now - before), 0.0))
            before = now
            nxt = loop.time() + self.interval
            handle = loop.call_at(nxt, wake, nxt)

        first = loop.time() + self.interval
        handle = loop.call_at(first, wake, first)
        try:
            await loop.create_future()  # until cancelled
        finally:
            handle.cancel()
            if counter is not None:
                counter.close()

    def record(self, lag: float, held: float) -> None:
        self.wakeups += 1
        self.worst = max(self.worst, lag)
        self.held_worst = max(self.held_worst, held)
        self.observe(lag)
        self.observe_held(held)
