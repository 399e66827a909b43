"""A driver loop's sleep (swarmnode.alarm): woken when its deadline moves sooner or it is
rung, not by news that changes nothing due earlier."""

from __future__ import annotations

import asyncio

from swarmnode.alarm import Alarm


async def test_a_sleep_ends_at_its_deadline_and_only_sooner_deadlines_cut_it_short() -> None:
    loop = asyncio.get_running_loop()
    alarm = Alarm()
    now = loop.time()
    sleeping = asyncio.create_task(alarm.sleep(now, now + 0.2))
    await asyncio.sleep(0)  # (it is asleep)
    alarm.sooner(now + 60)  # later than it sleeps: no reason to wake it
    await sleeping
    assert loop.time() >= now + 0.2  # it slept its whole time
    now = loop.time()
    sleeping = asyncio.create_task(alarm.sleep(now, now + 60))
    await asyncio.sleep(0)
    alarm.sooner(now + 0.01)  # sooner than it sleeps: it wakes to look
    await asyncio.wait_for(sleeping, 30)
    now = loop.time()
    sleeping = asyncio.create_task(alarm.sleep(now, now + 60))
    await asyncio.sleep(0)
    alarm.ring()
    await asyncio.wait_for(sleeping, 30)


async def test_news_while_awake_does_not_cut_the_next_sleep_short() -> None:
    """The loop reads its deadline before it sleeps: a wake from before that is stale."""
    loop = asyncio.get_running_loop()
    alarm = Alarm()
    alarm.sooner(0.0)  # not asleep: nothing to wake
    now = loop.time()
    await alarm.sleep(now, now + 0.1)
    assert loop.time() >= now + 0.1
    alarm.ring()  # rung while awake: also stale by the next sleep
    now = loop.time()
    await alarm.sleep(now, now + 0.1)
    assert loop.time() >= now + 0.1
