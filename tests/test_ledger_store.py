"""The SQLite log store: what is persisted comes back on reopening, batches are all or nothing,
and a process killed mid-write leaves a state that includes every acknowledged batch."""

from __future__ import annotations

import os
import pickle
import random
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from swarmnode.election import (
    Config,
    Election,
    KeyRing,
    LogEntry,
    Persist,
    Persisted,
    PersistEntries,
    PersistSnapshot,
    Send,
    Snapshot,
)
from swarmnode.ledger.store import LogStore, Stored, StoreError


def e(index: int, term: int, data: bytes = b"") -> LogEntry:
    return LogEntry(index, term, data or f"entry {index}".encode())


def reopen(store: LogStore) -> Stored:
    path = store.path
    store.close()
    again = LogStore(path)
    try:
        return again.load()
    finally:
        again.close()


def test_an_empty_store_is_a_fresh_node(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "ledger.db")
    assert store.load() == Stored(Persisted(), None, ())
    assert stat.S_IMODE(os.stat(tmp_path / "ledger.db").st_mode) == 0o600
    store.close()


def test_term_vote_entries_and_snapshot_come_back(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "ledger.db")
    n = store.persist(
        [
            Persist(3, "node-b"),
            PersistEntries(1, (e(1, 1), e(2, 1), e(3, 3))),
            Send("x", None),  # type: ignore[arg-type]  # not a write: skipped
        ]
    )
    assert n == 2
    assert reopen(store) == Stored(Persisted(3, "node-b"), None, (e(1, 1), e(2, 1), e(3, 3)))


def test_a_write_from_an_index_replaces_the_suffix(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "ledger.db")
    store.persist([PersistEntries(1, (e(1, 1), e(2, 1), e(3, 1), e(4, 1)))])
    store.persist([PersistEntries(3, (e(3, 2, b"new"),))])
    assert reopen(store).entries == (e(1, 1), e(2, 1), e(3, 2, b"new"))
    store = LogStore(tmp_path / "ledger.db")
    store.persist([PersistEntries(2, ())])  # a bare truncation
    assert reopen(store).entries == (e(1, 1),)


def test_a_snapshot_compacts_the_prefix(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "ledger.db")
    store.persist([PersistEntries(1, tuple(e(i, 1) for i in range(1, 6)))])
    snap = Snapshot(3, 1, b"state at 3")
    store.persist([PersistSnapshot(snap, 4)])
    got = reopen(store)
    assert got.snapshot == snap and got.entries == (e(4, 1), e(5, 1)) and got.last_index == 5
    # an installed snapshot that the log contradicts: the core also truncates after it
    store = LogStore(tmp_path / "ledger.db")
    store.persist([PersistSnapshot(Snapshot(9, 2, b"s9"), 10), PersistEntries(10, ())])
    got = reopen(store)
    assert got.snapshot == Snapshot(9, 2, b"s9") and got.entries == ()


def test_a_snapshot_keeps_its_tail_on_disk_until_the_next_one(tmp_path: Path) -> None:
    """The entries from `keep_from` through the snapshot stay stored (a leader's tail for
    followers a little behind) but are not loaded: a restart begins at the snapshot."""
    store = LogStore(tmp_path / "ledger.db")
    store.persist([PersistEntries(1, tuple(e(i, 1) for i in range(1, 8)))])
    store.persist([PersistSnapshot(Snapshot(4, 1, b"s4"), 3)])

    def stored() -> list[int]:
        return [i for (i,) in store._db.execute("SELECT idx FROM raft_log ORDER BY idx")]

    assert stored() == [3, 4, 5, 6, 7]
    assert reopen(store).entries == (e(5, 1), e(6, 1), e(7, 1))
    store = LogStore(tmp_path / "ledger.db")
    store.persist([PersistSnapshot(Snapshot(6, 1, b"s6"), 6)])
    assert stored() == [6, 7]
    store.persist([PersistSnapshot(Snapshot(7, 1, b"s7"), 99)])  # never past the snapshot
    assert stored() == [] and reopen(store).last_index == 7


def test_a_batch_is_all_or_nothing(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "ledger.db")
    store.persist([Persist(1, "a"), PersistEntries(1, (e(1, 1),))])
    with pytest.raises(ValueError):
        store.persist([Persist(2, None), PersistEntries(2, (e(2, 2), e(9, 2)))])  # not contiguous
    assert reopen(store) == Stored(Persisted(1, "a"), None, (e(1, 1),))


def test_a_gap_in_the_stored_log_is_reported(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "ledger.db")
    store.persist([PersistEntries(1, (e(1, 1), e(2, 1), e(3, 1)))])
    store._db.execute("DELETE FROM raft_log WHERE idx = 2")  # damage it behind its back
    with pytest.raises(StoreError):
        store.load()
    store.close()


def test_a_core_restarted_from_the_store_continues_where_it_was(tmp_path: Path) -> None:
    """A lone voter writes everything it outputs; a new core built from what was stored has the
    same term, vote, log after the snapshot, and snapshot point (not the tail kept before it)."""
    store = LogStore(tmp_path / "ledger.db")
    cfg = Config(stall_grace=False)  # (time jumps here: no stalls of its own)
    el = Election("a", {"a"}, cfg, random.Random(1), 0.0, signatures=KeyRing().for_node("a"))
    el.tick(cfg.election_timeout_min)
    for n in range(10):
        el.propose(1.0, f"job {n}".encode())
        if n == 6:
            store.persist(el.drain())
            el.compact(5, b"ledger at 5")
    store.persist(el.drain())
    got = reopen(store)
    again = Election(
        "a",
        {"a"},
        cfg,
        random.Random(2),
        2.0,
        got.persisted,
        log=got.entries,
        snapshot=got.snapshot,
        signatures=KeyRing().for_node("a"),
    )
    assert (again.term, again.voted_for) == (el.term, el.voted_for) == (1, "a")
    assert el.log.base_index == 0 and list(again.log) == [x for x in el.log if x.index > 5]
    assert again.log.base_index == 5 and again.snapshot == Snapshot(5, 1, b"ledger at 5")


# ---------------------------------------------------------------------------------------------
# Crash consistency: kill -9 a writer at a random moment


_WRITER = r"""
import pickle, sys
from pathlib import Path
from swarmnode.ledger.store import LogStore

store = LogStore(Path(sys.argv[1]))
for k, batch in enumerate(pickle.loads(Path(sys.argv[2]).read_bytes())):
    store.persist(batch)
    print(k, flush=True)  # acknowledged: this batch returned, so it is on disk
"""


def _batches(seed: int, n: int) -> list[list[object]]:
    """Random batches as a core would emit them: term changes, appends, truncations,
    compactions."""
    rng = random.Random(seed)
    last, term, snap = 0, 1, 0
    out: list[list[object]] = []
    for _ in range(n):
        batch: list[object] = []
        if rng.random() < 0.2:
            term += 1
            batch.append(Persist(term, rng.choice([None, "a", "b"])))
        start = last + 1
        if rng.random() < 0.2 and last > snap + 1:
            start = rng.randint(snap + 1, last)  # a conflict: rewrite from there
        count = rng.randint(0, 20)
        entries = tuple(
            LogEntry(start + i, term, rng.randbytes(rng.randint(1, 300))) for i in range(count)
        )
        batch.append(PersistEntries(start, entries))
        last = start + count - 1
        if rng.random() < 0.1 and last > snap:
            snap = rng.randint(snap + 1, last)
            keep_from = rng.randint(max(1, snap - 20), snap + 1)  # a tail, or none
            batch.append(PersistSnapshot(Snapshot(snap, term, rng.randbytes(64)), keep_from))
        out.append(batch)
    return out


def _expected(batches: list[list[object]]) -> Stored:
    """What a store holds after these batches (a model of the schema's semantics)."""
    hard, snap, log = Persisted(), None, {}
    for batch in batches:
        for o in batch:
            if isinstance(o, Persist):
                hard = Persisted(o.term, o.voted_for)
            elif isinstance(o, PersistEntries):
                log = {i: x for i, x in log.items() if i < o.start}
                log.update({x.index: x for x in o.entries})
            elif isinstance(o, PersistSnapshot):
                snap = o.snapshot
                log = {i: x for i, x in log.items() if i > snap.index}
    return Stored(hard, snap, tuple(log[i] for i in sorted(log)))


@pytest.mark.parametrize("seed", range(6))
def test_kill_9_mid_write_keeps_every_acknowledged_batch(tmp_path: Path, seed: int) -> None:
    batches = _batches(seed, 400)
    (tmp_path / "batches").write_bytes(pickle.dumps(batches))
    path = tmp_path / "ledger.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), str(tmp_path / "batches")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout is not None
    kill_after = random.Random(seed).randint(5, 300)
    acked = -1
    for line in proc.stdout:
        acked = int(line)
        if acked >= kill_after:
            break
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-stream, not finished
    store = LogStore(path)
    got = store.load()
    store.close()
    # everything acknowledged is there; at most the batch in flight (and perhaps a few more
    # written before the signal landed) on top of it, never half a batch
    candidates = [_expected(batches[: k + 1]) for k in range(acked, len(batches))]
    assert got in candidates
