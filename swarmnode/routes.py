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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from net import ssh, whois
from net.addresses import dial_order, join_hostport, local_networks, split_hostport
from swarmnode import cluster
from swarmnode.control import ControlError

if TYPE_CHECKING:
    from swarmnode.membership import MemberView
    from swarmnode.node import Node

log = logging.getLogger(__name__)

#: How long one address gets to complete a CURVE handshake. A LAN answers in milliseconds and
#: Tailscale in tens; two seconds also covers a first DERP-relayed packet.
PROBE_TIMEOUT_S = 2.0
#: A member's own inbound connection counts as a route while it has spoken on it this recently
#: (members gossip several times a second, so silence this long means the connection is gone).
INBOUND_FRESH_S = 10.0
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
        attempts: list[Attempt] = []
        reported = dial_order(_reported(view), local_networks())
        probes = await asyncio.gather(*(self._probe(view, "reported", a) for a in reported))
        attempts += probes
        for attempt in probes:
            if attempt.result == "ok":
                return Route(view.id, "reported", attempt.address, attempts, _reported(view))
        cfg = self.node.node_config
        for address in cfg.override_for(view.id, view.name):
            attempt = await self._probe(view, "override", address)
            attempts.append(attempt)
            if attempt.result == "ok":
                return Route(view.id, "override", address, attempts, _reported(view))
        inbound = self._inbound(view)
        if inbound is not None:
            attempts.append(inbound)
            if inbound.result == "ok":
                return Route(view.id, "inbound", inbound.address, attempts, _reported(view))
        route = await self._ssh(view, attempts)
        if route is not None:
            return route
        raise RouteError(view.name, attempts)

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

    def _inbound(self, view: MemberView) -> Attempt | None:
        age = self.node.transport.inbound_age(view.id)
        if age is None:
            return None
        seen = self.node.observed.get(view.id)
        where = seen.address if seen and seen.address else "(its own connection)"
        if view.state != "alive":  # its connection may linger after the path died
            result = f"not used: {view.name} is {view.state}"
        elif age > INBOUND_FRESH_S:
            result = f"stale: silent for {age:.0f} s"
        else:
            result = "ok"
        return Attempt("inbound", where, result, 0.0)

    # -- SSH jump chains ------------------------------------------------------------------

    def jump_hops(self, view: MemberView) -> list[ssh.Hop]:
        """The configured chain to `view`: `jumps` in config.toml, else ProxyJump from the
        SSH config for its name or any reported host. Hops that are members are verified
        against the host keys they published; others against known_hosts."""
        cfg = self.node.node_config
        texts = cfg.jumps_for(view.id, view.name)
        if texts:
            hops = [ssh.parse_hop(t, cfg.ssh.user) for t in texts]
        else:
            hops = []
            config = Path(cfg.ssh.config).expanduser()
            for host in [view.name, *(_host(a) for a in _reported(view))]:
                hops = ssh.proxy_jump(host, config)
                if hops:
                    break
        return [self._pin(hop) for hop in hops]

    def _pin(self, hop: ssh.Hop) -> ssh.Hop:
        """A hop that is a member gets the member's published host keys as its only keys."""
        for m in self.node.core.members():
            if m.record is None or m.state == "banned":
                continue
            if m.name == hop.host or any(_host(a) == hop.host for a in m.record.addresses):
                keys = published_host_keys(m)
                if keys:
                    return dataclasses.replace(hop, fingerprints=frozenset(keys))
        return hop

    async def _ssh(self, view: MemberView, attempts: list[Attempt]) -> Route | None:
        hops = self.jump_hops(view)
        if not hops:
            return None
        via = tuple(str(h) for h in hops)
        targets = [*dial_order(_reported(view), ()),
                   *self.node.node_config.override_for(view.id, view.name)]
        start = time.monotonic()
        try:
            chain = await asyncio.to_thread(self.connect_chain, hops)
        except ssh.SshError as exc:
            attempts.append(Attempt("ssh", via[-1], str(exc), time.monotonic() - start, via))
            return None
        for target in targets:
            start = time.monotonic()
            host, port = split_hostport(_with_port(target, view), 0)
            try:
                forwarder = await asyncio.to_thread(chain.forward, host, port)
            except ssh.SshError as exc:
                attempts.append(Attempt("ssh", target, str(exc), time.monotonic() - start, via))
                continue
            result = await self.node.transport.probe(view.id, forwarder.address, PROBE_TIMEOUT_S)
            attempts.append(Attempt("ssh", target, result, time.monotonic() - start, via))
            if result == "ok":
                return Route(view.id, "ssh", forwarder.address, attempts, _reported(view),
                             via=via, tunnel=(chain, forwarder))
            forwarder.close()
        chain.close()
        return None

    def connect_chain(self, hops: list[ssh.Hop]) -> ssh.Chain:
        ssh_cfg = self.node.node_config.ssh
        known = tuple(Path(p).expanduser() for p in ssh_cfg.known_hosts)
        return ssh.Chain.connect(hops, known_hosts=known, key_filename=ssh_cfg.identity_file,
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


def published_host_keys(view: MemberView) -> list[str]:
    """The SSH host key fingerprints a member signed into its record."""
    if view.record is None:
        return []
    return str(view.record.facts_dict().get("ssh_keys", "")).split()


def _reported(view: MemberView) -> tuple[str, ...]:
    return view.record.addresses if view.record else ()


def _host(address: str) -> str:
    try:
        return split_hostport(address, 1)[0]
    except ValueError:
        return address


def _with_port(address: str, view: MemberView) -> str:
    """An override may omit the port: the member's listening port is the one it reports."""
    ports = [split_hostport(a, 0)[1] for a in _reported(view)]
    host, port = split_hostport(address, ports[0] if ports else cluster.DEFAULT_PORT)
    return join_hostport(host, port)


def _close_tunnel(tunnel: tuple[Any, Any]) -> None:
    chain, forwarder = tunnel
    forwarder.close()
    chain.close()
