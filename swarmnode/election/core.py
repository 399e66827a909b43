"""The `Election` state machine: Raft's leader election with pre-vote and check-quorum, sans-I/O.

It picks the build scheduler. There is no log here (the job ledger is a separate piece), so
this is only the part of Raft that guarantees at most one leader per term:

- Terms and one vote per term. A vote, and every term change, is handed to the shell as a
  `Persist` output *before* the message that depends on it: outputs are in order, and the shell
  must write each `Persist` durably before sending any `Send` drained after it. A node restarted
  without its persisted vote could vote twice in one term and elect two leaders.
- Randomized election timeouts, fresh for every wait, so one voter usually campaigns alone.
- Pre-vote: a voter whose timer fires first asks the other voters whether they would vote for it
  in term + 1, and only with a majority of yeses increments its term. A partitioned or rejoining
  node therefore cannot inflate its term and depose a working leader when it returns.
- Leader stickiness: a voter that heard a leader less than `election_timeout_min` ago refuses
  pre-votes and votes (and does not adopt the candidate's term). This is also what makes the
  leader's lease sound: see `leader_lease_valid`.
- Check-quorum: a leader that has not heard heartbeat replies from a majority of voters for
  `check_quorum_timeout` steps down, so a leader cut off from the majority stops leading.

Voters are a small set given from outside (`voters.choose_voters` over the membership view);
non-voters ("observers") receive heartbeats, never campaign or vote, and report the leader.
Quorum is a majority of the voter set: one voter elects itself (still through a new term); two
voters need each other, so with one of two dead there is no leader until the voter set shrinks.

Limits: voter-set changes are not agreed through consensus here. Safety holds while any two
voter sets in use differ by at most one member (every two majorities then overlap); the shell
moves one change at a time (`voters.step_voters`). A set shrinking from two to one on both sides
of a partition gives each side a leader: that is the price of a two-node cluster scheduling
with one node down, and the ledger must fence on (term, leader) anyway.

Like the membership core, nothing here touches a socket, a clock or global randomness.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .config import Config
from .messages import (
    MAX_ID,
    MAX_U63,
    Heartbeat,
    HeartbeatReply,
    Message,
    MessageError,
    PreVote,
    PreVoteReply,
    RequestVote,
    VoteReply,
)

FOLLOWER = "follower"
PRE_CANDIDATE = "pre_candidate"
CANDIDATE = "candidate"
LEADER = "leader"
ROLES = (FOLLOWER, PRE_CANDIDATE, CANDIDATE, LEADER)
_INF = math.inf


@dataclass(frozen=True, slots=True)
class Persisted:
    """What must survive a restart: the current term and whom we voted for in it."""

    term: int = 0
    voted_for: str | None = None

    def to_plain(self) -> dict[str, Any]:
        return {"term": self.term, "voted_for": self.voted_for}

    @classmethod
    def from_plain(cls, obj: object) -> Persisted:
        """Strictly load the stored form; raises MessageError for anything else."""
        if type(obj) is not dict or obj.keys() != {"term", "voted_for"}:
            raise MessageError("persisted: expected a map with keys term, voted_for")
        term, voted = obj["term"], obj["voted_for"]
        if type(term) is not int or not 0 <= term <= MAX_U63:
            raise MessageError("persisted.term: expected int")
        if voted is not None and (type(voted) is not str or not 1 <= len(voted) <= MAX_ID):
            raise MessageError("persisted.voted_for: expected an id or None")
        return cls(term, voted)


@dataclass(frozen=True, slots=True)
class Send:
    to: str
    msg: Message


@dataclass(frozen=True, slots=True)
class Persist:
    """Write (term, voted_for) durably before sending anything drained after this."""

    term: int
    voted_for: str | None


@dataclass(frozen=True, slots=True)
class Event:
    """kind is one of: term_changed {term, old}, leader_changed {term, leader (None: unknown)},
    leader_elected {term} (this node won), stepped_down {term, reason} (reason: higher_term,
    check_quorum or not_a_voter)."""

    kind: str
    data: dict[str, Any]


Output = Send | Persist | Event


class Election:
    """One node's part in electing the scheduler. See the module docstring for the model."""

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
    ) -> None:
        self.id = node_id
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
        self._election_at = _INF
        self._granted: set[str] = set()
        # leader state
        self._seq = 0
        self._heartbeat_at = _INF
        self._sent_at: dict[int, float] = {}
        self._acked: dict[str, float] = {}
        self._quorum_base = -_INF
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
    def is_voter(self) -> bool:
        return self.id in self._voters

    @property
    def quorum(self) -> int:
        return len(self._voters) // 2 + 1

    def handle(self, now: float, sender: str, msg: Message) -> None:
        """Process one message from `sender` (authenticated by the transport)."""
        self._now = now
        fn = _HANDLERS.get(type(msg))
        if fn is None:
            self.counters["drop_unknown_message"] += 1
        elif sender == self.id:
            self.counters["drop_from_self"] += 1
        else:
            fn(self, sender, msg)
        self._flush_persist()

    def tick(self, now: float) -> None:
        """Run every timer due by `now`."""
        self._now = now
        if self._role == LEADER:
            if now >= self._quorum_deadline():
                self._become_follower(self._term, "check_quorum")
            elif now >= self._heartbeat_at:
                self._broadcast_heartbeat(now)
        elif now >= self._election_at:
            self._election_timer_fired(now)
        self._flush_persist()

    def next_deadline(self) -> float:
        """When `tick` must next be called (may be early; never late)."""
        if self._role == LEADER:
            return min(self._heartbeat_at, self._quorum_deadline())
        return self._election_at

    def drain(self) -> list[Output]:
        """Outputs produced since the last drain, in order (see `Persist` for why it matters)."""
        out, self._out = self._out, []
        return out

    def set_voters(
        self, now: float, voters: Iterable[str], observers: Iterable[str] | None = None
    ) -> None:
        """Adopt a new voter set (and observer set, if given) decided outside, e.g. by
        `choose_voters` over the membership view. Repeating the current sets changes nothing,
        so the shell may call this on every membership change."""
        self._now = now
        old = self._voters
        voters = frozenset(voters)
        self._set_peers(voters, self._observers if observers is None else frozenset(observers))
        if voters == old:
            return
        if self.id not in voters:
            if self._role == LEADER:
                self._become_follower(self._term, "not_a_voter")
            self._role = FOLLOWER
            self._granted.clear()
        elif self._role == LEADER:
            if voters - old:
                # New voters have not been heartbeated yet: one check-quorum period for them.
                self._quorum_base = now
        elif self._role in (PRE_CANDIDATE, CANDIDATE):
            self._granted &= voters
            self._advance_if_quorum(now)
        elif len(voters) == 1:
            self._arm_election_timer(now)  # a lone voter campaigns as soon as it may
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
        }

    # ------------------------------------------------------------------ message handlers

    def _on_pre_vote(self, src: str, m: PreVote) -> None:
        if m.candidate != src:
            self.counters["drop_spoofed_candidate"] += 1
            return
        # No term change here whatever the outcome: that is the point of a pre-vote.
        granted = self._may_vote_for(src) and m.next_term > self._term
        self.counters["pre_vote_granted" if granted else "pre_vote_refused"] += 1
        self._send(src, PreVoteReply(m.next_term, granted, self._term))

    def _on_pre_vote_reply(self, src: str, m: PreVoteReply) -> None:
        if m.term > self._term:
            self._become_follower(m.term, "higher_term")
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
        if self._sticky(self._now):
            # Neither the vote nor the term: a live leader exists as far as we know.
            self.counters["vote_refused_sticky"] += 1
            self._send(src, VoteReply(self._term, False))
            return
        if m.term > self._term:
            self._become_follower(m.term, "higher_term")
        if self._may_vote_for(src) and self._voted_for in (None, src):
            if self._voted_for != src:
                self._voted_for = src
                self._dirty = True
            if self._role == PRE_CANDIDATE:
                self._role = FOLLOWER
            self._election_at = self._now + self._timeout()
            self.counters["vote_granted"] += 1
            self._send(src, VoteReply(self._term, True))
        else:
            self.counters["vote_refused"] += 1
            self._send(src, VoteReply(self._term, False))

    def _on_vote_reply(self, src: str, m: VoteReply) -> None:
        if m.term > self._term:
            self._become_follower(m.term, "higher_term")
            return
        if self._role == CANDIDATE and m.granted and m.term == self._term:
            self._count_grant(src)

    def _on_heartbeat(self, src: str, m: Heartbeat) -> None:
        if m.leader != src:
            self.counters["drop_spoofed_leader"] += 1
            return
        if m.term < self._term:
            # Our higher term tells a stale leader to step down.
            self.counters["stale_heartbeat"] += 1
            self._send(src, HeartbeatReply(self._term, m.seq))
            return
        if m.term == self._term and self._role == LEADER:
            self.counters["conflicting_leader"] += 1  # impossible while the invariant holds
            return
        if m.term > self._term:
            self._become_follower(m.term, "higher_term")
        self._role = FOLLOWER
        self._granted.clear()
        self._heard_leader_at = self._now
        self._election_at = self._now + self._timeout()
        self._set_leader(src)
        self._send(src, HeartbeatReply(self._term, m.seq))

    def _on_heartbeat_reply(self, src: str, m: HeartbeatReply) -> None:
        if m.term > self._term:
            self._become_follower(m.term, "higher_term")
            return
        if self._role != LEADER or m.term != self._term or src not in self._voters:
            return
        sent = self._sent_at.get(m.seq)
        if sent is not None and sent > self._acked.get(src, -_INF):
            self._acked[src] = sent

    # ------------------------------------------------------------------ transitions

    def _election_timer_fired(self, now: float) -> None:
        self._set_leader(None)
        if self.id not in self._voters:
            self._election_at = now + self._timeout()  # observers only notice the silence
            return
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
            for peer in self._peers_voting():
                self._send(peer, PreVote(self._term + 1, self.id))

    def _start_election(self, now: float) -> None:
        self.counters["elections_started"] += 1
        self._set_term(self._term + 1)
        self._voted_for = self.id
        self._role = CANDIDATE
        self._granted = {self.id}
        self._election_at = now + self._timeout()
        if not self._advance_if_quorum(now):
            for peer in self._peers_voting():
                self._send(peer, RequestVote(self._term, self.id))

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
        self._quorum_base = now
        self._event("leader_elected", term=self._term)
        self._set_leader(self.id)
        self._broadcast_heartbeat(now)

    def _become_follower(self, term: int, reason: str) -> None:
        """Follow (nobody known yet) in `term` >= ours; a leader steps down for `reason`."""
        if term > self._term:
            self._set_term(term)
        if self._role == LEADER:
            self.counters["stepped_down_" + reason] += 1
            self._heartbeat_at = _INF
            self._event("stepped_down", term=self._term, reason=reason)
            self._set_leader(None)
            self._election_at = self._now + self._timeout()
        self._role = FOLLOWER
        self._granted.clear()

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
        for peer in self._peers:
            self._send(peer, Heartbeat(self._term, self.id, self._seq))

    def _quorum_acked(self) -> float:
        """Send time of the latest heartbeat round a majority (us included) acknowledged."""
        need = self.quorum - 1  # we count ourselves
        if need <= 0:
            return _INF
        acks = sorted(
            (self._acked.get(v, -_INF) for v in self._voters if v != self.id), reverse=True
        )
        return acks[need - 1] if len(acks) >= need else -_INF

    def _quorum_deadline(self) -> float:
        return max(self._quorum_acked(), self._quorum_base) + self._cfg.check_quorum_timeout

    # ------------------------------------------------------------------ helpers

    def _sticky(self, now: float) -> bool:
        """We know of a live leader: it is us, or we heard one within the minimum timeout."""
        # Written as a deadline, exactly as the timer is armed, so both round the same way.
        return self._role == LEADER or now < self._heard_leader_at + self._cfg.election_timeout_min

    def _may_vote_for(self, candidate: str) -> bool:
        return self.id in self._voters and candidate in self._voters and not self._sticky(self._now)

    def _peers_voting(self) -> list[str]:
        return [p for p in self._peers if p in self._voters]

    def _set_peers(self, voters: frozenset[str], observers: frozenset[str]) -> None:
        self._voters = voters
        self._observers = observers - voters
        # Sorted: frozenset order depends on string hashing, which differs between processes.
        self._peers = sorted((voters | self._observers) - {self.id})

    def _arm_election_timer(self, now: float) -> None:
        if self.id in self._voters and len(self._voters) == 1:
            # A lone voter needs nobody: campaign as soon as stickiness allows.
            self._election_at = max(now, self._heard_leader_at + self._cfg.election_timeout_min)
        else:
            self._election_at = now + self._timeout()

    def _timeout(self) -> float:
        return self._rng.uniform(self._cfg.election_timeout_min, self._cfg.election_timeout_max)

    def _send(self, to: str, msg: Message) -> None:
        self._flush_persist()
        self._out.append(Send(to, msg))
        self.counters["sent_" + type(msg).__name__] += 1

    def _flush_persist(self) -> None:
        """Emit the pending Persist; called before every Send, so the vote or term a message
        depends on is always durable first."""
        if self._dirty:
            self._dirty = False
            self._out.append(Persist(self._term, self._voted_for))

    def _event(self, kind: str, **data: Any) -> None:
        self._out.append(Event(kind, data))


_HANDLERS: dict[type, Callable[[Election, str, Any], None]] = {
    PreVote: Election._on_pre_vote,
    PreVoteReply: Election._on_pre_vote_reply,
    RequestVote: Election._on_request_vote,
    VoteReply: Election._on_vote_reply,
    Heartbeat: Election._on_heartbeat,
    HeartbeatReply: Election._on_heartbeat_reply,
}
