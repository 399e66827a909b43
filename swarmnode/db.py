"""SQLite as the node uses it: one file per concern, owner-only, WAL with synchronous=FULL.

WAL with FULL: a transaction that returned is on disk, which is what lets a node promise an
incarnation, a vote or a log entry before acting on it; readers do not block the writer.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Page cache per connection (KiB; SQLite's default is 2,000). A node keeps four databases
#: open, each of them mostly appended to and read by key or by its newest rows, and the
#: kernel caches the files anyway: at SQLite's default their caches added ~8 MiB of RSS as
#: the files grew past 2 MiB (the soak's steady creep).
CACHE_KIB = 512


def open_db(path: Path, schema: str) -> sqlite3.Connection:
    """Open (creating, mode 0600) the database at `path` with `schema` applied."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)  # members, events, job specs: owner only
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    db.executescript(schema)
    return db


@contextmanager
def transaction(db: sqlite3.Connection, synced: bool = True) -> Iterator[sqlite3.Connection]:
    """All or nothing: committed on leaving the block, rolled back if it raised.

    `synced=False` commits without an fsync (synchronous=NORMAL for this one transaction): it
    survives the process being killed, not the machine losing power, and the next synced
    commit makes it durable too. For writes whose loss only costs redoing work."""
    if not synced:
        db.execute("PRAGMA synchronous=NORMAL")
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    finally:
        if not synced:
            db.execute("PRAGMA synchronous=FULL")
