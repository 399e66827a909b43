"""The admission handshake: the only exchange a non-member can have with the cluster.

A node with a join token sends `join` (token + its self-signed record) to a member; an operator
verifies the token statelessly (signed by an operator, this cluster, not expired) and admits
it. A member that is not an operator refuses, naming the token's issuer, and the newcomer's
knocks on its other contacts (the issuer's addresses are in the token) go on. A node without
one sends `hello` and is listed as `pending` until an operator runs `swarmnode admit`;
it gets nothing but its status back — no members, no work, no code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import msgpack

from net.addresses import split_hostport
from net.transport import Inbound
from swarmnode import token as tokens
from swarmnode.membership.messages import (
    MAX_HOW,
    MessageError,
    record_from_plain,
    record_to_plain,
)
from swarmnode.push.release import OPERATE

if TYPE_CHECKING:
    from swarmnode.node import Node

log = logging.getLogger(__name__)

HELLO, HELLO_REPLY, JOIN, JOIN_REPLY = "hello", "hello_reply", "join", "join_reply"
TYPES = frozenset({HELLO, HELLO_REPLY, JOIN, JOIN_REPLY})
#: A guest is answered at most this often; the handshake is cheap but not free (a signature
#: check and a write to the event log), so a flood from one key is cut short.
MIN_GUEST_INTERVAL_S = 0.5
MAX_BODY = 16 * 1024
#: Guests remembered for rate limiting and for telling them of their admission; the oldest
#: are forgotten first, so a flood of new keys costs bounded memory.
MAX_GUESTS = 4096


class Admission:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.contacts: dict[str, str] = {}  # id -> how found, while we are not admitted
        self._last_seen: OrderedDict[str, float] = OrderedDict()
        self.status: str = "member" if node.admitted else "outside"
        self.refused: str | None = None
        if node.join_token is not None and not node.admitted:
            tok = node.join_token
            for addr in tok.addresses:
                node.observed_entry(tok.issuer).extra.add(addr)
            self.contacts[tok.issuer] = "token"

    def handles(self, msg_type: str) -> bool:
        return msg_type in TYPES

    def contact(self, peer: str, how: str) -> None:
        self.contacts.setdefault(peer, how)

    def new_token(self, ttl: int) -> str:
        node = self.node
        node.rights.operator("issue join tokens")
        made = tokens.issue(node.identity, node.cluster_id, node.cluster_name, node.addresses,
                            ttl, int(time.time()))
        return made.encode()

    # -- the outsider's side ------------------------------------------------------------

    async def run(self) -> None:
        """While not admitted, knock on every known contact's door periodically."""
        while True:
            if not self.node.admitted:
                self._knock()
            await asyncio.sleep(self.node.config.probe_interval)

    def _knock(self) -> None:
        node = self.node
        record = record_to_plain(node.core.record)
        kind = HELLO if node.join_token is None else JOIN
        for peer, how in list(self.contacts.items()):
            body: dict[str, Any] = {"record": record, "via": how}
            if node.join_token is not None:
                body["token"] = node.join_token.encode()
            node.route_to(peer)
            node.transport.send(peer, kind, _pack(body))

    def _on_reply(self, inbound: Inbound, body: dict[str, Any]) -> None:
        node = self.node
        status = body.get("status")
        peer = inbound.sender
        if status == "refused":
            reason = str(body.get("error", "refused"))[:300]
            if self.refused != reason:
                self.refused = reason
                node.event("join_refused", {"by": peer, "error": reason})
            return
        cluster_id, cluster_name = body.get("cluster_id"), body.get("cluster_name")
        if not isinstance(cluster_id, str) or not isinstance(cluster_name, str):
            node.drops.drop("malformed_body")
            return
        if status == "pending":
            if self.status != "pending":
                self.status = "pending"
                node.event("awaiting_admission", {"cluster": cluster_name, "asked": peer})
            return
        if status != "member" or node.admitted:
            return
        if node.cluster_id and node.cluster_id != cluster_id:
            node.drops.drop("other_cluster")
            return
        self.status = "member"
        node.store.put(cluster_id=cluster_id, cluster_name=cluster_name, admitted=True)
        node.event("joined", {"cluster": cluster_name, "via": peer,
                              "how": self.contacts.get(peer, "?")})
        node.core.join(node.clock(), [peer])
        node.flush()

    # -- the member's side --------------------------------------------------------------

    def on_admitted(self, peer: str) -> None:
        """A guest that knocked on our door was admitted (by anyone): tell it at once, so it
        starts answering members' probes instead of waiting for its next knock."""
        node = self.node
        if peer in self._last_seen and node.admitted:
            body = {"status": "member", "cluster_id": node.cluster_id,
                    "cluster_name": node.cluster_name}
            node.transport.send(peer, HELLO_REPLY, _pack(body))

    def on_message(self, inbound: Inbound) -> None:
        node = self.node
        env = inbound.envelope
        try:
            if len(env.body) > MAX_BODY:
                raise ValueError("oversized")
            body = msgpack.unpackb(env.body, raw=False, max_str_len=MAX_BODY,
                                   max_bin_len=MAX_BODY, max_array_len=64, max_map_len=16)
            if not isinstance(body, dict):
                raise ValueError("not a map")
        except (ValueError, TypeError, msgpack.UnpackException):
            node.drops.drop("malformed_body")
            return
        if env.type in (HELLO_REPLY, JOIN_REPLY):
            if inbound.sender in self.contacts:
                self._on_reply(inbound, body)
            else:
                node.drops.drop("unsolicited_reply")
            return
        if not node.admitted:
            node.drops.drop("not_admitted")
            return
        now = node.clock()
        last = self._last_seen.get(env.sender, -1e9)
        if now - last < MIN_GUEST_INTERVAL_S:
            node.drops.drop("guest_rate")
            return
        self._last_seen[env.sender] = now
        self._last_seen.move_to_end(env.sender)
        while len(self._last_seen) > MAX_GUESTS:
            self._last_seen.popitem(last=False)
        reply = self._answer(inbound, body, now)
        inbound.reply(JOIN_REPLY if env.type == JOIN else HELLO_REPLY, _pack(reply))
        node.flush()

    def _answer(self, inbound: Inbound, body: dict[str, Any], now: float) -> dict[str, Any]:
        node = self.node
        sender = inbound.sender
        base = {"cluster_id": node.cluster_id, "cluster_name": node.cluster_name}
        view = node.core.member(sender)
        if view is not None and view.state == "banned":
            return {"status": "refused", "error": "this node is banned from the cluster"}
        if view is not None and view.admitted_by is not None:
            node.observe(sender, inbound.observed)
            return {"status": "member", **base}
        try:
            record = record_from_plain(body.get("record"))
        except MessageError:
            node.drops.drop("malformed_record")
            return {"status": "refused", "error": "malformed record"}
        if record.id != sender:
            node.drops.drop("record_not_sender")
            return {"status": "refused", "error": "the record is not the sender's"}
        via = body.get("via")
        found = f", found us by {via}" if isinstance(via, str) and via.isidentifier() else ""
        how = f"{inbound.envelope.type} from {inbound.observed or '?'}{found}"[:MAX_HOW]
        if inbound.envelope.type == HELLO:
            if not node.core.hello(now, sender, record, how=how,
                                   source=_source_host(inbound.observed)):
                # Told "pending" only when listed: a guest from an address that already has
                # its share of the pending list learns it is not, and keeps knocking.
                return {"status": "refused",
                        "error": "not listed: too many pending guests from your address"}
            node.observe(sender, inbound.observed)
            return {"status": "pending", **base}
        try:
            tok = tokens.parse(str(body.get("token", "")))
            tokens.verify(tok, now=int(time.time()), cluster_id=node.cluster_id,
                          is_member=node.is_admitted_member)
        except tokens.TokenError as exc:
            node.drops.drop("bad_token")
            return {"status": "refused", "error": f"join token refused: {exc}"}
        ops = node.rights.holders(OPERATE)
        if node.id not in ops:  # members would not count our admission: send it on
            return {"status": "refused", "error": "this member is not an operator and cannot "
                    f"admit: ask an operator, e.g. the token's issuer {tok.issuer}"}
        if tok.issuer not in ops:
            node.drops.drop("bad_token")
            return {"status": "refused", "error": f"join token refused: it was issued by "
                    f"{tok.issuer}, which is not an operator"}
        node.core.admit(now, sender, how=f"token of {tok.issuer[:8]}, {how}"[:MAX_HOW])
        node.core.hello(now, sender, record, how=how, source=_source_host(inbound.observed))
        node.observe(sender, inbound.observed)
        return {"status": "member", **base}


def _source_host(observed: str | None) -> str:
    """The host a hello came from (its port changes with every connection), "" if unknown."""
    if not observed:
        return ""
    try:
        return split_hostport(observed, any_port=True)[0]
    except ValueError:
        return observed

def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)
