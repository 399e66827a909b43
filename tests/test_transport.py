"""Real ZeroMQ sockets with CURVE on loopback: authentication, NAT-style reply paths, bad input."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from net.transport import Inbound, Transport, endpoint
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


def monitor_of(sock: zmq.Socket, events: int) -> zmq.Socket:
    """A monitor on a unique inproc address (the default one is reused by later sockets)."""
    return sock.get_monitor_socket(events, addr=f"inproc://monitor-{uuid.uuid4().hex}")


async def started(*peers: Peer) -> None:
    for p in peers:
        await p.transport.start()


async def closed(*peers: Peer) -> None:
    for p in peers:
        await p.transport.close()


async def send_when_connected(a: Peer, b: Peer, msg_type: str, body: bytes) -> None:
    """The DEALER only takes messages once the CURVE handshake completed: await that.

    The monitor may attach after the handshake already happened, so each wait is short and
    followed by another send attempt; the handshake event usually ends the wait at once.
    """
    sock = a.transport._dealers[b.id][0]
    monitor = monitor_of(sock, zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        for _ in range(100):
            if a.transport.send(b.id, msg_type, body):
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(recv_monitor_message(monitor), 0.1)
        raise AssertionError("no CURVE connection within 10 s")
    finally:
        sock.disable_monitor()
        monitor.close(0)


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


async def test_wrong_identity_at_address_gets_nothing():
    """The NAT incident: another host answers at an address; CURVE refuses it, nothing sent."""
    a, gateway, target = Peer(), Peer(), Peer()
    await started(a, gateway)
    try:
        sock_holder = a.transport
        # a believes `target` lives at the gateway's address.
        sock_holder.connect(target.id, (gateway.addr,))
        sock = sock_holder._dealers[target.id][0]
        monitor = monitor_of(
            sock,
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_HANDSHAKE_SUCCEEDED,
        )
        event = await asyncio.wait_for(recv_monitor_message(monitor), 10)
        assert event["event"] != zmq.EVENT_HANDSHAKE_SUCCEEDED
        sock.disable_monitor()
        monitor.close(0)
        assert not a.transport.send(target.id, "reboot", b"")
        assert a.transport.drops["unreachable"] >= 1
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
        sock = a.transport._dealers[b.id][0]
        monitor = monitor_of(sock, zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        event = await asyncio.wait_for(recv_monitor_message(monitor), 10)
        assert event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        sock.disable_monitor()
        monitor.close(0)
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
        sock = a.transport._dealers[b.id][0]
        monitor = monitor_of(sock, zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        assert a.transport.send(b.id, "ping", b"y" * 10_000)  # over b's ZMQ_MAXMSGSIZE
        events = [await asyncio.wait_for(recv_monitor_message(monitor), 10) for _ in range(2)]
        assert [e["event"] for e in events] == [
            zmq.EVENT_DISCONNECTED,
            zmq.EVENT_HANDSHAKE_SUCCEEDED,
        ]
        sock.disable_monitor()
        monitor.close(0)
        assert a.transport.send(b.id, "ping", b"later")
        got = await b.next()
        assert got.envelope.body == b"later"
    finally:
        await closed(a, b)
