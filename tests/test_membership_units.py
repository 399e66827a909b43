"""Pure pieces: awareness, suspicion timing, broadcast queue, merge order, the shared table."""

from __future__ import annotations

import math

import pytest

from swarmnode.membership.awareness import Awareness
from swarmnode.membership.broadcast import BroadcastQueue, retransmit_limit
from swarmnode.membership.config import Config
from swarmnode.membership.state import (
    ALIVE,
    DEAD,
    LEFT,
    SUSPECT,
    Entry,
    MemberTable,
    SharedMembers,
    supersedes,
)
from swarmnode.membership.suspicion import (
    Suspicion,
    expected_confirmations,
    remaining_timeout,
    suspicion_timeouts,
)

# --- awareness


def test_awareness_clamps_and_scales() -> None:
    a = Awareness(8)
    assert a.scale(0.5) == 0.5
    a.apply_delta(-3)
    assert a.score == 0
    a.apply_delta(3)
    assert a.scale(0.5) == 2.0
    a.apply_delta(100)
    assert a.score == 7 and a.scale(1.0) == 8.0
    a.apply_delta(-1)
    assert a.score == 6
    with pytest.raises(ValueError):
        Awareness(0)


# --- suspicion


def test_suspicion_timeouts_scale_with_log_n() -> None:
    lo, hi = suspicion_timeouts(4, 6, 5, 1.0)
    assert (lo, hi) == (4.0, 24.0)  # log10(5) < 1: floor at 1
    lo, hi = suspicion_timeouts(4, 6, 1000, 1.0)
    assert lo == pytest.approx(12.0) and hi == pytest.approx(72.0)


def test_expected_confirmations_needs_enough_members() -> None:
    assert expected_confirmations(4, 3) == 0  # only one other member could confirm
    assert expected_confirmations(4, 4) == 2
    assert expected_confirmations(4, 100) == 2


def test_suspicion_shrinks_log_scaled_with_independent_confirmations() -> None:
    s = Suspicion(10.0, "a", k=3, min_timeout=2.0, max_timeout=12.0)
    assert s.deadline() == 22.0
    assert not s.confirm("a")  # the original accuser does not confirm itself
    assert s.confirm("b")
    assert not s.confirm("b")  # repeats do not count
    first = s.deadline()
    expected = 12.0 - math.log(2) / math.log(4) * 10.0
    assert first == pytest.approx(10.0 + expected)
    assert s.confirm("c")
    second = s.deadline()
    assert s.confirm("d")
    assert s.deadline() == pytest.approx(12.0)  # k confirmations: minimum
    assert not s.confirm("e")  # beyond k: ignored
    # log scaling: the first confirmation buys more than the second
    assert (22.0 - first) > (first - second)


def test_suspicion_without_possible_confirmations_uses_min() -> None:
    s = Suspicion(0.0, "a", k=0, min_timeout=4.0, max_timeout=24.0)
    assert s.deadline() == 4.0
    assert not s.confirm("b")
    assert remaining_timeout(5, 0, 1.0, 9.0) == 1.0


# --- broadcast queue


def test_retransmit_limit() -> None:
    assert retransmit_limit(4, 1) == 8  # small swarms: a floor of two log10 steps
    assert retransmit_limit(4, 9) == 8
    assert retransmit_limit(4, 10) == 8
    assert retransmit_limit(4, 99) == 8
    assert retransmit_limit(4, 100) == 12
    assert retransmit_limit(4, 10_000) == 20


def test_queue_transmit_limit_then_drop() -> None:
    q = BroadcastQueue(retransmit_mult=2, max_items=100)
    q.put("x", "X", 10)
    sent = 0
    while q.get(1000, n=5):
        sent += 1
    assert sent == retransmit_limit(2, 5) == 4
    assert len(q) == 0


def test_queue_newer_item_replaces_older_same_subject() -> None:
    q = BroadcastQueue(4, 100)
    q.put("m:a", "alive a 1", 10)
    q.get(1000, n=3)
    q.put("m:a", "suspect a 1", 10)
    assert len(q) == 1
    assert q.get(1000, n=3) == ["suspect a 1"]


def test_queue_fewest_transmits_first_and_newest_first() -> None:
    q = BroadcastQueue(10, 100)
    q.put("a", "A", 10)
    q.get(1000, n=100)  # A transmitted once
    q.put("b", "B", 10)
    q.put("c", "C", 10)
    assert q.get(1000, n=100) == ["C", "B", "A"]


def test_queue_byte_budget() -> None:
    q = BroadcastQueue(10, 100)
    for i in range(10):
        q.put(i, f"item{i}", 100)
    got = q.get(350, n=100, overhead=2)
    assert len(got) == 3  # 3 * 102 <= 350 < 4 * 102
    assert got == ["item9", "item8", "item7"]
    assert q.get(50, n=100) == []  # nothing fits


def test_queue_cap_prunes_most_transmitted() -> None:
    q = BroadcastQueue(10, max_items=2)
    q.put("old", "OLD", 10)
    q.get(1000, n=100)
    q.put("b", "B", 10)
    q.put("c", "C", 10)
    assert sorted(q.items()) == ["B", "C"]


# --- merge order


def test_supersedes_is_the_swim_lattice() -> None:
    assert supersedes(2, ALIVE, 1, DEAD)  # higher incarnation alive refutes anything older
    assert not supersedes(1, ALIVE, 1, SUSPECT)  # alive needs a strictly higher incarnation
    assert supersedes(1, SUSPECT, 1, ALIVE)
    assert not supersedes(0, SUSPECT, 1, ALIVE)  # stale
    assert supersedes(1, DEAD, 1, SUSPECT)
    assert not supersedes(1, SUSPECT, 1, DEAD)
    assert supersedes(1, LEFT, 1, DEAD)  # a leave beats a death at the same incarnation
    assert not supersedes(1, DEAD, 1, LEFT)


# --- table


def _entry(i: int, state: str = ALIVE) -> Entry:
    return Entry(f"id{i}", state, 0, None, 0.0)


def test_table_copy_on_write_over_shared_base() -> None:
    base = SharedMembers([_entry(i) for i in range(5)])
    t1, t2 = MemberTable(base), MemberTable(base)
    t1.put(_entry(2, DEAD))
    t1.put(_entry(9))
    t1.delete("id0")
    assert t1.get("id2").state == DEAD and t2.get("id2").state == ALIVE
    assert "id0" not in t1 and "id0" in t2
    assert len(t1) == 5 and len(t2) == 5
    assert t1.count(ALIVE) == 4 and t1.count(DEAD) == 1 and t2.count(ALIVE) == 5
    assert [e.id for e in t1] == ["id1", "id2", "id3", "id4", "id9"]
    assert t1.id_space() == 6 and t1.id_at(5) == "id9" and t1.index_of("id9") == 5
    assert t1.local_size() == 3 and t2.local_size() == 0
    t1.put(_entry(0))  # re-added base id keeps its position
    assert t1.index_of("id0") == 0 and t1.id_space() == 6


def test_fast_config_scales_times_only() -> None:
    c, f = Config(), Config.fast()
    assert f.probe_interval == pytest.approx(c.probe_interval / 10)
    assert f.gossip_interval == pytest.approx(c.gossip_interval / 10)
    assert f.gossip_nodes == c.gossip_nodes and f.nack_fraction == c.nack_fraction
    assert c.push_pull_scaled(10) == c.push_pull_interval
    assert c.push_pull_scaled(1000) == c.push_pull_interval * 6
