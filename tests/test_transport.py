"""Real ZeroMQ sockets with CURVE on loopback: authentication, NAT-style reply paths, bad input."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time

import pytest
import zmq
import zmq.asyncio

from net import transport
from net.transport import (
    FAIL_BACKOFF_S,
    FAILURES,
    HOLD_S,
    IDLE_CLOSE_S,
    Inbound,
    Transport,
    endpoint,
)
from net.wire import seal
from swarmnode.identity import Identity, curve_public_key
from tests.ports import free_port

pytestmark = pytest.mark.timeout(30)


class Peer:
    def __init__(self, banned: set[bytes] | None = None) -> None:
        self.identity = Identity.generate()
        self.addr = f"127.0.0.1:{free_port()}"
        self.inbox: asyncio.Queue[Inbound] = asyncio.Queue()
        banned = banned if banned is not None else set()
        self.transport = Transport(
            self.identity, self.addr, self.inbox.put_nowait, lambda key: key in banned
        )

    @property
    def id(self) -> str:
        return self.identity.id

    async def next(self) -> Inbound:
        return await asyncio.wait_for(self.inbox.get(), 10)


async def next_event(t: Transport, peer: str, want: set[str]) -> str:
    """Await connection events to `peer` until one in `want` (or a history entry) shows."""
    for _ in range(20):
        seen = {e for _, e, _ in t.connection_events(peer)}
        if seen & want:
            return (seen & want).pop()
        with contextlib.suppress(TimeoutError):
            await t.wait_connection_event(peer, 1.0)
    raise AssertionError(f"none of {want} happened; saw {t.connection_events(peer)}")


async def started(*peers: Peer) -> None:
    for p in peers:
        await p.transport.start()


async def closed(*peers: Peer) -> None:
    for p in peers:
        await p.transport.close()


async def send_when_connected(a: Peer, b: Peer, msg_type: str, body: bytes) -> None:
    """A message to a peer still handshaking is held and delivered once the handshake is done."""
    assert a.transport.send(b.id, msg_type, body)
    await next_event(a.transport, b.id, {"handshake_ok"})


async def test_curve_round_trip_and_reply_on_same_connection():
    a, b = Peer(), Peer()
    await started(a, b)
    try:
        a.transport.connect(b.id, (b.addr,))
        await send_when_connected(a, b, "ping", b"hello")
        got = await b.next()
        assert got.sender == a.id
        assert got.envelope.body == b"hello"
        assert got.observed == "127.0.0.1"
        assert got.reply("ack", b"back")
        back = await a.next()
        assert back.sender == b.id and back.envelope.type == "ack"
    finally:
        await closed(a, b)


async def test_first_message_to_a_new_peer_waits_for_the_handshake():
    a, b = Peer(), Peer()
    await started(a, b)
    try:
        a.transport.connect(b.id, (b.addr,))
        assert a.transport.send(b.id, "push_pull", b"first")  # no connection yet: held
        got = await b.next()
        assert got.envelope.body == b"first"
        assert not a.transport._dealers[b.id].held
    finally:
        await closed(a, b)


async def test_a_send_pinned_to_our_dealer_waits_for_its_handshake_not_the_peers_connection():
    """b has a connection to a; a's DEALER to b closed when idle. A plain send rides b's
    connection (so would one while a's DEALER handshakes); one pinned to the dealer (a probe
    to a member that could be dialled before) waits and goes over a's own, so b sees a dial in
    (a message on b's ROUTER carries the address it came from)."""
    a, b = Peer(), Peer()
    await started(a, b)
    try:
        assert not a.transport.dialable(b.id)
        a.transport.connect(b.id, (b.addr,))
        await send_when_connected(a, b, "ping", b"1")
        await b.next()
        assert a.transport.dialable(b.id)
        b.transport.connect(a.id, (a.addr,))
        assert b.transport.send(a.id, "ping", b"2", via="dealer")  # b dials a
        assert (await a.next()).envelope.body == b"2"
        a.transport.close_idle(time.monotonic() + IDLE_CLOSE_S + 1)  # a's goes idle
        assert not a.transport.has_dealer(b.id) and a.transport.dialable(b.id)

        assert a.transport.send(b.id, "ping", b"plain")  # no DEALER: b's connection
        got = await b.next()
        assert got.envelope.body == b"plain" and got.observed is None  # (on b's DEALER)
        a.transport.connect(b.id, (b.addr,))
        assert a.transport.send(b.id, "ping", b"pinned", via="dealer")  # held for the dial
        got = await b.next()
        assert got.envelope.body == b"pinned" and got.observed is not None  # (b's ROUTER)
        a.transport.disconnect(b.id)
        assert not a.transport.dialable(b.id)  # (it left: learnt again on the next dial)
    finally:
        await closed(a, b)


async def test_peer_without_route_is_reached_over_its_inbound_connection():
    """Like a node behind NAT: b never dials a, but can still send to it."""
    a, b = Peer(), Peer()
    await started(a, b)
    try:
        a.transport.connect(b.id, (b.addr,))
        await send_when_connected(a, b, "ping", b"1")
        await b.next()
        assert b.id not in a.transport._inbound_routes
        assert b.transport.send(a.id, "gossip", b"via-router")
        got = await a.next()
        assert got.envelope.body == b"via-router" and got.sender == b.id
    finally:
        await closed(a, b)


async def test_an_idle_dealer_closes_only_to_a_peer_that_dials_us(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections by need: a's DEALER to b closes after IDLE_CLOSE_S of silence once b has
    connected to a (b can dial a again when it needs to); its DEALER to c, which never
    connected to a (as if c were behind NAT and relied on it), stays. The test calls
    close_idle at chosen times (the transport's own check would race it on a loaded machine)."""
    monkeypatch.setattr(transport, "IDLE_CHECK_S", 3600.0)
    a, b, c = Peer(), Peer(), Peer()
    await started(a, b, c)
    try:
        for peer in (b, c):
            a.transport.connect(peer.id, (peer.addr,))
            await send_when_connected(a, peer, "ping", b"1")
            await peer.next()
        b.transport.connect(a.id, (a.addr,))
        assert b.transport.send(a.id, "ping", b"2", via="dealer")  # (not back on a's)
        await next_event(b.transport, a.id, {"handshake_ok"})
        assert (await a.next()).envelope.body == b"2"
        now = time.monotonic()
        a.transport.close_idle(now + IDLE_CLOSE_S / 2)
        assert a.transport.has_dealer(b.id) and a.transport.closed_idle == 0  # not idle yet
        a.transport.close_idle(now + IDLE_CLOSE_S + 1)
        assert not a.transport.has_dealer(b.id) and a.transport.has_dealer(c.id)
        assert a.transport.closed_idle == 1
        events = [e for _t, e, _ep in a.transport.connection_events(b.id)]
        assert events[-2:] == ["handshake_ok", "closed_idle"]  # (diagnostics keep it)
        # b's connection to a is how a reaches b now: one connection for the pair
        assert a.transport.send_inbound(b.id, "ack", b"back")
        got = await b.next()
        assert got.envelope.body == b"back" and got.sender == a.id
        assert not a.transport.send_inbound(c.id, "ack", b"none")  # c never dialled a
    finally:
        await closed(a, b, c)


def user_timeouts(port: int) -> dict[str, int]:
    """TCP_USER_TIMEOUT (ms) of this process's TCP connections from and to `port`, as the
    kernel holds it: {"dialled": ..., "accepted": ...}."""
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        with sock:
            if sock.family != socket.AF_INET or sock.type != socket.SOCK_STREAM:
                continue
            try:
                ends = sock.getsockname()[1], sock.getpeername()[1]
            except OSError:  # (a listener)
                continue
            if port in ends:
                side = "accepted" if ends[0] == port else "dialled"
                found[side] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
    return found


async def test_every_connection_is_given_up_soon_when_unacknowledged_and_dialled_again_soon():
    """Found by the fault benchmark (docs/benchmarks.md, seed 9): after a 4.5 s partition an
    established connection, its retransmissions backed off, carried nothing for 1.9 s more
    and a leader's heartbeats waited behind it. Both ends of every connection drop it after
    TCP_MAXRT_MS of unacknowledged data (the kernel's TCP_USER_TIMEOUT); a DEALER gives a
    connect up after CONNECT_TIMEOUT_MS and dials again within RECONNECT_IVL_MAX_MS. (The
    effect is the benchmark's figure: loopback loses no packet.)"""
    a, b = Peer(), Peer()
    await started(a, b)
    try:
        a.transport.connect(b.id, (b.addr,))
        await send_when_connected(a, b, "ping", b"1")
        assert (await b.next()).envelope.body == b"1"
        port = int(b.addr.rsplit(":", 1)[1])
        assert user_timeouts(port) == {"dialled": transport.TCP_MAXRT_MS,
                                       "accepted": transport.TCP_MAXRT_MS} == {
            "dialled": 2000, "accepted": 2000}
        dealer = a.transport._dealers[b.id].sock
        assert dealer.getsockopt(zmq.CONNECT_TIMEOUT) == 2000
        assert dealer.getsockopt(zmq.RECONNECT_IVL_MAX) == 500
    finally:
        await closed(a, b)


async def test_wrong_identity_at_address_gets_nothing():
    """The NAT incident: another host answers at an address; CURVE refuses it, nothing sent."""
    a, gateway, target = Peer(), Peer(), Peer()
    await started(a, gateway)
    try:
        # a believes `target` lives at the gateway's address.
        a.transport.connect(target.id, (gateway.addr,))
        failed = {"wrong_identity", "handshake_failed", "disconnected", "refused"}
        await next_event(a.transport, target.id, failed | {"handshake_ok"})
        events = {e for _, e, _ in a.transport.connection_events(target.id)}
        assert "handshake_ok" not in events
        # The address is parked after the failure: no new attempt for FAIL_BACKOFF_S (libzmq
        # alone would retry it every 200 ms, for ever).
        settled = len(a.transport.connection_events(target.id))
        with contextlib.suppress(TimeoutError):
            for _ in range(10):  # ends at the first quiet spell
                await a.transport.wait_connection_event(target.id, FAIL_BACKOFF_S * 0.7)
        later = [e for _, e, _ in a.transport.connection_events(target.id)[settled:]]
        assert not set(later) & FAILURES, later
        # Held for a handshake that never completes, then dropped: never sent to the gateway.
        assert a.transport.send(target.id, "reboot", b"")
        dealer = a.transport._dealers[target.id]
        assert len(dealer.held) == 1
        a.transport._expire(dealer, time.monotonic() + HOLD_S + 1)
        assert not dealer.held
        assert a.transport.drops["unreachable"] == 1
        assert gateway.inbox.empty()
    finally:
        await closed(a, gateway)


async def test_banned_key_is_refused_at_the_handshake():
    a = Peer()
    banned: set[bytes] = set()
    b = Peer(banned)
    from zmq.utils import z85

    banned.add(z85.decode(curve_public_key(a.id)))
    await started(a, b)
    try:
        a.transport.connect(b.id, (b.addr,))
        assert await next_event(a.transport, b.id, {"refused", "handshake_ok"}) == "refused"
        assert b.transport.drops["banned"] >= 1
    finally:
        await closed(a, b)


async def test_garbage_forged_and_replayed_frames_are_dropped_and_counted():
    a, b, other = Peer(), Peer(), Identity.generate()
    await started(b)
    ctx = zmq.asyncio.Context()
    raw = ctx.socket(zmq.DEALER)
    pub, sec = a.identity.curve_keypair()
    raw.curve_serverkey = curve_public_key(b.id)
    raw.curve_publickey, raw.curve_secretkey = pub, sec
    raw.connect(endpoint(b.addr))
    try:
        good = seal(a.identity, "ping", b"ok", 1, 1)
        forged = seal(other, "ping", b"someone else", 1, 1)  # signer != CURVE key
        for frame in (b"\x00garbage", b"\x93\x01\x02", forged, b"x" * 100, good, good):
            await raw.send(frame)
        await raw.send(seal(a.identity, "ping", b"after", 1, 2))
        first = await b.next()
        second = await b.next()
        assert [first.envelope.body, second.envelope.body] == [b"ok", b"after"]
        drops = b.transport.drops
        assert drops["malformed"] >= 2
        assert drops["wrong_sender"] == 1
        assert drops["replay"] == 1
    finally:
        raw.close(0)
        ctx.term()
        await closed(b)


async def test_oversized_frame_is_refused_and_node_keeps_running():
    a, b = Peer(), Peer()
    b.transport.max_size = 4096
    await started(a, b)
    try:
        a.transport.connect(b.id, (b.addr,))
        await send_when_connected(a, b, "ping", b"small")
        assert (await b.next()).envelope.body == b"small"
        n = len(a.transport.connection_events(b.id))
        assert a.transport.send(b.id, "ping", b"y" * 10_000)  # over b's ZMQ_MAXMSGSIZE
        for _ in range(20):  # b drops the connection; a reconnects and handshakes again
            names = [e for _, e, _ in a.transport.connection_events(b.id)[n:]]
            if names[-2:] == ["disconnected", "handshake_ok"]:
                break
            await a.transport.wait_connection_event(b.id, 10)
        assert names[-2:] == ["disconnected", "handshake_ok"]
        assert a.transport.send(b.id, "ping", b"later")
        got = await b.next()
        assert got.envelope.body == b"later"
    finally:
        await closed(a, b)


async def test_a_burst_of_queued_messages_does_not_hold_the_loop():
    """Queued messages are received without suspending: the receive loop hands the event loop
    back every RECV_SLICE_S, so a burst costs other tasks a slice, not the whole burst.
    Measured in this thread's CPU time, so a loaded machine's preemption does not count."""
    a, b = Peer(), Peer()
    got: list[bytes] = []

    def costly(inbound: Inbound) -> None:  # a handler costing 1 ms of CPU, as big ones do
        until = time.thread_time() + 0.001
        while time.thread_time() < until:
            pass
        got.append(inbound.envelope.body)

    b.transport.on_message = costly
    await started(a, b)
    try:
        a.transport.connect(b.id, (b.addr,))
        await send_when_connected(a, b, "ping", b"first")
        while not got:
            await asyncio.sleep(0.01)
        burst = [str(i).encode() for i in range(100)]
        for body in burst:
            assert a.transport.send(b.id, "ping", body)
        time.sleep(0.5)  # the loop is away; ZeroMQ's threads queue the burst at b meanwhile
        gaps: list[float] = []
        last = time.thread_time()
        while len(got) < 1 + len(burst):
            await asyncio.sleep(0)  # (a task's turn: each wake-up ends a loop step)
            now = time.thread_time()
            gaps.append(now - last)
            last = now
        assert got[1:] == burst  # in order, none lost
        assert max(gaps) < 0.05, max(gaps)  # no step over 50 ms (the burst in one: ~100 ms)
    finally:
        await closed(a, b)
