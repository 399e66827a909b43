"""`swarmnode push` from a node that is not the leader, across NAT and an SSH jump host.

    lan1 10.42.0.50, lan2 .51, lan3 .52 ---- switch `lan` ---- (10.42.0.1) gw (192.168.10.1)
                       |                                                    |
              (10.42.0.3) jump (172.31.0.1)                  tarn 192.168.10.25 [masqueraded]
                       |
               deep 172.31.0.9

lan1..3, tarn and deep run swarmnode; gw and jump do not (jump runs only a real sshd). tarn's
traffic reaches the LAN from the gateway's own address and its reported address is unreachable
from the LAN: it is reached back over the connection it opens itself. jump first routes (so
every node meets every other), then stops forwarding: from then on deep is reachable only by
SSH through jump (`jumps` in the lan hosts' config.toml), and reaches nobody by itself.

A lan node that is neither the founder nor the leader is granted the push right by the founder,
restarted (so it holds no route of its own to deep: deep is alive to it only through the
others' gossip) and pushes a small payload with `push --wait --json`. The push must reach every
node, tarn and deep included: each installs the files under <home>/apps/web, runs the restart
script in its own namespace (a marker in its home names the release and the addresses it ran
with) and the health check, reports healthy to the pusher, and `versions` agrees everywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.lab import Lab, incident_topology, unavailable_reason
from tests.lab.sshd import keygen, sshd_unavailable_reason, start_sshd
from tests.swarm import (
    Node,
    Swarm,
    lab_swarm_fixture,  # noqa: F401 (the `lab_swarm` fixture)
)

_REASON = unavailable_reason() or sshd_unavailable_reason()
pytestmark = [
    pytest.mark.lab,
    pytest.mark.slow,
    pytest.mark.timeout(150),
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]

PORT = 7946
JOIN_S = 30.0
ROUTE_S = 40.0  # a cut-off member is given its SSH route in the background every 15 s
JUMP, JUMP_DEEP, DEEP = "10.42.0.3", "172.31.0.1", "172.31.0.9"
DEEP_CIDR = "172.31.0.0/24"
LAN = ("lan1", "lan2", "lan3")


def build(lab: Lab):
    """The incident network (3 lan hosts, tarn behind gw's masquerade) plus the jump host."""
    topo = incident_topology(lab, lan_hosts=len(LAN), tarn=True, far=False)
    lab.host("jump")
    lab.connect("jump", topo.switch, f"{JUMP}/24")
    lab.host("deep")
    lab.link("jump", "deep", f"{JUMP_DEEP}/24", f"{DEEP}/24")
    lab.default_route("deep", JUMP_DEEP)
    for h in LAN:
        lab.route(h, DEEP_CIDR, JUMP)
    lab.route(topo.gw, DEEP_CIDR, JUMP)  # tarn meets deep too, before the cut
    lab.forwarding("jump")
    return topo


def configure(node: Node, text: str = "[ssh]\nhost_keys = []\n") -> None:
    node.home.mkdir(parents=True, exist_ok=True)
    (node.home / "config.toml").write_text(text)


def payload(root: Path) -> Path:
    """A small app. Its restart script records the release it restarted into and the
    addresses of the host it ran on (so: that it ran in the node's own namespace)."""
    d = root / "web"
    (d / "bin").mkdir(parents=True)
    (d / "data.txt").write_text("version 1\n")
    (d / "bin" / "serve").write_text("#!/bin/sh\necho serving\n")
    (d / "bin" / "restart").write_text(
        '#!/bin/sh\nbasename "$SWARMNODE_RELEASE" >> "$SWARMNODE_HOME/web-restarts"\n'
        "ip -4 -o addr show | awk '{print $4}' > \"$SWARMNODE_HOME/web-addrs\"\n")
    for script in ("serve", "restart"):
        (d / "bin" / script).chmod(0o755)
    (d / "swarmnode-push.toml").write_text(
        'name = "web"\nrestart = "bin/restart"\n'
        'health = "test -f data.txt && test -x bin/serve"\nhealth_timeout = 10\n')
    return d


def files(root: Path) -> dict[str, str]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*"))
            if p.is_file()}


def versions(swarm: Swarm, node: Node) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """(the newest release per app, each member's releases) in `node`'s view."""
    v = swarm.query(node, "versions")
    return ({a: r["digest"] for a, r in v["latest"].items()},
            {n["name"]: {a: x["digest"] for a, x in n["apps"].items()} for n in v["nodes"]})


def one_leader(swarm: Swarm, nodes: list[Node]) -> str | None:
    leaders = {swarm.query(n, "status")["leader"] for n in nodes}
    return leaders.pop() if len(leaders) == 1 else None


def test_push_from_a_follower_reaches_every_node_behind_nat_and_a_jump_host(
        lab: Lab, lab_swarm: Swarm, tmp_path: Path) -> None:
    swarm = lab_swarm
    topo = build(lab)
    client = keygen(tmp_path / "keys" / "id_ed25519")
    sshd = start_sshd(lab, "jump", JUMP, [client], tmp_path / "sshd")
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_line + "\n")

    first, token = swarm.init("lan1", f"{topo.addr('lan1')}:{PORT}", host="lan1")
    lans = [first] + [swarm.add(h, f"{topo.addr(h)}:{PORT}", host=h) for h in LAN[1:]]
    tarn = swarm.add("tarn", f"{topo.addr('tarn')}:{PORT}", host="tarn")
    deep = swarm.add("deep", f"{DEEP}:{PORT}", host="deep")
    nodes = [*lans, tarn, deep]
    for n in lans:
        configure(n, f'[jumps]\ndeep = ["root@{JUMP}"]\n[ssh]\nidentity_file = "{client.path}"'
                     f'\nknown_hosts = ["{known}"]\nhost_keys = []\n')
    configure(tarn)
    configure(deep)
    swarm.start(first)
    for n in nodes[1:]:
        swarm.start(n, token)
    swarm.wait_converged(nodes, JOIN_S)

    lab.sysctl("jump", "net.ipv4.ip_forward", "0")  # from now on only SSH reaches deep
    swarm.wait_for(lambda: any(swarm.state(n, deep) in ("suspect", "dead") for n in lans),
                   JOIN_S, "the lan notices that deep is cut off")
    swarm.wait_converged(nodes, ROUTE_S)  # deep is back: gossip crosses the SSH tunnels

    leader = swarm.wait_for(lambda: one_leader(swarm, nodes), JOIN_S, "one leader")
    pusher = next(n for n in lans[1:] if n.id != leader)  # neither founder nor leader
    web = payload(tmp_path)
    res = swarm.cli(pusher, "push", str(web), "--wait", "--json", check=False)
    assert res.returncode != 0 and "may not push" in res.stderr, res
    assert "may push" in swarm.cli(first, "grant", "push", pusher.name).stdout

    # The pusher restarts: it forgets its routes, so deep is alive to it only through what
    # the others gossip; the push itself must find the way (the SSH jump) to deep.
    swarm.stop(pusher)
    swarm.start(pusher)
    swarm.wait_converged(nodes, JOIN_S)
    swarm.wait_for(lambda: one_leader(swarm, nodes) == leader, JOIN_S, "the same leader")
    status = swarm.query(pusher, "status")
    assert (status["leader"], status["role"]) != (pusher.id, "leader"), status

    res = swarm.cli(pusher, "push", str(web), "--wait", "--json", timeout=120.0, check=False)
    assert res.returncode == 0, (res.stdout, res.stderr)
    view = json.loads(res.stdout)
    digest = view["digest"]
    assert (view["halted"], view["failures"], view["counts"]) == ("", [], {"healthy": 5}), view
    assert {s["name"] for s in view["nodes"].values()} == {n.name for n in nodes}, view
    assert sum(1 for s in view["nodes"].values() if s["canary"]) == 1, view

    sent = files(web)
    for n in nodes:
        app = n.home / "apps" / "web"
        assert os.readlink(app) == f"../releases/{digest}", n.name
        assert files(app) == sent, n.name
        assert os.access(app / "bin" / "serve", os.X_OK), n.name
        assert (n.home / "web-restarts").read_text().split() == [digest], n.name
        ran_with = {a.split("/")[0] for a in (n.home / "web-addrs").read_text().split()}
        assert n.listen.rsplit(":", 1)[0] in ran_with, (n.name, ran_with)  # its namespace
    assert not [e for n in nodes for e in swarm.events(n, "push_rolled_back")]

    # Everyone's view: the release is the newest, and every node runs it.
    want = ({"web": digest}, {n.name: {"web": digest} for n in nodes})
    for n in nodes:
        swarm.wait_for(lambda n=n: versions(swarm, n) == want, JOIN_S,
                       f"{n.name} sees every node on {digest[:12]}")
    for n in nodes:
        v = swarm.cli_json(n, "versions")
        assert v["latest"]["web"]["digest"] == digest and v["latest"]["web"]["by"] == pusher.id
        assert {m["name"]: (m["apps"]["web"]["digest"], m["apps"]["web"]["drift"])
                for m in v["nodes"]} == {m.name: (digest, False) for m in nodes}, v

    # ...and that is the network the push crossed: from the pusher, deep only via the jump
    # host, tarn only over the connection tarn keeps to it.
    route = swarm.cli_json(pusher, "route", "deep")
    assert (route["method"], route["via"]) == ("ssh", [f"root@{JUMP}:22"]), route
    assert swarm.cli_json(pusher, "route", "tarn")["method"] == "inbound"
