"""The network picture the dashboard draws: members grouped by the network they report, the
SSH jump hosts this node goes through, and an edge for each way this node reaches a member --
straight to an address, along a jump chain, or only over the connection the member keeps to
us from behind NAT. Worked out here (not in the page) so that what the picture claims is
tested against real routes in the network lab.
"""

from __future__ import annotations

import ipaddress
import itertools
from typing import Any

from net.addresses import is_tailscale, split_hostport

#: Routes (`routes.Route.method`, and "direct": the address a connection was made to) drawn
#: as a straight edge; "ssh" is drawn through its jump hosts, "inbound" (only the member's own
#: connection to us: it is behind NAT or a firewall) as an edge from the member.
DIRECT_METHODS = frozenset({"reported", "override", "address", "direct"})


def network_of(addresses: list[str]) -> str:
    """The network a member's first reported address is in: loopback, the Tailscale range, a
    private /24 (IPv4) or /64 (IPv6) -- a VLAN, as home labs number them -- or the internet."""
    if not addresses:
        return "unknown"
    try:
        ip = ipaddress.ip_address(split_hostport(addresses[0], 0)[0])
    except ValueError:
        return "unknown"
    if ip.is_loopback:
        return "loopback"
    if is_tailscale(str(ip)):
        return "tailscale"
    if ip.is_private:
        return str(ipaddress.ip_network(f"{ip}/{24 if ip.version == 4 else 64}", strict=False))
    return "internet"


def picture(self_id: str, nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """`nodes`: member views with `network` and `path` ({"how", "via"}). The networks (this
    node's first) with their members, the jump hosts ("jump:" + user@host:port) in the order
    first used, and the edges (deduplicated: chains through the same jump hosts share hops)."""
    networks: dict[str, list[str]] = {}
    for n in sorted(nodes, key=lambda n: n["id"] != self_id):
        networks.setdefault(n["network"], []).append(n["id"])
    jumps: dict[str, None] = {}
    edges: dict[tuple[str, str], dict[str, str]] = {}
    for n in nodes:
        how, via = n["path"]["how"], n["path"].get("via", [])
        if n["id"] == self_id or how == "none":
            continue
        if how == "inbound":
            edges[(n["id"], self_id)] = {"from": n["id"], "to": self_id, "kind": "inbound"}
            continue
        kind = "ssh" if via or how == "ssh" else "direct" if how in DIRECT_METHODS else how
        hops = [self_id, *(f"jump:{h}" for h in via), n["id"]]
        jumps.update((h, None) for h in hops[1:-1])
        for a, b in itertools.pairwise(hops):
            edges.setdefault((a, b), {"from": a, "to": b, "kind": kind})
    return {"networks": [{"name": k, "members": v} for k, v in networks.items()],
            "jumps": list(jumps), "edges": list(edges.values())}
