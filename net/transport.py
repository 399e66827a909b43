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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio
from zmq.utils import z85

from net.addresses import split_hostport
from net.wire import MAX_FRAME, DropCounter, Envelope, ReplayGuard, Sealer, WireError, open_envelope
from swarmnode.identity import Identity, curve_public_key

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"swarmnode"

#: Messages queued per peer connection before new ones are dropped. Gossip is loss-tolerant
#: and stale probes are worthless, so a short queue beats unbounded memory for a dead peer.
SEND_HWM = 256
#: How long a closing socket may still flush queued messages.
LINGER_MS = 200
#: How often a DEALER retries an unreachable address (ms) and the cap of its backoff.
RECONNECT_IVL_MS = 200
RECONNECT_IVL_MAX_MS = 5_000
#: CURVE handshake timeout: a silent host behind a reported address is given up quickly.
HANDSHAKE_IVL_MS = 3_000


#: Blocking views of the asyncio sockets, for non-blocking sends (see `Transport._try_send`).
_SHADOWS: weakref.WeakKeyDictionary[zmq.asyncio.Socket, zmq.Socket] = weakref.WeakKeyDictionary()


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


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

    @property
    def sender(self) -> str:
        return self.envelope.sender

    def reply(self, msg_type: str, body: bytes) -> bool:
        return self._reply(msg_type, body)


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
        self.replay = ReplayGuard()
        self.ctx = zmq.asyncio.Context()
        self.public, self.secret = identity.curve_keypair()
        self._router: zmq.asyncio.Socket | None = None
        self._zap: zmq.asyncio.Socket | None = None
        self._dealers: dict[str, tuple[zmq.asyncio.Socket, tuple[str, ...]]] = {}
        self._inbound_routes: dict[str, bytes] = {}  # peer id -> ROUTER routing id
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
        router.sndhwm = SEND_HWM
        router.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
        router.bind(endpoint(self.listen))
        self._router = router
        self._spawn(self._recv_loop(router, None))

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
        for sock, _ in self._dealers.values():
            sock.close(linger=LINGER_MS)
        self._dealers.clear()
        if self._router is not None:
            self._router.close(linger=LINGER_MS)
        if self._zap is not None:
            self._zap.close(linger=0)
        self.ctx.term()

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
        if current is not None and current[1] == addresses:
            return
        if current is not None:
            current[0].close(linger=0)
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.curve_serverkey = curve_public_key(peer_id)
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.immediate = True
        sock.sndhwm = SEND_HWM
        sock.maxmsgsize = self.max_size
        sock.reconnect_ivl = RECONNECT_IVL_MS
        sock.reconnect_ivl_max = RECONNECT_IVL_MAX_MS
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
        for addr in addresses:
            try:
                sock.connect(endpoint(addr, self.source))
            except (zmq.ZMQError, ValueError) as exc:
                self.drops.drop("bad_address")
                log.warning("cannot connect to %s at %s: %s", peer_id[:12], addr, exc)
        self._dealers[peer_id] = (sock, addresses)
        self._spawn(self._recv_loop(sock, peer_id))

    def disconnect(self, peer_id: str) -> None:
        entry = self._dealers.pop(peer_id, None)
        if entry is not None:
            entry[0].close(linger=0)
        self._inbound_routes.pop(peer_id, None)

    def send(self, peer_id: str, msg_type: str, body: bytes) -> bool:
        """Send without blocking; False (and counted) when no working connection exists."""
        frame = self.sealer.seal(msg_type, body)
        entry = self._dealers.get(peer_id)
        if entry is not None and self._try_send(entry[0], [frame]):
            self._count(msg_type, frame)
            return True
        route = self._inbound_routes.get(peer_id)
        if route is not None and self._router is not None:
            if self._try_send(self._router, [route, frame]):
                self._count(msg_type, frame)
                return True
            self._inbound_routes.pop(peer_id, None)
        self.drops.drop("unreachable")
        return False

    def _count(self, msg_type: str, frame: bytes) -> None:
        self.sent[msg_type] = self.sent.get(msg_type, 0) + 1
        self.bytes_out += len(frame)

    @staticmethod
    def _try_send(sock: zmq.asyncio.Socket, frames: list[bytes]) -> bool:
        """Send now or drop: the asyncio socket's send would wait for room instead."""
        shadow = _SHADOWS.get(sock)
        if shadow is None:
            shadow = _SHADOWS[sock] = zmq.Socket.shadow(sock.underlying)
        try:
            shadow.send_multipart(frames, flags=zmq.NOBLOCK, copy=True)
        except zmq.ZMQError:
            return False
        return True

    # -- receiving ------------------------------------------------------------------------

    async def _recv_loop(self, sock: zmq.asyncio.Socket, peer_id: str | None) -> None:
        while True:
            try:
                frames = await sock.recv_multipart(copy=False)
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
            self.replay.accept(env.sender, env.epoch, env.seq)
        except WireError as exc:
            self.drops.drop(exc.reason)
            return
        observed: str | None = None
        if routing is not None:
            with contextlib.suppress(zmq.ZMQError, UnicodeDecodeError):
                observed = payload.get("Peer-Address")
            self._inbound_routes[env.sender] = routing
            reply = self._router_reply(routing)
        else:
            reply = self._dealer_reply(sock)
        self.on_message(Inbound(env, observed, reply))

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

    def _router_reply(self, routing: bytes) -> Callable[[str, bytes], bool]:
        def reply(msg_type: str, body: bytes) -> bool:
            frame = self.sealer.seal(msg_type, body)
            assert self._router is not None
            if self._try_send(self._router, [routing, frame]):
                self._count(msg_type, frame)
                return True
            self.drops.drop("unreachable")
            return False

        return reply

    def _dealer_reply(self, sock: zmq.asyncio.Socket) -> Callable[[str, bytes], bool]:
        def reply(msg_type: str, body: bytes) -> bool:
            frame = self.sealer.seal(msg_type, body)
            if self._try_send(sock, [frame]):
                self._count(msg_type, frame)
                return True
            self.drops.drop("unreachable")
            return False

        return reply

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
