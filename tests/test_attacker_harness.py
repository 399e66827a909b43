"""The attacker harness (tests/attacker.py) against real nodes on loopback: what it sends
arrives signed, is judged by the node like any peer's message (counted when dropped), and
the node's answers come back to it -- with a stranger's key and with a member's."""

from __future__ import annotations

import pytest

from net.wire import seal
from swarmnode import actions, admission
from swarmnode.election.messages import RequestVote
from swarmnode.identity import Identity
from swarmnode.membership.messages import Ack, Ping, decode
from swarmnode.worker import unpack_map
from tests.attacker import Attacker
from tests.swarm import (
    Swarm,
    loopback_addr,
    swarm_fixture,  # noqa: F401 (the `swarm` fixture)
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def _drops(swarm: Swarm, node, reason: str) -> int:
    return swarm.query(node, "status")["drops"].get(reason, 0)


async def test_a_stranger_is_counted_and_told_it_is_pending(swarm: Swarm) -> None:
    n1, _token = swarm.init("n1", loopback_addr(1))
    swarm.start(n1)
    before = _drops(swarm, n1, "not_member")
    async with Attacker(None, n1.listen, n1.id) as a:
        assert await a.send(*a.assign("b1", "j", "true", term=1))
        swarm.wait_for(lambda: _drops(swarm, n1, "not_member") == before + 1, 10,
                       "the stranger's assignment dropped as not_member")
        assert await a.send(*a.hello())
        reply = await a.recv(10, admission.HELLO_REPLY)
        assert reply.sender == n1.id and unpack_map(reply.body)["status"] == "pending"
    pending = [m["id"] for m in swarm.members(n1) if m["state"] == "pending"]
    assert pending == [a.id]


async def test_a_members_key_is_answered_and_its_bad_messages_are_counted(
        swarm: Swarm) -> None:
    (n1, n2), _token = swarm.loopback(2, 30)
    swarm.kill9(n2)  # its key is the attacker's now (see the harness on sharing a live key)
    async with Attacker(n2.home, n1.listen, n1.id) as a:
        assert a.id == n2.id
        assert await a.send(*a.ping(seq=7))  # a member's probe is answered, signed
        ack = decode("ack", (await a.recv(10, "ack")).body)
        assert isinstance(ack, Ack) and ack.seq == 7 and ack.target_id == n1.id

        before = _drops(swarm, n1, "ping_wrong_target")
        assert await a.send_message(Ping(8, Identity.generate().id, b"n" * 16))
        swarm.wait_for(lambda: _drops(swarm, n1, "ping_wrong_target") == before + 1, 10,
                       "a probe for another id counted")

        assert await a.send(*a.action("exec", ["true"], target=Identity.generate().id))
        end = unpack_map((await a.recv(10, actions.END)).body)
        assert end["code"] is None and "addressed to" in end["error"]

        # n2 is no voter (two members have one): its election messages are dropped, counted
        votes = swarm.query(n1, "status")["election_counters"].get("drop_not_voter", 0)
        assert await a.send_message(RequestVote(term=1, candidate=a.id, last_index=0,
                                                last_term=0))
        swarm.wait_for(lambda: swarm.query(n1, "status")["election_counters"].get(
            "drop_not_voter", 0) == votes + 1, 10, "a non-voter's RequestVote counted")
        assert await a.send(*a.ping(seq=9))  # answered after any reply to the vote would be
        assert decode("ack", (await a.recv(10, "ack")).body).seq == 9
        assert not [e for e in a.inbox if e.type == "election.vote_reply"]
        before = _drops(swarm, n1, "wrong_sender")
        await a.send_frame(seal(Identity.generate(), "ping", b"", 1, 1))  # not the CURVE key
        swarm.wait_for(lambda: _drops(swarm, n1, "wrong_sender") == before + 1, 10,
                       "an envelope signed by another key than the connection's counted")
