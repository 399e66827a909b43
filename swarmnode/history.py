"""The node's on-disk build history, `<home>/history.db`: every attempt of every job and one
row per build, as this node applied the ledger's entries.

The ledger forgets finished builds after a retention (`Forget` entries), so that memory stays
flat under steady work; what `jobs --history`, `build wait` of a forgotten build and the
dashboard show of the past comes from here. Each node writes its own copy from the entries
it applies (the times are its own wall clock at applying), so it needs no messages.

Writes are gathered in memory and written in one transaction per FLUSH_S (or FLUSH_ROWS rows),
without an fsync: a busy swarm's 500 results a second cost two commits a second, not 500
fsyncs. A crash loses at most the last FLUSH_S of rows, and the entries replayed at restart
(those after the ledger's snapshot) write them again: every write is an upsert that keeps what
a row already has (the first time, node and result stay), so replaying changes nothing.

Bounded: the oldest attempts beyond `max_attempts` rows and the oldest builds beyond
`max_builds` rows are deleted at each flush.

An attempt's `result`: done, failed, requeued (its node died or lost it), blocked or cancelled
(the block or cancel voided it while it was held). A job blocked or cancelled while no node
held it (queued, or failed and waiting for its next attempt) gets a row of attempt 0 with that
result and no node: the job's end without an attempt of its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from swarmnode.db import open_db, transaction

DB_FILE = "history.db"
#: Longest rows wait in memory before they are written (one transaction each time).
FLUSH_S = 0.5
#: Rows waiting that make the next flush come at once (a burst's memory stays small).
FLUSH_ROWS = 5000
#: Rows a `history` query answers at most (newest first, then shown oldest first).
MAX_ROWS = 20_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS attempts (
    seq INTEGER PRIMARY KEY,
    build TEXT NOT NULL,
    job TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    node TEXT,
    term INTEGER,
    assigned REAL,
    started REAL,
    ended REAL,
    result TEXT,
    seconds REAL,
    reason TEXT,
    artifacts TEXT,
    UNIQUE (build, job, attempt)
);
CREATE TABLE IF NOT EXISTS builds (
    seq INTEGER PRIMARY KEY,
    build TEXT NOT NULL UNIQUE,
    name TEXT,
    submitter TEXT,
    started REAL,
    ended REAL,
    jobs INTEGER,
    done INTEGER,
    blocked INTEGER,
    cancelled INTEGER,
    failures INTEGER,
    joules REAL
);
"""
_ATTEMPT_COLS = ("build", "job", "attempt", "node", "term", "assigned", "started", "ended",
                 "result", "seconds", "reason", "artifacts")
_BUILD_COLS = ("build", "name", "submitter", "started", "ended", "jobs", "done", "blocked",
               "cancelled", "joules")

Row = dict[str, Any]


def _upsert(table: str, cols: tuple[str, ...], key: tuple[str, ...]) -> str:
    """An insert that, for a row already there, fills only the columns it has empty."""
    keep = ", ".join(f"{c} = coalesce({c}, excluded.{c})" for c in cols if c not in key)
    return (f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
            f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {keep}")


_PUT_ATTEMPT = _upsert("attempts", _ATTEMPT_COLS, ("build", "job", "attempt"))
_PUT_BUILD = _upsert("builds", _BUILD_COLS, ("build",))


def _merge(rows: dict[Any, Row], key: Any, fields: Row) -> None:
    """`fields` into the waiting row `key`, keeping what it has (as the upsert does)."""
    row = rows.setdefault(key, {})
    for name, value in fields.items():
        if value is not None and row.get(name) is None:
            row[name] = value


class History:
    """One node's history file. Record with the methods below; `flush` writes what waits
    (the node calls `due()` each turn of its loop, and `flush` when it is)."""

    def __init__(self, path: Path, max_attempts: int, max_builds: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.max_attempts = max_attempts
        self.max_builds = max_builds
        self.clock = clock
        self._db = open_db(path, _SCHEMA + "CREATE INDEX IF NOT EXISTS attempts_build "
                                            "ON attempts (build);")
        self._attempts: dict[tuple[str, str, int], Row] = {}
        self._builds: dict[str, Row] = {}
        self._ended: set[str] = set()  # builds whose failures to count at the next flush
        self._since = 0.0  # when the oldest waiting row came (0: none waits)
        self.flushes = 0

    def close(self) -> None:
        self.flush()
        self._db.close()

    # ------------------------------------------------------------------ recording

    def attempt(self, build: str, job: str, attempt: int, **fields: Any) -> None:
        """Fill in attempt `attempt` of `build`/`job` (node, term, assigned, started, ended,
        result, seconds, reason, artifacts: a dict of path -> digest)."""
        if "artifacts" in fields and fields["artifacts"] is not None:
            fields["artifacts"] = json.dumps(fields["artifacts"], sort_keys=True)
        self._waiting()
        _merge(self._attempts, (build, job, attempt), fields)

    def build(self, build: str, **fields: Any) -> None:
        """Fill in `build`'s row (name, submitter, started, ended, jobs, done, blocked,
        cancelled, joules); with `ended`, its failed attempts are counted at the flush."""
        self._waiting()
        _merge(self._builds, build, fields)
        if fields.get("ended") is not None:
            self._ended.add(build)

    def _waiting(self) -> None:
        if not self._since:
            self._since = time.monotonic()

    def due(self) -> bool:
        """Whether rows have waited FLUSH_S, or FLUSH_ROWS are waiting."""
        return bool(self._since) and (time.monotonic() - self._since >= FLUSH_S
                                      or len(self._attempts) + len(self._builds) >= FLUSH_ROWS)

    def flush(self) -> None:
        """Write every waiting row in one transaction (no fsync: see the module's note), and
        trim the tables to their bounds. An error is logged by the caller; the rows are lost
        (history is a record, never a reason to stop the node)."""
        attempts, self._attempts = self._attempts, {}
        builds, self._builds = self._builds, {}
        ended, self._ended = self._ended, set()
        self._since = 0.0
        if not attempts and not builds:
            return
        with transaction(self._db, synced=False) as db:
            db.executemany(_PUT_ATTEMPT, [
                (b, j, a, *(row.get(c) for c in _ATTEMPT_COLS[3:]))
                for (b, j, a), row in attempts.items()])
            db.executemany(_PUT_BUILD, [
                (b, *(row.get(c) for c in _BUILD_COLS[1:])) for b, row in builds.items()])
            db.executemany(
                "UPDATE builds SET failures = (SELECT count(*) FROM attempts WHERE "
                "attempts.build = builds.build AND result = 'failed') WHERE build = ?",
                [(b,) for b in ended])
            for table, most in (("attempts", self.max_attempts), ("builds", self.max_builds)):
                db.execute(f"DELETE FROM {table} WHERE seq <= "
                           f"(SELECT max(seq) FROM {table}) - ?", (most,))
        self.flushes += 1

    # ------------------------------------------------------------------ reading

    def attempts(self, build: str | None = None, limit: int = MAX_ROWS) -> list[Row]:
        """Attempts (of `build`, or every build), oldest first: the newest `limit` of them,
        those still waiting to be written included."""
        self.flush()
        where, args = ("WHERE build = ?", [build]) if build is not None else ("", [])
        rows = self._db.execute(
            f"SELECT {', '.join(_ATTEMPT_COLS)} FROM attempts {where} "
            "ORDER BY seq DESC LIMIT ?", [*args, min(max(limit, 0), MAX_ROWS)]).fetchall()
        out = [dict(zip(_ATTEMPT_COLS, r, strict=True)) for r in reversed(rows)]
        for row in out:
            row["artifacts"] = json.loads(row["artifacts"]) if row["artifacts"] else {}
        if build is not None:  # (a build's: by job, then attempt)
            out.sort(key=lambda r: (r["job"], r["attempt"]))
        return out

    def build_row(self, build: str) -> Row | None:
        """`build`'s row, with `failures` (its failed attempts), or None."""
        self.flush()
        cols = (*_BUILD_COLS, "failures")
        row = self._db.execute(f"SELECT {', '.join(cols)} FROM builds "
                               "WHERE build = ?", (build,)).fetchone()
        return dict(zip(cols, row, strict=True)) if row else None

    def builds(self, since: float, limit: int = MAX_ROWS) -> list[Row]:
        """The builds that started at or after `since` (this node's clock), oldest first:
        the newest `limit` of them, each with `failures`."""
        self.flush()
        cols = (*_BUILD_COLS, "failures")
        rows = self._db.execute(
            f"SELECT {', '.join(cols)} FROM builds WHERE started >= ? ORDER BY seq DESC "
            "LIMIT ?", (since, min(max(limit, 0), MAX_ROWS))).fetchall()
        return [dict(zip(cols, r, strict=True)) for r in reversed(rows)]

    def counts(self) -> tuple[int, int]:
        """(attempt rows, build rows) on disk."""
        self.flush()
        one = "SELECT count(*) FROM "
        return (self._db.execute(one + "attempts").fetchone()[0],
                self._db.execute(one + "builds").fetchone()[0])


def job_ends(rows: list[Row]) -> dict[str, Row]:
    """Each job's end from its attempt rows (of one build): its row of attempt 0 when it has
    one (blocked or cancelled with no attempt held), else its highest attempt's."""
    ends: dict[str, Row] = {}
    for row in rows:
        have = ends.get(row["job"])
        if have is None or (have["attempt"] != 0 and (row["attempt"] == 0
                                                       or row["attempt"] > have["attempt"])):
            ends[row["job"]] = row
    return ends
