"""Event-loop lag: how late the loop wakes a timer, i.e. how long other steps held it.

Everything a node does on time -- heartbeats every 100 ms, a 400 ms election timeout, SWIM
probes -- runs on one asyncio loop, so a step that holds the loop for 50 ms delays all of them;
a few such steps in a row cost a leader its followers. A task sleeps `interval` and records how
much later than asked it woke: a step of X ms shows as a lag of at least X - `interval`. Each
lag goes to a histogram (Prometheus: p99 and friends) and the worst to `worst`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

#: How often the monitor wakes. 20 ms resolves the 50 ms steps that matter, at 50 wake-ups a
#: second (about 2 ms of CPU per second).
INTERVAL_S = 0.02
#: Lag buckets (seconds): 1 ms is noise, 50 ms a step to find, a second a node in trouble.
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class LoopLag:
    """Measures the lag of the running loop while `run` runs; `observe` receives each lag."""

    observe: Callable[[float], None]
    interval: float = INTERVAL_S
    worst: float = 0.0
    """The largest lag seen since start (seconds)."""
    wakeups: int = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.record(max(loop.time() - asked, 0.0))

    def record(self, lag: float) -> None:
        self.wakeups += 1
        self.worst = max(self.worst, lag)
        self.observe(lag)
