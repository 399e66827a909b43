"""A build across a partition, with real processes on separate (namespace) hosts.

    lan1 10.42.0.50, lan2 .51, lan3 .52 on one switch; all three vote.

The leader is cut off from the other two while a build runs: the majority elects a new leader
and finishes the build; the old leader steps down (it cannot hear a quorum) and commits
nothing. After healing there is one leader, and every job is done exactly once in every
replica, with its artifact on the submitting node.
"""

from __future__ import annotations

import pytest

from swarmnode.control import ControlError
from tests.lab import Lab, incident_topology, unavailable_reason
from tests.swarm import (
    Node,
    Swarm,
    lab_swarm_fixture,  # noqa: F401 (the `lab_swarm` fixture)
)

_REASON = unavailable_reason()
pytestmark = [
    pytest.mark.lab,
    pytest.mark.timeout(180),
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]

PORT = 7946
JOIN_S = 30.0


def status(swarm: Swarm, n: Node) -> dict:
    return swarm.query(n, "status")


def test_a_partition_isolating_the_leader_gives_one_leader_and_no_lost_or_duplicate_work(
        lab: Lab, lab_swarm: Swarm, tmp_path) -> None:
    swarm = lab_swarm
    topo = incident_topology(lab, lan_hosts=3, tarn=False, far=False)
    first, token = swarm.init("lan1", f"{topo.addr('lan1')}:{PORT}", host="lan1")
    swarm.start(first)
    nodes = [first] + [swarm.start(swarm.add(h, f"{topo.addr(h)}:{PORT}", host=h), token)
                       for h in ("lan2", "lan3")]
    swarm.wait_converged(nodes, JOIN_S)
    swarm.grant(first, "build", *nodes[1:])  # whichever side keeps the majority submits
    ids = {n.id for n in nodes}
    for n in nodes:
        swarm.wait_for(lambda n=n: set(status(swarm, n)["voters"]) == ids, JOIN_S,
                       f"{n.name} counts three voters")
    leader_id = swarm.wait_for(lambda: len({status(swarm, n)["leader"] for n in nodes}) == 1
                               and status(swarm, nodes[0])["leader"], JOIN_S, "one leader")
    old = next(n for n in nodes if n.id == leader_id)
    majority = [n for n in nodes if n is not old]

    plan = tmp_path / "plan.toml"
    plan.write_text("".join(f'[jobs.j{i}]\ncmd = "sleep 0.3; echo j{i} > r.txt"\n'
                            f'outputs = ["r.txt"]\n\n' for i in range(16)))
    for n in majority:
        lab.cut(old.host, n.listen.rsplit(":", 1)[0])
    old_term = status(swarm, majority[0])["term"]
    new_leader = swarm.wait_for(
        lambda: (ls := {status(swarm, n)["leader"] for n in majority}) and len(ls) == 1
        and None not in ls and leader_id not in ls and ls.pop(), JOIN_S,
        "the majority elects a new leader")
    assert status(swarm, majority[0])["term"] > old_term
    swarm.wait_for(lambda: status(swarm, old)["role"] != "leader", JOIN_S,
                   "the isolated leader steps down (check-quorum)")

    submitter = majority[0]
    build_id = swarm.cli(submitter, "build", str(plan)).stdout.strip()
    swarm.wait_for(lambda: swarm.query(submitter, "build_status", build=build_id)["finished"],
                   90, "the build finishes on the majority side")
    # the isolated node cannot have accepted anything: it never heard of the build
    with pytest.raises(ControlError, match=r"not in this node's ledger .* knows no leader"):
        swarm.query(old, "jobs", build=build_id)

    for n in majority:
        lab.uncut(old.host, n.listen.rsplit(":", 1)[0])
    swarm.wait_converged(nodes, JOIN_S)
    swarm.wait_for(lambda: {status(swarm, n)["leader"] for n in nodes} == {new_leader}, JOIN_S,
                   "after healing, everyone follows the one leader")
    for n in nodes:
        jobs = swarm.wait_for(
            lambda n=n: (js := swarm.query(n, "jobs", build=build_id)) and len(js) == 16
            and all(j["state"] == "done" for j in js) and js, JOIN_S,
            f"{n.name}'s replica has the whole build")
        assert sorted(j["job"] for j in jobs) == sorted(f"j{i}" for i in range(16))
        assert all(j["attempt"] == 1 for j in jobs), [j for j in jobs if j["attempt"] != 1]
    out = tmp_path / "out"
    swarm.query(submitter, "fetch_outputs", timeout=60, build=build_id, out=str(out))
    for i in range(16):
        assert (out / f"j{i}" / "r.txt").read_text() == f"j{i}\n"
