"""The election state machine's rules, one message at a time, and its codec."""

from __future__ import annotations

import contextlib
import itertools
import math
import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmnode.election import (
    CANDIDATE,
    FOLLOWER,
    LEADER,
    MAX_ENTRY,
    MESSAGE_TYPES,
    PRE_CANDIDATE,
    AppendEntries,
    AppendReply,
    Apply,
    Config,
    Election,
    Event,
    InstallSnapshot,
    KeyRing,
    LeaderProof,
    MessageError,
    Output,
    Persist,
    Persisted,
    PersistEntries,
    PreVote,
    PreVoteReply,
    ProofRequest,
    RequestVote,
    Restore,
    Send,
    SnapshotReply,
    VoteProof,
    VoteReply,
    decode,
    encode,
    pack,
    proof_valid,
    step_voters,
    target_voters,
    unpack,
    vote_payload,
)
from swarmnode.election.messages import MAX_CHUNK

CFG = Config(stall_grace=False)
"""These tests move time in jumps between inputs, which the core would take for stalls of its
own (Config.stall_grace, tested on its own with `STALLS`)."""
STALLS = Config()
"""The shipped config: a voter that is not run for two heartbeat intervals notices."""
ABC = frozenset({"a", "b", "c"})
LATER = 10.0
"""A time well past every node's start-up stickiness."""

KEYS = KeyRing()
"""Real Ed25519 keys for the named test nodes."""


def hb(term: int, leader: str, seq: int) -> AppendEntries:
    """A heartbeat to a node whose log is empty, as the leader of an empty log sends it."""
    return AppendEntries(term, leader, seq, 0, 0, 0)


def vote(term: int, voter: str, candidate: str) -> VoteProof:
    """`voter`'s signed vote for `candidate` (what a grant counts by)."""
    return VoteProof(term, candidate, KEYS.key(voter).sign(vote_payload(term, candidate)).signature)


def proof(term: int, leader: str, voters: frozenset[str] = ABC,
          signers: frozenset[str] | None = None) -> LeaderProof:
    """`leader`'s proof of `term`, signed by `signers` (default: a majority including it)."""
    if signers is None:
        signers = frozenset(sorted(voters - {leader})[: len(voters) // 2]) | {leader}
    votes = tuple((v, vote(term, v, leader).sig) for v in sorted(signers))
    return LeaderProof(term, leader, tuple(sorted(voters)), votes)


def lead(el: Election, now: float, term: int, leader: str, voters: frozenset[str] = ABC) -> None:
    """Show `el` the proof that `leader` leads `term` (it follows it from then on)."""
    el.handle(now, leader, proof(term, leader, voters))


def granted(voter: str, candidate: str, term: int) -> list[Send]:
    """What a voter sends when it grants a vote: the signature first, then the reply."""
    return [Send(candidate, vote(term, voter, candidate)), Send(candidate, VoteReply(term, True))]


def ack(term: int, seq: int) -> AppendReply:
    """A follower's answer to `hb`: it matches the (empty) log through index 0."""
    return AppendReply(term, seq, True, 0)


def make(
    node_id: str = "a",
    voters: frozenset[str] = ABC,
    persisted: Persisted | None = None,
    observers: frozenset[str] = frozenset(),
    cfg: Config = CFG,
) -> Election:
    el = Election(node_id, voters, cfg, random.Random(1), 0.0, persisted, observers=observers,
                  signatures=KEYS.for_node(node_id))
    assert el.drain() == []
    return el


def sends(out: list[Output]) -> list[Send]:
    return [o for o in out if isinstance(o, Send)]


def persists(out: list[Output]) -> list[Persist]:
    return [o for o in out if isinstance(o, Persist)]


def events(out: list[Output], kind: str) -> list[Event]:
    return [o for o in out if isinstance(o, Event) and o.kind == kind]


def fire_timer(el: Election) -> float:
    """Tick exactly at the election deadline (after start-up stickiness); returns that time."""
    now = max(el.next_deadline(), LATER)
    el.tick(now)
    return now


def elect(el: Election, now: float | None = None) -> float:
    """Drive `el` (a voter of ABC) to leadership with b's pre-vote and vote; returns the time."""
    now = fire_timer(el) if now is None else now
    assert el.role == PRE_CANDIDATE
    el.handle(now, "b", PreVoteReply(el.term + 1, True, el.term))
    assert el.role == CANDIDATE
    el.handle(now, "b", vote(el.term, "b", el.id))
    assert el.role == LEADER
    el.drain()
    return now


# ---------------------------------------------------------------------------------------------
# Votes


def test_one_vote_per_term_and_persisted_before_the_reply() -> None:
    el = make()
    el.handle(LATER, "b", RequestVote(1, "b", 0, 0))
    out = el.drain()
    assert out.index(Persist(1, "b")) < out.index(granted("a", "b", 1)[0])
    assert out[-2:] == granted("a", "b", 1)
    assert el.voted_for == "b" and el.term == 1
    el.handle(LATER, "c", RequestVote(1, "c", 0, 0))
    assert el.drain() == [Send("c", VoteReply(1, False))]
    # a retransmitted request from the same candidate is granted again, with nothing to persist
    el.handle(LATER, "b", RequestVote(1, "b", 0, 0))
    assert el.drain() == granted("a", "b", 1)


def test_every_persist_precedes_every_send_that_follows_it() -> None:
    """Whatever path a handler takes, a Persist is emitted before the first Send after the
    state change it records (here: term adoption and a vote in one message)."""
    el = make()
    el.handle(LATER, "b", RequestVote(5, "b", 0, 0))
    out = el.drain()
    assert persists(out) == [Persist(5, "b")]  # one write for both changes
    assert isinstance(out[-1], Send) and out.index(Persist(5, "b")) < len(out) - 1


def test_candidate_persists_its_own_vote_before_asking() -> None:
    el = make(cfg=Config(stall_grace=False, pre_vote=False))
    fire_timer(el)
    out = el.drain()
    assert el.role == CANDIDATE and el.term == 1
    first_send = next(i for i, o in enumerate(out) if isinstance(o, Send))
    assert out.index(Persist(1, "a")) < first_send
    assert {s.to for s in sends(out)} == {"b", "c"}
    assert all(s.msg == RequestVote(1, "a", 0, 0) for s in sends(out))


def test_restart_keeps_the_vote_of_the_persisted_term() -> None:
    el = make(persisted=Persisted(3, "b"))
    el.handle(LATER, "c", RequestVote(3, "c", 0, 0))
    assert el.drain() == [Send("c", VoteReply(3, False))]
    el.handle(LATER, "c", RequestVote(4, "c", 0, 0))
    assert el.drain()[-3:] == [Persist(4, "c"), *granted("a", "c", 4)]


def test_lower_terms_are_refused_with_our_term() -> None:
    el = make(persisted=Persisted(7, None))
    el.handle(LATER, "b", RequestVote(6, "b", 0, 0))
    assert el.drain() == [Send("b", VoteReply(7, False))]
    el.handle(LATER, "b", hb(6, "b", 1))
    assert el.drain() == [Send("b", AppendReply(7, 1, False, 0))]
    assert el.leader is None and el.term == 7


def test_higher_term_reply_makes_the_leader_step_down() -> None:
    el = make()
    now = elect(el)
    term = el.term
    el.handle(now + 0.01, "c", ack(term + 2, 1))
    out = el.drain()
    assert el.role == FOLLOWER and el.term == term + 2 and el.leader is None
    assert persists(out) == [Persist(term + 2, None)]
    assert events(out, "stepped_down")[0].data == {"term": term + 2, "reason": "higher_term"}
    assert not el.leader_lease_valid(now + 0.01)


def test_higher_term_heartbeat_turns_a_candidate_into_a_follower() -> None:
    el = make(cfg=Config(stall_grace=False, pre_vote=False))
    now = fire_timer(el)
    el.drain()
    el.handle(now, "c", hb(2, "c", 9))
    assert el.role == CANDIDATE and el.term == 1  # nothing moves before the proof
    assert el.drain() == [Send("c", ProofRequest(2))]
    lead(el, now, 2, "c")  # the held heartbeat is handled with it
    out = el.drain()
    assert el.role == FOLLOWER and el.leader == "c" and el.term == 2
    assert out[-1] == Send("c", ack(2, 9))
    assert out.index(Persist(2, None, "c")) < len(out) - 1


# ---------------------------------------------------------------------------------------------
# Stickiness and pre-vote


def test_a_fresh_node_votes_for_nobody_during_the_first_minimum_timeout() -> None:
    """A leader may hold a lease on this node's acknowledgement from before a restart."""
    el = make()
    early = CFG.election_timeout_min * 0.9
    el.handle(early, "b", PreVote(1, "b", 0, 0))
    el.handle(early, "b", RequestVote(1, "b", 0, 0))
    assert el.drain() == [
        Send("b", PreVoteReply(1, False, 0)),
        Send("b", VoteReply(0, False)),
    ]
    assert el.term == 0
    el.handle(CFG.election_timeout_min, "b", RequestVote(1, "b", 0, 0))
    assert el.drain()[-2:] == granted("a", "b", 1)


def test_a_follower_of_a_live_leader_refuses_pre_votes_and_votes_and_keeps_its_term() -> None:
    el = make()
    lead(el, LATER, 2, "b")
    el.handle(LATER, "b", hb(2, "b", 1))
    el.drain()
    soon = LATER + CFG.election_timeout_min / 2
    el.handle(soon, "c", PreVote(3, "c", 0, 0))
    el.handle(soon, "c", RequestVote(3, "c", 0, 0))
    assert el.drain() == [Send("c", PreVoteReply(3, False, 2)), Send("c", VoteReply(2, False))]
    assert el.term == 2 and el.leader == "b" and el.voted_for is None
    # once the leader has been silent for the minimum timeout the same request wins the vote
    late = LATER + CFG.election_timeout_min
    el.handle(late, "c", RequestVote(3, "c", 0, 0))
    assert el.drain()[-2:] == granted("a", "c", 3)


def test_pre_vote_changes_no_term_anywhere() -> None:
    asker, voter = make("a"), make("b")
    now = fire_timer(asker)
    out = asker.drain()
    assert asker.role == PRE_CANDIDATE and asker.term == 0 and persists(out) == []
    assert sends(out) == [Send("b", PreVote(1, "a", 0, 0)), Send("c", PreVote(1, "a", 0, 0))]
    voter.handle(now, "a", PreVote(1, "a", 0, 0))
    assert voter.drain() == [Send("a", PreVoteReply(1, True, 0))]
    assert voter.term == 0 and voter.voted_for is None


def test_pre_vote_majority_starts_the_election_and_votes_make_a_leader() -> None:
    el = make(observers=frozenset({"o"}))
    now = fire_timer(el)
    el.drain()
    el.handle(now, "b", PreVoteReply(1, False, 0))
    assert el.role == PRE_CANDIDATE
    el.handle(now, "c", PreVoteReply(1, True, 0))
    assert el.role == CANDIDATE and el.term == 1
    out = el.drain()
    assert [s.msg for s in sends(out)] == [RequestVote(1, "a", 0, 0)] * 2
    el.handle(now, "c", VoteReply(1, True))
    assert el.role == CANDIDATE  # a grant counts by its signature
    el.handle(now, "c", vote(1, "c", "a"))
    out = el.drain()
    assert el.role == LEADER and el.leader == "a"
    assert events(out, "leader_elected")[0].data == {"term": 1}
    # everyone, observers too, gets the proof first, then the first heartbeat, which carries
    # the new leader's no-op, not yet committed
    noop = AppendEntries(1, "a", 1, 0, 0, 0, ((1, b""),))
    assert [s.msg for s in sends(out)] == [proof(1, "a", signers=frozenset("ac"))] * 3 + [noop] * 3
    assert [s.to for s in sends(out)] == ["b", "c", "o"] * 2


def test_stale_pre_vote_grants_do_not_count() -> None:
    el = make()
    now = fire_timer(el)
    el.handle(now, "b", PreVoteReply(5, True, 0))  # answers some other round
    el.handle(now, "a", PreVoteReply(1, True, 0))  # from ourselves: dropped
    assert el.role == PRE_CANDIDATE and el.counters["drop_from_self"] == 1


def test_a_higher_term_in_a_pre_vote_refusal_catches_the_laggard_up() -> None:
    el = make()
    now = fire_timer(el)
    el.handle(now, "b", PreVoteReply(1, False, 6))
    assert el.role == FOLLOWER and el.term == 6
    assert persists(el.drain()) == [Persist(6, None)]


def test_candidates_and_voters_outside_the_voter_set_get_nothing() -> None:
    """Not even an answer (or a term: a non-voter's word moves nothing)."""
    el = make()
    el.handle(LATER, "x", PreVote(1, "x", 0, 0))
    el.handle(LATER, "x", RequestVote(1 << 62, "x", 0, 0))
    assert el.drain() == [] and el.term == 0
    now = fire_timer(el)
    el.handle(now, "x", PreVoteReply(el.term + 1, True, el.term))
    el.handle(now, "x", VoteReply(1 << 62, False))
    assert el.role == PRE_CANDIDATE and el.term == 0  # x's grant does not count
    assert el.counters["drop_not_voter"] == 4


def test_spoofed_ids_are_dropped() -> None:
    el = make()
    el.handle(LATER, "b", RequestVote(1, "c", 0, 0))
    el.handle(LATER, "b", PreVote(1, "c", 0, 0))
    el.handle(LATER, "b", hb(1, "c", 1))
    assert el.drain() == [] and el.term == 0
    assert el.counters["drop_spoofed_candidate"] == 2 and el.counters["drop_spoofed_leader"] == 1


# ---------------------------------------------------------------------------------------------
# Non-voters, small clusters, voter changes


def test_non_voters_never_campaign_but_follow_and_report_the_leader() -> None:
    el = make("o", voters=ABC)
    assert el.next_deadline() == math.inf  # no timer at all
    now = LATER
    el.tick(now)
    out = el.drain()
    assert not [s for s in sends(out) if isinstance(s.msg, PreVote | RequestVote)]
    assert el.term == 0 and el.role == FOLLOWER and el.counters["pre_votes_started"] == 0
    el.handle(now, "a", RequestVote(1, "a", 0, 0))  # it may vote (a voter that does not
    assert sends(el.drain())[-1] == Send("a", VoteReply(1, True))  # know it yet: see below)
    el.handle(now, "o2", RequestVote(2, "o2", 0, 0))  # but never for a non-voter
    assert not sends(el.drain()) and el.counters["drop_not_voter"] == 1
    lead(el, now, 1, "b")
    el.handle(now, "b", hb(1, "b", 4))
    assert el.leader == "b" and el.drain()[-1] == Send("b", ack(1, 4))
    el.tick(now + 100.0)  # the leader goes silent: idle observers hear it only now and then
    assert el.leader == "b"
    el.leader_gone(now + 100.0, "b")  # membership found it dead
    assert el.leader is None and events(el.drain(), "leader_changed")[0].data["leader"] is None


def test_a_replica_behind_knows_how_far_from_what_the_leader_states() -> None:
    """A new member's commit index is 0 until entries arrive; the leader's stated commit says
    it is behind (leadership.caught_up: its ledger is the past, not what runs now)."""
    el = make("c")
    lead(el, LATER, 1, "a")
    el.handle(LATER, "a", AppendEntries(1, "a", 1, 4, 1, 5))  # commit 5, entries it lacks
    assert el.drain()[-1] == Send("a", AppendReply(1, 1, False, 1))  # a gap: send from 1
    assert el.commit_index == 0 and el.leader_commit == 5
    el.handle(LATER, "a", AppendEntries(1, "a", 2, 0, 0, 3, ((1, b""),) * 3))  # an old round
    assert el.commit_index == 3 and el.leader_commit == 5  # states less: the most stated holds
    lead(el, LATER, 2, "b")  # the next term's leader has stated nothing yet
    assert el.term == 2 and el.leader_commit == 3
    el.handle(LATER, "b", AppendEntries(2, "b", 1, 3, 1, 4, ((2, b""),)))
    assert el.commit_index == el.leader_commit == 4


def test_a_member_holds_the_commit_only_once_its_log_is_known_to_reach_it() -> None:
    """The leader's catch-up rule for adding a voter (leadership.refresh_voters)."""
    el = make(voters=frozenset({"a"}), observers=frozenset({"o"}))
    el.tick(CFG.election_timeout_min)  # a lone voter leads and commits its no-op (index 1)
    append = next(s.msg for s in sends(el.drain()) if isinstance(s.msg, AppendEntries))
    assert el.commit_index == 1 and not el.holds_commit("o") and not el.holds_commit("x")
    el.handle(CFG.election_timeout_min, "o", AppendReply(1, append.seq, True, 1))
    assert el.holds_commit("o")


def test_a_new_voter_that_has_not_learnt_it_votes_still_votes_for_the_leader_that_added_it(
) -> None:
    """The founder alone commits {founder, c}, then loses its quorum (c, just joined, was slow
    to answer) before c has the entry: c must still vote for it, or nobody could ever lead
    (c does not campaign, believing it observes; the founder needs c's vote)."""
    el = make("c", voters=frozenset(), observers=frozenset())  # knows no configuration yet
    el.root = "a"  # (the founder, whose lone leadership it believes until told more)
    now = CFG.election_timeout_min  # (past the start-up stickiness)
    el.handle(now, "a", PreVote(2, "a", 3, 1))
    el.handle(now, "a", RequestVote(2, "a", 3, 1))
    msgs = [s.msg for s in sends(el.drain())]
    assert msgs[0] == PreVoteReply(2, True, 0) and msgs[-1] == VoteReply(2, True)
    assert [type(m).__name__ for m in msgs[1:-1]] == ["VoteProof"]  # (its signed vote)


def test_a_lone_voter_elects_itself_once_start_up_stickiness_ends() -> None:
    el = make(voters=frozenset({"a"}), observers=frozenset({"o"}))
    assert el.next_deadline() == CFG.election_timeout_min
    el.tick(CFG.election_timeout_min)
    out = el.drain()
    assert el.role == LEADER and el.term == 1 and Persist(1, "a", "a") in out
    assert el.leader_lease_valid(1e9)  # nobody else can ever lead
    # one voter commits (and applies) its no-op at once, and the observer learns it
    assert sends(out) == [
        Send("o", proof(1, "a", frozenset("a"))),
        Send("o", AppendEntries(1, "a", 1, 0, 0, 1, ((1, b""),))),
    ]
    assert Apply(1, 1, b"") in out
    el.tick(el.next_deadline())
    assert el.role == LEADER  # no check-quorum step-down without peers


def test_two_voters_need_each_other() -> None:
    el = make(voters=frozenset({"a", "b"}))
    now = fire_timer(el)
    assert el.role == PRE_CANDIDATE  # its own grant is not a majority of two
    for _ in range(20):
        now = el.next_deadline()
        el.tick(now)
    assert el.role == PRE_CANDIDATE and el.term == 0
    el.handle(now, "b", PreVoteReply(1, True, 0))
    el.handle(now, "b", vote(1, "b", "a"))
    assert el.role == LEADER and el.quorum == 2


def test_a_leader_removed_from_the_voters_steps_down() -> None:
    el = make()
    now = elect(el)
    el.set_voters(now, {"b", "c", "d"})
    out = el.drain()
    assert el.role == FOLLOWER and el.leader is None
    assert events(out, "stepped_down")[0].data["reason"] == "not_a_voter"
    for _ in range(50):
        el.tick(el.next_deadline())
    assert el.role == FOLLOWER and el.counters["pre_votes_started"] == 1


def test_a_follower_left_as_the_only_voter_takes_over() -> None:
    el = make()
    lead(el, LATER, 3, "b")
    el.set_voters(LATER, {"a"})
    # still sticky to b for one minimum timeout, then it elects itself
    assert el.next_deadline() == LATER + CFG.election_timeout_min
    el.tick(el.next_deadline())
    assert el.role == LEADER and el.term == 4


def test_shrinking_voters_can_complete_a_pending_pre_vote() -> None:
    el = make(voters=frozenset({"a", "b", "c", "d"}))
    now = fire_timer(el)
    el.handle(now, "b", PreVoteReply(1, True, 0))
    assert el.role == PRE_CANDIDATE  # 2 of 4
    el.set_voters(now, {"a", "b", "c"})
    assert el.role == CANDIDATE and el.term == 1  # 2 of 3


# ---------------------------------------------------------------------------------------------
# Check-quorum and the lease


def test_check_quorum_steps_down_a_leader_nobody_answers() -> None:
    el = make()
    start = elect(el)
    now = start
    while el.role == LEADER:
        now = el.next_deadline()
        el.tick(now)
    assert events(el.drain(), "stepped_down")[0].data["reason"] == "check_quorum"
    assert now == pytest.approx(start + CFG.check_quorum_timeout)


def test_repeating_the_voter_set_does_not_postpone_check_quorum() -> None:
    """The shell may call set_voters on every membership change; only a real change (new
    voters to hear from) restarts the check-quorum period."""
    el = make()
    start = elect(el)
    now = start
    while el.role == LEADER:
        now = el.next_deadline()
        el.set_voters(now, ABC)
        el.tick(now)
    assert now == pytest.approx(start + CFG.check_quorum_timeout)


def heartbeat_seqs(out: list[Output]) -> set[int]:
    return {s.msg.seq for s in sends(out) if isinstance(s.msg, AppendEntries)}


def test_answered_heartbeats_keep_the_leader_and_give_it_a_lease() -> None:
    el = make()
    now = fire_timer(el)
    el.handle(now, "b", PreVoteReply(1, True, 0))
    el.handle(now, "b", vote(1, "b", "a"))
    assert el.role == LEADER
    assert not el.leader_lease_valid(now)  # votes are no lease: only heartbeat acks are
    for _ in range(100):  # 10 s of heartbeats; b answers each round 5 ms later
        (seq,) = heartbeat_seqs(el.drain())
        el.handle(now + 0.005, "b", ack(1, seq))
        assert el.leader_lease_valid(now + 0.005)
        assert el.lease_expiry() == pytest.approx(now + CFG.lease_duration)
        now = el.next_deadline()
        el.tick(now)
    assert el.role == LEADER
    # acks from a non-voter, or for rounds never sent, extend nothing
    (seq,) = heartbeat_seqs(el.drain())
    el.handle(now, "o", ack(1, seq))
    el.handle(now, "c", ack(1, seq + 1000))
    assert el.lease_expiry() < now + CFG.lease_duration


def test_the_lease_counts_from_the_send_time_of_the_acknowledged_round() -> None:
    el = make()
    now = elect(el)
    el.handle(now + 0.3, "c", ack(el.term, 1))  # a slow ack of round 1
    assert el.lease_expiry() == pytest.approx(now + CFG.lease_duration)
    assert not el.leader_lease_valid(now + CFG.lease_duration)


# ---------------------------------------------------------------------------------------------
# Codec


ALL_MESSAGES = [
    PreVote(1, "a", 7, 1),
    PreVoteReply(2, True, 1),
    RequestVote(3, "node-with-a-long-id" * 3, 12, 2),
    VoteReply(4, False),
    hb(5, "a", 99),
    AppendEntries(5, "a", 100, 8, 4, 7, ((4, b"x" * MAX_ENTRY), (5, b""))),
    ack(2**63 - 1, 0),
    AppendReply(6, 3, False, 17),
    InstallSnapshot(7, "a", 3, 1000, 6, 0, b"\x00" * MAX_CHUNK, False),
    InstallSnapshot(7, "a", 3, 1000, 6, MAX_CHUNK, b"", True),
    SnapshotReply(7, 3, 1000, 4096),
]


@pytest.mark.parametrize("msg", ALL_MESSAGES)
def test_messages_round_trip(msg: object) -> None:
    plain = encode(msg)  # type: ignore[arg-type]
    assert msgpack.unpackb(msgpack.packb(plain)) == plain
    assert decode(plain) == msg
    type_str, body = pack(msg)  # type: ignore[arg-type]
    assert type_str in MESSAGE_TYPES and unpack(type_str, body) == msg


@pytest.mark.parametrize(
    "plain",
    [
        None,
        [],
        {"k": "vote"},
        {"k": "vote_reply", "term": 1},
        {"k": "vote_reply", "term": 1, "granted": True, "extra": 0},
        {"k": "vote_reply", "term": True, "granted": True},
        {"k": "vote_reply", "term": -1, "granted": True},
        {"k": "vote_reply", "term": 2**63, "granted": True},
        {"k": "vote_reply", "term": 1.0, "granted": True},
        {"k": "vote_reply", "term": 1, "granted": 1},
        {"k": "request_vote", "term": 1, "candidate": ""},
        {"k": "request_vote", "term": 1, "candidate": "x" * 65},
        {"k": "request_vote", "term": 1, "candidate": b"a"},
        {"k": 3, "term": 1, "granted": True},
    ],
)
def test_malformed_messages_are_rejected(plain: object) -> None:
    with pytest.raises(MessageError):
        decode(plain)


def test_unpack_rejects_mismatched_types_and_garbage() -> None:
    _, body = pack(VoteReply(1, True))
    for type_str, raw in [
        ("election.append_reply", body),
        ("election.heartbeat", body),
        ("ping", body),
        ("election.vote_reply", b"\xc1"),
        ("election.vote_reply", body + b"\x00"),
        ("election.vote_reply", b"\x80" * 2000),
    ]:
        with pytest.raises(MessageError):
            unpack(type_str, raw)
    with pytest.raises(TypeError):
        encode("not a message")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(MESSAGE_TYPES)), st.binary(max_size=64))
def test_unpack_raises_only_message_error(type_str: str, raw: bytes) -> None:
    with contextlib.suppress(MessageError):
        unpack(type_str, raw)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            ["k", "term", "granted", "seq", "leader", "candidate", "next_term", "entries"]
        ),
        st.one_of(st.integers(), st.booleans(), st.text(max_size=70), st.none()),
    )
)
def test_decode_raises_only_message_error(plain: dict[str, object]) -> None:
    with contextlib.suppress(MessageError):
        decode(plain)


def test_handle_ignores_objects_that_are_not_messages() -> None:
    el = make()
    el.handle(LATER, "b", "junk")  # type: ignore[arg-type]
    assert el.drain() == [] and el.counters["drop_unknown_message"] == 1


def test_persisted_round_trip_and_validation() -> None:
    for p in (Persisted(), Persisted(9, "b")):
        assert Persisted.from_plain(p.to_plain()) == p
    for bad in ({"term": -1, "voted_for": None}, {"term": 1}, {"term": 1, "voted_for": 3}, []):
        with pytest.raises(MessageError):
            Persisted.from_plain(bad)


# ---------------------------------------------------------------------------------------------
# Voter selection


def test_voters_are_odd_and_a_voter_is_replaced_only_after_the_stabilisation_time() -> None:
    five = [(m, float(i), True) for i, m in enumerate("abcde")]
    assert target_voters(frozenset(), five, {}) == set("abcde")
    assert target_voters(frozenset(), five[:4], {}) == set("abc")  # four: three vote
    assert target_voters(frozenset(), five[:2], {}) == {"a"}
    assert target_voters(frozenset(), [], {}) == frozenset()
    # two voters out of reach (a partition, a reboot): they stay, so that any connected
    # majority of the five still holds a majority of the voters
    down = [(m, at, m not in "de") for m, at, _ in five]
    assert target_voters(frozenset("abcde"), down, {"d": 29.0, "e": 29.0}) == set("abcde")
    # out of reach for longer: three voters remain without them (two failures later, a
    # third is still survived); one of three never leaves for want of a replacement
    assert target_voters(frozenset("abcde"), down, {"d": 31.0, "e": 31.0}) == set("abc")
    assert target_voters(frozenset("abcde"), down, {"d": 31.0, "e": 5.0}) == set("abcde")
    three = [("a", 0.0, True), ("b", 1.0, True), ("c", 2.0, False)]
    assert target_voters(frozenset("abc"), three, {"c": 99.0}) == set("abc")
    # a sixth member, alive: it takes the place of the one out of reach longest... by rank
    six = [*down, ("f", 9.0, True)]
    assert target_voters(frozenset("abcde"), six, {"d": 31.0, "e": 5.0}) == set("abcef")
    # a banned or departed voter is not among the members given: replaced at once
    assert target_voters(frozenset("abcde"), [m for m in six if m[0] != "a"],
                         {"d": 1.0, "e": 1.0}) == set("bcdef")
    # ties by admission time are broken by id, the same on every node
    tied = [(m, 0.0, True) for m in "zyxwvu"]
    assert target_voters(frozenset(), tied, {}) == set("uvwxy")


def test_step_voters_moves_one_member_at_a_time() -> None:
    cur, target = frozenset({"a", "b", "c"}), frozenset({"a", "d", "e"})
    path = [cur]
    while path[-1] != target:
        path.append(step_voters(path[-1], target))
    assert path == [
        cur,
        frozenset({"a", "c"}),
        frozenset({"a"}),
        frozenset({"a", "d"}),
        target,
    ]
    assert all(len(x ^ y) == 1 for x, y in itertools.pairwise(path))


def test_a_newcomer_that_is_not_ready_does_not_hold_up_one_that_is() -> None:
    """c cannot yet believe the leader b (it missed the changes since b's election), so it can
    never catch up; a, which can, joins the set first (the lone-voter wedge of issue 15)."""
    cur, target = frozenset("b"), frozenset("abc")
    assert step_voters(cur, target, lambda m: m != "a") == frozenset("bc")  # smallest ready
    assert step_voters(cur, target, lambda m: m == "c") == frozenset("bc")
    assert step_voters(cur, target, lambda m: m == "a") == frozenset("ab")
    assert step_voters(cur, target, lambda m: False) == cur
    assert step_voters(frozenset("abcd"), target, lambda m: False) == target  # removals: always
    # a voter that is away (leaving, out of reach) goes before one that is merely not chosen
    assert step_voters(ABC, frozenset("b"), away=(frozenset(), frozenset("c"))) == set("ab")
    assert step_voters(ABC, frozenset("b"), away=(frozenset("a"), frozenset("c"))) == set("bc")
    assert step_voters(ABC, frozenset("b")) == frozenset("bc")


# ---------------------------------------------------------------------------------------------
# Proof of leadership: a member that is not a voter (the attacker with one member's key)


MAX = (1 << 63) - 1


def test_a_member_cannot_make_itself_leader_at_a_higher_or_the_maximum_term() -> None:
    """x is an admitted member (an observer) signing whatever it likes with its own key."""
    el = make(observers=frozenset({"x"}))
    for term in (1, MAX):
        el.handle(LATER, "x", proof(term, "x", frozenset("x")))  # its own vote alone
        el.handle(LATER, "x", proof(term, "x", ABC | {"x"}, frozenset("x")))  # one of four
        el.handle(LATER, "x", hb(term, "x", 1))
        el.handle(LATER, "x", AppendEntries(term, "x", 2, 0, 0, 1, ((term, b"pause"),)))
        el.handle(LATER, "x", InstallSnapshot(term, "x", 3, 5, term, 0, b"forged", True))
    out = el.drain()
    assert el.term == 0 and el.leader is None and el.log.last_index == 0
    assert el.proven_leader(1) is None and el.proven_leader(MAX) is None
    assert not [o for o in out if isinstance(o, Persist | PersistEntries | Apply | Restore)]
    assert el.counters["unproven_leader"] == 6
    # one checked, the rest refused unchecked: an unasked proof per member per heartbeat
    assert el.counters["bad_leader_proof"] == 1 and el.counters["leader_proof_limited"] == 3
    # the real leader's proof still counts, and its heartbeat moves the term
    lead(el, LATER, 2, "b")
    el.handle(LATER, "b", hb(2, "b", 1))
    assert el.term == 2 and el.leader == "b" and el.drain()[-1] == Send("b", ack(2, 1))


def test_votes_for_another_candidate_or_another_term_prove_nothing() -> None:
    """x saw b's proof (it is an observer): the signatures name b and b's term, not x."""
    el = make(observers=frozenset({"x"}))
    real = proof(3, "b")
    el.handle(LATER, "x", LeaderProof(3, "x", real.voters, real.votes))
    el.handle(LATER + 1, "x", LeaderProof(4, "x", (*real.voters, "x"), real.votes))
    el.handle(LATER, "b", LeaderProof(4, "b", real.voters, real.votes))  # b's term-3 votes
    assert el.proven_leader(3) is None and el.proven_leader(4) is None
    assert el.counters["bad_leader_proof"] == 3
    el.handle(LATER, "x", real)  # relayed by someone else: the leader must send its own
    assert el.counters["drop_spoofed_leader"] == 1 and el.term == 0


def test_a_voters_unproven_word_moves_the_term_by_a_bounded_step() -> None:
    el = make()
    el.handle(LATER, "b", RequestVote(MAX, "b", 0, 0))
    now = fire_timer(el)
    el.handle(now, "c", PreVoteReply(1, False, MAX))
    assert el.term == 0 and el.counters["drop_term_jump"] == 2
    el.handle(now, "c", PreVoteReply(1, False, 1000))
    assert el.term == 1000  # a laggard still catches up with real terms


def test_the_checked_leader_of_a_term_survives_a_restart() -> None:
    """The voter set can grow after the election (founder alone, then three): a follower that
    restarts with the grown set could not check that proof again, so it keeps what it checked."""
    el = make("c", voters=frozenset("a"))
    el.handle(LATER, "a", proof(1, "a", frozenset("a")))
    stored = persists(el.drain())[-1]
    assert stored == Persist(1, None, "a")
    again = make("c", voters=ABC, persisted=Persisted(stored.term, stored.voted_for,
                                                       stored.leader))
    again.handle(LATER, "a", hb(1, "a", 7))
    assert again.leader == "a" and again.drain()[-1] == Send("a", ack(1, 7))
    assert again.proven_leader(1) == "a"


def test_a_proof_request_is_answered_at_most_once_per_heartbeat_interval() -> None:
    el = make(observers=frozenset({"o"}))
    now = elect(el)
    el.handle(now, "o", ProofRequest(el.term))
    el.handle(now, "o", ProofRequest(el.term))
    assert el.drain() == []  # the proof went out with the election, a moment ago
    later = now + CFG.heartbeat_interval * 1.5
    for _ in range(50):
        el.handle(later, "o", ProofRequest(el.term))
    assert [s.msg for s in sends(el.drain())] == [proof(el.term, "a", signers=frozenset("ab"))]
    assert el.counters["proof_request_limited"] == 51


@pytest.mark.parametrize(("claimed", "signers", "mine", "root", "ok"), [
    ("abc", "ab", "abc", None, True),  # the same voter set, a majority
    ("abc", "a", "abc", None, False),  # no majority
    ("abcd", "abc", "abc", None, True),  # one change apart (a voter was added)
    ("ab", "ab", "abc", None, True),  # one removed
    ("ax", "a", "abc", None, False),  # x added and c gone: two changes, one signer
    ("x", "x", "", "a", False),  # a node without voters trusts the founder alone
    ("a", "a", "", "a", True),
    ("ade", "de", "abc", None, False),  # three changes, no known signer
    ("ade", "ad", "abc", None, True),  # several changes behind, but a known voter signed
    ("cde", "de", "", "a", True),  # just joined: two signers needed, and there are
    ("abc", "bc", "abc", None, True),  # the leader's own vote is not needed
    ("bcd", "bcd", "bcd", None, True),
])
def test_the_proof_rule(claimed: str, signers: str, mine: str, root: str | None,
                        ok: bool) -> None:
    leader = "x" if "x" in claimed else "a" if "a" in claimed else claimed[0]
    votes = tuple((v, vote(5, v, leader).sig) for v in signers)
    assert proof_valid(5, leader, frozenset(claimed), votes, frozenset(mine), root,
                       KEYS.for_node("z")) is ok


@pytest.mark.parametrize(("newest", "ok"), [
    ("ab", True),  # dropped from the set: the entry that dropped it arrived, its commit not
    ("", False),
    ("abd", False),  # two changes from {b} as well
])
def test_the_proof_rule_also_counts_the_newest_configuration_in_the_log(newest: str,
                                                                       ok: bool) -> None:
    votes = ((("b", vote(5, "b", "b").sig)),)
    assert proof_valid(5, "b", frozenset("b"), votes, ABC, None, KEYS.for_node("c"),
                       frozenset(newest)) is ok


def test_a_lone_leader_whose_set_grew_asks_for_a_vote_and_a_laggard_then_believes_it() -> None:
    """The sequence of issue 15: the founder a leaves, so the voters shrink {a,b,c} -> {a,b} ->
    {b}; c (which applied neither change) and d (which just joined) cannot believe b's proof of
    one signature. a comes back and b adds it: b asks a for a vote in its own term, which a,
    following b, grants despite its stickiness; the proof then names {a,b} with two signatures,
    and both c and d believe it."""
    b = make("b", voters=frozenset("b"), observers=frozenset("acd"))
    now = fire_timer(b)  # a lone voter: pre-vote and vote at once
    assert b.role == LEADER and b.term == 1
    b.drain()
    c = make("c", voters=ABC)  # applied {a,b,c} only
    d = make("d", voters=frozenset())
    d.root = "a"  # the founder: a node without voters believes it alone
    lone = proof(1, "b", frozenset("b"))
    c.handle(now, "b", lone)
    d.handle(now, "b", lone)
    assert c.counters["bad_leader_proof"] == d.counters["bad_leader_proof"] == 1
    a = make("a", voters=frozenset("b"))  # restarted with the newest set in its log
    a.handle(now, "b", lone)
    a.handle(now, "b", hb(1, "b", 1))
    assert a.leader == "b"
    a.drain()
    b.set_voters(now, frozenset("ab"))  # a holds the commit: it became a voter
    b.drain()
    later = now + CFG.heartbeat_interval
    b.tick(later)  # the next heartbeat round asks a for its vote
    asks = [o for o in sends(b.drain()) if isinstance(o.msg, RequestVote)]
    assert asks == [Send("a", RequestVote(1, "b", b.log.last_index, b.log.last_term))]
    a.handle(later, "b", asks[0].msg)  # sticky to b: it heard b a moment ago
    assert a.drain()[-2:] == granted("a", "b", 1)
    assert a.voted_for == "b" and a.term == 1 and a.leader == "b"
    b.handle(later, "a", vote(1, "a", "b"))
    b.handle(later + 1, "c", ProofRequest(1))
    [grown] = [o.msg for o in sends(b.drain()) if isinstance(o.msg, LeaderProof)]
    assert grown.voters == ("a", "b") and [v for v, _sig in grown.votes] == ["a", "b"]
    for verifier in (c, d):
        verifier.handle(later + 1, "b", grown)
        assert verifier.proven_leader(1) == "b", verifier.id
    # asked once per minimum election timeout, and no more once the proof names the set
    b.tick(later + CFG.election_timeout_min)
    assert not [o for o in sends(b.drain()) if isinstance(o.msg, RequestVote)]


def test_a_leader_left_alone_by_a_shrink_keeps_the_proof_of_the_pair_that_elected_it() -> None:
    """{a,b} elected a; the set shrinks to {a}: a proof of a's one signature against {a} would
    lose the member that just joined (it believes two signatures, not a lone non-founder)."""
    a = make("a", voters=frozenset("ab"), observers=frozenset("d"))
    now = fire_timer(a)
    a.handle(now, "b", PreVoteReply(1, True, 0))
    a.handle(now, "b", vote(1, "b", "a"))
    assert a.role == LEADER
    a.set_voters(now, frozenset("a"))
    a.drain()
    a.handle(now + 1, "d", ProofRequest(1))
    [kept] = [o.msg for o in sends(a.drain()) if isinstance(o.msg, LeaderProof)]
    assert kept.voters == ("a", "b") and len(kept.votes) == 2
    d = make("d", voters=frozenset())
    d.root = "z"
    d.handle(now + 1, "a", kept)
    assert d.proven_leader(1) == "a"


def test_only_the_leader_itself_gets_a_vote_past_the_stickiness() -> None:
    """A voter following b refuses c's request in b's term (c is a voter, but not the leader
    it follows) and a member that is no voter is not heard at all."""
    a = make("a", observers=frozenset("x"))
    lead(a, LATER, 1, "b")
    a.handle(LATER, "b", hb(1, "b", 1))
    a.drain()
    a.handle(LATER, "c", RequestVote(1, "c", 5, 1))
    a.handle(LATER, "x", RequestVote(1, "x", 5, 1))
    assert a.drain() == [Send("c", VoteReply(1, False))]
    assert a.voted_for is None and a.counters["vote_refused_sticky"] == 1
    assert a.counters["drop_not_voter"] == 1


def test_a_proof_costs_at_most_a_majority_of_checks_and_unasked_ones_are_rate_limited() -> None:
    checked: list[str] = []

    class Counting:
        def sign(self, data: bytes) -> bytes:
            return KEYS.key("a").sign(data).signature

        def verify(self, signer: str, data: bytes, sig: bytes) -> bool:
            checked.append(signer)
            return KEYS.for_node("a").verify(signer, data, sig)

    el = Election("a", ABC, CFG, random.Random(1), 0.0, observers=frozenset({"x"}),
                  signatures=Counting())
    junk = bytes(64)
    el.handle(LATER, "x", LeaderProof(1, "x", ("b", "c", "x"), (("x", junk),) * 9))
    assert checked == []  # one voter nine times: no majority possible, nothing checked
    el.handle(LATER + 1, "x", LeaderProof(1, "x", ("b", "c", "x"),
                                          (("x", junk),) * 8 + (("b", junk),)))
    assert checked == ["x"]  # x's fails; b's alone could no longer make a majority
    el.handle(LATER + 1, "x", LeaderProof(2, "x", ("b", "c", "x"), (("x", junk),)))
    assert checked == ["x"] and el.counters["leader_proof_limited"] == 1
    el.handle(LATER + 1, "b", proof(1, "b"))  # the real one counts (another sender)
    assert el.proven_leader(1) == "b"


def test_a_member_cannot_push_the_real_leaders_held_message_out() -> None:
    """The real leader's heartbeat overtook its proof; x's message arriving meanwhile is not
    held in its place, so the heartbeat is handled as soon as the proof lands."""
    el = make(observers=frozenset({"x"}))
    el.handle(LATER, "b", hb(1, "b", 5))
    el.handle(LATER, "x", hb(1, "x", 6))
    el.drain()
    lead(el, LATER, 1, "b")
    assert el.drain()[-1] == Send("b", ack(1, 5))


# ---------------------------------------------------------------------------------------------
# Stalls of this node: a grace before acting on a timer that expired meanwhile, and patience


def _pulse(el: Election, until: float) -> float:
    """Run `el` at its deadlines until `until`, as a healthy shell does; returns the time."""
    now = el.next_deadline()
    while now <= until:
        el.tick(now)
        el.drain()
        now = el.next_deadline()
    return until


def _following(node: str = "b") -> tuple[Election, float]:
    el = make(node, cfg=STALLS)
    lead(el, LATER, 1, "a")
    el.handle(LATER, "a", hb(1, "a", 1))
    el.drain()
    return el, LATER


def _leading() -> tuple[Election, float]:
    """`a` elected by b's vote, run at its deadlines (as a healthy shell does) from the start."""
    el = make("a", cfg=STALLS)
    now = 0.0
    while el.role != PRE_CANDIDATE:
        now = el.next_deadline()
        el.tick(now)
    return el, elect(el, now)


def _no_campaign(out: list[Output]) -> bool:
    return not [s for s in sends(out) if isinstance(s.msg, PreVote | RequestVote)]


GRACE = 2 * STALLS.heartbeat_interval


def test_a_stalled_follower_reads_the_heartbeats_it_missed_before_campaigning() -> None:
    """The leader kept sending while this voter was not run for a second (a starved CPU): when
    it runs again its timer has expired, but the heartbeats are waiting in its socket. It waits
    two heartbeat intervals for them instead of campaigning, and then follows as before."""
    el, now = _following()
    assert el.next_deadline() == now + STALLS.heartbeat_interval  # the pulse that shows stalls
    now = _pulse(el, now + 0.2)
    now += 1.0  # the stall
    el.tick(now)
    assert _no_campaign(el.drain()) and el.counters["stalls"] == 1
    assert el.next_deadline() == now + STALLS.heartbeat_interval
    el.handle(now + 0.01, "a", hb(1, "a", 12))  # queued during the stall
    _pulse(el, now + GRACE)
    assert _no_campaign(el.drain()) and el.leader == "a" and el.role == FOLLOWER


def test_a_stalled_follower_whose_leader_is_gone_campaigns_a_grace_late_then_patiently() -> None:
    """With nothing queued it campaigns when the grace ends: stalls delay it, never stop it.
    Its election timeouts are doubled (patience) until patience_decay quiet seconds pass."""
    el, now = _following()
    now = _pulse(el, now + 0.2) + 1.0
    el.tick(now)
    assert _no_campaign(el.drain())
    now = _pulse(el, now + GRACE)
    assert el.role == PRE_CANDIDATE
    el.handle(now, "a", hb(1, "a", 30))  # the leader after all: following again
    el.drain()
    quiet = now
    now = _pulse(el, now + 2 * STALLS.election_timeout_min - 0.01)
    assert el.role == FOLLOWER  # a doubled timeout: not yet, though 0.8 s passed
    now = _pulse(el, now + 4 * STALLS.election_timeout_max)
    assert el.role == PRE_CANDIDATE
    # ten quiet seconds later the timeouts are back to [0.4, 0.8]
    el.handle(now, "a", hb(1, "a", 40))
    now = _pulse(el, quiet + STALLS.patience_decay + 0.5)
    el.handle(now, "a", hb(1, "a", 50))
    el.drain()
    _pulse(el, now + STALLS.election_timeout_max + 0.01)
    assert el.role == PRE_CANDIDATE and el.counters["stalls"] == 1


def test_a_follower_hearing_its_leader_late_gets_patient_and_calm_makes_it_quick_again() -> None:
    """A voter running on time whose leader's heartbeats come late_gap apart (a busy leader)
    doubles its election timeout, as for a stall of its own; heartbeats on time do not; ten
    quiet seconds later its timeouts are back to [min, max]."""
    el, now = _following()
    now = _pulse(el, now + 0.05)
    el.handle(now, "a", hb(1, "a", 2))  # on time
    assert el.counters["late"] == 0
    now = _pulse(el, now + STALLS.late_gap + 0.01)  # this node runs on time meanwhile
    el.handle(now, "a", hb(1, "a", 3))  # late
    el.drain()
    assert el.counters["late"] == 1 and el.counters["stalls"] == 0
    now = _pulse(el, now + 2 * STALLS.election_timeout_min - 0.01)
    assert el.role == FOLLOWER  # 0.8 s of silence: a doubled timeout has not run out
    el.handle(now, "a", hb(1, "a", 4))  # (late again)
    el.drain()
    quiet = now
    now = quiet
    while now < quiet + 3 * STALLS.patience_decay:  # heartbeats on time for 30 s
        now = _pulse(el, now + 0.1)
        el.handle(now, "a", hb(1, "a", 5 + int(now * 10)))
        el.drain()
    _pulse(el, now + STALLS.election_timeout_max + 0.01)
    assert el.role == PRE_CANDIDATE and el.counters["late"] == 2


def _answered(el: Election, now: float, until: float, late: int | None = None) -> float:
    """Run leader `el` at its deadlines until `until`, b answering each round at once and c
    answering round `late` late_gap later (and no other); returns when b last answered."""
    last = now
    pending: list[tuple[float, int]] = []
    while (now := el.next_deadline()) <= until:
        for at, seq in [p for p in pending if p[0] <= now]:
            el.handle(at, "c", AppendReply(el.term, seq, True, el.log.last_index))
            pending.remove((at, seq))
        el.tick(now)
        for seq in {s.msg.seq for s in sends(el.drain()) if isinstance(s.msg, AppendEntries)
                    and s.to == "b"}:
            el.handle(now, "b", AppendReply(el.term, seq, True, el.log.last_index))
            last = now
            if late is None:  # (later sends in the same round carry its seq too)
                late = seq
                pending.append((now + STALLS.late_gap + 0.01, seq))
        el.drain()
    return last


def test_a_leader_whose_voter_answers_late_gets_patient_before_giving_up_on_its_quorum(
        ) -> None:
    el, now = _leading()
    last = _answered(el, now, now + 1.0)
    assert el.counters["late"] == 1 and el.counters["stalls"] == 0 and el.role == LEADER
    _pulse(el, last + 2 * STALLS.check_quorum_timeout - 0.05)  # silence: doubled, not yet
    assert el.role == LEADER
    _pulse(el, last + 2 * STALLS.check_quorum_timeout + 2 * STALLS.heartbeat_interval)
    assert el.role != LEADER


def test_a_second_stall_soon_after_gets_no_grace() -> None:
    """At most one grace per election_timeout_min: a node starved all the time still acts."""
    el, now = _following()
    now = _pulse(el, now + 0.2) + 1.0
    el.tick(now)  # the first stall: a grace
    assert el.role == FOLLOWER
    el.tick(now + 0.35)  # stalled again, within election_timeout_min: no grace
    assert el.counters["stalls"] == 2 and el.role == PRE_CANDIDATE


def test_a_stalled_leader_reads_its_replies_before_giving_up_on_its_quorum() -> None:
    el, now = _leading()
    now = _pulse(el, now + 0.3)
    now += 1.0  # stalled: its check-quorum deadline passed meanwhile
    el.tick(now)
    assert el.role == LEADER and el.counters["stalls"] == 1
    [beat] = {s.msg.seq for s in sends(el.drain()) if isinstance(s.msg, AppendEntries)}
    el.handle(now + 0.05, "b", AppendReply(el.term, beat, True, el.log.last_index))
    _pulse(el, now + GRACE)
    assert el.role == LEADER
    # with no reply it does step down, a grace later
    el, now = _leading()
    now = _pulse(el, now + 0.3) + 1.0
    el.tick(now)
    assert el.role == LEADER
    _pulse(el, now + GRACE)
    assert el.role == FOLLOWER
