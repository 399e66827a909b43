"""Deterministic discrete-event simulator for the Raft core, with a safety checker.

It drives real `Election` instances exactly as the node shell does -- `handle` for each
delivered message, `tick` when `next_deadline` is due, `drain` after each, writing every
`Persist*` to the node's "disk" before transmitting or applying what follows it -- over a
virtual clock and a seeded RNG, with per-message latency (so reordering), loss, duplication,
partitions, crashes and restarts. A restarted node gets back only its disk (term, vote, log,
snapshot). Same seed, same run.

Each node runs a tiny state machine: a running digest over the applied entries (its snapshot is
the digest followed by the applied bytes, so snapshots are big enough to need several chunks).
`LedgerSim` (swarmnode/ledger/sim.py) subclasses this with the job ledger through the hooks
`_on_start`, `_on_apply`, `_on_restore`, `_sm_snapshot`, `_sm_load` and `_deliver_app`.

After every step the acting node is checked against the safety invariants, and violations are
recorded (not raised) so a test can also show that a broken variant is caught:

- election safety: two leaders ever seen in one term is a violation, even if they never led at
  the same instant;
- lease safety: two live nodes never hold a valid leader lease at the same virtual instant;
- log matching: no two entries ever written to any disk have the same (index, term) but
  different data or a different previous term (by induction: equal logs up to that index);
- state machine safety: every node applies indexes in order without gaps, and every `Apply` of
  an index carries the same (term, entry) as every other node's, forever: each node's applied
  sequence is a prefix of one history, and so is every snapshot (checked by digest);
- leader completeness: a newly elected leader's log holds every entry applied anywhere so far;
- durability: after every step the core's log ends where its disk ends (nothing the core relies
  on is missing from the disk);
- proven leadership: every leader a node holds a checked proof for (`proven_terms`) really led
  that term (`unelected_proven_leader`), all nodes agree on it (`two_proven_leaders`), the
  leader a node follows led its term (`follows_unelected`), and no node's term passes the
  highest term an honest node campaigned in (`term_inflated`: no forged counter moved it);
- nothing committed that a leader did not propose: the first application of every index must
  be the entry the leader of its term appended to its own log (`unproposed_commit`).

`byzantine=k` adds admitted members "x0".. (observers in every honest view, with real keys)
run by `Byzantine` actors (election/byzantine.py) instead of a core: at random times they
send every honest node forged leader proofs, leader messages, voter-only messages and replies
at the current, next and maximum term and proof-request floods, built from what they hear as
observers (real votes to replay included); they reach every node whatever the partition.

`random_run` is one randomized fault schedule with a stream of proposals, followed by a stable
period with a liveness check (a leader followed by all, every node caught up; with Byzantine
members lying throughout);
`python -m swarmnode.election.sim --runs 2000` runs many and prints a summary.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from swarmnode.simclock import EventClock

from .byzantine import Byzantine
from .config import Config
from .core import (
    CANDIDATE,
    LEADER,
    Apply,
    Election,
    Event,
    Persist,
    Persisted,
    PersistEntries,
    PersistSnapshot,
    Restore,
    Send,
)
from .log import LogEntry, Snapshot
from .messages import (
    MESSAGE_CLASSES,
    MessageError,
    pack,
    unpack,
)
from .proof import KeyRing

Latency = tuple[float, float]

_DELIVER = 0
_TICK = 1
_CALL = 2
_INF = math.inf
_ELECTION_TYPES = MESSAGE_CLASSES
DIGEST0 = bytes(16)


def chain(digest: bytes, term: int, entry: bytes) -> bytes:
    """The digest of a history extended by one applied entry."""
    h = hashlib.blake2b(digest, digest_size=16)
    h.update(term.to_bytes(8, "big"))
    h.update(entry)
    return h.digest()


@dataclass(slots=True)
class Disk:
    """What a node persisted; all a restart gets back."""

    hard: Persisted | None = None
    snapshot: Snapshot | None = None
    entries: list[LogEntry] = field(default_factory=list)

    @property
    def snapshot_index(self) -> int:
        return self.snapshot.index if self.snapshot else 0

    @property
    def first_index(self) -> int:
        """The first stored entry's index (the snapshot's tail may come before its index)."""
        return self.entries[0].index if self.entries else self.snapshot_index + 1

    @property
    def last_index(self) -> int:
        return self.entries[-1].index if self.entries else self.snapshot_index

    def term_at(self, index: int) -> int | None:
        if self.snapshot and index == self.snapshot.index:
            return self.snapshot.term
        if index == 0:
            return 0
        first = self.first_index
        if first <= index <= self.last_index:
            return self.entries[index - first].term
        return None


@dataclass(slots=True)
class SimNode:
    id: str
    rng: random.Random
    election: Election | None = None
    up: bool = True
    tick_at: float = _INF
    disk: Disk = field(default_factory=Disk)
    lease_until: float = -_INF
    """The node's lease expiry after its last step (exact between its steps)."""
    applied: int = 0
    digest: bytes = DIGEST0
    applied_data: list[bytes] = field(default_factory=list)
    """The applied entries (the tiny state machine; a snapshot carries them)."""
    epoch: int = 0
    """Grows at every start: timers set by an earlier life of the node never fire."""
    app: Any = None
    """The subclass's per-node state (the ledger and friends)."""


@dataclass(slots=True)
class Violation:
    time: float
    kind: str
    detail: str


class ElectionSim(EventClock):
    """`voters` voting nodes "v0".. and `observers` non-voting nodes "o0".., started at time 0.
    `snapshot_every`: each node compacts its log whenever that many entries were applied since
    its last snapshot (None: never)."""

    def __init__(
        self,
        voters: int,
        observers: int = 0,
        config: Config | None = None,
        seed: int = 0,
        loss: float = 0.0,
        latency: Latency = (0.0005, 0.005),
        duplicate: float = 0.0,
        *,
        codec: bool = False,
        record_events: bool = False,
        factory: Callable[..., Election] = Election,
        snapshot_every: int | None = None,
        byzantine: int = 0,
        attack_rate: float = 10.0,
    ) -> None:
        self.config = config or Config()
        self.factory = factory
        """Builds each node's state machine: tests pass deliberately broken variants to show
        the checker catches them."""
        self.rng = random.Random(seed)
        self.loss = loss
        self.latency = latency
        self.duplicate = duplicate
        self.codec = codec
        self.record_events = record_events
        self.snapshot_every = snapshot_every
        super().__init__()
        self.keys = KeyRing()
        """Every node's real Ed25519 key (votes and leader proofs are checked as in a node)."""
        self.voter_ids = frozenset(f"v{i}" for i in range(voters))
        self.observer_ids = frozenset(f"o{i}" for i in range(observers))
        self.byzantine_ids = frozenset(f"x{i}" for i in range(byzantine))
        """Admitted members run by `Byzantine` actors: observers in every honest view."""
        attack_rng = random.Random(seed ^ 0xB1A5)  # apart from self.rng: same honest schedule
        self.attackers = {
            id_: Byzantine(id_, self.keys.for_node(id_), random.Random(attack_rng.getrandbits(64)))
            for id_ in sorted(self.byzantine_ids)
        }
        self.attack_rate = attack_rate
        """Volleys per second per attacker, each to every honest node."""
        self.nodes: dict[str, SimNode] = {}
        self.leaders: dict[int, set[str]] = {}
        """term -> every node that ever led in it (the election safety record)."""
        self.committed: list[tuple[int, bytes, bytes]] = [(0, b"", DIGEST0)]
        """index -> (term, entry, digest after it), as first applied anywhere: the one history."""
        self.proposals: dict[tuple[str, int], tuple[int, bytes]] = {}
        """(proposer, index) -> (term, entry) of every proposal a leader took."""
        self.written: dict[tuple[int, int], tuple[bytes, int | None]] = {}
        """(index, term) -> (entry, previous entry's term) of every entry ever written."""
        self.authored: dict[tuple[int, int], bytes] = {}
        """(index, term) -> entry, as the leader of that term appended it to its own log."""
        self.proven: dict[int, str] = {}
        """term -> the leader some node first held a checked proof for."""
        self.election_term = 0
        """The highest term any honest node campaigned (or led) in: no term may exceed it."""
        self._reported: set[tuple[str, str]] = set()
        self.violations: list[Violation] = []
        self.events: list[tuple[float, str, Event]] = []
        self.event_counts: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self._group: dict[str, int] = {}
        self._cut: set[frozenset[str]] = set()
        for id_ in sorted(self.voter_ids) + sorted(self.observer_ids):
            node = SimNode(id_, random.Random(self.rng.getrandbits(64)))
            self.nodes[id_] = node
            self._start(node)
        for attacker in self.attackers.values():
            self._schedule_volley(attacker)

    # ------------------------------------------------------------------ perturbations

    def crash(self, id_: str) -> None:
        """kill -9: the process and everything in memory are gone; the disk stays."""
        node = self.nodes[id_]
        node.up = False
        node.election = None
        node.tick_at = _INF
        node.lease_until = -_INF
        node.app = None
        self.stats["crashes"] += 1

    def restart(self, id_: str, *, keep_disk: bool = True) -> None:
        """Start a crashed node again from its disk (`keep_disk=False`: from nothing)."""
        node = self.nodes[id_]
        assert not node.up, f"{id_} is running"
        if not keep_disk:
            node.disk = Disk()
        node.up = True
        self.stats["restarts"] += 1
        self._start(node)

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Nodes in different groups cannot talk; unlisted nodes form one more group."""
        self._group = {id_: gi for gi, g in enumerate(groups) for id_ in g}

    def cut(self, a: str, b: str) -> None:
        """Break the link between a and b only (both ways): partitions that are not groups,
        e.g. a follower that still hears the leader while another voter does not."""
        self._cut.add(frozenset((a, b)))

    def heal(self) -> None:
        """Remove every partition and cut link."""
        self._group = {}
        self._cut.clear()

    def set_voters(
        self,
        voters: Iterable[str],
        observers: Iterable[str] | None = None,
        at: Iterable[str] | None = None,
    ) -> None:
        """Give running nodes (all, or those in `at`) a new voter set; restarts use the newest."""
        self.voter_ids = frozenset(voters)
        if observers is not None:
            self.observer_ids = frozenset(observers) - self.voter_ids
        targets = list(at) if at is not None else list(self.nodes)
        for id_ in targets:
            node = self.nodes[id_]
            if node.up and node.election is not None:
                node.election.set_voters(self.now, self.voter_ids, self.seen_observers)
                self._flush(node)

    # ------------------------------------------------------------------ client side

    def propose(self, id_: str, entry: bytes | dict[str, Any]) -> int | None:
        """Propose at node `id_` (as its shell would on a client request)."""
        node = self.nodes[id_]
        if not node.up or node.election is None:
            return None
        el = node.election
        index = el.propose(self.now, entry)
        if index is not None:
            data = el.log.entry(index).data
            self.proposals[(id_, index)] = (el.term, data)
            self.stats["proposed"] += 1
        self._flush(node)
        return index

    def call_at(self, t: float, id_: str, fn: Callable[[], None]) -> None:
        """Run `fn` at virtual time `t` in node `id_`'s current life (dropped if it crashes)."""
        self._push(t, _CALL, id_, "", (self.nodes[id_].epoch, fn))

    def at(self, t: float, fn: Callable[[], None]) -> None:
        """Run `fn` at virtual time `t`, outside any node (a client, a test's action)."""
        self._push(t, _CALL, "", "", (0, fn))

    def send_app(self, src: str, dst: str, msg: Any) -> None:
        """Send a non-election message (a forwarded request, an assignment, a report) over
        the same lossy, partitioned network."""
        self._transmit(src, dst, msg)

    @property
    def seen_observers(self) -> frozenset[str]:
        """The observers in every honest node's view: the Byzantine members are admitted."""
        return self.observer_ids | self.byzantine_ids

    # ------------------------------------------------------------------ the Byzantine members

    def _schedule_volley(self, attacker: Byzantine) -> None:
        self.at(self.now + attacker.rng.expovariate(self.attack_rate),
                lambda: self._volley(attacker))

    def _volley(self, attacker: Byzantine) -> None:
        """One round of lies from `attacker` to every honest node (a fifth of the time the
        subclass's own, `_forge_app`), then the next round at a random time."""
        for victim in sorted(self.nodes):
            app = self._forge_app(attacker, victim) if attacker.rng.random() < 0.2 else []
            for msg in app or attacker.forgeries(victim):
                self._transmit(attacker.id, victim, msg)
        self.stats["volleys"] += 1
        self._schedule_volley(attacker)

    def _forge_app(self, attacker: Byzantine, victim: str) -> list[Any]:
        """Lies in the subclass's own messages (LedgerSim: assignments, cancellations,
        reports); none here."""
        return []

    # ------------------------------------------------------------------ running

    def run_until_pred(
        self, pred: Callable[[Any], bool], timeout: float, step: float = 0.01
    ) -> bool:
        """Run until `pred(self)` holds (checked every `step`), or `timeout` seconds pass."""
        return super().run_until_pred(pred, timeout, step)

    def _start(self, node: SimNode) -> None:
        node.epoch += 1
        disk = node.disk
        node.election = self.factory(
            node.id,
            self.voter_ids,
            self.config,
            node.rng,
            self.now,
            disk.hard,
            observers=self.seen_observers,
            log=list(disk.entries),
            snapshot=disk.snapshot,
            signatures=self.keys.for_node(node.id),
        )
        node.tick_at = _INF
        node.applied, node.digest, node.applied_data = 0, DIGEST0, []
        self._on_start(node)
        if disk.snapshot is not None:
            self._load_snapshot(node, disk.snapshot)
        self._flush(node)

    def _step(self) -> None:
        t, _, kind, to, src, msg = self._pop()
        if not to:
            msg[1]()
            return
        if kind == _DELIVER and type(msg) is tuple:
            try:
                msg = unpack(*msg)
            except MessageError:  # as the shell does: dropped and counted
                self.stats["undecodable"] += 1
                return
        attacker = self.attackers.get(to)
        if attacker is not None:
            attacker.receive(src, msg)
            return
        node = self.nodes[to]
        el = node.election
        if not node.up or el is None:
            self.stats["dropped_down"] += 1
            return
        if kind == _DELIVER:
            self.stats["delivered"] += 1
            if type(msg) in _ELECTION_TYPES:
                el.handle(t, src, msg)
            else:
                self._deliver_app(node, src, msg)
        elif kind == _CALL:
            epoch, fn = msg
            if epoch != node.epoch:
                return
            fn()
        else:
            if node.tick_at != t:
                return  # superseded by an earlier deadline
            node.tick_at = _INF
            el.tick(t)
            self.stats["ticks"] += 1
        self._flush(node, after_tick=kind == _TICK)

    def _flush(self, node: SimNode, after_tick: bool = False) -> None:
        el = node.election
        assert el is not None
        out = el.drain()
        while out:
            for o in out:
                self._carry_out(node, o)
            out = self._maybe_compact(node, el)
        self._check(node, el)
        nd = el.next_deadline()
        if nd <= self.now and after_tick:
            # A tick that leaves its own deadline due would spin forever: a core bug.
            self._violate("stalled_tick", f"{node.id} at {nd}")
            nd = self.now + 1e-6
        nd = max(nd, self.now)
        if nd < node.tick_at:
            node.tick_at = nd
            self._push(nd, _TICK, node.id, "", None)

    def _carry_out(self, node: SimNode, o: Any) -> None:
        kind = type(o)
        if kind is Send:
            self._transmit(node.id, o.to, o.msg)
        elif kind is Persist:
            node.disk.hard = Persisted(o.term, o.voted_for, o.leader)  # durable before what follows
            self.stats["persists"] += 1
        elif kind is PersistEntries:
            self._write_entries(node, o)
        elif kind is PersistSnapshot:
            self._write_snapshot(node, o)
        elif kind is Apply:
            self._apply(node, o)
        elif kind is Restore:
            self._restore(node, o.snapshot)
        else:
            self._observe(node, o)

    def _maybe_compact(self, node: SimNode, el: Election) -> list[Any]:
        every = self.snapshot_every
        if every is None or node.applied - node.disk.snapshot_index < every:
            return []
        if el.compact(node.applied, self._snapshot_data(node)):
            self.stats["compactions"] += 1
        return el.drain()

    def linked(self, a: str, b: str) -> bool:
        """Whether the network carries messages between a and b (their processes may be down).
        A Byzantine member reaches everyone, whatever the partition: the strongest attacker."""
        if self.byzantine_ids and (a in self.byzantine_ids or b in self.byzantine_ids):
            return True
        if self._group and self._group.get(a, -1) != self._group.get(b, -1):
            return False
        return not (self._cut and frozenset((a, b)) in self._cut)

    def _transmit(self, src: str, dst: str, msg: Any) -> None:
        self.stats["sent"] += 1
        if not self.linked(src, dst):
            self.stats["partitioned"] += 1
            return
        copies = 2 if self.duplicate and self.rng.random() < self.duplicate else 1
        wire: Any = pack(msg) if self.codec and type(msg) in _ELECTION_TYPES else msg
        for _ in range(copies):
            if self.loss and self.rng.random() < self.loss:
                self.stats["lost"] += 1
                continue
            self._push(self.now + self.rng.uniform(*self.latency), _DELIVER, dst, src, wire)

    def _observe(self, node: SimNode, ev: Event) -> None:
        self.event_counts[ev.kind] += 1
        if self.record_events:
            self.events.append((self.now, node.id, ev))
        if ev.kind == "leader_elected":
            self._check_leader_complete(node)

    # ------------------------------------------------------------------ the disk

    def _write_entries(self, node: SimNode, o: PersistEntries) -> None:
        disk, el = node.disk, node.election
        assert el is not None
        leads = el.role == LEADER
        self.stats["entry_writes"] += 1
        if not disk.snapshot_index < o.start <= disk.last_index + 1:
            self._violate(
                "bad_write", f"{node.id} writes from {o.start}, disk ends {disk.last_index}"
            )
            return
        del disk.entries[o.start - disk.first_index :]
        for e in o.entries:
            if e.index != disk.last_index + 1:
                self._violate("bad_write", f"{node.id}: entry {e.index} after {disk.last_index}")
                return
            prev_term = disk.term_at(e.index - 1)
            key = (e.index, e.term)
            if leads and e.term == el.term:
                self.authored.setdefault(key, e.data)
            seen = self.written.setdefault(key, (e.data, prev_term))
            if seen != (e.data, prev_term):
                self._violate("log_matching", f"{node.id}: entry {key} differs from another's")
            disk.entries.append(e)

    def _write_snapshot(self, node: SimNode, o: PersistSnapshot) -> None:
        disk, snap = node.disk, o.snapshot
        if snap.index <= disk.snapshot_index:
            self._violate("bad_snapshot", f"{node.id}: snapshot {snap.index} goes backwards")
            return
        self._check_snapshot(node, snap)
        keep_from = min(o.keep_from, snap.index + 1)
        keep = [e for e in disk.entries if e.index >= keep_from]
        if keep and keep[0].index != keep_from:
            keep = []  # not contiguous with the snapshot: the core truncates it next
        disk.snapshot = snap
        disk.entries = keep

    # ------------------------------------------------------------------ the state machine

    def _apply(self, node: SimNode, o: Apply) -> None:
        if o.index != node.applied + 1:
            self._violate("apply_gap", f"{node.id}: applied {node.applied}, then {o.index}")
            return
        digest = chain(node.digest, o.term, o.entry)
        history = self.committed
        if o.index < len(history):
            if history[o.index] != (o.term, o.entry, digest):
                self._violate("state_machine_safety", f"{node.id}: entry {o.index} differs")
        elif o.index == len(history):
            history.append((o.term, o.entry, digest))
            if self.authored.get((o.index, o.term)) != o.entry:
                self._violate("unproposed_commit", f"{node.id}: entry {o.index} term {o.term}")
        else:
            self._violate("apply_gap", f"{node.id}: entry {o.index} beyond every history")
        node.applied, node.digest = o.index, digest
        self.stats["applied"] += 1
        if self.proposals.pop((node.id, o.index), None) == (o.term, o.entry):
            self.stats["accepted"] += 1  # its own leader applied it: the client is told
        self._on_apply(node, o)

    def _restore(self, node: SimNode, snap: Snapshot) -> None:
        self._check_snapshot(node, snap)
        self._load_snapshot(node, snap)
        self.stats["restores"] += 1
        self._on_restore(node, snap)

    def _snapshot_data(self, node: SimNode) -> bytes:
        """A snapshot is the digest of the history it stands for (so the checker can compare
        it with every other node's), then the state machine's own snapshot."""
        return node.digest + self._sm_snapshot(node)

    def _load_snapshot(self, node: SimNode, snap: Snapshot) -> None:
        node.applied, node.digest = snap.index, snap.data[:16]
        self._sm_load(node, snap.data[16:])

    def _check_snapshot(self, node: SimNode, snap: Snapshot) -> None:
        history = self.committed
        if snap.index >= len(history):
            self._violate("snapshot_beyond_commit", f"{node.id}: snapshot {snap.index}")
        elif history[snap.index][0] != snap.term or history[snap.index][2] != snap.data[:16]:
            self._violate("state_machine_safety", f"{node.id}: snapshot {snap.index} differs")

    # ------------------------------------------------------------------ hooks (LedgerSim)

    def _on_start(self, node: SimNode) -> None:
        """A node (re)started from its disk (its state machine loaded from the snapshot)."""

    def _on_apply(self, node: SimNode, o: Apply) -> None:
        """A node applied a committed entry to its state machine."""
        node.applied_data.append(o.entry)

    def _sm_snapshot(self, node: SimNode) -> bytes:
        """The state machine's snapshot: every applied entry, length-prefixed (so snapshots
        are big enough to travel in several chunks)."""
        return b"".join(len(d).to_bytes(4, "big") + d for d in node.applied_data)

    def _sm_load(self, node: SimNode, data: bytes) -> None:
        """Replace the state machine by a snapshot (`_sm_snapshot`'s bytes)."""
        pos, items = 0, []
        while pos < len(data):
            n = int.from_bytes(data[pos : pos + 4], "big")
            items.append(data[pos + 4 : pos + 4 + n])
            pos += 4 + n
        node.applied_data = items

    def _on_restore(self, node: SimNode, snap: Snapshot) -> None:
        """A node replaced its state machine by a snapshot from the leader."""

    def _deliver_app(self, node: SimNode, src: str, msg: Any) -> None:
        self.stats["app_message_ignored"] += 1

    # ------------------------------------------------------------------ invariants

    def _check(self, node: SimNode, el: Election) -> None:
        """The safety assertions, run after every step of `node`."""
        if el.role == LEADER:
            seen = self.leaders.setdefault(el.term, set())
            if node.id not in seen:
                seen.add(node.id)
                if len(seen) > 1:
                    self._violate("two_leaders", f"term {el.term}: {sorted(seen)}")
            node.lease_until = lease = el.lease_expiry()
            if lease > self.now:
                for other in self.nodes.values():
                    if other is not node and other.up and other.lease_until > self.now:
                        self._violate("two_leases", f"{node.id} and {other.id}")
        else:
            node.lease_until = -_INF
        if el.role in (CANDIDATE, LEADER) and el.term > self.election_term:
            self.election_term = el.term
        self._check_proven(node, el)
        log, disk = el.log, node.disk
        snap = disk.snapshot
        last = disk.entries[-1] if disk.entries else snap
        on_disk = (last.index, last.term) if last else (0, 0)
        if (log.last_index, log.last_term) != on_disk or not (
            disk.first_index - 1 <= log.base_index <= disk.snapshot_index
        ):
            self._violate("not_durable", f"{node.id}: log and disk differ")

    def _check_proven(self, node: SimNode, el: Election) -> None:
        """Leadership is proven, not claimed: every leader this node holds a proof for really
        led that term (so never a Byzantine member), one per term across all nodes; the
        leader it follows is one; its term never passes the highest an honest node campaigned
        in (no forged counter moved it)."""
        leaders = self.leaders
        for term, leader in el.proven_terms.items():
            if leader not in leaders.get(term, ()):
                self._violate_once("unelected_proven_leader", f"{node.id}: {leader} in {term}")
            if self.proven.setdefault(term, leader) != leader:
                self._violate_once("two_proven_leaders",
                                   f"term {term}: {self.proven[term]} and {leader}")
        lead = el.leader
        if lead is not None and lead not in leaders.get(el.term, ()):
            self._violate_once("follows_unelected", f"{node.id}: {lead} in {el.term}")
        if el.term > self.election_term:
            self._violate_once("term_inflated", f"{node.id}: term {el.term}")

    def _check_leader_complete(self, node: SimNode) -> None:
        el = node.election
        assert el is not None
        log = el.log
        history = self.committed
        for i in range(max(1, log.base_index), len(history)):
            if log.term_at(i) != history[i][0]:
                self._violate("leader_incomplete", f"{node.id} (term {el.term}) lacks entry {i}")
                return

    def _violate(self, kind: str, detail: str) -> None:
        self.violations.append(Violation(self.now, kind, detail))

    def _violate_once(self, kind: str, detail: str) -> None:
        """A violation that would otherwise repeat at every step of the node holding it."""
        if (kind, detail) not in self._reported:
            self._reported.add((kind, detail))
            self._violate(kind, detail)

    # ------------------------------------------------------------------ queries

    def election(self, id_: str) -> Election:
        el = self.nodes[id_].election
        assert el is not None, f"{id_} is down"
        return el

    def up_ids(self) -> list[str]:
        return [i for i, n in self.nodes.items() if n.up]

    def current_leaders(self) -> list[str]:
        """Running nodes that consider themselves leader (any term)."""
        return [i for i in self.up_ids() if self.election(i).role == LEADER]

    def stable_leader(self, ids: Iterable[str] | None = None) -> str | None:
        """The leader every running node in `ids` (default: all) follows, if it leads them with a
        valid lease; else None."""
        group = list(ids) if ids is not None else self.up_ids()
        if not group:
            return None
        lead = self.election(group[0]).leader
        if lead is None or lead not in group or not self.nodes[lead].up:
            return None
        if not self.election(lead).leader_lease_valid(self.now):
            return None
        term = self.election(lead).term
        ok = all(self.election(i).leader == lead and self.election(i).term == term for i in group)
        return lead if ok else None

    def caught_up(self, ids: Iterable[str] | None = None) -> str | None:
        """A stable leader that can schedule, with every node in `ids` having applied all it
        committed; else None."""
        lead = self.stable_leader(ids)
        if lead is None or not self.election(lead).can_schedule(self.now):
            return None
        commit = self.election(lead).commit_index
        group = list(ids) if ids is not None else self.up_ids()
        return lead if all(self.nodes[i].applied >= commit for i in group) else None

    def max_term(self) -> int:
        return max((self.election(i).term for i in self.up_ids()), default=0)


# ---------------------------------------------------------------------------------------------
# Randomized runs


@dataclass(slots=True)
class RunResult:
    seed: int
    voters: int
    observers: int
    faults: list[str] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    recovered_after: float | None = None
    """Seconds from the end of the faults to a leader followed by all with a valid lease and
    every node caught up with its commit index."""
    max_term: int = 0
    messages: int = 0
    proposed: int = 0
    accepted: int = 0
    """Proposals their own leader applied: committed, so they must survive everything."""
    committed: int = 0
    snapshots: int = 0


def liveness_bound(config: Config) -> float:
    """How long a healed, loss-free cluster may take to agree on a leader: restarted voters
    refuse to vote for one minimum timeout, a stale leader needs up to check_quorum_timeout to
    step down, then each pre-vote/vote round takes one election timeout; allow eight rounds so
    that repeated split votes still pass (and a voter with a stale log cannot win)."""
    cfg = config
    return cfg.election_timeout_min + cfg.check_quorum_timeout + 8 * cfg.election_timeout_max


def random_run(
    seed: int,
    config: Config | None = None,
    fault_time: float = 3.0,
    max_voters: int = 7,
    *,
    factory: Callable[..., Election] = Election,
    keep_disk: bool = True,
    proposals: float = 20.0,
    byzantine: int = 0,
) -> RunResult:
    """One random cluster (1..max_voters voters, 0..2 observers) under a random fault schedule
    (crashes, restarts, partitions, loss, duplication, slow links) for `fault_time` virtual
    seconds, with `proposals` per second at whichever nodes lead, and random compaction; then
    healed with no loss until a leader is agreed and everyone caught up (or the liveness bound
    passes). `keep_disk=False` restarts nodes without their disk: a broken shell, to show that
    the checker notices. `byzantine` Byzantine members lie throughout, recovery included."""
    cfg = with_random_tail(config or Config(), seed)
    rng = random.Random(seed)
    n_voters = rng.randint(1, max_voters)
    n_obs = rng.choice((0, 0, 1, 2))
    if rng.random() < 0.5:
        cfg = replace(cfg, snapshot_chunk_bytes=rng.choice((64, 512)))
    sim = ElectionSim(
        n_voters,
        n_obs,
        cfg,
        seed=rng.getrandbits(32),
        **random_links(rng),
        codec=seed % 8 == 0,
        factory=factory,
        snapshot_every=rng.choice((None, 3, 10, 40)),
        byzantine=byzantine,
    )
    res = RunResult(seed, n_voters, n_obs)

    def propose() -> None:
        leaders = sim.current_leaders()
        if leaders:
            sim.propose(rng.choice(leaders), f"{seed}:{sim.stats['proposed']}".encode())

    run_faults(sim, rng, keep_disk, fault_time, proposals, propose, res.faults)
    start = sim.now
    if sim.run_until_pred(lambda s: s.caught_up() is not None, liveness_bound(cfg)):
        res.recovered_after = sim.now - start
    sim.run_for(cfg.election_timeout_max)  # let late messages land while still checking
    res.violations = sim.violations
    res.max_term = sim.max_term()
    res.messages = sim.stats["sent"]
    res.committed = len(sim.committed) - 1
    res.proposed = sim.stats["proposed"]
    res.accepted = sim.stats["accepted"]
    res.snapshots = sim.stats["compactions"] + sim.stats["restores"]
    return res


def with_random_tail(cfg: Config, seed: int) -> Config:
    """The config of random run `seed`: compactions keep no tail in two seeds of three (so a
    follower behind gets the snapshot), a few entries in the third (so it may catch up from
    the tail, or need the snapshot anyway)."""
    return replace(cfg, compact_keep_entries=4 if seed % 3 == 2 else 0)


def random_links(rng: random.Random) -> dict[str, Any]:
    """Loss, latency and duplication of one randomized run (the ledger's runs draw the same)."""
    return {"loss": rng.choice((0.0, 0.0, 0.02, 0.1, 0.3)),
            "latency": (0.0005, rng.choice((0.002, 0.02, 0.15))),
            "duplicate": rng.choice((0.0, 0.0, 0.05))}


def run_faults(sim: ElectionSim, rng: random.Random, keep_disk: bool, fault_time: float,
               rate: float, work: Callable[[], None], faults: list[str]) -> None:
    """Until `fault_time`: about four random faults, and `work` at a Poisson `rate` between
    them; then heal every link and restart every crashed node (`faults` gets the log)."""
    ids = sorted(sim.nodes)
    t = 0.0
    next_fault = rng.expovariate(4 / fault_time)
    while True:
        t = min(next_fault, t + (rng.expovariate(rate) if rate else _INF))
        if t >= fault_time:
            break
        sim.run_until(t)
        if t == next_fault:
            faults.append(random_fault(sim, rng, ids, keep_disk))
            next_fault = t + rng.expovariate(4 / fault_time)
        else:
            work()
    sim.run_until(fault_time)
    sim.heal()
    sim.loss = 0.0
    for id_ in ids:
        if not sim.nodes[id_].up:
            sim.restart(id_, keep_disk=keep_disk)


def random_fault(sim: ElectionSim, rng: random.Random, ids: list[str], keep_disk: bool) -> str:
    roll = rng.random()
    up = sim.up_ids()
    down = [i for i in ids if i not in up]
    if roll < 0.25 and up:
        leaders = sim.current_leaders()
        victim = rng.choice(leaders) if leaders and rng.random() < 0.5 else rng.choice(up)
        sim.crash(victim)
        return f"{sim.now:.3f} crash {victim}"
    if roll < 0.45 and down:
        back = rng.choice(down)
        sim.restart(back, keep_disk=keep_disk)
        return f"{sim.now:.3f} restart {back}"
    if roll < 0.7:
        shuffled = ids[:]
        rng.shuffle(shuffled)
        cuts = sorted(rng.sample(range(1, len(ids)), min(len(ids) - 1, rng.randint(1, 2))))
        groups = [shuffled[a:b] for a, b in zip([0, *cuts], [*cuts, len(ids)], strict=True)]
        sim.partition(groups)
        return f"{sim.now:.3f} partition {groups}"
    if roll < 0.8 and len(ids) > 1:
        a, b = rng.sample(ids, 2)
        sim.cut(a, b)
        return f"{sim.now:.3f} cut {a}-{b}"
    if roll < 0.9:
        sim.heal()
        return f"{sim.now:.3f} heal"
    sim.loss = rng.choice((0.0, 0.1, 0.5))
    return f"{sim.now:.3f} loss {sim.loss}"


def measure_failover(
    voters: int, seed: int, config: Config | None = None, latency: Latency = (0.0005, 0.005)
) -> float | None:
    """Seconds from killing a settled leader to a new leader holding a valid lease (able to
    schedule again), or None if that takes longer than the liveness bound."""
    cfg = config or Config()
    sim = ElectionSim(voters, 0, cfg, seed=seed, latency=latency)
    if not sim.run_until_pred(lambda s: s.stable_leader() is not None, liveness_bound(cfg)):
        return None
    sim.run_for(sim.rng.uniform(0.5, 1.5))  # kill at a random phase of the heartbeat cycle
    old = sim.current_leaders()
    if len(old) != 1:
        return None
    sim.crash(old[0])
    start = sim.now
    ok = sim.run_until_pred(
        lambda s: any(s.election(i).leader_lease_valid(s.now) for i in s.up_ids()),
        liveness_bound(cfg),
        step=0.001,
    )
    return sim.now - start if ok else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="randomized Raft safety runs and failover")
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--failover", type=int, default=200, help="failover samples (3 voters)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    recovered: list[float] = []
    bad = 0
    totals: Counter[str] = Counter()
    for seed in range(args.seed, args.seed + args.runs):
        res = random_run(seed)
        totals.update(accepted=res.accepted, committed=res.committed, snapshots=res.snapshots)
        if res.violations or res.recovered_after is None:
            bad += 1
            print(f"seed {seed}: {res.violations or 'no leader within bound'}", flush=True)
        else:
            recovered.append(res.recovered_after)
    wall = time.perf_counter() - t0
    print(f"{args.runs} runs, {bad} bad, {wall:.1f} s wall, {dict(totals)}")
    if recovered:
        qs = statistics.quantiles(recovered, n=100)
        print(f"recovery: median {qs[49]:.3f} s, p99 {qs[98]:.3f} s, max {max(recovered):.3f} s")
    times = [measure_failover(3, s) for s in range(args.failover)]
    done = [x for x in times if x is not None]
    if done:
        print(
            f"failover (3 voters): median {statistics.median(done):.3f} s, "
            f"max {max(done):.3f} s, {len(times) - len(done)} not recovered"
        )


if __name__ == "__main__":
    main()
