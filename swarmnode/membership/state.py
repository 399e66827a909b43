"""The member table and the merge rules that decide which news wins.

Liveness news about an admitted member forms a join-semilattice ordered by (incarnation, rank)
with rank alive < suspect < dead < left: an update applies only if it is greater than what we
hold, so every member converges to the same state whatever order the news arrives in. An alive
update therefore needs a strictly higher incarnation (only the member itself can make one: its
record is self-signed), a suspicion or death applies at an equal or higher incarnation, and a
graceful leave beats a death at the same incarnation. Independently of the state, the record
kept is the highest-incarnation record seen. A ban absorbs everything and is permanent.

`MemberTable` stores entries copy-on-write over a shared, immutable `SharedMembers` base, so
ten thousand simulated nodes can start from one converged snapshot and each only pays for the
entries it changed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .messages import Admit, Ban, Record, Rename

ALIVE = "alive"
SUSPECT = "suspect"
DEAD = "dead"
LEFT = "left"
PENDING = "pending"
BANNED = "banned"
LIMBO = "limbo"
"""Internal: admitted but no record yet, or a record whose admission has not arrived yet."""

LIVE = frozenset({ALIVE, SUSPECT})
MEMBER = frozenset({ALIVE, SUSPECT, DEAD, LEFT})
GONE = frozenset({DEAD, LEFT})
RANK = {ALIVE: 0, SUSPECT: 1, DEAD: 2, LEFT: 3}


def supersedes(incarnation: int, state: str, current_incarnation: int, current_state: str) -> bool:
    """Does liveness news (incarnation, state) override what we hold? (the lattice order)"""
    if incarnation != current_incarnation:
        return incarnation > current_incarnation
    return RANK[state] > RANK[current_state]


@dataclass(frozen=True, slots=True)
class Entry:
    """Everything known about one node id. Immutable: updates replace the entry."""

    id: str
    state: str
    incarnation: int
    record: Record | None
    since: float
    admit: Admit | None = None
    ban: Ban | None = None
    rename: Rename | None = None
    how: str = ""

    @property
    def admitted(self) -> bool:
        return self.admit is not None

    @property
    def name(self) -> str:
        if self.rename is not None:
            return self.rename.name
        return self.record.name if self.record is not None else ""


class SharedMembers:
    """An immutable base of entries shared by many tables (the simulator's converged start)."""

    __slots__ = ("counts", "entries", "ids", "index")

    def __init__(self, entries: Iterable[Entry]) -> None:
        self.entries: dict[str, Entry] = {e.id: e for e in entries}
        self.ids: tuple[str, ...] = tuple(self.entries)
        self.index: dict[str, int] = {id_: i for i, id_ in enumerate(self.ids)}
        self.counts: Counter[str] = Counter(e.state for e in self.entries.values())


EMPTY_BASE = SharedMembers(())
_MISSING = object()


class MemberTable:
    """id -> Entry, as a small local overlay (None = deleted) over a shared base.

    Ids also have stable positions (base ids first, then ids added locally in order) so that
    probing and random sampling can address members by index without copying the id list.
    """

    __slots__ = ("_base", "_counts", "_extra", "_extra_index", "_local", "_size")

    def __init__(self, base: SharedMembers | None = None) -> None:
        self._base = base or EMPTY_BASE
        self._local: dict[str, Entry | None] = {}
        self._extra: list[str] = []
        self._extra_index: dict[str, int] = {}
        self._counts: Counter[str] = Counter(self._base.counts)
        self._size = len(self._base.ids)

    def get(self, id_: str) -> Entry | None:
        e = self._local.get(id_, _MISSING)
        if e is _MISSING:
            return self._base.entries.get(id_)
        return e  # type: ignore[return-value]

    def put(self, entry: Entry) -> Entry | None:
        """Store `entry`, returning the one it replaced (None if new)."""
        id_ = entry.id
        old = self.get(id_)
        if old is None:
            self._size += 1
            if id_ not in self._base.index and id_ not in self._extra_index:
                self._extra_index[id_] = len(self._base.ids) + len(self._extra)
                self._extra.append(id_)
        else:
            self._counts[old.state] -= 1
        self._counts[entry.state] += 1
        self._local[id_] = entry
        return old

    def delete(self, id_: str) -> Entry | None:
        old = self.get(id_)
        if old is not None:
            self._counts[old.state] -= 1
            self._size -= 1
            self._local[id_] = None
        return old

    def count(self, state: str) -> int:
        return self._counts[state]

    def __len__(self) -> int:
        return self._size

    def __contains__(self, id_: str) -> bool:
        return self.get(id_) is not None

    def id_space(self) -> int:
        """Number of id positions (including deleted ones)."""
        return len(self._base.ids) + len(self._extra)

    def id_at(self, i: int) -> str:
        nb = len(self._base.ids)
        return self._base.ids[i] if i < nb else self._extra[i - nb]

    def index_of(self, id_: str) -> int:
        i = self._base.index.get(id_)
        return i if i is not None else self._extra_index.get(id_, -1)

    def __iter__(self) -> Iterator[Entry]:
        """Entries in position order."""
        get = self.get
        for id_ in self._base.ids:
            e = get(id_)
            if e is not None:
                yield e
        for id_ in self._extra:
            e = self._local.get(id_)
            if e is not None:
                yield e

    def local_size(self) -> int:
        """Entries held privately by this table (a memory figure for the simulator)."""
        return len(self._local)
