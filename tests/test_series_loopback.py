"""The swarm's time series on real swarmnode processes: what every node writes matches its
ledger and its power notes, and outlives a restart.

What must hold: after a build, each node's series counts exactly the attempts that started,
finished and failed (as the ledger's history has them); the energy in it is the members'
stated energy (more than nothing, never more than the swarm's energy today); every member
has its load and draw; `history` shows the build with its energy; a restarted node still
has the points it wrote before; a member that joins later counts none of the past it catches
up with.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from swarmnode.series import FINE_S
from tests.swarm import (
    Swarm,
    loopback_addr,
    swarm_fixture,  # noqa: F401 (the `swarm` fixture)
)
from tests.test_build_loopback import JOIN_S, three

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

PLAN = """name = "charted"

[jobs.a]
cmd = "sleep 0.5"
[jobs.b]
cmd = "sleep 0.5"
[jobs.c]
cmd = "exit 3"
[jobs.d]
cmd = "true"
deps = ["a", "b"]
"""


def sums(view: dict) -> dict[str, float]:
    cols = view["columns"]
    return {c: sum(p[cols.index(c)] or 0 for p in view["points"])
            for c in ("started", "finished", "failed", "joules")}


def test_series_match_the_ledger_and_the_power_notes_and_survive_a_restart(
        swarm: Swarm, tmp_path: Path) -> None:
    nodes = three(swarm)
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    swarm.cli(nodes[0], "build", str(plan), "--wait", check=False, timeout=120)
    attempts = swarm.query(nodes[0], "jobs", history=True)
    started = sum(1 for a in attempts if a["node"] is not None)  # attempts handed to a node
    done = sum(1 for a in attempts if a["result"] == "done")
    failed = sum(1 for a in attempts if a["result"] == "failed")
    assert done == 3 and failed == 2 and started == done + failed  # c fails on two nodes
    for node in nodes:  # each node's own series, from the entries it applied
        swarm.wait_for(
            lambda node=node: (lambda s: (s["started"], s["finished"], s["failed"]))(
                sums(swarm.query(node, "history", since=3600))) == (started, done, failed),
            30, f"{node.name}'s series counts {started} started, {done} done, {failed} failed")
    # energy: members state theirs every 30 s, so a second note from each is needed
    swarm.wait_for(lambda: sums(swarm.query(nodes[0], "history", since=3600))["joules"] > 0,
                   90, "energy in the series")
    # each member's load and draw: a row a minute (at the next whole minute)
    swarm.wait_for(lambda: len(swarm.query(nodes[0], "history", since=3600)["nodes"]) == 3,
                   75, "a row of each member's load and draw")
    view = swarm.query(nodes[0], "history", since=3600)
    today = swarm.query(nodes[0], "status")["cluster_kwh_today"] * 3.6e6
    rounding = 0.00005 * 3.6e6  # status states kWh to 4 places: 180 J either way
    assert 0 < sums(view)["joules"] <= today + rounding + 1, (sums(view), today)
    assert set(view["nodes"]) == {n.id for n in nodes}
    assert all(row[2] > 0 for rows in view["nodes"].values() for row in rows)  # watts
    [build] = view["builds"]
    assert build["name"] == "charted" and build["jobs"] == 4 and build["ended"] is not None
    shown = swarm.cli(nodes[0], "history", "--since", "1h").stdout
    assert "charted" in shown and "1 builds" in shown
    before = view["points"][0][0]
    swarm.stop(nodes[0])
    restart = time.time()
    swarm.start(nodes[0])
    # the restarted node replays its ledger: the jobs it sees finish again are the past,
    # not counted a second time (a point written after the restart shows it)
    swarm.wait_for(lambda: swarm.query(nodes[0], "history", since=3600)["points"][-1][0]
                   > restart + FINE_S, 40, "a point written after the restart")
    kept = swarm.query(nodes[0], "history", since=3600)
    assert kept["points"][0][0] == before < restart  # written before the restart, still there
    assert sums(kept)["finished"] == done and sums(kept)["failed"] == failed
    # a member that joins now applies the whole ledger to catch up: the past, not counted
    late = swarm.start(swarm.add("n4", loopback_addr(4)),
                       swarm.query(nodes[0], "token", ttl=600))
    applied = swarm.query(nodes[0], "status")["ledger"]["applied"]
    swarm.wait_for(lambda: swarm.query(late, "status")["ledger"]["applied"] >= applied,
                   JOIN_S, "n4 caught up with the ledger")
    caught_up = time.time()
    swarm.wait_for(lambda: (swarm.query(late, "history", since=3600)["points"] or [[0]])[-1][0]
                   > caught_up + FINE_S, 40, "a point n4 wrote after it caught up")
    counted = sums(swarm.query(late, "history", since=3600))
    assert (counted["started"], counted["finished"], counted["failed"]) == (0, 0, 0), counted
