"""Disk retention and the nearly-full state, as units: the store's bounded, capped GC, the GC
plan from the replicated ledger (what unfinished builds need, the retention, which pins go),
and the hysteresis of the low state."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import replace
from pathlib import Path

from swarmnode.artifact_service import UNKNOWN_OWNER_S, plan_gc
from swarmnode.artifacts import ArtifactStore
from swarmnode.config import DiskSettings
from swarmnode.disk import RESUME_FACTOR, Space, next_low
from swarmnode.ledger import Assign, Done, JobSpec, SubmitBuild, job_key
from swarmnode.ledger.jobs import JobLedger

NODE = "n" * 52


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def aged(store: ArtifactStore, data: bytes, age: float) -> str:
    digest = store.put_bytes(data)
    then = time.time() - age
    os.utime(store.path(digest), (then, then))
    return digest


def test_gc_deletes_oldest_first_down_to_the_cap_within_its_limit_never_a_pinned_one(
        tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    old = [aged(store, bytes([i]) * 1000, 1000 - i) for i in range(6)]  # old[0] the oldest
    young = aged(store, b"y" * 1000, 0)
    store.pin(old[0], "binhost")
    result = store.gc(min_age=60, max_bytes=4000)  # 7000 bytes: three go, oldest unpinned
    assert result.removed == tuple(old[1:4]) and result.total == 4000
    assert store.has(old[0]) and store.has(young)
    result = store.gc(min_age=60, limit=1)
    assert result.removed == (old[4],) and result.total == 3000
    assert store.gc(min_age=60).removed == (old[5],)
    assert store.gc(min_age=60).removed == ()  # the pinned one and the young one stay


def ledger_with(*builds: tuple[str, bool]) -> JobLedger:
    """Builds of one job each, `(id, finished)`; a finished one's job produced sha(id)."""
    led = JobLedger()
    n = 0

    def apply(cmd: object) -> None:
        nonlocal n
        n += 1
        led.apply(n, cmd)

    for build_id, finished in builds:
        apply(SubmitBuild(build_id, "p", NODE, (("j", JobSpec(spec_hash=sha("spec" + build_id))),)))
        if finished:
            apply(Assign(job_key(build_id, "j"), NODE, 1, 1))
            apply(Done(job_key(build_id, "j"), NODE, 1, (("out", sha(build_id)),)))
    return led


def test_the_gc_plan_keeps_unfinished_builds_and_the_retention_and_releases_the_rest() -> None:
    ids = [f"b{i}-120000-00000{i}" for i in range(5)]
    led = ledger_with(*[(b, b != ids[3]) for b in ids])  # b3 still runs
    assert led.finished(ids[0]) and not led.finished(ids[3])
    now = 1e6
    settings = replace(DiskSettings(), artifacts_keep_builds=2, artifacts_keep_hours=1.0)
    finished_at = {ids[0]: now - 7200, ids[1]: now - 7200, ids[2]: now - 10, ids[4]: now - 7200}
    owners = {b: now - 7200 for b in ids} | {
        "binhost": 0.0, "run.abc": 0.0,
        "gone-010101-abcdef": now - UNKNOWN_OWNER_S - 1,  # compacted out of the ledger
        "new-010101-abcdef": now - 5,  # its submission is on its way
    }
    plan = plan_gc(led, owners, finished_at, settings, now)
    assert plan.needed == {sha("spec" + ids[3])}
    # the last two finished (b4, b2) and, by age, b2 again; b1 and b0 are past both
    assert plan.retained == {sha(ids[4]), sha("spec" + ids[4]), sha(ids[2]), sha("spec" + ids[2])}
    assert sorted(plan.release) == sorted([ids[0], ids[1], "gone-010101-abcdef"])
    assert sorted(plan.finished) == sorted([ids[2], ids[4]])
    younger = plan_gc(led, owners, finished_at, replace(settings, artifacts_keep_builds=0,
                                                        artifacts_keep_hours=3.0), now)
    assert younger.release == ("gone-010101-abcdef",)  # all finished within 3 hours


def test_low_needs_the_threshold_and_ok_needs_more_so_it_does_not_flap() -> None:
    settings = replace(DiskSettings(), min_free=1000, min_free_percent=10.0)
    big = Space("/x", free=5000, total=100_000)  # threshold: 10% = 10000
    assert big.threshold(settings) == 10_000
    assert next_low(False, [big], settings)
    small = Space("/y", free=999, total=1000)  # threshold: 1000 bytes
    assert next_low(False, [small], settings)
    fine = Space("/y", free=1000, total=1000)
    assert not next_low(False, [fine], settings)
    assert next_low(True, [fine], settings)  # low stays low just above the threshold
    assert next_low(True, [Space("/y", int(1000 * RESUME_FACTOR) - 1, 10_000)], settings)
    assert not next_low(True, [Space("/y", int(1000 * RESUME_FACTOR), 10_000)], settings)
    assert next_low(False, [Space("/a", 10**9, 10**9), small], settings)  # any one counts
