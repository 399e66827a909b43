"""`swarmnode push` across real swarmnode processes on loopback.

What must hold: only a node with the push right can push, and the founder can grant it; a
payload reaches every node (files installed, `versions` agrees), canary first; a payload whose
health check fails is rolled back on the canary by itself and never installed anywhere else,
and `push --wait` exits non-zero naming the node and the reason; a node that was offline
during a push catches up when it returns; a self-update restarts every node into the new code
(same pid: the node execs itself) and the cluster stays whole.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.swarm import REPO, Node, Swarm, loopback_addr, swarm_fixture  # noqa: F401

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

JOIN_S = 20.0
PUSH_S = 30.0


RESTART = "basename $SWARMNODE_RELEASE >> $SWARMNODE_HOME/web-restarts"


def payload(root: Path, version: str, health: str = "test -f data.txt",
            restart: str = RESTART, health_timeout: int = 10) -> Path:
    """A small app: its restart command records which release it restarted into."""
    d = root / f"web-{version}"
    (d / "bin").mkdir(parents=True)
    (d / "data.txt").write_text(f"version {version}\n")
    (d / "bin" / "serve").write_text("#!/bin/sh\necho serving\n")
    (d / "bin" / "serve").chmod(0o755)
    (d / "swarmnode-push.toml").write_text(
        'name = "web"\n'
        f'restart = "{restart}"\n'
        f'health = "{health}"\nhealth_timeout = {health_timeout}\n')
    return d


def app_files(node: Node, app: str = "web") -> dict[str, str]:
    link = node.home / "apps" / app
    if not link.exists():
        return {}
    return {str(p.relative_to(link)): p.read_text() for p in sorted(link.rglob("*"))
            if p.is_file()}


def push(swarm: Swarm, node: Node, *args: str, check: bool = True):
    res = swarm.cli(node, "push", *args, "--wait", "--json", timeout=90.0, check=check)
    return res.returncode, json.loads(res.stdout) if res.stdout.strip() else None, res.stderr


def versions(swarm: Swarm, node: Node) -> dict[str, dict[str, str]]:
    v = swarm.query(node, "versions")
    return {n["name"]: {a: x["digest"] for a, x in n["apps"].items()} for n in v["nodes"]}


def test_push_needs_the_right_reaches_every_node_and_rolls_back_a_bad_canary(
        swarm: Swarm, tmp_path: Path) -> None:
    nodes = swarm.loopback(4, JOIN_S)[0]
    n1, n2 = nodes[0], nodes[1]
    v1 = payload(tmp_path, "1")

    # n2 may not push until the founder grants it
    code, _, stderr = push(swarm, n2, str(v1), check=False)
    assert code != 0 and "may not push" in stderr
    res = swarm.cli(n2, "grant", "push", "n2", check=False)  # nor grant itself the right
    assert res.returncode != 0 and "cannot grant" in res.stderr
    assert "may push" in swarm.cli(n1, "grant", "push", "n2").stdout
    code, view, stderr = push(swarm, n2, str(v1))
    assert code == 0, stderr
    digest = view["digest"]
    assert view["counts"] == {"healthy": 4}
    assert sum(1 for s in view["nodes"].values() if s["canary"]) == 1
    for n in nodes:
        assert app_files(n) == {"bin/serve": "#!/bin/sh\necho serving\n",
                                "data.txt": "version 1\n",
                                "swarmnode-push.toml": (v1 / "swarmnode-push.toml").read_text()}
        assert os.access(n.home / "apps" / "web" / "bin" / "serve", os.X_OK)
        assert (n.home / "web-restarts").read_text().split() == [digest]
    swarm.wait_for(lambda: all(v == {"web": digest} for v in versions(swarm, n1).values()),
                   10.0, "every node's record reports the release")

    # a release whose health check fails: the canary rolls back, nobody else installs it
    v2 = payload(tmp_path, "2", health="echo db unreachable >&2; exit 3")
    code, view, stderr = push(swarm, n1, str(v2), check=False)
    assert code == 1
    bad = view["digest"]
    (canary,) = [swarm.nodes[s["name"]] for s in view["nodes"].values() if s["canary"]]
    assert view["halted"].startswith(f"canary {canary.name} rolled back: health command exited 3")
    assert "db unreachable" in view["halted"]
    assert [(f["name"], f["state"]) for f in view["failures"]] == [(canary.name, "rolled_back")]
    for n in nodes:
        assert app_files(n)["data.txt"] == "version 1\n"  # canary included: rolled back
        assert (n.home / "releases" / bad).exists() == (n is canary)
    # the canary restarted into the bad release, then back into the good one
    assert (canary.home / "web-restarts").read_text().split() == [digest, bad, digest]
    assert next(e["reason"] for e in swarm.events(canary, "push_rolled_back")).startswith(
        "health command exited 3")
    # the dashboard, on any node: every member on the good release, the rollback on the
    # canary (from its signed record), and on the pusher its halted push
    names = sorted(n.name for n in nodes)
    web = swarm.wait_for(lambda: [a for a in swarm.query(n2, "snapshot")["pushes"]["apps"]
                                  if a["app"] == "web" and a["rolled_back"]], 10.0, "rollback")
    assert web == [{**web[0], "releases": [{"digest": digest[:12], "nodes": names}],
                    "rolled_back": [{"node": canary.name, "digest": bad[:12]}]}], web
    [here] = swarm.query(n1, "snapshot")["pushes"]["here"]  # (v1 was pushed from n2)
    assert here["digest"] == bad[:12] and here["halted"].startswith(f"canary {canary.name}")
    assert web[0]["digest"] == digest[:12]  # the bad release was never published
    # ... and never tries that release again, even when told to; people see who and why
    res = swarm.cli(n1, "push", str(v2), "--canary", "0", "--wait", check=False, timeout=90.0)
    assert res.returncode == 1
    assert f"{canary.name} rolled back: rolled back here before: health command exited 3" in \
        " ".join(res.stderr.split())


def test_a_push_updates_at_most_a_wave_of_nodes_at_once(swarm: Swarm, tmp_path: Path) -> None:
    nodes = swarm.loopback(4, JOIN_S)[0]
    spans = "date +%s.%N >> $SWARMNODE_HOME/web-spans; sleep 0.3; " \
            "date +%s.%N >> $SWARMNODE_HOME/web-spans"
    code, view, stderr = push(swarm, nodes[0], str(payload(tmp_path, "1", restart=spans)),
                              "--canary", "0", "--wave", "1")
    assert code == 0, stderr
    assert view["counts"] == {"healthy": 4}
    # each node restarts (and is checked) before the next one is even sent the release
    restarts = sorted(tuple(float(t) for t in (n.home / "web-spans").read_text().split())
                      for n in nodes)
    assert all(len(r) == 2 for r in restarts), restarts
    for (_, end), (begin, _) in itertools.pairwise(restarts):
        assert begin > end, restarts


def test_a_node_dead_before_its_wave_is_skipped_and_catches_up_when_it_returns(
        swarm: Swarm, tmp_path: Path) -> None:
    nodes = swarm.loopback(4, JOIN_S)[0]
    n1, gate = nodes[0], tmp_path / "gate"
    # each restart holds its wave until the gate opens (or 60 s: a failed test leaves no
    # hook looping, since a node's stop does not end the hooks it runs)
    app = payload(tmp_path, "1", restart=f"for i in $(seq 1200); do [ -e {gate} ] && exit 0; "
                  "sleep 0.05; done; exit 1", health_timeout=120)
    push_id = json.loads(swarm.cli(n1, "push", str(app), "--canary", "0", "--wave", "1",
                                   "--json").stdout)["push"]

    def status() -> dict:
        return swarm.query(n1, "push_status", push=push_id)

    swarm.wait_for(lambda: status()["counts"].get("waiting") == 3, 10.0, "one node staged")
    victim = next(swarm.nodes[s["name"]] for s in status()["nodes"].values()
                  if s["state"] == "waiting" and s["name"] != n1.name)
    swarm.kill9(victim)
    swarm.wait_for(lambda: status()["nodes"][victim.id]["state"] == "offline", JOIN_S,
                   f"{victim.name} skipped once dead")
    gate.touch()
    view = swarm.wait_for(lambda: (v := status())["done"] and v, PUSH_S, "the push's end")
    assert view["counts"] == {"healthy": 3, "offline": 1}, view
    assert view["nodes"][victim.id]["reason"] == "dead when its wave came"
    swarm.start(victim)  # from the release published with the last wave
    swarm.wait_for(lambda: app_files(victim).get("data.txt") == "version 1\n", PUSH_S,
                   f"{victim.name} installed the release it missed")


def test_offline_node_catches_up_when_it_returns(swarm: Swarm, tmp_path: Path) -> None:
    nodes = swarm.loopback(3, JOIN_S)[0]
    n1, n3 = nodes[0], nodes[2]
    swarm.stop(n3)
    swarm.wait_for(lambda: swarm.state(n1, n3) == "left", JOIN_S, "n3 left")
    code, view, stderr = push(swarm, n1, str(payload(tmp_path, "1")))
    assert code == 0, stderr
    assert view["nodes"][n3.id]["state"] == "offline"
    assert app_files(n3) == {}
    swarm.start(n3)
    swarm.wait_for(lambda: app_files(n3).get("data.txt") == "version 1\n", PUSH_S,
                   "n3 installed the release it missed")
    swarm.wait_for(lambda: versions(swarm, n1).get("n3") == {"web": view["digest"]}, 10.0,
                   "n3 reports it")


def test_self_update_restarts_every_node_into_the_new_code(swarm: Swarm,
                                                            tmp_path: Path) -> None:
    # The pusher runs a modified copy of the code; pushing "itself" deploys that copy.
    new = tmp_path / "newcode"
    for pkg in ("swarmnode", "net", "cli"):
        shutil.copytree(REPO / pkg, new / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    init = new / "swarmnode" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "0.1.0"',
                                             '__version__ = "0.1.0+pushed"'))
    nodes = swarm.loopback(3, JOIN_S)[0]
    n1 = nodes[0]
    pids = {n.name: swarm.query(n, "status")["pid"] for n in nodes}
    swarm.stop(n1)
    swarm.start(n1, cwd=new)
    assert swarm.query(n1, "status")["version"] == "0.1.0+pushed"
    swarm.wait_converged(nodes, JOIN_S)
    pids["n1"] = swarm.query(n1, "status")["pid"]

    code, view, stderr = push(swarm, n1)
    assert code == 0, stderr
    digest = view["digest"]
    for n in nodes:
        st = swarm.query(n, "status")
        assert (st["version"], st["release"], st["pid"]) == ("0.1.0+pushed", digest,
                                                            pids[n.name])
        assert os.readlink(n.home / "current") == f"releases/{digest}"
    swarm.wait_converged(nodes, JOIN_S)
    assert not [e for n in nodes for e in swarm.events(n, "push_rolled_back")]


def test_a_tampered_bundle_is_refused_by_every_node(swarm: Swarm, tmp_path: Path) -> None:
    from swarmnode.artifacts import ArtifactStore
    from swarmnode.push.bundle import make_bundle

    nodes = swarm.loopback(3, JOIN_S)[0]
    n1 = nodes[0]
    v1 = payload(tmp_path, "1")
    # The pusher's stored copy of the bundle it is about to push gets one byte flipped (a bad
    # disk, or someone editing it): same size, so storing it again keeps the bad copy.
    info = make_bundle(v1, tmp_path / "b.tgz")
    store = ArtifactStore(n1.home / "artifacts")
    obj = store.path(store.put_file(tmp_path / "b.tgz"))
    obj.chmod(0o644)
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF
    obj.write_bytes(bytes(data))

    code, view, _ = push(swarm, n1, str(v1), check=False)
    assert code == 1 and view["digest"] == info.digest
    (canary,) = [s for s in view["nodes"].values() if s["canary"]]
    assert canary["state"] == "failed" and "ArtifactError" in canary["reason"]
    assert view["halted"].startswith(f"canary {canary['name']} failed")
    for n in nodes:
        assert not (n.home / "releases" / info.digest).exists()
        assert app_files(n) == {}


def test_a_halted_rollout_leaves_healthy_canaries_on_their_release(swarm: Swarm,
                                                                    tmp_path: Path) -> None:
    """The catch-up only ever moves forward: a canary that passed runs a release that was
    never published, and must not be put back on the older published one."""
    from swarmnode.push_service import CATCH_UP_S

    nodes, _ = swarm.loopback(4, JOIN_S)
    n1, n2 = nodes[0], nodes[1]
    code, v1, stderr = push(swarm, n1, str(payload(tmp_path, "1")))
    assert code == 0, stderr
    (n2.home / "refuse").write_text("")
    v2 = payload(tmp_path, "2", health="test ! -f $SWARMNODE_HOME/refuse")
    code, view, _ = push(swarm, n1, str(v2), "--canary", "3", check=False)
    assert code == 1 and view["halted"].startswith("canary n2 rolled back")
    good = {n.name for n in nodes[2:]}
    assert {s["name"] for s in view["nodes"].values() if s["state"] == "healthy"} == good

    def on_v2_where_it_passed() -> bool:
        runs = versions(swarm, n1)
        return all(runs[name] == {"web": view["digest"]} for name in good) and \
            runs["n1"] == runs["n2"] == {"web": v1["digest"]}

    swarm.wait_for(on_v2_where_it_passed, 10.0, "records show who runs what")
    swarm.hold(on_v2_where_it_passed, CATCH_UP_S + 1.5, "no catch-up goes backwards")


def test_push_needs_no_leader(swarm: Swarm, tmp_path: Path) -> None:
    """Two nodes have one voter, the founder: with it down nobody leads, and a push still
    goes out; the founder gets the release when it is back."""
    (n1, n2), _ = swarm.loopback(2, JOIN_S)
    swarm.cli(n1, "grant", "push", "n2")
    swarm.wait_for(lambda: swarm.query(n2, "status")["leader"] == n1.id, JOIN_S, "n1 leads")
    swarm.wait_for(lambda: any(e.get("key") == f"push:{n2.id}"
                               for e in swarm.events(n2, "note")), JOIN_S, "n2 holds its grant")
    swarm.kill9(n1)
    swarm.wait_for(lambda: swarm.query(n2, "status")["leader"] is None, JOIN_S, "no leader")
    code, view, stderr = push(swarm, n2, str(payload(tmp_path, "1")))
    assert code == 0, stderr
    assert view["counts"] == {"healthy": 1, "offline": 1} and swarm.query(
        n2, "status")["leader"] is None
    swarm.start(n1)
    swarm.wait_for(lambda: app_files(n1).get("data.txt") == "version 1\n", PUSH_S,
                   "the founder catches up")


def test_a_release_left_unchecked_by_a_stop_is_checked_at_start(swarm: Swarm,
                                                                 tmp_path: Path) -> None:
    """A node stopped between switching an app and its health check: on start it runs the
    check from the spec in the bundle, and a failing release does not stay live."""
    from swarmnode.push.bundle import make_bundle
    from swarmnode.push.releases import Releases

    n1, _token = swarm.init("n1", loopback_addr(1))
    good, bad = payload(tmp_path, "1"), payload(tmp_path, "2", health="exit 4")
    with Releases(n1.home) as rel:
        digests = []
        for d in (good, bad):
            info = make_bundle(d, tmp_path / f"{d.name}.tgz")
            rel.install(info.digest, tmp_path / f"{d.name}.tgz")
            digests.append(info.digest)
        rel.switch("web", digests[0])
        rel.mark("web", digests[0], "healthy")
        rel.switch("web", digests[1])  # ... and the node stopped here
    swarm.start(n1)
    # (the event is the rollback's last step: the files, the record and the restart before it)
    ev = swarm.wait_for(lambda: swarm.events(n1, "push_rolled_back"), PUSH_S,
                        "the unchecked release rolled back")
    assert [e["digest"] for e in ev] == [digests[1]]
    assert app_files(n1).get("data.txt") == "version 1\n"
    with Releases(n1.home) as rel:
        assert rel.failed("web", digests[1]) == "health command exited 4"
    assert (n1.home / "web-restarts").read_text().split() == digests[::-1]
