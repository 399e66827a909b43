"""An attacker on the wire: speaks swarmnode's real protocol to a running node with any key.

Security regression tests need a peer that sends what no honest node would -- a forged
leader's AppendEntries, a job assignment from a plain member, a `dead` item about someone
else, a flood of notes -- over the same CURVE connection and signed envelope a real node uses
(net/transport.py, net/wire.py), so the node under test judges it exactly as it would judge a
compromised member. Bodies come from the project's own packers (membership, election, worker,
actions, admission), never copies, so the harness follows their wire changes.

    from tests.attacker import Attacker

    async with Attacker(member.home, victim.listen, victim.id) as a:   # a member's key
        await a.send(*a.assign("b1", "pwn", "id > /tmp/owned", term=2**40))
        await a.send_message(AppendEntries(term=9, leader=a.id, seq=1, prev_index=0,
                                           prev_term=0, commit=0))
        reply = await a.recv(5.0, "act_end")                          # an Envelope
    async with Attacker(None, victim.listen, victim.id) as s:          # a fresh stranger
        await s.send(*s.hello())
        assert unpack_map((await s.recv(5.0, "hello_reply")).body)["status"] == "pending"

API (every `msg_type, body` pair can be sent with `send`):

- `Attacker(key, endpoint, target, listen=None)`: `key` is a node's home (its `identity.key`
  must exist: an admitted member's, a banned one's...), an `Identity`, or None for a fresh
  stranger; `endpoint` the target's HOST:PORT; `target` its node id; `listen` where its own
  (unused) ROUTER binds, a free loopback port by default. `async with`
  connects and waits for the CURVE handshake (`HandshakeFailed` names the event otherwise,
  e.g. "refused" for a banned key); leaving closes the sockets.
- `a.id`, `a.identity`: who the attacker is (sign items with `a.identity.sign(...)`).
- `await a.send(msg_type, body)`: one signed envelope (body: bytes, or a map packed as the
  worker packs it); False when the transport could not queue it.
- `await a.send_message(msg)`: a membership message (`Ping`, `Gossip(items=...)`,
  `PushPull`...) or an election message (`AppendEntries`, `RequestVote`...), encoded by its
  own codec.
- `await a.send_frame(frame)`: raw bytes as one ZeroMQ frame (a hand-made or replayed
  envelope; `net.wire.seal` makes one for any identity, epoch and seq).
- `await a.recv(timeout=5.0, msg_type=None)`: the oldest unread envelope (of that type),
  verified by the transport; TimeoutError when none comes. `a.inbox` holds the unread ones.
- Bodies: `a.assign(build, job, cmd, term, ...)` and `a.cancel(build, term, job=None)` as the
  leader sends them to a worker; `a.action(verb, argv=(), force=False, target=None)` an
  `exec`/`restart`/`reboot` request (its `rid` is in the body); `a.hello()` and `a.join(token)`
  the admission knock with this key's own signed record; `a.ping(seq=1)` a membership probe
  (answered by `ack`).

A running member's key used here shares that member's identity: the node's replay guard then
follows the attacker's newer epoch (frames are numbered per process start), so the real
member's frames are dropped as replays until it restarts. Stop the member first unless that
is what the test is about. Replies the node sends with `transport.send` (not straight back on
the connection) go to wherever it reaches the key's member: the real member when it runs.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from net.transport import FAILURES, Inbound, Transport
from net.wire import Envelope
from swarmnode import actions, admission, worker
from swarmnode.election import messages as election
from swarmnode.identity import KEY_FILE, Identity, load_or_create
from swarmnode.membership import messages as membership
from tests.ports import free_port

#: How long `async with` waits for the CURVE handshake.
CONNECT_TIMEOUT_S = 10.0
#: Unread envelopes kept (a member's key also receives gossip nobody reads).
INBOX = 10_000


class HandshakeFailed(ConnectionError):
    """No CURVE handshake with the target: `event` is the last connection event seen."""

    def __init__(self, event: str) -> None:
        super().__init__(f"no handshake with the target: {event}")
        self.event = event


def identity_of(key: Path | Identity | None) -> Identity:
    """The identity in a node's home (which must hold one), the one given, or a new one."""
    if key is None:
        return Identity.generate()
    if isinstance(key, Identity):
        return key
    if not (key / KEY_FILE).exists():
        raise FileNotFoundError(f"no {KEY_FILE} in {key}")
    return load_or_create(key)


class Attacker:
    """A peer holding `key` that talks to node `target` at `endpoint`; see the module doc."""

    def __init__(self, key: Path | Identity | None, endpoint: str, target: str,
                 listen: str | None = None) -> None:
        self.identity = identity_of(key)
        self.id = self.identity.id
        self.endpoint = endpoint
        self.target = target
        self.inbox: deque[Envelope] = deque(maxlen=INBOX)
        self._arrived = asyncio.Event()
        self.transport = Transport(self.identity, listen or f"127.0.0.1:{free_port()}",
                                   self._on_message,
                                   is_banned=lambda _key: False)

    async def __aenter__(self) -> Attacker:
        await self.transport.start()
        try:
            self.transport.connect(self.target, (self.endpoint,))
            await self._handshake(CONNECT_TIMEOUT_S)
        except BaseException:
            await self.transport.close()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.transport.close()

    async def _connected(self) -> None:
        """Dial the target again if the transport closed the connection for idleness (it does
        once the target has dialled us: net/transport.py, connections by need)."""
        if not self.transport.has_dealer(self.target):
            self.transport.connect(self.target, (self.endpoint,))
            await self._handshake(CONNECT_TIMEOUT_S)

    async def _handshake(self, timeout: float) -> None:
        last = "timeout"
        try:
            async with asyncio.timeout(timeout):
                while True:
                    events = [e for _t, e, _ep in self.transport.connection_events(self.target)]
                    if "closed_idle" in events:  # (a reconnection: only what came after)
                        events = events[len(events) - events[::-1].index("closed_idle"):]
                    if "handshake_ok" in events:
                        return
                    if events and events[-1] in FAILURES:
                        raise HandshakeFailed(events[-1])
                    last = events[-1] if events else last
                    await self.transport.wait_connection_event(self.target, timeout)
        except TimeoutError:
            raise HandshakeFailed(last) from None

    def _on_message(self, inbound: Inbound) -> None:
        self.inbox.append(inbound.envelope)
        self._arrived.set()

    # -- sending --------------------------------------------------------------------------

    async def send(self, msg_type: str, body: bytes | Mapping[str, Any]) -> bool:
        """One envelope of `msg_type` signed by this key; a map body is msgpack-packed."""
        raw = body if isinstance(body, bytes) else worker.pack(body)
        await self._connected()
        return self.transport.send(self.target, msg_type, raw)

    async def send_message(self, msg: membership.Message | election.Message) -> bool:
        """A membership or election message, encoded by its own codec."""
        try:
            msg_type, body = membership.encode(msg)  # type: ignore[arg-type]
        except TypeError:
            msg_type, body = election.pack(msg)  # type: ignore[arg-type]
        return await self.send(msg_type, body)

    async def send_frame(self, frame: bytes) -> None:
        """`frame` as it is, on the connection to the target (no envelope added)."""
        await self._connected()
        await self.transport._dealers[self.target].sock.send_multipart([frame])

    # -- receiving ------------------------------------------------------------------------

    async def recv(self, timeout: float = 5.0, msg_type: str | None = None) -> Envelope:
        """The oldest unread envelope (of `msg_type`), waiting up to `timeout` seconds."""
        async with asyncio.timeout(timeout):
            while True:
                for env in self.inbox:
                    if msg_type is None or env.type == msg_type:
                        self.inbox.remove(env)
                        return env
                self._arrived.clear()
                await self._arrived.wait()

    # -- bodies ---------------------------------------------------------------------------

    def assign(self, build: str, job: str, cmd: str | tuple[str, ...], term: int,
               attempt: int = 1, **fields: Any) -> tuple[str, bytes]:
        """A job.assign of one job, as the leader sends it; `fields` override the
        Assignment's other fields (env, outputs, cores, timeout, inputs, deps, sources)."""
        spec: dict[str, Any] = {"env": {}, "outputs": (), "cores": 1, "timeout": None,
                                "inputs": (), "deps": {}, "sources": (), **fields}
        plain = worker.Assignment(build=build, job=job, attempt=attempt, term=term, cmd=cmd,
                                  **spec).plain()
        return worker.ASSIGN, worker.pack({"assignments": [plain]})

    def cancel(self, build: str, term: int, job: str | None = None) -> tuple[str, bytes]:
        """A job.cancel of a build (or one of its jobs), as the leader sends it."""
        return worker.CANCEL, worker.pack({"build": build, "job": job, "term": term})

    def action(self, verb: str, argv: tuple[str, ...] | list[str] = (), force: bool = False,
               target: str | None = None) -> tuple[str, bytes]:
        """An `exec`/`restart`/`reboot` request to the target (or to the id `target` names)."""
        return actions.REQ, actions.pack(rid=os.urandom(16), target=target or self.target,
                                         verb=verb, argv=list(argv), force=force)

    def record(self, incarnation: int = 1, name: str = "attacker",
               addresses: tuple[str, ...] = ()) -> membership.Record:
        """A member record of this key, signed by it."""
        return membership.make_record(self.identity, self.id, incarnation, name,
                                      addresses, {})

    def hello(self) -> tuple[str, bytes]:
        """A guest's knock without a token (the target lists it as pending)."""
        return admission.HELLO, worker.pack({"record": membership.record_to_plain(
            self.record()), "via": "seed"})

    def join(self, token: str) -> tuple[str, bytes]:
        """A guest's knock with a join token."""
        return admission.JOIN, worker.pack({"record": membership.record_to_plain(
            self.record()), "via": "seed", "token": token})

    def ping(self, seq: int = 1) -> tuple[str, bytes]:
        """A membership probe of the target (answered by `ack`, signed over the nonce)."""
        return membership.encode(membership.Ping(seq, self.target, os.urandom(16)))
