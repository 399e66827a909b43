"""Log replication in the Raft core, one message at a time: what is persisted before what is
sent, log matching, the vote restriction, the commit rule, snapshots."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import pytest

from swarmnode.election import (
    LEADER,
    MAX_ENTRY,
    AppendEntries,
    AppendReply,
    Apply,
    Config,
    Election,
    InstallSnapshot,
    KeyRing,
    LeaderProof,
    LogEntry,
    Output,
    Persist,
    Persisted,
    PersistEntries,
    PersistSnapshot,
    PreVote,
    PreVoteReply,
    RequestVote,
    Restore,
    Send,
    Snapshot,
    SnapshotReply,
    VoteProof,
    VoteReply,
    vote_payload,
)

CFG = Config(stall_grace=False)
"""Time moves in jumps here, which the core would take for stalls (see test_election_core)."""
ABC = frozenset({"a", "b", "c"})
LATER = 10.0

KEYS = KeyRing()
"""Real Ed25519 keys for the named test nodes."""


def make(
    node_id: str = "a",
    voters: frozenset[str] = ABC,
    *,
    persisted: Persisted | None = None,
    log: tuple[LogEntry, ...] = (),
    snapshot: Snapshot | None = None,
    observers: frozenset[str] = frozenset(),
    cfg: Config = CFG,
) -> Election:
    el = Election(
        node_id,
        voters,
        cfg,
        random.Random(1),
        0.0,
        persisted,
        observers=observers,
        log=log,
        snapshot=snapshot,
        signatures=KEYS.for_node(node_id),
    )
    assert el.drain() == []
    return el


def entries(*terms: int, start: int = 1) -> tuple[LogEntry, ...]:
    return tuple(LogEntry(start + i, t, f"e{start + i}".encode()) for i, t in enumerate(terms))


def sends(out: list[Output]) -> list[Send]:
    return [o for o in out if isinstance(o, Send)]


def applies(out: list[Output]) -> list[Apply]:
    return [o for o in out if isinstance(o, Apply)]


def elect(el: Election, voter: str = "b") -> list[Output]:
    """Make `el` leader with `voter`'s pre-vote and vote; the outputs from the vote on."""
    now = max(el.next_deadline(), LATER)
    el.tick(now)
    el.handle(now, voter, PreVoteReply(el.term + 1, True, el.term))
    el.drain()
    el.handle(now, voter, VoteProof(el.term, el.id,
                                    KEYS.key(voter).sign(vote_payload(el.term, el.id)).signature))
    assert el.role == LEADER
    return el.drain()


def led(el: Election, leader: str, msg: AppendEntries | InstallSnapshot) -> None:
    """Handle a leader's message, after the proof of its term when `el` has none yet."""
    if el.proven_leader(msg.term) != leader:
        votes = tuple((v, KEYS.key(v).sign(vote_payload(msg.term, leader)).signature)
                      for v in sorted(el.voters))
        el.handle(LATER, leader, LeaderProof(msg.term, leader, tuple(sorted(el.voters)), votes))
    el.handle(LATER, leader, msg)


def give_lease(el: Election, voter: str = "b") -> None:
    """Acknowledge the current heartbeat round (the leader's lease starts)."""
    el.handle(LATER, voter, AppendReply(el.term, 1, True, 0))


def pump(nodes: dict[str, Election], out: dict[str, list[Output]], now: float = LATER) -> None:
    """Deliver every Send until the cluster is quiet (no loss, no delay), collecting each
    node's other outputs in `out`."""
    queue = [(id_, o) for id_, el in nodes.items() for o in el.drain()]
    while queue:
        src, o = queue.pop(0)
        if isinstance(o, Send):
            if o.to in nodes:
                nodes[o.to].handle(now, src, o.msg)
                queue += [(o.to, x) for x in nodes[o.to].drain()]
        else:
            out.setdefault(src, []).append(o)


# ---------------------------------------------------------------------------------------------
# The leader's no-op, proposals, and what is durable before what


def test_a_new_leader_persists_its_noop_before_sending_it() -> None:
    el = make()
    out = elect(el)
    appends = [i for i, o in enumerate(out) if isinstance(o, Send)]
    noop = PersistEntries(1, (LogEntry(1, 1, b""),))
    assert appends and out.index(noop) < appends[0]
    heartbeats = [s.msg for s in sends(out) if isinstance(s.msg, AppendEntries)]
    assert len(heartbeats) == 2 and all(m.entries == ((1, b""),) for m in heartbeats)
    assert el.commit_index == 0 and not el.can_schedule(LATER)


def test_propose_needs_a_leader_with_a_lease() -> None:
    el = make()
    assert el.propose(LATER, b"x") is None  # a follower forwards, it does not propose
    elect(el)
    assert el.propose(LATER, b"x") is None  # elected but no heartbeat acknowledged yet
    give_lease(el)
    assert el.propose(LATER, {"op": "x"}) == 2
    assert el.counters["propose_refused"] == 2
    with pytest.raises(ValueError):
        el.propose(LATER, b"")  # empty is the leader's no-op
    with pytest.raises(ValueError):
        el.propose(LATER, b"x" * (MAX_ENTRY + 1))


def test_a_proposal_goes_out_at_once_to_followers_that_are_up_to_date() -> None:
    el = make()
    elect(el)
    give_lease(el)
    el.handle(LATER, "b", AppendReply(1, 1, True, 1))  # b holds the no-op
    out = el.drain()
    assert el.commit_index == 1  # the no-op is on a, b: a majority
    assert applies(out) == [Apply(1, 1, b"")]
    assert el.can_schedule(LATER)
    index = el.propose(LATER, b"job")
    out = el.drain()
    assert out[0] == PersistEntries(2, (LogEntry(2, 1, b"job"),))
    # b is up to date: it gets the entry now; c never answered and waits for the heartbeat
    assert [(s.to, s.msg.prev_index, s.msg.entries) for s in sends(out)] == [
        ("b", 1, ((1, b"job"),))
    ]
    el.handle(LATER, "b", AppendReply(1, 1, True, index))  # type: ignore[arg-type]
    assert applies(el.drain()) == [Apply(2, 1, b"job")]


def test_a_lone_voter_commits_its_own_proposals_after_persisting_them() -> None:
    el = make(voters=frozenset({"a"}))
    el.tick(CFG.election_timeout_min)
    el.drain()
    assert el.propose(LATER, b"x") == 2
    out = el.drain()
    assert out == [PersistEntries(2, (LogEntry(2, 1, b"x"),)), Apply(2, 1, b"x")]


# ---------------------------------------------------------------------------------------------
# Followers: log matching


def test_a_follower_persists_before_it_replies_and_applies_only_what_is_committed() -> None:
    el = make("b")
    led(el, "a", AppendEntries(1, "a", 1, 0, 0, 0, ((1, b""), (1, b"x"))))
    out = el.drain()
    stored = PersistEntries(1, (LogEntry(1, 1, b""), LogEntry(1 + 1, 1, b"x")))
    assert out.index(Persist(1, None, "a")) < out.index(stored) < len(out) - 1
    assert out[-1] == Send("a", AppendReply(1, 1, True, 2))
    assert applies(out) == []
    # the leader's commit index arrives with the next heartbeat
    led(el, "a", AppendEntries(1, "a", 2, 2, 1, 2))
    assert applies(el.drain()) == [Apply(1, 1, b""), Apply(2, 1, b"x")]
    # commit is capped by what this follower is known to match: not beyond index 2
    led(el, "a", AppendEntries(1, "a", 3, 2, 1, 9))
    assert el.commit_index == 2


def test_a_gap_or_a_conflict_is_refused_with_a_hint() -> None:
    el = make("b", persisted=Persisted(3), log=entries(1, 1, 2, 2))
    led(el, "a", AppendEntries(3, "a", 1, 7, 3, 0, ((3, b"z"),)))
    assert el.drain()[-1] == Send("a", AppendReply(3, 1, False, 5))  # our log ends at 4
    led(el, "a", AppendEntries(3, "a", 2, 4, 3, 0))
    # entry 4 has term 2, not 3: skip the whole term-2 run (it starts at 3)
    assert el.drain()[-1] == Send("a", AppendReply(3, 2, False, 3))
    assert el.log.last_index == 4  # a refusal changes nothing


def test_a_conflicting_suffix_is_replaced_and_the_truncation_persisted() -> None:
    el = make("b", persisted=Persisted(3), log=entries(1, 1, 2, 2))
    led(el, "a", AppendEntries(3, "a", 1, 2, 1, 0, ((3, b"new"),)))
    out = el.drain()
    assert PersistEntries(3, (LogEntry(3, 3, b"new"),)) in out
    assert [e.term for e in el.log] == [1, 1, 3] and out[-1].msg.success  # type: ignore[union-attr]


def test_a_late_duplicate_of_an_old_batch_truncates_nothing() -> None:
    el = make("b")
    led(el, "a", AppendEntries(1, "a", 2, 0, 0, 0, ((1, b"1"), (1, b"2"), (1, b"3"))))
    el.drain()
    led(el, "a", AppendEntries(1, "a", 1, 0, 0, 0, ((1, b"1"),)))
    out = el.drain()
    assert out == [Send("a", AppendReply(1, 1, True, 1))]  # nothing persisted, nothing lost
    assert el.log.last_index == 3


def test_a_committed_entry_is_never_overwritten() -> None:
    """Only a leader without a committed entry could send this; refuse rather than lose it."""
    el = make("b", persisted=Persisted(2), log=entries(1, 2))
    led(el, "a", AppendEntries(2, "a", 1, 2, 2, 2))
    assert el.commit_index == 2
    el.drain()
    led(el, "c", AppendEntries(3, "c", 1, 1, 1, 0, ((3, b"other"),)))
    assert el.log.term_at(2) == 2 and el.counters["conflict_with_committed"] == 1


def test_a_stale_leader_is_answered_with_the_higher_term() -> None:
    el = make("b", persisted=Persisted(5))
    led(el, "a", AppendEntries(4, "a", 7, 0, 0, 0, ((4, b"x"),)))
    assert el.drain() == [Send("a", AppendReply(5, 7, False, 0))]
    assert el.log.last_index == 0


# ---------------------------------------------------------------------------------------------
# The vote restriction


@pytest.mark.parametrize(
    ("last_index", "last_term", "granted"),
    [(3, 2, True), (9, 2, True), (1, 3, True), (2, 2, False), (10, 1, False), (0, 0, False)],
)
def test_votes_and_pre_votes_need_a_log_at_least_as_up_to_date(
    last_index: int, last_term: int, granted: bool
) -> None:
    el = make("b", persisted=Persisted(2), log=entries(1, 2, 2))  # ends at (term 2, index 3)
    el.handle(LATER, "a", PreVote(3, "a", last_index, last_term))
    assert el.drain() == [Send("a", PreVoteReply(3, granted, 2))]
    el.handle(LATER, "a", RequestVote(3, "a", last_index, last_term))
    assert el.drain()[-1] == Send("a", VoteReply(3, granted))
    assert el.term == 3  # the higher term is adopted either way
    assert el.voted_for == ("a" if granted else None)


def test_candidates_advertise_their_last_log_position() -> None:
    el = make(persisted=Persisted(4), log=entries(1, 4, 4),
              cfg=Config(stall_grace=False, pre_vote=True))
    el.tick(LATER)
    assert {s.msg for s in sends(el.drain())} == {PreVote(5, "a", 3, 4)}


# ---------------------------------------------------------------------------------------------
# The commit rule


def test_an_older_term_entry_on_a_majority_is_not_committed_by_counting() -> None:
    """Raft's figure 8: a leader of term 3 holding entry 2 of term 2 must not commit it when it
    reaches a majority; only its own no-op (term 3) on a majority commits both."""
    el = make(persisted=Persisted(2), log=entries(1, 2))
    elect(el)  # term 3; its no-op is entry 3
    assert el.term == 3 and el.log.term_at(3) == 3
    el.handle(LATER, "b", AppendReply(3, 1, True, 2))  # b holds 1..2 only
    assert el.commit_index == 0 and applies(el.drain()) == []
    el.handle(LATER, "b", AppendReply(3, 1, True, 3))
    assert [a.index for a in applies(el.drain())] == [1, 2, 3]


def test_observers_receive_the_log_but_do_not_count_for_commit() -> None:
    el = make(observers=frozenset({"o1", "o2"}))
    out = elect(el)
    assert {s.to for s in sends(out)} == {"b", "c", "o1", "o2"}
    el.handle(LATER, "o1", AppendReply(1, 1, True, 1))
    el.handle(LATER, "o2", AppendReply(1, 1, True, 1))
    assert el.commit_index == 0 and not el.leader_lease_valid(LATER)
    el.handle(LATER, "c", AppendReply(1, 1, True, 1))
    assert el.commit_index == 1


def run(nodes: dict[str, Election], out: dict[str, list[Output]], until: float,
        sent: Counter[tuple[str, str]] | None = None) -> None:
    """Tick every node at its deadlines until `until`, delivering at once (no loss, no delay);
    `sent` counts AppendEntries by (to, "data" or "empty")."""
    while True:
        now = min(el.next_deadline() for el in nodes.values())
        if now > until:
            return
        for el in nodes.values():
            if el.next_deadline() <= now:
                el.tick(now)
        queue = [(id_, o) for id_, el in nodes.items() for o in el.drain()]
        while queue:
            src, o = queue.pop(0)
            if isinstance(o, Send):
                if sent is not None and isinstance(o.msg, AppendEntries):
                    sent[(o.to, "data" if o.msg.entries else "empty")] += 1
                if o.to in nodes:
                    nodes[o.to].handle(now, src, o.msg)
                    queue += [(o.to, x) for x in nodes[o.to].drain()]
            else:
                out.setdefault(src, []).append(o)


def test_a_whole_cluster_with_observers_applies_the_same_entries() -> None:
    """An idle observer gets what it lacks batched, within observer_batch_interval and a
    heartbeat of the proposals, and applies the same entries as everyone."""
    ids = ["a", "b", "c", "o"]
    nodes = {i: make(i, observers=frozenset({"o"})) for i in ids}
    out: dict[str, list[Output]] = {}
    nodes["a"].tick(LATER)
    pump(nodes, out)
    a = nodes["a"]
    assert a.role == LEADER and a.leader_lease_valid(LATER)
    for n in range(5):
        assert a.propose(LATER, f"job{n}".encode()) is not None
        pump(nodes, out)
    run(nodes, out, LATER + CFG.observer_batch_interval + CFG.heartbeat_interval)
    seqs = {i: [(x.index, x.entry) for x in applies(out[i])] for i in ids}
    assert seqs["a"] == [(1, b"")] + [(2 + n, f"job{n}".encode()) for n in range(5)]
    assert all(s == seqs["a"] for s in seqs.values())


def test_observers_hear_keepalives_and_entries_batched_or_at_once_when_running_jobs() -> None:
    """Issue 16: at idle the leader heartbeats voters every heartbeat_interval and observers
    every observer_keepalive, those running jobs (`pushed`) too; what commits reaches an idle
    observer batched, every observer_batch_interval at most, and a pushed one at once."""
    ids = ["a", "b", "c", "o", "p"]
    nodes = {i: make(i, observers=frozenset({"o", "p"})) for i in ids}
    out: dict[str, list[Output]] = {}
    nodes["a"].tick(LATER)
    pump(nodes, out)
    a = nodes["a"]
    a.set_voters(LATER, ABC, pushed={"p", "b"})  # b votes: it is streamed anyway
    assert a.pushed == {"p"}
    sent: Counter[tuple[str, str]] = Counter()
    run(nodes, out, LATER + 10.0, sent)
    beats = 10.0 / CFG.heartbeat_interval
    assert beats * 0.9 < sent[("b", "empty")] <= beats + 1
    for observer in ("o", "p"):
        assert 0 < sent[(observer, "empty")] <= 10.0 / CFG.observer_keepalive + 1
    assert nodes["o"].leader == "a"  # the keepalive keeps its leader
    # a burst of proposals, one per heartbeat for 2 s: the idle observer gets them in batches
    sent.clear()
    start = LATER + 10.0
    for n in range(20):
        a.propose(start + n * CFG.heartbeat_interval, f"job{n}".encode())
        run(nodes, out, start + (n + 1) * CFG.heartbeat_interval, sent)
    run(nodes, out, start + 3.0, sent)
    assert nodes["o"].applied_index == nodes["p"].applied_index == a.commit_index == 21
    to_o = sent[("o", "data")] + sent[("o", "empty")]
    assert to_o <= 3.0 / CFG.observer_batch_interval + 1
    assert sent[("p", "data")] >= 20  # every entry as it came, like a voter


def test_an_observer_catching_up_gets_the_next_batch_at_its_reply() -> None:
    """Batched is not slow for a newcomer: a full batch (one that stopped short of the leader's
    last entry) is followed by the next as soon as the observer answers."""
    cfg = Config(stall_grace=False, max_append_bytes=2)  # one entry a batch
    nodes = {i: make(i, cfg=cfg, observers=frozenset({"o"})) for i in ("a", "b", "c")}
    out: dict[str, list[Output]] = {}
    nodes["a"].tick(LATER)
    pump(nodes, out)
    a = nodes["a"]
    for n in range(30):
        a.propose(LATER, f"j{n}".encode())
        pump(nodes, out)
    nodes["o"] = make("o", cfg=cfg, observers=frozenset({"o"}))
    sent: Counter[tuple[str, str]] = Counter()
    run(nodes, out, LATER + 1.0, sent)  # a batch per observer_batch_interval would take 7.75 s
    assert nodes["o"].log.last_index == a.log.last_index == 31
    assert sent[("o", "data")] >= 30  # one entry each (the first went before o was there)


def test_an_observer_keeps_a_silent_leader_until_it_is_gone_and_a_promoted_one_campaigns() -> None:
    o = make("o", observers=frozenset({"o"}))
    led(o, "a", AppendEntries(1, "a", 1, 0, 0, 0, ()))
    assert o.leader == "a" and o.next_deadline() == math.inf  # it never campaigns
    o.tick(LATER + 1000.0)
    assert o.leader == "a"  # keepalives may be 100 s apart in a swarm of 1,000
    o.leader_gone(LATER + 1000.0, "b")
    assert o.leader == "a"
    o.leader_gone(LATER + 1000.0, "a")  # membership: a is dead
    assert o.leader is None
    now = LATER + 2000.0
    o.set_voters(now, {"a", "b", "o"})
    assert o.next_deadline() <= now + CFG.election_timeout_max


# ---------------------------------------------------------------------------------------------
# Snapshots


def test_compact_drops_the_applied_prefix_and_persists_the_snapshot() -> None:
    el = make(voters=frozenset({"a"}), cfg=Config(stall_grace=False, compact_keep_entries=0))
    el.tick(CFG.election_timeout_min)
    for n in range(4):
        el.propose(LATER, f"x{n}".encode())
    el.drain()
    assert not el.compact(9, b"state")  # not applied
    assert el.compact(3, b"state@3")
    assert el.drain() == [PersistSnapshot(Snapshot(3, 1, b"state@3"), 4)]
    assert el.log.base_index == 3 and [e.index for e in el.log] == [4, 5]
    assert not el.compact(2, b"older")


@pytest.mark.parametrize(
    ("keep", "keep_bytes", "base", "next_base"),
    [(2, 1 << 20, 2, 3), (10, 1 << 20, 0, 0), (10, 5, 2, 3), (10, 4, 3, 4), (10, 2, 4, 4),
     (0, 1 << 20, 4, 5)],
    ids=["count", "all-there-is", "bytes", "bytes-between", "bytes-too-few", "none"],
)
def test_compact_keeps_a_tail_bounded_by_count_and_bytes(keep: int, keep_bytes: int,
                                                         base: int, next_base: int) -> None:
    """The snapshot covers entries through 4; the log keeps up to `keep` of them, holding at
    most `keep_bytes` of data (entries 2-5 are 2, 2, 3 and 2 bytes: the no-op is entry 1)."""
    el = make(voters=frozenset({"a"}),
              cfg=replace(CFG, compact_keep_entries=keep, compact_keep_bytes=keep_bytes))
    el.tick(CFG.election_timeout_min)
    for data in (b"x0", b"x1", b"x22", b"x3"):
        el.propose(LATER, data)
    el.drain()
    assert el.compact(4, b"state@4")
    assert el.drain() == [PersistSnapshot(Snapshot(4, 1, b"state@4"), base + 1)]
    assert el.log.base_index == base and el.log.last_index == 5
    assert el.status(LATER)["snapshot_index"] == 4 and el.snapshot == Snapshot(4, 1, b"state@4")
    assert not el.compact(4, b"again") and not el.compact(3, b"older")
    assert el.compact(5, b"state@5")  # the tail moves on with the next snapshot
    assert el.log.base_index == next_base


def test_a_follower_behind_by_less_than_the_tail_gets_entries_not_the_snapshot() -> None:
    """etcd's SnapshotCatchUpEntries: a follower a few entries behind when the leader
    compacts catches up from the kept tail; one behind the tail gets the snapshot."""
    for keep, expect_snapshot in ((3, False), (1, True)):
        cfg = replace(CFG, compact_keep_entries=keep)
        nodes = {i: make(i, cfg=cfg) for i in ("a", "b", "c")}
        out: dict[str, list[Output]] = {}
        nodes["a"].tick(LATER)
        pump(nodes, out)
        a = nodes["a"]
        lagging = {"a": a, "b": nodes["b"]}  # c is away for two entries
        for n in range(2):
            a.propose(LATER, f"x{n}".encode())
            pump(lagging, out)
        assert a.compact(a.commit_index, b"state@3")
        pump(lagging, out)
        out.clear()
        while nodes["c"].applied_index < 3:
            a.tick(a.next_deadline())
            pump(nodes, out)
        assert (a.counters["snapshot_chunks_sent"] > 0) is expect_snapshot
        assert bool([o for o in out["c"] if isinstance(o, Restore)]) is expect_snapshot
        assert [e.data for e in nodes["c"].log][-2:] == [b"x0", b"x1"] or expect_snapshot


def test_a_follower_behind_the_snapshot_gets_it_in_chunks() -> None:
    cfg = Config(stall_grace=False, snapshot_chunk_bytes=4, compact_keep_entries=0)
    nodes = {i: make(i, cfg=cfg) for i in ("a", "b", "c")}
    out: dict[str, list[Output]] = {}
    nodes["a"].tick(LATER)
    pump(nodes, out)
    a = nodes["a"]
    lagging = {"a": a, "b": nodes["b"]}  # c is away
    for n in range(6):
        a.propose(LATER, f"x{n}".encode())
        pump(lagging, out)
    assert a.commit_index == 7
    assert a.compact(6, b"0123456789")  # 10 bytes: three chunks of 4
    pump(lagging, out)
    while a.counters["snapshot_chunks_sent"] == 0:  # (a commit notice to b may come first)
        a.tick(a.next_deadline())  # the heartbeat finds c behind the snapshot
        pump(nodes, out)
    c_out = out["c"]
    assert a.counters["snapshot_chunks_sent"] == 3
    restore = [o for o in c_out if isinstance(o, Restore)]
    assert restore == [Restore(Snapshot(6, 1, b"0123456789"))]
    persisted = c_out.index(PersistSnapshot(Snapshot(6, 1, b"0123456789"), 7))
    assert persisted < c_out.index(restore[0])
    # what follows the snapshot is applied after it, from index 7
    assert [x.index for x in applies(c_out[c_out.index(restore[0]) :])] == [7]
    assert nodes["c"].applied_index == 7 and nodes["c"].log.base_index == 6


def test_an_installed_snapshot_keeps_a_matching_suffix_and_drops_a_conflicting_one() -> None:
    keep = make("b", persisted=Persisted(1), log=entries(1, 1, 1, 1))
    led(keep, "a", InstallSnapshot(1, "a", 1, 2, 1, 0, b"s", True))
    out = keep.drain()
    assert PersistSnapshot(Snapshot(2, 1, b"s"), 3) in out
    assert not [o for o in out if isinstance(o, PersistEntries)]
    assert [e.index for e in keep.log] == [3, 4] and keep.commit_index == 2

    drop = make("b", persisted=Persisted(2), log=entries(1, 2, 2, 2))
    led(drop, "a", InstallSnapshot(3, "a", 1, 3, 3, 0, b"s", True))
    out = drop.drain()
    assert PersistEntries(4, ()) in out and len(drop.log) == 0
    assert out[-1] == Send("a", AppendReply(3, 1, True, 3))


def test_snapshot_chunks_out_of_order_ask_for_the_right_offset() -> None:
    el = make("b")
    led(el, "a", InstallSnapshot(1, "a", 1, 5, 1, 4, b"late", False))
    assert el.drain()[-1] == Send("a", SnapshotReply(1, 1, 5, 0))
    led(el, "a", InstallSnapshot(1, "a", 1, 5, 1, 0, b"abcd", False))
    assert el.drain()[-1] == Send("a", SnapshotReply(1, 1, 5, 4))
    led(el, "a", InstallSnapshot(1, "a", 1, 5, 1, 0, b"abcd", False))  # duplicate
    led(el, "a", InstallSnapshot(1, "a", 1, 5, 1, 4, b"ef", True))
    assert Restore(Snapshot(5, 1, b"abcdef")) in el.drain()


def test_a_restarted_node_resumes_from_its_snapshot_and_log() -> None:
    snap = Snapshot(3, 1, b"state")
    el = make("b", persisted=Persisted(2, "a"), log=entries(1, 2, start=4), snapshot=snap)
    assert (el.commit_index, el.applied_index, el.log.last_index) == (3, 3, 5)
    assert (el.term, el.voted_for) == (2, "a")
    led(el, "a", AppendEntries(2, "a", 1, 5, 2, 5))
    assert [(x.index, x.term) for x in applies(el.drain())] == [(4, 1), (5, 2)]


def test_followers_hear_a_new_commit_index_soon_not_at_the_next_heartbeat() -> None:
    """After the last entry of a burst commits, a follower holding it learns the commit index
    `commit_notify_delay` later (and applies it), not a heartbeat later; one still missing
    entries is not sent a notice (it hears the index with the entries)."""
    nodes = {i: make(i) for i in ("a", "b", "c")}
    out: dict[str, list[Output]] = {}
    nodes["a"].tick(LATER)
    pump(nodes, out)
    a = nodes["a"]
    assert a.role == LEADER
    ab = {"a": a, "b": nodes["b"]}  # c is away for this entry
    a.propose(LATER, b"x1")
    pump(ab, out)
    assert a.commit_index == 2 and nodes["b"].commit_index < 2  # b holds it, unaware
    due = a.next_deadline()
    assert due == LATER + CFG.commit_notify_delay < LATER + CFG.heartbeat_interval
    out.clear()
    a.tick(due)
    notices = sends(a.drain())
    assert [(s.to, s.msg.commit) for s in notices] == [("b", 2)]  # not c: it lacks x1
    for s in notices:
        nodes[s.to].handle(due, "a", s.msg)
    assert nodes["b"].commit_index == 2
    assert [x.entry for x in applies(nodes["b"].drain())] == [b"x1"]
    assert a.next_deadline() == LATER + CFG.heartbeat_interval  # nothing more to tell


def _silent_c(cfg: Config, compact: bool, seconds: float) -> tuple[
        dict[str, Election], list[tuple[float, AppendEntries | InstallSnapshot]], float,
        Callable[[float], None]]:
    """A leader `a` with b answering at once and c reading nothing for `seconds` after five
    proposals (c's log stays behind them, and behind the snapshot with `compact`): the
    nodes, what was sent to c with when, the time at the end, and `run` (delivers a's
    messages at a time: b's answers at once, c's kept in the list)."""
    nodes = {i: make(i, cfg=cfg) for i in ("a", "b", "c")}
    nodes["a"].tick(LATER)
    pump(nodes, {})
    a, b = nodes["a"], nodes["b"]
    to_c: list[tuple[float, AppendEntries | InstallSnapshot]] = []

    def run(now: float) -> None:
        queue = [("a", o) for o in a.drain()]
        while queue:
            src, o = queue.pop(0)
            if isinstance(o, Send) and o.to == "c":
                to_c.append((now, o.msg))  # type: ignore[arg-type]
            elif isinstance(o, Send):
                node = a if o.to == "a" else b
                node.handle(now, src, o.msg)
                queue += [(o.to, x) for x in node.drain()]

    for n in range(5):
        a.propose(LATER, f"x{n}".encode())
        run(LATER)
    if compact:
        assert a.compact(a.commit_index, b"0123456789")
    now = LATER
    while now < LATER + seconds:
        now = a.next_deadline()
        a.tick(now)
        run(now)
    assert a.role == LEADER
    return nodes, to_c, now, run


def _carries_data(m: AppendEntries | InstallSnapshot) -> bool:
    return isinstance(m, InstallSnapshot) or bool(m.entries)


@pytest.mark.parametrize("compact", [False, True], ids=["entries", "snapshot"])
def test_a_silent_follower_gets_data_once_per_wait_and_heartbeats_as_ever(compact: bool) -> None:
    """A follower that stopped reading (a frozen VM, a hung process: its connection stays open,
    so whatever is sent to it queues) gets a heartbeat every round, but entries or snapshot
    chunks only once per wait, which doubles up to retransmit_max: not one per heartbeat."""
    # one entry, or 4 bytes, a time
    cfg = replace(CFG, max_append_bytes=2, snapshot_chunk_bytes=4, compact_keep_entries=0)
    _nodes, to_c, _now, _run = _silent_c(cfg, compact, 60.0)
    data = [t for t, m in to_c if _carries_data(m)]
    beats = [t for t, m in to_c if not _carries_data(m)]
    assert len(beats) >= 0.9 * 60 / cfg.heartbeat_interval  # c is told the leader lives
    gaps = [y - x for x, y in itertools.pairwise(data)]
    assert 8 <= len(data) <= 13, data  # after 0.4, 0.8, 1.6, 3.2, 6.4 s, then every 8 s
    assert gaps == sorted(gaps) and gaps[-1] <= cfg.retransmit_max + cfg.heartbeat_interval
    assert gaps[0] >= cfg.election_timeout_min


def test_a_silent_follower_that_reads_again_gets_the_next_batch_at_once() -> None:
    cfg = Config(stall_grace=False, max_append_bytes=2)
    nodes, to_c, now, run = _silent_c(cfg, False, 20.0)
    a, c = nodes["a"], nodes["c"]
    last = next(m for _t, m in reversed(to_c) if isinstance(m, AppendEntries) and m.entries)
    led(c, "a", last)
    sent = len(to_c)
    for o in c.drain():
        if isinstance(o, Send) and o.to == "a":
            a.handle(now, "c", o.msg)
    run(now)
    nxt = [m for _t, m in to_c[sent:] if isinstance(m, AppendEntries)]
    assert nxt and nxt[0].entries and nxt[0].prev_index == last.prev_index + 1


def test_a_follower_that_answers_a_later_heartbeat_gets_the_lost_data_at_the_next_one() -> None:
    """Data lost on the way (a full queue, a reconnect): the follower's reply to a heartbeat
    sent after it shows that it reads again, so the next heartbeat carries the data, rather
    than the end of the (by then 8 s) wait."""
    cfg = Config(stall_grace=False, max_append_bytes=2)
    nodes, to_c, now, run = _silent_c(cfg, False, 20.0)
    a, c = nodes["a"], nodes["c"]
    probe = next(m for _t, m in reversed(to_c) if isinstance(m, AppendEntries) and not m.entries)
    led(c, "a", probe)  # only the heartbeat arrives
    for o in c.drain():
        if isinstance(o, Send) and o.to == "a":
            a.handle(now, "c", o.msg)
    run(now)
    sent = len(to_c)
    later = a.next_deadline()
    assert later - now < 2 * cfg.heartbeat_interval  # (the next round, not the wait)
    a.tick(later)
    run(later)
    nxt = [m for _t, m in to_c[sent:] if isinstance(m, AppendEntries)]
    assert nxt and nxt[0].entries and nxt[0].prev_index == probe.prev_index


def test_a_new_observer_whose_first_message_is_lost_hears_the_leader_soon() -> None:
    """A newcomer drops the leader's first message (it does not know the leader as a member
    yet): the leader tries again with a data send's backoff until it answers, instead of
    waiting a whole observer_keepalive (30 s), which kept new members from being promoted."""
    a = make("a", voters=frozenset({"a"}))
    o = make("o", voters=frozenset({"a"}))
    nodes = {"a": a}
    out: dict[str, list[Output]] = {}
    run(nodes, out, LATER)
    a.set_voters(LATER, {"a"}, {"o"})
    run(nodes, out, LATER + 0.5)  # o is not reachable yet: what goes to it is lost
    nodes["o"] = o
    run(nodes, out, LATER + 0.5 + 2 * CFG.retransmit_max)
    assert o.leader == "a" and a.holds_commit("o")
