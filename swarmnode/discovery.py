"""Finding peers: mDNS on the LAN, seed addresses across networks, Tailscale peers.

Discovery only ever yields *candidate* (id, address) pairs. An address never becomes a
member's identity: it is tried with a CURVE connection that only the named id can complete,
and if that id is a member the address is just one more place to reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import TYPE_CHECKING

from net import tailscale, whois
from net.addresses import join_hostport, split_hostport
from swarmnode import cluster
from swarmnode.identity import is_node_id

if TYPE_CHECKING:
    from net.mdns import Sighting
    from swarmnode.node import Node

log = logging.getLogger(__name__)

#: Tailscale's peer list changes rarely; asking once a minute costs nothing.
TAILSCALE_EVERY_S = 60.0
#: Candidate ids remembered while not admitted, and addresses remembered per id: discovery
#: (mDNS above all) is unauthenticated, so a flood of made-up sightings must cost bounded
#: memory; a real link or seed list has a few dozen nodes with a few addresses each.
MAX_CANDIDATES = 64
MAX_CANDIDATE_ADDRESSES = 8


def parse_seed(text: str) -> tuple[str | None, str]:
    """`HOST:PORT` or `ID@HOST:PORT` -> (id or None, "host:port")."""
    node_id: str | None = None
    if "@" in text:
        node_id, text = text.split("@", 1)
        if not is_node_id(node_id):
            raise ValueError(f"seed {node_id}@{text}: {node_id!r} is not a node id")
    host, port = split_hostport(text, cluster.DEFAULT_PORT)
    return node_id, join_hostport(host, port)


class Discovery:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.seeds = [parse_seed(s) for s in node.opts.seeds]
        self.mdns = None

    async def start(self) -> list[asyncio.Future]:
        tasks = [asyncio.ensure_future(self._seed_loop())]
        if self.node.opts.mdns:
            # In the background: announcing takes zeroconf ~1.5 s of probing, which must not
            # delay the join handshake with contacts we already know (token, seeds).
            tasks.append(asyncio.ensure_future(self._start_mdns()))
        if self.node.opts.tailscale:
            tasks.append(asyncio.ensure_future(self._tailscale_loop()))
        return tasks

    async def close(self) -> None:
        if self.mdns is not None:
            with contextlib.suppress(Exception):
                await self.mdns.close()

    async def _start_mdns(self) -> None:
        from zeroconf import InterfaceChoice, NonUniqueNameException

        from net.mdns import Mdns

        node = self.node
        _, port = split_hostport(node.listen, cluster.DEFAULT_PORT)
        self.mdns = Mdns(
            node.id,
            port,
            node.addresses,
            self._on_sighting,
            name=node.name,
            cluster=node.cluster_id,
            interfaces=node.opts.mdns_interfaces or InterfaceChoice.All,
        )
        try:
            await self.mdns.start()
        except OSError as exc:  # no multicast-capable interface: discovery by seeds only
            log.warning("mDNS unavailable: %s", exc)
            self.mdns = None
        except NonUniqueNameException:
            # Another host announces this very id: a copied identity.key. Say so loudly.
            node.event("duplicate_identity", {"id": node.id, "seen_by": "mdns"})
            log.error("another host on the LAN announces this node's id: was identity.key "
                      "copied? mDNS is off for this node")
            self.mdns = None

    def _on_sighting(self, s: Sighting) -> None:
        if s.id == self.node.id:
            return
        if s.cluster and self.node.cluster_id and s.cluster != self.node.cluster_id:
            return  # another cluster on the same LAN
        for addr in s.addresses:
            self.candidate(s.id, addr, "mdns")

    def candidate(self, peer: str, addr: str, how: str) -> None:
        """An (id, address) pair worth trying: remember the address, then make contact.

        Bounded: once admitted only members' addresses are kept (a stranger says hello
        itself); before, at most MAX_CANDIDATES ids; each with MAX_CANDIDATE_ADDRESSES."""
        node = self.node
        view = node.core.member(peer) if node.admitted else None
        if node.admitted and (view is None or not view.admitted_by):
            node.drops.drop("candidate_not_member")
            return
        if not node.admitted and peer not in node.admission.contacts \
                and len(node.admission.contacts) >= MAX_CANDIDATES:
            node.drops.drop("candidate_full")
            return
        extra = node.observed_entry(peer).extra
        if addr not in extra and len(extra) >= MAX_CANDIDATE_ADDRESSES:
            node.drops.drop("candidate_addresses_full")
        else:
            extra.add(addr)
        if view is not None:
            # Only a member we lost touch with gets our state.
            if view.state in ("dead", "left"):
                node.core.join(self.node.clock(), [peer])
                node.flush()
        else:
            node.admission.contact(peer, how)

    async def _resolve(self, peer: str | None, addr: str, how: str) -> None:
        if peer is None:
            answer = await whois.whois(addr, timeout=1.0)
            if answer is None:
                return
            peer = answer.id
        if peer != self.node.id:
            self.candidate(peer, addr, how)

    def _needs_contact(self) -> bool:
        """Seeds matter until we are admitted and see at least one other live member."""
        if not self.node.admitted:
            return True
        return not any(m.id != self.node.id and m.state == "alive" and m.admitted_by
                       for m in self.node.core.members())

    async def _seed_loop(self) -> None:
        """Contact the seeds at start; again every half reconnect interval while we see no
        live member, and every reconnect interval regardless, so a partition heals."""
        step = self.node.config.reconnect_interval / 2
        since = math.inf
        while True:
            if self.seeds and (since >= 2 * step or self._needs_contact()):
                await asyncio.gather(*(self._resolve(p, a, "seed") for p, a in self.seeds))
                since = 0.0
            await asyncio.sleep(step)
            since += step

    async def _tailscale_loop(self) -> None:
        _, port = split_hostport(self.node.listen, cluster.DEFAULT_PORT)
        while True:
            status = await asyncio.to_thread(tailscale.query)
            if status is not None:
                peers = tailscale.seed_candidates(status, port)
                await asyncio.gather(*(self._resolve(None, a, "tailscale") for a in peers))
            await asyncio.sleep(TAILSCALE_EVERY_S)
