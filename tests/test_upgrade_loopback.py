"""Upgrading a running cluster from the release before roles and proven leadership (a92efc8).

What must hold: a 3-node loopback cluster running the old code builds; the operator installs
the new code on the founder, restarts it, and runs `swarmnode push --wait` there (the
self-update); every node then runs the pushed release, the same leader is proven on every
node, a build completes (submitted with the old CLI still installed on that machine), all
three are alive and the founder can `exec` on the others; a member that could `exec` before
can again once the founder grants it `operate`. These are the steps of "Upgrading to the
release with roles and proven leadership" in docs/operations.md.

The old tree comes from this repository's history (`git archive`); the nodes of the old phase
run it the way an installed swarmnode runs: `python -m cli.main` from that tree.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.swarm import REPO, Node, Swarm, swarm_fixture  # noqa: F401

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

OLD_RELEASE = "a92efc8"
"""Today's release when roles and proven leadership landed: the one clusters run."""
JOIN_S = 20.0
BUILD_S = 30.0


def old_code(dest: Path) -> Path:
    """The old release's code (`swarmnode`, `net`, `cli`) extracted into `dest`."""
    res = subprocess.run(["git", "-C", str(REPO), "archive", OLD_RELEASE, "swarmnode", "net",
                          "cli"], capture_output=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"the old release {OLD_RELEASE} is not in this checkout: "
                    f"{res.stderr.decode(errors='replace').strip()}")
    with tarfile.open(fileobj=io.BytesIO(res.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def runs_from(node: Node) -> Path:
    """The tree a node process was started from (where `python -m cli.main` found it)."""
    assert node.proc is not None
    return Path(os.readlink(f"/proc/{node.proc.pid}/cwd")).resolve()


def build(swarm: Swarm, node: Node, root: Path, name: str) -> dict:
    """A two-job build submitted at `node` (the second needs the first's output)."""
    root.mkdir(parents=True)
    plan = root / "plan.toml"
    plan.write_text(f'name = "{name}"\n\n'
                    '[jobs.a]\ncmd = "echo one > a.txt"\noutputs = ["a.txt"]\n\n'
                    '[jobs.b]\ncmd = "cat a.txt > b.txt; echo two >> b.txt"\n'
                    'deps = ["a"]\noutputs = ["b.txt"]\n')
    res = swarm.cli(node, "build", str(plan), "--wait", "--out", str(root / "out"), "--json",
                    timeout=BUILD_S)
    status = json.loads(res.stdout)
    assert status["ok"] and status["progress"]["done"] == 2, status
    assert (root / "out" / "b" / "b.txt").read_text() == "one\ntwo\n"
    return status


def one_proven_leader(swarm: Swarm, nodes: list[Node]) -> str | None:
    """The leader every node names for one term, itself in the leader role; else None."""
    sts = [swarm.query(n, "status") for n in nodes]
    leaders = {(st["leader"], st["term"]) for st in sts}
    if len(leaders) != 1:
        return None
    [(leader, _term)] = leaders
    roles = {st["id"]: st["role"] for st in sts}
    return leader if leader and roles.get(leader) == "leader" else None


def test_a_cluster_on_the_old_release_is_pushed_the_new_one_and_keeps_working(
        swarm: Swarm, tmp_path: Path) -> None:
    old = old_code(tmp_path / "old").resolve()
    swarm.code = old  # the nodes and the CLI everyone has installed today
    nodes = swarm.loopback(3, JOIN_S)[0]
    n1, n2, n3 = nodes
    assert all(runs_from(n) == old for n in nodes)
    swarm.wait_for(lambda: one_proven_leader(swarm, nodes), JOIN_S, "a leader (old release)")
    build(swarm, n2, tmp_path / "before", "before")
    hello = ["--", "sh", "-c", "echo hello from $(basename $PWD)"]
    assert swarm.cli(n2, "exec", "n3", *hello).stdout == "hello from n3\n"  # any member could

    # The operator installs the new release on the founder and restarts it there ...
    n1.code = REPO
    swarm.stop(n1)
    swarm.start(n1)
    assert runs_from(n1) == REPO.resolve()
    swarm.wait_converged(nodes, JOIN_S)
    # ... and pushes it from there: a self-update of every node, the pusher last.
    res = swarm.cli(n1, "push", "--wait", "--json", timeout=90.0, check=False)
    view = json.loads(res.stdout) if res.stdout.strip() else None
    assert res.returncode == 0 and view is not None, (res.stdout, res.stderr, swarm.dump())
    digest = view["digest"]
    # the pusher restarts itself last, once the others reported healthy
    assert not view["halted"] and not view["failures"], view
    assert {s["name"]: s["state"] for s in view["nodes"].values() if s["name"] != "n1"} == {
        "n2": "healthy", "n3": "healthy"}, view
    swarm.wait_for(lambda: all(swarm.query(n, "status")["release"] == digest for n in nodes),
                   JOIN_S, "every node runs the pushed release")
    for n in nodes:
        assert os.readlink(n.home / "current") == f"releases/{digest}"

    leader = swarm.wait_for(lambda: one_proven_leader(swarm, nodes), JOIN_S,
                            "one leader, proven on every node (new release)")
    assert leader in {n.id for n in nodes}
    swarm.wait_converged(nodes, JOIN_S)
    # Only holders of `build` submit now (docs/operations.md, upgrading): the founder grants it
    # with its new CLI, and n3 builds with the CLI installed there, the old one.
    swarm.grant(n1, "build", n3)
    build(swarm, n3, tmp_path / "after", "after")
    res = swarm.cli(n1, "exec", "n3", *hello)
    assert res.stdout == "hello from n3\n", res
    # Only operators act on nodes now: n2 could before, and can again once the founder says so.
    res = swarm.cli(n2, "exec", "n3", *hello, check=False)
    assert res.returncode != 0 and "not an operator" in res.stderr, res
    swarm.cli(n1, "grant", "operate", "n2")
    swarm.wait_for(lambda: swarm.cli(n2, "exec", "n3", *hello, check=False).stdout
                   == "hello from n3\n", JOIN_S, "n2 may operate")
    assert not [e for n in nodes for e in swarm.events(n, "push_rolled_back")]
