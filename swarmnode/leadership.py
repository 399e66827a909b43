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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from net.transport import Inbound
from swarmnode.election import (
    MESSAGE_TYPES,
    Config,
    Election,
    Event,
    MessageError,
    Send,
    choose_voters,
    pack,
    step_voters,
    unpack,
)
from swarmnode.election.core import Apply, Restore
from swarmnode.ledger import JobLedger, LedgerEvent, LogStore

LEDGER_DB = "ledger.db"
#: Applied entries between snapshots of the ledger (the log is cut back to the snapshot).
COMPACT_EVERY = 2_000

if TYPE_CHECKING:
    from swarmnode.node import Node

log = logging.getLogger(__name__)

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


class NotLeader(RuntimeError):
    """This node does not lead; `leader` is the one it knows of (or None)."""

    def __init__(self, leader: str | None) -> None:
        super().__init__(f"not the leader (leader: {leader})")
        self.leader = leader


class Leadership:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.started = node.clock()
        self._changed_at = -SETTLE_S
        self.log_store = LogStore(node.home / LEDGER_DB)
        stored = self.log_store.load()
        self.ledger = JobLedger.restore(stored.snapshot.data) if stored.snapshot else JobLedger()
        self.core = Election(node.id, self._initial_voters(), Config(),
                             random.Random(os.urandom(8)), node.clock(), stored.persisted,
                             observers=(), log=stored.entries, snapshot=stored.snapshot)
        self._wake = asyncio.Event()
        self._waiting: dict[int, tuple[int, asyncio.Future[bool]]] = {}  # index -> term, fut
        self.on_applied: list[Callable[[LedgerEvent], None]] = []

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
        """Who should vote: the operator's set when one is committed (`swarmnode voters
        --set`), else the longest-admitted live members, keeping current voters that are
        merely unknown here (a restarted node's view is incomplete at first); a voter leaves
        only once membership says it is dead, has left or is banned."""
        current = self.core.voters
        pinned = self.ledger.pinned_voters
        if pinned:  # the operator chose (committed in the ledger): only banned/left drop out
            gone = {m.id for m in self.node.core.members() if m.state in ("banned", "left")}
            return frozenset(pinned) - gone
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
        """Carry out the core's outputs: everything to persist goes to disk in one transaction
        first, then sends, applies and events in order."""
        outputs = self.core.drain()
        self.log_store.persist(outputs)
        for out in outputs:
            if isinstance(out, Send):
                msg_type, body = pack(out.msg)
                self.node.send_raw(out.to, msg_type, body)
            elif isinstance(out, Apply):
                self._apply(out)
            elif isinstance(out, Restore):
                self.ledger = JobLedger.restore(out.snapshot.data)
            elif isinstance(out, Event):
                self._event(out)
        self._wake.set()

    _flush_soon = False

    def _deferred_flush(self) -> None:
        self._flush_soon = False
        self.flush()

    def _apply(self, out: Apply) -> None:
        for ev in self.ledger.apply(out.index, out.entry):
            for callback in self.on_applied:
                callback(ev)
        waiting = self._waiting.pop(out.index, None)
        if waiting is not None and not waiting[1].done():
            waiting[1].set_result(waiting[0] == out.term)
        if self.ledger.applied % COMPACT_EVERY == 0 and self.core.compact(
                self.ledger.applied, self.ledger.snapshot()):
            self._wake.set()

    async def propose(self, entry: bytes, timeout: float = 5.0) -> bool:
        """Propose a ledger entry as leader and wait until it is committed in this term (True)
        or lost to another leader's entry at that index (False). NotLeader when this node does
        not lead (the caller forwards to `leader`)."""
        index = self.core.propose(self.node.clock(), entry)
        if index is None:
            raise NotLeader(self.leader)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._waiting[index] = (self.core.term, fut)
        if not self._flush_soon:  # proposals made in the same turn share one fsync
            self._flush_soon = True
            loop.call_soon(self._deferred_flush)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            return False
        finally:
            self._waiting.pop(index, None)

    def _event(self, ev: Event) -> None:
        data = dict(ev.data)
        if ev.kind == "leader_changed":
            leader = data.get("leader")
            self.node.event("leader_changed", {"id": leader, "term": data.get("term")})
        elif ev.kind in ("leader_elected", "stepped_down"):
            self.node.event(ev.kind, {"id": self.node.id, **data})

    async def run(self) -> None:
        """Tick the core at its deadlines; re-derive voters as membership changes."""
        refreshed = -MAX_SLEEP_S
        while True:
            if self.node.clock() - refreshed >= MAX_SLEEP_S:  # not on every message's wake
                refreshed = self.node.clock()
                self.refresh_voters()
            self.core.tick(self.node.clock())
            self.flush()
            delay = min(max(self.core.next_deadline() - self.node.clock(), 0.0), MAX_SLEEP_S)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    def close(self) -> None:
        self.log_store.close()

    # -- views ----------------------------------------------------------------------------

    @property
    def leader(self) -> str | None:
        return self.core.leader

    def status(self) -> dict[str, Any]:
        st = self.core.status(self.node.clock())
        return {"leader": st["leader"], "term": st["term"], "role": st["role"],
                "voters": st["voters"]}
