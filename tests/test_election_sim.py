"""Whole-cluster Raft behaviour in the deterministic simulator (virtual time, fixed seeds):
the election, and the log under it (committed entries survive everything).

Default `Config()` timings throughout: virtual time costs nothing, and these are the timings the
failover target is about.
"""

from __future__ import annotations

import statistics

import pytest

from swarmnode.election import LEADER, Config, Election, step_voters
from swarmnode.election.sim import (
    ElectionSim,
    RunResult,
    liveness_bound,
    measure_failover,
    random_run,
)

CFG = Config()
BOUND = liveness_bound(CFG)


def settle(sim: ElectionSim, ids: list[str] | None = None) -> str:
    """Run until the nodes in `ids` (default: all running) follow one leader with a lease."""
    assert sim.run_until_pred(lambda s: s.stable_leader(ids) is not None, BOUND)
    leader = sim.stable_leader(ids)
    assert leader is not None
    return leader


def safe(sim: ElectionSim) -> bool:
    return not sim.violations


class NoStickiness(Election):
    """Broken on purpose: votes even while it hears a live leader."""

    def _sticky(self, now: float) -> bool:
        return self.role == LEADER


# ---------------------------------------------------------------------------------------------
# Randomized runs


def _runs(seeds: range, **kw: object) -> list[RunResult]:
    return [random_run(seed, **kw) for seed in seeds]  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk", range(4))
def test_random_faults_never_elect_two_leaders_in_one_term(chunk: int) -> None:
    """2,000 seeds in all: 1-7 voters, 0-2 observers, crashes and restarts (leaders
    preferred), group partitions, single cut links, loss up to 50%, duplication, slow links;
    then healed, every node must follow one leader with a lease within the liveness bound."""
    results = _runs(range(chunk * 500, (chunk + 1) * 500))
    bad = [(r.seed, r.violations[:3], r.faults) for r in results if r.violations]
    assert not bad
    stuck = [(r.seed, r.faults) for r in results if r.recovered_after is None]
    assert not stuck
    # the faults bit: every size occurred and many runs needed several elections
    assert {r.voters for r in results} == set(range(1, 8))
    assert sum(len(r.faults) for r in results) > 3 * len(results)
    assert sum(r.max_term >= 3 for r in results) > len(results) // 8
    recovered = [r.recovered_after for r in results if r.recovered_after is not None]
    assert statistics.median(recovered) < 1.0
    # and the log: thousands of proposals committed through it all, snapshots taken and sent
    assert sum(r.accepted for r in results) > 10_000
    assert sum(r.committed for r in results) > sum(r.accepted for r in results)
    assert sum(r.snapshots for r in results) > 2_000


def test_the_checker_catches_restarts_that_forget_the_vote() -> None:
    """The same runs with a shell that does not keep its Persist outputs: some term gets two
    leaders and committed entries are lost, so the invariant checks and the persistence both
    matter."""
    results = _runs(range(1000), keep_disk=False)
    kinds = {v.kind for r in results for v in r.violations}
    assert {"two_leaders", "state_machine_safety", "leader_incomplete"} <= kinds


class NoVoteRestriction(Election):
    """Broken on purpose: votes for any candidate, however short its log."""

    def _log_ok(self, last_index: int, last_term: int) -> bool:
        return True


def test_the_checker_catches_a_missing_vote_restriction() -> None:
    """Without the vote restriction a leader can be elected without a committed entry and
    overwrite it on the others: the election itself stays safe, the log does not."""
    results = _runs(range(250), factory=NoVoteRestriction)
    kinds = {v.kind for r in results for v in r.violations}
    assert "leader_incomplete" in kinds and "two_leaders" not in kinds


def test_the_checker_catches_leases_without_stickiness() -> None:
    """Without proposals: while entries flow, the vote restriction alone already keeps a
    follower that cannot hear the leader from winning (the others' logs are ahead of its)."""
    results = _runs(range(1000), factory=NoStickiness, proposals=0.0)
    assert any(v.kind == "two_leases" for r in results for v in r.violations)


# ---------------------------------------------------------------------------------------------
# Targeted scenarios


@pytest.mark.parametrize("seed", range(5))
def test_persistence_prevents_a_second_leader_in_the_same_term(seed: int) -> None:
    """v2 is cut off while v0 and v1 elect a leader in term 1; then the leader is isolated and
    its follower restarts. With its disk the follower remembers its term-1 vote, and the new
    leader gets a later term; without it, the follower and v2 elect a second term-1 leader."""
    outcomes = {}
    for keep_disk in (True, False):
        sim = ElectionSim(3, seed=seed)
        sim.partition([["v0", "v1"], ["v2"]])
        leader = settle(sim, ["v0", "v1"])
        assert sim.election(leader).term == 1
        follower = "v1" if leader == "v0" else "v0"
        sim.partition([[leader], [follower, "v2"]])
        sim.crash(follower)
        sim.restart(follower, keep_disk=keep_disk)
        sim.run_for(BOUND)
        new = sim.stable_leader([follower, "v2"])
        assert new is not None
        outcomes[keep_disk] = (sim.election(new).term, [v.kind for v in sim.violations])
    assert outcomes[True][0] >= 2 and outcomes[True][1] == []
    assert outcomes[False][0] == 1 and "two_leaders" in outcomes[False][1]


@pytest.mark.parametrize("pre_vote", [True, False])
def test_pre_vote_keeps_a_rejoining_node_from_deposing_the_leader(pre_vote: bool) -> None:
    cfg = Config(pre_vote=pre_vote)
    sim = ElectionSim(5, config=cfg, seed=21)
    leader = settle(sim)
    term = sim.election(leader).term
    loner = next(i for i in sorted(sim.nodes) if i != leader)
    sim.partition([[loner]])
    sim.run_for(10.0)
    lonely_term = sim.election(loner).term
    sim.heal()
    sim.run_for(3.0)
    assert safe(sim)
    if pre_vote:
        # the loner never won a pre-vote, so its term never moved and nobody was disturbed
        assert lonely_term == term
        assert settle(sim) == leader and sim.max_term() == term
        assert sim.event_counts["stepped_down"] == 0
    else:
        # the control: without pre-vote the loner inflates its term and deposes the leader
        assert lonely_term > term + 5
        assert sim.event_counts["stepped_down"] >= 1
        assert sim.election(settle(sim)).term > lonely_term


def test_a_follower_that_cannot_hear_the_leader_does_not_disturb_it() -> None:
    """Only the v-leader link to one follower breaks: that follower campaigns, but the others
    still hear the leader and refuse (stickiness), so the leader and its lease survive."""
    sim = ElectionSim(3, seed=5)
    leader = settle(sim)
    term = sim.election(leader).term
    deaf = next(i for i in sorted(sim.nodes) if i != leader)
    sim.cut(leader, deaf)
    for _ in range(100):
        sim.run_for(0.1)
        assert sim.election(leader).leader_lease_valid(sim.now)
    assert sim.election(deaf).counters["pre_votes_started"] > 5
    assert sim.max_term() == term and safe(sim)


def test_without_stickiness_that_follower_takes_over_while_the_lease_holds() -> None:
    sim = ElectionSim(3, seed=5, factory=NoStickiness)
    leader = settle(sim)
    sim.cut(leader, next(i for i in sorted(sim.nodes) if i != leader))
    sim.run_for(3.0)
    assert any(v.kind == "two_leases" for v in sim.violations)


def test_a_leader_cut_off_from_the_majority_steps_down_and_the_majority_elects() -> None:
    sim = ElectionSim(5, observers=1, seed=3, record_events=True)
    old = settle(sim)
    term = sim.election(old).term
    others = [i for i in sorted(sim.nodes) if i != old]
    minority, majority = [old, others[0]], others[1:]
    sim.partition([minority, majority])
    cut_at = sim.now
    sim.run_for(CFG.check_quorum_timeout + CFG.heartbeat_interval + 0.01)
    assert sim.election(old).role != LEADER
    downs = [(t, n, e.data) for t, n, e in sim.events if e.kind == "stepped_down"]
    assert downs and downs[-1][1] == old and downs[-1][2]["reason"] == "check_quorum"
    assert downs[-1][0] - cut_at <= CFG.check_quorum_timeout + CFG.heartbeat_interval
    new = settle(sim, majority)
    assert new != old and sim.election(new).term > term
    assert not any(sim.election(i).leader_lease_valid(sim.now) for i in minority)
    sim.heal()
    assert settle(sim) == new
    assert safe(sim)


@pytest.mark.parametrize("voters", [3, 5])
def test_a_crashed_leader_is_replaced_quickly(voters: int) -> None:
    times = [measure_failover(voters, seed) for seed in range(100)]
    assert None not in times
    done = [t for t in times if t is not None]
    # followers wait 0.4-0.8 s from the last heartbeat; the target for real nodes is 2 s
    assert statistics.median(done) < 0.8
    assert max(done) < 2.0


def test_a_one_node_cluster_leads_and_schedules() -> None:
    sim = ElectionSim(1, observers=1, seed=1)
    assert settle(sim) == "v0"
    assert sim.now < CFG.election_timeout_min + 0.02  # no one to wait for but stickiness
    sim.run_for(30.0)
    assert sim.stable_leader() == "v0" and sim.election("v0").term == 1
    sim.crash("v0")
    sim.restart("v0")
    assert settle(sim) == "v0" and sim.election("v0").term == 2
    assert safe(sim)


def test_a_two_node_cluster_leads_with_both_and_waits_for_a_smaller_voter_set() -> None:
    sim = ElectionSim(2, seed=2)
    leader = settle(sim)
    survivor = "v1" if leader == "v0" else "v0"
    term = sim.election(leader).term
    sim.crash(leader)
    sim.run_for(10.0)
    # a majority of two is two: no leader, and pre-vote keeps the survivor's term still
    assert sim.current_leaders() == [] and sim.election(survivor).term == term
    sim.set_voters({survivor})  # what the voter-selection layer does once membership agrees
    assert settle(sim) == survivor
    sim.restart(leader)
    sim.set_voters({"v0", "v1"})
    assert settle(sim) in ("v0", "v1") and safe(sim)


def test_voter_changes_one_step_at_a_time() -> None:
    """Move from voters {v0, v1, v2} to {v2, o0, o1} one change at a time (as `step_voters`
    does), settling after each: every step has one leader, from the voters of that step, and
    old voters keep following it as observers."""
    sim = ElectionSim(3, observers=2, seed=4)
    settle(sim)
    everyone = frozenset(sim.nodes)
    target = frozenset({"v2", "o0", "o1"})
    steps = 0
    while sim.voter_ids != target:
        voters = step_voters(sim.voter_ids, target)
        sim.set_voters(voters, everyone - voters)
        leader = settle(sim)
        assert leader in voters
        steps += 1
    assert steps == 4 and safe(sim)


def test_a_voter_left_behind_by_a_shrink_to_one_follows_once_the_set_grows_again() -> None:
    """Issue 15's wedge: v2 misses both steps {v0,v1,v2} -> {v0,v1} -> {v1}, so it cannot
    believe v1's proof of one signature (two changes from its set). Once v0 is a voter again
    the leader asks it for a vote in its term and shows a proof of the set it leads now, which
    v2 believes: it follows without an election."""
    sim = ElectionSim(3, seed=15)
    settle(sim)
    sim.partition([["v0", "v1"], ["v2"]])
    sim.set_voters({"v0", "v1"}, {"v2"}, at=["v0", "v1"])
    settle(sim, ["v0", "v1"])
    sim.crash("v0")
    sim.set_voters({"v1"}, {"v0", "v2"}, at=["v1"])
    assert settle(sim, ["v1"]) == "v1"
    sim.heal()
    term = sim.election("v1").term
    sim.run_for(BOUND)
    assert sim.election("v2").leader is None and sim.election("v2").proven_leader(term) is None
    sim.restart("v0")
    sim.set_voters({"v0", "v1"}, {"v2"}, at=["v0", "v1"])
    assert sim.run_until_pred(lambda s: s.election("v2").leader == "v1", BOUND)
    assert sim.election("v1").term == term and sim.current_leaders() == ["v1"] and safe(sim)


def test_removing_the_leader_from_the_voters_hands_over() -> None:
    sim = ElectionSim(3, observers=1, seed=6)
    old = settle(sim)
    voters = sim.voter_ids - {old}
    sim.set_voters(voters, sim.observer_ids | {old})
    assert sim.election(old).role != LEADER
    new = settle(sim)
    assert new in voters and sim.election(old).leader == new and safe(sim)


def test_a_stable_leader_survives_ten_percent_loss() -> None:
    sim = ElectionSim(5, observers=1, seed=8)
    leader = settle(sim)
    term = sim.election(leader).term
    elected = sim.event_counts["leader_elected"]
    sim.loss = 0.1
    sim.run_for(60.0)
    assert sim.stats["lost"] > 400  # a tenth of 60 s of heartbeats and replies to 4 voters
    assert sim.event_counts["leader_elected"] == elected
    assert sim.event_counts["stepped_down"] == 0
    assert sim.max_term() == term and sim.current_leaders() == [leader] and safe(sim)


def test_same_seed_same_run() -> None:
    a, b = random_run(1234), random_run(1234)
    assert (a.faults, a.max_term, a.messages, a.recovered_after) == (
        b.faults,
        b.max_term,
        b.messages,
        b.recovered_after,
    )


# ---------------------------------------------------------------------------------------------
# A Byzantine member (issue 13): an admitted member that forges leadership and counters


class TrustsLeaderClaims(Election):
    """Broken on purpose: follows whoever says it leads, without a proof (as before issue 13)."""

    def _accept_leader(self, src: str, term: int, seq: int) -> bool:
        if term >= self.term and self.proven_leader(term) is None:
            self._proven[term] = src
        return super()._accept_leader(src, term, seq)


class AnySignature:
    """Broken on purpose: a signature check that passes everything."""

    def sign(self, data: bytes) -> bytes:
        return bytes(64)

    def verify(self, signer: str, data: bytes, sig: bytes) -> bool:
        return True


def no_signature_check(*args: object, **kw: object) -> Election:
    return Election(*args, **{**kw, "signatures": AnySignature()})  # type: ignore[arg-type]


def test_a_byzantine_member_neither_leads_nor_moves_terms_and_the_cluster_commits() -> None:
    """Two liars among three voters and an observer, lying 10 times a second each to every
    node for 5 s: forged proofs (self-signed, padded with replayed real votes or garbage),
    leader messages and voter-only messages at the current, next and maximum term, proof
    request floods. Every lie reaches its target and is refused; one leader, low terms,
    proposals commit."""
    sim = ElectionSim(3, 1, seed=3, byzantine=2)
    leader = settle(sim)
    for i in range(20):
        sim.run_for(0.25)
        sim.propose(sim.current_leaders()[0], f"e{i}".encode())
    sim.run_for(1.0)
    assert safe(sim)
    refused: dict[str, int] = {}
    for id_ in sim.up_ids():
        for k, v in sim.election(id_).counters.items():
            refused[k] = refused.get(k, 0) + v
    for what in ("bad_leader_proof", "unproven_leader", "drop_not_voter", "drop_spoofed_leader",
                 "proof_request_limited"):
        assert refused.get(what, 0) > 10, what
    assert sim.attackers["x0"].proof is not None  # it had real votes to replay
    assert sim.stable_leader() == leader and sim.max_term() <= 2
    assert sim.proven == {t: next(iter(ls)) for t, ls in sim.leaders.items()}
    assert [e for _t, e, _d in sim.committed].count(b"e19") == 1


@pytest.mark.parametrize("byzantine", [1, 2])
def test_random_faults_with_byzantine_members_keep_every_invariant(byzantine: int) -> None:
    """Random clusters and faults as above with Byzantine members lying throughout, recovery
    included: never a leader without a proof, never two proven leaders in a term, nothing
    committed that a real leader did not append, no term beyond the honest campaigns, and the
    cluster still elects and catches up."""
    results = _runs(range(byzantine * 100, byzantine * 100 + 12), byzantine=byzantine)
    assert not [(r.seed, r.violations[:3]) for r in results if r.violations]
    assert not [r.seed for r in results if r.recovered_after is None]
    assert sum(r.committed for r in results) > 100


def test_the_checker_catches_a_core_that_trusts_leader_claims() -> None:
    """The same attack on cores that follow an unproven leader: the liar leads, terms jump to
    the maximum, its entries are committed."""
    results = _runs(range(8), factory=TrustsLeaderClaims, byzantine=1)
    kinds = {v.kind for r in results for v in r.violations}
    assert {"unelected_proven_leader", "follows_unelected", "term_inflated",
            "unproposed_commit"} <= kinds


def test_the_checker_catches_a_proof_check_without_signatures() -> None:
    """Proofs checked for a majority of names but not their signatures: the liar's proof
    padded with garbage signatures makes it leader."""
    results = _runs(range(8), factory=no_signature_check, byzantine=1)
    kinds = {v.kind for r in results for v in r.violations}
    assert {"unelected_proven_leader", "follows_unelected"} <= kinds
