"""Tests for swarmnode.build.schedule: priorities, placement rules, and simulated makespans."""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmnode.build.plan import Job, Plan, Requires, validate_plan
from swarmnode.build.schedule import (
    Placement,
    Ready,
    Slot,
    assign,
    lower_bound,
    priorities,
    ready_jobs,
    satisfiable,
    simulate,
    simulate_schedule,
)

AMD = Slot("amd", 8, arch="amd64", kind="bare", tags=frozenset({"gcc", "big"}))
ARM = Slot("arm", 4, arch="arm64", kind="lxc", tags=frozenset({"gcc"}))


def job(name: str, estimate: float = 1.0, deps: Sequence[str] = (), cores: int = 1) -> Job:
    return Job(name, "true", deps=tuple(deps), requires=Requires(cores=cores), estimate=estimate)


def plan_of(*jobs: Job) -> Plan:
    return validate_plan(Plan("test", {j.name: j for j in jobs}))


def ready(name: str, priority: float = 1.0, **requires: object) -> Ready:
    return Ready(name, Requires(**requires), priority)  # type: ignore[arg-type]


# --- priorities -----------------------------------------------------------------------------


def test_priorities_are_bottom_levels() -> None:
    #   a(2) -> b(3) -> d(1)      (-> means "is needed by")
    #   a(2) -> c(5) -> d(1)
    #   e(4)
    plan = plan_of(
        job("a", 2),
        job("b", 3, ["a"]),
        job("c", 5, ["a"]),
        job("d", 1, ["b", "c"]),
        job("e", 4),
    )
    assert priorities(plan) == {"a": 8.0, "b": 4.0, "c": 6.0, "d": 1.0, "e": 4.0}
    assert lower_bound(plan, 1) == 15.0  # all work on one core
    assert lower_bound(plan, 100) == 8.0  # the critical path a, c, d


def test_lower_bound_counts_cores_of_work() -> None:
    plan = plan_of(job("a", 10, cores=4), job("b", 10, cores=4))
    assert lower_bound(plan, 4) == 20.0


def test_ready_jobs() -> None:
    plan = plan_of(job("a"), job("b", deps=["a"]), job("c"), job("d", deps=["a", "c"]))
    assert [r.job for r in ready_jobs(plan, finished=())] == ["a", "c"]
    assert [r.job for r in ready_jobs(plan, finished={"a"}, started={"c"})] == ["b"]
    assert [r.job for r in ready_jobs(plan, finished={"a", "c"})] == ["b", "d"]


# --- assign ---------------------------------------------------------------------------------


def test_requirements_pick_the_node() -> None:
    jobs = [
        ready("needs-arm", arch="arm64"),
        ready("needs-bare", kind="bare"),
        ready("needs-big", tags=frozenset({"big"})),
        ready("needs-riscv", arch="riscv64"),
        ready("needs-docker", kind="docker"),
        ready("needs-gcc-lxc", tags=frozenset({"gcc"}), kind="lxc"),
    ]
    assert sorted(assign(jobs, [AMD, ARM])) == [
        ("needs-arm", "arm"),
        ("needs-bare", "amd"),
        ("needs-big", "amd"),
        ("needs-gcc-lxc", "arm"),
    ]


def test_cores_are_never_overcommitted() -> None:
    jobs = [ready(f"j{i}", priority=10 - i, cores=3) for i in range(5)]
    pairs = assign(jobs, [AMD, ARM])  # 8 + 4 free cores: two 3-core jobs fit on amd, one on arm
    assert pairs == [("j0", "arm"), ("j1", "amd"), ("j2", "amd")]
    used: dict[str, int] = {}
    for _, node in pairs:
        used[node] = used.get(node, 0) + 3
    assert used["amd"] <= 8 and used["arm"] <= 4


def test_highest_priority_first_and_best_fit() -> None:
    slots = [Slot("small", 2, "x", "bare"), Slot("large", 16, "x", "bare")]
    # The big job gets the large node although the small one came first by priority:
    # best fit puts the 2-core job on the 2-core node.
    pairs = assign([ready("small-job", 9, cores=2), ready("big-job", 5, cores=16)], slots)
    assert pairs == [("small-job", "small"), ("big-job", "large")]
    # Under contention the higher priority wins the only place.
    one = [Slot("only", 4, "x", "bare")]
    assert assign([ready("low", 1, cores=4), ready("high", 2, cores=4)], one) == [("high", "only")]


def test_a_big_job_reserves_a_node_it_can_use_once_idle() -> None:
    # 3 of 8 cores free: the 4-core job must wait, and the small job may not take the node.
    busy = Slot("busy", 3, "x", "bare", cores=8)
    big, small = ready("big", 9, cores=4), ready("small", 1, cores=2)
    assert assign([big, small], [busy]) == []
    # A node too small for the big job stays open to the small one.
    tiny = Slot("tiny", 2, "x", "bare", cores=2)
    assert assign([big, small], [busy, tiny]) == [("small", "tiny")]
    # Of several nodes it could use, it holds the one with the most free cores.
    other = Slot("other", 2, "x", "bare", cores=8)
    assert assign([big, small], [other, busy]) == [("small", "other")]
    # Without the total, a node is taken to be as big as its free cores: nothing to wait for.
    assert assign([big, small], [Slot("n", 3, "x", "bare")]) == [("small", "n")]


def test_avoid_and_paused() -> None:
    paused = Slot("paused", 64, "amd64", "bare", paused=True)
    jobs = [ready("retry", 5), ready("other", 1)]
    pairs = assign(jobs, [AMD, ARM, paused], avoid={"retry": frozenset({"arm"})})
    assert ("retry", "amd") in pairs
    assert all(node != "paused" for _, node in pairs)
    assert assign(jobs, [paused]) == []
    assert assign([ready("retry")], [ARM], avoid={"retry": frozenset({"arm"})}) == []


def test_assign_is_deterministic_whatever_the_input_order() -> None:
    rng = random.Random(7)
    slots = [Slot(f"n{i}", rng.choice([1, 2, 4, 8]), "x", "bare") for i in range(6)]
    jobs = [
        ready(f"j{i}", rng.choice([1.0, 2.0, 3.0]), cores=rng.choice([1, 2])) for i in range(30)
    ]
    expected = assign(jobs, slots)
    for _ in range(5):
        rng.shuffle(slots)
        rng.shuffle(jobs)
        assert assign(jobs, slots) == expected


def test_satisfiable() -> None:
    busy = Slot("busy", 0, "amd64", "bare", cores=16)
    assert satisfiable(Requires(cores=16), [busy, ARM])  # busy now, but big enough
    assert not satisfiable(Requires(cores=17), [busy, ARM])
    assert satisfiable(Requires(arch="arm64"), [Slot("p", 4, "arm64", "lxc", paused=True)])
    assert not satisfiable(Requires(arch="riscv64"), [AMD, ARM])
    assert not satisfiable(Requires(tags=frozenset({"gpu"})), [AMD, ARM])
    assert not satisfiable(Requires(arch="arm64"), [AMD, ARM], avoid={"arm"})


# --- simulation -----------------------------------------------------------------------------


def test_simulate_small_cases() -> None:
    chain = plan_of(job("a", 1), job("b", 2, ["a"]), job("c", 3, ["b"]))
    assert simulate(chain, [("n", 8)]) == 6.0
    wide = plan_of(job("a", 1), job("b", 2), job("c", 3))
    assert simulate(wide, [("n", 1)]) == 6.0
    assert simulate(wide, [("n", 3)]) == 3.0
    # Critical path first: on two cores, c (3) and a (1) start, then b (2) follows a.
    schedule = simulate_schedule(wide, [("n", 2)])
    assert schedule == {
        "c": Placement("n", 0.0, 3.0),
        "b": Placement("n", 0.0, 2.0),
        "a": Placement("n", 2.0, 3.0),
    }


def test_simulate_respects_requirements_of_real_slots() -> None:
    plan = plan_of(
        Job("arm-only", "x", requires=Requires(arch="arm64"), estimate=5),
        Job("any", "x", estimate=5),
    )
    schedule = simulate_schedule(plan, [AMD, ARM])
    assert schedule["arm-only"].node == "arm"
    with pytest.raises(ValueError, match="no node can run: arm-only"):
        simulate(plan, [AMD])


def check_schedule(plan: Plan, nodes: list[tuple[str, int]], got: dict[str, Placement]) -> None:
    """Every job ran once, after its deps, and no node ever ran more cores than it has."""
    assert set(got) == set(plan.jobs)
    capacity = dict(nodes)
    for name, place in got.items():
        assert place.end == pytest.approx(place.start + plan.jobs[name].estimate)
        for dep in plan.jobs[name].deps:
            assert got[dep].end <= place.start
    for node in capacity:
        events = sorted(
            (time, sign * plan.jobs[name].requires.cores)
            for name, place in got.items()
            if place.node == node
            for time, sign in ((place.start, 1), (place.end, -1))
        )  # at equal times, releases (-) sort before starts (+)
        load = 0
        for _, delta in events:
            load += delta
            assert load <= capacity[node]


@st.composite
def dags(draw: st.DrawFn) -> tuple[Plan, list[tuple[str, int]]]:
    nodes = [(f"n{i}", c) for i, c in enumerate(draw(st.lists(st.integers(1, 8), min_size=1)))]
    biggest = max(cores for _, cores in nodes)
    count = draw(st.integers(1, 25))
    jobs = []
    for i in range(count):
        deps = draw(st.lists(st.integers(0, i - 1), max_size=3, unique=True)) if i else []
        jobs.append(
            job(
                f"j{i}",
                draw(st.floats(0.1, 100, allow_nan=False)),
                [f"j{d}" for d in deps],
                draw(st.integers(1, biggest)),
            )
        )
    return plan_of(*jobs), nodes


@settings(max_examples=150, deadline=None)
@given(dags())
def test_random_dags_never_beat_the_lower_bound(case: tuple[Plan, list[tuple[str, int]]]) -> None:
    plan, nodes = case
    got = simulate_schedule(plan, nodes)
    check_schedule(plan, nodes, got)
    makespan = max(place.end for place in got.values())
    assert makespan >= lower_bound(plan, sum(c for _, c in nodes)) * (1 - 1e-9)


# --- quality on 200-job graphs --------------------------------------------------------------

NODES = [("a", 2), ("b", 4), ("c", 4), ("d", 8), ("e", 16)]
TOTAL = sum(cores for _, cores in NODES)


def synthetic(seed: int, window: int | None, n: int = 200) -> Plan:
    """A build-like DAG: each job needs 0-3 earlier jobs (from the last `window`, or any),
    half the jobs use 1 core and a tenth use 8, durations log-normal (median 20 s)."""
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        pool = range(max(0, i - window) if window else 0, i)
        deps = rng.sample(pool, min(rng.randint(0, 3), len(pool)))
        cores = rng.choices([1, 2, 4, 8], weights=[50, 25, 15, 10])[0]
        jobs.append(
            job(f"j{i:03d}", rng.lognormvariate(3.0, 1.0), [f"j{d:03d}" for d in deps], cores)
        )
    return plan_of(*jobs)


def ratios(window: int | None, seeds: range = range(10)) -> list[float]:
    out = []
    for seed in seeds:
        plan = synthetic(seed, window)
        got = simulate_schedule(plan, NODES)
        check_schedule(plan, NODES, got)
        out.append(max(p.end for p in got.values()) / lower_bound(plan, TOTAL))
    return out


def test_makespan_within_10_percent_of_the_lower_bound() -> None:
    # Deps among the previous 20 or 50 jobs: a long critical path with parallel work around it.
    # Measured on these seeds: window 20 mean 1.008, max 1.032; window 50 mean 1.010, max 1.029.
    # (Over seeds 0-99: 97% and 96% of graphs within 1.10, worst 1.115 and 1.213.)
    for window in (20, 50):
        got = ratios(window=window)
        assert max(got) <= 1.10, (window, got)


def test_makespan_when_path_and_work_are_balanced() -> None:
    # Deps on any earlier job: the critical path and work / cores are about equal, where the
    # lower bound is loose (no schedule reaches both). Measured on these seeds: mean 1.071, max
    # 1.190 (over seeds 0-99: mean 1.058, 75% within 1.10, worst 1.352). A search over
    # perturbed priorities reached 1.03-1.10 on the graphs above 1.10 here, so the gap is partly
    # the heuristic's: critical-path-first reaches 1.10 on such graphs on average only.
    got = ratios(window=None)
    assert statistics.mean(got) <= 1.10, got
    assert max(got) <= 1.25, got
