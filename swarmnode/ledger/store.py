"""The Raft core's durable state in SQLite: term and vote, log entries, the latest snapshot.

The core hands every change to the shell as an output (`Persist`, `PersistEntries`,
`PersistSnapshot`) that must be on disk before the shell acts on any output drained after it.
`persist` writes all of them from one drain in a single transaction, so a crash leaves either
all of a batch or none of it, and the shell pays one fsync per batch rather than per entry.
WAL mode with synchronous=FULL: a transaction that returned is on disk.

`load` gives back exactly what was persisted, in the form the `Election` constructor takes, plus
the snapshot from which the shell restores its state machine (the ledger) before replaying.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import msgpack

from swarmnode.db import open_db, transaction
from swarmnode.election.core import Persist, Persisted, PersistEntries, PersistSnapshot
from swarmnode.election.log import LogEntry, Snapshot
from swarmnode.election.messages import MessageError

DB_FILE = "ledger.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS raft_state (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS raft_log (
    idx INTEGER PRIMARY KEY,
    term INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS raft_snapshot (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    idx INTEGER NOT NULL,
    term INTEGER NOT NULL,
    data BLOB NOT NULL
);
"""


class StoreError(RuntimeError):
    """The stored state is inconsistent (a gap in the log, an unreadable hard state)."""


@dataclass(frozen=True, slots=True)
class Stored:
    """Everything a restart gets back."""

    persisted: Persisted
    snapshot: Snapshot | None
    entries: tuple[LogEntry, ...]

    @property
    def last_index(self) -> int:
        if self.entries:
            return self.entries[-1].index
        return self.snapshot.index if self.snapshot else 0


class LogStore:
    """One node's Raft state in the SQLite file `path` (created 0600 if missing)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = open_db(path, _SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self._db)

    # ------------------------------------------------------------------ writing

    def persist(self, outputs: Iterable[object]) -> int:
        """Write every Persist, PersistEntries and PersistSnapshot among `outputs` (others are
        skipped), in order, in one transaction; returns how many were written. Call it with a
        whole drain before carrying out that drain's sends and applies."""
        writes = [o for o in outputs if isinstance(o, Persist | PersistEntries | PersistSnapshot)]
        if not writes:
            return 0
        with self._tx() as db:
            for o in writes:
                if isinstance(o, Persist):
                    self._put_hard(db, Persisted(o.term, o.voted_for, o.leader))
                elif isinstance(o, PersistEntries):
                    self._put_entries(db, o.start, o.entries)
                else:
                    self._put_snapshot(db, o.snapshot, o.keep_from)
        return len(writes)

    @staticmethod
    def _put_hard(db: sqlite3.Connection, hard: Persisted) -> None:
        db.execute(
            "INSERT INTO raft_state(key, value) VALUES('hard', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (msgpack.packb(hard.to_plain()),),
        )

    @staticmethod
    def _put_entries(db: sqlite3.Connection, start: int, entries: Iterable[LogEntry]) -> None:
        """Entries from `start` on become `entries`: the conflicting suffix goes first."""
        db.execute("DELETE FROM raft_log WHERE idx >= ?", (start,))
        rows = []
        for offset, e in enumerate(entries):
            if e.index != start + offset:
                raise ValueError(f"entry {e.index} is not at {start + offset}")
            rows.append((e.index, e.term, e.data))
        db.executemany("INSERT INTO raft_log(idx, term, data) VALUES(?, ?, ?)", rows)

    @staticmethod
    def _put_snapshot(db: sqlite3.Connection, snap: Snapshot, keep_from: int) -> None:
        """The snapshot replaces the log before `keep_from`; the entries from it through the
        snapshot's index stay (the tail kept for followers a little behind), unread by `load`."""
        db.execute(
            "INSERT INTO raft_snapshot(id, idx, term, data) VALUES(1, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET idx = excluded.idx, term = excluded.term, "
            "data = excluded.data",
            (snap.index, snap.term, snap.data),
        )
        db.execute("DELETE FROM raft_log WHERE idx < ?", (min(keep_from, snap.index + 1),))

    # ------------------------------------------------------------------ reading

    def load(self) -> Stored:
        """What was persisted; raises StoreError if it is not a consistent log."""
        row = self._db.execute("SELECT value FROM raft_state WHERE key = 'hard'").fetchone()
        try:
            hard = Persisted.from_plain(msgpack.unpackb(row[0])) if row else Persisted()
        except (MessageError, ValueError) as exc:
            raise StoreError(f"hard state: {exc}") from None
        srow = self._db.execute("SELECT idx, term, data FROM raft_snapshot WHERE id = 1").fetchone()
        snap = Snapshot(srow[0], srow[1], bytes(srow[2])) if srow else None
        after = snap.index if snap else 0
        rows = self._db.execute(
            "SELECT idx, term, data FROM raft_log WHERE idx > ? ORDER BY idx", (after,)
        ).fetchall()
        entries = tuple(LogEntry(i, t, bytes(d)) for i, t, d in rows)
        for expect, e in enumerate(entries, start=after + 1):
            if e.index != expect:
                raise StoreError(f"log gap: entry {e.index} where {expect} was expected")
        return Stored(hard, snap, entries)
