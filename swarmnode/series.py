"""The swarm's recent past as time series, kept by every node in `<home>/series.db`.

What an operator asks of a week rather than a second -- what did the swarm draw, how busy were
its cores, how many jobs ran -- needs points kept over time. Every node samples what it already
holds (members' stated draw and energy from their power notes, cores from the membership, jobs
from the ledger it applies) every FINE_S and keeps:

- the swarm: draw (W), energy in the interval (J), cores online and busy, job attempts
  started (handed to a node), finished and failed in the interval, and the queue (jobs ready
  to run), every FINE_S for FINE_KEEP_S, rolled up into COARSE_S points (averages; sums for
  energy and job counts) kept for COARSE_KEEP_S;
- each member: its load and draw, every NODE_FINE_S for FINE_KEEP_S and every NODE_COARSE_S
  for COARSE_KEEP_S, at most MAX_NODES members a point.

Energy comes from the members' stated energy today (`joules_today` in their power notes), as
the increase since the last sample, so the series' energy over a day is the swarm's kWh today
as the dashboard shows it. Each node keeps its own copy: no messages, and any node answers
`swarmnode history`. Writes are not fsynced (a crash loses the last points, nothing decided).

`Recorder` is the pure part (counts ledger events, turns a view of the swarm into points);
`SeriesStore` owns the SQLite file; `SeriesService` samples on time.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from swarmnode.db import open_db, transaction

log = logging.getLogger(__name__)

DB_FILE = "series.db"
#: Resolution of the swarm's fine series: a point every 10 s shows a build's shape.
FINE_S = 10
#: A day of fine points (8,640 rows).
FINE_KEEP_S = 24 * 3600
#: Resolution of the long series: 5 minutes over 90 days is 25,920 rows.
COARSE_S = 300
#: How long the long series reaches back: a quarter, for the electricity bill.
COARSE_KEEP_S = 90 * 24 * 3600
#: Each member's load and draw: a minute for a day, half an hour for 90 days (a member costs
#: 1,440 + 4,320 rows).
NODE_FINE_S = 60
NODE_COARSE_S = 1800
#: Members sampled per point at most (by id): a swarm's table of members is bounded, and so is
#: what any one sample writes.
MAX_NODES = 256
#: Points a `history` answer holds at most: a day of fine points, 90 days of coarse ones.
MAX_POINTS = 26_000

_COLS = ("watts", "joules", "cores_online", "cores_busy", "started", "finished", "failed",
         "queue")
_SCHEMA = "\n".join(
    f"CREATE TABLE IF NOT EXISTS {table} (ts INTEGER PRIMARY KEY, watts REAL, joules REAL, "
    "cores_online REAL, cores_busy REAL, started INTEGER, finished INTEGER, failed INTEGER, "
    "queue REAL);" for table in ("swarm_fine", "swarm_coarse")) + "\n" + "\n".join(
    f"CREATE TABLE IF NOT EXISTS {table} (ts INTEGER NOT NULL, node TEXT NOT NULL, "
    "load REAL, watts REAL, PRIMARY KEY (ts, node));" for table in ("node_fine", "node_coarse"))
#: A coarse point from the fine ones of its window: averages, and sums of what is counted.
_ROLLUP = ("INSERT OR REPLACE INTO swarm_coarse SELECT (ts / :step) * :step, avg(watts), "
           "sum(joules), avg(cores_online), avg(cores_busy), sum(started), sum(finished), "
           "sum(failed), avg(queue) FROM swarm_fine WHERE ts >= :start AND ts < :end "
           "GROUP BY ts / :step")
_NODE_ROLLUP = ("INSERT OR REPLACE INTO node_coarse SELECT (ts / :step) * :step, node, "
                "avg(load), avg(watts) FROM node_fine WHERE ts >= :start AND ts < :end "
                "GROUP BY ts / :step, node")


@dataclass(frozen=True, slots=True)
class Member:
    """One member as its latest power note states it."""

    load: float | None
    watts: float
    day: str  # the day its energy counts from (its local date)
    joules_today: float


@dataclass(frozen=True, slots=True)
class SwarmView:
    """What a node holds of the swarm at one moment."""

    members: dict[str, Member]
    cores_online: int
    cores_busy: int
    queue: int


@dataclass(frozen=True, slots=True)
class Point:
    ts: int
    watts: float
    joules: float
    cores_online: int
    cores_busy: int
    started: int
    finished: int
    failed: int
    queue: int


@dataclass
class Recorder:
    """Counts the ledger's job events between samples and makes each sample's points."""

    started: int = 0
    finished: int = 0
    failed: int = 0
    _energy: dict[str, tuple[str, float]] = field(default_factory=dict)  # member -> day, J
    nodes_dropped: int = 0
    """Members left out of node points beyond MAX_NODES (a count, for status)."""

    def on_ledger(self, kind: str) -> None:
        """A ledger event this node applied: an attempt handed to a node (`assigned`: the
        attempts begun, whether or not their worker reported them running before they
        ended), `done` or `failed`."""
        if kind == "assigned":
            self.started += 1
        elif kind == "done":
            self.finished += 1
        elif kind == "failed":
            self.failed += 1

    def sample(self, ts: int, view: SwarmView) -> Point:
        """The swarm's point at `ts`; the job counts start again from zero. A member's energy
        counts from its second sample on, and only as it rises (a new day, or a restarted
        member's count starting again, adds nothing, never takes away)."""
        joules = 0.0
        seen: dict[str, tuple[str, float]] = {}
        for member, m in view.members.items():
            before = self._energy.get(member)
            if before is not None and before[0] == m.day:
                joules += max(m.joules_today - before[1], 0.0)
            seen[member] = (m.day, m.joules_today)
        self._energy = seen
        point = Point(ts, round(sum(m.watts for m in view.members.values()), 1),
                      round(joules, 1), view.cores_online, view.cores_busy, self.started,
                      self.finished, self.failed, view.queue)
        self.started = self.finished = self.failed = 0
        return point

    def node_rows(self, ts: int, view: SwarmView) -> list[tuple[int, str, float | None, float]]:
        """Each member's load and draw at `ts`, at most MAX_NODES of them (by id)."""
        members = sorted(view.members.items())
        self.nodes_dropped += max(len(members) - MAX_NODES, 0)
        return [(ts, member, m.load, m.watts) for member, m in members[:MAX_NODES]]


class SeriesStore:
    """The series in SQLite: written a point at a time, rolled up and pruned as time passes."""

    def __init__(self, path: Path) -> None:
        self._db = open_db(path, _SCHEMA)

    def close(self) -> None:
        self._db.close()

    def add(self, point: Point, nodes: list[tuple[int, str, float | None, float]]) -> None:
        """Write one point (and member rows, if any), then roll up every coarse window that
        ended and drop what is older than its retention. No fsync: see the module's doc."""
        values = tuple(asdict(point).values())
        with transaction(self._db, synced=False) as db:
            db.execute(f"INSERT OR REPLACE INTO swarm_fine VALUES ({', '.join('?' * 9)})",
                       values)
            db.executemany("INSERT OR REPLACE INTO node_fine VALUES (?, ?, ?, ?)", nodes)
            self._roll(db, point.ts)

    @staticmethod
    def _roll(db: sqlite3.Connection, now: int) -> None:
        for table, fine, sql, step in (("swarm_coarse", "swarm_fine", _ROLLUP, COARSE_S),
                                       ("node_coarse", "node_fine", _NODE_ROLLUP,
                                        NODE_COARSE_S)):
            last = db.execute(f"SELECT max(ts) FROM {table}").fetchone()[0]
            start = last if last is not None else db.execute(
                f"SELECT min(ts) FROM {fine}").fetchone()[0]
            end = now // step * step  # windows before the current one are complete
            if start is not None and start < end:  # (the last one again: it may have grown)
                db.execute(sql, {"step": step, "start": start, "end": end})
            db.execute(f"DELETE FROM {fine} WHERE ts < ?", (now - FINE_KEEP_S,))
            db.execute(f"DELETE FROM {table} WHERE ts < ?", (now - COARSE_KEEP_S,))

    def query(self, since: float, now: float) -> dict[str, Any]:
        """The points from `since` on: fine ones when they reach back that far, else coarse;
        with each member's load and draw at its matching resolution."""
        fine = now - since <= FINE_KEEP_S
        swarm, nodes = ("swarm_fine", "node_fine") if fine else ("swarm_coarse", "node_coarse")
        rows = self._db.execute(
            f"SELECT ts, {', '.join(_COLS)} FROM {swarm} WHERE ts >= ? ORDER BY ts DESC "
            "LIMIT ?", (since, MAX_POINTS)).fetchall()
        per_node: dict[str, list[list[float | None]]] = {}
        for ts, node, load, watts in self._db.execute(
                f"SELECT ts, node, load, watts FROM {nodes} WHERE ts >= ? ORDER BY ts",
                (max(since, rows[-1][0] if rows else since),)):
            per_node.setdefault(node, []).append([ts, load, watts])
        return {"resolution_s": FINE_S if fine else COARSE_S,
                "node_resolution_s": NODE_FINE_S if fine else NODE_COARSE_S,
                "columns": ["ts", *_COLS],
                "points": [list(r) for r in reversed(rows)], "nodes": per_node}


def rebucket(columns: list[str], points: list[list[Any]], step: int) -> list[dict[str, Any]]:
    """Points (rows of `columns`, `ts` first) merged into buckets of `step` seconds, as the
    coarse series is made: draw, cores and queue averaged, energy and job counts summed."""
    summed = {"joules", "started", "finished", "failed"}
    buckets: dict[int, list[dict[str, Any]]] = {}
    for row in points:
        point = dict(zip(columns, row, strict=True))
        buckets.setdefault(int(point["ts"]) // step * step, []).append(point)
    out = []
    for ts, group in sorted(buckets.items()):
        merged: dict[str, Any] = {"ts": ts}
        for col in columns[1:]:
            values = [p[col] for p in group if p[col] is not None]
            total = sum(values)
            merged[col] = total if col in summed else (total / len(values) if values else None)
        out.append(merged)
    return out


def progress(ends: list[float], start: float, end: float, points: int = 20) -> list[int]:
    """A build's sparkline: how many of its jobs were done at each of `points` even steps
    from `start` to `end`, given when each finished job ended."""
    span = max(end - start, 1e-9)
    ends = sorted(ends)
    out, i = [], 0
    for k in range(1, points + 1):
        at = start + span * k / points
        while i < len(ends) and ends[i] <= at:
            i += 1
        out.append(i)
    return out


class SeriesService:
    """Samples the swarm every FINE_S (each member every NODE_FINE_S) into the store.

    `view` reads the swarm as the node holds it; `now` is the wall clock (points carry dates
    people read)."""

    def __init__(self, store: SeriesStore, view: Callable[[], SwarmView],
                 now: Callable[[], float]) -> None:
        self.store, self.view, self.now = store, view, now
        self.recorder = Recorder()
        self.failures = 0

    def sample(self) -> Point:
        """Take and write one point now (also what `run` does every FINE_S)."""
        ts = int(self.now())
        view = self.view()
        point = self.recorder.sample(ts // FINE_S * FINE_S, view)
        nodes = (self.recorder.node_rows(ts // NODE_FINE_S * NODE_FINE_S, view)
                 if ts % NODE_FINE_S < FINE_S else [])
        try:
            self.store.add(point, nodes)
        except sqlite3.Error as exc:  # a full disk: the node runs on, the gap shows
            self.failures += 1
            log.warning("cannot write the time series: %s", exc)
        return point

    async def run(self) -> None:
        while True:
            await asyncio.sleep(FINE_S - self.now() % FINE_S)  # on the 10-second marks
            self.sample()
