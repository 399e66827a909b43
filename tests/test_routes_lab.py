"""Routes and remote actions on the incident network, with real processes in namespaces.

    lan1 10.42.0.50 --- (10.42.0.1) gw (192.168.10.1) --- tarn 192.168.10.25 [masqueraded]

All three run swarmnode. tarn's traffic reaches the LAN from 10.42.0.1, the gateway's own
address, where the gateway's swarmnode listens: the setting in which an orchestrator once
rebooted the gateway when it meant tarn. Here `reboot tarn` must make tarn, and only tarn,
run its reboot command; the gateway's address tried as tarn must be refused by identity.
"""

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
    pytest.mark.timeout(120),
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]

PORT = 7946
FORWARD = 17946  # gw's port forward to tarn, written as lan1's override
JOIN_S = 20.0


def configure(node: Node, extra: str = "") -> None:
    node.home.mkdir(parents=True, exist_ok=True)
    (node.home / "config.toml").write_text(
        'kind = "vm"\nreboot_command = "echo reboot >> rebooted"\n'
        'restart_command = "echo restart >> restarted"\n' + extra + "\n[ssh]\nhost_keys = []\n")


def incident_swarm(lab: Lab, swarm: Swarm, lan1_extra: str = ""):
    topo = incident_topology(lab, lan_hosts=1, tarn=True, far=False)
    lan1, token = swarm.init("lan1", f"{topo.addr('lan1')}:{PORT}", host="lan1")
    gw = swarm.add("gw", f"{topo.gw_lan_addr}:{PORT}", host="gw")
    tarn = swarm.add("tarn", f"{topo.addr('tarn')}:{PORT}", host="tarn")
    configure(lan1, lan1_extra)
    configure(gw)
    configure(tarn)
    swarm.start(lan1)
    swarm.start(gw, token)
    swarm.start(tarn, token)
    swarm.wait_converged([lan1, gw, tarn], JOIN_S)
    return topo, lan1, gw, tarn


def marks(*nodes: Node) -> dict[str, bool]:
    return {n.name: (n.home / "rebooted").exists() for n in nodes}


def test_reboot_reaches_the_node_behind_nat_never_the_gateway(lab: Lab, lab_swarm: Swarm):
    swarm = lab_swarm
    topo, lan1, gw, tarn = incident_swarm(lab, swarm)
    gateway = f"{topo.gw_lan_addr}:{PORT}"
    # tarn is observed at the gateway's address...
    swarm.wait_for(lambda: (swarm.entry(lan1, tarn) or {}).get("nat") is True, JOIN_S,
                   "lan1 sees tarn through the gateway's masquerade")
    # ...and trying that address as tarn is refused by identity: the gateway answered
    res = swarm.cli(lan1, "route", "tarn", "--address", gateway, "--json", check=False)
    assert res.returncode == 1
    [attempt] = json.loads(res.stdout)["attempts"]
    assert attempt["result"] == (f"wrong identity: expected tarn ({tarn.id[:12]}), "
                                 f"gw ({gw.id[:12]}) answered"), attempt
    res = swarm.cli(lan1, "reboot", "tarn", "--address", gateway, check=False)
    assert res.returncode == 1 and "wrong identity" in res.stderr, res.stderr
    assert marks(lan1, gw, tarn) == {"lan1": False, "gw": False, "tarn": False}

    # the real thing: tarn's reported address is unreachable from the LAN, so the route is
    # the connection tarn itself keeps to lan1 (CURVE proves it is tarn)
    route = swarm.cli_json(lan1, "route", "tarn")
    assert route["method"] == "inbound", route
    assert [a["method"] for a in route["attempts"]] == ["reported", "inbound"], route
    assert route["attempts"][0]["result"] != "ok"
    # the dashboard's picture says the same: tarn in its own network, marked NAT with the
    # address it reports and the gateway's it is seen from, reached only by its connection
    snap = swarm.query(lan1, "snapshot")
    [seen] = [n for n in snap["nodes"] if n["id"] == tarn.id]
    assert (seen["network"], seen["nat"], seen["observed"], seen["addresses"]) == (
        "192.168.10.0/24", True, topo.gw_lan_addr, [f"{topo.addr('tarn')}:{PORT}"]), seen
    assert seen["path"]["how"] == "inbound", seen
    edges = {(e["from"], e["to"]): e["kind"] for e in snap["network"]["edges"]}
    assert edges[(tarn.id, lan1.id)] == "inbound" and (lan1.id, tarn.id) not in edges
    assert edges[(lan1.id, gw.id)] == "direct", edges
    assert snap["network"]["networks"][0]["members"][0] == lan1.id
    swarm.cli(lan1, "reboot", "tarn")
    assert marks(lan1, gw, tarn) == {"lan1": False, "gw": False, "tarn": True}
    res = swarm.cli(lan1, "exec", "tarn", "--", "sh", "-c",
                    "ip -4 -o addr show | grep -c 192.168.10.25")
    assert res.stdout.strip() == "1"  # it ran in tarn's namespace
    # the gateway's node knows exactly what ran where: nothing on it
    assert not swarm.events(gw, "action_run")
    [ran] = swarm.events(tarn, "action_run")[:1]
    assert ran["id"] == lan1.id and ran["verb"] in ("reboot", "exec")
    asked = [e for e in swarm.events(lan1, "action") if e["verb"] == "reboot"]
    assert [(e["route"], e["outcome"]) for e in asked] == [
        (None, "no route to tarn: every attempt failed"),
        (f"inbound {topo.gw_lan_addr}", "exit 0")], asked


def test_override_is_used_when_reported_addresses_fail_and_all_failing_is_listed(
        lab: Lab, lab_swarm: Swarm):
    swarm = lab_swarm
    override = f'[overrides]\ntarn = "10.42.0.1:{FORWARD}"\n'
    topo, lan1, gw, tarn = incident_swarm(lab, swarm, lan1_extra=override)
    lab.port_forward("gw", topo.gw_lan_addr, FORWARD, f"{topo.addr('tarn')}:{PORT}")
    route = swarm.cli_json(lan1, "route", "tarn")
    assert route["method"] == "override", route
    assert route["address"] == f"10.42.0.1:{FORWARD}"
    assert [(a["method"], a["result"] == "ok") for a in route["attempts"]] == [
        ("reported", False), ("override", True)], route
    res = swarm.cli(lan1, "exec", "tarn", "-v", "--", "cat", "/proc/sys/kernel/hostname")
    assert f"route: override 10.42.0.1:{FORWARD}" in res.stderr
    swarm.cli(lan1, "reboot", "tarn")
    assert marks(lan1, gw, tarn) == {"lan1": False, "gw": False, "tarn": True}

    # tarn crashes: every route fails, and the error lists each attempt
    swarm.kill9(tarn)
    res = swarm.cli(lan1, "route", "tarn", "--json", check=False)
    assert res.returncode == 1
    failed = json.loads(res.stdout)
    assert failed["method"] is None
    tried = [(a["method"], a["address"]) for a in failed["attempts"]]
    assert tried[:2] == [("reported", f"{topo.addr('tarn')}:{PORT}"),
                         ("override", f"10.42.0.1:{FORWARD}")], failed
    assert all(a["result"] != "ok" for a in failed["attempts"]), failed
    res = swarm.cli(lan1, "restart", "tarn", check=False)
    assert res.returncode == 1
    assert "no route to tarn" in res.stderr and f"10.42.0.1:{FORWARD}" in res.stderr, res.stderr
