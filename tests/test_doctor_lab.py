"""`swarmnode doctor` in the network lab, where its faults are real: a node behind a
masquerading gateway (no member can dial it; its traffic comes from the gateway's address),
and a node whose port a firewall drops. Each shows as a failed check with its fix; a healthy
node's checks pass."""

from __future__ import annotations

import json

import pytest

from tests.lab import Lab, incident_topology, unavailable_reason
from tests.swarm import (
    Node,
    Swarm,
    lab_swarm_fixture,  # noqa: F401 (the `lab_swarm` fixture)
)

_REASON = unavailable_reason()
pytestmark = [
    pytest.mark.lab,
    pytest.mark.slow,
    pytest.mark.timeout(150),
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]

PORT = 7946


def checks(swarm: Swarm, node: Node) -> tuple[int, dict[str, dict[str, str]]]:
    res = swarm.cli(node, "doctor", "--json", check=False, timeout=60)
    assert res.stdout.startswith("["), (res.returncode, res.stdout, res.stderr)
    return res.returncode, {c["name"]: c for c in json.loads(res.stdout)}


def test_doctor_names_nat_an_unreachable_port_and_a_firewall(lab: Lab,
                                                             lab_swarm: Swarm) -> None:
    swarm = lab_swarm
    topo = incident_topology(lab, lan_hosts=2, far=False)
    listen = {h: f"{topo.addr(h)}:{PORT}" for h in ("lan1", "lan2", "tarn")}
    lan1, token = swarm.init("lan1", listen["lan1"], host="lan1")
    swarm.start(lan1)
    lan2 = swarm.start(swarm.add("lan2", listen["lan2"], host="lan2"), token)
    tarn = swarm.start(swarm.add("tarn", listen["tarn"], host="tarn"), token)
    nodes = [lan1, lan2, tarn]
    swarm.wait_converged(nodes, 30)

    rc, healthy = checks(swarm, lan1)
    assert healthy["reachable"]["status"] == "ok", healthy["reachable"]
    assert "reached by 2 of 2" in healthy["reachable"]["detail"]
    assert healthy["nat"]["status"] == "ok" and healthy["clock"]["status"] == "ok"

    rc, behind = checks(swarm, tarn)  # the incident's node behind the gateway
    assert rc == 1
    assert behind["reachable"]["status"] == "fail", behind["reachable"]
    assert "open the port" in behind["reachable"]["fix"]
    assert behind["nat"]["status"] == "warn" and topo.gw_lan_addr in behind["nat"]["detail"]

    lab._iptables("lan2", ["-I", "INPUT", "-p", "tcp", "--dport", str(PORT), "-j", "DROP"])
    # its own connections out still carry the swarm; the members' dials in now fail
    swarm.wait_for(lambda: checks(swarm, lan2)[1]["reachable"]["status"] == "fail", 60,
                   "doctor on lan2 to find its port closed to every member")
    rc, walled = checks(swarm, lan2)
    assert rc == 1 and "no member reached this node" in walled["reachable"]["detail"]
    assert "open the port" in walled["reachable"]["fix"]
