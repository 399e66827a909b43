"""The original incident, replayed with real swarmnode processes on separate (namespace) hosts.

    far 172.30.0.9 --- gw --- tarn 192.168.10.25   (tarn masqueraded to 10.42.0.1 on the LAN)
                        |
                 lan1 10.42.0.50, lan2 .51, lan3 .52   (one bridge: mDNS works here)

What went wrong then: tarn, behind the gateway's masquerade, was recorded under the gateway's
address 10.42.0.1. Here every node must be listed under the addresses it reports itself, the
gateway only as where tarn's traffic was *observed* (flagged as NAT), nobody ever under
10.42.0.1; LAN hosts find each other by mDNS, the routed host `far` by its seed; an uninvited
LAN host stays pending until a person admits it; a crashed host is noticed.
"""

from __future__ import annotations

import time

import pytest

from tests.lab import Lab, incident_topology, unavailable_reason
from tests.swarm import (
    Node,
    Swarm,
    host_of,
    lab_swarm_fixture,  # noqa: F401 (the `lab_swarm` fixture)
)

_REASON = unavailable_reason()
pytestmark = [
    pytest.mark.lab,
    pytest.mark.timeout(90),
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]

PORT = 7946
JOIN_S = 20.0
DETECT_S = 15.0
HOLD_S = 1.5


def listen(topo, host: str) -> str:
    return f"{topo.addr(host)}:{PORT}"


def never_under_gateway(gateway: str):
    """Invariant: no member is ever listed with the gateway's address among its addresses."""

    def check(observer: Node, members: list[dict]) -> str | None:
        for m in members:
            if any(host_of(a) == gateway for a in m["addresses"]):
                return f"{m['name']} ({m['id'][:12]}) listed under {gateway}: {m['addresses']}"
        return None

    return check


def reported_as_self(swarm: Swarm, nodes: list[Node]) -> None:
    """Every observer lists every node with exactly the node's own listen address."""
    for obs in nodes:
        by_id = {m["id"]: m for m in swarm.cli_json(obs, "nodes")}
        for n in nodes:
            m = by_id.get(n.id)
            assert m is not None, f"{obs.name} does not list {n.name}"
            assert m["addresses"] == [n.listen], f"{obs.name}'s entry for {n.name}: {m}"


def test_incident_nat_and_routed_hosts_are_listed_as_they_report(
        lab: Lab, lab_swarm: Swarm) -> None:
    swarm = lab_swarm
    topo = incident_topology(lab, lan_hosts=2)
    swarm.invariants.append(never_under_gateway(topo.gw_lan_addr))

    lan1, token = swarm.init("lan1", listen(topo, "lan1"), host="lan1")
    t0 = time.monotonic()
    swarm.start(lan1, mdns=True)
    lan2 = swarm.start(swarm.add("lan2", listen(topo, "lan2"), host="lan2"), token, mdns=True)
    tarn = swarm.start(swarm.add("tarn", listen(topo, "tarn"), host="tarn"), token)
    far = swarm.start(swarm.add("far", listen(topo, "far"), host="far"), token,
                      seeds=[listen(topo, "lan1")])
    nodes = [lan1, lan2, tarn, far]
    swarm.wait_converged(nodes, JOIN_S)
    print(f"lab join-visible: all 4 alive on all 4 {time.monotonic() - t0:.2f}s after lan1 "
          "was spawned")

    gateway = topo.gw_lan_addr

    def tarn_seen_through_nat(obs: Node) -> bool:
        e = swarm.entry(obs, tarn)
        return e is not None and e["observed"] == gateway and e["nat"] is True

    for obs in (lan1, lan2):
        swarm.wait_for(lambda obs=obs: tarn_seen_through_nat(obs), JOIN_S,
                       f"{obs.name} sees tarn's traffic from {gateway}, flagged as NAT")
        e = swarm.entry(obs, tarn)
        assert e["addresses"] == [listen(topo, "tarn")], e
        swarm.wait_for(lambda obs=obs: [ev for ev in swarm.events(obs, "nat_detected")
                                        if ev.get("id") == tarn.id],
                       JOIN_S, f"a nat_detected event for tarn on {obs.name}")
        nat_events = [ev for ev in swarm.cli_json(obs, "events", "--limit", "10000")
                      if ev["kind"] == "nat_detected" and ev.get("id") == tarn.id]
        assert nat_events and nat_events[0]["observed"] == gateway, nat_events
        f = swarm.entry(obs, far)
        assert f["addresses"] == [listen(topo, "far")], f
        assert f["nat"] is False, f
        assert f["observed"] in (None, topo.addr("far")), f
        cli_entry = {m["id"]: m for m in swarm.cli_json(obs, "nodes")}[tarn.id]
        assert (cli_entry["observed"], cli_entry["nat"]) == (gateway, True), cli_entry

    for obs in nodes:  # far is routed, not NATed: nobody flags it
        e = swarm.entry(obs, far)
        assert e is not None and e["nat"] is False, (obs.name, e)
    reported_as_self(swarm, nodes)
    for obs in nodes:
        status = swarm.cli_json(obs, "status")
        assert status["nodes_alive"] == 4, (obs.name, status)

    swarm.kill9(lan2)
    t_dead = swarm.wait_state([lan2], "dead", [lan1, tarn, far], DETECT_S)
    print(f"lab kill -9 detection: lan2 dead on lan1, tarn, far after {t_dead:.2f}s")
    swarm.wait_converged([lan1, tarn, far], JOIN_S)


def test_uninvited_lan_host_found_by_mdns_stays_pending_until_admitted(
        lab: Lab, lab_swarm: Swarm) -> None:
    swarm = lab_swarm
    topo = incident_topology(lab, lan_hosts=3, tarn=False, far=False)
    swarm.invariants.append(never_under_gateway(topo.gw_lan_addr))

    lan1, token = swarm.init("lan1", listen(topo, "lan1"), host="lan1")
    swarm.start(lan1, mdns=True)
    lan2 = swarm.start(swarm.add("lan2", listen(topo, "lan2"), host="lan2"), token, mdns=True)
    swarm.wait_converged([lan1, lan2], JOIN_S)

    # no token, no seed: only mDNS can lead it to the cluster
    t0 = time.monotonic()
    lan3 = swarm.start(swarm.add("lan3", listen(topo, "lan3"), host="lan3"), mdns=True)
    t_pending = swarm.wait_state([lan3], "pending", [lan1, lan2], JOIN_S)
    print(f"lab mDNS: lan3 pending on lan1 and lan2 {time.monotonic() - t0:.2f}s after spawn "
          f"({t_pending:.2f}s after it answered)")
    swarm.hold(lambda: swarm.states([lan1, lan2], lan3) == {"lan1": "pending",
                                                            "lan2": "pending"},
               HOLD_S, "lan3 stays pending until admitted")
    for obs in (lan1, lan2):
        status = swarm.cli_json(obs, "status")
        assert (status["nodes_alive"], status["pending"]) == (2, 1), (obs.name, status)
        e = swarm.entry(obs, lan3)
        assert e["addresses"] == [listen(topo, "lan3")], e

    swarm.cli(lan1, "admit", "lan3")
    swarm.wait_converged([lan1, lan2, lan3], JOIN_S)
    reported_as_self(swarm, [lan1, lan2, lan3])
