"""The loop-lag monitor sees a step that holds the event loop, and tells it from a wait for a
CPU."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from swarmnode.looplag import SCHEDSTAT, LoopLag, RunqueueWait


def _held_step(step: Callable[[], None], waited: Callable[[], float] | None = None,
               ) -> tuple[LoopLag, list[float], list[float]]:
    lags: list[float] = []
    held: list[float] = []

    async def main() -> LoopLag:
        lag = LoopLag(lags.append, held.append, interval=0.02)
        task = asyncio.ensure_future(lag.run(waited))
        await asyncio.sleep(0)  # the monitor is asleep now
        step()
        while lag.wakeups < 2:
            await asyncio.sleep(0.005)
        task.cancel()
        return lag

    return asyncio.run(main()), lags, held


def test_a_step_holding_the_loop_shows_as_lag_at_least_its_length_less_the_interval() -> None:
    lag, lags, held = _held_step(lambda: time.sleep(0.1))  # blocked in a system call, 100 ms
    assert lag.worst >= 0.08
    assert lags[0] >= 0.08 and lag.worst == max(lags)
    # asleep is not waiting for a CPU: the whole lag is the step's own
    assert held[0] >= 0.08 and lag.held_worst == max(held)


def test_time_spent_waiting_for_a_cpu_is_not_counted_as_held() -> None:
    """The counter's wait in the window comes off the lag: here the fake kernel says the
    thread waited 70 ms of the 100 ms step for a CPU."""
    waits = itertools.chain([0.0], itertools.repeat(0.07))
    _, lags, held = _held_step(lambda: time.sleep(0.1), lambda: next(waits))
    assert lags[0] >= 0.08
    assert held[0] == pytest.approx(lags[0] - 0.07)
    assert held[1] == pytest.approx(lags[1])  # no wait in the next window: all of it held


@pytest.mark.skipif(not os.path.exists(SCHEDSTAT), reason="no per-thread schedstat here")
def test_the_kernel_counts_a_wait_for_a_cpu_shared_with_a_busy_process() -> None:
    """Pinned to one CPU beside a busy process, 0.3 s of computing takes about twice as long;
    the reader sees the difference as runqueue wait."""
    cpu = sorted(os.sched_getaffinity(0))[0]
    before_affinity = os.sched_getaffinity(0)
    busy = subprocess.Popen([sys.executable, "-c", "while 1: pass"])
    try:
        os.sched_setaffinity(busy.pid, {cpu})
        os.sched_setaffinity(0, {cpu})
        counter = RunqueueWait()
        try:
            start = counter.read()
            spent = time.thread_time()
            while time.thread_time() - spent < 0.3:  # 0.3 s of our own CPU
                pass
            waited = counter.read() - start
        finally:
            counter.close()
    finally:
        os.sched_setaffinity(0, before_affinity)
        busy.kill()
        busy.wait()
    assert waited > 0.1  # about 0.3 s: the busy process had the CPU half the time
