"""The `Membership` state machine: SWIM failure detection and gossip with Lifeguard, sans-I/O.

Inputs are `handle(now, src_id, msg)` (src_id already authenticated by the transport), `tick(now)`
and a few local commands; outputs are `Send`s and `Event`s collected until `drain()`. Nothing here
touches a socket, a clock or global randomness, so the same code runs in the node shell and in a
10,000-node simulation.

Trust model, in short:
- A member's liveness record is signed by the member itself, so only X can say "X is alive at
  incarnation i with these addresses" and only X can refute a suspicion of X.
- Probes name their target and acks carry the target's signature over the prober's nonce, so a
  reply relayed by a helper still proves the target itself answered.
- Cluster statements (Admit, Ban, Rename) are signed by their author and count only if the author
  is an admitted member in our view (or ourselves) and may make them: with an injected
  `Operators` (the node's: the operate right, push/release.py), an Admit needs an operator, a
  Ban an operator closer to the founder than its subject, a Rename the subject itself or an
  operator. A statement whose author is not (yet) known to have that right waits in a bounded
  buffer and is tried again when rights change. The root of admission is the founder: a
  self-signed Admit with how="founder". Guests cannot gossip at all.
- Messages from ids that are not admitted members are dropped (counted), except the reply to a
  push-pull we sent (a joining node knows nobody yet). Pending guests get nothing.
"""

from __future__ import annotations

import heapq
import ipaddress
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Container, Hashable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from .awareness import Awareness
from .broadcast import BroadcastQueue
from .config import Config
from .messages import (
    LEFT_FACT,
    MAX_NAME,
    MAX_NOTE_KEY,
    MAX_NOTE_VALUE,
    MAX_TOPIC,
    STATEMENT_KINDS,
    Ack,
    Admit,
    Alive,
    Ban,
    Crypto,
    Dead,
    Gossip,
    Item,
    MemberState,
    Message,
    MessageError,
    Nack,
    Note,
    Pending,
    Ping,
    PingReq,
    PushPull,
    PushPullReply,
    Record,
    Rename,
    Statement,
    Suspect,
    ack_body,
    admit_body,
    ban_body,
    item_from_plain,
    item_size,
    item_to_plain,
    make_record,
    member_state_from_plain,
    member_state_to_plain,
    note_body,
    rename_body,
)
from .state import (
    ALIVE,
    BANNED,
    DEAD,
    GONE,
    LEFT,
    LIMBO,
    LIVE,
    MEMBER,
    PENDING,
    SUSPECT,
    Entry,
    MemberTable,
    SharedMembers,
    supersedes,
)
from .suspicion import Suspicion, expected_confirmations, suspicion_timeouts

FOUNDER = "founder"
SNAPSHOT_VERSION = 1
_INF = math.inf
_SMALL_TABLE = 64
_MAX_NEWS_PER_MEMBER = 16
"""Suspicions/deaths kept per member while its record is on the way: honest news names one or
two incarnations (one per prober's view), so 16 keeps the merge order-insensitive in practice
while a liar naming made-up incarnations costs bounded memory."""
"""Tables up to this size are sampled by listing candidates; larger ones by random probing."""


class _EveryId:
    """The container of every id (see `Membership._quiet_admits`)."""

    __slots__ = ()

    def __contains__(self, item: object) -> bool:
        return True

    def __bool__(self) -> bool:
        return True


_EVERY_ID = _EveryId()


@dataclass(frozen=True, slots=True)
class Send:
    to: str
    msg: Message


@dataclass(frozen=True, slots=True)
class Event:
    kind: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class MemberView:
    id: str
    state: str
    incarnation: int
    record: Record | None
    since: float
    admitted_by: str | None
    how: str
    name: str
    admitted_at: float | None = None  # the earliest admission statement's time (signed)


Operators = Callable[[list[MemberView], list[Note], "int | None"], Mapping[str, int]]
"""Who may admit, ban and rename others, each with its distance from the founder (0), given the
members and the notes held, counting only revokes signed before the given timestamp (None:
every revoke). Pure: the node passes push/release.py `operators`."""
_EVER = 0
"""`Operators` cut-off before every timestamp (they are >= 0): every holder that was ever
granted the right and not banned, revokes ignored; nobody outside it can ever count."""


class _Probe:
    __slots__ = (
        "end",
        "helpers",
        "incarnation",
        "indirect",
        "indirect_at",
        "nacks",
        "nonce",
        "seq",
        "target",
    )

    def __init__(
        self, seq: int, target: str, incarnation: int, nonce: bytes, indirect_at: float, end: float
    ):
        self.seq = seq
        self.target = target
        self.nonce = nonce
        self.indirect_at = indirect_at
        self.end = end
        self.indirect = False
        self.incarnation = incarnation  # the life probed: only it may be accused
        self.helpers: list[str] = []
        self.nacks: list[str] = []


_SENT_KEY = {
    Ping: "sent_ping",
    Ack: "sent_ack",
    PingReq: "sent_ping_req",
    Nack: "sent_nack",
    Gossip: "sent_gossip",
    PushPull: "sent_push_pull",
    PushPullReply: "sent_push_pull_reply",
}


def _record_changed(a: Record, b: Record) -> bool:
    return a.name != b.name or a.addresses != b.addresses or a.facts != b.facts


class Membership:
    """One node's view of the swarm. See the module docstring for the model."""

    def __init__(
        self,
        record: Record,
        crypto: Crypto,
        config: Config,
        rng: random.Random,
        now: float,
        *,
        founder: bool = False,
        base: SharedMembers | None = None,
        is_founder: Callable[[str], bool] | None = None,
        operators: Operators | None = None,
    ) -> None:
        self.id = record.id
        self._is_founder = is_founder
        """Which ids may sign themselves a founder's admission (the node: the one its cluster
        id names); None accepts any (the simulator, whose ids are not keys)."""
        self._operators = operators
        """Who may admit, ban and rename (see `Operators`); None lets every admitted member
        (the simulator, which models failure detection and gossip, not rights)."""
        self._ranks: dict[int | None, Mapping[str, int]] = {}
        """`_operators` results by cut-off (None and _EVER only), until rights change."""
        self._rights_moved = False  # rights changed: retry statements waiting for them
        self._trust_held = False  # restoring our own snapshot: it held only what counted
        self.counters: Counter[str] = Counter()
        self._record = record
        self._crypto = crypto
        self._cfg = config
        self._rng = rng
        self._now = now
        self._out: list[Send | Event] = []
        self._table = MemberTable(base)
        self._awareness = Awareness(config.awareness_max_multiplier)
        self._queue = BroadcastQueue(config.retransmit_mult, config.max_broadcasts)
        self._suspicions: dict[str, Suspicion] = {}
        self._susp_heap: list[tuple[float, str]] = []
        self._relays: dict[tuple[str, int], list[str]] = {}
        self._relay_heap: list[tuple[float, str, int, str]] = []
        self._pp_out: dict[str, tuple[float, bool]] = {}
        self._deferred: dict[str, list[Statement]] = {}
        self._notes: dict[tuple[str, str, str], Note] = {}
        self._note_bytes: Counter[str] = Counter()  # encoded bytes held per author ("" = all)
        self._note_count: Counter[str] = Counter()  # notes held per author
        self._news: dict[str, dict[Suspect | Dead, bool]] = {}
        """Suspicions and deaths naming an incarnation above the subject's newest record we
        hold, waiting for that record (item -> bcast); bounded per subject."""
        self._pending: dict[str, str] = {}
        """Pending guests -> the source that listed them, least recently heard from first."""
        self._pending_by: Counter[str] = Counter()  # pending guests listed per source
        self._quiet_admits: Container[str] | None = None
        """While merging: admissions of these ids are not news (no `admitted` event); every
        id while restoring our own snapshot (see `_merge`)."""
        self._n_deferred = 0
        self._reap_heap: list[tuple[float, str]] = []
        self._dead: dict[str, None] = {}  # insertion-ordered set: deterministic choice
        self._left = False
        self._seq = 0
        self._probe: _Probe | None = None
        self._pass_n = 0
        self._pass_i = 0
        self._pass_start = 0
        self._pass_stride = 1
        self._fresh: list[str] = []
        # Timers are staggered so nodes started together do not act in lockstep.
        self._next_probe = now + rng.random() * config.probe_interval
        self._gossip_phase = now + rng.random() * config.gossip_interval
        self._next_gossip = _INF
        self._last_gossip = -_INF
        self._next_push_pull = now + config.push_pull_scaled(self._live()) * rng.uniform(0.5, 1)
        self._next_reconnect = now + config.reconnect_interval * rng.uniform(0.5, 1)

        if base is not None and base.counts[DEAD]:
            self._dead = {e.id: None for e in base.entries.values() if e.state == DEAD}
        cur = self._table.get(self.id)
        if cur is None or cur.record != record or cur.state != ALIVE:
            self._put(
                Entry(
                    self.id,
                    ALIVE,
                    record.incarnation,
                    record,
                    now,
                    admit=cur.admit if cur is not None else None,
                )
            )
        if founder and (cur is None or cur.admit is None):
            self._apply_admit(self._make_admit(self.id, FOUNDER))

    # ------------------------------------------------------------------ public API

    def handle(self, now: float, src_id: str, msg: Message) -> None:
        """Process one message from `src_id` (authenticated by the transport)."""
        self._now = now
        fn = _HANDLERS.get(type(msg))
        if fn is None:
            self.counters["drop_unknown_message"] += 1
            return
        if src_id == self.id:
            self.counters["drop_from_self"] += 1
            return
        e = self._table.get(src_id)
        if (e is None or e.admit is None or e.state == BANNED) and not self._outsider_ok(
            src_id, msg, e
        ):
            return
        fn(self, src_id, msg)
        self._settle()
        e = self._table.get(src_id)
        if e is not None and e.state == LIMBO and e.record is None and e.admit is not None:
            # An admitted member talks to us but its record has not reached us (its Alive was
            # lost or spent its transmissions elsewhere): ask it for its state directly rather
            # than leave it unlisted until the next periodic push-pull.
            self.counters["record_pull"] += 1
            self._start_push_pull(src_id, join=False)

    def _credentials(self, src: str, msg: Message, e: Entry | None) -> bool:
        """A newcomer whose admission has not reached us yet carries it: its own broadcast queue
        holds the Admit about itself, signed by a member we can check. Apply just that. A
        push-pull carries it too, which is how a member that restarted from an old snapshot
        (or none) accepts the members admitted since: their state sync proves them."""
        if e is not None and e.state == BANNED:
            return False
        t = type(msg)
        items = (msg.items if t is Gossip else msg.piggyback if t is Ping or t is Ack
                 else msg.cluster if t is PushPull else ())  # type: ignore[union-attr]
        for item in items:  # type: ignore[union-attr]
            if type(item) is Admit and item.id == src:
                self._apply_admit(item)  # type: ignore[arg-type]
        e = self._table.get(src)
        return e is not None and e.admit is not None

    def tick(self, now: float) -> None:
        """Run every timer due by `now`."""
        self._now = now
        self._tick_probe(now)
        if now >= self._next_gossip:
            self._gossip_round(now)
        if now >= self._next_push_pull:
            self._next_push_pull = now + self._cfg.push_pull_scaled(self._live())
            targets = self._random_members(1, self._is_live_peer)
            if targets:
                self._start_push_pull(targets[0], join=False)
        if now >= self._next_reconnect:
            self._next_reconnect = now + self._cfg.reconnect_interval
            if self._dead:
                ids = list(self._dead)
                self._start_push_pull(ids[self._rng.randrange(len(ids))], join=False)
        if self._relay_heap and self._relay_heap[0][0] <= now:
            self._expire_relays(now)
        if self._susp_heap and self._susp_heap[0][0] <= now:
            self._expire_suspicions(now)
        if self._pp_out:
            self._expire_push_pulls(now)
        if self._reap_heap and self._reap_heap[0][0] <= now:
            self._reap(now)

    def next_deadline(self) -> float:
        """When `tick` must next be called (may be early; never late)."""
        p = self._probe
        d = self._next_probe
        if p is not None:
            d = min(d, p.end if p.indirect else p.indirect_at)
        d = min(d, self._next_gossip, self._next_push_pull, self._next_reconnect)
        for heap in (self._susp_heap, self._relay_heap, self._reap_heap):
            if heap and heap[0][0] < d:
                d = heap[0][0]
        for deadline, _join in self._pp_out.values():
            d = min(d, deadline)
        return d

    def drain(self) -> list[Send | Event]:
        """Outputs produced since the last drain, in order."""
        out, self._out = self._out, []
        return out

    def join(self, now: float, contact_ids: Iterable[str]) -> None:
        """Exchange full state (push-pull, join=True) with known contacts."""
        self._now = now
        for c in contact_ids:
            if c != self.id:
                self._start_push_pull(c, join=True)

    def leave(self, now: float) -> None:
        """Announce a graceful leave; afterwards we never refute and stop probing."""
        if self._left:
            return
        self._now = now
        self._left = True
        r = self._record
        # The leave is our goodbye record, signed like any record of ours, so nobody else can
        # make one and everyone who relays it carries the proof with it.
        goodbye = make_record(self._crypto, self.id, r.incarnation + 1, r.name, r.addresses,
                              {**r.facts_dict(), LEFT_FACT: 1})
        self._record = goodbye
        inc = goodbye.incarnation
        e = self._self_entry()
        if e.state == BANNED:
            self._put(replace(e, record=goodbye, incarnation=inc))
        else:
            self._put(replace(e, state=LEFT, incarnation=inc, record=goodbye, since=now))
        self._event("incarnation", id=self.id, incarnation=inc)
        self._broadcast(("m", self.id), Alive(goodbye))
        self._event("member_left", id=self.id, incarnation=inc)
        self._probe = None
        self._next_probe = self._next_push_pull = self._next_reconnect = _INF

    def update_record(
        self,
        now: float,
        name: str | None = None,
        addresses: Iterable[str] | None = None,
        facts: dict[str, str | int] | None = None,
    ) -> None:
        """Re-sign our record with a new incarnation and broadcast it."""
        if self._left:
            return
        self._now = now
        r = self._record
        self._set_own_record(
            make_record(
                self._crypto,
                self.id,
                r.incarnation + 1,
                r.name if name is None else name,
                r.addresses if addresses is None else tuple(addresses),
                r.facts if facts is None else facts,
            )
        )

    def admit(self, now: float, id: str, how: str) -> None:
        """Vouch for `id` as a member (signed as ourselves) and broadcast it."""
        self._now = now
        if id == self.id:
            raise ValueError("a node cannot admit itself (founders pass founder=True)")
        e = self._table.get(id)
        if e is not None and e.state == BANNED:
            self.counters["admit_banned"] += 1
            return
        if e is not None and e.admit is not None:
            return
        self._apply_admit(self._make_admit(id, how))

    def ban(self, now: float, id: str) -> None:
        """Ban `id` permanently (signed as ourselves) and broadcast it."""
        self._now = now
        if id == self.id:
            raise ValueError("a node cannot ban itself")
        e = self._table.get(id)
        if e is not None and e.ban is not None:
            return
        ts = self._ts()
        self._apply_ban(Ban(id, self.id, ts, self._crypto.sign(ban_body(id, self.id, ts))))

    def rename(self, now: float, id: str, name: str) -> None:
        """Give member `id` a display name (last writer wins) and broadcast it."""
        self._now = now
        if type(name) is not str or len(name) > MAX_NAME:
            raise MessageError(f"name must be a str of at most {MAX_NAME} characters")
        e = self._table.get(id)
        if e is None or e.state == LIMBO:
            raise KeyError(id)
        ts = self._ts()
        if e.rename is not None:
            ts = max(ts, e.rename.ts + 1)
        sig = self._crypto.sign(rename_body(id, name, self.id, ts))
        self._apply_rename(Rename(id, name, self.id, ts, sig))

    def note(self, now: float, topic: str, key: str, value: bytes) -> Note:
        """State `value` under (topic, key) as this node, and spread it (newest per author wins)."""
        n = self.sign_note(now, topic, key, value)
        self._apply_note(n)
        self._settle()
        return n

    def sign_note(self, now: float, topic: str, key: str, value: bytes, after: int = -1) -> Note:
        """A note by this node, newer than any it made for (topic, key) and than `after`, not
        yet spread: a push shows it to its canaries first and spreads it with `add_note` once
        they are healthy. ValueError when it would be too large to travel."""
        self._now = now
        if not 0 < len(topic) <= MAX_TOPIC or len(key) > MAX_NOTE_KEY \
                or len(value) > MAX_NOTE_VALUE:
            raise ValueError(f"note too large: topic {len(topic)}, key {len(key)}, value "
                             f"{len(value)} (at most {MAX_TOPIC}, {MAX_NOTE_KEY}, "
                             f"{MAX_NOTE_VALUE})")
        old = self._notes.get((topic, key, self.id))
        ts = self._ts() if old is None else max(self._ts(), old.ts + 1)
        ts = max(ts, after + 1)
        return Note(topic, key, value, self.id, ts,
                    self._crypto.sign(note_body(topic, key, value, self.id, ts)))

    def add_note(self, now: float, note: Note) -> None:
        """Hold and spread a signed note (checked like one that arrived by gossip)."""
        self._now = now
        self._apply_note(note)
        self._settle()

    def notes(self, topic: str) -> list[Note]:
        """Every note held under `topic`, all authors (their meaning is the caller's)."""
        return [n for n in self._notes.values() if n.topic == topic]

    def hello(self, now: float, src_id: str, record: Record, how: str, source: str = "") -> bool:
        """A guest presented its self-signed record: list it as pending (unless banned/admitted).

        `source` is where the hello came from (the connection's peer host): each source lists
        at most `max_pending_per_source` guests. True when the guest is listed (or admitted).
        """
        self._now = now
        if record.id != src_id:
            self.counters["drop_hello_id_mismatch"] += 1
            return False
        self._apply_pending(Pending(record, how), source=f"addr:{self._source_network(source)}",
                            since_now=True)
        e = self._table.get(src_id)
        return e is not None and (e.state == PENDING or e.admit is not None) and e.state != BANNED

    def members(self) -> list[MemberView]:
        return [self._view(e) for e in self._table if e.state != LIMBO]

    def member(self, id: str) -> MemberView | None:
        e = self._table.get(id)
        return None if e is None or e.state == LIMBO else self._view(e)

    def state_of(self, id: str) -> str | None:
        """The state we hold for `id` (cheap; for simulators and assertions)."""
        e = self._table.get(id)
        return None if e is None or e.state == LIMBO else e.state

    @property
    def record(self) -> Record:
        return self._record

    @property
    def incarnation(self) -> int:
        return self._record.incarnation

    @property
    def health(self) -> int:
        """Lifeguard awareness score (0 = healthy)."""
        return self._awareness.score

    @property
    def broadcasting_self(self) -> bool:
        """True while our own latest news (a leave, a refutation) is still being retransmitted."""
        return ("m", self.id) in self._queue

    @property
    def live_count(self) -> int:
        return self._live()

    def snapshot(self) -> dict[str, Any]:
        """Plain msgpack-able state to persist: own incarnation, members and statements."""
        members: list[Any] = []
        statements: list[Any] = []
        for e in self._table:
            if e.id != self.id and e.record is not None and e.state in MEMBER:
                members.append(member_state_to_plain(MemberState(e.record, e.state, e.incarnation)))
            statements.extend(item_to_plain(s) for s in self._entry_statements(e))
        statements.extend(item_to_plain(n) for n in self._notes.values())
        return {
            "version": SNAPSHOT_VERSION,
            "id": self.id,
            "incarnation": self._record.incarnation,
            "members": members,
            "statements": statements,
        }

    @classmethod
    def restore(
        cls,
        snapshot: dict[str, Any],
        record: Record,
        crypto: Crypto,
        config: Config,
        rng: random.Random,
        now: float,
        *,
        is_founder: Callable[[str], bool] | None = None,
        operators: Operators | None = None,
    ) -> Membership:
        """A restarted node: resume from `snapshot` above its old incarnation and rejoin.

        `record` is the node's current self-description; it is re-signed with an incarnation
        above both its own and the snapshot's, so it overrides anything said about our old life.
        """
        if snapshot.get("version") != SNAPSHOT_VERSION or snapshot.get("id") != record.id:
            raise ValueError("snapshot is not a membership snapshot of this node")
        inc = max(record.incarnation, int(snapshot["incarnation"])) + 1
        rec = make_record(crypto, record.id, inc, record.name, record.addresses, record.facts)
        m = cls(rec, crypto, config, rng, now, is_founder=is_founder, operators=operators)
        stmts = [item_from_plain(s, STATEMENT_KINDS) for s in snapshot["statements"]]
        states = [member_state_from_plain(s) for s in snapshot["members"]]
        # What the snapshot holds counted when it arrived (an admission stays valid after its
        # author loses the right, like a certificate): re-read without asking again.
        m._trust_held = True
        try:
            m._merge(states, stmts, m.id, bcast=False, literal=True)  # type: ignore[arg-type]
        finally:
            m._trust_held = False
        m._settle()
        m._out.clear()  # reloading what we knew is not news: no member_join etc. for it
        m._event("incarnation", id=m.id, incarnation=inc)
        live = [s.record.id for s in states if s.state in LIVE]
        gone = [s.record.id for s in states if s.state == DEAD]
        k = config.rejoin_contacts
        contacts = rng.sample(live, min(k, len(live)))
        contacts += rng.sample(gone, min(k - len(contacts), len(gone)))
        m.join(now, contacts)
        return m

    # ------------------------------------------------------------------ message handlers

    def _outsider_ok(self, src: str, msg: Message, e: Entry | None) -> bool:
        if self._credentials(src, msg, e):
            return True
        e = self._table.get(src)
        t = type(msg)
        if t is PushPullReply and src in self._pp_out:
            return True
        if t is Ack and self._probe is not None and self._probe.target == src:
            return True
        if e is None or e.state == LIMBO:
            reason = "drop_from_non_member"
        else:
            reason = "drop_from_banned" if e.state == BANNED else "drop_from_pending"
        self.counters[reason] += 1
        return False

    def _on_ping(self, src: str, p: Ping) -> None:
        if p.target_id != self.id:
            self.counters["drop_ping_wrong_target"] += 1
            return
        self._apply_items(p.piggyback, src)
        proof = self._crypto.sign(ack_body(p.seq, p.nonce, self.id))
        self._send(src, Ack(p.seq, self.id, proof, self._piggyback(self._cfg.piggyback_bytes)))

    def _on_ack(self, src: str, a: Ack) -> None:
        self._apply_items(a.piggyback, src)
        matched = False
        p = self._probe
        if p is not None and a.seq == p.seq and a.target_id == p.target:
            if src == p.target or self._crypto.verify(
                p.target, ack_body(p.seq, p.nonce, p.target), a.proof
            ):
                self._awareness.apply_delta(0 if p.indirect else -1)
                self._probe = None
                matched = True
            else:
                self.counters["drop_ack_bad_proof"] += 1
                return
        if src == a.target_id:
            waiting = self._relays.pop((src, a.seq), None)
            if waiting:
                for requester in waiting:
                    self._send(requester, Ack(a.seq, a.target_id, a.proof))
                matched = True
        if not matched:
            self.counters["drop_ack_unexpected"] += 1

    def _on_ping_req(self, src: str, r: PingReq) -> None:
        target = r.target_id
        t = self._table.get(target)
        if target in (self.id, src) or t is None or t.admit is None or t.state == BANNED:
            self.counters["drop_ping_req_bad_target"] += 1
            return
        waiting = self._relays.setdefault((target, r.seq), [])
        if src in waiting:
            return
        waiting.append(src)
        self._send(target, Ping(r.seq, target, r.nonce, self._piggyback(self._cfg.piggyback_bytes)))
        deadline = self._now + self._cfg.probe_timeout * self._cfg.nack_fraction
        heapq.heappush(self._relay_heap, (deadline, target, r.seq, src))

    def _on_nack(self, src: str, n: Nack) -> None:
        p = self._probe
        if p is not None and n.seq == p.seq and src in p.helpers and src not in p.nacks:
            p.nacks.append(src)
        else:
            self.counters["drop_nack_unexpected"] += 1

    def _on_gossip(self, src: str, g: Gossip) -> None:
        self._apply_items(g.items, src)

    def _on_push_pull(self, src: str, pp: PushPull) -> None:
        self._merge(pp.members, pp.cluster, src, bcast=True)
        self._send(src, PushPullReply(self._member_states(), self._statements()))

    def _on_push_pull_reply(self, src: str, r: PushPullReply) -> None:
        out = self._pp_out.pop(src, None)
        joining = out is not None and out[1]
        # A joiner learns the cluster's own state: nothing in it is news to anyone else, so
        # rebroadcasting it would only flood the cluster. Periodic exchanges do rebroadcast,
        # which is what spreads news across a healed partition.
        self._merge(r.members, r.cluster, src, bcast=not joining)

    # ------------------------------------------------------------------ merge rules

    def _apply_items(self, items: Iterable[Item], src: str) -> None:
        for item in items:
            self._apply(item, src=src)

    def _apply(self, item: Item, bcast: bool = True, src: str = "") -> None:
        """Apply one item; `src` is the member that told us (it answers for Pending items)."""
        t = type(item)
        if t is Alive:
            self._apply_alive(item.record, bcast)  # type: ignore[union-attr]
        elif t is Suspect:
            self._apply_suspect(item, bcast)  # type: ignore[arg-type]
        elif t is Dead:
            self._apply_dead(item, bcast)  # type: ignore[arg-type]
        elif t is Admit:
            self._apply_admit(item, bcast)  # type: ignore[arg-type]
        elif t is Ban:
            self._apply_ban(item, bcast)  # type: ignore[arg-type]
        elif t is Rename:
            self._apply_rename(item, bcast)  # type: ignore[arg-type]
        elif t is Pending:
            self._apply_pending(item, bcast, f"member:{src}")  # type: ignore[arg-type]
        elif t is Note:
            self._apply_note(item, bcast)  # type: ignore[arg-type]

    def _apply_alive(self, rec: Record, bcast: bool = True) -> None:
        """Apply a record, then any liveness news that was waiting for it."""
        self._apply_record(rec, bcast)
        if rec.id in self._news:
            self._release_news(rec.id)

    def _apply_record(self, rec: Record, bcast: bool) -> None:
        rid = rec.id
        if rid == self.id:
            self._self_alive(rec)
            return
        e = self._table.get(rid)
        if e is not None and e.record is rec:  # the common duplicate: nothing new
            return
        if e is None:
            if not self._verify_record(rec):
                return
            if self._table.count(LIMBO) >= self._cfg.max_orphans:
                self.counters["drop_orphan_full"] += 1
                return
            self._put(Entry(rid, LIMBO, rec.incarnation, rec, self._now))
            self.counters["orphan_record"] += 1
            self._retry_deferred(rid)
            return
        st = e.state
        if st == BANNED:
            self.counters["drop_alive_banned"] += 1
            return
        cur = e.record
        newer_record = cur is None or rec.incarnation > cur.incarnation
        if st in MEMBER:
            new_state = LEFT if rec.is_goodbye else ALIVE
            applies = supersedes(rec.incarnation, new_state, e.incarnation, st)
            if not applies and not newer_record:
                return
            if not self._verify_record(rec):
                return
            if not applies:  # newer record, but liveness news at that incarnation outranks it
                self._put(replace(e, record=rec))
                return
            self._put(
                replace(
                    e,
                    state=new_state,
                    incarnation=rec.incarnation,
                    record=rec,
                    since=e.since if st == new_state else self._now,
                )
            )
            if new_state == LEFT:
                self._event("member_left", id=rid, incarnation=rec.incarnation, by=rid)
            elif st != ALIVE:
                self._event("member_alive", id=rid, incarnation=rec.incarnation, previous=st)
            if cur is not None and _record_changed(cur, rec):
                self._event(
                    "member_update",
                    id=rid,
                    incarnation=rec.incarnation,
                    name=rec.name,
                    addresses=list(rec.addresses),
                )
            if bcast:
                self._broadcast(("m", rid), Alive(rec))
            return
        if not newer_record or not self._verify_record(rec):
            return
        if st == PENDING or e.admit is None:
            self._put(replace(e, record=rec, incarnation=rec.incarnation))
            return
        self._become_member(e, rec, bcast)

    def _become_member(self, e: Entry, rec: Record, bcast: bool) -> None:
        state = LEFT if rec.is_goodbye else ALIVE
        self._put(replace(e, state=state, incarnation=rec.incarnation, record=rec, since=self._now))
        self._event(
            "member_join",
            id=e.id,
            incarnation=rec.incarnation,
            name=rec.name,
            addresses=list(rec.addresses),
        )
        if bcast:
            self._broadcast(("m", e.id), Alive(rec))

    def _self_alive(self, rec: Record) -> None:
        if rec == self._record:
            return
        if self._left or rec.incarnation < self._record.incarnation:
            self.counters["alive_self_stale"] += 1
            return
        if self._verify_record(rec):
            # A record we signed in a life we forgot (restarted without our snapshot): go
            # above it. Only we can sign one, so no peer can choose this number.
            self._refute(rec.incarnation)

    def _apply_suspect(self, s: Suspect, bcast: bool = True) -> None:
        self._accusation(s, bcast)

    def _accusation(self, news: Suspect | Dead, bcast: bool) -> None:
        """A member is said to be suspect or dead (by anyone: these items are unsigned). Either
        way it is only suspected here: a death stated by another member starts (or confirms) our
        own suspicion and counts as one independent confirmation of it, so only our own
        suspicion timeout declares a member dead (`_declare_dead`), and the accused always has
        the time to hear the accusation and refute it."""
        sid = news.id
        if sid == self.id:
            self._accused(news.incarnation)
            return
        e = self._table.get(sid)
        if e is None or e.state not in MEMBER:
            self.counters["drop_dead_non_member" if type(news) is Dead
                          else "drop_suspect_non_member"] += 1
            return
        if self._unannounced(e, news, bcast):
            return
        if not supersedes(news.incarnation, SUSPECT, e.incarnation, e.state):
            if e.state == SUSPECT and news.incarnation == e.incarnation:
                sus = self._suspicions.get(sid)
                if sus is not None and sus.confirm(_accuser(news)):
                    heapq.heappush(self._susp_heap, (sus.deadline(), sid))
                    if bcast:
                        self._broadcast(("m", sid), news)
            return
        was = e.state
        since = e.since if was == SUSPECT else self._now
        self._put(replace(e, state=SUSPECT, incarnation=news.incarnation, since=since))
        sus = self._start_suspicion(sid, (SUSPECT, news.from_id))
        if type(news) is Dead and sus.confirm(_accuser(news)):
            heapq.heappush(self._susp_heap, (sus.deadline(), sid))
        if was != SUSPECT:
            self._event("member_suspect", id=sid, incarnation=news.incarnation, by=news.from_id)
        if bcast:
            self._broadcast(("m", sid), news)

    def _start_suspicion(self, sid: str, accuser: Hashable) -> Suspicion:
        cfg = self._cfg
        n = self._live()
        k = expected_confirmations(cfg.suspicion_mult, n)
        lo, hi = suspicion_timeouts(
            cfg.suspicion_mult, cfg.suspicion_max_timeout_mult, n, cfg.probe_interval
        )
        sus = Suspicion(self._now, accuser, k, lo, hi)
        self._suspicions[sid] = sus
        heapq.heappush(self._susp_heap, (sus.deadline(), sid))
        return sus

    def _apply_dead(self, d: Dead, bcast: bool = True) -> None:
        if d.from_id == d.id:
            # An unsigned leave (older nodes sent these): anyone could have made it up. A real
            # leave is the member's goodbye record; without one it is found dead by probing.
            self.counters["drop_leave_unsigned"] += 1
            return
        self._accusation(d, bcast)

    def _declare_dead(self, id_: str, incarnation: int, bcast: bool = True) -> None:
        """Our own verdict: `id_`'s life at `incarnation` (one it announced) is over, because
        our suspicion of it ran out or our own snapshot says so. The only way to dead here."""
        e = self._table.get(id_)
        if (e is None or e.state not in MEMBER or e.record is None
                or incarnation > e.record.incarnation
                or not supersedes(incarnation, DEAD, e.incarnation, e.state)):
            return
        self._put(replace(e, state=DEAD, incarnation=incarnation, since=self._now))
        self._event("member_dead", id=id_, incarnation=incarnation, by=self.id)
        if bcast:
            self._broadcast(("m", id_), Dead(id_, incarnation, self.id))

    def _accused(self, incarnation: int) -> None:
        """We are said to be suspect or dead at `incarnation`: refute it if it is our current
        life. A higher one was never announced by us, so it is a lie (or news of a life we
        forgot, which our own old record will teach us): dropped, never outbid, so no peer can
        push our incarnation towards the codec's limit."""
        own = self._record.incarnation
        if incarnation > own:
            self.counters["drop_incarnation_unannounced"] += 1
        elif incarnation == own and not self._left:
            self._refute(own)

    def _unannounced(self, e: Entry, news: Suspect | Dead, bcast: bool) -> bool:
        """True when `news` names an incarnation above `e`'s newest record: it waits for that
        record (a member only ever names incarnations its subject announced), bounded per
        subject; the highest incarnations are dropped first, as the likeliest to be lies."""
        if e.record is not None and news.incarnation <= e.record.incarnation:
            return False
        waiting = self._news.setdefault(e.id, {})
        if news not in waiting:
            waiting[news] = bcast
            self.counters["news_deferred"] += 1
            if len(waiting) > _MAX_NEWS_PER_MEMBER:
                del waiting[max(waiting, key=lambda n: n.incarnation)]
                self.counters["drop_incarnation_unannounced"] += 1
        return True

    def _release_news(self, id_: str) -> None:
        """Apply the waiting news that the subject's newest record now covers."""
        e = self._table.get(id_)
        waiting = self._news.pop(id_)
        if e is None or e.state not in MEMBER or e.record is None:
            return
        known = e.record.incarnation
        later = {n: b for n, b in waiting.items() if n.incarnation > known}
        if later:
            self._news[id_] = later
        for news, bcast in sorted(waiting.items(), key=lambda nb: nb[0].incarnation):
            if news.incarnation <= known:
                self._apply(news, bcast)

    def _refute(self, signed: int) -> None:
        """Our life at `signed` (an incarnation we signed ourselves) is said to be suspect or
        dead, or is older than one we forgot: outbid it by one."""
        r = self._record
        inc = max(signed, r.incarnation) + 1
        self._awareness.apply_delta(1)
        self._event("refuted", id=self.id, incarnation=inc)
        self._set_own_record(make_record(self._crypto, self.id, inc, r.name, r.addresses, r.facts))

    def _set_own_record(self, rec: Record) -> None:
        self._record = rec
        e = self._self_entry()
        if e.state == BANNED:
            self._put(replace(e, record=rec, incarnation=rec.incarnation))
        else:
            since = e.since if e.state == ALIVE else self._now
            self._put(replace(e, state=ALIVE, incarnation=rec.incarnation, record=rec, since=since))
        self._event("incarnation", id=self.id, incarnation=rec.incarnation)
        self._broadcast(("m", self.id), Alive(rec))

    # -- cluster statements

    def _authority(self, by: str, stmt: Statement) -> bool:
        """May `by` make `stmt`? False means "not yet": the caller defers it under `by`."""
        if type(stmt) is Admit and self._genuine_founder(stmt):  # type: ignore[arg-type]
            return True
        if by != self.id:
            e = self._table.get(by)
            if e is None or e.admit is None:
                return False
        if type(stmt) is Note or self._operators is None or self._trust_held:
            return True
        if type(stmt) is Rename and stmt.id == by:  # type: ignore[union-attr]
            return True  # a member names itself
        return self._operator_may(by, stmt)

    def _operator_may(self, by: str, stmt: Statement) -> bool:
        """Does `by` hold the operate right for `stmt`? It must have held it when it signed
        (revokes signed later do not undo an admission or a ban, like a certificate's), and a
        Ban must come from closer to the founder than its subject holds the right: nobody bans
        the founder, and an operator cannot ban its granter. A pure function of the notes and
        bans held, so every member that holds the same ones counts the same statements."""
        ranks = self._rank(None)
        mine = ranks.get(by)
        if mine is None:
            if by not in self._rank(_EVER):
                return False
            assert self._operators is not None
            mine = self._operators(self._views(), list(self._notes.values()),
                                   stmt.ts).get(by)  # type: ignore[union-attr]
            if mine is None:
                return False
        if type(stmt) is Ban:
            theirs = ranks.get(stmt.id)  # type: ignore[union-attr]
            if theirs is not None and theirs <= mine:
                self.counters["ban_outranked"] += 1
                return False
        return True

    def _rank(self, before: int | None) -> Mapping[str, int]:
        """Operator levels now (None) or ever (_EVER), computed once per change of rights."""
        got = self._ranks.get(before)
        if got is None:
            assert self._operators is not None
            got = self._ranks[before] = self._operators(
                self._views(), list(self._notes.values()), before)
        return got

    def _views(self) -> list[MemberView]:
        return [self._view(e) for e in self._table]

    def _rights_changed(self) -> None:
        """A grant, a revoke or a ban arrived: forget computed levels, retry waiting statements
        (at the end of the message, so a full state counts its grants first; see `_settle`)."""
        if self._operators is not None:
            self._ranks.clear()
            self._rights_moved = True

    def _settle(self) -> None:
        """Retry statements waiting for their author's right, until rights stop changing. Only
        authors that ever held the right are retried: the rest would wait again."""
        while self._rights_moved:
            self._rights_moved = False
            if not self._deferred:
                return
            ever = self._rank(_EVER)
            for by in [k for k in self._deferred if k in ever]:
                self._retry_deferred(by)

    def _genuine_founder(self, a: Admit) -> bool:
        return a.id == a.by and a.how == FOUNDER and (
            self._is_founder is None or self._is_founder(a.id))

    def _apply_admit(self, a: Admit, bcast: bool = True) -> bool:
        """Returns True when `a.id` is admitted afterwards."""
        e = self._table.get(a.id)
        if (a.id == a.by or a.how == FOUNDER) and not self._genuine_founder(a):
            # Only the founder admits itself: a member (or a stranger) signing itself a
            # founder's admission would otherwise replace its real one (the earliest wins).
            self.counters["drop_false_founder"] += 1
            return e is not None and e.admit is not None
        if e is not None and e.admit is not None:
            old = e.admit
            if (
                old != a
                and (a.ts, a.by) < (old.ts, old.by)  # keep the earliest: converges
                and self._authority(a.by, a)
                and self._verify(a.by, a.body(), a.sig)
            ):
                self._put(replace(e, admit=a))
            return True
        if not self._authority(a.by, a):
            self._defer(a.by, a)
            return False
        if not self._verify(a.by, a.body(), a.sig):
            return False
        if e is None:
            e = Entry(a.id, LIMBO, 0, None, self._now)
        e = replace(e, admit=a)
        self._put(e)
        if a.how == FOUNDER:
            self._rights_changed()
        if e.state != BANNED:
            quiet = self._quiet_admits
            if quiet is None or a.id not in quiet:
                self._event("admitted", id=a.id, by=a.by, how=a.how)
            if e.state in (PENDING, LIMBO) and e.record is not None:
                self._become_member(e, e.record, bcast)
        if bcast or a.id == self.id:  # our own admission travels with us (see _credentials)
            self._broadcast(("a", a.id), a)
        if a.id == self.id and not self._left and e.state != BANNED:
            # ... and so does our record: a member that learns our admission from us must not
            # be left with half the news (admitted, but no record to list us with).
            self._broadcast(("m", self.id), Alive(self._record))
        self._retry_deferred(a.id)
        return True

    def _apply_ban(self, b: Ban, bcast: bool = True) -> None:
        e = self._table.get(b.id)
        if e is not None and e.ban is not None:
            old = e.ban
            if (
                old != b
                and (b.ts, b.by) < (old.ts, old.by)
                and self._authority(b.by, b)
                and self._verify(b.by, b.body(), b.sig)
            ):
                self._put(replace(e, ban=b))
            return
        if not self._authority(b.by, b):
            self._defer(b.by, b)
            return
        if not self._verify(b.by, b.body(), b.sig):
            return
        if e is None:
            self._put(Entry(b.id, BANNED, 0, None, self._now, ban=b))
        else:
            self._put(replace(e, state=BANNED, ban=b, since=self._now))
        self._news.pop(b.id, None)
        self._rights_changed()
        self._event("banned", id=b.id, by=b.by)
        if bcast:
            self._broadcast(("b", b.id), b)

    def _apply_rename(self, r: Rename, bcast: bool = True) -> None:
        e = self._table.get(r.id)
        if e is not None and e.rename is not None and (r.ts, r.by) <= (e.rename.ts, e.rename.by):
            return
        if not self._authority(r.by, r):
            self._defer(r.by, r)
            return
        if e is None:
            self._defer(r.id, r)
            return
        if not self._verify(r.by, r.body(), r.sig):
            return
        self._put(replace(e, rename=r))
        self._event("renamed", id=r.id, name=r.name, by=r.by)
        if bcast:
            self._broadcast(("r", r.id), r)

    def _apply_pending(
        self, p: Pending, bcast: bool = True, source: str = "", since_now: bool = False
    ) -> None:
        """List a guest on the word of `source` (an address for a hello, else the member that
        relayed it), within that source's budget, evicting the longest-unheard guest if full."""
        rec = p.record
        pid = rec.id
        if pid == self.id:
            return
        e = self._table.get(pid)
        if e is not None:
            if e.state == BANNED:
                self.counters["drop_pending_banned"] += 1
                return
            if e.admit is not None:
                self._apply_alive(rec, bcast)
                return
            if e.state == PENDING and rec.incarnation <= e.incarnation:
                if since_now:  # the guest said hello again: keep it listed
                    self._put(replace(e, since=self._now))
                    self._push_reap(pid, self._cfg.pending_expire_after)
                    if pid in self._pending:  # now the guest heard from most recently
                        self._pending[pid] = self._pending.pop(pid)
                return
        if not self._verify_record(rec):
            return
        if e is None or e.state == LIMBO:
            if not self._pending_room(source):
                return
            self._pending[pid] = source
            self._pending_by[source] += 1
            self._put(Entry(pid, PENDING, rec.incarnation, rec, self._now, how=p.how))
            self._event("pending", id=pid, name=rec.name, how=p.how, addresses=list(rec.addresses))
        else:
            self._put(replace(e, record=rec, incarnation=rec.incarnation, since=self._now))
            self._push_reap(pid, self._cfg.pending_expire_after)
        if bcast:
            self._broadcast(("p", pid), p)

    def _source_network(self, host: str) -> str:
        """The network whose guests share a pending budget (`pending_source_prefix_v4`/`_v6`):
        a host that is not an IP address (or is loopback) is its own."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return host
        if ip.version == 6 and ip.ipv4_mapped is not None:  # type: ignore[union-attr]
            ip = ip.ipv4_mapped  # type: ignore[union-attr]
        if ip.is_loopback:
            return str(ip)
        cfg = self._cfg
        prefix = cfg.pending_source_prefix_v4 if ip.version == 4 else cfg.pending_source_prefix_v6
        return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))

    def _pending_room(self, source: str) -> bool:
        """Make room for one more guest listed by `source`; False (counted) when it has none."""
        cfg = self._cfg
        cap = cfg.max_pending_per_source if source.startswith("addr:") \
            else cfg.max_pending_per_member
        if self._pending_by[source] >= cap:
            self.counters["drop_pending_source_full"] += 1
            return False
        if len(self._pending) >= cfg.max_pending:
            oldest = next(iter(self._pending))
            self._table.delete(oldest)
            self._unlist_pending(oldest)
            self.counters["pending_evicted"] += 1
            self._event("member_reaped", id=oldest, state=PENDING)
        return True

    def _unlist_pending(self, id_: str) -> None:
        source = self._pending.pop(id_, None)
        if source is not None:
            self._pending_by[source] -= 1
            if not self._pending_by[source]:
                del self._pending_by[source]

    def _apply_note(self, n: Note, bcast: bool = True) -> None:
        old = self._notes.get(n.slot)
        if old is not None and (n.ts, n.sig) <= (old.ts, old.sig):
            return  # not newer (the signature breaks a tie the same way everywhere)
        if not self._authority(n.by, n):
            self._defer(n.by, n)
            return
        replaced = [old] if old is not None else []
        if not self._note_room(n, replaced) or not self._verify(n.by, n.body(), n.sig):
            return
        if old is not None:
            self._unhold_note(old)
        self._notes[n.slot] = n
        self._rights_changed()
        self._note_count[n.by] += 1
        self._note_bytes[n.by] += item_size(n)
        self._note_bytes[""] += item_size(n)
        self._event("note", topic=n.topic, key=n.key, by=n.by)
        if bcast:
            self._broadcast(("n", *n.slot), n)

    def _note_room(self, n: Note, replaced: list[Note]) -> bool:
        """Does `n` (replacing `replaced`, its author's older note in the same slot) fit its
        author's budget (count and encoded bytes, so empty notes count too; both grow with the
        swarm)? If the whole table is full, the author holding the most bytes gives up its
        oldest notes, unless that is `n`'s author: no author crowds out another."""
        by = n.by
        members = sum(self._table.count(st) for st in MEMBER)
        per_count, per_bytes, max_count, max_bytes = self._cfg.note_caps(members)
        grow = item_size(n) - sum(item_size(x) for x in replaced)
        if (not replaced and self._note_count[by] >= per_count) or \
                self._note_bytes[by] + grow > per_bytes:
            self.counters["drop_note_author_full"] += 1
            return False
        while (not replaced and len(self._notes) >= max_count) or \
                self._note_bytes[""] + grow > max_bytes:
            top = max((a for a in self._note_count if a != by), key=self._note_bytes.__getitem__,
                      default=None)
            if top is None or self._note_bytes[top] <= self._note_bytes[by] + max(grow, 0):
                self.counters["drop_note_full"] += 1
                return False
            oldest = min((x for x in self._notes.values() if x.by == top), key=lambda x: x.ts)
            self._unhold_note(oldest)
            del self._notes[oldest.slot]
            self._rights_changed()
            self.counters["note_evicted"] += 1
        return True

    def _unhold_note(self, n: Note) -> None:
        size = item_size(n)
        self._note_bytes[n.by] -= size
        self._note_bytes[""] -= size
        self._note_count[n.by] -= 1
        if not self._note_count[n.by]:
            del self._note_count[n.by], self._note_bytes[n.by]

    def _defer(self, key: str, stmt: Statement) -> None:
        """Keep a statement whose author (or subject) we do not know yet, or whose author we do
        not know to hold the right to make it; bounded in all and per key."""
        waiting = self._deferred.get(key)
        if waiting is not None and stmt in waiting:
            return
        if self._n_deferred >= self._cfg.max_deferred or (
                waiting is not None and len(waiting) >= self._cfg.max_deferred_per_author):
            self.counters["drop_statement_non_member"] += 1
            return
        self._deferred.setdefault(key, []).append(stmt)
        self._n_deferred += 1
        self.counters["statement_deferred"] += 1

    def _retry_deferred(self, key: str) -> None:
        waiting = self._deferred.pop(key, None)
        if waiting:
            self._n_deferred -= len(waiting)
            for stmt in waiting:
                self._apply(stmt)

    def _merge(
        self,
        members: Iterable[MemberState],
        cluster: Iterable[Statement],
        src: str,
        bcast: bool,
        literal: bool = False,
    ) -> None:
        """Merge a full state from `src` (push-pull or snapshot).

        Statements go first so that members' admissions are known before their records. As in
        memberlist, a member the remote believes dead is only *suspected* here: we may be able to
        reach it, and the suspicion gives it time to refute. `literal` (restoring our own
        snapshot) keeps the recorded states instead.
        """
        admits: list[Admit] = []
        others: list[Statement] = []
        for s in cluster:
            (admits if type(s) is Admit else others).append(s)  # type: ignore[arg-type]
        members = tuple(members)
        # `admitted` means "this id was just admitted". Re-reading our own snapshot is not an
        # admission, nor is the admission of a member the remote already knows gone (e.g. one we
        # reaped and a peer that has not yet reaped it teaches us again): such admissions are
        # applied without an event and without being gossiped on (gossiping them would teach
        # every member that reaped it again, each as a fresh `admitted`).
        quiet = (
            _EVERY_ID if literal else frozenset(ms.record.id for ms in members if ms.state in GONE)
        )
        self._quiet_admits = quiet or None
        try:
            self._apply_admits(admits, bcast)
        finally:
            self._quiet_admits = None
        for s in others:
            self._apply(s, bcast, src)
        for ms in members:
            rec = ms.record
            st = ms.state
            e = self._table.get(rec.id)
            if (st in GONE and rec.id != self.id and e is not None and e.state == LIMBO
                    and (rec.is_goodbye or ms.incarnation <= rec.incarnation)):
                # First news of a member that is already gone: record it quietly. Left only on
                # its own goodbye record; a death only at an incarnation its record announced.
                if e.admit is not None and self._verify_record(rec):
                    gone = LEFT if rec.is_goodbye else DEAD
                    inc = rec.incarnation if rec.is_goodbye else ms.incarnation
                    self._put(replace(e, state=gone, incarnation=inc, record=rec, since=self._now))
                continue
            self._apply_alive(rec, bcast)
            if st == ALIVE or rec.is_goodbye:  # a goodbye record is the leave itself
                continue
            if literal and st == SUSPECT:
                continue
            if literal:
                self._declare_dead(rec.id, ms.incarnation, bcast)
            else:  # dead, or "left" without the member's goodbye: only suspected here
                self._apply_suspect(Suspect(rec.id, ms.incarnation, src), bcast)

    def _apply_admits(self, admits: list[Admit], bcast: bool) -> None:
        """Apply a batch of admissions in dependency order (authors before those they admit)."""
        waiting: dict[str, list[Admit]] = {}
        ready: deque[Admit] = deque()
        for a in admits:
            e = self._table.get(a.id)
            if (e is not None and e.admit is not None) or self._authority(a.by, a):
                ready.append(a)
            else:
                waiting.setdefault(a.by, []).append(a)
        quiet = self._quiet_admits
        while ready:
            a = ready.popleft()
            # Not news (see `_merge`): not an event, and not worth gossiping either.
            if self._apply_admit(a, bcast and (quiet is None or a.id not in quiet)):
                ready.extend(waiting.pop(a.id, ()))
        for rest in waiting.values():
            for a in rest:
                self._defer(a.by, a)

    # ------------------------------------------------------------------ probing

    def _tick_probe(self, now: float) -> None:
        p = self._probe
        if p is not None:
            if not p.indirect and now >= p.indirect_at:
                p.indirect = True
                self._send_ping_reqs(p)
                # A second direct attempt alongside the indirect ones (memberlist's TCP fallback
                # ping): an ack lost once should not make a healthy member suspect.
                self._send(p.target, Ping(p.seq, p.target, p.nonce))
            if now >= p.end:
                self._probe = None
                self._probe_failed(p)
        if self._probe is None and now >= self._next_probe:
            if self._left:
                self._next_probe = _INF
                return
            target = self._next_probe_target()
            if target is None:
                self._next_probe = now + self._cfg.probe_interval
            else:
                self._start_probe(target, now)

    def _start_probe(self, target: str, now: float) -> None:
        cfg = self._cfg
        self._seq += 1
        nonce = self._rng.randbytes(16)
        end = now + self._awareness.scale(cfg.probe_interval)
        e = self._table.get(target)
        inc = e.incarnation if e is not None else 0
        timeout = now + self._awareness.scale(cfg.probe_timeout)
        p = _Probe(self._seq, target, inc, nonce, timeout, end)
        self._probe = p
        self._next_probe = end
        budget = cfg.piggyback_bytes
        piggyback: tuple[Item, ...] = ()
        if e is not None and e.state == SUSPECT:
            # Lifeguard buddy system: tell the suspect directly so it can refute at once.
            buddy = Suspect(target, e.incarnation, self.id)
            piggyback = (buddy,)
            budget -= item_size(buddy)
        self._send(target, Ping(p.seq, target, nonce, piggyback + self._piggyback(budget)))

    def _send_ping_reqs(self, p: _Probe) -> None:
        target = p.target

        def helper_ok(e: Entry) -> bool:
            return e.state in LIVE and e.id != target and e.id != self.id

        p.helpers = self._random_members(self._cfg.indirect_checks, helper_ok)
        for h in p.helpers:
            self._send(h, PingReq(p.seq, target, p.nonce))

    def _probe_failed(self, p: _Probe) -> None:
        expected = len(p.helpers)
        # Lifeguard: helpers that answered with a nack prove our own links work; missing nacks
        # (or having no helpers at all) suggest the problem may be us.
        self._awareness.apply_delta(expected - len(p.nacks) if expected else 1)
        e = self._table.get(p.target)
        if e is not None and e.state in LIVE and e.incarnation == p.incarnation:
            # Only the life we probed is accused: if the member announced a newer incarnation
            # meanwhile (it restarted), this stale probe says nothing about it (as memberlist).
            self._apply_suspect(Suspect(p.target, p.incarnation, self.id))

    def _next_probe_target(self) -> str | None:
        table = self._table
        for _ in range(table.id_space() + len(self._fresh) + 1):
            id_ = self._probe_order_next()
            if id_ is None:
                return None
            if id_ == self.id:
                continue
            e = table.get(id_)
            if e is not None and e.state in LIVE:
                return id_
        return None

    def _probe_order_next(self) -> str | None:
        """Randomised round-robin without a per-node shuffled list: each pass visits every
        position once as start + i*stride (mod n) with a random stride coprime to n; members
        added during a pass are interleaved at random points of the rest of the pass."""
        rng = self._rng
        remaining = self._pass_n - self._pass_i
        fresh = self._fresh
        if remaining <= 0 and not fresh:
            n = self._table.id_space()
            if n == 0:
                return None
            self._pass_n, self._pass_i = n, 0
            self._pass_start = rng.randrange(n)
            self._pass_stride = _coprime_stride(n, rng)
            remaining = n
        if fresh and rng.random() * (remaining + len(fresh)) < len(fresh):
            return fresh.pop(rng.randrange(len(fresh)))
        idx = (self._pass_start + self._pass_i * self._pass_stride) % self._pass_n
        self._pass_i += 1
        return self._table.id_at(idx)

    # ------------------------------------------------------------------ gossip and push-pull

    def _gossip_round(self, now: float) -> None:
        """Gossip to gossip_nodes random members while anything but quiet notes is queued
        (Config.quiet_topics: members' periodic statements, which ride pings and acks)."""
        self._next_gossip = _INF
        self._last_gossip = now
        if not self._queue.has_news():
            return
        horizon = now - self._cfg.gossip_to_the_dead_time
        me = self.id

        def target_ok(e: Entry) -> bool:
            st = e.state
            return e.id != me and (st in LIVE or (st in GONE and e.since >= horizon))

        n = self._live()
        for to in self._random_members(self._cfg.gossip_nodes, target_ok):
            items = self._queue.get(self._cfg.gossip_bytes, n)
            if not items:
                break
            self._send(to, Gossip(tuple(items)))
        if self._queue.has_news():
            self._next_gossip = self._next_grid(now)

    def _next_grid(self, now: float) -> float:
        """The next gossip slot strictly after `now` (float rounding may land on `now`)."""
        iv = self._cfg.gossip_interval
        k = math.floor((now - self._gossip_phase) / iv) + 1
        slot = self._gossip_phase + k * iv
        return slot if slot > now else slot + iv

    def _broadcast(self, subject: Hashable, item: Item) -> None:
        quiet = type(item) is Note and item.topic in self._cfg.quiet_topics
        self._queue.put(subject, item, item_size(item), quiet)
        if quiet:
            return  # it rides pings and acks (see _gossip_round)
        now = self._now
        # Eager dissemination: forward news at once unless we just ran a round.
        if self._cfg.eager_gossip and now - self._last_gossip >= self._cfg.gossip_interval / 2:
            self._next_gossip = min(self._next_gossip, now)
        elif self._next_gossip == _INF:
            self._next_gossip = self._next_grid(now)

    def _piggyback(self, budget: int) -> tuple[Item, ...]:
        if not self._queue or budget <= 0:
            return ()
        return tuple(self._queue.get(budget, self._live()))

    def _start_push_pull(self, to: str, join: bool) -> None:
        if to in self._pp_out:
            return
        self._pp_out[to] = (self._now + self._cfg.push_pull_timeout, join)
        self._send(to, PushPull(join, self._member_states(), self._statements()))

    def _member_states(self) -> tuple[MemberState, ...]:
        return tuple(
            MemberState(e.record, e.state, e.incarnation)
            for e in self._table
            if e.state in MEMBER and e.record is not None
        )

    def _statements(self) -> tuple[Statement, ...]:
        out: list[Statement] = []
        for e in self._table:
            out.extend(self._entry_statements(e))
        out.extend(self._notes.values())
        return tuple(out)

    @staticmethod
    def _entry_statements(e: Entry) -> list[Statement]:
        out: list[Statement] = []
        if e.admit is not None:
            out.append(e.admit)
        if e.ban is not None:
            out.append(e.ban)
        if e.rename is not None:
            out.append(e.rename)
        if e.state == PENDING and e.record is not None:
            out.append(Pending(e.record, e.how))
        return out

    # ------------------------------------------------------------------ timers

    def _expire_relays(self, now: float) -> None:
        heap = self._relay_heap
        while heap and heap[0][0] <= now:
            _, target, seq, requester = heapq.heappop(heap)
            waiting = self._relays.get((target, seq))
            if waiting and requester in waiting:
                waiting.remove(requester)
                if not waiting:
                    del self._relays[(target, seq)]
                self._send(requester, Nack(seq))

    def _expire_suspicions(self, now: float) -> None:
        heap = self._susp_heap
        while heap and heap[0][0] <= now:
            _, sid = heapq.heappop(heap)
            sus = self._suspicions.get(sid)
            if sus is None or sus.deadline() > now:
                continue
            del self._suspicions[sid]
            e = self._table.get(sid)
            if e is not None and e.state == SUSPECT:
                self._declare_dead(sid, e.incarnation)

    def _expire_push_pulls(self, now: float) -> None:
        for to, (deadline, join) in list(self._pp_out.items()):
            if deadline <= now:
                del self._pp_out[to]
                self.counters["push_pull_timeout"] += 1
                if join:
                    self._event("join_failed", id=to)

    def _reap(self, now: float) -> None:
        heap = self._reap_heap
        cfg = self._cfg
        while heap and heap[0][0] <= now:
            _, id_ = heapq.heappop(heap)
            e = self._table.get(id_)
            if e is None or id_ == self.id:
                continue
            if (e.state in GONE and e.since + cfg.dead_reap_after <= now) or (
                e.state == PENDING and e.since + cfg.pending_expire_after <= now
            ):
                self._table.delete(id_)
                self._dead.pop(id_, None)
                self._news.pop(id_, None)
                self._unlist_pending(id_)
                self._event("member_reaped", id=id_, state=e.state)

    def _push_reap(self, id_: str, after: float) -> None:
        heapq.heappush(self._reap_heap, (self._now + after, id_))

    # ------------------------------------------------------------------ helpers

    def _put(self, e: Entry) -> Entry | None:
        """Store an entry and keep the derived indexes (dead set, timers, probe order) in step."""
        old = self._table.put(e)
        st = e.state
        old_st = old.state if old is not None else None
        if st == DEAD:
            self._dead[e.id] = None
        elif old_st == DEAD:
            self._dead.pop(e.id, None)
        if old_st != st:
            if old_st == SUSPECT:
                self._suspicions.pop(e.id, None)
            elif old_st == PENDING:
                self._unlist_pending(e.id)
            if st in GONE:
                self._push_reap(e.id, self._cfg.dead_reap_after)
            elif st == PENDING:
                self._push_reap(e.id, self._cfg.pending_expire_after)
            elif (
                st in LIVE
                and old_st not in LIVE
                and e.id != self.id
                and self._table.index_of(e.id) >= self._pass_n
            ):
                self._fresh.append(e.id)
        return old

    def _self_entry(self) -> Entry:
        e = self._table.get(self.id)
        assert e is not None
        return e

    def _live(self) -> int:
        return self._table.count(ALIVE) + self._table.count(SUSPECT)

    def _is_live_peer(self, e: Entry) -> bool:
        return e.state in LIVE and e.id != self.id

    def _random_members(self, k: int, ok: Callable[[Entry], bool]) -> list[str]:
        """Up to k distinct random ids whose entries satisfy `ok`, without listing a big table."""
        if k <= 0:
            return []
        table = self._table
        rng = self._rng
        n = table.id_space()
        if n > _SMALL_TABLE:
            chosen: list[str] = []
            for _ in range(4 * k + 16):
                id_ = table.id_at(rng.randrange(n))
                e = table.get(id_)
                if e is not None and id_ not in chosen and ok(e):
                    chosen.append(id_)
                    if len(chosen) == k:
                        return chosen
            rest = [e.id for e in table if e.id not in chosen and ok(e)]
            return chosen + rng.sample(rest, min(k - len(chosen), len(rest)))
        cands = [e.id for e in table if ok(e)]
        return rng.sample(cands, min(k, len(cands)))

    def _send(self, to: str, msg: Message) -> None:
        self._out.append(Send(to, msg))
        self.counters[_SENT_KEY[type(msg)]] += 1

    def _event(self, kind: str, **data: Any) -> None:
        self._out.append(Event(kind, data))

    def _verify(self, by: str, body: bytes, sig: bytes) -> bool:
        if self._crypto.verify(by, body, sig):
            return True
        self.counters["drop_bad_signature"] += 1
        return False

    def _verify_record(self, rec: Record) -> bool:
        return self._verify(rec.id, rec.body(), rec.signature)

    def _ts(self) -> int:
        return max(0, int(self._now * 1000))

    def _make_admit(self, id_: str, how: str) -> Admit:
        ts = self._ts()
        return Admit(id_, self.id, how, ts, self._crypto.sign(admit_body(id_, self.id, how, ts)))

    def _view(self, e: Entry) -> MemberView:
        a = e.admit
        return MemberView(
            id=e.id,
            state=e.state,
            incarnation=e.incarnation,
            record=e.record,
            since=e.since,
            admitted_by=a.by if a is not None else None,
            how=a.how if a is not None else e.how,
            name=e.name,
            admitted_at=float(a.ts) if a is not None else None,
        )


def _accuser(news: Suspect | Dead) -> tuple[str, str]:
    """Who a suspicion's confirmation comes from. An accuser's death verdict counts apart from
    its first suspicion: the verdict says its suspicion outlived the time to refute."""
    return (DEAD if type(news) is Dead else SUSPECT, news.from_id)


def _coprime_stride(n: int, rng: random.Random) -> int:
    if n <= 2:
        return 1
    while True:
        s = rng.randrange(1, n)
        if math.gcd(s, n) == 1:
            return s


_HANDLERS: dict[type, Callable[[Membership, str, Any], None]] = {
    Ping: Membership._on_ping,
    Ack: Membership._on_ack,
    PingReq: Membership._on_ping_req,
    Nack: Membership._on_nack,
    Gossip: Membership._on_gossip,
    PushPull: Membership._on_push_pull,
    PushPullReply: Membership._on_push_pull_reply,
}
