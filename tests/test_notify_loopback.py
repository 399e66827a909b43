"""Notifications from real swarmnode processes: three nodes share one webhook, and each event
reaches it once (the leader sends), with what a person needs to act on it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from swarmnode.notify import CHECK_S
from tests.swarm import (
    Swarm,
    loopback_addr,
    swarm_fixture,  # noqa: F401 (the `swarm` fixture)
)
from tests.test_build_loopback import three
from tests.test_notify import Receiver
from tests.test_push_loopback import payload

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

PLAN = """name = "breaks"

[jobs.ok]
cmd = "true"
[jobs.cc]
cmd = "echo 'cc1: error: unknown flag -march=zen9' >&2; exit 3"
[jobs.link]
cmd = "true"
deps = ["cc"]
"""


def notices(receiver: Receiver) -> list[dict[str, Any]]:
    return [n for _h, body in receiver.got for n in json.loads(body)["notices"]]


def test_each_event_is_sent_once_by_the_leader(swarm: Swarm, tmp_path: Path) -> None:
    receiver = Receiver()
    try:
        # (a window of 2 s: a node falsely declared dead on a loaded machine, with the tests'
        # fast timers, is back within it, and the two notices cancel instead of being sent)
        config = f'[notify]\nwebhook = "{receiver.url}"\ngroup_s = 2.0\n'
        nodes = three(swarm, prepare=lambda n: (n.home / "config.toml").write_text(config))
        # a forgotten container turns up: it asks to join, and a person hears of it once
        guest = swarm.start(swarm.add("guest", loopback_addr(9)), seeds=[nodes[0].listen])
        swarm.wait_for(lambda: [n["kind"] for n in notices(receiver)] == ["pending"], 30,
                       "one notice of the pending guest")
        [pending] = notices(receiver)
        assert pending["title"] == "a node asks to join: guest" and guest.id in pending["text"]
        assert json.loads(receiver.got[0][1])["swarm"] == "swarmtest"
        swarm.hold(lambda: len(receiver.got) == 1, 2.0, "no second message of it")
        # a build fails: the failing job and its log tail, once
        plan = tmp_path / "plan.toml"
        plan.write_text(PLAN)
        swarm.cli(nodes[0], "build", str(plan), "--wait", check=False, timeout=120)
        swarm.wait_for(lambda: len(notices(receiver)) == 2, 30, "the build's notice")
        failed = notices(receiver)[1]
        assert failed["kind"] == "build_failed" and failed["title"] == "build breaks failed: cc"
        assert "unknown flag -march=zen9" in failed["text"] and failed["urgent"]
        swarm.hold(lambda: len(receiver.got) == 2, 2.0, "no second message of it")
        # a member comes back from a restart with its disk nearly full (even if the restart
        # costs the leader its quorum for a moment: what it saw meanwhile is sent)
        low = nodes[2]
        swarm.stop(low)
        (low.home / "config.toml").write_text(config + "[disk]\nmin_free_percent = 100\n")
        swarm.start(low)
        swarm.wait_for(lambda: {n["kind"] for n in notices(receiver)[2:]} == {
            "member_back", "disk_low"}, 30, "the return and the full disk")
        full, back = sorted(notices(receiver)[2:], key=lambda n: n["kind"])
        assert back["title"] == "n3 is back" and full["title"] == "n3's disk is nearly full"
        # the operator's test, from a follower: sent at once, whoever leads
        leader = swarm.query(nodes[0], "status")["leader"]
        follower = next(n for n in nodes if n.id != leader)
        assert swarm.cli(follower, "notify", "test").stdout.strip() == "webhook: sent"
        assert notices(receiver)[-1]["kind"] == "test"
        assert swarm.query(follower, "status")["notify"]["sent"] == {"webhook": 1}
        # a push whose health check fails on the canary: rolled back there, and said once
        bad = payload(tmp_path, "1", health="echo db unreachable >&2; exit 3")
        res = swarm.cli(nodes[0], "push", str(bad), "--wait", "--json", check=False, timeout=90)
        assert res.returncode == 1
        (canary,) = [s["name"] for s in json.loads(res.stdout)["nodes"].values() if s["canary"]]
        swarm.wait_for(lambda: any(n["kind"] == "push_rolled_back" for n in notices(receiver)),
                       30, "the rollback's notice")
        [rolled] = [n for n in notices(receiver) if n["kind"] == "push_rolled_back"]
        digest = json.loads(res.stdout)["digest"]
        assert rolled["title"] == f"web {digest[:12]} rolled back on {canary}" and rolled["urgent"]
        assert f"{canary}'s `swarmnode events`" in rolled["text"]
        seen = len(receiver.got)  # the leader looks again every CHECK_S: nothing new to say
        swarm.hold(lambda: len(receiver.got) == seen, CHECK_S + 1, "no second message of it")
    finally:
        receiver.close()
