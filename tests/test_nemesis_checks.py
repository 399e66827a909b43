"""The fault test's judges (tests/lab/nemesis.py) catch what they are there to catch: fed a
made-up history with a re-run done job, a second leader or an even voter set, they say so, and
a clean history passes. (The lab test only ever shows them a swarm that behaves.)"""

from __future__ import annotations

from pathlib import Path

from tests.lab.nemesis import (
    Dag,
    Fault,
    Outcome,
    Poller,
    Sample,
    check_ledgers,
    check_reruns,
    leaderless,
    make_dag,
    read_runs,
)
from tests.swarm import Node

IDS = {f"id{i}": f"lan{i}" for i in range(1, 6)}
VOTERS = tuple(IDS)


def poller(name: str, samples: list[Sample]) -> Poller:
    p = Poller(Node(name=name, home=Path("/nonexistent"), listen="", log=Path("/dev/null"),
                    id=f"id{name[-1]}"))
    p.samples = samples
    return p


def sample(t: float, role: str = "follower", term: int = 1, jobs=None,
           voters: tuple[str, ...] = VOTERS) -> Sample:
    return Sample(t, role, None, term, voters, jobs)


def outcome() -> Outcome:
    return Outcome(seed=0, jobs=1, build_s=0.0, faults=[])


def test_a_dag_computes_each_output_from_its_deps_in_layer_order() -> None:
    dag = make_dag(12, 4)
    assert list(dag.deps) == sorted(dag.deps)
    assert all(dag.deps[j] for j in list(dag.deps)[4:]) and not any(
        dag.deps[j] for j in list(dag.deps)[:4])
    a = Dag({"a": (), "b": ("a",)}).expected()
    b = Dag({"a": (), "b": ("a",), "c": ()}).expected()
    assert a["b"] == b["b"] and a["a"] != a["b"] and a["b"].endswith("  -\n")


def test_runs_pair_each_end_with_its_start(tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    log.write_text("1.0 B j 1 id1 start\n2.0 B j 2 id2 start\n3.0 B j 2 id2 end\n"
                   "3.5 OTHER j 1 id1 end\nbroken line\n")
    runs = read_runs(log, "B")["j"]
    assert [(r.attempt, r.end) for r in runs] == [(1, None), (2, 3.0)]


def test_a_done_job_started_again_is_a_violation(tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    log.write_text("1.0 B j 1 id1 start\n2.0 B j 1 id1 end\n5.0 B j 2 id2 start\n")
    pollers = {"lan1": poller("lan1", [sample(3.0, jobs={"j": ("done", 1, "id1")})])}
    out = outcome()
    check_reruns(out, read_runs(log, "B"), pollers, [], IDS)
    assert out.reruns_after_done == 1 and "after a ledger showed it done" in out.violations[0]


def test_a_rerun_after_a_good_end_counts_only_when_its_node_was_faulted(tmp_path) -> None:
    log = tmp_path / "runs.log"
    log.write_text("1.0 B j 1 id1 start\n2.0 B j 1 id1 end\n3.0 B j 2 id2 start\n")
    pollers = {"lan1": poller("lan1", [sample(1.5, jobs={"j": ("running", 1, "id1")})])}
    healthy = outcome()
    check_reruns(healthy, read_runs(log, "B"), pollers, [], IDS)
    assert "ended well" in healthy.violations[0] and healthy.reruns_interrupted == 0
    killed = outcome()
    check_reruns(killed, read_runs(log, "B"), pollers,
                 [Fault("kill", ("lan1",), False, 2.5, 4.0)], IDS)
    assert killed.violations == [] and killed.reruns_interrupted == 1


def test_an_attempt_voided_before_it_ended_may_run_again(tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    log.write_text("1.0 B j 1 id1 start\n4.0 B j 1 id1 end\n5.0 B j 2 id2 start\n")
    pollers = {"lan2": poller("lan2", [sample(3.0, jobs={"j": ("queued", 1, "id1")})])}
    out = outcome()
    check_reruns(out, read_runs(log, "B"), pollers, [], IDS)
    assert out.violations == [] and out.reruns_interrupted == 1


def test_an_attempt_the_history_shows_requeued_may_run_again(tmp_path: Path) -> None:
    """The requeue landed between two ledger samples (a node declared dead 20 ms before its
    job ended well): the history of attempts still shows it voided."""
    log = tmp_path / "runs.log"
    log.write_text("1.0 B j 1 id1 start\n2.0 B j 1 id1 end\n2.1 B j 2 id2 start\n")
    pollers = {"lan1": poller("lan1", [sample(1.5, jobs={"j": ("running", 1, "id1")})])}
    out = outcome()
    check_reruns(out, read_runs(log, "B"), pollers, [], IDS, {("j", 1)})
    assert out.violations == [] and out.reruns_interrupted == 1
    other = outcome()  # another attempt voided proves nothing about this one
    check_reruns(other, read_runs(log, "B"), pollers, [], IDS, {("j", 2)})
    assert "ended well" in other.violations[0]


def test_two_leaders_of_a_term_an_even_voter_set_and_a_done_job_undone_are_violations() -> None:
    out = outcome()
    check_ledgers(out, {
        "lan1": poller("lan1", [sample(1.0, "leader", 3, {"j": ("done", 1, "id1")}),
                                sample(2.0, "leader", 3, {"j": ("queued", 1, "id1")})]),
        "lan2": poller("lan2", [sample(1.0, "leader", 3, voters=VOTERS[:4])]),
    }, IDS)
    text = "\n".join(out.violations)
    assert "term 3 had leaders ['lan1', 'lan2']" in text
    assert "4 voters" in text and "j was done" in text
    clean = outcome()
    check_ledgers(clean, {"lan1": poller("lan1", [sample(1.0, "leader", 3),
                                                  sample(2.0, "leader", 4)])}, IDS)
    assert clean.violations == []


def test_leaderless_time_counts_only_while_a_majority_is_healthy() -> None:
    def timeline(name: str, leader_until: float, leader_from: float) -> Poller:
        return poller(name, [sample(t / 10, "leader" if name == "lan1" and not
                                    leader_until <= t / 10 < leader_from else "follower")
                             for t in range(0, 101)])

    pollers = {f"lan{i}": timeline(f"lan{i}", 2.0, 4.0) for i in range(1, 6)}
    spans = leaderless(pollers, [], 0.0, 10.0)
    assert len(spans) == 1 and abs(spans[0][0] - 2.0) < 0.06 and abs(spans[0][1] - 2.0) < 0.11
    three_down = [Fault("partition", ("lan2", "lan3"), False, 1.0, 5.0),
                  Fault("stop", ("lan4",), False, 1.0, 5.0)]
    assert leaderless(pollers, three_down, 0.0, 10.0) == []


def test_a_start_counts_from_when_its_process_was_forked(tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    log.write_text("9.0 B j 1 id1 start 250\n9.5 B j 1 id1 end\n")
    [run] = read_runs(log, "B", booted=1000.0)["j"]
    assert (run.t, run.end) == (1002.5, 9.5)
