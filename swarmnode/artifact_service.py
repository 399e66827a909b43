"""Artifacts between nodes: serve what this node stores, fetch what it needs, over ZeroMQ.

The protocol is the sans-I/O core in swarmnode/artifacts/transfer.py (chunked pull, per-source
credit windows, per-chunk and whole-file verification, failover between sources); the store is
swarmnode/artifacts/store.py under `<home>/artifacts`. This shell answers admitted members'
requests (disk reads in a worker thread, so a large chunk never stalls gossip) and runs one
Receiver per artifact being fetched, with concurrent requests for the same digest sharing it.

Garbage collection (`collect`, every `[disk] gc_every` from swarmnode/disk.py, in a thread):
what an unfinished build needs (its jobs' specs and outputs, as the replicated ledger names
them; its inputs are pinned by its submitter) is always kept, and so are the objects pinned
by anyone (a build's submitter, the binhost, a push, a job running here: `run.` owners). A
finished build's outputs are kept while it is among the last `artifacts_keep_builds` finished
or finished less than `artifacts_keep_hours` ago; past that its submitter's pins are released.
Over `artifacts_max_bytes`, finished builds' pins are released and unpinned objects go oldest
first until the store is under the cap. Nothing younger than `artifacts_min_age` is deleted
(a transfer in flight); a pass deletes at most GC_MAX_REMOVE objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from net.transport import Inbound
from swarmnode.artifacts import (
    MESSAGE_TYPES,
    REQUEST_TYPES,
    ArtifactStore,
    Digest,
    Done,
    Failed,
    GcResult,
    Receiver,
    Send,
    Sender,
    TransferError,
    Verify,
    Write,
    check_digest,
    digest_bytes,
    pack,
    unpack,
)
from swarmnode.tasks import TaskSet

if TYPE_CHECKING:
    from swarmnode.config import DiskSettings
    from swarmnode.ledger import JobLedger
    from swarmnode.node import Node

log = logging.getLogger(__name__)

#: How often a running fetch is ticked (its request timeouts are 10 s; a tenth of that is
#: prompt enough to retry a lost chunk elsewhere).
TICK_S = 1.0
#: Objects one GC pass deletes at most: it holds the store's lock (puts and pins wait), so a
#: pass stays short; the next one takes the rest.
GC_MAX_REMOVE = 10_000
#: A pin owner that looks like a build id the ledger does not know (compacted out of it, or a
#: submission that never committed) is released this long after its last pin: a submission
#: commits within seconds.
UNKNOWN_OWNER_S = 3600.0
#: Pin owners of this node's job runs (`run.<hash>`): released when the job ends, and at start.
RUN_OWNER = "run."
_BUILD_ID = re.compile(r".+-\d{6}-[0-9a-f]{6}")  # as builds.submit_plan names them


@dataclass(frozen=True)
class GcPlan:
    """What a GC pass keeps and which pins it releases (`plan_gc`)."""

    needed: frozenset[Digest]  # by unfinished builds: kept whatever the size
    retained: frozenset[Digest]  # by finished builds within the retention: kept under the cap
    release: tuple[str, ...]  # owners: finished builds past the retention
    finished: tuple[str, ...]  # owners: finished builds within it (released over the cap)


def _digests(ledger: JobLedger, build_id: str) -> Iterable[Digest]:
    for job in ledger.jobs(build_id):
        yield job.spec.spec_hash
        yield from (digest for _path, digest in job.artifacts)


def plan_gc(ledger: JobLedger, owners: Mapping[str, float], finished_at: Mapping[str, float],
            settings: DiskSettings, now: float) -> GcPlan:
    """The keep sets and the pins to release, from the replicated ledger (`finished_at`: when
    this node first saw each finished build finished; `owners`: pin owners and when each last
    pinned)."""
    needed: set[Digest] = set()
    retained: set[Digest] = set()
    kept_builds: set[str] = set()
    rank = 0
    for build in reversed(ledger.builds()):  # newest first
        if not ledger.finished(build.build_id):
            needed.update(_digests(ledger, build.build_id))
            kept_builds.add(build.build_id)
            continue
        if (rank < settings.artifacts_keep_builds
                or now - finished_at.get(build.build_id, now)
                < settings.artifacts_keep_hours * 3600):
            retained.update(_digests(ledger, build.build_id))
            kept_builds.add(build.build_id)
        rank += 1
    release, finished = [], []
    for owner, pinned in owners.items():
        build = ledger.build(owner)
        if owner in kept_builds:
            if build is not None and ledger.finished(owner):
                finished.append(owner)
        elif build is not None or (_BUILD_ID.fullmatch(owner)
                                   and now - pinned > UNKNOWN_OWNER_S):
            release.append(owner)
    return GcPlan(frozenset(needed), frozenset(retained), tuple(release), tuple(finished))


@dataclass(frozen=True)
class GcReport:
    removed: int
    freed: int
    total: int  # bytes left in the store
    released: int  # pin owners released


class ArtifactError(RuntimeError):
    """A fetch failed: every source was dropped (the message says why, per source)."""


class _Fetch:
    def __init__(self, service: ArtifactService, digest: Digest, sources: Sequence[str]) -> None:
        node = service.node
        self.service = service
        self.rx = Receiver(digest, list(sources), node.clock())
        self.incoming = service.store.incoming(digest)
        self.wake = asyncio.Event()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def run(self) -> None:
        node = self.service.node
        try:
            while not self.done.done():
                self.wake.clear()  # before carrying out: a message arriving meanwhile re-wakes
                await self._carry_out()
                if self.done.done():
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TICK_S):
                        await self.wake.wait()
                self.rx.tick(node.clock())
        except Exception as exc:  # the store failing under us: report, never crash the node
            if not self.done.done():
                self.done.set_exception(ArtifactError(f"{type(exc).__name__}: {exc}"))
        finally:
            if not self.done.done():
                self.done.set_exception(ArtifactError("fetch stopped"))
            with contextlib.suppress(Exception):
                self.incoming.abort()

    async def _carry_out(self) -> None:
        """Everything the receiver wants done, including what doing it makes it want next
        (a verification's result yields Done at once)."""
        while outputs := self.rx.drain():
            await self._carry_out_batch(outputs)

    async def _carry_out_batch(self, outputs) -> None:
        node = self.service.node
        for out in outputs:
            if isinstance(out, Send):
                msg_type, body = pack(out.msg)
                node.send_raw(out.to, msg_type, body)
            elif isinstance(out, Write):
                self.incoming.write(out.offset, out.data)
            elif isinstance(out, Verify):
                ok = await asyncio.to_thread(self.incoming.commit, out.size)
                self.rx.verified(node.clock(), ok)
            elif isinstance(out, Done):
                self.done.set_result(None)
            elif isinstance(out, Failed):
                reasons = ", ".join(f"{node.member_name(s)}: {r}"
                                    for s, r in sorted(self.rx.failures.items()))
                self.done.set_exception(ArtifactError(
                    f"cannot fetch {out.digest[:16]}: {out.reason}"
                    + (f" ({reasons})" if reasons else "")))


class ArtifactService:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.store = ArtifactStore(node.home / "artifacts")
        self.sender = Sender(self.store)
        # One reader thread: the sender's manifest cache is not shared between threads, and
        # one disk reader keeps serving from competing with the node for both cores.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="artifacts")
        self._fetches: dict[Digest, _Fetch] = {}
        self._tasks = TaskSet()
        self._finished_at: dict[str, float] = {}  # build -> when first seen finished here
        self.gc_removed = self.gc_freed = 0  # objects and bytes collected since the start

    def handles(self, msg_type: str) -> bool:
        return msg_type in MESSAGE_TYPES

    def on_message(self, inbound: Inbound) -> None:
        env = inbound.envelope
        try:
            msg = unpack(env.type, env.body)
        except TransferError:
            self.node.drops.drop("malformed_artifact")
            return
        if env.type in REQUEST_TYPES:
            self._spawn(self._serve(inbound, msg))
            return
        fetch = self._fetches.get(msg.digest)
        if fetch is None:
            self.node.drops.drop("unexpected_artifact_reply")
            return
        fetch.rx.handle(self.node.clock(), env.sender, msg)
        fetch.wake.set()

    async def _serve(self, inbound: Inbound, msg) -> None:
        """Read, pack and seal the reply in the I/O thread: 39 members fetching a push from
        one node kept hundreds of 256 KiB replies to pack and sign on its loop, and its SWIM
        acks waited behind them (every other node suspected the pusher)."""
        loop = asyncio.get_running_loop()
        sealed = await loop.run_in_executor(self._io, self._answer, inbound.sender, msg)
        if sealed is not None:
            inbound.reply_frame(*sealed)

    def _answer(self, sender: str, msg) -> tuple[str, bytes] | None:
        """(type, sealed frame) of the reply to a request, off the loop."""
        reply = self.sender.handle(sender, msg)
        if reply is None:
            return None
        msg_type, body = pack(reply.msg)
        return msg_type, self.node.transport.sealer.seal(msg_type, body)

    async def fetch(self, digest: Digest, sources: Sequence[str]) -> None:
        """Make `digest` present in this node's store, pulling it from `sources` (member ids)
        when missing; raises ArtifactError naming each source's failure."""
        check_digest(digest)
        if self.store.has(digest):
            return
        fetch = self._fetches.get(digest)
        if fetch is None:
            fetch = _Fetch(self, digest, [s for s in sources if s != self.node.id])
            self._fetches[digest] = fetch
            task = self._spawn(fetch.run())
            task.add_done_callback(lambda _t: self._fetches.pop(digest, None))
        else:
            self.add_sources(digest, sources)
        await asyncio.shield(fetch.done)

    def add_sources(self, digest: Digest, sources: Sequence[str]) -> None:
        """More members to pull a fetch under way from (nodes that got the file since)."""
        fetch = self._fetches.get(digest)
        if fetch is None:
            return
        for source in sources:
            if source != self.node.id:
                fetch.rx.add_source(self.node.clock(), source)
        fetch.wake.set()

    def source_gone(self, member: str, state: str) -> None:
        """Membership declared `member` gone: fetches waiting on it drop it now, and those it
        was the last source of fail at once (a dead source would hold them for three request
        timeouts, 30 s)."""
        for fetch in self._fetches.values():
            fetch.rx.remove_source(self.node.clock(), member, state)
            fetch.wake.set()

    # -- garbage collection ---------------------------------------------------------------

    def pin_run(self, key: tuple[str, str, int], digests: Iterable[Digest]) -> str:
        """Pin a job run's inputs (before fetching them: gc cannot slip between); returns the
        owner to `release` when the run ends."""
        owner = RUN_OWNER + digest_bytes("/".join(map(str, key)).encode())[:32]
        for digest in dict.fromkeys(digests):
            self.store.pin(digest, owner)
        return owner

    def release_runs(self) -> None:
        """Drop the pins of job runs (at start: none runs, a crash may have left some)."""
        for owner in self.store.owners():
            if owner.startswith(RUN_OWNER):
                self.store.release(owner)

    async def collect(self) -> GcReport:
        """One GC pass (see the module notes), the store's work in a thread; an event
        `artifacts_gc` when it removed anything. None while no leader is known or this node
        has not applied all it knows committed: the ledger decides what is kept, and one
        behind (just restarted) may not name every unfinished build."""
        leadership = self.node.leadership
        ledger, settings = leadership.ledger, self.node.node_config.disk
        if not leadership.caught_up:
            return GcReport(0, 0, 0, 0)  # the ledger may not name every unfinished build yet
        now = time.time()
        for build in ledger.builds():
            if ledger.finished(build.build_id):
                self._finished_at.setdefault(build.build_id, now)
        known = {b.build_id for b in ledger.builds()}
        for build_id in self._finished_at.keys() - known:  # (compacted out of the ledger)
            del self._finished_at[build_id]
        plan = plan_gc(ledger, self.store.owners(), self._finished_at, settings, now)
        result, released = await asyncio.to_thread(self._collect, plan, settings)
        report = GcReport(len(result.removed), result.freed, result.total, released)
        self.gc_removed += report.removed
        self.gc_freed += report.freed
        if report.removed or report.released:
            self.node.event("artifacts_gc", {"removed": report.removed, "freed": report.freed,
                                             "left": report.total, "released": released})
        return report

    def _collect(self, plan: GcPlan, settings: DiskSettings) -> tuple[GcResult, int]:
        store, released = self.store, 0
        for owner in plan.release:
            store.release(owner)
            released += 1
        result = store.gc(plan.needed | plan.retained, min_age=settings.artifacts_min_age,
                          limit=GC_MAX_REMOVE)
        if result.total > settings.artifacts_max_bytes and len(result.removed) < GC_MAX_REMOVE:
            for owner in plan.finished:  # the cap wins over the retention
                store.release(owner)
                released += 1
            more = store.gc(plan.needed, min_age=settings.artifacts_min_age,
                            max_bytes=settings.artifacts_max_bytes,
                            limit=GC_MAX_REMOVE - len(result.removed))
            result = GcResult(result.removed + more.removed, result.freed + more.freed,
                              result.stale_tmp + more.stale_tmp, more.total)
        return result, released

    def _spawn(self, coro) -> asyncio.Task[None]:
        return self._tasks.spawn(coro)

    async def close(self) -> None:
        await self._tasks.close()
        self._io.shutdown(wait=False, cancel_futures=True)
