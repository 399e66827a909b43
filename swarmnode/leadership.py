"""The asyncio shell around the sans-I/O election: who schedules builds.

The core (swarmnode/election) decides terms, votes and leadership; this shell feeds it
election messages from admitted members and timer ticks, derives the voter set from the
membership view, makes every `Persist` durable (SQLite, synchronous=FULL) before sending what
follows it, and turns the core's events into cluster events (`leader_changed`, ...).

Voters are the longest-admitted alive members (at most 5, `choose_voters`), moved toward one
change at a time (`step_voters`) so that two voter sets in use rarely differ by more than one
member. Everyone else is an observer: it hears the leader's heartbeats and knows the leader.
The voter set is persisted and a restarted node keeps it until its view has settled.

Limit: voter changes are derived by each node from its own membership view, not agreed
through consensus; views that disagree for longer than VOTER_STEP_S (a partition that also
kills voters) can make two sets differ by more than one member. Committing voter changes
through the replicated job log is the fix that comes with the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from typing import TYPE_CHECKING, Any

from net.transport import Inbound
from swarmnode.election import (
    MESSAGE_TYPES,
    Config,
    Election,
    Event,
    MessageError,
    Persist,
    Persisted,
    Send,
    choose_voters,
    pack,
    step_voters,
    unpack,
)

if TYPE_CHECKING:
    from swarmnode.node import Node

log = logging.getLogger(__name__)

STORE_KEY = "election"
VOTERS_KEY = "voters"
#: A (re)started node leaves the voter set as it was for this long, while gossip and
#: push-pull fill in its view: a stale view must not shrink the set to itself.
SETTLE_S = 3.0
#: At most one voter change this often, longer than an election timeout, so every member
#: has moved to one set before the next change (two sets in use differ by one at most).
VOTER_STEP_S = 1.0
#: Longest the election loop sleeps: membership changes (a voter dying) are picked up at least
#: this often even when the core's next deadline is far away.
MAX_SLEEP_S = 0.2


class Leadership:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.started = node.clock()
        self._changed_at = -SETTLE_S
        voters = self._initial_voters()
        self.core = Election(node.id, voters, Config(), random.Random(os.urandom(8)),
                             node.clock(), self._load(), observers=())
        self._wake = asyncio.Event()

    def _load(self) -> Persisted | None:
        stored = self.node.store.get(STORE_KEY)
        if stored is None:
            return None
        try:
            return Persisted.from_plain(stored)
        except MessageError:
            log.warning("ignoring an unreadable stored election state: %r", stored)
            return None

    def _initial_voters(self) -> frozenset[str]:
        """The voter set this node last used (persisted), else only itself for a brand-new
        founder, else none: a fresh member observes until its view of the cluster settles,
        so it never counts itself a lone voter and elects itself beside a working leader."""
        stored = self.node.store.get(VOTERS_KEY)
        if isinstance(stored, list) and all(isinstance(v, str) for v in stored):
            return frozenset(stored)
        return frozenset({self.node.id}) if self.node.store.get("founder") else frozenset()

    # -- voters ---------------------------------------------------------------------------

    def target_voters(self) -> frozenset[str]:
        """Who should vote: the longest-admitted live members, keeping current voters that
        are merely unknown here (a restarted node's view is incomplete at first); a voter
        leaves only once membership says it is dead, has left or is banned."""
        current = self.core.voters
        live: list[tuple[str, float]] = []
        for m in self.node.core.members():
            if m.admitted_by is None or m.admitted_at is None:
                continue
            if m.state in ("alive", "suspect"):
                live.append((m.id, m.admitted_at))
        known = {m.id for m in self.node.core.members()}
        kept = [(v, -1.0) for v in current if v not in known]  # rank first: not ours to drop
        return choose_voters(live + kept)

    def refresh_voters(self) -> None:
        """Step the voter set toward the target, one change at a time and at most one per
        VOTER_STEP_S, only after this node's view had SETTLE_S to fill in; every other live
        admitted member observes."""
        now = self.node.clock()
        if not self.node.admitted or now - self.started < SETTLE_S:
            return
        voters = self.core.voters
        if now - self._changed_at >= VOTER_STEP_S:
            stepped = step_voters(voters, self.target_voters())
            if stepped and stepped != voters:
                voters = stepped
                self._changed_at = now
                self.node.store.put(**{VOTERS_KEY: sorted(voters)})
        observers = {m.id for m in self.node.core.members()
                     if m.admitted_by is not None and m.state in ("alive", "suspect")
                     and m.id not in voters}
        self.core.set_voters(now, voters, observers)
        self.flush()

    # -- I/O ------------------------------------------------------------------------------

    def handles(self, msg_type: str) -> bool:
        return msg_type in MESSAGE_TYPES

    def on_message(self, inbound: Inbound) -> None:
        env = inbound.envelope
        if not self.node.is_admitted_member(env.sender):
            self.node.drops.drop("not_member")
            return
        try:
            msg = unpack(env.type, env.body)
        except MessageError:
            self.node.drops.drop("malformed_election")
            return
        self.core.handle(self.node.clock(), env.sender, msg)
        self.flush()

    def flush(self) -> None:
        """Carry out the core's outputs in order: a Persist is on disk before any later Send."""
        for out in self.core.drain():
            if isinstance(out, Persist):
                self.node.store.put(**{STORE_KEY: Persisted(out.term, out.voted_for).to_plain()})
            elif isinstance(out, Send):
                msg_type, body = pack(out.msg)
                self.node.send_raw(out.to, msg_type, body)
            elif isinstance(out, Event):
                self._event(out)
        self._wake.set()

    def _event(self, ev: Event) -> None:
        data = dict(ev.data)
        if ev.kind == "leader_changed":
            leader = data.get("leader")
            self.node.event("leader_changed", {"id": leader, "term": data.get("term")})
        elif ev.kind in ("leader_elected", "stepped_down"):
            self.node.event(ev.kind, {"id": self.node.id, **data})

    async def run(self) -> None:
        """Tick the core at its deadlines; re-derive voters as membership changes."""
        while True:
            self.refresh_voters()
            self.core.tick(self.node.clock())
            self.flush()
            delay = min(max(self.core.next_deadline() - self.node.clock(), 0.0), MAX_SLEEP_S)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    # -- views ----------------------------------------------------------------------------

    @property
    def leader(self) -> str | None:
        return self.core.leader

    def status(self) -> dict[str, Any]:
        st = self.core.status(self.node.clock())
        return {"leader": st["leader"], "term": st["term"], "role": st["role"],
                "voters": st["voters"]}
