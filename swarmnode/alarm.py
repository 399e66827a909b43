"""The sleep of a loop that drives a sans-I/O core: until the core's next deadline, cut short
only when something makes a deadline sooner.

A core's outputs are carried out where its input arrives (a message handler calls the core,
then flushes); the driver loop is needed only for the deadlines. Waking it on every flush
cost a turn per message for nothing: an idle leader's election loop ran for each of the 40
heartbeat replies a second it gets from four voters, each turn a tick, a drain and a new
timeout, though the next deadline (the next heartbeat) had not moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import math


class Alarm:
    """Wakes a sleeping driver loop when its deadline moves sooner, or when told to."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        # when the loop will look at its core next; -inf while it is not asleep (it reads
        # the deadline before it sleeps, so nothing needs to wake it)
        self._until = -math.inf

    def sooner(self, deadline: float) -> None:
        """A deadline (on the clock passed to `sleep`) is now this: wake the loop if it
        would sleep past it."""
        if deadline < self._until:
            self._event.set()

    def ring(self) -> None:
        """Wake the loop whatever its deadline: it has more than its timers to look at."""
        self._event.set()

    async def sleep(self, now: float, until: float) -> None:
        """Sleep until `until` (`now` is the same clock's reading) or a wake."""
        self._event.clear()
        self._until = until
        try:
            with contextlib.suppress(TimeoutError):
                # asyncio.timeout, not wait_for: on Python 3.11 a cancellation racing
                # wait_for's own timeout comes out as TimeoutError and would be swallowed
                async with asyncio.timeout(max(until - now, 0.0)):
                    await self._event.wait()
        finally:
            self._until = -math.inf
