"""The swarm's time series: points from what a node holds, roll-ups, retention, restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarmnode.series import (
    COARSE_KEEP_S,
    COARSE_S,
    FINE_KEEP_S,
    FINE_S,
    MAX_NODES,
    Member,
    Point,
    Recorder,
    SeriesService,
    SeriesStore,
    SwarmView,
    rebucket,
)


def view(joules: dict[str, float], day: str = "2026-12-07", watts: float = 50.0,
         busy: int = 0, queue: int = 0) -> SwarmView:
    return SwarmView({m: Member(0.5, watts, day, j) for m, j in joules.items()},
                     cores_online=8 * len(joules), cores_busy=busy, queue=queue)


def test_energy_is_what_members_stated_since_the_last_sample_and_never_negative() -> None:
    rec = Recorder()
    assert rec.sample(0, view({"a": 1000.0})).joules == 0  # a first sample: nothing before
    assert rec.sample(10, view({"a": 1500.0, "b": 70.0})).joules == 500  # b counts from now
    p = rec.sample(20, view({"a": 1600.0, "b": 100.0}))
    assert p.joules == 130 and p.watts == 100.0
    assert rec.sample(30, view({"a": 10.0, "b": 150.0})).joules == 50  # a restarted: 0 for it
    # a new day starts the count again: no negative energy, the next interval counts
    assert rec.sample(40, view({"a": 20.0, "b": 5.0}, day="2026-12-08")).joules == 0
    assert rec.sample(50, view({"a": 30.0, "b": 9.0}, day="2026-12-08")).joules == 14


def test_job_counts_are_per_interval() -> None:
    rec = Recorder()
    for kind in ("assigned", "started", "assigned", "done", "failed", "requeued", "done"):
        rec.on_ledger(kind)
    p = rec.sample(0, view({}, busy=3, queue=7))
    assert (p.started, p.finished, p.failed, p.cores_busy, p.queue) == (2, 2, 1, 3, 7)
    p = rec.sample(10, view({}))
    assert (p.started, p.finished, p.failed) == (0, 0, 0)


def test_member_rows_are_bounded_per_point() -> None:
    rec = Recorder()
    rows = rec.node_rows(60, view({f"m{i:04d}": 0.0 for i in range(MAX_NODES + 5)}))
    assert len(rows) == MAX_NODES and rec.nodes_dropped == 5
    assert rows[0] == (60, "m0000", 0.5, 50.0)


def point(ts: int, watts: float = 100.0, joules: float = 1000.0, finished: int = 1) -> Point:
    return Point(ts, watts, joules, 16, 4, 2, finished, 0, 3)


def test_coarse_points_roll_up_complete_windows_with_sums_and_averages(tmp_path: Path) -> None:
    store = SeriesStore(tmp_path / "series.db")
    t0 = 1_800_000_000 // COARSE_S * COARSE_S
    for i in range(2 * COARSE_S // FINE_S + 1):  # two whole windows and one point of a third
        store.add(point(t0 + i * FINE_S, watts=100.0 + (i % 2) * 20), [])
    now = t0 + 2 * COARSE_S
    week = store.query(now - 7 * 86400, now)  # beyond a day: the coarse series
    assert week["resolution_s"] == COARSE_S
    cols = week["columns"]
    rows = [dict(zip(cols, r, strict=True)) for r in week["points"]]
    assert [r["ts"] for r in rows] == [t0, t0 + COARSE_S]  # the third window is not over
    per_window = COARSE_S // FINE_S
    for r in rows:
        assert r["joules"] == 1000.0 * per_window and r["finished"] == per_window
        assert r["watts"] == pytest.approx(110.0) and r["queue"] == 3
    day = store.query(now - 3600, now)
    assert day["resolution_s"] == FINE_S and len(day["points"]) == 2 * per_window + 1
    # what a day of fine points sums to, the coarse points sum to
    assert sum(r["joules"] for r in rows) == sum(
        p[cols.index("joules")] for p in day["points"][:-1])
    store.close()


def test_retention_drops_old_points_and_a_restart_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "series.db"
    store = SeriesStore(path)
    t0 = 1_800_000_000
    store.add(point(t0), [(t0, "a", 0.5, 40.0)])
    store.add(point(t0 + COARSE_S), [])
    later = t0 + FINE_KEEP_S + COARSE_S + FINE_S
    store.add(point(later), [(later, "a", 1.5, 60.0)])
    store.close()
    store = SeriesStore(path)  # a restart
    fine = store.query(later - FINE_KEEP_S, later)
    assert [r[0] for r in fine["points"]] == [later]  # the day-old fine points are gone
    assert fine["nodes"] == {"a": [[later, 1.5, 60.0]]}
    coarse = store.query(t0 - 1, later)
    assert [r[0] for r in coarse["points"]][:2] == [t0 // COARSE_S * COARSE_S,
                                                    (t0 + COARSE_S) // COARSE_S * COARSE_S]
    last = t0 + COARSE_KEEP_S + 2 * COARSE_S
    store.add(point(last), [])
    assert all(r[0] >= last - COARSE_KEEP_S
               for r in store.query(t0 - 1, last)["points"])  # 90 days on, gone too
    store.close()


def test_the_service_writes_on_the_marks_and_a_write_error_is_counted(tmp_path: Path) -> None:
    store = SeriesStore(tmp_path / "series.db")
    clock = [1_800_000_007.0]
    svc = SeriesService(store, lambda: view({"a": 5.0}), lambda: clock[0])
    svc.recorder.on_ledger("done")
    p = svc.sample()
    assert p.ts == 1_800_000_000 and p.finished == 1
    assert store.query(clock[0] - 60, clock[0])["nodes"]["a"][0][0] == 1_800_000_000 // 60 * 60
    store.close()
    clock[0] += FINE_S
    svc.sample()  # the database is closed: counted and logged, the node goes on
    assert svc.failures == 1


def test_rebucket_sums_counts_and_averages_levels() -> None:
    cols = ["ts", "watts", "joules", "cores_online", "cores_busy", "started", "finished",
            "failed", "queue"]
    points = [[0, 100, 10, 8, 2, 1, 0, 0, 4], [10, 200, 20, 8, 4, 0, 2, 1, None],
              [60, 50, 5, 8, 0, 0, 0, 0, 0]]
    a, b = rebucket(cols, points, 60)
    assert a == {"ts": 0, "watts": 150, "joules": 30, "cores_online": 8, "cores_busy": 3,
                 "started": 1, "finished": 2, "failed": 1, "queue": 4}
    assert b["ts"] == 60 and b["watts"] == 50
