"""ZeroMQ transport with CURVE: every connection is encrypted and both ends are authenticated.

One ROUTER socket is bound on the node's single listening port (CURVE server with the node's
own key). To talk to a peer the node opens a DEALER (CURVE client) whose server key is derived
from the peer's *id*, so the handshake only completes with that identity: if a NAT gateway or
any other host answers at a reported address, nothing is sent to it.

A ZAP handler sees each client's CURVE key: banned keys are refused during the handshake; any
other key is let in and labelled by the key, and `Transport` tags every inbound message with
the sender's key so the node can accept only the admission handshake from non-members.

Replies travel back on the connection the request came in on (`Inbound.reply`), and a member
that has an inbound connection from a peer can also reach it that way (`send` falls back to
it), which is what makes a node behind a masquerading NAT reachable.

Connections by need: a DEALER unused for IDLE_CLOSE_S is closed once the peer has shown it
can dial us (it connected in within DIALS_US_S), so a pair of members talking now and then
shares one connection, opened by whoever speaks first, and a swarm of 40 does not hold 78
connections per node. A member that nobody dials (behind NAT) keeps its own DEALERs: they are
how the others reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from net.addresses import is_loopback, split_hostport
from net.wire import MAX_FRAME, DropCounter, Envelope, ReplayGuard, Sealer, WireError, open_envelope
from swarmnode.identity import Identity, curve_public_key

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"swarmnode"

#: Messages queued per peer connection before new ones are dropped. Gossip is loss-tolerant
#: and stale probes are worthless, so a short queue beats unbounded memory for a dead peer.
SEND_HWM = 256
#: Messages taken in per peer connection before ZeroMQ stops reading it (TCP then holds the
#: sender back). Its default, 1,000 of up to 1 MiB, would let one peer fill a node that is
#: slow to read with a gigabyte.
RECV_HWM = 256
#: Longest a receive loop handles messages in a row before it hands the event loop back. A
#: receive that finds a message queued completes at once, without suspending, so a burst was
#: handled in one step: 39 messages held a 5-node follower's loop for 51 ms of CPU during a
#: push (timers, probes and replies all waited behind it). One message costs 0.3-2.5 ms; a
#: few ms bound a step without a loop pass per message.
RECV_SLICE_S = 0.005
#: How long a closing socket may still flush queued messages.
LINGER_MS = 200
#: How often a DEALER retries an unreachable address (ms) and the cap of its backoff: a peer
#: back from a partition or a restart is dialled again within the cap (a cut host's own
#: dials fail at once, and backed off to 5 s they kept it unreachable seconds after a heal).
#: An attempt costs one SYN, or a reset.
RECONNECT_IVL_MS = 200
RECONNECT_IVL_MAX_MS = 500
#: A TCP connect not answered within this is given up and tried afresh (after the interval
#: above): alone, the kernel retries a SYN lost to a partition only after 1, 3, 7 s... Above
#: its first retry and a relayed path's round trip (Tailscale's DERP: a few hundred ms).
CONNECT_TIMEOUT_MS = 2_000
#: A connection whose sent data stays unacknowledged this long is dropped (TCP_USER_TIMEOUT),
#: and while it is dialled again, messages go over the peer's own connection to us if it has
#: one. Found by the fault benchmark: during a 4.5 s cut TCP doubles its retransmission
#: timeout (0.2, 0.4, 0.8, 1.6, 3.2 s), and an established connection then carried nothing
#: for 1.9 s after the heal; a leader's heartbeats queued behind it, the cut-off followers
#: stayed behind, and the next fault found one node able to win (3.1 s without a leader).
#: Two seconds outlast a lost retransmission on a slow path.
TCP_MAXRT_MS = 2_000
#: CURVE handshake timeout: a silent host behind a reported address is given up quickly.
HANDSHAKE_IVL_MS = 3_000
#: ZMTP heartbeats on outgoing (DEALER) connections: one whose path died silently (a router
#: stopped forwarding, a cable pulled: no FIN, no RST) is dropped after HEARTBEAT_TIMEOUT_MS
#: without an answer. The ROUTER only answers them (ZMTP requires it): the peer's own DEALER
#: notices a dead path and reconnects, which replaces its inbound route here.
#: Without them the DEALER keeps "sending" into a dead TCP connection for the kernel's
#: retransmission timeout (many minutes), and a member reachable another way (its own
#: inbound connection, a tunnel) is never tried. A ping costs a few bytes a second.
HEARTBEAT_IVL_MS = 2_000
HEARTBEAT_TIMEOUT_MS = 6_000
#: Messages to a peer whose connection is still being set up are held this long, at most
#: HOLD_MAX of them, and sent when its handshake completes. Without this the first message
#: to any new peer (a join, a rejoin after restart) would always be dropped.
HOLD_S = 2.0
HOLD_MAX = 64
#: After a handshake fails at an address (another identity answers there, or it refuses us),
#: that address is retried after 1 s, doubling up to 60 s. libzmq alone would retry every
#: 200 ms for ever, because its own backoff restarts whenever the TCP connect succeeds.
FAIL_BACKOFF_S = 1.0
FAIL_BACKOFF_MAX_S = 60.0
FAILURES = frozenset({"wrong_identity", "refused", "handshake_failed"})
#: A DEALER that neither sent nor received for this long is closed (if the peer dials us):
#: a probe with its indirect round (one probe interval, 1 s) completes inside it, and a SWIM
#: node probing one member a second then holds about two probe connections, and is dialled
#: by about two probers, not connected to every member (at 4 s a node of 40 held 18).
#: Reopening costs a CURVE handshake (a round trip and a few hundred microseconds of CPU),
#: and messages wait for it (HOLD_S); a pair talking steadily (Raft) keeps its connection.
IDLE_CLOSE_S = 2.0
#: How often idle DEALERs are looked for.
IDLE_CHECK_S = 0.5
#: A peer that connected to us within this long can dial us again, so our DEALER to it may
#: close when idle. Ten minutes: a firewall or NAT change shows within that (the member is then
#: reached by its own connection, as before).
DIALS_US_S = 600.0


#: Connection events kept per peer: what `route` diagnostics show and tests await.
WATCHED = {
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "handshake_ok",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "wrong_identity",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
    zmq.EVENT_DISCONNECTED: "disconnected",
}
HISTORY = 16


@dataclass(slots=True)
class _Dealer:
    """The outgoing connection to one peer (all its reported addresses) and what waits for it."""

    sock: zmq.asyncio.Socket
    addresses: tuple[str, ...]
    monitor: zmq.asyncio.Socket
    held: deque[tuple[float, str, bytes]] = field(default_factory=deque)
    used: float = field(default_factory=time.monotonic)  # last send or receive
    endpoints: dict[str, str] = field(default_factory=dict)  # "tcp://dst" -> connect string
    backoff: dict[str, float] = field(default_factory=dict)  # "tcp://dst" -> next delay
    closed: bool = False
    history: deque[tuple[float, str, str]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def close(self) -> None:
        self.closed = True
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _destination(ep: str) -> str:
    """"tcp://SRC:0;DST:PORT" or "tcp://DST:PORT" -> "tcp://DST:PORT" (how monitors name it)."""
    rest = ep.removeprefix("tcp://")
    return "tcp://" + rest.rsplit(";", 1)[-1]


def _liveness(sock: zmq.Socket) -> None:
    """A DEALER's connection found dead, and dialled again, soon (the constants above)."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.TCP_MAXRT, TCP_MAXRT_MS)
    sock.setsockopt(zmq.CONNECT_TIMEOUT, CONNECT_TIMEOUT_MS)


def endpoint(hostport: str, source: str | None = None) -> str:
    """ZeroMQ endpoint for "host:port"; with `source`, connect from that local address."""
    host, port = split_hostport(hostport, 0)
    src = f"{_bracket(source)}:0;" if source else ""
    return f"tcp://{src}{_bracket(host)}:{port}"


@dataclass(slots=True)
class Inbound:
    """A verified message: `sender` is the envelope signer, proven to own the CURVE key."""

    envelope: Envelope
    observed: str | None  # the source address the TCP connection came from
    _reply: Callable[[str, bytes], bool] = field(repr=False)
    _reply_frame: Callable[[str, bytes], bool] | None = field(default=None, repr=False)

    @property
    def sender(self) -> str:
        return self.envelope.sender

    def reply(self, msg_type: str, body: bytes) -> bool:
        return self._reply(msg_type, body)

    def reply_frame(self, msg_type: str, frame: bytes) -> bool:
        """Reply with a frame already sealed (by `Transport.sealer`, e.g. in a worker thread,
        so that sealing big replies keeps off the event loop); False where that is not
        possible (a message a node sent itself)."""
        return self._reply_frame is not None and self._reply_frame(msg_type, frame)


class Transport:
    """Owns the sockets. `on_message` gets each verified inbound message."""

    def __init__(
        self,
        identity: Identity,
        listen: str,
        on_message: Callable[[Inbound], None],
        is_banned: Callable[[bytes], bool],
        drops: DropCounter | None = None,
        max_size: int = MAX_FRAME,
    ) -> None:
        self.identity = identity
        self.listen = listen
        listen_host = split_hostport(listen, 0)[0]
        # A node bound to one address also dials from it, so peers observe an address it
        # reports (on a multi-homed host the kernel might otherwise pick another source).
        self.source = None if listen_host in ("0.0.0.0", "::", "", "*") else listen_host
        self.on_message = on_message
        self.is_banned = is_banned
        self.drops = drops if drops is not None else DropCounter()
        self.max_size = max_size
        self.sealer = Sealer(identity)
        # Members and strangers get separate replay windows, so a flood of fresh keys can
        # evict only strangers' windows, never a member's (which would let one of its frames
        # be replayed).
        self.replay = ReplayGuard()
        self.guest_replay = ReplayGuard(max_senders=1024)
        self.is_member: Callable[[str], bool] = lambda _id: True
        #: DEALERs closed for idleness, since start.
        self.closed_idle = 0
        self.ctx = zmq.asyncio.Context()
        self.public, self.secret = identity.curve_keypair()
        self._router: zmq.asyncio.Socket | None = None
        self._zap: zmq.asyncio.Socket | None = None
        self._dealers: dict[str, _Dealer] = {}
        # the connection events of DEALERs closed for idleness, continued by the next one
        self._idle_history: dict[str, deque[tuple[float, str, str]]] = {}
        self._inbound_routes: dict[str, bytes] = {}  # peer id -> ROUTER routing id
        self._inbound_seen: dict[str, float] = {}  # peer id -> when it last sent on it
        self._dialable: set[str] = set()  # peers a DEALER of ours completed a handshake with
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent: dict[str, int] = {}
        self.bytes_out = 0
        self.bytes_in = 0

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._zap = self.ctx.socket(zmq.REP)
        self._zap.linger = 0
        self._zap.bind(ZAP_ENDPOINT)
        self._spawn(self._serve_zap())
        router = self.ctx.socket(zmq.ROUTER)
        router.linger = LINGER_MS
        router.curve_server = True
        router.curve_secretkey = self.secret
        router.curve_publickey = self.public
        router.zap_domain = ZAP_DOMAIN
        router.maxmsgsize = self.max_size
        router.router_mandatory = True
        router.router_handover = True
        router.sndhwm, router.rcvhwm = SEND_HWM, RECV_HWM
        router.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
        router.setsockopt(zmq.TCP_MAXRT, TCP_MAXRT_MS)  # (its accepted connections)
        self._router = router  # before bind: close() must find it even if bind fails
        router.bind(endpoint(self.listen))
        self._spawn(self._recv_loop(router, None))
        self._spawn(self._close_idle())

    @property
    def bound_endpoint(self) -> str:
        assert self._router is not None
        return self._router.getsockopt_string(zmq.LAST_ENDPOINT)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for dealer in self._dealers.values():
            dealer.close()
        self._dealers.clear()
        if self._router is not None:
            self._router.close(linger=LINGER_MS)
        if self._zap is not None:
            self._zap.close(linger=0)
        self.ctx.destroy(linger=LINGER_MS)  # also closes any socket a failed start left open

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- peers ----------------------------------------------------------------------------

    def connect(self, peer_id: str, addresses: tuple[str, ...]) -> None:
        """Keep a DEALER to `peer_id` connected to every address it reports.

        Unreachable addresses simply never complete the handshake (messages only go to
        connected pipes); when the reported addresses change the socket is rebuilt.
        """
        if peer_id == self.identity.id:
            return
        current = self._dealers.get(peer_id)
        if current is not None and current.addresses == addresses:
            return
        if current is not None:
            current.close()
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.curve_serverkey = curve_public_key(peer_id)
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.immediate = True
        sock.sndhwm, sock.rcvhwm = SEND_HWM, RECV_HWM
        sock.maxmsgsize = self.max_size
        sock.reconnect_ivl = RECONNECT_IVL_MS
        sock.reconnect_ivl_max = RECONNECT_IVL_MAX_MS
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
        _liveness(sock)
        events = 0
        for ev in WATCHED:
            events |= ev
        monitor = sock.get_monitor_socket(events, addr=f"inproc://swarmnode-mon-{uuid.uuid4().hex}")
        dealer = _Dealer(sock, addresses, monitor)
        dealer.history.extend(self._idle_history.pop(peer_id, ()))
        for addr in addresses:
            try:
                full = endpoint(addr, self._source_for(addr))
                sock.connect(full)
            except (zmq.ZMQError, ValueError) as exc:
                self.drops.drop("bad_address")
                log.warning("cannot connect to %s at %s: %s", peer_id[:12], addr, exc)
                continue
            dealer.endpoints[_destination(full)] = full
        self._dealers[peer_id] = dealer
        self._spawn(self._recv_loop(sock, peer_id))
        self._spawn(self._on_handshakes(peer_id, dealer))

    def disconnect(self, peer_id: str) -> None:
        self._idle_history.pop(peer_id, None)
        dealer = self._dealers.pop(peer_id, None)
        if dealer is not None:
            dealer.close()
        self._inbound_routes.pop(peer_id, None)
        self._inbound_seen.pop(peer_id, None)
        self._dialable.discard(peer_id)

    def has_dealer(self, peer_id: str) -> bool:
        return peer_id in self._dealers

    def dialable(self, peer_id: str) -> bool:
        """Whether a DEALER of ours has completed a handshake with `peer_id` (since it
        last left): it can be dialled, so a message that must go over our own connection may
        wait for the handshake rather than ride the peer's."""
        return peer_id in self._dialable

    def send_inbound(self, peer_id: str, msg_type: str, body: bytes) -> bool:
        """Send over the connection `peer_id` opened to us, if it sent on it within
        IDLE_CLOSE_S (so it is likely still open); False, with nothing counted, when there is
        none or it is gone (the caller dials instead)."""
        age = self.inbound_age(peer_id)
        if age is None or age > IDLE_CLOSE_S or self._router is None:
            return False
        route = self._inbound_routes[peer_id]  # (inbound_age: it exists)
        try:
            frame = self.sealer.seal(msg_type, body)
        except WireError:
            return False  # (send counts it)
        if self._try_send(self._router, [route, frame]):
            self._count(msg_type, frame)
            return True
        self._inbound_routes.pop(peer_id, None)
        return False

    def connections(self) -> dict[str, int]:
        """How many connections this node holds and why: DEALERs it dialled (`kept` of them
        to peers that have not dialled it within DIALS_US_S, which stay open), peers whose
        own connection to it was used within IDLE_CLOSE_S, and DEALERs closed for idleness
        (for status and the scale benchmark)."""
        now = time.monotonic()
        kept = sum(now - self._inbound_seen.get(p, -DIALS_US_S) > DIALS_US_S
                   for p in self._dealers)
        inbound = sum(now - seen <= IDLE_CLOSE_S for seen in self._inbound_seen.values())
        return {"dialled": len(self._dealers), "kept": kept, "inbound_in_use": inbound,
                "closed_idle": self.closed_idle}

    async def _close_idle(self) -> None:
        while True:
            await asyncio.sleep(IDLE_CHECK_S)
            self.close_idle(time.monotonic())

    def close_idle(self, now: float) -> None:
        """Close the DEALERs idle for IDLE_CLOSE_S to peers that dial us (see the module
        docstring)."""
        for peer_id, dealer in list(self._dealers.items()):
            if (now - dealer.used < IDLE_CLOSE_S or dealer.held
                    or now - self._inbound_seen.get(peer_id, -DIALS_US_S) > DIALS_US_S):
                continue
            del self._dealers[peer_id]
            dealer.close()
            dealer.history.append((time.time(), "closed_idle", ""))
            self._idle_history[peer_id] = dealer.history
            self.closed_idle += 1

    def inbound_age(self, peer_id: str) -> float | None:
        """Seconds since `peer_id` last sent on the connection it opened to us, if it has one
        (a member behind NAT is reached back over it)."""
        if peer_id not in self._inbound_routes:
            return None
        return time.monotonic() - self._inbound_seen.get(peer_id, 0.0)

    def send(self, peer_id: str, msg_type: str, body: bytes, via: str | None = None) -> bool:
        """Send without blocking; False (and counted) when no connection exists or is coming.

        Tries the DEALER to the peer's addresses, then the connection the peer opened to us
        (NAT), then holds the message briefly if the DEALER is still handshaking. `via`
        ("dealer" or "inbound") pins one path: a route proven on that path is used even while
        the other still looks connected (a TCP connection can outlive the path under it).
        """
        try:
            frame = self.sealer.seal(msg_type, body)
        except WireError as exc:  # too big to send: a bug or hostile state, never a crash
            log.warning("not sending %s to %s: %s", msg_type, peer_id[:12], exc)
            self.drops.drop("oversized_out")
            return False
        dealer = self._dealers.get(peer_id) if via != "inbound" else None
        if dealer is not None and self._try_send(dealer.sock, [frame]):
            dealer.used = time.monotonic()
            self._count(msg_type, frame)
            return True
        route = self._inbound_routes.get(peer_id) if via != "dealer" else None
        if route is not None and self._router is not None:
            if self._try_send(self._router, [route, frame]):
                self._count(msg_type, frame)
                return True
            self._inbound_routes.pop(peer_id, None)
        if dealer is not None:
            self._expire(dealer, time.monotonic())
            dealer.used = time.monotonic()
            if len(dealer.held) < HOLD_MAX:
                dealer.held.append((time.monotonic() + HOLD_S, msg_type, frame))
                return True
        self.drops.drop("unreachable")
        return False

    def _expire(self, dealer: _Dealer, now: float) -> None:
        while dealer.held and dealer.held[0][0] < now:
            dealer.held.popleft()
            self.drops.drop("unreachable")

    async def _on_handshakes(self, peer_id: str, dealer: _Dealer) -> None:
        """Record connection events; each completed handshake releases held messages."""
        while True:
            try:
                event = await recv_monitor_message(dealer.monitor)
            except zmq.ZMQError:
                return  # the dealer was closed
            if dealer.closed:  # (closed while its last event was on the way)
                return
            name = WATCHED.get(event["event"], str(event["event"]))
            where = _destination(event.get("endpoint", b"").decode(errors="replace"))
            dealer.history.append((time.time(), name, where))
            dealer.changed.set()
            dealer.changed = asyncio.Event()
            if name in FAILURES:
                self._park(dealer, where)
            if name != "handshake_ok":
                continue
            self._dialable.add(peer_id)
            dealer.backoff.pop(where, None)
            self._expire(dealer, time.monotonic())
            while dealer.held:
                _, msg_type, frame = dealer.held[0]
                if not self._try_send(dealer.sock, [frame]):
                    break
                dealer.held.popleft()
                self._count(msg_type, frame)

    def _park(self, dealer: _Dealer, where: str) -> None:
        """Stop dialling an address whose handshake failed; dial it again after a backoff."""
        full = dealer.endpoints.get(where)
        if full is None or dealer.closed:
            return
        delay = dealer.backoff.get(where, FAIL_BACKOFF_S)
        dealer.backoff[where] = min(delay * 2, FAIL_BACKOFF_MAX_S)
        with contextlib.suppress(zmq.ZMQError):
            dealer.sock.disconnect(full)

        def again() -> None:
            if not dealer.closed:
                with contextlib.suppress(zmq.ZMQError):
                    dealer.sock.connect(full)

        asyncio.get_running_loop().call_later(delay, again)

    async def probe(self, peer_id: str, address: str, timeout: float) -> str:
        """Whether `peer_id` itself answers at `address`: "ok" once a CURVE handshake with its
        key completes, else why not ("wrong_identity", "refused", "no_handshake",
        "connection_refused" (refused or unreachable: no TCP connection), "timeout" (silence,
        e.g. a firewall dropping packets)).

        A throwaway DEALER with a monitor, so probing never disturbs the peer's live connection
        and a route is only called good when the named identity proved itself there.
        """
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.curve_serverkey = curve_public_key(peer_id)
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.setsockopt(zmq.HANDSHAKE_IVL, max(1, int(timeout * 1000)))
        monitor = sock.get_monitor_socket(
            zmq.EVENT_ALL, addr=f"inproc://swarmnode-probe-{uuid.uuid4().hex}")
        seen = "timeout"
        try:
            sock.connect(endpoint(address, self._source_for(address)))
            async with asyncio.timeout(timeout):
                while True:
                    event = (await recv_monitor_message(monitor))["event"]
                    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                        return "ok"
                    if event in WATCHED and WATCHED[event] in FAILURES:
                        return WATCHED[event]
                    if event == zmq.EVENT_CONNECTED:
                        seen = "no_handshake"
                    elif event == zmq.EVENT_CONNECT_RETRIED and seen == "timeout":
                        # the TCP connect itself failed (refused, no route): conclusive
                        return "connection_refused"
        except TimeoutError:
            return seen
        except (zmq.ZMQError, ValueError) as exc:
            return f"bad_address: {exc}"
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)

    def _source_for(self, address: str) -> str | None:
        """Dial from the listen address, except from a LAN address to loopback (an SSH tunnel's
        local end), which the kernel would not route."""
        if self.source is None or is_loopback(self.source):
            return self.source
        return None if is_loopback(split_hostport(address, 0)[0]) else self.source

    def connection_events(self, peer_id: str) -> list[tuple[float, str, str]]:
        """Recent (time, event, endpoint) of our connection to `peer_id`, oldest first (one
        closed for idleness included)."""
        dealer = self._dealers.get(peer_id)
        return list(dealer.history if dealer is not None else self._idle_history.get(peer_id, ()))

    async def wait_connection_event(self, peer_id: str, timeout: float) -> str:
        """The next connection event to `peer_id` (for diagnostics and tests)."""
        dealer = self._dealers[peer_id]
        async with asyncio.timeout(timeout):
            await dealer.changed.wait()
        return dealer.history[-1][1]

    def _count(self, msg_type: str, frame: bytes) -> None:
        self.sent[msg_type] = self.sent.get(msg_type, 0) + 1
        self.bytes_out += len(frame)

    @staticmethod
    def _try_send(sock: zmq.asyncio.Socket, frames: list[bytes]) -> bool:
        """Send now or drop (the default would wait for room).

        With NOBLOCK pyzmq attempts the send at once and settles the future before returning.
        Going through the asyncio socket (not a blocking shadow of it) matters: its file
        descriptor is edge-triggered, and a send it does not see can swallow the readiness
        edge its receive loop waits for.
        """
        fut = sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=True)
        if not fut.done():  # not expected with NOBLOCK; never leave a send pending
            fut.cancel()
            return False
        return fut.exception() is None

    # -- receiving ------------------------------------------------------------------------

    async def _recv_loop(self, sock: zmq.asyncio.Socket, peer_id: str | None) -> None:
        slice_end = 0.0
        while True:
            try:
                received = sock.recv_multipart(copy=False)
                if not received.done():  # nothing queued: the wait ends this step
                    frames = await received
                    slice_end = time.monotonic() + RECV_SLICE_S
                else:  # queued: taken without suspending, so hand over now and then
                    if time.monotonic() >= slice_end:
                        await asyncio.sleep(0)
                        slice_end = time.monotonic() + RECV_SLICE_S
                    frames = received.result()
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as exc:
                if exc.errno in (zmq.ENOTSOCK, zmq.ETERM):
                    return
                log.warning("receive failed: %s", exc)
                continue
            try:
                self._accept(sock, peer_id, frames)
            except Exception:  # a bug in a handler must not kill the receive loop
                log.exception("handler failed")
                self.drops.drop("handler_error")

    def _accept(self, sock: zmq.asyncio.Socket, peer_id: str | None, frames: list) -> None:
        routing: bytes | None = None
        if peer_id is None:  # ROUTER: [routing id, payload]
            if len(frames) != 2:
                self.drops.drop("malformed")
                return
            routing = frames[0].bytes
        elif len(frames) != 1:
            self.drops.drop("malformed")
            return
        payload = frames[-1]
        self.bytes_in += len(payload.bytes)
        try:
            env = open_envelope(payload.bytes, self.max_size)
            self._check_key(env, payload, peer_id)
            guard = self.replay if self.is_member(env.sender) else self.guest_replay
            guard.accept(env.sender, env.epoch, env.seq)
        except WireError as exc:
            self.drops.drop(exc.reason)
            return
        observed: str | None = None
        if routing is not None:
            with contextlib.suppress(zmq.ZMQError, UnicodeDecodeError):
                observed = payload.get("Peer-Address")
            self._inbound_routes[env.sender] = routing
            self._inbound_seen[env.sender] = time.monotonic()
            send = self._router_send(routing)
        else:
            send = self._dealer_send(sock)
            dealer = self._dealers.get(env.sender)
            if dealer is not None:
                dealer.used = time.monotonic()

        def reply(msg_type: str, body: bytes) -> bool:
            return send(msg_type, self.sealer.seal(msg_type, body))

        self.on_message(Inbound(env, observed, reply, send))

    def _check_key(self, env: Envelope, payload: zmq.Frame, peer_id: str | None) -> None:
        """The envelope signer must be the identity CURVE authenticated on this connection."""
        if peer_id is not None:
            if env.sender != peer_id:
                raise WireError("wrong_sender")
            return
        try:
            user = payload.get("User-Id")
        except zmq.ZMQError as exc:
            raise WireError("unauthenticated") from exc
        if user != curve_public_key(env.sender).decode("ascii"):
            raise WireError("wrong_sender")

    def _router_send(self, routing: bytes) -> Callable[[str, bytes], bool]:
        """Sends a sealed frame back on the connection a message came in on (ours: a ROUTER
        route)."""
        def send(msg_type: str, frame: bytes) -> bool:
            assert self._router is not None
            if self._try_send(self._router, [routing, frame]):
                self._count(msg_type, frame)
                return True
            self.drops.drop("unreachable")
            return False

        return send

    def _dealer_send(self, sock: zmq.asyncio.Socket) -> Callable[[str, bytes], bool]:
        """...or (theirs: our DEALER)."""
        def send(msg_type: str, frame: bytes) -> bool:
            if self._try_send(sock, [frame]):
                self._count(msg_type, frame)
                return True
            self.drops.drop("unreachable")
            return False

        return send

    # -- ZAP ------------------------------------------------------------------------------

    async def _serve_zap(self) -> None:
        assert self._zap is not None
        while True:
            frames = await self._zap.recv_multipart()
            await self._zap.send_multipart(self._zap_answer(frames))

    def _zap_answer(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) < 6:
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, _domain, _address, _identity, mechanism = frames[:6]
        if mechanism != b"CURVE" or len(frames) < 7 or len(frames[6]) != 32:
            self.drops.drop("zap_mechanism")
            return [version, request_id, b"400", b"CURVE required", b"", b""]
        key = frames[6]
        if self.is_banned(key):
            self.drops.drop("banned")
            return [version, request_id, b"400", b"banned", b"", b""]
        return [version, request_id, b"200", b"OK", z85.encode(key), b""]
