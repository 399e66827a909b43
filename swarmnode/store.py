"""Durable node state in SQLite: cluster settings, the membership snapshot, the event log.

SQLite in WAL mode with synchronous=FULL: every write that returns is on disk, so an
incarnation number persisted before a refutation goes out can never go backwards after a
crash, and a restarted node finds the members it knew. Three exceptions: the report outbox
(`outbox_write`), written once per turn of a busy worker: losing its last writes to a power cut
only means running those jobs again; the event log, which no decision is read from; and the
membership snapshot the node writes every few seconds while gossip changes it (`Node`), which
anti-entropy restores.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import msgpack

from swarmnode.db import open_db, transaction

DB_FILE = "state.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL
);
"""

#: Events kept in the log; older ones are trimmed so the file cannot grow without bound.
MAX_EVENTS = 10_000


class Store:
    """One node's durable state, in `<home>/state.db`."""

    def __init__(self, home: Path) -> None:
        self.path = home / DB_FILE
        self._db = open_db(self.path, _SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _tx(self, synced: bool = True) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self._db, synced)

    def get(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            return default
        return msgpack.unpackb(row[0], raw=False, strict_map_key=False)

    def put(self, synced: bool = True, **values: Any) -> None:
        """Set several keys in one transaction (all or none reach the disk); `synced=False`
        without an fsync (`db.transaction` says what survives then)."""
        with self._tx(synced) as db:
            for key, value in values.items():
                db.execute(
                    "INSERT INTO meta(key, value) VALUES(?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, msgpack.packb(value, use_bin_type=True)),
                )

    def outbox_write(self, puts: list[tuple[str, Any]], deletes: list[str]) -> None:
        """Keep messages until deleted, in one transaction: a worker's reports wait here for the
        leader's acknowledgement, across restarts. Not fsynced: a crash of the node keeps
        them; a power cut may lose the last ones, and the leader then requeues those jobs
        (`job.held`), so the cost is running them again, never a wrong result."""
        with self._tx(synced=False) as db:
            db.executemany("INSERT OR REPLACE INTO outbox (key, value) VALUES (?, ?)",
                           [(key, msgpack.packb(value)) for key, value in puts])
            db.executemany("DELETE FROM outbox WHERE key = ?", [(key,) for key in deletes])

    def outbox(self) -> list[Any]:
        rows = self._db.execute("SELECT value FROM outbox ORDER BY key").fetchall()
        return [msgpack.unpackb(r[0], raw=False) for r in rows]

    def add_event(self, kind: str, data: dict[str, Any], ts: float | None = None) -> int:
        """Append an event, not fsynced (see `db.transaction`): the log tells what happened,
        and no decision is read back from it (bans, incarnations and votes have their own
        rows), so a power cut costs only its last lines, while an fsync per event on the
        event loop held a busy leader up for tens of milliseconds at a time."""
        with self._tx(synced=False) as db:
            cur = db.execute(
                "INSERT INTO events(ts, kind, data) VALUES(?, ?, ?)",
                (time.time() if ts is None else ts, kind, json.dumps(data, default=str)),
            )
            seq = int(cur.lastrowid or 0)
            if seq % 100 == 0:
                db.execute("DELETE FROM events WHERE seq <= ?", (seq - MAX_EVENTS,))
        return seq

    def events(self, after: int = 0, limit: int = 200) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT seq, ts, kind, data FROM events WHERE seq > ? ORDER BY seq DESC LIMIT ?",
            (after, limit),
        ).fetchall()
        return [
            {"seq": s, "ts": ts, "kind": k, **json.loads(d)} for s, ts, k, d in reversed(rows)
        ]
