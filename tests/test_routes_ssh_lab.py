"""A member reachable only through two SSH jump hosts, with real sshd and swarmnode processes.

    orch 10.42.0.2 --- (10.42.0.3) jump1 (172.30.0.1) --- (172.30.0.2) jump2 (172.31.0.1)
                                                                         |
                                                                  target 172.31.0.9

The jump hosts first route (so the two swarmnodes meet), then jump1 stops forwarding: from
then on only SSH crosses it. `route` must find the chain from `jumps` in orch's config.toml and
tunnel ZeroMQ through it (gossip too: the target comes back alive), `exec` must run on the
target, a wrong host key on either hop must be refused, and with the target's swarmnode down
an action falls back to plain SSH, verified against the host key the target published.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.lab import Lab, unavailable_reason
from tests.lab.sshd import keygen, sshd_unavailable_reason, start_sshd
from tests.swarm import (
    Swarm,
    lab_swarm_fixture,  # noqa: F401 (the `lab_swarm` fixture)
)

_REASON = unavailable_reason() or sshd_unavailable_reason()
pytestmark = [
    pytest.mark.lab,
    pytest.mark.timeout(150),
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]

PORT = 7946
JOIN_S = 20.0
ORCH, JUMP1, JUMP1B, JUMP2, JUMP2B, TARGET = (
    "10.42.0.2", "10.42.0.3", "172.30.0.1", "172.30.0.2", "172.31.0.1", "172.31.0.9")


def build(lab: Lab) -> None:
    for name in ("orch", "jump1", "jump2", "target"):
        lab.host(name)
    lab.link("orch", "jump1", f"{ORCH}/24", f"{JUMP1}/24")
    lab.link("jump1", "jump2", f"{JUMP1B}/24", f"{JUMP2}/24")
    lab.link("jump2", "target", f"{JUMP2B}/24", f"{TARGET}/24")
    lab.route("orch", "172.16.0.0/12", JUMP1)
    lab.route("jump1", "172.31.0.0/24", JUMP2)
    lab.default_route("jump2", JUMP1B)
    lab.default_route("target", JUMP2B)
    lab.forwarding("jump1")
    lab.forwarding("jump2")


def test_two_hop_jump_chain_carries_routes_exec_and_refuses_wrong_keys(
        lab: Lab, lab_swarm: Swarm, tmp_path: Path) -> None:
    swarm = lab_swarm
    build(lab)
    client = keygen(tmp_path / "keys" / "id_ed25519")
    sshd = {h: start_sshd(lab, h, a, [client], tmp_path / "sshd")
            for h, a in (("jump1", JUMP1), ("jump2", JUMP2), ("target", TARGET))}
    known = tmp_path / "known_hosts"
    known.write_text(sshd["jump1"].known_hosts_line + "\n" + sshd["jump2"].known_hosts_line
                     + "\n")

    orch, token = swarm.init("orch", f"{ORCH}:{PORT}", host="orch")
    target = swarm.add("target", f"{TARGET}:{PORT}", host="target")
    orch.home.mkdir(parents=True, exist_ok=True)
    (orch.home / "config.toml").write_text(f'''
[jumps]
target = ["root@{JUMP1}", "root@{JUMP2}"]
[ssh]
identity_file = "{client.path}"
known_hosts = ["{known}"]
host_keys = []
''')
    target.home.mkdir(parents=True, exist_ok=True)
    (target.home / "config.toml").write_text(f'''
kind = "vm"
restart_command = "echo restart >> restarted"
[ssh]
host_keys = ["{sshd["target"].host_key.path}.pub"]
''')
    swarm.start(orch)
    swarm.start(target, token)
    swarm.wait_converged([orch, target], JOIN_S)
    published = swarm.entry(orch, target)["ssh_keys"]
    assert published == [sshd["target"].fingerprint]

    lab.sysctl("jump1", "net.ipv4.ip_forward", "0")  # from now on only SSH crosses jump1
    swarm.wait_for(lambda: swarm.state(orch, target) in ("suspect", "dead"), JOIN_S,
                   "orch notices the target is cut off")

    route = swarm.cli_json(orch, "route", "target")
    assert route["method"] == "ssh", route
    assert route["via"] == [f"root@{JUMP1}:22", f"root@{JUMP2}:22"], route
    assert route["address"].startswith("127.0.0.1:"), route
    assert route["attempts"][0]["method"] == "reported"
    assert route["attempts"][-1] == {**route["attempts"][-1], "method": "ssh",
                                     "address": f"{TARGET}:{PORT}", "result": "ok"}
    # the same route carries membership: the target is alive again, through the tunnel
    swarm.wait_for(lambda: swarm.state(orch, target) == "alive", JOIN_S,
                   "gossip flows through the SSH tunnel")
    # the dashboard's picture draws the chain: orch -> jump1 -> jump2 -> target
    snap = swarm.query(orch, "snapshot")
    [seen] = [n for n in snap["nodes"] if n["id"] == target.id]
    assert seen["network"] == "172.31.0.0/24" and seen["path"]["via"] == route["via"], seen
    hops = [f"jump:root@{JUMP1}:22", f"jump:root@{JUMP2}:22"]
    assert snap["network"]["jumps"] == hops
    assert snap["network"]["edges"] == [
        {"from": a, "to": b, "kind": "ssh"}
        for a, b in ((orch.id, hops[0]), (hops[0], hops[1]), (hops[1], target.id))]
    res = swarm.cli(orch, "exec", "target", "--", "sh", "-c",
                    f"ip -4 -o addr show | grep -c {TARGET}; exit 7", check=False)
    assert (res.returncode, res.stdout) == (7, "1\n"), res

    # a wrong host key on either hop: refused, nothing reaches the target
    impostor = keygen(tmp_path / "keys" / "impostor").public.split()[:2]
    for bad, good in (("jump2", "jump1"), ("jump1", "jump2")):
        known.write_text(sshd[good].known_hosts_line + "\n"
                         + f"{sshd[bad].address} {' '.join(impostor)}\n")
        res = swarm.cli(orch, "route", "target", "--json", check=False)
        assert res.returncode == 1, res
        [ssh_try] = [a for a in json.loads(res.stdout)["attempts"] if a["method"] == "ssh"]
        assert sshd[bad].address in ssh_try["result"], ssh_try
        assert sshd[bad].fingerprint in ssh_try["result"], ssh_try  # what it offered
        assert "key" in ssh_try["result"].lower(), ssh_try
    known.write_text(sshd["jump1"].known_hosts_line + "\n" + sshd["jump2"].known_hosts_line
                     + "\n")

    # the target's swarmnode is down: restart falls back to plain SSH through both hops,
    # verified against the key the target published and its `swarmnode id`
    swarm.kill9(target)
    res = swarm.cli(orch, "restart", "target", "-v", check=False)
    assert res.returncode == 0, res
    assert f"route: ssh-exec root@{TARGET}:22" in res.stderr, res.stderr
    assert (target.home / "restarted").read_text() == "restart\n"
    [event] = [e for e in swarm.events(orch, "action") if e["verb"] == "restart"]
    assert event["outcome"] == "exit 0" and event["route"].startswith("ssh-exec"), event

    # the target's sshd now answers with another key than the one the target signed into its
    # record (a reinstalled box, or an impostor at its address): refused, nothing runs
    lab.kill9(sshd["target"].proc)
    other = start_sshd(lab, "target", TARGET, [client], tmp_path / "sshd-impostor")
    assert other.fingerprint != published[0]
    res = swarm.cli(orch, "restart", "target", check=False)
    assert res.returncode == 1, res
    assert other.fingerprint in res.stderr and published[0] in res.stderr, res.stderr
    assert (target.home / "restarted").read_text() == "restart\n"  # still the one run
