"""The loop-lag monitor sees a step that holds the event loop."""

from __future__ import annotations

import asyncio
import time

from swarmnode.looplag import LoopLag


def test_a_step_holding_the_loop_shows_as_lag_at_least_its_length_less_the_interval() -> None:
    lags: list[float] = []

    async def main() -> LoopLag:
        lag = LoopLag(lags.append, interval=0.02)
        task = asyncio.ensure_future(lag.run())
        await asyncio.sleep(0)  # the monitor is asleep now
        time.sleep(0.1)  # a step that holds the loop for 100 ms
        while lag.wakeups < 2:
            await asyncio.sleep(0.005)
        task.cancel()
        return lag

    lag = asyncio.run(main())
    assert lag.worst >= 0.08
    assert lags[0] >= 0.08 and lag.worst == max(lags)

