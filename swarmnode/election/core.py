"""The `Election` state machine: Raft (election with pre-vote, check-quorum and leases, and log
replication with snapshots), sans-I/O.

It picks the build scheduler and replicates the job ledger: the leader appends entries to its
log, replicates them to every voter and observer, and an entry is committed once a majority of
the voters store it. Committed entries come out as `Apply` outputs, in index order, on every
node; the state machine they drive (the ledger) lives outside.

Election (at most one leader per term):

- Terms and one vote per term. A vote, and every term change, is handed to the shell as a
  `Persist` output *before* the message that depends on it: outputs are in order, and the shell
  must write each `Persist*` durably before acting on anything drained after it (a `Send` or an
  `Apply`). A node restarted without its persisted vote could vote twice in one term and elect
  two leaders.
- Randomized election timeouts, fresh for every wait, so one voter usually campaigns alone.
- Pre-vote: a voter whose timer fires first asks the other voters whether they would vote for it
  in term + 1, and only with a majority of yeses increments its term. A partitioned or rejoining
  node therefore cannot inflate its term and depose a working leader when it returns.
- Leader stickiness: a voter that heard a leader less than `election_timeout_min` ago refuses
  pre-votes and votes (and does not adopt the candidate's term). This is also what makes the
  leader's lease sound: see `leader_lease_valid`.
- Check-quorum: a leader that has not heard replies from a majority of voters for
  `check_quorum_timeout` steps down, so a leader cut off from the majority stops leading.

Replication (no committed entry is ever lost or changed):

- Log matching: an AppendEntries names the entry before its batch; a follower accepts the batch
  only if its log holds that entry with that term, and then drops any conflicting suffix. A
  follower's new entries are `PersistEntries` outputs, durable before its reply goes out.
- The vote restriction: a voter refuses (also in the pre-vote) a candidate whose log ends at a
  lower (last term, last index) than its own. Every majority that elects a leader overlaps
  every majority that committed an entry, so the new leader holds every committed entry.
- A leader commits by counting replicas only entries of its own term; earlier entries commit
  with them. It appends a no-op on election, so what its predecessors committed (or nearly
  did) is settled promptly, and `can_schedule` waits until that no-op is applied: only then
  does the leader's ledger reflect every committed decision.
- Snapshots: the shell hands the state machine's snapshot to `compact`; the log is dropped
  through it but for a tail (`Config.compact_keep_entries`), so a follower a little behind
  still gets entries. One needing entries before the tail gets the snapshot in
  `InstallSnapshot` chunks and a `Restore` output.

Voters are a small set given from outside (`voters.target_voters` over the membership view);
non-voters ("observers") receive the log too (so any node can answer ledger queries), never
campaign or vote, and do not count for commit. Quorum is a majority of the voter set: one voter
elects itself and commits alone; two voters need each other, so with one of two dead there is
no leader until the voter set shrinks.

Limits: voter-set changes are not agreed through consensus here. Safety holds while any two
voter sets in use differ by at most one member (every two majorities then overlap); the shell
moves one change at a time (`voters.step_voters`). A set shrinking from two to one on both sides
of a partition gives each side a leader, and whatever the side that later loses the election
committed alone is overwritten: that is the price of a two-node cluster scheduling with one node
down, acceptable only when "down" means dead.

Like the membership core, nothing here touches a socket, a clock or global randomness.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .config import Config
from .log import MAX_ENTRY, Log, LogEntry, Snapshot, encode_entry
from .messages import (
    MAX_APPEND_ENTRIES,
    MAX_ID,
    MAX_U63,
    AppendEntries,
    AppendReply,
    InstallSnapshot,
    LeaderProof,
    Message,
    MessageError,
    PreVote,
    PreVoteReply,
    ProofRequest,
    RequestVote,
    SnapshotReply,
    VoteProof,
    VoteReply,
)
from .proof import Signatures, proof_valid, vote_payload

FOLLOWER = "follower"
PRE_CANDIDATE = "pre_candidate"
CANDIDATE = "candidate"
LEADER = "leader"
ROLES = (FOLLOWER, PRE_CANDIDATE, CANDIDATE, LEADER)
MAX_SNAPSHOT = 256 * 1024 * 1024
"""A snapshot being received may not grow beyond this (memory held for a sender we trust, but
a bug there must not exhaust ours)."""
_INF = math.inf
MAX_TERM_STEP = 1000
"""The furthest a voter's unproven word (a vote request, a reply) may move our term. Honest
terms grow by one per election; a proven leader's term may jump any distance (a majority
signed it). Without the bound one message at term 2^63-1 wedged the cluster for good."""
PROVEN_KEPT = 16
"""Terms whose proven leader is remembered (the current one is what matters; a few more let a
worker check an assignment from a term it just left)."""
_VOTER_ONLY: tuple[type, ...] = (PreVote, PreVoteReply, RequestVote, VoteReply, VoteProof)
"""Messages only a voter may send: a member outside our voter set neither stands nor votes."""


@dataclass(frozen=True, slots=True)
class Persisted:
    """What must survive a restart besides the log: the current term, whom we voted for, and
    the leader of that term whose proof we checked (a node that restarts holding a voter set
    the leader grew after its election could not check that proof again)."""

    term: int = 0
    voted_for: str | None = None
    leader: str | None = None

    def to_plain(self) -> dict[str, Any]:
        plain = {"term": self.term, "voted_for": self.voted_for}
        return plain if self.leader is None else {**plain, "leader": self.leader}

    @classmethod
    def from_plain(cls, obj: object) -> Persisted:
        """Strictly load the stored form; raises MessageError for anything else."""
        if type(obj) is not dict or not {"term", "voted_for"} <= obj.keys() <= {
                "term", "voted_for", "leader"}:
            raise MessageError("persisted: expected a map with keys term, voted_for[, leader]")
        term, voted, leader = obj["term"], obj["voted_for"], obj.get("leader")
        if type(term) is not int or not 0 <= term <= MAX_U63:
            raise MessageError("persisted.term: expected int")
        for what, value in (("voted_for", voted), ("leader", leader)):
            if value is not None and (type(value) is not str or not 1 <= len(value) <= MAX_ID):
                raise MessageError(f"persisted.{what}: expected an id or None")
        return cls(term, voted, leader)


@dataclass(frozen=True, slots=True)
class Send:
    to: str
    msg: Message


@dataclass(frozen=True, slots=True)
class Persist:
    """Write (term, voted_for, the term's proven leader) durably before acting on anything
    drained after this."""

    term: int
    voted_for: str | None
    leader: str | None = None


@dataclass(frozen=True, slots=True)
class PersistEntries:
    """Replace the stored entries from index `start` on by `entries` (possibly none: a
    truncation), durably before acting on anything drained after this."""

    start: int
    entries: tuple[LogEntry, ...]


@dataclass(frozen=True, slots=True)
class PersistSnapshot:
    """Store `snapshot` and delete the stored entries before `keep_from` (at most the snapshot's
    index + 1: the entries from it on stay, a tail the snapshot also covers), durably before
    acting on anything drained after this."""

    snapshot: Snapshot
    keep_from: int


@dataclass(frozen=True, slots=True)
class Apply:
    """Entry `index` is committed: apply it to the state machine. Outputs come in index order
    without gaps (after a restart, from the snapshot's index + 1). `entry` is the proposed
    bytes; `b""` is a leader's no-op."""

    index: int
    term: int
    entry: bytes


@dataclass(frozen=True, slots=True)
class Restore:
    """Replace the state machine by `snapshot` (received from the leader); `Apply`s continue
    from its index + 1."""

    snapshot: Snapshot


@dataclass(frozen=True, slots=True)
class Event:
    """kind is one of: term_changed {term, old}, leader_changed {term, leader (None: unknown)},
    leader_elected {term} (this node won), stepped_down {term, reason} (reason: higher_term,
    check_quorum or not_a_voter)."""

    kind: str
    data: dict[str, Any]


Output = Send | Persist | PersistEntries | PersistSnapshot | Apply | Restore | Event


@dataclass(slots=True)
class Progress:
    """The leader's view of one follower's log."""

    next: int
    """The next index to send: a failed consistency check moves it back, a success forward."""
    match: int = 0
    """The highest index known to match our log (only ever grows within one leadership)."""
    snap_index: int = 0
    snap_offset: int = 0
    """Bytes of snapshot `snap_index` the follower holds."""
    sent_commit: int = 0
    """The commit index in the latest AppendEntries sent to it."""
    wait_until: float = -math.inf
    """Until then, data sent to it (`wait_for`) awaits its reply, and heartbeats carry none."""
    wait_for: int = 0
    """The reply that ends the wait: a batch's last index, or a snapshot chunk's end offset."""
    wait_chunk: bool = False
    """Whether that data is a snapshot chunk (an InstallSnapshot's reply ends the wait)."""
    wait_seq: int = 0
    """The heartbeat round it was sent in: a reply to a later one ends the wait too (the
    follower reads again: the data went, or was lost on the way)."""
    retry: float = 0.0
    """The next wait (0: election_timeout_min); it doubles while the follower is silent."""
    pull_at: float = -math.inf
    """An idle observer's next keepalive (Config.observer_keepalive)."""
    batch_at: float = -math.inf
    """The earliest an idle observer gets what it lacks (Config.observer_batch_interval)."""
    heard: bool = False
    """It has answered this leadership: until then an idle observer is sent to as if it lacked
    something (with the backoff of a data send), so a first message lost (a newcomer that did
    not know us as a member yet) costs a retry, not a keepalive interval."""
    full: bool = False
    """The latest batch sent to it stopped short of our last entry: it is catching up, so its
    reply gets the next batch at once, idle observer or not."""


@dataclass(slots=True)
class _Incoming:
    """A snapshot being received in chunks."""

    term: int
    index: int
    snap_term: int
    data: bytearray = field(default_factory=bytearray)


class Election:
    """One node's part in electing the scheduler and replicating the ledger. See the module
    docstring for the model. `persisted`, `log` and `snapshot` are what the node stored (all
    that a restart gets back); the shell restores its state machine from `snapshot` itself."""

    def __init__(
        self,
        node_id: str,
        voters: Iterable[str],
        config: Config,
        rng: random.Random,
        now: float,
        persisted: Persisted | None = None,
        *,
        observers: Iterable[str] = (),
        log: Iterable[LogEntry] = (),
        snapshot: Snapshot | None = None,
        signatures: Signatures,
        root: str | None = None,
    ) -> None:
        self.id = node_id
        self.signatures = signatures
        self.root = root
        """The cluster's founder: the voter set a node without a configuration trusts."""
        self.newest_voters: frozenset[str] = frozenset()
        """The voter set of a configuration our log holds beyond the one applied (the shell
        decodes entries, so it says): a reference for leader proofs too (`proof_valid`)."""
        self.counters: Counter[str] = Counter()
        self._cfg = config
        self._rng = rng
        self._now = now
        self._out: list[Output] = []
        self._voters: frozenset[str] = frozenset()
        self._observers: frozenset[str] = frozenset()
        self._peers: list[str] = []
        self._term = persisted.term if persisted is not None else 0
        self._voted_for = persisted.voted_for if persisted is not None else None
        self._dirty = False
        self._role = FOLLOWER
        self._leader: str | None = None
        # Sticky from the start: a leader may hold a lease on our last acknowledgement from
        # before a restart, so we vote for nobody (ourselves included) for one minimum timeout.
        self._heard_leader_at = now
        # stalls: when we last ran, when we last let one pass, how patient they made us
        self._last_run = now
        self._grace_at = -_INF
        self._grace_until = -_INF
        self._patience = 0  # timeouts x 2 ** patience
        self._patience_at = -_INF
        self._election_at = _INF
        self._granted: set[str] = set()
        self._votes: dict[str, bytes] = {}  # signed votes for us in our term (as candidate)
        self._proof: LeaderProof | None = None  # ours, while leading
        self._proof_set: frozenset[str] = frozenset()  # the voter set our proof counts against
        self._vote_asked: dict[str, float] = {}  # voter -> when we (leader) last asked its vote
        self._proof_checked: dict[str, float] = {}  # sender -> when we last checked its proof
        self._proven: dict[int, str] = {}  # term -> the leader whose proof we checked
        if persisted is not None and persisted.leader is not None:
            self._proven[persisted.term] = persisted.leader
        self._proof_asked: tuple[str, int, float] | None = None  # (leader, term, when)
        self._proof_sent: dict[str, float] = {}  # peer -> when we last sent it our proof
        # the latest leader message refused for want of its proof, handled once it arrives
        # (the proof is sent first, but two connections to a peer may reorder them)
        self._held: tuple[str, AppendEntries | InstallSnapshot] | None = None
        # the log
        self._snapshot = snapshot
        snap_index, snap_term = (snapshot.index, snapshot.term) if snapshot else (0, 0)
        self._log = Log(snap_index, snap_term, log)
        self._log_dirty_from: int | None = None
        self._commit = snap_index
        self._applied = snap_index
        # (term, commit index) the leader of that term last stated: a replica whose own commit
        # index lags (it advances only as matching entries arrive) still knows how far behind
        # it is -- a new member's 0 is not "caught up"
        self._stated_commit = (0, 0)
        self._incoming: _Incoming | None = None
        # leader state
        self._seq = 0
        self._heartbeat_at = _INF
        self._notify_at = _INF  # when to tell up-to-date followers a new commit index
        self._sent_at: dict[int, float] = {}
        self._acked: dict[str, float] = {}
        self._acked_quorum: float | None = None  # _quorum_acked's value until _acked changes
        self._quorum_base = -_INF
        self._progress: dict[str, Progress] = {}
        self._term_start = 0
        self._pushed: frozenset[str] = frozenset()
        self._set_peers(frozenset(voters), frozenset(observers))
        self._arm_election_timer(now)

    # ------------------------------------------------------------------ public API

    @property
    def term(self) -> int:
        return self._term

    @property
    def role(self) -> str:
        return self._role

    @property
    def leader(self) -> str | None:
        """The leader this node currently believes in (itself when leading), or None."""
        return self._leader

    @property
    def voted_for(self) -> str | None:
        return self._voted_for

    @property
    def voters(self) -> frozenset[str]:
        return self._voters

    @property
    def observers(self) -> frozenset[str]:
        return self._observers

    @property
    def pushed(self) -> frozenset[str]:
        """Observers heartbeated like voters (those running jobs); the others are idle."""
        return self._pushed

    def proven_leader(self, term: int) -> str | None:
        """The leader of `term` whose proof this node checked (itself when it won), or None:
        only its word in that term counts (assignments and cancellations included)."""
        return self._proven.get(term)

    @property
    def proven_terms(self) -> Mapping[int, str]:
        """Every term whose proven leader this node remembers (read only: for the simulators'
        checks)."""
        return MappingProxyType(self._proven)

    @property
    def quorum(self) -> int:
        return len(self._voters) // 2 + 1

    @property
    def log(self) -> Log:
        """The log (read only: for status pages and the simulator's checks)."""
        return self._log

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    @property
    def commit_index(self) -> int:
        return self._commit

    @property
    def leader_commit(self) -> int:
        """The highest index known committed: ours, or what this term's proven leader stated
        in its AppendEntries (a replica that has applied less is behind)."""
        term, stated = self._stated_commit
        return max(self._commit, stated if term == self._term else 0)

    def holds_commit(self, peer: str) -> bool:
        """As leader: `peer`'s log is known to hold every committed entry (Raft's catch-up
        rule: a member becomes a voter only then, so the quorum it joins does not wait on
        its catching up)."""
        pr = self._progress.get(peer)
        return self._role == LEADER and pr is not None and pr.match >= self._commit

    @property
    def applied_index(self) -> int:
        return self._applied

    def handle(self, now: float, sender: str, msg: Message) -> None:
        """Process one message from `sender` (authenticated by the transport)."""
        self._now = self._last_run = now
        fn = _HANDLERS.get(type(msg))
        if fn is None:
            self.counters["drop_unknown_message"] += 1
        elif sender == self.id:
            self.counters["drop_from_self"] += 1
        elif isinstance(msg, _VOTER_ONLY) and sender not in self._electors():
            self.counters["drop_not_voter"] += 1
        else:
            fn(self, sender, msg)
        self._flush_persist()

    def tick(self, now: float) -> None:
        """Run every timer due by `now`."""
        self._now = now
        self._check_stall(now)
        self._last_run = now
        if self._role == LEADER:
            if now >= max(self._quorum_deadline(), self._grace_until):
                self._become_follower(self._term, "check_quorum")
            elif now >= self._heartbeat_at:
                self._broadcast_heartbeat(now)
            elif now >= self._notify_at:
                self._notify_commit()
        elif now >= self._election_at:
            if now < self._grace_until:
                self._election_at = self._grace_until
            else:
                self._election_timer_fired(now)
        self._flush_persist()

    def next_deadline(self) -> float:
        """When `tick` must next be called (may be early; never late). A voter is ticked at
        least every heartbeat_interval, so that a stall shows (Config.stall_grace)."""
        if self._role == LEADER:
            return min(self._heartbeat_at, self._notify_at,
                       max(self._quorum_deadline(), self._grace_until))
        if self._cfg.stall_grace and self.id in self._voters:
            return min(self._election_at, self._last_run + self._cfg.heartbeat_interval)
        return self._election_at

    def _check_stall(self, now: float) -> None:
        """A gap of over two heartbeat intervals since we last ran is a stall of this node
        (Config.stall_grace): a grace of two intervals for timers that expired meanwhile, at
        most once per election_timeout_min, and more patience; patience returns one step per
        patience_decay quiet seconds."""
        cfg = self._cfg
        if not cfg.stall_grace or self.id not in self._voters:
            return
        if now - self._last_run > max(2 * cfg.heartbeat_interval, cfg.stall_min):
            self.counters["stalls"] += 1
            self._patience = min(self._patience + 1, cfg.max_patience)
            self._patience_at = now
            if now - self._grace_at >= cfg.election_timeout_min:
                self._grace_at = now
                self._grace_until = now + 2 * cfg.heartbeat_interval
        elif self._patience and now - self._patience_at >= cfg.patience_decay:
            self._patience -= 1
            self._patience_at = now

    def _check_late(self, gap: float) -> None:
        """A voter that heard its leader `gap` after the time before, or a leader a voter's
        reply `gap` after its round went, over late_gap, while itself running on time (a
        stall of its own is counted by `_check_stall`): the other side or the path is slow
        now -- a loaded machine, a busy leader -- and the next such gap would be an election
        (or a step-down) on a late packet. More patience, as for a stall of its own."""
        cfg = self._cfg
        if (not cfg.stall_grace or self.id not in self._voters or gap <= cfg.late_gap
                or self._now - self._last_run > max(2 * cfg.heartbeat_interval, cfg.stall_min)):
            return
        self.counters["late"] += 1
        self._patience = min(self._patience + 1, cfg.max_patience)
        self._patience_at = self._now

    def drain(self) -> list[Output]:
        """Outputs produced since the last drain, in order (see `Persist` for why it matters)."""
        out, self._out = self._out, []
        return out

    def propose(self, now: float, entry: bytes | dict[str, Any]) -> int | None:
        """Append `entry` (bytes, or a plain map encoded with msgpack) to the log and start
        replicating it; its index, or None when this node is not a leader holding a lease
        (the shell then forwards to the leader it knows). The index is only a promise: the
        entry is accepted once an `Apply` of that index *and term* comes out. Raises
        ValueError for an empty or oversized entry."""
        self._now = now
        if not self.leader_lease_valid(now):
            self.counters["propose_refused"] += 1
            return None
        data = bytes(entry) if isinstance(entry, bytes | bytearray) else encode_entry(entry)
        if not data or len(data) > MAX_ENTRY:
            raise ValueError(f"an entry has 1..{MAX_ENTRY} bytes (empty is the leader's no-op)")
        index = self._append_own(data)
        for peer, pr in self._progress.items():
            # up to date: send now; others get it after their catch-up (idle observers batched)
            if pr.next == index and self._streamed(peer):
                self._send_append(peer)
        self._leader_commit()
        self._flush_persist()
        return index

    def compact(self, index: int, data: bytes) -> bool:
        """Take `data`, the state machine's snapshot as of applied entry `index`, and drop the
        log through it but for a tail (`Config.compact_keep_entries`). False (nothing done)
        unless index is applied and beyond the current snapshot. The shell calls this when the
        log has grown enough to be worth it."""
        if not self._snapshot_index < index <= self._applied:
            return False
        term = self._log.term_at(index)
        assert term is not None
        self._flush_persist()  # pending entries reach the disk before the snapshot drops them
        snap = Snapshot(index, term, bytes(data))
        cfg = self._cfg
        base = self._log.tail_start(index, cfg.compact_keep_entries, cfg.compact_keep_bytes)
        self._log.trim(base)
        self._snapshot = snap
        self._out.append(PersistSnapshot(snap, base + 1))
        self.counters["compactions"] += 1
        return True

    @property
    def _snapshot_index(self) -> int:
        return self._snapshot.index if self._snapshot else 0

    def can_schedule(self, now: float) -> bool:
        """A leader with a lease whose applied state includes everything committed before its
        term (its no-op is applied): only then may it decide from the ledger, e.g. assign."""
        return self.leader_lease_valid(now) and self._applied >= self._term_start

    def set_voters(
        self,
        now: float,
        voters: Iterable[str],
        observers: Iterable[str] | None = None,
        pushed: Iterable[str] | None = None,
    ) -> None:
        """Adopt a new voter set (and observer set, and the observers to heartbeat like voters,
        if given) decided outside, e.g. by `target_voters` over the membership view. Repeating
        the current sets changes nothing, so the shell may call this on every change."""
        self._now = now
        old = self._voters
        voters = frozenset(voters)
        self._set_peers(voters, self._observers if observers is None else frozenset(observers),
                        self._pushed if pushed is None else frozenset(pushed))
        if voters == old:
            return
        if self.id in voters - old and self._role == FOLLOWER:
            # an observer's patience with silence was long: a voter's is short
            self._election_at = min(self._election_at, now + self._timeout())
        if self.id not in voters:
            if self._role == LEADER:
                self._become_follower(self._term, "not_a_voter")
            self._role = FOLLOWER
            self._granted.clear()
        elif self._role == LEADER:
            if voters - old:
                # New voters have not been heartbeated yet: one check-quorum period for them.
                self._quorum_base = now
            self._leader_commit()  # a smaller quorum may commit what is already stored
            self._proof = self._make_proof()  # (the votes we hold may be a majority of it)
        elif self._role in (PRE_CANDIDATE, CANDIDATE):
            self._granted &= voters
            self._advance_if_quorum(now)
        elif len(voters) == 1:
            self._arm_election_timer(now)  # a lone voter campaigns as soon as it may
        self._flush_persist()

    def leader_gone(self, now: float, member: str) -> None:
        """Membership found `member` dead or gone: an observer following it forgets it (a
        voter's own timer does that)."""
        self._now = now
        if self._leader == member and self._role == FOLLOWER and self.id not in self._voters:
            self._set_leader(None)
        self._flush_persist()

    def leader_lease_valid(self, now: float) -> bool:
        """True while this node leads and no other leader can exist: a majority of voters
        acknowledged a heartbeat sent less than `lease_duration` ago, and each of them refuses
        to vote for `election_timeout_min` after receiving it. Check before scheduling."""
        return self._role == LEADER and now < self.lease_expiry()

    def lease_expiry(self) -> float:
        """When the current lease ends (-inf when not leading, inf for a lone voter)."""
        if self._role != LEADER:
            return -_INF
        return self._quorum_acked() + self._cfg.lease_duration

    def status(self, now: float) -> dict[str, Any]:
        """A plain snapshot for status pages and logs."""
        return {
            "id": self.id,
            "term": self._term,
            "role": self._role,
            "leader": self._leader,
            "voted_for": self._voted_for,
            "voters": sorted(self._voters),
            "lease_valid": self.leader_lease_valid(now),
            "last_index": self._log.last_index,
            "commit": self._commit,
            "applied": self._applied,
            "snapshot_index": self._snapshot_index,
            "log_base": self._log.base_index,
        }

    # ------------------------------------------------------------------ election messages

    def _on_pre_vote(self, src: str, m: PreVote) -> None:
        if m.candidate != src:
            self.counters["drop_spoofed_candidate"] += 1
            return
        # No term change here whatever the outcome: that is the point of a pre-vote.
        granted = (
            self._may_vote_for(src)
            and m.next_term > self._term
            and self._log_ok(m.last_index, m.last_term)
        )
        self.counters["pre_vote_granted" if granted else "pre_vote_refused"] += 1
        self._send(src, PreVoteReply(m.next_term, granted, self._term))

    def _on_pre_vote_reply(self, src: str, m: PreVoteReply) -> None:
        if m.term > self._term:
            self._higher_term(m.term)
            return
        if self._role == PRE_CANDIDATE and m.granted and m.next_term == self._term + 1:
            self._count_grant(src)

    def _on_request_vote(self, src: str, m: RequestVote) -> None:
        if m.candidate != src:
            self.counters["drop_spoofed_candidate"] += 1
            return
        if m.term < self._term:
            self._send(src, VoteReply(self._term, False))
            return
        if m.term > self._term + MAX_TERM_STEP:
            self.counters["drop_term_jump"] += 1
            return
        ours = m.term == self._term and src == self._leader and self._role == FOLLOWER
        if self._sticky(self._now) and not ours:
            # Neither the vote nor the term: a live leader exists as far as we know (unless
            # it is that leader asking for a vote in its own term: `_ask_votes`).
            self.counters["vote_refused_sticky"] += 1
            self._send(src, VoteReply(self._term, False))
            return
        if m.term > self._term:
            self._become_follower(m.term, "higher_term")
        if (
            (ours or self._may_vote_for(src))
            and self._voted_for in (None, src)
            and self._log_ok(m.last_index, m.last_term)
        ):
            if self._voted_for != src:
                self._voted_for = src
                self._dirty = True
            if self._role == PRE_CANDIDATE:
                self._role = FOLLOWER
            self._election_at = self._now + self._timeout()
            self.counters["vote_granted"] += 1
            sig = self.signatures.sign(vote_payload(self._term, src))
            self._send(src, VoteProof(self._term, src, sig))
            self._send(src, VoteReply(self._term, True))
        else:
            self.counters["vote_refused"] += 1
            self._send(src, VoteReply(self._term, False))

    def _on_vote_reply(self, src: str, m: VoteReply) -> None:
        """A refusal's term may tell us we are behind; a grant counts only with its signature
        (`VoteProof`), which the proof of our leadership is made of."""
        if m.term > self._term:
            self._higher_term(m.term)

    def _on_vote_proof(self, src: str, m: VoteProof) -> None:
        if m.candidate != self.id or m.term != self._term or self._role not in (CANDIDATE, LEADER):
            return
        if not self.signatures.verify(src, vote_payload(m.term, self.id), m.sig):
            self.counters["bad_vote_signature"] += 1
            return
        self._votes[src] = m.sig
        if self._role == CANDIDATE:
            self._count_grant(src)
        else:  # a late vote, or one we asked for (`_ask_votes`): the proof grows stronger
            self._proof = self._make_proof()

    # ------------------------------------------------------------------ proof of leadership

    def _make_proof(self) -> LeaderProof:
        """The votes of the set we were elected by, or of the voter set we lead now once a
        majority of it signed (`_ask_votes`): a verifier checks a proof against its own voter
        set, so one that names the current set is believed by every member within one change
        of it -- also by those that missed the changes since our election. Never for fewer
        signatures than two, if it had them: a node without voters believes two (`proof_valid`),
        and a leader left alone by a shrink keeps the proof of the pair that elected it."""
        signed = len(self._votes.keys() & self._voters)
        if self.id in self._voters and signed >= self.quorum and \
                signed >= min(2, len(self._votes.keys() & self._proof_set)):
            self._proof_set = self._voters
        voters = self._proof_set
        votes = tuple(sorted((v, s) for v, s in self._votes.items() if v in voters))
        return LeaderProof(self._term, self.id, tuple(sorted(voters)), votes)

    def _ask_votes(self, now: float) -> None:
        """As leader whose proof names an older voter set: ask each voter whose vote it lacks
        for one in our term (at most once per minimum election timeout). A follower grants
        its current leader that vote despite stickiness (`_on_request_vote`); a vote for the
        term's only leader changes nobody's choice. Without it a leader elected by a set of
        one keeps a proof of one signature, which a member that missed two of the changes
        since cannot believe: it would never catch up, and never become a voter either."""
        if self._proof is None or self._proof_set == self._voters:
            return
        last_index, last_term = self._log.last_index, self._log.last_term
        for peer in self._voters - self._votes.keys():
            if now - self._vote_asked.get(peer, -_INF) >= self._cfg.election_timeout_min:
                self._vote_asked[peer] = now
                self._send(peer, RequestVote(self._term, self.id, last_index, last_term))

    def _send_proof(self, peer: str) -> None:
        if self._proof is not None:
            self._proof_sent[peer] = self._now
            self._send(peer, self._proof)

    def _on_proof_request(self, src: str, m: ProofRequest) -> None:
        """Answered at most once per heartbeat interval per peer: a 1.6 KiB answer to a few
        bytes must not become an amplifier."""
        if self._role != LEADER or m.term != self._term or src not in self._progress:
            return
        if self._now - self._proof_sent.get(src, -_INF) < self._cfg.heartbeat_interval:
            self.counters["proof_request_limited"] += 1
            return
        self._send_proof(src)

    def _on_leader_proof(self, src: str, m: LeaderProof) -> None:
        if m.leader != src:
            self.counters["drop_spoofed_leader"] += 1
            return
        if m.term < self._term or self._proven.get(m.term) == src:
            return
        if m.term in self._proven:  # two proven leaders of one term: a voter voted twice
            self.counters["conflicting_leader_proof"] += 1
            return
        asked = self._proof_asked is not None and self._proof_asked[:2] == (src, m.term)
        if not asked and self._now - self._proof_checked.get(src, -_INF) < \
                self._cfg.heartbeat_interval:
            # Unasked, a leader sends one per election: more is a member making us verify
            # signatures for it (a proof costs up to a majority's checks).
            self.counters["leader_proof_limited"] += 1
            return
        self._proof_checked[src] = self._now
        if not proof_valid(m.term, src, frozenset(m.voters), m.votes, self._voters, self.root,
                           self.signatures, self.newest_voters):
            self.counters["bad_leader_proof"] += 1
            return
        self._proven[m.term] = src
        self._dirty = True  # remembered across a restart (see `Persisted`)
        while len(self._proven) > PROVEN_KEPT:
            del self._proven[min(self._proven)]
        held, self._held = self._held, None
        if held is not None and held[0] == src and held[1].term == m.term:
            _HANDLERS[type(held[1])](self, src, held[1])
        else:
            self._accept_leader(src, m.term, 0)

    def _hold(self, src: str, m: AppendEntries | InstallSnapshot) -> None:
        """Only a voter's (or anyone's while we know no voters): a member that cannot lead must
        not be able to push the real leader's message out."""
        if m.term >= self._term and self._proven.get(m.term) != src and (
                src in self._voters or not self._voters):
            self._held = (src, m)

    def _request_proof(self, leader: str, term: int) -> None:
        asked = self._proof_asked
        if asked is not None and asked[:2] == (leader, term) \
                and self._now - asked[2] < self._cfg.heartbeat_interval:
            return
        self._proof_asked = (leader, term, self._now)
        self._send(leader, ProofRequest(term))

    # ------------------------------------------------------------------ replication: follower

    def _on_append(self, src: str, m: AppendEntries) -> None:
        if m.leader != src:
            self.counters["drop_spoofed_leader"] += 1
            return
        if not self._accept_leader(src, m.term, m.seq):
            self._hold(src, m)
            return
        term, stated = self._stated_commit
        self._stated_commit = (m.term, max(m.commit, stated) if term == m.term else m.commit)
        prev, prev_term, entries = m.prev_index, m.prev_term, m.entries
        base = self._log.base_index
        if prev < base:
            # Our snapshot already holds the start of the batch (committed, so it matches).
            skip = min(base - prev, len(entries))
            if skip == len(entries):
                self._send(src, AppendReply(self._term, m.seq, True, prev + skip))
                return
            prev, prev_term, entries = prev + skip, entries[skip - 1][0], entries[skip:]
        local = self._log.term_at(prev)
        if local is None:
            self.counters["append_gap"] += 1
            self._send(src, AppendReply(self._term, m.seq, False, self._log.last_index + 1))
            return
        if local != prev_term:
            self.counters["append_conflict"] += 1
            hint = max(self._log.first_index_of_term(prev), self._commit + 1)
            self._send(src, AppendReply(self._term, m.seq, False, hint))
            return
        if not self._store_entries(prev, entries):
            return
        match = prev + len(entries)
        self._advance_commit(min(m.commit, match))
        self._send(src, AppendReply(self._term, m.seq, True, match))

    def _store_entries(self, prev: int, entries: tuple[tuple[int, bytes], ...]) -> bool:
        """Append the batch following `prev` (which matches), dropping a conflicting suffix;
        entries we already hold stay, so a late duplicate of an old batch truncates nothing."""
        index = prev
        for term, data in entries:
            index += 1
            have = self._log.term_at(index)
            if have == term:
                continue
            if have is not None:
                if index <= self._commit:
                    # A committed entry contradicted: a leader without it was elected, which
                    # the vote restriction rules out. Refuse rather than destroy it.
                    self.counters["conflict_with_committed"] += 1
                    return False
                self._log.truncate_from(index)
            self._log.append(LogEntry(index, term, data))
            self._mark_log(index)
        return True

    def _on_install_snapshot(self, src: str, m: InstallSnapshot) -> None:
        if m.leader != src:
            self.counters["drop_spoofed_leader"] += 1
            return
        if not self._accept_leader(src, m.term, m.seq):
            self._hold(src, m)
            return
        if m.index <= self._commit:
            # We already hold it (committed entries match every leader's log).
            self._send(src, AppendReply(self._term, m.seq, True, m.index))
            return
        inc = self._incoming
        key = (m.term, m.index, m.snap_term)
        same = inc is not None and (inc.term, inc.index, inc.snap_term) == key
        if m.offset == 0:
            inc = _Incoming(*key)
        elif inc is None or not same or len(inc.data) != m.offset:
            have = len(inc.data) if inc is not None and same else 0
            self._send(src, SnapshotReply(self._term, m.seq, m.index, have))
            return
        if len(inc.data) + len(m.data) > MAX_SNAPSHOT:
            self.counters["snapshot_too_large"] += 1
            self._incoming = None
            return
        inc.data += m.data
        self._incoming = inc
        if not m.done:
            self._send(src, SnapshotReply(self._term, m.seq, m.index, len(inc.data)))
            return
        self._incoming = None
        self._install(Snapshot(m.index, m.snap_term, bytes(inc.data)))
        self._send(src, AppendReply(self._term, m.seq, True, m.index))

    def _install(self, snap: Snapshot) -> None:
        """Adopt a snapshot beyond our commit index: the log keeps only what follows it (if it
        agrees at that point), the state machine is replaced."""
        self._flush_persist()
        keeps_suffix = self._log.term_at(snap.index) == snap.term
        self._log.compact(snap.index, snap.term)
        self._snapshot = snap
        self._out.append(PersistSnapshot(snap, snap.index + 1))
        if not keeps_suffix:
            self._mark_log(snap.index + 1)  # the stored suffix contradicts it: delete it
        self._commit = self._applied = snap.index
        self._flush_persist()
        self._out.append(Restore(snap))
        self.counters["snapshots_installed"] += 1

    def _accept_leader(self, src: str, term: int, seq: int) -> bool:
        """The common part of AppendEntries and InstallSnapshot: a current leader's message
        makes us its follower; a stale one is answered with our term (which deposes it)."""
        if term < self._term:
            self.counters["stale_leader_message"] += 1
            self._send(src, AppendReply(self._term, seq, False, 0))
            return False
        if self._proven.get(term) != src:
            # Nothing moves for an unproven leader: not our term, not our log, not our timer.
            self.counters["unproven_leader"] += 1
            self._request_proof(src, term)
            return False
        if term == self._term and self._role == LEADER:
            self.counters["conflicting_leader"] += 1  # impossible while the invariant holds
            return False
        if term > self._term:
            self._become_follower(term, "higher_term")
        elif self._leader == src:
            self._check_late(self._now - self._heard_leader_at)
        self._role = FOLLOWER
        self._granted.clear()
        self._heard_leader_at = self._now
        self._election_at = self._now + self._timeout()
        self._set_leader(src)
        return True

    # ------------------------------------------------------------------ replication: leader

    def _on_append_reply(self, src: str, m: AppendReply) -> None:
        pr = self._reply_progress(src, m.term, m.seq)
        if pr is None:
            return
        if src in self._voters and m.seq in self._sent_at:  # (a round trip to a voter)
            self._check_late(self._now - self._sent_at[m.seq])
        covered = not pr.wait_chunk and (not m.success or m.index >= pr.wait_for)
        if covered or m.seq > pr.wait_seq:
            pr.wait_until = -_INF
        if not m.success:
            # The follower's hint, but never below what it has confirmed: a late reply to an
            # old probe must not undo progress.
            hint = max(pr.match + 1, min(pr.next, m.index))
            if hint < pr.next:
                pr.next = hint
                self._send_append(src)
            return
        if m.index > self._log.last_index:
            self.counters["bogus_append_reply"] += 1
            return
        if m.index > pr.match:
            pr.match = m.index
            pr.next = max(pr.next, m.index + 1)
            if src in self._voters:
                self._leader_commit()
            if pr.next <= self._log.last_index and (pr.full or self._streamed(src)):
                self._send_append(src)  # catching up: the next batch right away

    def _on_snapshot_reply(self, src: str, m: SnapshotReply) -> None:
        pr = self._reply_progress(src, m.term, m.seq)
        snap = self._snapshot
        if pr is None or snap is None or m.index != snap.index or pr.next > snap.index:
            return
        if (pr.wait_chunk and m.offset >= pr.wait_for) or m.seq > pr.wait_seq:
            pr.wait_until = -_INF
        if m.offset > len(snap.data):
            self.counters["bogus_snapshot_reply"] += 1
            return
        if (pr.snap_index, pr.snap_offset) != (snap.index, m.offset):
            pr.snap_index, pr.snap_offset = snap.index, m.offset
            self._send_snapshot(src, pr)

    def _reply_progress(self, src: str, term: int, seq: int) -> Progress | None:
        """The common part of replies to the leader: a higher term deposes it; a reply in our
        term acknowledges heartbeat round `seq` (lease and check-quorum, voters only)."""
        if term > self._term:
            self._higher_term(term, src)
            return None
        if self._role != LEADER or term != self._term:
            return None
        if src in self._voters:
            sent = self._sent_at.get(seq)
            if sent is not None and sent > self._acked.get(src, -_INF):
                self._acked[src] = sent
                self._acked_quorum = None
        pr = self._progress.get(src)
        if pr is not None:
            pr.retry = 0.0  # it answers: a wait for data starts from the shortest again
            pr.heard = True
        return pr

    def _send_append(self, peer: str, heartbeat: bool = False) -> None:
        """Entries from the follower's `next` on (or a snapshot chunk when they are compacted
        away); a heartbeat while data sent to it awaits its reply carries none."""
        pr = self._progress[peer]
        waiting = heartbeat and self._now < pr.wait_until
        if pr.next <= self._log.base_index and not waiting:
            self._send_snapshot(peer, pr)
            return
        prev = max(pr.next - 1, self._log.base_index)
        prev_term = self._log.term_at(prev)
        assert prev_term is not None
        batch = () if waiting else self._log.entries_from(
            pr.next, self._cfg.max_append_bytes, MAX_APPEND_ENTRIES)
        entries = tuple((e.term, e.data) for e in batch)
        msg = AppendEntries(self._term, self.id, self._seq, prev, prev_term, self._commit, entries)
        pr.sent_commit = self._commit
        pr.full = bool(batch) and batch[-1].index < self._log.last_index
        if entries:
            self._await_reply(pr, prev + len(entries), chunk=False)
        self._send(peer, msg)

    def _await_reply(self, pr: Progress, upto: int, chunk: bool) -> None:
        """Data up to `upto` went to the follower: heartbeats carry none until a reply covers
        it or the wait ends (Config.retransmit_max says why)."""
        wait = pr.retry or self._cfg.election_timeout_min
        pr.wait_until, pr.wait_for, pr.wait_chunk = self._now + wait, upto, chunk
        pr.wait_seq = self._seq
        pr.retry = min(wait * 2, self._cfg.retransmit_max)

    def _notify_commit(self) -> None:
        """The commit index to each follower that holds every entry but has not heard it (one
        still missing entries hears it with them, after its reply)."""
        self._notify_at = _INF
        last = self._log.last_index
        for peer, pr in self._progress.items():
            if pr.sent_commit < self._commit and pr.match >= last and self._streamed(peer):
                self._send_append(peer)

    def _send_snapshot(self, peer: str, pr: Progress) -> None:
        snap = self._snapshot
        assert snap is not None, "a compacted log always has its snapshot"
        if pr.snap_index != snap.index:
            pr.snap_index, pr.snap_offset = snap.index, 0
        off = pr.snap_offset
        chunk = snap.data[off : off + self._cfg.snapshot_chunk_bytes]
        done = off + len(chunk) >= len(snap.data)
        self.counters["snapshot_chunks_sent"] += 1
        self._await_reply(pr, off + len(chunk), chunk=True)
        term, seq = self._term, self._seq
        self._send(
            peer, InstallSnapshot(term, self.id, seq, snap.index, snap.term, off, chunk, done)
        )

    def _leader_commit(self) -> None:
        """Commit the highest index a majority of voters stores, if it is of our term (an older
        entry on a majority can still be overwritten: Raft's figure 8)."""
        if self._role != LEADER:
            return
        last = self._log.last_index
        matches = sorted(
            (
                last if v == self.id else (p.match if (p := self._progress.get(v)) else 0)
                for v in self._voters
            ),
            reverse=True,
        )
        n = matches[self.quorum - 1]
        if n > self._commit and self._log.term_at(n) == self._term:
            self._advance_commit(n)
            if self._progress and self._notify_at == _INF:
                self._notify_at = self._now + self._cfg.commit_notify_delay

    def _append_own(self, data: bytes) -> int:
        index = self._log.last_index + 1
        self._log.append(LogEntry(index, self._term, data))
        self._mark_log(index)
        return index

    # ------------------------------------------------------------------ the commit index

    def _advance_commit(self, index: int) -> None:
        if index <= self._commit:
            return
        self._commit = index
        self._flush_persist()  # what is applied is on disk here first
        while self._applied < self._commit:
            self._applied += 1
            e = self._log.entry(self._applied)
            self._out.append(Apply(e.index, e.term, e.data))

    # ------------------------------------------------------------------ transitions

    def _election_timer_fired(self, now: float) -> None:
        if self.id not in self._voters:
            self._election_at = _INF  # (armed while it voted) observers never campaign
            return
        self._set_leader(None)
        if self._sticky(now):
            self._election_at = self._heard_leader_at + self._cfg.election_timeout_min
            return
        if self._cfg.pre_vote:
            self._start_pre_vote(now)
        else:
            self._start_election(now)

    def _start_pre_vote(self, now: float) -> None:
        self.counters["pre_votes_started"] += 1
        self._role = PRE_CANDIDATE
        self._granted = {self.id}
        self._election_at = now + self._timeout()
        if not self._advance_if_quorum(now):
            last_index, last_term = self._log.last_index, self._log.last_term
            for peer in self._peers_voting():
                self._send(peer, PreVote(self._term + 1, self.id, last_index, last_term))

    def _start_election(self, now: float) -> None:
        self.counters["elections_started"] += 1
        self._set_term(self._term + 1)
        self._voted_for = self.id
        self._role = CANDIDATE
        self._granted = {self.id}
        self._votes = {self.id: self.signatures.sign(vote_payload(self._term, self.id))}
        self._election_at = now + self._timeout()
        if not self._advance_if_quorum(now):
            last_index, last_term = self._log.last_index, self._log.last_term
            for peer in self._peers_voting():
                self._send(peer, RequestVote(self._term, self.id, last_index, last_term))

    def _count_grant(self, src: str) -> None:
        if src in self._voters:
            self._granted.add(src)
            self._advance_if_quorum(self._now)

    def _advance_if_quorum(self, now: float) -> bool:
        """Move on once a majority granted: pre-candidate -> candidate -> leader."""
        if len(self._granted) < self.quorum:
            return False
        if self._role == PRE_CANDIDATE:
            self._start_election(now)
        elif self._role == CANDIDATE:
            self._become_leader(now)
        return True

    def _become_leader(self, now: float) -> None:
        self.counters["became_leader"] += 1
        self._role = LEADER
        self._granted.clear()
        self._election_at = _INF
        self._seq = 0
        self._sent_at.clear()
        self._acked.clear()
        self._acked_quorum = None
        self._quorum_base = now
        self._incoming = None
        self._proof_set = self._voters
        self._vote_asked.clear()
        self._proof = self._make_proof()
        self._proven[self._term] = self.id
        self._dirty = True
        self._proof_sent.clear()
        self._event("leader_elected", term=self._term)
        self._set_leader(self.id)
        nxt = self._log.last_index + 1
        self._progress = {p: Progress(nxt) for p in self._peers}
        self._term_start = self._append_own(b"")  # the no-op that commits our predecessors'
        self._leader_commit()
        for peer in self._peers:  # before the first heartbeat, which they check against it
            self._send_proof(peer)
        self._broadcast_heartbeat(now)

    def _become_follower(self, term: int, reason: str) -> None:
        """Follow (nobody known yet) in `term` >= ours; a leader steps down for `reason`."""
        if term > self._term:
            self._set_term(term)
        if self._role == LEADER:
            self.counters["stepped_down_" + reason] += 1
            self._heartbeat_at = self._notify_at = _INF
            self._progress = {}
            self._proof = None
            self._event("stepped_down", term=self._term, reason=reason)
            self._set_leader(None)
            self._election_at = self._now + self._timeout()
        self._role = FOLLOWER
        self._granted.clear()

    def _higher_term(self, term: int, src: str | None = None) -> None:
        """A voter's unproven word that we are behind: followed within MAX_TERM_STEP (a reply
        from an observer, or a bigger jump, moves nothing)."""
        if (src is not None and src not in self._voters) or term > self._term + MAX_TERM_STEP:
            self.counters["drop_term_jump"] += 1
            return
        self._become_follower(term, "higher_term")

    def _set_term(self, term: int) -> None:
        old = self._term
        self._term = term
        self._voted_for = None
        self._dirty = True
        self._set_leader(None)
        self._event("term_changed", term=term, old=old)

    def _set_leader(self, leader: str | None) -> None:
        if leader != self._leader:
            self._leader = leader
            self._event("leader_changed", term=self._term, leader=leader)

    # ------------------------------------------------------------------ leader duties

    def _broadcast_heartbeat(self, now: float) -> None:
        self._seq += 1
        self._sent_at[self._seq] = now
        # Rounds older than both windows can no longer extend the lease or the quorum check.
        cutoff = now - max(self._cfg.lease_duration, self._cfg.check_quorum_timeout)
        while self._sent_at:
            first = next(iter(self._sent_at))
            if self._sent_at[first] >= cutoff:
                break
            del self._sent_at[first]
        self._heartbeat_at = now + self._cfg.heartbeat_interval
        self._ask_votes(now)
        for peer in self._peers:
            if peer in self._voters:
                # Entries from `next` on: retransmits what a lagging follower has not
                # confirmed, unless it still awaits the reply to them.
                self._send_append(peer, heartbeat=True)
            else:
                self._keep_observer(peer, now)

    def _keep_observer(self, peer: str, now: float) -> None:
        """An observer's share of a heartbeat round: what it lacks -- batched for an idle one,
        at once for one running jobs (`pushed`, which also gets every entry and commit as they
        come) -- or else a keepalive now and then (Config.observer_keepalive says why). No
        empty heartbeats: it has no election timer to feed, and at 10 a second to each of 37
        observers running a build they were most of a busy leader's work."""
        pr = self._progress[peer]
        lacks = (pr.sent_commit < self._commit or pr.next <= self._log.last_index
                 or not pr.heard)
        if now < pr.pull_at and not (lacks and now >= max(pr.batch_at, pr.wait_until)):
            return
        cfg = self._cfg
        idle = len(self._observers) - len(self._pushed)
        # (spread over +-25 %: after an election they all start at once, and would otherwise
        # all come due together for ever)
        every = max(cfg.observer_keepalive, idle / cfg.observer_keepalives_per_s)
        pr.pull_at = now + every * (0.75 + self._rng.random() / 2)
        pr.batch_at = now + (0.0 if peer in self._pushed else cfg.observer_batch_interval)
        self._send_append(peer, heartbeat=True)
        if not pr.heard and now >= pr.wait_until:  # (no data went: back off as if it had)
            self._await_reply(pr, pr.next - 1, chunk=False)

    def _streamed(self, peer: str) -> bool:
        return peer in self._voters or peer in self._pushed

    def _quorum_acked(self) -> float:
        """Send time of the latest heartbeat round a majority (us included) acknowledged."""
        if self._acked_quorum is None:
            need = self.quorum - 1  # we count ourselves
            acks = sorted(
                (self._acked.get(v, -_INF) for v in self._voters if v != self.id), reverse=True
            )
            if need <= 0:
                self._acked_quorum = _INF
            else:
                self._acked_quorum = acks[need - 1] if len(acks) >= need else -_INF
        return self._acked_quorum

    def _quorum_deadline(self) -> float:
        wait = self._cfg.check_quorum_timeout * 2 ** self._patience
        return max(self._quorum_acked(), self._quorum_base) + wait

    # ------------------------------------------------------------------ helpers

    def _sticky(self, now: float) -> bool:
        """We know of a live leader: it is us, or we heard one within the minimum timeout."""
        # Written as a deadline, exactly as the timer is armed, so both round the same way.
        return self._role == LEADER or now < self._heard_leader_at + self._cfg.election_timeout_min

    def _may_vote_for(self, candidate: str) -> bool:
        """A candidate that votes as far as we know, while no live leader is known. Whether
        we vote ourselves does not matter (as in etcd's raft): a new voter learns that it
        votes only once the entry adding it is committed and has reached it, and the
        leader that added it may need its vote before that (it lost its quorum while the
        new voter caught up: with a deaf new voter, nobody could win). A candidate counts
        only its own voters' votes."""
        return candidate in self._electors() and not self._sticky(self._now)

    def _electors(self) -> frozenset[str]:
        """The voters as this node knows them; before it knows any (a new member that has
        not applied the first configuration), the founder, as the leader proofs assume."""
        return self._voters or (frozenset({self.root}) if self.root else frozenset())

    def _log_ok(self, last_index: int, last_term: int) -> bool:
        """The vote restriction: the candidate's log is at least as up to date as ours."""
        return (last_term, last_index) >= (self._log.last_term, self._log.last_index)

    def _peers_voting(self) -> list[str]:
        return [p for p in self._peers if p in self._voters]

    def _set_peers(self, voters: frozenset[str], observers: frozenset[str],
                   pushed: frozenset[str] = frozenset()) -> None:
        self._voters = voters
        self._acked_quorum = None
        self._observers = observers - voters
        self._pushed = pushed & self._observers
        # Sorted: frozenset order depends on string hashing, which differs between processes.
        self._peers = sorted((voters | self._observers) - {self.id})
        if self._role == LEADER:
            nxt = self._log.last_index + 1
            self._progress = {p: self._progress.get(p) or Progress(nxt) for p in self._peers}

    def _arm_election_timer(self, now: float) -> None:
        if self.id in self._voters and len(self._voters) == 1:
            # A lone voter needs nobody: campaign as soon as stickiness allows.
            self._election_at = max(now, self._heard_leader_at + self._cfg.election_timeout_min)
        else:
            self._election_at = now + self._timeout()

    def _timeout(self) -> float:
        """A voter's wait for the leader before it campaigns; an observer never campaigns, and
        keeps its leader through silences (Config.observer_keepalive says why)."""
        if self.id not in self._voters:
            return _INF
        cfg = self._cfg
        return self._rng.uniform(cfg.election_timeout_min, cfg.election_timeout_max) * (
            2 ** self._patience)

    def _mark_log(self, index: int) -> None:
        """Entries from `index` on changed and must be persisted before the next output."""
        if self._log_dirty_from is None or index < self._log_dirty_from:
            self._log_dirty_from = index

    def _send(self, to: str, msg: Message) -> None:
        self._flush_persist()
        self._out.append(Send(to, msg))
        self.counters["sent_" + type(msg).__name__] += 1

    def _flush_persist(self) -> None:
        """Emit the pending Persist and PersistEntries; called before every Send and Apply, so
        the vote, term or entries a message or an applied entry depends on are durable first."""
        if self._dirty:
            self._dirty = False
            self._out.append(Persist(self._term, self._voted_for, self._proven.get(self._term)))
        start = self._log_dirty_from
        if start is not None:
            self._log_dirty_from = None
            self._out.append(PersistEntries(start, self._log.entries_from(start)))

    def _event(self, kind: str, **data: Any) -> None:
        self._out.append(Event(kind, data))


_HANDLERS: dict[type, Callable[[Election, str, Any], None]] = {
    PreVote: Election._on_pre_vote,
    PreVoteReply: Election._on_pre_vote_reply,
    RequestVote: Election._on_request_vote,
    VoteReply: Election._on_vote_reply,
    AppendEntries: Election._on_append,
    AppendReply: Election._on_append_reply,
    InstallSnapshot: Election._on_install_snapshot,
    SnapshotReply: Election._on_snapshot_reply,
    VoteProof: Election._on_vote_proof,
    LeaderProof: Election._on_leader_proof,
    ProofRequest: Election._on_proof_request,
}
