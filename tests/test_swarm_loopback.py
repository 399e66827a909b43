"""Real swarmnode processes on this machine's loopback addresses (127.0.0.x, own ports).

Why: the units prove each piece alone; only real processes prove that the CLI, the control
socket, the transport, admission and gossip add up to the behaviour people rely on — everyone
sees everyone, guests wait for a person, bans stick, crashes are noticed, restarts rejoin.
Every node runs `swarmnode join --fast --no-mdns --no-tailscale` (timers 10x faster), so each
wait below is a deadline with a wide margin, never a sleep standing in for synchronisation.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from pathlib import Path

import msgpack
import pytest

from net import whois
from swarmnode import control, store
from swarmnode.membership.messages import member_state_from_plain
from tests.swarm import (
    Node,
    Swarm,
    host_of,
    loopback_addr,
    swarm_fixture,  # noqa: F401 (the `swarm` fixture)
)

pytestmark = pytest.mark.timeout(60)

#: Deadlines: with --fast, joining and gossip take well under a second and a crash is
#: declared within a few seconds; these leave room for a loaded 2-core CI machine.
JOIN_S = 15.0
DETECT_S = 15.0
#: Observation windows for "stays so": 10+ protocol periods (probe interval 0.1 s with --fast)
#: and at least one reconnect interval (1 s), so a leak would have had every chance to show.
HOLD_S = 1.5


def test_four_nodes_join_and_list_each_other_as_they_report_themselves(swarm: Swarm) -> None:
    founder, token = swarm.init("n1", loopback_addr(1))
    t0 = time.monotonic()
    swarm.start(founder)
    nodes = [founder] + [swarm.add(f"n{i}", loopback_addr(i)) for i in (2, 3, 4)]
    for n in nodes[1:]:
        swarm.start(n, token)
    t_started = time.monotonic()
    swarm.wait_converged(nodes, JOIN_S)
    done = time.monotonic()
    print(f"join-visible: all 4 alive on all 4 {done - t_started:.2f}s after the last node "
          f"answered on its control socket ({done - t0:.2f}s after the founder was spawned)")

    for obs in nodes:
        listed = swarm.cli_json(obs, "nodes")
        by_id = {m["id"]: m for m in listed}
        assert set(by_id) == {n.id for n in nodes}, f"{obs.name} lists {listed}"
        for n in nodes:
            m = by_id[n.id]
            where = f"{obs.name}'s entry for {n.name}: {m}"
            assert m["state"] == "alive", where
            assert m["name"] == n.name, where
            assert m["addresses"] == [n.listen], where
            assert isinstance(m["cores"], int) and m["cores"] >= 1, where
            for fact in ("arch", "kind", "version"):
                assert isinstance(m[fact], str) and m[fact], where
            assert m["self"] is (n is obs), where
            # loopback has no NAT: a peer is only ever seen at the address it reports
            assert m["nat"] is False, where
            assert m["observed"] in (None, host_of(n.listen)), where
        status = swarm.cli_json(obs, "status")
        assert status["id"] == obs.id
        assert status["name"] == obs.name
        assert status["cluster"] == "swarmtest"
        assert status["admitted"] is True
        assert status["nodes_alive"] == 4
        assert status["pending"] == 0
        assert status["cores_online"] == sum(m["cores"] for m in listed), (status, listed)

    for n in nodes:  # the id a node runs with is the one `swarmnode id` prints for its home
        assert swarm.cli(n, "id").stdout.strip() == n.id
    # `status` names the leader (and the start of its id), as `events` names members
    leader = swarm.wait_for(lambda: swarm.query(founder, "status")["leader"], 20, "a leader")
    name = next(n.name for n in nodes if n.id == leader)
    shown = swarm.cli(founder, "status").stdout
    assert f"leader  {name}({leader[:8]})\n" in shown, shown


def test_a_node_runs_in_its_process_without_the_clis_imports(swarm: Swarm) -> None:
    """`join` parses with the CLI and execs the node alone (same pid): typer's pydantic
    (a compiled extension, so it shows in the process's maps) is not loaded."""
    founder, _token = swarm.init("n1", loopback_addr(1))
    swarm.start(founder)
    assert founder.proc is not None
    maps = Path(f"/proc/{founder.proc.pid}/maps").read_text()
    assert "_zmq" in maps or "libzmq" in maps  # (it is the node: its extensions are there)
    assert "pydantic_core" not in maps


@pytest.mark.timeout(120)
def test_no_connection_is_kept_open_for_a_member_that_dials(swarm: Swarm) -> None:
    """Connections by need: a member that can dial us probes over its own connection, so we
    keep none open for it (`kept`: DEALERs to members never seen dialling in; they would never
    close). The shipped timers: connections go idle between probes and are dialled again."""
    founder, token = swarm.init("n1", loopback_addr(1))
    nodes = [swarm.start(founder, fast=False)] + [
        swarm.start(swarm.add(f"n{i}", loopback_addr(i)), token, fast=False) for i in range(2, 6)]
    swarm.wait_converged(nodes, JOIN_S)
    swarm.wait_for(lambda: sum(swarm.query(n, "status")["connections"]["closed_idle"]
                               for n in nodes) >= 10, 30, "idle connections closed")
    swarm.wait_for(lambda: [swarm.query(n, "status")["connections"]["kept"] for n in nodes]
                   == [0] * len(nodes), DETECT_S, "no connection kept for a member that dials")


def test_a_guest_waits_for_admission_and_only_an_operator_admits_it(swarm: Swarm) -> None:
    (a, b), _ = swarm.loopback(2, JOIN_S)
    guest = swarm.start(swarm.add("guest", loopback_addr(3)), seeds=[a.listen])

    swarm.wait_state([guest], "pending", [a, b], JOIN_S)
    swarm.hold(lambda: swarm.states([a, b], guest) == {"n1": "pending", "n2": "pending"},
               HOLD_S, "the guest stays pending on n1 and n2")
    # (the node's own answers, over the control socket: each CLI process costs ~0.3 s of
    # CPU, and the test's many reads of them once ran it past its minute on a loaded machine;
    # the CLI's part is the refusals, the grant and the admission below)
    for obs in (a, b):
        listed = swarm.query(obs, "nodes")
        status = swarm.query(obs, "status")
        members = [m for m in listed if m["state"] == "alive"]
        assert {m["id"] for m in members} == {a.id, b.id}
        assert status["nodes_alive"] == 2, status
        assert status["pending"] == 1, status
        assert status["cores_online"] == sum(m["cores"] for m in members), (status, listed)
    # a guest gets nothing: it learns no member from the cluster
    seen_by_guest = {m["id"]: m["state"] for m in swarm.members(guest) if not m["self"]}
    assert not any(s == "alive" for s in seen_by_guest.values()), seen_by_guest

    # b is an ordinary member: it may not ban, admit or issue tokens (issue 13: any member's
    # ban of the founder used to count everywhere, enforced at the handshake)
    res = swarm.cli(b, "ban", "n1", check=False)
    assert res.returncode != 0 and "not an operator" in res.stdout + res.stderr, res
    for call in (lambda: control.call(b.home, "admit", node="guest"),
                 lambda: swarm.query(b, "token", ttl=600)):
        with pytest.raises(control.ControlError, match="not an operator"):
            call()
    swarm.hold(lambda: swarm.states([a, b], a) == {"n1": "alive", "n2": "alive"}
               and swarm.states([a, b], guest) == {"n1": "pending", "n2": "pending"},
               HOLD_S, "nothing changed anywhere after n2's refused ban and admission")

    # once the founder grants it operate, b admits by name the guest it never talked to
    swarm.cli(a, "grant", "operate", "n2")
    swarm.wait_for(lambda: swarm.query(b, "token", ttl=600).startswith("swn1."), JOIN_S,
                   "n2 learns its operate right and issues a token")
    swarm.cli(b, "admit", "guest")
    swarm.wait_converged([a, b, guest], JOIN_S)
    for obs in (a, b, guest):
        status = swarm.query(obs, "status")
        assert (status["nodes_alive"], status["pending"]) == (3, 0), (obs.name, status)


def test_a_ban_by_id_prefix_sticks_across_the_banned_nodes_restarts(swarm: Swarm) -> None:
    """(Apart from the admission test above: each starts its own swarm, and together they
    took over the minute a test gets on a loaded machine, most of it CLI processes.)"""
    (a, b), token = swarm.loopback(2, JOIN_S)
    guest = swarm.start(swarm.add("guest", loopback_addr(3)), token)
    swarm.wait_converged([a, b, guest], JOIN_S)

    # banned by id prefix
    swarm.cli(a, "ban", guest.id[:10])
    swarm.wait_state([guest], "banned", [a, b], DETECT_S)
    for obs in (a, b):
        assert swarm.query(obs, "status")["nodes_alive"] == 2

    # it cannot come back: restarted (its home says it was admitted; a seed too), it stays out
    assert swarm.stop(guest) == 0
    swarm.start(guest, seeds=[a.listen, b.listen])
    swarm.hold(lambda: swarm.states([a, b], guest) == {"n1": "banned", "n2": "banned"},
               3 * HOLD_S, "the banned node stays banned on n1 and n2 after its restart")
    for obs in (a, b):
        assert swarm.query(obs, "status")["nodes_alive"] == 2
    print("guest's own view after its ban and restart:",
          {m["name"]: m["state"] for m in swarm.members(guest)})


def test_crash_is_detected_as_dead_and_a_graceful_stop_as_left(swarm: Swarm) -> None:
    (a, b, c, d), _ = swarm.loopback(4, JOIN_S)

    swarm.kill9(d)
    t_dead = swarm.wait_state([d], "dead", [a, b, c], DETECT_S)
    print(f"kill -9 detection: n4 dead on n1, n2, n3 after {t_dead:.2f}s")

    assert swarm.stop(c) == 0, "a graceful leave exits 0"
    t_left = swarm.wait_state([c], "left", [a, b], DETECT_S)
    print(f"SIGTERM leave: n3 left on n1, n2 after {t_left:.2f}s")

    expected = {"n1": "left", "n2": "left"}
    swarm.hold(lambda: swarm.states([a, b], c) == expected
               and swarm.states([a, b], d) == {"n1": "dead", "n2": "dead"},
               HOLD_S, "n3 stays left (not dead) and n4 stays dead")
    for obs in (a, b):
        status = swarm.cli_json(obs, "status")
        assert status["nodes_alive"] == 2, status


def test_restart_rejoins_from_its_snapshot_with_the_same_id(swarm: Swarm) -> None:
    (a, b, c), _ = swarm.loopback(3, JOIN_S)
    before = swarm.entry(a, c)
    assert before is not None

    assert swarm.stop(c) == 0
    swarm.wait_state([c], "left", [a, b], DETECT_S)
    t0 = time.monotonic()
    swarm.start(c)  # same home, no token, no seed: only its persisted member snapshot
    swarm.wait_converged([a, b, c], JOIN_S)
    print(f"restart after leave: n3 alive everywhere {time.monotonic() - t0:.2f}s after start")
    assert swarm.cli(c, "id").stdout.strip() == c.id
    assert swarm.cli_json(c, "status")["id"] == c.id
    for obs in (a, b):
        after = swarm.entry(obs, c)
        assert after is not None and after["id"] == c.id
        assert after["incarnation"] > before["incarnation"], (before, after)
    leave_inc = swarm.entry(a, c)["incarnation"]

    # a crash and a quick restart: the node refutes whatever was said about it meanwhile
    swarm.kill9(c)
    swarm.start(c)
    swarm.wait_for(lambda: all(
        (e := swarm.entry(o, c)) is not None and e["state"] == "alive"
        and e["incarnation"] > leave_inc for o in (a, b)),
        JOIN_S, "n3 alive on n1 and n2 with a higher incarnation after kill -9 and restart")
    swarm.wait_converged([a, b, c], JOIN_S)


def _saved_members(node: Node) -> set[str]:
    """The member ids in `node`'s membership snapshot on disk (read-only, beside the node)."""
    db = sqlite3.connect(f"file:{node.home / store.DB_FILE}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'snapshot'").fetchone()
    finally:
        db.close()
    snapshot = msgpack.unpackb(row[0], raw=False, strict_map_key=False) if row else {}
    return {member_state_from_plain(m).record.id for m in snapshot.get("members", [])}


def test_a_node_killed_right_after_joining_rejoins_through_the_members_it_had_learned(
        swarm: Swarm) -> None:
    (a, b, c), token = swarm.loopback(3, JOIN_S)
    d = swarm.start(swarm.add("n4", loopback_addr(4)), token)
    swarm.wait_for(lambda: {m["id"] for m in swarm.members(d) if m["state"] == "alive"}
                   == {n.id for n in (a, b, c, d)}, JOIN_S, "n4 lists all four alive")
    # Saved as they were learned (the periodic save comes 2 s later): a crash now loses none.
    assert _saved_members(d) >= {a.id, b.id, c.id}

    swarm.kill9(d)
    swarm.kill9(a)  # the founder its token names is gone too: only the snapshot leads back
    swarm.start(d, token)
    swarm.wait_for(lambda: swarm.states([b, c], d) == {"n2": "alive", "n3": "alive"}
                   and swarm.states([d], b) == {"n4": "alive"}
                   and swarm.states([d], c) == {"n4": "alive"},
                   JOIN_S, "n4 back in with n2 and n3 without n1")


def test_rename_propagates_to_every_node(swarm: Swarm) -> None:
    nodes, _ = swarm.loopback(3, JOIN_S)
    a, b, c = nodes

    def named(name: str) -> bool:
        return all((e := swarm.entry(o, c)) is not None and e["name"] == name for o in nodes)

    swarm.cli(a, "rename", "n3", "builder-x")
    swarm.wait_for(lambda: named("builder-x"), JOIN_S, "n3 named builder-x everywhere")
    # b, not an operator, may not rename another member; n3 renames itself (by id prefix)
    res = swarm.cli(b, "rename", c.id[:12], "builder-z", check=False)
    assert res.returncode != 0 and "not an operator" in res.stdout + res.stderr, res
    swarm.cli(c, "rename", c.id[:12], "builder-y")
    swarm.wait_for(lambda: named("builder-y"), JOIN_S, "n3 named builder-y everywhere")
    swarm.hold(lambda: named("builder-y"), HOLD_S / 3, "the last rename wins")
    listed = {m["id"]: m["name"] for m in swarm.cli_json(a, "nodes")}
    assert listed == {a.id: "n1", b.id: "n2", c.id: "builder-y"}, listed
    # the renamed node itself answers to its new name
    own = swarm.cli_json(c, "status")["name"]
    assert own == "builder-y", f"the renamed node's own `status` still says {own!r}"


ZMTP_NULL_GREETING = (b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00")
                      + b"\x00" + b"\x00" * 31)


def test_bad_input_gets_clear_errors_and_never_crashes_a_node(swarm: Swarm) -> None:
    # a command on a home where no node runs
    empty = swarm.root / "empty"
    res = swarm.cli(empty, "status", "--json", check=False)
    assert res.returncode != 0
    assert "no swarmnode is running" in " ".join(res.stderr.split()), res.stderr
    assert "Traceback" not in res.stderr

    # a garbage token, and a token-shaped forgery
    bad = swarm.add("bad", loopback_addr(9))
    for junk in ("garbage", "swn1." + "A" * 80):
        argv = swarm.join_argv(bad, junk)
        res = swarm.cli(bad.home, *argv[5:], timeout=30, check=False)
        assert res.returncode != 0, (junk, res.stdout, res.stderr)
        assert "token" in res.stderr.lower(), res.stderr
        assert "Traceback" not in res.stderr, res.stderr

    # garbage at a running node's TCP and UDP port
    (a, b), _ = swarm.loopback(2, JOIN_S)
    host, port = a.listen.rsplit(":", 1)
    target = (host, int(port))
    tcp_payloads = [os.urandom(1024), ZMTP_NULL_GREETING, ZMTP_NULL_GREETING + os.urandom(4096),
                    b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"CURVE".ljust(20, b"\x00")
                    + b"\x00" * 32 + os.urandom(300), b"GET / HTTP/1.0\r\n\r\n",
                    os.urandom(256 * 1024)]
    for payload in tcp_payloads:
        with socket.create_connection(target, timeout=2) as s:
            s.settimeout(0.3)
            try:
                s.sendall(payload)
                s.recv(4096)
            except OSError:
                pass
    udp_payloads = [os.urandom(16), b"SWNWHO1", b"SWNWHO1" + os.urandom(15),
                    b"SWNWHO1" + os.urandom(17), os.urandom(60_000), b""] + \
                   [os.urandom(n) for n in range(1, 200, 7)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        for payload in udp_payloads:
            u.sendto(payload, target)
        # a well-formed whois still gets its answer
        u.settimeout(3)
        u.sendto(whois.request(os.urandom(16)), target)
        answer, _ = u.recvfrom(2048)
        assert answer.startswith(b"SWNIAM1") and a.id.encode() in answer

    assert a.running, swarm.dump()
    status = swarm.cli_json(a, "status")
    assert status["id"] == a.id and status["nodes_alive"] == 2
    # and it still works as a member: a rename from it reaches the other node
    swarm.cli(a, "rename", "n2", "still-here")
    swarm.wait_for(lambda: (e := swarm.entry(b, b)) is not None and e["name"] == "still-here",
                   JOIN_S, "the rename from the node that got garbage reaches n2")
    swarm.wait_converged([a, b], JOIN_S)


def test_a_join_reaching_a_member_that_is_no_operator_is_refused_and_gets_in_through_one(
        swarm: Swarm) -> None:
    """Only operators admit (issue 13): a newcomer whose join reaches an ordinary member is
    told so, naming the token's issuer, and keeps knocking; once the issuer (the founder) is
    back, it gets in through it."""
    first, token = swarm.init("n1", loopback_addr(1))
    swarm.start(first)
    b = swarm.start(swarm.add("n2", loopback_addr(2)), token)
    swarm.wait_converged([first, b], JOIN_S)
    swarm.kill9(first)  # the only operator is away
    c = swarm.start(swarm.add("n3", loopback_addr(3)), token, seeds=[b.listen])
    refused = swarm.wait_for(
        lambda: [e for e in swarm.events(c, "join_refused") if e.get("by") == b.id], JOIN_S,
        "n2 refuses n3's join")
    assert "not an operator" in refused[0]["error"] and first.id in refused[0]["error"], refused
    assert swarm.state(b, c) in (None, "pending"), swarm.entry(b, c)
    swarm.start(first)
    swarm.wait_converged([first, b, c], JOIN_S)
