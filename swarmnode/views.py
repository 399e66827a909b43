"""How members are shown to people and scripts, and how a person names one."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from net.addresses import host_of
from swarmnode.control import ControlError
from swarmnode.portage.fingerprint import compare_facts

if TYPE_CHECKING:
    from swarmnode.membership import MemberView
    from swarmnode.node import Node


def member_cores(m: MemberView) -> int:
    """The cores a member offers (its signed `cores` fact; 0 without a record)."""
    return cores_fact(m.record.facts_dict()) if m.record else 0


def cores_fact(facts: Mapping[str, object]) -> int:
    """The `cores` of a member's facts; 0 for a fact that is not a positive number."""
    cores = facts.get("cores")
    return cores if type(cores) is int and cores > 0 else 0


def cores_online_total(members: Iterable[MemberView]) -> tuple[int, int]:
    """The cores of admitted members alive now, and of every admitted member not gone."""
    online = total = 0
    for m in members:
        if m.admitted_by and m.state not in ("left", "banned"):
            cores = member_cores(m)
            total += cores
            online += cores if m.state == "alive" else 0
    return online, total


def member_view(node: Node, m: MemberView) -> dict[str, Any]:
    """One `swarmnode nodes --json` entry. `addresses` are as the member reports them
    (signed); `observed` is only where this node saw its traffic come from.
    `portage_differs`: the Portage keys that differ from this node's ([] the same, None when
    either states no fingerprint)."""
    facts = m.record.facts_dict() if m.record else {}
    seen = node.observed.get(m.id)
    return {
        "id": m.id,
        "name": m.name,
        "state": m.state,
        "incarnation": m.incarnation,
        "addresses": list(m.record.addresses) if m.record else [],
        "observed": seen.address if seen else None,
        "nat": bool(seen and seen.nat),
        "cores": facts.get("cores"),
        "arch": facts.get("arch"),
        "os": facts.get("os"),
        "kind": facts.get("kind"),
        "version": facts.get("version"),
        "release": str(facts.get("rel.swarmnode", "")).partition("@")[0] or None,
        "ssh_keys": str(facts.get("ssh_keys", "")).split(),
        "roles": [r for r in str(facts.get("roles", "")).split(",") if r],
        "disk_low": bool(facts.get("disk_low")),  # it says its disk is nearly full: no jobs
        "portage_differs": compare_facts(node.core.record.facts_dict(), facts),
        "admitted_by": m.admitted_by,
        "leader": m.id == node.leadership.leader,
        "voter": m.id in node.leadership.core.voters,
        "self": m.id == node.id,
    }


def vouched_host_keys(host: str, members: Iterable[dict[str, Any]]) -> frozenset[str]:
    """SSH host key fingerprints the one admitted member named `host` (else the one reporting
    it as an address) signed into its record (`nodes` entries). Only that member vouches for
    its own machine: a member that claims another's name or address alongside it makes the
    host ambiguous and vouches for nothing (known_hosts decides), rather than adding its own
    key beside the real one. Pending and banned nodes never vouch."""
    admitted = [m for m in members
                if m.get("admitted_by") and m.get("state") not in ("pending", "banned")]
    named = [m for m in admitted if host == m.get("name")]
    at = named or [m for m in admitted
                   if host in {host_of(a) for a in m.get("addresses") or ()}]
    return frozenset(at[0].get("ssh_keys") or ()) if len(at) == 1 else frozenset()


def resolve_node(members: Iterable[MemberView], text: str) -> MemberView:
    """A member named by its name, its id, or a unique prefix of its id."""
    members = list(members)
    if not text:
        raise ControlError("name a node: its name, its id, or a unique id prefix")
    exact = [m for m in members if m.id == text or m.name == text]
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        raise ControlError(f"{text!r} names {len(exact)} nodes; use the id instead")
    prefixed = [m for m in members if m.id.startswith(text.lower())]
    if len(prefixed) == 1:
        return prefixed[0]
    if prefixed:
        ids = ", ".join(m.id[:16] for m in prefixed)
        raise ControlError(f"{text!r} is a prefix of several ids ({ids}); give more of it")
    raise ControlError(f"no node named {text!r}")
