"""The node's disk: a nearly full one stops it taking jobs, and retention keeps it from filling.

Every `[disk] check_every` the node looks at the free space of the file systems holding its
job directories and its artifact store (`<home>/jobs`, `<home>/artifacts`: usually one). When
either has less free than the threshold (`min_free` bytes or `min_free_percent` of its size,
the larger) the node is *low*: it says so once (event `disk_low`), states the fact `disk_low`
in its signed record so that the leader's scheduler gives it no new work (its running jobs
finish), shows it in `status` and on the dashboard, and collects at once, removing even the
kept job directories (a full disk is worse than a lost failed job's leftovers). It is *ok*
again (event `disk_ok`, the fact dropped) only once every one has RESUME_FACTOR times the
threshold free: free space hovers around the threshold while jobs write and GC frees, and a
node flapping in and out of the schedule would take work it then cannot finish.

The low state is the node's own statement about itself, like its cores, so it is a fact of its
record rather than a ledger entry (an operator's `pause` is the ledger's): only the node can
sign it, and a node that dies with it set is dead for the scheduler anyway.

Every `gc_every` (and on becoming low) the node collects artifacts (artifact_service.collect)
and sweeps its job directories (worker.sweep).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarmnode.promtext import Family, counter, gauge

if TYPE_CHECKING:
    from swarmnode.config import DiskSettings
    from swarmnode.node import Node

log = logging.getLogger(__name__)

#: The record's fact while the node's disk is low (absent otherwise).
FACT = "disk_low"
#: Free space needed to leave the low state, as a multiple of the threshold (see above).
RESUME_FACTOR = 1.25


@dataclass(frozen=True)
class Space:
    """A file system's size and the space free to this process (statvfs f_bavail)."""

    path: str
    free: int
    total: int

    def threshold(self, settings: DiskSettings) -> int:
        return max(settings.min_free, int(self.total * settings.min_free_percent / 100))


def space(path: Path) -> Space:
    st = os.statvfs(path)
    return Space(str(path), st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)


def next_low(low: bool, spaces: list[Space], settings: DiskSettings) -> bool:
    """Whether the node is low after looking at `spaces` (it was `low`): low below a threshold,
    ok again only with RESUME_FACTOR times every threshold free."""
    if low:
        return any(s.free < s.threshold(settings) * RESUME_FACTOR for s in spaces)
    return any(s.free < s.threshold(settings) for s in spaces)


class DiskService:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.low = False
        self.spaces: list[Space] = []
        self.swept = 0  # job directories removed since the start
        self._collect = asyncio.Event()

    @property
    def settings(self) -> DiskSettings:
        return self.node.node_config.disk

    def paths(self) -> list[Path]:
        """The directories whose file systems count (each made if missing)."""
        home = self.node.home
        out = []
        for path in (home / "jobs", home / "artifacts"):
            path.mkdir(parents=True, exist_ok=True)
            out.append(path)
        return out

    def measure(self) -> list[Space]:
        """statvfs of each file system (run in a thread: a hung network file system must not
        stall the node)."""
        return [space(p) for p in self.paths()]

    def apply(self, spaces: list[Space]) -> None:
        """Take a measurement; change state (event, fact, a collection) if it calls for it."""
        self.spaces = spaces
        low = next_low(self.low, spaces, self.settings)
        if low == self.low:
            return
        self.low = low
        worst = min(spaces, key=lambda s: s.free - s.threshold(self.settings))
        self.node.event("disk_low" if low else "disk_ok",
                        {"path": worst.path, "free": worst.free, "total": worst.total,
                         "threshold": worst.threshold(self.settings)})
        self._state()
        if low:
            self._collect.set()

    def _state(self) -> None:
        """Re-sign the record with the fact `disk_low` set (low) or absent."""
        record = self.node.core.record
        facts: dict[str, Any] = {k: v for k, v in record.facts if k != FACT}
        if self.low:
            facts[FACT] = 1
        self.node.core.update_record(self.node.clock(), facts=facts)
        self.node.flush()

    async def run(self) -> None:
        """Look every `check_every`; collect every `gc_every` and on becoming low. A restart
        starts ok: a record restored with the fact set is corrected at once."""
        if dict(self.node.core.record.facts).get(FACT):
            self._state()
        collect = asyncio.ensure_future(self._collector())
        try:
            while True:
                try:
                    self.apply(await asyncio.to_thread(self.measure))
                except OSError as exc:
                    log.warning("cannot measure the free disk space: %s", exc)
                await asyncio.sleep(self.settings.check_every)
        finally:
            collect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collect

    async def _collector(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.gc_every):
                    await self._collect.wait()
            self._collect.clear()
            try:
                await self.node.artifacts.collect()
                self.swept += (await self.node.worker.sweep(everything=self.low)).removed
            except Exception:  # a failing pass must not end the loop (it is tried again)
                log.exception("artifact GC or job-directory sweep failed")

    def status(self) -> dict[str, Any]:
        """`status`'s `disk`: low or not, and each file system's free and total bytes."""
        return {"disk_low": self.low,
                "disk": [{"path": s.path, "free": s.free, "total": s.total,
                          "threshold": s.threshold(self.settings)} for s in self.spaces]}

    def metrics(self) -> Iterator[Family]:
        yield gauge("swarmnode_disk_low",
                                "1 while this node's disk is nearly full (it takes no jobs)",
                                value=int(self.low))
        free = gauge("swarmnode_disk_free_bytes", "Free bytes, by file system",
                                 labels=["path"])
        for s in self.spaces:
            free.add([s.path], s.free)
        yield free
        artifacts = self.node.artifacts
        yield counter("swarmnode_artifacts_gc_removed",
                                  "Artifacts the GC removed since the start",
                                  value=artifacts.gc_removed)
        yield counter("swarmnode_artifacts_gc_freed_bytes",
                                  "Bytes the artifact GC freed since the start",
                                  value=artifacts.gc_freed)
        yield counter("swarmnode_job_dirs_swept",
                                  "Job directories the sweep removed since the start",
                                  value=self.swept)
