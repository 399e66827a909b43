"""The replicated log in memory: entries after a base point, and the entry codec.

Index 0 with term 0 is the empty log's "previous entry", so every log starts at a base point
(index 0 for a log that was never compacted). The base is at or before the snapshot's index: a
compaction keeps a tail of entries its snapshot already covers, for followers a little behind.
Entries are opaque bytes to the consensus core; the empty entry is reserved for the no-op a
leader appends when elected (see `Election`), so a state machine must treat `b""` as "nothing
to do".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

MAX_ENTRY = 896 * 1024
"""Largest entry, in bytes: an AppendEntries carrying one must still fit its 960 KiB body (the
1 MiB wire frame less the envelope). A build's graph is one entry: about 6,000 jobs."""
NOOP = b""


class EntryError(ValueError):
    """Bytes that are not one msgpack object within the entry limits."""


@dataclass(frozen=True, slots=True)
class LogEntry:
    index: int
    term: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state machine as of `index` (whose entry had `term`): replaces the log through it."""

    index: int
    term: int
    data: bytes


def encode_entry(obj: Any) -> bytes:
    """A plain (msgpack-able) object as entry bytes; the same object always gives the same bytes
    only if its maps are built in the same order, which is why entries are built by one node
    (the proposer) and replicated as bytes, never re-encoded."""
    data = msgpack.packb(obj, use_bin_type=True)
    if not data or len(data) > MAX_ENTRY:
        raise EntryError(f"entry of {len(data)} bytes exceeds MAX_ENTRY")
    return data


def decode_entry(data: bytes) -> Any:
    """One msgpack object from entry bytes; raises EntryError (only) for anything else."""
    if len(data) > MAX_ENTRY:
        raise EntryError("entry exceeds MAX_ENTRY")
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, max_bin_len=MAX_ENTRY, max_ext_len=0
        )
    except Exception as exc:  # msgpack raises many types for hostile input; all mean malformed.
        raise EntryError(f"malformed entry ({type(exc).__name__})") from None


class Log:
    """Entries (base_index, last_index], contiguous; the terms of the base point and of every
    entry are known, the entries before the base point are gone (a snapshot holds them)."""

    __slots__ = ("_entries", "_size", "base_index", "base_term")

    def __init__(
        self, base_index: int = 0, base_term: int = 0, entries: Iterable[LogEntry] = ()
    ) -> None:
        self.base_index = base_index
        self.base_term = base_term
        self._entries: list[LogEntry] = []
        self._size = 0
        for e in entries:
            if e.index <= base_index:
                continue  # stored entries the snapshot covers (its tail, or a crash mid-compaction)
            self.append(e)

    @property
    def last_index(self) -> int:
        return self._entries[-1].index if self._entries else self.base_index

    @property
    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else self.base_term

    @property
    def size(self) -> int:
        """Bytes of entry data held (what compaction would free)."""
        return self._size

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[LogEntry]:
        return iter(self._entries)

    def term_at(self, index: int) -> int | None:
        """The term of entry `index`, or None when it is past the end or before the base."""
        if index == self.base_index:
            return self.base_term
        if self.base_index < index <= self.last_index:
            return self._entries[index - self.base_index - 1].term
        return None

    def entry(self, index: int) -> LogEntry:
        if not self.base_index < index <= self.last_index:
            raise IndexError(f"entry {index} is not in the log")
        return self._entries[index - self.base_index - 1]

    def entries_from(
        self, index: int, max_bytes: float = math.inf, max_count: float = math.inf
    ) -> tuple[LogEntry, ...]:
        """Entries from `index` on, at most `max_bytes` of data and `max_count` entries, but at
        least one if there is any."""
        out: list[LogEntry] = []
        size = 0
        start = max(index, self.base_index + 1) - self.base_index - 1
        for i in range(start, len(self._entries)):
            e = self._entries[i]
            size += len(e.data)
            if out and (size > max_bytes or len(out) >= max_count):
                break
            out.append(e)
        return tuple(out)

    def first_index_of_term(self, index: int) -> int:
        """The first index of the run of entries sharing entry `index`'s term (not before the
        base point): a follower's hint that lets the leader skip a whole stale term."""
        term = self.term_at(index)
        while index - 1 > self.base_index and self.term_at(index - 1) == term:
            index -= 1
        return index

    def append(self, e: LogEntry) -> None:
        if e.index != self.last_index + 1:
            raise ValueError(f"entry {e.index} does not follow {self.last_index}")
        self._entries.append(e)
        self._size += len(e.data)

    def truncate_from(self, index: int) -> None:
        """Drop entries `index` and later (a conflict with the leader's log)."""
        if index <= self.base_index:
            raise ValueError("cannot truncate before the base")
        cut = index - self.base_index - 1
        self._size -= sum(len(e.data) for e in self._entries[cut:])
        del self._entries[cut:]

    def compact(self, index: int, term: int) -> None:
        """Make (index, term) the base point, for an installed snapshot. Entries after it stay if
        the log holds `index` with `term`; otherwise the whole log is replaced (a snapshot that
        our log contradicts or does not reach)."""
        if index <= self.base_index:
            return
        if self.term_at(index) == term:
            self.trim(index)
            return
        self._drop_through(self.last_index)
        self.base_index = index
        self.base_term = term

    def trim(self, index: int) -> None:
        """Drop the entries through `index`, which the log holds: it becomes the base point."""
        term = self.term_at(index)
        if term is None:
            raise IndexError(f"entry {index} is not in the log")
        self._drop_through(index)
        self.base_index = index
        self.base_term = term

    def tail_start(self, index: int, max_count: int, max_bytes: int) -> int:
        """The base that keeps, of the entries through `index`, the last `max_count` at most and
        no more than `max_bytes` of their data: the tail kept after a compaction at `index`."""
        base, size = index, 0
        while base > self.base_index and index - base < max_count:
            size += len(self.entry(base).data)
            if size > max_bytes:
                break
            base -= 1
        return base

    def _drop_through(self, index: int) -> None:
        cut = index - self.base_index
        self._size -= sum(len(e.data) for e in self._entries[:cut])
        del self._entries[:cut]
