"""Finished builds leave the ledger and stay in the history, across real swarmnode processes
on loopback.

What must hold: once a build has finished longer ago than `build_retention`, every node's
ledger holds no build and no job (the memory bound: the ledger's size goes back to nothing),
at the same applied index; `jobs --history` still shows every attempt of it, node, term,
times and result, a failed-then-retried job included, and the same rows after a restart
(the entries replayed change nothing); `build wait` and `jobs --build` answer for the
forgotten build from the history; every node emitted a `job_done` event per job.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarmnode import control
from tests.swarm import (
    Node,
    Swarm,
    swarm_fixture,  # noqa: F401 (the `swarm` fixture)
)
from tests.test_build_loopback import three

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

RETENTION_S = 2
CONFIG = f"build_retention = {RETENTION_S}\n"


def retaining(swarm: Swarm) -> list[Node]:
    """Three voters with the short retention, a leader elected, n2 and n3 granted `build`."""
    return three(swarm, prepare=lambda node: (node.home / "config.toml").write_text(CONFIG))


PLAN = """name = "kept"

[jobs.flaky]
cmd = 'test "$SWARMNODE_ATTEMPT" -gt 1 && echo ok > flaky.txt'
outputs = ["flaky.txt"]

[jobs.a]
cmd = "echo a > a.txt"
outputs = ["a.txt"]

[jobs.b]
cmd = "echo b > b.txt"
outputs = ["b.txt"]

[jobs.last]
cmd = "echo last > last.txt"
deps = ["flaky", "a", "b"]
outputs = ["last.txt"]
"""
JOBS = {"flaky", "a", "b", "last"}


def test_a_finished_build_is_forgotten_everywhere_and_kept_in_the_history(
        swarm: Swarm, tmp_path: Path) -> None:
    nodes = retaining(swarm)
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    submitter = nodes[1]
    build_id = json.loads(swarm.cli(submitter, "build", str(plan), "--json").stdout)["build"]
    status = json.loads(swarm.cli(nodes[2], "build", "wait", build_id, "--json",
                                  timeout=90).stdout)  # (re-attached, from another node)
    assert status["ok"] and status["progress"]["done"] == 4, status

    def ledgers() -> list[dict[str, int]]:
        return [swarm.query(n, "status")["ledger"] for n in nodes]

    swarm.wait_for(lambda: all(led["builds"] == 0 for led in ledgers()), 30,
                   "every node's ledger forgets the finished build")
    swarm.wait_for(lambda: len({led["applied"] for led in ledgers()}) == 1, 10,
                   "every node at the same applied index")
    assert all(led == {**ledgers()[0], "builds": 0, "jobs": 0} for led in ledgers())
    assert all(swarm.cli_json(n, "jobs") == [] for n in nodes)

    histories = {}
    for n in nodes:
        rows = swarm.cli_json(n, "jobs", "--history", "--build", build_id)
        assert {r["job"] for r in rows} == JOBS, rows
        flaky = [(r["attempt"], r["result"]) for r in rows if r["job"] == "flaky"]
        assert flaky == [(1, "failed"), (2, "done")], rows
        assert all(r["result"] == "done" for r in rows if r["job"] != "flaky")
        for r in rows:
            assert r["node"] in {x.id for x in nodes} and r["term"] >= 1, r
            # (a `started` is left out when the result is in the same batch: fast jobs)
            assert r["assigned"] <= (r["started"] or r["assigned"]) <= r["ended"], r
        done = [e for e in swarm.events(n, "job_done") if e["job_key"].startswith(build_id)]
        assert sorted(e["job_key"].partition("/")[2] for e in done) == sorted(JOBS), done
        assert all(e["attempt"] == (2 if e["job_key"].endswith("/flaky") else 1)
                   and e["node"] for e in done)
        histories[n.name] = rows
        # the forgotten build: its end from the history
        ended = json.loads(swarm.cli(n, "build", "wait", build_id, "--json").stdout)
        assert ended["ok"] and ended["finished"] and ended["progress"]["done"] == 4, ended
        jobs = swarm.cli_json(n, "jobs", "--build", build_id)
        assert {(j["job"], j["state"]) for j in jobs} == {(j, "done") for j in JOBS}, jobs
        # and `logs` of its jobs: the end from the history, the output from the job's node
        ran = {r["job"]: r for r in rows if r["result"] == "done"}
        for name in JOBS:
            log = swarm.query(n, "logs", timeout=15, job=f"{build_id}/{name}")
            assert (log["state"], log["attempt"]) == ("done", ran[name]["attempt"]), log
            assert log["node"] == ran[name]["node_name"] and log["output"] == "", log
        with pytest.raises(control.ControlError, match="no job"):
            swarm.query(n, "logs", job=f"{build_id}/nosuch")
    all_rows = swarm.cli_json(nodes[0], "jobs", "--history")
    assert {r["build"] for r in all_rows} == {build_id}

    # a restart replays the log (the build's entries and the forget): the same history
    swarm.stop(nodes[2])
    swarm.start(nodes[2])
    assert swarm.query(nodes[2], "status")["ledger"]["builds"] == 0
    assert swarm.cli_json(nodes[2], "jobs", "--history", "--build", build_id) == \
        histories[nodes[2].name]
    out = tmp_path / "out"
    swarm.cli(nodes[0], "build", "wait", build_id, "--out", str(out), timeout=60)
    assert (out / "last" / "last.txt").read_text() == "last\n"
