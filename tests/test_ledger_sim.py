"""The replicated job ledger in the simulator: thousands of randomized runs with crashes,
partitions, loss and duplication, broken variants the checks must catch, and targeted
scenarios (virtual time, fixed seeds)."""

from __future__ import annotations

from collections import Counter

import pytest

from swarmnode.election import LEADER, Config, Election
from swarmnode.election.messages import MAX_U63
from swarmnode.election.sim import SimNode
from swarmnode.ledger import (
    ACTIVE,
    DONE,
    RUNNING,
    Done,
    JobLedger,
    JobSpec,
    SubmitBuild,
    encode,
)
from swarmnode.ledger.sim import Forward, LedgerRunResult, LedgerSim, random_run, settle_bound

CFG = Config()
BOUND = settle_bound(CFG)
QUIET = {"stale_rate": 0.0, "cancel_rate": 0.0, "block_rate": 0.0, "fail_rate": 0.0}
"""No deliberate noise: for scenarios that follow one job."""


def one_job(build_id: str, *names: str) -> SubmitBuild:
    names = names or ("only",)
    jobs = tuple((n, JobSpec(spec_hash=f"{i:064x}")) for i, n in enumerate(names))
    return SubmitBuild(build_id, build_id, "client", jobs)


def settle(sim: LedgerSim, ids: list[str] | None = None) -> str:
    """Run until `ids` (default: all running) are caught up with a leader that can schedule,
    every client is told and every accepted build finished; returns the leader."""
    assert sim.run_until_pred(lambda s: s.settled(ids), BOUND, step=0.02)
    lead = sim.caught_up(ids)
    assert lead is not None
    return lead


def state(sim: LedgerSim, at: str, key: str) -> str | None:
    job = sim.ledger(at).job(key)
    return job.state if job is not None else None


def ok(sim: LedgerSim) -> bool:
    sim.check_final()
    return not sim.violations


class AcceptsStale(JobLedger):
    """Broken on purpose: takes any report for a held job, whoever sends it."""

    def _report(self, key, node, attempt, outcome):  # type: ignore[no-untyped-def]
        job = self._jobs.get(key)
        if job is not None and job.state in ACTIVE:
            return job, None
        return super()._report(key, node, attempt, outcome)


class NoVoteRestriction(Election):
    """Broken on purpose: votes for any candidate, however short its log."""

    def _log_ok(self, last_index: int, last_term: int) -> bool:
        return True


# ---------------------------------------------------------------------------------------------
# Randomized runs


def _runs(seeds: range, **kw: object) -> list[LedgerRunResult]:
    return [random_run(seed, **kw) for seed in seeds]  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk", range(4))
def test_random_faults_lose_nothing_and_accept_no_stale_report(chunk: int) -> None:
    """2,000 seeds in all: 1-5 voters, 0-2 observers, crashes and restarts from disk (leaders
    preferred), partitions, cut links, loss up to 50%, duplication, slow links, snapshots;
    clients submitting builds at random nodes, workers finishing and reporting, stale reports
    and replayed orders from deposed leaders. Every step is checked (one leader per term, log
    matching, one history, leader completeness, no accepted build or result lost, no stale
    report applied, the same ledger events everywhere); once healed, every client must be
    answered and every accepted build finished. Most entries are `Batch`es (the leader's
    submissions, reports and assignments of one loop turn)."""
    results = _runs(range(chunk * 500, (chunk + 1) * 500))
    bad = [(r.seed, r.violations[:3], r.faults) for r in results if r.violations]
    assert not bad
    stuck = [(r.seed, r.faults) for r in results if r.settled_after is None]
    assert not stuck
    total: Counter[str] = Counter()
    for r in results:
        total.update(r.stats)
    # the runs exercised what they claim to
    assert {r.voters for r in results} == set(range(1, 6))
    assert total["accepted_builds"] == total["builds"] > 1000
    assert total["results"] > 2000
    assert total["stale_rejected"] > 300 and total["fenced"] > 20
    # most of the log is batches of submissions, reports and assignments; stale reports and
    # assignments that came too early are refused inside them
    assert total["batches"] > 5000 and total["batched"] > 3 * total["batches"] / 2
    assert total["stale_rejected_in_batch"] > 200 and total["batched_assigns_refused"] > 20
    assert total["crashes"] > 300 and total["restores"] > 100 and total["compactions"] > 1000
    assert total["lost"] > 1000 and total["partitioned"] > 1000


def test_the_checker_catches_a_ledger_that_accepts_stale_reports() -> None:
    results = _runs(range(20), ledger_factory=AcceptsStale)
    assert any(v.kind == "stale_applied" for r in results for v in r.violations)


def test_the_checker_catches_a_missing_vote_restriction() -> None:
    results = _runs(range(250), factory=NoVoteRestriction)
    kinds = {v.kind for r in results for v in r.violations}
    assert kinds & {"leader_incomplete", "state_machine_safety", "accepted_build_lost"}


def test_the_checker_catches_restarts_that_forget_the_disk() -> None:
    results = _runs(range(100), keep_disk=False)
    kinds = {v.kind for r in results for v in r.violations}
    assert kinds & {"state_machine_safety", "log_matching", "accepted_build_lost"}


def test_same_seed_same_run() -> None:
    a, b = random_run(77), random_run(77)
    assert (a.faults, a.stats, a.settled_after) == (b.faults, b.stats, b.settled_after)


# ---------------------------------------------------------------------------------------------
# Targeted scenarios


def test_a_leader_crashing_after_commit_before_answering_loses_nothing() -> None:
    sim = LedgerSim(3, seed=1, **QUIET)
    leader = settle(sim)
    req = sim.submit(one_job("b1"), at=leader)
    # run until the leader applied it (committed), then kill it before the answer gets out
    assert sim.run_until_pred(lambda s: "b1" in s.accepted, 1.0, step=0.0001)
    sim.crash(leader)
    assert not sim.requests[req].told
    index = sim.accepted["b1"]
    new = settle(sim)  # the client retries elsewhere and is told (a duplicate)
    assert new != leader and sim.requests[req].told
    assert sim.election(new).log.term_at(index) is not None
    b = sim.ledger(new).build("b1")
    assert b is not None and b.index == index  # the entry committed before the crash
    assert sim.ledger(new).tally["duplicate"] == 1
    sim.restart(leader)
    settle(sim)
    assert ok(sim)


def test_a_partitioned_old_leader_cannot_commit() -> None:
    sim = LedgerSim(5, seed=2, **QUIET)
    old = settle(sim)
    others = [i for i in sorted(sim.nodes) if i != old]
    minority, majority = [old, others[0]], others[1:]
    sim.partition([minority, majority])
    # while its lease lasts it still takes a proposal, which it can never commit
    index = sim.propose(old, encode(one_job("lost")))
    assert index is not None
    sim.run_for(3.0)
    assert sim.election(old).commit_index < index
    assert sim.election(old).role != LEADER
    assert sim.propose(old, encode(one_job("lost2"))) is None
    sim.submit(one_job("kept"), at=majority[0])
    new = settle(sim, majority)
    assert sim.ledger(new).finished("kept")
    sim.heal()
    settle(sim)
    for id_ in sim.up_ids():
        assert sim.ledger(id_).build("lost") is None  # overwritten, never applied anywhere
        assert sim.ledger(id_).finished("kept")
    assert ok(sim)


def test_a_one_node_cluster_schedules_and_survives_a_restart() -> None:
    sim = LedgerSim(1, observers=1, seed=3, **QUIET)
    for i in range(3):
        sim.submit(one_job(f"b{i}", "a", "b"))
    settle(sim)
    assert all(sim.ledger("o0").finished(f"b{i}") for i in range(3))  # observers follow
    sim.crash("v0")
    sim.restart("v0")
    sim.submit(one_job("after"))
    settle(sim)
    assert all(sim.ledger("v0").finished(b) for b in ("b0", "b1", "b2", "after"))
    assert ok(sim)


def test_a_two_node_cluster_schedules_and_the_survivor_takes_over() -> None:
    sim = LedgerSim(2, seed=4, **QUIET)
    sim.submit(one_job("b1", "x", "y"))
    leader = settle(sim)
    survivor = "v1" if leader == "v0" else "v0"
    sim.crash(leader)
    sim.submit(one_job("b2"))
    sim.run_for(5.0)
    assert "b2" not in sim.accepted  # two voters need each other
    sim.set_voters({survivor})  # the voter layer shrinks the set once membership agrees
    assert settle(sim) == survivor
    led = sim.ledger(survivor)
    assert led.finished("b1") and led.finished("b2")
    sim.restart(leader)
    sim.set_voters({"v0", "v1"})
    settle(sim)
    assert sim.ledger(leader).finished("b2") and ok(sim)


def test_a_follower_far_behind_catches_up_from_a_chunked_snapshot() -> None:
    cfg = Config(snapshot_chunk_bytes=256, compact_keep_entries=0)
    sim = LedgerSim(3, config=cfg, seed=5, snapshot_every=5, **QUIET)
    leader = settle(sim)
    away = next(i for i in sorted(sim.nodes) if i != leader)
    sim.crash(away)
    for i in range(16):  # (batched entries: fewer entries than commands)
        sim.submit(one_job(f"b{i}", "a", "b", "c"))
    settle(sim, [i for i in sim.up_ids()])
    lead = sim.caught_up()
    assert lead is not None and sim.election(lead).snapshot.index > 10
    sim.restart(away)
    settle(sim)
    assert sim.stats["restores"] >= 1
    assert sim.election(leader).counters["snapshot_chunks_sent"] > 3
    assert sim.ledger(away).snapshot() == sim.ledger(leader).snapshot()
    assert ok(sim)


def _cut_off_worker(requeue_after: float) -> tuple[LedgerSim, str, str]:
    """A job runs on a worker that is not the leader; the worker is then cut off from
    everyone. Returns (sim, leader, worker)."""
    for seed in range(50):
        sim = LedgerSim(3, seed=seed, requeue_after=(requeue_after, requeue_after), **QUIET)
        leader = settle(sim)
        sim.submit(one_job("b1"), at=leader)
        sim.run_until_pred(
            lambda s, lead=leader: state(s, lead, "b1/only") == RUNNING, 2.0, step=0.001
        )
        job = sim.ledger(leader).job("b1/only")
        assert job is not None
        if job.state == RUNNING and job.node != leader:
            assert job.node is not None
            sim.partition([[job.node]])
            return sim, leader, job.node
    raise AssertionError("no seed assigned the job to a follower")


def test_a_worker_cut_off_from_the_leader_finishes_and_delivers_later() -> None:
    sim, leader, worker = _cut_off_worker(requeue_after=1000.0)
    sim.run_for(3.0)
    assert sim.app_disks[worker].outbox  # finished, waiting to be delivered
    assert state(sim, leader, "b1/only") == RUNNING
    sim.heal()
    settle(sim)
    job = sim.ledger(leader).job("b1/only")
    assert job is not None and (job.state, job.node, job.attempt) == (DONE, worker, 1)
    assert ok(sim)


def test_a_late_result_after_a_requeue_is_rejected_as_stale() -> None:
    sim, leader, worker = _cut_off_worker(requeue_after=0.5)
    sim.run_for(3.0)  # requeued, run elsewhere, done
    job = sim.ledger(leader).job("b1/only")
    assert job is not None and job.state == DONE and job.node != worker and job.attempt == 2
    done_by = job.node
    (late,) = [e for e, cmd in sim.app_disks[worker].outbox.values() if isinstance(cmd, Done)]
    sim.heal()
    # the worker reports the moment it reconnects, before its own ledger catches up
    sim.send_app(worker, leader, Forward(0, worker, late))
    settle(sim)
    led = sim.ledger(leader)
    job = led.job("b1/only")
    assert job is not None and (job.node, job.attempt) == (done_by, 2)  # not overwritten
    assert led.tally["rejected_stale"] == 1 and not sim.app_disks[worker].outbox
    assert ok(sim)


# ---------------------------------------------------------------------------------------------
# A Byzantine member (issue 13): forged assignments, cancellations and reports


class TrustsLeaderClaims(Election):
    """Broken on purpose: follows whoever says it leads, without a proof (as before issue 13)."""

    def _accept_leader(self, src: str, term: int, seq: int) -> bool:
        if term >= self.term and self.proven_leader(term) is None:
            self._proven[term] = src
        return super()._accept_leader(src, term, seq)


class WorkersTrustTerms(LedgerSim):
    """Broken on purpose: workers obey any order whose term passes the fence, whoever sends
    it (the worker before issue 13)."""

    def _from_leader(self, node: SimNode, src: str, term: int) -> bool:
        return True


def test_random_faults_with_a_byzantine_member_run_only_what_real_leaders_assigned() -> None:
    """A liar forging assignments and cancellations at the current, next and maximum term,
    stale reports about itself, and the election forgeries: every worker obeys only orders a
    real leader sent, every forged report is rejected as stale, and the cluster settles."""
    results = _runs(range(300, 312), byzantine=1)
    assert not [(r.seed, r.violations[:3]) for r in results if r.violations]
    assert not [r.seed for r in results if r.settled_after is None]
    total: Counter[str] = Counter()
    for r in results:
        total.update(r.stats)
    # (some are lost or reach a crashed node; none is obeyed: no violation above)
    assert total["forged_orders"] > 300 and total["unproven_order"] > total["forged_orders"] // 2
    assert total["stale_rejected"] > 50 and total["results"] > 50


def test_the_checker_catches_workers_that_trust_an_orders_term() -> None:
    """Workers without the proven-leader check run the liar's assignments, and its maximum
    term in their fence refuses the real leader for good: nothing finishes."""
    sim = WorkersTrustTerms(3, seed=4, byzantine=1, **QUIET)
    assert sim.run_until_pred(lambda s: s.caught_up() is not None, BOUND)
    for i in range(5):
        sim.submit(one_job(f"b{i}", "a", "b"))
    assert not sim.run_until_pred(lambda s: s.settled(), 10.0, step=0.05)
    assert any(v.kind == "unordered_obeyed" for v in sim.violations)
    assert max(d.fence_term for d in sim.app_disks.values()) == MAX_U63


def test_the_checker_catches_a_core_that_trusts_leader_claims() -> None:
    results = _runs(range(8), factory=TrustsLeaderClaims, byzantine=1)
    kinds = {v.kind for r in results for v in r.violations}
    assert {"unordered_obeyed", "unproposed_commit"} <= kinds
