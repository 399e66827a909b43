"""Remote actions between real swarmnode processes on loopback: `route`, `exec`, `restart`,
`reboot`, through the CLI exactly as an operator runs them.

What must hold: the command runs on the node named and nowhere else; its output and exit code
come back whole (flow control, no loss); an action aimed at the wrong identity, a pending or a
banned node, or asked by a member that is not an operator, is refused and nothing runs; every
action leaves an event on both ends.
"""

from __future__ import annotations

import json

import pytest

from tests.swarm import (
    Node,
    Swarm,
    loopback_addr,
    swarm_fixture,  # noqa: F401 (the `swarm` fixture)
)

pytestmark = pytest.mark.timeout(90)

JOIN_S = 15.0


def harmless_config(node: Node, kind: str = "vm") -> None:
    """Reboot and restart that only leave a mark in the node's home."""
    node.home.mkdir(parents=True, exist_ok=True)
    (node.home / "config.toml").write_text(
        f'kind = "{kind}"\n'
        'reboot_command = "echo reboot >> rebooted"\n'
        'restart_command = "echo restart >> restarted"\n'
        "[ssh]\nhost_keys = []\n")


def three(swarm: Swarm, kinds=("vm", "vm", "vm")) -> tuple[list[Node], str]:
    n1, token = swarm.init("n1", loopback_addr(1))
    nodes = [n1, swarm.add("n2", loopback_addr(2)), swarm.add("n3", loopback_addr(3))]
    for n, kind in zip(nodes, kinds, strict=True):
        harmless_config(n, kind)
    swarm.start(n1)
    for n in nodes[1:]:
        swarm.start(n, token)
    swarm.wait_converged(nodes, JOIN_S)
    return nodes, token


def test_exec_streams_output_and_returns_the_remote_exit_code(swarm: Swarm) -> None:
    (n1, n2, _n3), _ = three(swarm)
    res = swarm.cli(n1, "exec", "n2", "--", "sh", "-c",
                    "echo out-$(basename $PWD); echo err >&2; exit 3", check=False)
    assert res.returncode == 3, res
    assert res.stdout == "out-n2\n" and res.stderr == "err\n", res
    # 3 MB through a 16-chunk window: every byte arrives, in order
    big = swarm.cli(n1, "exec", "n3", "--", "python3", "-c",
                    "import sys; [sys.stdout.write(f'{i:07d}\\n') for i in range(400000)]")
    lines = big.stdout.splitlines()
    assert len(lines) == 400_000 and lines[0] == "0000000" and lines[-1] == "0399999"
    missing = swarm.cli(n1, "exec", "n2", "--", "no-such-command-here", check=False)
    assert missing.returncode == 1 and "command not found on n2" in missing.stderr, missing
    runs = [e for e in swarm.events(n2, "action_run") if e["verb"] == "exec"]
    assert runs and runs[0]["id"] == n1.id and runs[0]["code"] == 3, runs
    asked = swarm.events(n1, "action")
    assert {(e["name"], e["outcome"]) for e in asked} >= {("n2", "exit 3"), ("n3", "exit 0")}
    assert all(e["route"].startswith("reported 127.0.0.") for e in asked), asked


def test_reboot_and_restart_run_on_the_target_only(swarm: Swarm) -> None:
    (n1, n2, n3), _ = three(swarm, kinds=("vm", "vm", "bare"))
    swarm.state_right(n1, "grant", "operate", n3, [n2])
    swarm.cli(n1, "reboot", "n2")
    swarm.cli(n3, "restart", "n2")
    assert (n2.home / "rebooted").read_text() == "reboot\n"
    assert (n2.home / "restarted").read_text() == "restart\n"
    for other in (n1, n3):
        assert not (other.home / "rebooted").exists() and not (other.home / "restarted").exists()
    # bare metal is not a container to bounce: refused without --force, by both ends
    res = swarm.cli(n1, "reboot", "n3", check=False)
    assert res.returncode == 1 and "bare metal" in res.stderr, res
    assert not (n3.home / "rebooted").exists()
    swarm.cli(n1, "reboot", "n3", "--force")
    assert (n3.home / "rebooted").read_text() == "reboot\n"


def test_route_shows_attempts_and_a_wrong_identity_is_named_not_used(swarm: Swarm) -> None:
    (n1, n2, n3), _ = three(swarm)
    route = swarm.cli_json(n1, "route", "n2")
    assert route["method"] == "reported" and route["address"] == n2.listen, route
    assert [a["result"] for a in route["attempts"]] == ["ok"], route
    # n3's address, as if a gateway's address had been recorded for n2: refused by identity
    res = swarm.cli(n1, "route", "n2", "--address", n3.listen, "--json", check=False)
    assert res.returncode == 1
    bad = json.loads(res.stdout)
    assert bad["method"] is None
    [attempt] = bad["attempts"]
    assert attempt["address"] == n3.listen
    assert attempt["result"].startswith("wrong identity: expected n2"), attempt
    assert f"n3 ({n3.id[:12]}) answered" in attempt["result"], attempt
    res = swarm.cli(n1, "reboot", "n2", "--address", n3.listen, check=False)
    assert res.returncode == 1 and "n3" in res.stderr and "wrong identity" in res.stderr, res
    assert not (n3.home / "rebooted").exists() and not (n2.home / "rebooted").exists()
    # nothing listens: the error lists the attempt
    dead = loopback_addr(9)
    res = swarm.cli(n1, "exec", "n2", "--address", dead, "--", "true", check=False)
    assert res.returncode == 1 and "no route to n2" in res.stderr and dead in res.stderr, res


def test_actions_on_pending_or_banned_nodes_are_refused(swarm: Swarm) -> None:
    (n1, n2, n3), _ = three(swarm)
    ghost = swarm.add("ghost", loopback_addr(4))
    harmless_config(ghost)
    swarm.start(ghost, seeds=[n1.listen])
    swarm.wait_state([ghost], "pending", [n1], JOIN_S)
    res = swarm.cli(n1, "exec", "ghost", "--", "touch", "owned", check=False)
    assert res.returncode == 1 and "pending" in res.stderr, res
    swarm.cli(n1, "ban", "n3")
    swarm.wait_state([n3], "banned", [n1, n2], JOIN_S)
    res = swarm.cli(n2, "reboot", "n3", check=False)
    assert res.returncode == 1 and "banned" in res.stderr, res
    assert not (ghost.home / "owned").exists() and not (n3.home / "rebooted").exists()
    # and the banned node cannot act on members either: it is refused at the handshake
    res = swarm.cli(n3, "exec", "n2", "--", "touch", "owned", check=False)
    assert res.returncode != 0 and not (n2.home / "owned").exists(), res


def test_only_operators_act_and_a_revoke_ends_it(swarm: Swarm) -> None:
    """Regression (issue 13, remote root by default): an ordinary member's exec, restart and
    reboot used to run on every node, the founder included."""
    (n1, n2, n3), _ = three(swarm)
    for verb, args in (("exec", ["--", "touch", "owned"]), ("restart", []), ("reboot", [])):
        for target in (n1, n3):
            res = swarm.cli(n2, verb, target.name, *args, check=False)
            assert res.returncode == 1, res
            assert "not an operator" in res.stderr and "grant operate" in res.stderr, res
    for n in (n1, n3):
        assert not {"owned", "restarted", "rebooted"} & {p.name for p in n.home.iterdir()}
    # a non-operator cannot hand itself the right, nor revoke the founder's
    res = swarm.cli(n2, "grant", "operate", "n2", check=False)
    assert res.returncode == 1 and "may not operate" in res.stderr, res

    swarm.state_right(n1, "grant", "operate", n2, [n3])
    swarm.cli(n2, "exec", "n3", "--", "touch", "owned")
    assert (n3.home / "owned").exists()
    [run] = [e for e in swarm.events(n3, "action_run") if e["verb"] == "exec"]
    assert run["id"] == n2.id, run
    res = swarm.cli(n2, "revoke", "operate", "n1", check=False)
    assert res.returncode == 1 and "the founder" in res.stderr, res

    (n3.home / "owned").unlink()
    swarm.state_right(n1, "revoke", "operate", n2, [n3])
    res = swarm.cli(n2, "exec", "n3", "--", "touch", "owned", check=False)
    assert res.returncode == 1 and "not an operator" in res.stderr, res
    assert not (n3.home / "owned").exists()
    swarm.state_right(n1, "grant", "operate", n2, [n3])
    swarm.cli(n2, "exec", "n3", "--", "true")  # operator again: a grant withdraws the revoke
