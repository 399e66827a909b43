"""Leader election between real swarmnode processes on loopback.

What must hold: the members agree on one leader and term; `nodes` marks it; kill -9 of the
leader gives a new leader in a higher term on the survivors within seconds; the old leader
coming back does not depose the new one (pre-vote); a lone node and the survivor of a
two-node cluster lead themselves.
"""

from __future__ import annotations

import time

import pytest

from tests.swarm import Node, Swarm, swarm_fixture  # noqa: F401 (the `swarm` fixture)

pytestmark = pytest.mark.timeout(90)

JOIN_S = 15.0
ELECT_S = 15.0


def agreed(swarm: Swarm, nodes: list[Node]) -> tuple[str, int] | None:
    """(leader id, term) when every node reports the same known leader, else None."""
    seen = {(s["leader"], s["term"]) for s in (swarm.query(n, "status") for n in nodes)}
    if len(seen) == 1:
        leader, term = seen.pop()
        if leader is not None:
            return leader, term
    return None


def test_one_leader_failover_and_no_deposing_on_return(swarm: Swarm) -> None:
    nodes = swarm.loopback(3, JOIN_S)[0]
    by_id = {n.id: n for n in nodes}
    leader, term = swarm.wait_for(lambda: agreed(swarm, nodes), ELECT_S, "one agreed leader")
    assert leader in by_id
    roles = {n.name: swarm.query(n, "status")["role"] for n in nodes}
    assert sorted(roles.values()) == ["follower", "follower", "leader"], roles
    marked = [m["name"] for m in swarm.cli_json(nodes[0], "nodes") if m["leader"]]
    assert marked == [by_id[leader].name]
    # every member moves, one change at a time, to the same voter set: all three here
    for n in nodes:
        swarm.wait_for(lambda n=n: {v["id"] for v in swarm.cli_json(n, "voters")["voters"]}
                       == set(by_id), ELECT_S, f"{n.name} counts all three as voters")
    leader, term = swarm.wait_for(lambda: agreed(swarm, nodes), ELECT_S, "one agreed leader")

    old = by_id[leader]
    rest = [n for n in nodes if n is not old]
    t0 = time.monotonic()
    swarm.kill9(old)
    new, new_term = swarm.wait_for(
        lambda: (a := agreed(swarm, rest)) and a[0] != leader and a, ELECT_S,
        "the survivors elect a new leader")
    print(f"failover: new leader agreed by both survivors {time.monotonic() - t0:.2f}s "
          "after kill -9")
    assert new in {n.id for n in rest} and new_term > term
    assert any(e["id"] == new for e in swarm.events(rest[0], "leader_changed"))

    swarm.start(old)  # rejoins from its home: it must not depose the working leader
    swarm.wait_converged(nodes, JOIN_S)
    swarm.wait_for(lambda: agreed(swarm, nodes) == (new, new_term), ELECT_S,
                   "the old leader follows the new one")
    swarm.hold(lambda: agreed(swarm, nodes) == (new, new_term), 2.0,
               "no election after the old leader's return")


def test_two_nodes_have_one_voter_and_a_cut_off_node_never_leads_alone(swarm: Swarm) -> None:
    a, b = swarm.loopback(2, JOIN_S)[0]
    swarm.wait_for(lambda: (ag := agreed(swarm, [a, b])) and ag[0] == a.id, ELECT_S,
                   "the founder leads")
    # an odd number of voters: with two members only the longest-admitted votes
    swarm.wait_for(lambda: swarm.query(b, "status")["voters"] == [a.id], ELECT_S,
                   "b learns from the log that only a votes")
    swarm.kill9(b)  # the non-voter dies: nothing changes for the voter
    swarm.wait_state([b], "dead", [a], JOIN_S)
    swarm.hold(lambda: swarm.query(a, "status")["role"] == "leader", 1.0, "a keeps leading")
    swarm.start(b)
    swarm.wait_converged([a, b], JOIN_S)
    swarm.kill9(a)  # the voter dies: b cannot make itself a voter (it commits nothing alone)
    swarm.wait_state([a], "dead", [b], JOIN_S)
    swarm.hold(lambda: swarm.query(b, "status")["role"] != "leader"
               and b.id not in swarm.query(b, "status")["voters"], 2.0,
               "b never makes itself a voter or leader: no split brain")


def test_an_operator_sets_the_voters_cluster_wide_and_back_to_automatic(swarm: Swarm) -> None:
    nodes = swarm.loopback(3, JOIN_S)[0]
    ids = {n.id for n in nodes}

    def voters_everywhere(want: set[str]) -> bool:
        return all(set(swarm.query(n, "status")["voters"]) == want for n in nodes)

    swarm.wait_for(lambda: voters_everywhere(ids), ELECT_S, "three automatic voters")
    swarm.grant(nodes[0], "operate", nodes[1])  # the founder makes n2 an operator
    chosen = {nodes[0].id, nodes[2].id}
    res = swarm.cli_json(nodes[1], "voters", "--set", "n1", "--set", "n3")
    assert set(res["pinned"]) == chosen
    swarm.wait_for(lambda: voters_everywhere(chosen), ELECT_S, "every node uses n1 and n3")
    swarm.wait_for(lambda: agreed(swarm, nodes) and agreed(swarm, nodes)[0] in chosen,
                   ELECT_S, "the leader is one of the chosen voters")
    res = swarm.cli(nodes[1], "voters", "--set", "nobody", check=False)
    assert res.returncode == 1 and "no node named" in res.stderr
    swarm.cli(nodes[0], "voters", "--auto")
    swarm.wait_for(lambda: voters_everywhere(ids), ELECT_S, "automatic voters again")
