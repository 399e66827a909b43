"""The discrete-event clock the simulators share: a heap of timed events, run in time order.

Virtual time only moves when an event is taken, so a simulated minute of a thousand nodes runs
as fast as the cores allow, and the same seed gives the same history.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

#: (time, sequence, kind, to, src, message); the sequence keeps equal times in push order.
Event = tuple[float, int, int, str, str, Any]


class EventClock:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[Event] = []
        self._seq = 0

    def _push(self, t: float, kind: int, to: str, src: str, msg: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, to, src, msg))

    def _pop(self) -> Event:
        event = heapq.heappop(self._heap)
        self.now = event[0]
        return event

    def _step(self) -> None:
        """Take and carry out the next event (the simulator's own)."""
        raise NotImplementedError

    def run_until(self, t: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= t:
            self._step()
        self.now = max(self.now, t)

    def run_for(self, dt: float) -> None:
        self.run_until(self.now + dt)

    def run_until_pred(self, pred: Callable[[Any], bool], timeout: float, step: float) -> bool:
        """Run until `pred(self)` holds (checked every `step`), or `timeout` seconds pass."""
        end = self.now + timeout
        while True:
            if pred(self):
                return True
            if self.now >= end:
                return False
            self.run_until(min(end, self.now + step))
