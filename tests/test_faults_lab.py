"""Issue 15's fault test: five real nodes (shipped timers) build a DAG while a seeded nemesis
kills -9 and restarts them, freezes them (the leader too) and partitions them 2|3; afterwards
every safety and availability invariant of tests/lab/nemesis.py must hold.

CI runs a short seed set on a short DAG; bench/fault.py runs ten seeds of 60 s with figures.
A failure prints the seed, the faults (with times) and each violation; the nodes' homes and
logs are kept (see the swarm fixture).
"""

from __future__ import annotations

import json

import pytest

from tests.lab import Lab, unavailable_reason
from tests.lab.nemesis import Trial, form, run_trial
from tests.swarm import (
    Swarm,
    lab_swarm_fixture,  # noqa: F401 (the `lab_swarm` fixture)
)

_REASON = unavailable_reason()
pytestmark = [
    pytest.mark.lab,
    pytest.mark.timeout(240),
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]

SEEDS = (1, 2)
#: Issue 15's target is 2 s (bench/fault.py reports it); a loaded CI machine delays polls and
#: elections, so the test holds twice that: seen at most 0.95 s in 30 seeded runs under a busy
#: loop, while a leaderless connected majority (as before issue 15) lasted 13-18 s.
LEADERLESS_BOUND_S = 4.0


@pytest.mark.parametrize("seed", SEEDS)
def test_a_seeded_nemesis_keeps_safety_and_availability(
        lab: Lab, lab_swarm: Swarm, seed: int) -> None:
    cluster = form(lab_swarm, lab)
    out = run_trial(cluster, Trial(seed, jobs=24, width=4, job_s=2.0, fault_s=20.0),
                    lab_swarm.root / "trial")  # kept with the homes on a failure
    print(json.dumps({k: v for k, v in out.plain().items() if k != "leaderless"}, indent=1))
    print(f"seed {seed}: build {out.build_s} s, {len(out.faults)} faults, {out.starts} job "
          f"starts, {out.reruns_interrupted} re-runs of interrupted jobs, longest leaderless "
          f"{out.max_leaderless_s} s")
    assert out.faults, "the nemesis applied no fault"
    assert out.violations == [], "\n".join(out.violations)
    assert out.reruns_after_done == 0
    assert out.max_leaderless_s < LEADERLESS_BOUND_S, out.leaderless
