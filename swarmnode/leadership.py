"""The asyncio shell around the sans-I/O Raft core: who schedules builds, and the ledger.

The core (swarmnode/election) decides terms, votes, leadership and what is committed; this
shell feeds it messages from admitted members and timer ticks, writes every `Persist*` output
to SQLite (ledger.db, one transaction per drain) before carrying out anything after it, and
applies committed entries to the job ledger (swarmnode/ledger).

Voters are a committed configuration (`Voters` ledger entries). Only the leader changes it,
toward an odd number (up to five) of the longest-admitted live members or the operator's
choice, one member at a time, each change committed before the next: a node cut off from the
majority cannot commit a smaller set for itself, so it can never elect itself beside the
working leader (the partition lab test found exactly that with per-node voter sets). Everyone
else is an observer: it receives the log and knows the leader. The price is Raft's: with one of
two voters gone nothing new is accepted until it returns (an odd voter count avoids the case
for two-node clusters: one of the two votes).
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
from swarmnode.alarm import Alarm
from swarmnode.election import (
    LEADER,
    MESSAGE_TYPES,
    AppendEntries,
    Config,
    Election,
    Event,
    LogEntry,
    MessageError,
    Persist,
    PersistEntries,
    PersistSnapshot,
    Send,
    pack,
    step_voters,
    target_voters,
    unpack,
)
from swarmnode.election.core import Apply, Restore
from swarmnode.ledger import (
    JobLedger,
    LedgerError,
    LedgerEvent,
    LogStore,
    Stored,
    Voters,
    decode,
    encode,
)

LEDGER_DB = "ledger.db"
HERE = ("alive", "suspect")
"""Member states of one that is in reach (a suspect may yet refute)."""
#: Applied entries between snapshots of the ledger (the log is cut back to the snapshot but
#: for a tail: `Config.compact_keep_entries`).
COMPACT_EVERY = 2_000

#: An observer that held a job within this long gets entries and commits as they come (the
#: core's `pushed`), not batched: its assignments, cancels and the build's end reach it at
#: once, also between two builds a few seconds apart. (No empty heartbeats: its worker asks
#: the leader before starting an assignment that did not arrive in steady contact,
#: worker.OUT_OF_TOUCH_S, which costs a round trip per job, not ten messages a second.)
ENGAGED_LINGER_S = 10.0

if TYPE_CHECKING:
    from swarmnode.node import Node

log = logging.getLogger(__name__)

#: Longest the election loop sleeps: membership changes (a voter dying) are picked up at least
#: this often even when the core's next deadline is far away.
MAX_SLEEP_S = 0.2


def _voters_in(entry: LogEntry) -> frozenset[str] | None:
    """The voter set a `Voters` entry names; None for any other entry."""
    if entry.data:
        with contextlib.suppress(LedgerError):
            cmd = decode(entry.data)
            if isinstance(cmd, Voters):
                return frozenset(cmd.voters)
    return None


def _latest_config(ledger: JobLedger, stored: Stored) -> tuple[int, frozenset[str]] | None:
    """The last `Voters` entry in the stored log, else the snapshot's configuration."""
    for entry in reversed(stored.entries):
        voters = _voters_in(entry)
        if voters is not None:
            return entry.index, voters
    if ledger.voters and stored.snapshot is not None:
        return stored.snapshot.index, frozenset(ledger.voters)
    return None


def _early_appends(outputs: list[Any]) -> list[Send]:
    """The leader's AppendEntries that may be sent before this drain's writes (see `flush`)."""
    if not any(isinstance(o, PersistEntries) for o in outputs) or any(
            isinstance(o, Persist | PersistSnapshot | Apply | Restore) for o in outputs):
        return []
    return [o for o in outputs if isinstance(o, Send) and isinstance(o.msg, AppendEntries)]


class _Signatures:
    """Votes are signed with the node's identity key; a vote counts only from an admitted
    member that is not banned: a pending guest's key costs nothing to make, and a banned
    voter's key may have been stolen (that is why it was banned)."""

    def __init__(self, node: Node) -> None:
        self._node = node

    def sign(self, data: bytes) -> bytes:
        return self._node.identity.sign(data)

    def verify(self, signer: str, data: bytes, sig: bytes) -> bool:
        return self._node.is_admitted_member(signer) and \
            self._node.identity.verify(signer, data, sig)


class NotLeader(RuntimeError):
    """This node does not lead; `leader` is the one it knows of (or None)."""

    def __init__(self, leader: str | None) -> None:
        super().__init__(f"not the leader (leader: {leader})")
        self.leader = leader


class Leadership:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.log_store = LogStore(node.home / LEDGER_DB)
        stored = self.log_store.load()
        self.ledger = JobLedger.restore(stored.snapshot.data) if stored.snapshot else JobLedger()
        # The configuration in force is the latest `Voters` entry in the log, as in Raft: a
        # restarted node knows it before it learns what is committed (falling back to "the
        # founder alone" then made a restarted founder elect itself beside the new leader).
        self._config: tuple[int, frozenset[str]] | None = _latest_config(self.ledger, stored)
        # ...and at run time the latest applied; a newer one appended but not yet applied is
        # still a reference for leader proofs (`Election.newest_voters`).
        self._newest = self._config
        # Voters and the founder from the start: a proof of leadership that arrives before the
        # first refresh is checked against them, never against nothing.
        self.core = Election(node.id, self.committed_voters(), Config(),
                             random.Random(os.urandom(8)), node.clock(), stored.persisted,
                             observers=(), log=stored.entries, snapshot=stored.snapshot,
                             signatures=_Signatures(node), root=self._founder())
        self._alarm = Alarm()
        self._waiting: dict[int, tuple[int, asyncio.Future[bool]]] = {}  # index -> term, fut
        self.on_applied: list[Callable[[LedgerEvent], None]] = []
        # whoever acts on a new leader (or on losing one) at once, rather than polling for it
        self.on_leader: list[Callable[[str | None], None]] = []
        # Entries applied before this replica first caught up -- with everything it held on
        # disk at start -- are the past: a restart's replay, a new member's catch-up. Who
        # counts or announces what the ledger does (the time series, notifications) looks at
        # `applying_live` in its `on_applied` callback and skips those.
        self._replay_until = stored.last_index
        self.live_from: int | None = None
        self.applying_live = False
        self._changing = False  # a voter change is on its way through the log
        self._down: dict[str, float] = {}  # member -> when it was last seen going out of reach
        self._change_task: asyncio.Future[None] | None = None
        self._engaged: dict[str, float] = {}  # member -> until when it is heartbeated (leader)

    # -- voters ---------------------------------------------------------------------------

    def _founder(self) -> str | None:
        """The cluster's founder, if this node has heard of it (the cluster id names it)."""
        return next((m.id for m in self.node.core.members() if self.node.is_founder(m.id)), None)

    def committed_voters(self) -> frozenset[str]:
        """The voter configuration in force: the latest `Voters` entry in the log; before any
        was ever written, the founder alone (it writes the first) and nobody else: a new
        member observes until the log tells it who votes, so it never counts itself a lone
        voter."""
        if self._config is not None:
            return self._config[1]
        # no configuration was ever written: the founder is the only possible voter
        return frozenset({self.node.id}) if self.node.store.get("founder") else frozenset()

    def target_voters(self) -> frozenset[str]:
        """Who should vote, as the leader sees it: the operator's set when one is committed
        (`swarmnode voters --set`); else `voters.target_voters`: an odd number (at most
        five; two members have one voter, so an even split never leaves both halves without
        a majority), a voter replaced only after STABILIZE_S out of reach."""
        members = self.node.core.members()
        pinned = self.ledger.pinned_voters
        if pinned:  # the operator chose: only banned or departed members drop out (and ids
            # that name no admitted member: a voter that can never answer would wedge it)
            return frozenset(m.id for m in members if m.id in pinned and m.admitted_by
                             is not None and m.state not in ("banned", "left"))
        now = self.node.clock()
        eligible = [(m.id, m.admitted_at, m.state in HERE) for m in members
                    if m.admitted_by is not None and m.admitted_at is not None
                    and m.state not in ("banned", "left")]
        for node_id, _at, alive in eligible:  # since when each has been out of reach
            if alive:
                self._down.pop(node_id, None)
            else:
                self._down.setdefault(node_id, now)
        down_for = {node_id: now - since for node_id, since in self._down.items()}
        return target_voters(self.committed_voters(), eligible, down_for)

    def refresh_voters(self) -> None:
        """Use the committed configuration; every other live admitted member observes. The
        leader, while it may schedule, moves the configuration toward the target one member
        at a time through the log (each change committed before the next is proposed)."""
        now = self.node.clock()
        voters = self.committed_voters()
        members = self.node.core.members()
        observers = {m.id for m in members
                     if m.admitted_by is not None and m.state in HERE
                     and m.id not in voters}
        if self.core.root is None:  # whose lone leadership a node without voters believes
            self.core.root = self._founder()
        leader = self.core.leader
        if leader is not None and leader != self.node.id:
            view = self.node.core.member(leader)
            if view is None or view.state not in HERE:
                self.core.leader_gone(now, leader)  # (an observer keeps it until then)
        self.core.set_voters(now, voters, observers)
        self.flush()
        if self.node.admitted and not self._changing and self.core.can_schedule(now):
            state = {m.id: m.state for m in members}
            away = (frozenset(v for v in voters if state.get(v) not in (*HERE, "left")),
                    frozenset(v for v in voters if state.get(v) == "left"))
            stepped = step_voters(voters, self.target_voters(), self._ready, away)
            if stepped and (stepped != voters or not self.ledger.voters):
                self._changing = True
                self._change_task = asyncio.ensure_future(self._change(stepped))

    def _ready(self, member: str) -> bool:
        """May `member` become a voter now: it is us, or its log holds the commit (asked again
        at the next refresh while it catches up)."""
        return member == self.node.id or self.core.holds_commit(member)

    async def _change(self, voters: frozenset[str]) -> None:
        committed = False
        try:
            with contextlib.suppress(NotLeader):
                committed = await self.propose(encode(Voters(tuple(sorted(voters)))))
        finally:
            self._changing = False
        if committed:  # the next step at once: an even-sized set in between is fragile
            self.refresh_voters()

    # -- I/O ------------------------------------------------------------------------------

    def handles(self, msg_type: str) -> bool:
        return msg_type in MESSAGE_TYPES

    def on_message(self, inbound: Inbound) -> None:
        env = inbound.envelope
        try:
            msg = unpack(env.type, env.body)
        except MessageError:
            self.node.drops.drop("malformed_election")
            return
        self.core.handle(self.node.clock(), env.sender, msg)
        self.flush()

    def flush(self) -> None:
        """Carry out the core's outputs: everything to persist goes to disk in one transaction
        first, then sends, applies and events in order. One exception, Raft's "the leader
        writes in parallel with replication": when the only writes are the leader's new
        entries (nothing applied, no term, vote or snapshot), its AppendEntries leave before
        the fsync. That is safe because the leader counts its own copy toward a majority only
        when it handles a reply, in a later turn, after this flush has written it; a drain that
        commits (single voter) or changes term or vote keeps the strict order."""
        outputs = self.core.drain()
        early = _early_appends(outputs)
        for out in early:
            msg_type, body = pack(out.msg)
            self.node.send_raw(out.to, msg_type, body)
        self.log_store.persist(outputs)
        sent = {id(out) for out in early}
        for out in outputs:
            if isinstance(out, Send):
                if id(out) in sent:
                    continue
                msg_type, body = pack(out.msg)
                self.node.send_raw(out.to, msg_type, body)
            elif isinstance(out, Apply):
                self._apply(out)
            elif isinstance(out, Restore):
                self.ledger = JobLedger.restore(out.snapshot.data)
                if self.ledger.voters:
                    self._config = (out.snapshot.index, frozenset(self.ledger.voters))
                    self._tell_newest()
                for callback in self.on_applied:  # (whoever waits for the ledger to change)
                    callback(LedgerEvent("restored", {"index": out.snapshot.index}))
            elif isinstance(out, Event):
                self._event(out)
            elif isinstance(out, PersistEntries):
                self._note_entries(out)
        if (self.live_from is None and self.caught_up
                and self.ledger.applied >= self._replay_until):
            self.live_from = self.ledger.applied
        if any(isinstance(out, Apply | Restore) for out in outputs):
            self._push_engaged()
        self._alarm.sooner(self.core.next_deadline())

    def _note_entries(self, out: PersistEntries) -> None:
        """Follow the newest configuration in the log through appends and truncations."""
        if self._newest is not None and self._newest[0] >= out.start:
            self._newest = None  # truncated: the applied configuration is the newest again
        for entry in out.entries:
            voters = _voters_in(entry)
            if voters is not None:
                self._newest = (entry.index, voters)
        self._tell_newest()

    def _tell_newest(self) -> None:
        newest, config = self._newest, self._config
        ahead = newest is not None and (config is None or newest[0] > config[0])
        self.core.newest_voters = newest[1] if newest is not None and ahead else frozenset()

    def _push_engaged(self) -> None:
        """As leader, heartbeat the observers holding a job (or that held one within
        ENGAGED_LINGER_S) like voters; the core keepalives the rest."""
        if self.core.role != LEADER:
            if self._engaged:
                self._engaged.clear()
            return
        now = self.node.clock()
        for node in self.ledger.busy_nodes():
            self._engaged[node] = now + ENGAGED_LINGER_S
        for node in [n for n, until in self._engaged.items() if until <= now]:
            del self._engaged[node]
        if self._engaged.keys() & self.core.observers != self.core.pushed:
            self.core.set_voters(now, self.core.voters, None, self._engaged.keys())

    _flush_soon = False

    def _deferred_flush(self) -> None:
        self._flush_soon = False
        self.flush()

    def _apply(self, out: Apply) -> None:
        self.applying_live = self.live_from is not None and out.index > self.live_from
        for ev in self.ledger.apply(out.index, out.entry):
            if ev.kind == "voters_changed" and (self._config is None
                                                or out.index >= self._config[0]):
                self._config = (out.index, frozenset(ev.data["voters"]))
                self._tell_newest()
            for callback in self.on_applied:
                callback(ev)
        waiting = self._waiting.pop(out.index, None)
        if waiting is not None and not waiting[1].done():
            waiting[1].set_result(waiting[0] == out.term)
        if self.ledger.applied % COMPACT_EVERY == 0 and self.core.compact(
                self.ledger.applied, self.ledger.snapshot()):
            self._alarm.ring()

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
            for callback in self.on_leader:
                callback(leader)
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
            self._push_engaged()
            self.flush()
            now = self.node.clock()
            await self._alarm.sleep(now, min(self.core.next_deadline(), now + MAX_SLEEP_S))

    def close(self) -> None:
        self.log_store.close()

    # -- views ----------------------------------------------------------------------------

    @property
    def leader(self) -> str | None:
        return self.core.leader

    @property
    def caught_up(self) -> bool:
        """A leader is known and this replica has applied all it knows committed: the ledger
        here names every unfinished build (not so while a restarted node replays or catches
        up, when a build missing here may still be running)."""
        return self.core.leader is not None and self.ledger.applied >= self.core.leader_commit

    def status(self) -> dict[str, Any]:
        st = self.core.status(self.node.clock())
        return {"leader": st["leader"], "term": st["term"], "role": st["role"],
                "voters": st["voters"],
                # what the ledger holds in memory (finished builds leave it: `forget`)
                "ledger": {"applied": self.ledger.applied, **self.ledger.size()},
                # what the election core refused and why (drop_not_voter, unproven_leader...)
                "election_counters": dict(sorted(self.core.counters.items()))}
