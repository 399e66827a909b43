"""`swarmnode doctor`: each check passing on a healthy node and failing where its fault is
made (permissions, a closed port, a skewed clock, NAT), on real sockets and real processes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import msgpack
import pytest

from net.transport import Inbound
from net.wire import Envelope
from swarmnode import doctor
from swarmnode.doctor import (
    Answer,
    Doctor,
    check_home,
    check_portage,
    check_service,
    judge,
    reach,
)
from tests.ports import free_port
from tests.swarm import (
    Swarm,
    loopback_addr,
    swarm_fixture,  # noqa: F401 (the `swarm` fixture)
)

ME = ["192.168.1.5:7946", "100.64.0.5:7946"]


def answer(member: str, reach: dict[str, str], skew: float = 0.01,
           observed: str | None = "192.168.1.5") -> Answer:
    return Answer(member, skew, 0.002, reach, observed)


def by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


def test_a_healthy_swarm_reads_ok() -> None:
    ok = {a: "ok" for a in ME}
    got = by_name(judge([answer("a", ok), answer("b", ok, skew=-0.3)], ["a", "b"], ME))
    assert {c.status for c in got.values()} == {"ok"}
    assert got["reachable"].detail == ("192.168.1.5:7946: reached by 2 of 2; "
                                       "100.64.0.5:7946: reached by 2 of 2")
    assert "-0.300 s against b" in got["clock"].detail


def test_unreachable_nat_skew_and_silence_are_named_with_a_fix() -> None:
    closed = {a: "ConnectionRefusedError: refused" for a in ME}
    got = by_name(judge([answer("a", closed, skew=45.0, observed="203.0.113.7"),
                         answer("b", closed, observed="203.0.113.7")], ["a", "b", "c"], ME))
    assert got["reachable"].status == "fail" and "open the port" in got["reachable"].fix
    assert got["nat"].status == "warn" and "203.0.113.7" in got["nat"].detail
    assert got["clock"].status == "fail" and "+45.000 s against a" in got["clock"].detail
    assert got["members"].status == "warn" and "c" in got["members"].detail
    half = by_name(judge([answer("a", {ME[0]: "ok", ME[1]: "timeout"}),
                          answer("b", {ME[0]: "timeout", ME[1]: "timeout"})], ["a", "b"], ME))
    assert half["reachable"].status == "warn"
    assert half["clock"].status == "ok"
    assert by_name(judge([], [], ME))["reachable"].status == "warn"
    silent = by_name(judge([], ["a", "b"], ME))
    assert silent["reachable"].status == "warn" and silent["members"].status == "warn"


def test_home_permissions(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    for name in ("identity.key", "state.db", "events.jsonl"):
        (home / name).write_text("x")
        (home / name).chmod(0o600)
    (home / "events.jsonl").chmod(0o644)  # not a secret
    assert check_home(home).status == "ok"
    (home / "identity.key").chmod(0o644)
    home.chmod(0o777)
    bad = check_home(home)
    assert bad.status == "fail" and "identity.key is -rw-r--r--" in bad.detail
    assert "writable by others" in bad.detail and "state.db" not in bad.detail


def test_service_and_portage_checks(tmp_path: Path) -> None:
    unit = tmp_path / "swarmnode.service"
    assert check_service([str(unit)]).status == "warn"
    unit.write_text("[Unit]\n")
    assert check_service([str(unit)]).status == "ok"
    assert check_portage(None, {"a": "h1"}).status == "ok"
    assert check_portage("h1", {"a": "h1", "b": None}).detail == "the same as 1 member(s)"
    differs = check_portage("h1", {"a": "h2", "b": "h1"})
    assert differs.status == "warn" and "a" in differs.detail


def test_reach_tells_an_open_port_from_a_closed_one() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        open_addr = f"127.0.0.1:{listener.getsockname()[1]}"
        closed_addr = f"127.0.0.1:{free_port('127.0.0.1')}"
        got = asyncio.run(reach([open_addr, closed_addr, "not an address"]))
    assert got[open_addr] == "ok"
    assert got[closed_addr].startswith("ConnectionRefusedError")
    assert got["not an address"] != "ok"


def test_a_member_answers_each_asker_rarely_dials_only_its_addresses_and_drops_junk() -> None:
    """The member's side, with a listener standing for the asker's reported address."""
    drops: list[str] = []
    sent: list[tuple[str, str, dict]] = []

    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        addr = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        doc = Doctor(lambda m: [addr] if m == "asker" else [],
                     lambda to, kind, body: sent.append((to, kind, msgpack.unpackb(body))),
                     str, drops.append)

        def inbound(sender: str, kind: str, body: bytes) -> Inbound:
            # (its connection closed meanwhile: the reply goes as any message)
            return Inbound(Envelope(1, kind, sender, 1, 1, body), "10.1.2.3",
                           lambda t, b: False)

        ask = msgpack.packb({"rid": b"12345678"})
        doc.on_message(inbound("asker", doctor.ASK, ask))
        doc.on_message(inbound("asker", doctor.ASK, ask))  # again at once: too often
        doc.on_message(inbound("asker", doctor.ASK, b"\xc1junk"))
        doc.on_message(inbound("other", doctor.REPLY, msgpack.packb({"rid": b"87654321"})))
        while not sent:
            await asyncio.sleep(0.01)
        server.close()

    asyncio.run(main())
    [(to, kind, body)] = sent
    assert to == "asker" and kind == doctor.REPLY and body["observed"] == "10.1.2.3"
    assert list(body["reach"].values()) == ["ok"] and len(body["reach"]) == 1
    assert drops == ["doctor_too_often", "malformed_doctor", "unasked_doctor_reply"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_doctor_on_a_swarm_finds_a_skewed_clock_and_a_readable_key(swarm: Swarm) -> None:
    os.environ[doctor.CLOCK_OFFSET_ENV] = "5"  # n2's clock, 5 s fast (the lab's test hook)
    try:
        first, token = swarm.init("n1", loopback_addr(1))
        swarm.start(first)
        skewed = swarm.start(swarm.add("n2", loopback_addr(2)), token)
    finally:
        del os.environ[doctor.CLOCK_OFFSET_ENV]
    nodes = [first, skewed, swarm.start(swarm.add("n3", loopback_addr(3)), token)]
    swarm.wait_converged(nodes, 30)
    res = swarm.cli(first, "doctor", "--json", check=False)
    got = {c["name"]: c for c in json.loads(res.stdout)}
    assert got["reachable"]["status"] == "ok" and "reached by 2 of 2" in got["reachable"]["detail"]
    assert got["clock"]["status"] == "warn" and "against n2" in got["clock"]["detail"]
    assert float(got["clock"]["detail"].split()[2]) == pytest.approx(5.0, abs=0.5)
    rtt_ms = float(got["clock"]["detail"].split("round trip ")[1].split()[0])
    assert rtt_ms < 2000  # each answer's own round trip, not the wait for the slowest
    assert got["home"]["status"] == "ok" and got["nat"]["status"] == "ok"
    assert res.returncode == 0  # warnings only
    (first.home / "identity.key").chmod(0o644)
    res = swarm.cli(first, "doctor", check=False)
    assert res.returncode == 1 and "identity.key is -rw-r--r--" in res.stdout
    assert "fix: chmod 700" in res.stdout

