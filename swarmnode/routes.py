"""How this node reaches a member: which path works, proven by the member's own key.

A route is only ever called good when the member's identity answered on it: a ZeroMQ CURVE
handshake with the key derived from its id. An address is never trusted for what it is, so a
NAT gateway answering at an address (the original incident) is a failed attempt that says who
answered, not a route.

Order, as the operator expects it: (1) the member's reported addresses, same subnet first,
then Tailscale, then the rest (probed together, best rank wins); (2) this node's `overrides`
for it; (3) the connection the member itself opened to us (how a node behind NAT is reached);
(4) a chain of SSH jump hosts (`jumps`, or ProxyJump from ~/.ssh/config), through which the
ZeroMQ port is tunnelled. What worked is remembered until the member's addresses change or the
route stops working.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from net import sshkeys, whois
from net.addresses import dial_order, host_of, join_hostport, local_networks, split_hostport
from net.transport import Inbound
from swarmnode import cluster
from swarmnode.control import ControlError
from swarmnode.views import member_view, vouched_host_keys

if TYPE_CHECKING:
    from net.ssh import Chain
    from swarmnode.membership import MemberView
    from swarmnode.node import Node

log = logging.getLogger(__name__)

#: How long one address gets to complete a CURVE handshake. A LAN answers in milliseconds and
#: Tailscale in tens; two seconds also covers a first DERP-relayed packet.
PROBE_TIMEOUT_S = 2.0
#: How long a member gets to answer a ping over the connection it opened to us.
INBOUND_TIMEOUT_S = 1.0
#: Message types of that ping (answered only to admitted members).
PING, PONG = "route_ping", "route_pong"
#: A route that works is taken once better ones have been silent this much longer (a LAN
#: or Tailscale address that works answers in milliseconds; silence means a dropped SYN).
GRACE_S = 0.3
#: SSH to jump hosts starts only when nothing direct answered within this: a login is not
#: free, and most members never need one.
SSH_DELAY_S = 0.3
#: How long an SSH hop gets to connect and authenticate.
SSH_TIMEOUT_S = 10.0
#: How often members that are not reachable directly but have an override or jump chain are
#: given a route in the background, so membership traffic flows over it too.
MAINTAIN_EVERY_S = 15.0


@dataclass
class Attempt:
    method: str  # "reported", "override", "inbound", "ssh", "address" (given by the user)
    address: str
    result: str  # "ok" or why not
    seconds: float
    via: tuple[str, ...] = ()  # SSH hops, in order

    def plain(self) -> dict[str, Any]:
        return {"method": self.method, "address": self.address, "result": self.result,
                "seconds": round(self.seconds, 4), "via": list(self.via)}


@dataclass
class Route:
    peer: str
    method: str
    address: str  # where ZeroMQ reaches the member (a local tunnel end for "ssh")
    attempts: list[Attempt]
    reported: tuple[str, ...]  # the addresses it was resolved for; a change re-resolves
    via: tuple[str, ...] = ()
    chosen_at: float = field(default_factory=time.time)
    tunnel: Any = None  # the (chain, forwarder) keeping an "ssh" route open

    def plain(self) -> dict[str, Any]:
        return {"id": self.peer, "method": self.method, "address": self.address,
                "via": list(self.via), "chosen_at": self.chosen_at,
                "attempts": [a.plain() for a in self.attempts]}

    @property
    def via_transport(self) -> str:
        """Which of the transport's paths this route is: the member's own connection to us,
        or our DEALER (reported, override, tunnel, given address)."""
        return "inbound" if self.method == "inbound" else "dealer"

    def describe(self) -> str:
        hops = " -> ".join(self.via)
        return f"{self.method} {self.address}" + (f" via {hops}" if hops else "")


class RouteError(ControlError):
    """No path reached the member; the message lists every attempt."""

    def __init__(self, name: str, attempts: list[Attempt]) -> None:
        self.attempts = attempts
        lines = [f"no route to {name}: every attempt failed"]
        lines += [f"  {a.method:<8} {a.address:<28} {a.result} ({a.seconds:.2f} s)"
                  + (f" via {' -> '.join(a.via)}" if a.via else "") for a in attempts]
        if not attempts:
            lines.append("  (it reports no address, and no override or jump host is configured)")
        super().__init__("\n".join(lines))


class Router:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.routes: dict[str, Route] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._pings: dict[bytes, tuple[str, asyncio.Future[bool]]] = {}

    # -- what the transport dials ---------------------------------------------------------

    def extra_addresses(self, peer: str) -> tuple[str, ...]:
        """Addresses beyond the reported ones that the DEALER to `peer` should dial."""
        route = self.routes.get(peer)
        if route is None or route.method not in ("override", "ssh", "address"):
            return ()
        return (route.address,)

    def cached(self, peer: str) -> Route | None:
        route = self.routes.get(peer)
        view = self.node.core.member(peer)
        if route is None or view is None or _reported(view) != route.reported:
            return None
        if route.tunnel is not None and not route.tunnel[0].active:
            return None
        return route

    def forget(self, peer: str) -> None:
        """Drop the remembered route (its addresses changed, or it stopped working)."""
        route = self.routes.pop(peer, None)
        if route is not None and route.tunnel is not None:
            _close_tunnel(route.tunnel)
            self.node.route_to(peer)

    def close(self) -> None:
        for peer in list(self.routes):
            self.forget(peer)

    # -- resolving ------------------------------------------------------------------------

    async def resolve(self, view: MemberView, address: str | None = None) -> Route:
        """Find (and remember) a route to `view`, trying every method in order, or only
        `address` when the user names one."""
        lock = self._locks.setdefault(view.id, asyncio.Lock())
        async with lock:
            old = self.routes.pop(view.id, None)
            if old is not None and old.tunnel is not None:
                _close_tunnel(old.tunnel)  # a fresh resolution builds its own tunnel
            route = await (self._given(view, address) if address else self._resolve(view))
            self.routes[view.id] = route
            self.node.route_to(view.id)
            return route

    async def route(self, view: MemberView) -> Route:
        """The remembered route if it still holds, else a fresh one."""
        return self.cached(view.id) or await self.resolve(view)

    async def _given(self, view: MemberView, address: str) -> Route:
        attempt = await self._probe(view, "address", address)
        if attempt.result != "ok":
            raise RouteError(view.name, [attempt])
        return Route(view.id, "address", address, [attempt], _reported(view))

    async def _resolve(self, view: MemberView) -> Route:
        """Race the methods, keep the preference order: the most preferred route that works
        wins, but a working one is not kept waiting more than GRACE_S for better ones that
        are still silent (a dropped SYN would otherwise cost the whole probe timeout), and SSH
        starts only when nothing direct answered within SSH_DELAY_S."""
        cfg = self.node.node_config
        race = _Race()
        for address in dial_order(_reported(view), local_networks()):
            race.start(self._attempt(view, self._probe(view, "reported", address)),
                       ("reported", address))
        for address in cfg.override_for(view.id, view.name):
            race.start(self._attempt(view, self._probe(view, "override", address)),
                       ("override", address))
        if self.node.transport.inbound_age(view.id) is not None:
            race.start(self._inbound(view), ("inbound", "(its own connection)"))
        hops = self.jump_hops(view)
        ssh_at = time.monotonic() + SSH_DELAY_S if hops else None
        while True:
            if ssh_at is not None and (time.monotonic() >= ssh_at or race.all_failed()):
                race.start(self._ssh(view, hops), ("ssh", str(hops[-1])), owns_tunnel=True)
                ssh_at = None
            winner = race.winner(GRACE_S)
            if winner is not None:
                return winner
            if race.all_failed() and ssh_at is None:
                raise RouteError(view.name, race.attempts())
            await race.wait(ssh_at)

    async def _attempt(self, view: MemberView, probe) -> _Outcome:
        attempt = await probe
        return _Outcome([attempt], self._route_if_ok(view, attempt))

    def _route_if_ok(self, view: MemberView, attempt: Attempt) -> Route | None:
        if attempt.result != "ok":
            return None
        return Route(view.id, attempt.method, attempt.address, [], _reported(view))

    async def _probe(self, view: MemberView, method: str, address: str) -> Attempt:
        start = time.monotonic()
        try:
            split_hostport(address, 0)
            address = _with_port(address, view)
        except ValueError as exc:
            return Attempt(method, address, f"bad address: {exc}", 0.0)
        result = await self.node.transport.probe(view.id, address, PROBE_TIMEOUT_S)
        seconds = time.monotonic() - start
        if result in ("wrong_identity", "handshake_failed"):
            result = await self._who_answered(view, address, result)
        return Attempt(method, address, result, seconds)

    async def _who_answered(self, view: MemberView, address: str, result: str) -> str:
        """Name the identity that answered where `view` was expected (the NAT incident).

        A CURVE handshake with the wrong server key just fails; whois (signed, same port
        over UDP) says who is really there."""
        answer = await whois.whois(address, timeout=1.0)
        if answer is None or answer.id == view.id:
            return f"{result}: no proof that {view.name} ({view.id[:12]}) is there"
        other = self.node.core.member(answer.id)
        who = f"{other.name} ({answer.id[:12]})" if other else answer.id[:12]
        return f"wrong identity: expected {view.name} ({view.id[:12]}), {who} answered"

    async def _inbound(self, view: MemberView) -> _Outcome:
        """The connection the member opened to us counts only if it answers a ping on it now:
        a connection can outlive the path under it, and its last message proves nothing."""
        seen = self.node.observed.get(view.id)
        where = seen.address if seen and seen.address else "(its own connection)"
        nonce = os.urandom(16)
        answered = asyncio.get_running_loop().create_future()
        self._pings[nonce] = (view.id, answered)
        start = time.monotonic()
        try:
            if not self.node.transport.send(view.id, PING, msgpack.packb({"n": nonce}),
                                            via="inbound"):
                result = "it has no connection to us"
            else:
                try:
                    async with asyncio.timeout(INBOUND_TIMEOUT_S):
                        await answered
                    result = "ok"
                except TimeoutError:
                    result = f"no answer on it within {INBOUND_TIMEOUT_S:g} s"
        finally:
            self._pings.pop(nonce, None)
        attempt = Attempt("inbound", where, result, time.monotonic() - start)
        return _Outcome([attempt], self._route_if_ok(view, attempt))

    def on_message(self, inbound: Inbound) -> None:
        """route_ping from a member: answer on the same connection; route_pong: match it."""
        env = inbound.envelope
        try:
            body = msgpack.unpackb(env.body, raw=False, max_bin_len=64, max_map_len=1)
            nonce = body["n"]
        except (ValueError, TypeError, KeyError, msgpack.UnpackException):
            self.node.drops.drop("malformed_route_ping")
            return
        if env.type == PING:
            if self.node.is_admitted_member(env.sender):
                inbound.reply(PONG, env.body)
            return
        waiting = self._pings.get(nonce) if isinstance(nonce, bytes) else None
        if waiting is not None and waiting[0] == env.sender and not waiting[1].done():
            waiting[1].set_result(True)

    # -- SSH jump chains ------------------------------------------------------------------

    def jump_hops(self, view: MemberView) -> list[sshkeys.Hop]:
        """The configured chain to `view`: `jumps` in config.toml, else ProxyJump from the
        SSH config for its name or any reported host. Hops that are members are verified
        against the host keys they published; others against known_hosts."""
        cfg = self.node.node_config
        texts = cfg.jumps_for(view.id, view.name)
        if texts:
            hops = [sshkeys.parse_hop(t, cfg.ssh.user) for t in texts]
        else:
            hops = []
            config = Path(cfg.ssh.config).expanduser()
            if not _mentions_proxy_jump(config):
                return []
            from net.ssh import proxy_jump  # paramiko: only when a ProxyJump may apply

            for host in [view.name, *(host_of(a) for a in _reported(view))]:
                hops = proxy_jump(host, config)
                if hops:
                    break
        return [self._pin(hop) for hop in hops]

    def _pin(self, hop: sshkeys.Hop) -> sshkeys.Hop:
        """A hop that is a member gets the member's published host keys as its only keys."""
        members = [member_view(self.node, m) for m in self.node.core.members()]
        keys = vouched_host_keys(hop.host, members)
        return dataclasses.replace(hop, fingerprints=keys) if keys else hop

    async def _ssh(self, view: MemberView, hops: list[sshkeys.Hop]) -> _Outcome:
        """Connect the jump chain, then tunnel to each address the member listens on (as seen
        from the last hop) until its identity answers through the tunnel."""
        attempts: list[Attempt] = []
        via = tuple(str(h) for h in hops)
        targets = [*dial_order(_reported(view), ()),
                   *self.node.node_config.override_for(view.id, view.name)]
        start = time.monotonic()
        try:
            chain = await asyncio.to_thread(self.connect_chain, hops)
        except sshkeys.SshError as exc:
            attempts.append(Attempt("ssh", via[-1], str(exc), time.monotonic() - start, via))
            return _Outcome(attempts, None)
        for target in targets:
            start = time.monotonic()
            host, port = split_hostport(_with_port(target, view), 0)
            try:
                forwarder = await asyncio.to_thread(chain.forward, host, port)
            except sshkeys.SshError as exc:
                attempts.append(Attempt("ssh", target, str(exc), time.monotonic() - start, via))
                continue
            result = await self.node.transport.probe(view.id, forwarder.address, PROBE_TIMEOUT_S)
            attempts.append(Attempt("ssh", target, result, time.monotonic() - start, via))
            if result == "ok":
                return _Outcome(attempts, Route(view.id, "ssh", forwarder.address, [],
                                                _reported(view), via=via,
                                                tunnel=(chain, forwarder)))
            forwarder.close()
        chain.close()
        return _Outcome(attempts, None)

    def connect_chain(self, hops: list[sshkeys.Hop]) -> Chain:
        from net.ssh import Chain  # paramiko loads only when a chain is needed

        ssh_cfg = self.node.node_config.ssh
        known = tuple(Path(p).expanduser() for p in ssh_cfg.known_hosts)
        return Chain.connect(hops, known_hosts=known, key_filename=ssh_cfg.identity_file,
                                 timeout=SSH_TIMEOUT_S)

    # -- background -----------------------------------------------------------------------

    async def maintain(self) -> None:
        """Give unreachable members with an override or jump chain a route, so gossip flows
        over it and they are not declared dead for want of a direct path."""
        while True:
            await asyncio.sleep(MAINTAIN_EVERY_S)
            for view in self.node.core.members():
                if view.id == self.node.id or view.state not in ("suspect", "dead"):
                    continue
                if self.cached(view.id) is not None or not self._configured(view):
                    continue
                with contextlib.suppress(RouteError):
                    await self.resolve(view)

    def _configured(self, view: MemberView) -> bool:
        cfg = self.node.node_config
        return bool(cfg.override_for(view.id, view.name) or cfg.jumps_for(view.id, view.name))


@dataclass
class _Outcome:
    """What one method found: its attempts, and the route when one worked."""

    attempts: list[Attempt]
    route: Route | None


class _Race:
    """Attempts running at once, ranked by the order they were started (the preference)."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Future[_Outcome]] = []
        self.labels: list[tuple[str, str, float]] = []  # method, address, start time
        self.owns_tunnel: set[int] = set()
        self.ok_since: dict[int, float] = {}

    def start(self, coro, label: tuple[str, str], owns_tunnel: bool = False) -> None:
        if owns_tunnel:
            self.owns_tunnel.add(len(self.tasks))
        self.labels.append((*label, time.monotonic()))
        self.tasks.append(asyncio.ensure_future(coro))

    def _ok(self, i: int) -> bool:
        task = self.tasks[i]
        return task.done() and not task.cancelled() and task.result().route is not None

    def all_failed(self) -> bool:
        return all(t.done() for t in self.tasks) and not any(
            self._ok(i) for i in range(len(self.tasks)))

    def winner(self, grace: float) -> Route | None:
        now = time.monotonic()
        for i in range(len(self.tasks)):
            if self._ok(i):
                self.ok_since.setdefault(i, now)
        best = next((i for i in range(len(self.tasks)) if self._ok(i)), None)
        if best is None:
            return None
        better_pending = any(not self.tasks[i].done() for i in range(best))
        if better_pending and now - self.ok_since[best] < grace:
            return None
        route = self.tasks[best].result().route
        assert route is not None
        route.attempts = self.attempts(upto=best)
        self._discard(best)
        return route

    def attempts(self, upto: int | None = None) -> list[Attempt]:
        """Attempts of every method up to `upto` (those still running say so)."""
        found: list[Attempt] = []
        tasks = self.tasks[: None if upto is None else upto + 1]
        for task, (method, address, started) in zip(tasks, self.labels, strict=False):
            if task.done() and not task.cancelled():
                found += task.result().attempts
            else:
                waited = time.monotonic() - started
                found.append(Attempt(method, address, "no answer yet; a later route won",
                                     waited))
        return found

    def _discard(self, keep: int) -> None:
        """Stop what is still running; tunnels that are not the winner are closed."""
        for i, task in enumerate(self.tasks):
            if i == keep:
                continue
            if i in self.owns_tunnel:
                task.add_done_callback(_close_unused)
            else:
                task.cancel()

    async def wait(self, until: float | None) -> None:
        pending = [t for t in self.tasks if not t.done()]
        timeout = GRACE_S / 3
        if until is not None:
            timeout = min(timeout, max(0.0, until - time.monotonic()))
        if pending:
            await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        else:
            await asyncio.sleep(timeout)


def _close_unused(task: asyncio.Future[_Outcome]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    route = task.result().route
    if route is not None and route.tunnel is not None:
        _close_tunnel(route.tunnel)


def published_host_keys(view: MemberView) -> list[str]:
    """The SSH host key fingerprints a member signed into its record."""
    if view.record is None:
        return []
    return str(view.record.facts_dict().get("ssh_keys", "")).split()


def _reported(view: MemberView) -> tuple[str, ...]:
    return view.record.addresses if view.record else ()


def _with_port(address: str, view: MemberView) -> str:
    """An override may omit the port: the member's listening port is the one it reports."""
    ports = [split_hostport(a, 0)[1] for a in _reported(view)]
    host, port = split_hostport(address, ports[0] if ports else cluster.DEFAULT_PORT)
    return join_hostport(host, port)


def _close_tunnel(tunnel: tuple[Any, Any]) -> None:
    chain, forwarder = tunnel
    forwarder.close()
    chain.close()


def _mentions_proxy_jump(config: Path) -> bool:
    """Whether the SSH config at `config` names a ProxyJump at all (keywords are
    case-insensitive). Without one there is nothing to parse: importing paramiko to find that
    out held the event loop up for a quarter of a second and kept 15 MiB for life."""
    try:
        return "proxyjump" in config.read_text(errors="replace").lower()
    except OSError:
        return False
