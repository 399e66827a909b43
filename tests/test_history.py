"""The on-disk build history: upserts that keep what a row has (a replay changes nothing),
batched writes, bounds, and each job's end from its attempts."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from swarmnode.history import FLUSH_ROWS, FLUSH_S, History, job_ends


def history(tmp_path: Path, attempts: int = 1000, builds: int = 100) -> History:
    return History(tmp_path / "history.db", attempts, builds)


def test_an_attempt_is_filled_in_as_its_entries_come_and_a_replay_changes_nothing(
        tmp_path: Path) -> None:
    h = history(tmp_path)
    h.attempt("b1", "a", 1, node="n1", term=3, assigned=10.0)
    h.attempt("b1", "a", 1, node="n1", started=11.0)
    h.flush()
    h.attempt("b1", "a", 1, node="n1", ended=12.0, result="failed", seconds=0.5, reason="exit 1")
    h.attempt("b1", "a", 2, node="n2", term=3, assigned=12.5)
    h.attempt("b1", "a", 2, node="n2", ended=13.0, result="done", seconds=0.4,
              artifacts={"out/x": "ab" * 32})
    h.flush()
    first = h.attempts("b1")
    # the node restarts and replays the same entries later: the first times and results stay
    h.attempt("b1", "a", 1, node="n1", term=3, assigned=99.0)
    h.attempt("b1", "a", 1, node="n1", ended=99.0, result="cancelled")
    h.attempt("b1", "a", 2, node="n2", ended=99.0, result="done", seconds=0.4)
    assert h.attempts("b1") == first
    assert [(r["attempt"], r["node"], r["term"], r["assigned"], r["started"], r["ended"],
             r["result"], r["reason"]) for r in first] == [
        (1, "n1", 3, 10.0, 11.0, 12.0, "failed", "exit 1"),
        (2, "n2", 3, 12.5, None, 13.0, "done", None)]
    assert first[1]["artifacts"] == {"out/x": "ab" * 32}
    assert job_ends(first)["a"]["result"] == "done"


def test_a_job_ended_without_an_attempt_of_its_own_ends_with_its_row_0() -> None:
    rows = [{"job": "a", "attempt": 1, "result": "failed"},
            {"job": "a", "attempt": 0, "result": "cancelled"},
            {"job": "b", "attempt": 0, "result": "blocked"},
            {"job": "c", "attempt": 2, "result": "done"},
            {"job": "c", "attempt": 1, "result": "requeued"}]
    ends = job_ends(rows)
    assert {j: r["result"] for j, r in ends.items()} == {
        "a": "cancelled", "b": "blocked", "c": "done"}


def test_rows_wait_in_memory_and_are_written_in_one_transaction(tmp_path: Path,
                                                                   monkeypatch) -> None:
    h = history(tmp_path, attempts=10_000)
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    assert not h.due()
    for i in range(500):  # a second of a busy swarm: assigned, started, done each
        for field in ("assigned", "started", "ended"):
            h.attempt("b1", f"j{i}", 1, node="n1", **{field: float(i)})
    assert not h.due() and h.flushes == 0
    clock[0] += FLUSH_S
    assert h.due()
    h.flush()
    assert h.flushes == 1 and not h.due()
    other = sqlite3.connect(tmp_path / "history.db")
    assert other.execute("SELECT count(*) FROM attempts").fetchone()[0] == 500
    for i in range(FLUSH_ROWS):
        h.attempt("b2", f"j{i}", 1, node="n1")
    assert h.due()  # (a burst is written at once, not after FLUSH_S)


def test_the_tables_are_trimmed_to_their_bounds_oldest_first(tmp_path: Path) -> None:
    h = history(tmp_path, attempts=100, builds=10)
    for b in range(30):
        h.build(f"b{b}", name="x", submitter="n1", started=float(b), jobs=10)
        for j in range(10):
            h.attempt(f"b{b}", f"j{j}", 1, node="n1", result="done")
        h.flush()
    assert h.counts() == (100, 10)
    assert h.build_row("b19") is None and h.build_row("b20") is not None
    assert h.attempts("b19") == [] and len(h.attempts("b29")) == 10


def test_a_build_row_counts_its_failed_attempts_at_its_end(tmp_path: Path) -> None:
    h = history(tmp_path)
    h.build("b1", name="hello", submitter="n1", started=1.0, jobs=2)
    h.attempt("b1", "a", 1, node="n1", result="failed")
    h.attempt("b1", "a", 2, node="n2", result="done")
    h.attempt("b1", "b", 1, node="n2", result="done")
    h.build("b1", ended=5.0, done=2, blocked=0, cancelled=0, joules=3.5)
    row = h.build_row("b1")
    assert row is not None
    assert (row["name"], row["jobs"], row["done"], row["failures"], row["joules"]) == (
        "hello", 2, 2, 1, 3.5)


def test_a_history_file_that_cannot_be_written_raises_sqlite_errors_only(
        tmp_path: Path) -> None:
    h = history(tmp_path)
    h.attempt("b1", "a", 1, node="n1")
    h._db.close()
    with pytest.raises(sqlite3.Error):
        h.flush()
