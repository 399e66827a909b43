"""Builds: submitted from any node, scheduled by the leader, recorded in the replicated ledger.

Every state change of a job is a ledger entry committed through the leader's Raft log
(swarmnode/election, swarmnode/ledger), so every node holds the same ledger and no accepted
build or finished result is lost when one node dies, the leader included. This module is the
glue around it:

* Submitting (any node): the plan's input files and each job's full spec (command, env,
  outputs, inputs by digest) go into this node's artifact store; the ledger entry carries only
  the graph and each spec's digest. The entry is proposed by the leader (forwarded there with
  `ledger.propose`); the build counts as accepted once it is committed.
* Scheduling (the leader, while its lease holds): critical-path-first list scheduling
  (swarmnode/build/schedule.py) of the ready jobs onto the members' free cores, honouring
  `requires`, avoiding nodes a job failed on and nodes paused by the circuit breaker; each
  decision is an `assign` entry (node, term, attempt). After it commits the leader sends the
  worker the job, and re-sends it until the worker says it started.
* Reports: a worker's report becomes a `started`, `done` or `failed` entry; the ledger itself
  rejects a report from a node the job is no longer assigned to. Only after the entry is
  committed is the worker told to forget its report.
* A job whose node is confirmed dead by membership (never while it is alive) is requeued.
* The submitting node fetches every finished job's artifacts, so it keeps a copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from net.transport import Inbound
from swarmnode.artifact_service import ArtifactError
from swarmnode.build.plan import Plan, Requires, load_plan, topological_order
from swarmnode.build.schedule import Ready, Slot, assign, bottom_levels, satisfiable
from swarmnode.control import ControlError
from swarmnode.leadership import NotLeader
from swarmnode.ledger import (
    ACTIVE,
    ASSIGNED,
    DONE,
    Assign,
    Block,
    Cancel,
    Done,
    Failed,
    Job,
    JobLedger,
    JobSpec,
    LedgerEvent,
    Requeue,
    SetVoters,
    Started,
    SubmitBuild,
    encode,
    job_key,
)
from swarmnode.tasks import TaskSet
from swarmnode.worker import ASSIGN, CANCEL, REPORT, REPORT_ACK, Assignment, pack, unpack_map

if TYPE_CHECKING:
    from swarmnode.node import Node

log = logging.getLogger(__name__)

PROPOSE, PROPOSE_REPLY = "ledger.propose", "ledger.propose_reply"
TYPES = frozenset({PROPOSE, PROPOSE_REPLY, REPORT})
#: Entries a non-leader may ask the leader to propose; everything else only the leader decides.
FORWARDABLE = frozenset({"submit_build", "cancel", "set_voters"})
#: The leader schedules on every ledger change, and at least this often (dead nodes' jobs,
#: unstarted assignments, members that joined).
TICK_S = 0.25
#: An assignment not yet reported started is sent again after this long.
RESEND_S = 2.0
#: Consecutive failures after which a node gets no work for PAUSE_S (the circuit breaker).
BREAKER_FAILURES = 3
PAUSE_S = 300.0
SPEC_VERSION = 1
#: What a binhost collects: Portage's binary package formats (xpak-era and GPKG).
BINARY_PACKAGES = (".tbz2", ".xpak", ".gpkg.tar")
MAX_ENTRY = 512 * 1024


class Builds:
    def __init__(self, node: Node) -> None:
        self.node = node
        node.leadership.on_applied.append(self._on_applied)
        self._sent: dict[str, float] = {}  # job key -> when its assignment was last sent
        self._proposing: set[str] = set()  # job keys with an entry on its way
        self._failures: dict[str, int] = {}
        self._paused: dict[str, float] = {}  # node -> until
        self._replies: dict[bytes, asyncio.Future[bool]] = {}
        self._specs: dict[str, dict[str, Any]] = {}
        self._tasks = TaskSet()
        self._wake = asyncio.Event()
        self._levels: dict[str, dict[str, float]] = {}  # build -> job -> bottom level

    @property
    def ledger(self) -> JobLedger:
        return self.node.leadership.ledger

    def handles(self, msg_type: str) -> bool:
        return msg_type in TYPES

    # -- submitting -----------------------------------------------------------------------

    def package(self, plan: Plan, build_id: str) -> SubmitBuild:
        """Store the plan's inputs and job specs here; the entry names them by digest."""
        store = self.node.artifacts.store
        base = plan.base_dir or Path.cwd()
        jobs: list[tuple[str, JobSpec]] = []
        for name in topological_order(plan):
            job = plan.jobs[name]
            inputs = [[rel, store.put_file(base / rel)] for rel in job.inputs]
            spec = {"v": SPEC_VERSION, "cmd": job.cmd if isinstance(job.cmd, str)
                    else list(job.cmd), "env": dict(job.env), "outputs": list(job.outputs),
                    "inputs": inputs}
            spec_hash = store.put_bytes(msgpack.packb(spec))
            for digest in [spec_hash, *(d for _r, d in inputs)]:
                store.pin(digest, build_id)
            jobs.append((name, JobSpec(deps=tuple(job.deps), requires=job.requires,
                                       estimate=job.estimate, spec_hash=spec_hash)))
        return SubmitBuild(build_id, plan.name, self.node.id, tuple(sorted(jobs)))

    async def submit(self, plan_path: Path) -> str:
        return await self.submit_plan(load_plan(plan_path))

    async def submit_plan(self, plan: Plan) -> str:
        build_id = f"{plan.name[:40]}-{time.strftime('%H%M%S')}-{os.urandom(3).hex()}"
        entry = encode(self.package(plan, build_id))
        if len(entry) > MAX_ENTRY:
            raise ControlError(f"the plan is too large for one ledger entry ({len(entry)} B)")
        await self.propose_anywhere(entry, what=f"build {build_id}")
        await self._until(lambda: self.ledger.build(build_id) is not None,
                          f"build {build_id} was committed but has not reached this node")
        self.node.event("build_submitted", {"build": build_id, "jobs": len(plan.jobs)})
        return build_id

    async def _until(self, cond, what: str, timeout: float = 10.0) -> None:
        """Wait for the replicated ledger here to show `cond` (committed entries reach every
        member shortly after the leader applies them)."""
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise ControlError(what)
            await asyncio.sleep(0.02)

    async def propose_anywhere(self, entry: bytes, what: str, timeout: float = 30.0) -> None:
        """Get `entry` committed: proposed here when leading, else forwarded to the leader;
        retried across leader changes until `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if await self.node.leadership.propose(entry):
                    return
            except NotLeader as exc:
                if exc.leader is not None and await self._forward(exc.leader, entry):
                    return
            await asyncio.sleep(0.2)
        raise ControlError(f"{what}: no leader committed it within {timeout:g} s (is a "
                           "majority of the voters up? `swarmnode voters`)")

    async def _forward(self, leader: str, entry: bytes) -> bool:
        rid = os.urandom(8)
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._replies[rid] = fut
        try:
            self.node.send_raw(leader, PROPOSE, msgpack.packb({"rid": rid, "entry": entry}))
            async with asyncio.timeout(6.0):
                return await fut
        except TimeoutError:
            return False
        finally:
            self._replies.pop(rid, None)

    # -- inbound --------------------------------------------------------------------------

    def on_message(self, inbound: Inbound) -> None:
        env = inbound.envelope
        if not self.node.is_admitted_member(env.sender):
            self.node.drops.drop("not_member")
            return
        try:
            body = unpack_map(env.body, MAX_ENTRY)
        except ValueError:
            self.node.drops.drop("malformed_build")
            return
        if env.type == PROPOSE:
            self._spawn(self._on_propose(inbound, body))
        elif env.type == PROPOSE_REPLY:
            fut = self._replies.get(body.get("rid", b""))
            if fut is not None and not fut.done():
                fut.set_result(body.get("ok") is True)
        else:
            self._spawn(self._on_report(env.sender, body))

    async def _on_propose(self, inbound: Inbound, body: dict[str, Any]) -> None:
        entry = body.get("entry")
        ok = False
        if isinstance(entry, bytes) and _op(entry) in FORWARDABLE:
            with contextlib.suppress(NotLeader):
                ok = await self.node.leadership.propose(entry)
        inbound.reply(PROPOSE_REPLY, msgpack.packb({"rid": body.get("rid"), "ok": ok}))

    async def _on_report(self, worker: str, report: dict[str, Any]) -> None:
        """A worker's report becomes a ledger entry; the worker forgets it once committed."""
        if not self.leading:
            return  # it will re-send to whoever leads
        key = job_key(str(report.get("build")), str(report.get("job")))
        attempt, status = report.get("attempt"), report.get("status")
        job = self.ledger.job(key)
        if job is None or type(attempt) is not int:
            return
        if status == "started":
            if job.state == ASSIGNED and (job.node, job.attempt) == (worker, attempt):
                self._sent.pop(key, None)
                await self._propose(Started(key, worker, attempt), key)
            return
        outputs = report.get("outputs") or []
        if status == "ok":
            cmd: Any = Done(key, worker, attempt, tuple(sorted((o[0], o[1]) for o in outputs)))
            self._failures.pop(worker, None)
        else:
            reason = f"{status}: {report.get('reason') or ''}".strip()[:900]
            cmd = Failed(key, worker, attempt, reason, str(report.get("log_tail", ""))[-8000:])
            self._breaker(worker, reason)
        if key in self._proposing:
            return  # a re-sent copy of a report whose entry is on its way: ack that one
        if job.state in ACTIVE and (job.node, job.attempt) == (worker, attempt):
            committed = await self._propose(cmd, key)
        else:
            committed = True  # the ledger has moved on (or has it already): forget it
            if (job.node, job.attempt) != (worker, attempt):
                self.node.event("report_stale", {"id": worker, "job": key, "attempt": attempt})
        if committed:
            ack = {"build": report.get("build"), "job": report.get("job"), "attempt": attempt}
            self.node.send_raw(worker, REPORT_ACK, pack(ack))

    def _breaker(self, worker: str, reason: str) -> None:
        self._failures[worker] = self._failures.get(worker, 0) + 1
        if self._failures[worker] >= BREAKER_FAILURES and worker not in self._paused:
            self._paused[worker] = time.monotonic() + PAUSE_S
            self.node.event("node_paused", {"id": worker, "failures": self._failures[worker],
                                            "last": reason[:200], "for_s": PAUSE_S})

    # -- the leader's loop ----------------------------------------------------------------

    @property
    def leading(self) -> bool:
        # a lease, and this term's no-op applied: the ledger here is complete
        return self.node.leadership.core.can_schedule(self.node.clock())

    async def run(self) -> None:
        """Schedule whenever the ledger changes (a submission, a job done or failed: the work
        that can start changed), and every TICK_S anyway (members come and go)."""
        swept = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    await self._wake.wait()
            self._wake.clear()
            if not self.leading:
                self._sent.clear()
                continue
            try:
                if time.monotonic() - swept >= TICK_S:  # the full sweeps scan every job
                    swept = time.monotonic()
                    self._sweep()
                self._schedule()
            except Exception:  # a bug here must not stop scheduling for good
                log.exception("scheduler step failed")

    def _slots(self) -> list[Slot]:
        now = time.monotonic()
        busy: dict[str, int] = {}
        for job in self._active_jobs():
            busy[job.node] = busy.get(job.node, 0) + job.spec.requires.cores  # type: ignore[index]
        slots = []
        for m in self.node.core.members():
            if m.admitted_by is None or m.state != "alive" or m.record is None:
                continue
            facts = m.record.facts_dict()
            cores = int(facts.get("cores", 1))
            slots.append(Slot(m.id, max(0, cores - busy.get(m.id, 0)), str(facts.get("arch", "")),
                              str(facts.get("kind", "")), frozenset(), cores=cores,
                              paused=self._paused.get(m.id, 0.0) > now))
        return slots

    def _schedule(self) -> None:
        ready = [j for j in self.ledger.ready() if j.key not in self._proposing]
        if not ready:
            return
        slots = self._slots()
        levels = self._levels
        entries: list[Ready] = []
        for job in ready:
            if job.build_id not in levels:  # a build's graph never changes: once per build
                graph = {j.name: (j.spec.deps, j.spec.estimate)
                         for j in self.ledger.jobs(job.build_id)}
                levels[job.build_id] = bottom_levels(graph)
            if not satisfiable(job.spec.requires, slots, set(job.failed_on)):
                if all(not s.paused for s in slots) and slots:
                    self._spawn(self._propose(Block(job.key, _unsatisfiable(job.spec.requires)),
                                              job.key))
                continue
            entries.append(Ready(job.key, job.spec.requires, levels[job.build_id][job.name]))
        avoid = {j.key: set(j.failed_on) for j in ready}
        term = self.node.leadership.core.term
        for key, node in assign(entries, slots, avoid):
            job = self.ledger.job(key)
            assert job is not None
            self._spawn(self._propose(Assign(key, node, term, job.attempt + 1), key))

    def _active_jobs(self) -> list[Job]:
        """Jobs held by a node (assigned or running), in one pass over the ledger."""
        return [job for build in self.ledger.builds() for job in self.ledger.jobs(build.build_id)
                if job.state in ACTIVE and job.node is not None]

    def _sweep(self) -> None:
        """Requeue the jobs of members membership declares gone (never merely suspected), and
        re-send assignments not yet reported started."""
        now = time.monotonic()
        for job in self._active_jobs():
            assert job.node is not None
            view = self.node.core.member(job.node)
            if view is None or view.state in ("dead", "left", "banned"):
                if job.key not in self._proposing:
                    why = f"{view.name if view else job.node[:12]} is " \
                          f"{view.state if view else 'gone'}"
                    self._spawn(self._propose(Requeue(job.key, why), job.key))
            elif job.state == ASSIGNED and now - self._sent.get(job.key, 0.0) >= RESEND_S:
                self._sent[job.key] = now
                self._spawn(self._send_assignment(job))

    async def _propose(self, cmd: Any, key: str) -> bool:
        self._proposing.add(key)
        try:
            return await self.node.leadership.propose(encode(cmd))
        except NotLeader:
            return False
        finally:
            self._proposing.discard(key)

    def _on_applied(self, ev: LedgerEvent) -> None:
        self._wake.set()
        key = ev.data.get("job_key")
        if ev.kind == "assigned" and self.leading and key:
            job = self.ledger.job(key)
            if job is not None:
                self._sent[key] = time.monotonic()
                self._spawn(self._send_assignment(job))
        if ev.kind == "done" and key:
            job = self.ledger.job(key)
            build = self.ledger.build(job.build_id) if job else None
            if job and build and build.submitter == self.node.id:
                self._spawn(self._keep_artifacts(job))
            if job and "binhost" in self.node.node_config.roles:
                self._spawn(self._collect_packages(job))
        if ev.kind == "submitted" and self.leading:
            self._spawn(self._prefetch_specs(str(ev.data.get("build_id"))))
        if ev.kind == "cancelled" and self.leading:
            self._stop_build(str(ev.data.get("build_id")))
        if ev.kind in ("requeued", "blocked", "cancelled", "failed", "rejected_stale"):
            self.node.event(f"job_{ev.kind}", {k: v for k, v in ev.data.items()
                                               if isinstance(v, str | int | float)})

    def _stop_build(self, build_id: str) -> None:
        """Tell every member to stop the build's jobs (the ledger no longer says where they
        ran, and a cancellation to a node running none of them costs nothing)."""
        body = pack({"build": build_id, "job": None, "term": self.node.leadership.core.term})
        for m in self.node.core.members():
            if m.admitted_by is not None and m.state == "alive":
                if m.id == self.node.id:
                    self.node.worker.cancel_build(build_id)
                else:
                    self.node.send_raw(m.id, CANCEL, body)

    async def _send_assignment(self, job: Job) -> None:
        build = self.ledger.build(job.build_id)
        if build is None or job.node is None:
            return
        try:
            spec = await self._spec(job.spec.spec_hash, build.submitter)
        except ArtifactError as exc:
            log.warning("cannot read the spec of %s: %s", job.key, exc)
            return
        deps: dict[str, tuple[tuple[str, str], ...]] = {}
        sources = {build.submitter}
        for dep in job.spec.deps:
            done = self.ledger.job(job_key(job.build_id, dep))
            if done is not None:
                deps[dep] = done.artifacts
                if done.node:
                    sources.add(done.node)
        cmd = spec["cmd"] if isinstance(spec["cmd"], str) else tuple(spec["cmd"])
        a = Assignment(build=job.build_id, job=job.name, attempt=job.attempt,
                       term=self.node.leadership.core.term, cmd=cmd, env=spec["env"],
                       outputs=tuple(spec["outputs"]), cores=job.spec.requires.cores,
                       timeout=None, inputs=tuple((r, d) for r, d in spec["inputs"]),
                       deps=deps, sources=tuple(sorted(sources)))
        self.node.send_raw(job.node, ASSIGN, pack(a.plain()))

    async def _prefetch_specs(self, build_id: str) -> None:
        """Fetch a new build's job specs while its first assignments commit, so sending them
        waits for nothing."""
        build = self.ledger.build(build_id)
        if build is None:
            return
        for job in self.ledger.jobs(build_id):
            with contextlib.suppress(ArtifactError):
                await self._spec(job.spec.spec_hash, build.submitter)

    async def _spec(self, digest: str, submitter: str) -> dict[str, Any]:
        if digest not in self._specs:
            store = self.node.artifacts.store
            await self.node.artifacts.fetch(digest, [submitter])
            with store.open(digest) as f:
                self._specs[digest] = msgpack.unpackb(f.read(), raw=False)
        return self._specs[digest]

    async def _keep_artifacts(self, job: Job) -> None:
        sources = [job.node] if job.node else []
        for _path, digest in job.artifacts:
            try:
                await self.node.artifacts.fetch(digest, sources)
                self.node.artifacts.store.pin(digest, job.build_id)
            except ArtifactError as exc:
                self.node.event("artifact_missing", {"job": job.key, "digest": digest,
                                                     "error": str(exc)[:200]})

    @property
    def binhost_dir(self) -> Path:
        configured = self.node.node_config.binhost_dir
        return Path(configured) if configured else self.node.home / "binhost"

    async def _collect_packages(self, job: Job) -> None:
        """The binhost role: every binary package a job produced goes to `binhost_dir` at its
        path below the job's PKGDIR (`binpkgs/` for emerge jobs): CAT/PF.tbz2 or
        CAT/PN/PF-N.gpkg.tar, the layouts Portage reads. Regenerate the `Packages` index with
        `PKGDIR=<binhost_dir> emaint binhost --fix` on a Gentoo host to serve it as
        PORTAGE_BINHOST."""
        for path, digest in job.artifacts:
            if not path.endswith(BINARY_PACKAGES):
                continue
            try:
                await self.node.artifacts.fetch(digest, [job.node] if job.node else [])
            except ArtifactError as exc:
                self.node.event("artifact_missing", {"job": job.key, "digest": digest,
                                                     "error": str(exc)[:200]})
                continue
            rel = path.removeprefix("binpkgs/")
            dest = self.binhost_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.node.artifacts.store.export(digest, dest, link=False, overwrite=True)
            self.node.artifacts.store.pin(digest, "binhost")

    # -- queries and commands -------------------------------------------------------------

    def jobs_view(self, build_id: str | None = None) -> list[dict[str, Any]]:
        builds = [b for b in self.ledger.builds() if build_id in (None, b.build_id)]
        out = []
        for b in builds:
            for j in self.ledger.jobs(b.build_id):
                out.append({"build": b.build_id, "job": j.name, "state": j.state,
                            "node": j.node, "node_name": self.node.member_name(j.node)
                            if j.node else None, "attempt": j.attempt, "term": j.term,
                            "reason": j.reason,
                            "artifacts": dict(j.artifacts)})
        return out

    def build_view(self, build_id: str) -> dict[str, Any]:
        build = self.ledger.build(build_id)
        if build is None:
            raise ControlError(f"no build {build_id!r}")
        progress = self.ledger.progress(build_id)
        running: dict[str, int] = {}
        for j in self.ledger.jobs(build_id):
            if j.state in ACTIVE and j.node:
                name = self.node.member_name(j.node)
                running[name] = running.get(name, 0) + 1
        return {"build": build_id, "name": build.name, "progress": progress,
                "running": running, "finished": self.ledger.finished(build_id),
                "ok": progress["done"] == progress["total"]}

    async def fetch_outputs(self, build_id: str, out: Path) -> list[str]:
        """Each job's artifacts as OUT/JOB/PATH (fetched from its worker if not here)."""
        written = []
        for j in self.ledger.jobs(build_id):
            if j.state != DONE:
                continue
            for path, digest in j.artifacts:
                await self.node.artifacts.fetch(digest, [j.node] if j.node else [])
                dest = out / j.name / path
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.node.artifacts.store.export(digest, dest, link=False, overwrite=True)
                written.append(str(dest))
        return written

    def log_view(self, name: str) -> dict[str, Any]:
        """The ledger's record of a job: `BUILD/JOB`, or JOB in the newest build having it."""
        job = self.ledger.job(name) if "/" in name else next(
            (self.ledger.job(job_key(b.build_id, name)) for b in reversed(self.ledger.builds())
             if self.ledger.job(job_key(b.build_id, name))), None)
        if job is None:
            raise ControlError(f"no job {name!r}")
        return {"job": job.key, "state": job.state, "node": self.node.member_name(job.node)
                if job.node else None, "attempt": job.attempt, "reason": job.reason,
                "failed_on": [self.node.member_name(n) for n in job.failed_on],
                "log_tail": job.log_tail}

    async def set_voters(self, voters: list[str]) -> list[str]:
        """Commit the operator's voter set (empty: automatic again); every node then steps
        toward it one member at a time."""
        cmd = SetVoters(tuple(sorted(set(voters))))
        await self.propose_anywhere(encode(cmd), what="set voters")
        await self._until(lambda: self.ledger.pinned_voters == cmd.voters,
                          "the voter change was committed but has not reached this node")
        return list(self.ledger.pinned_voters)

    async def cancel(self, build_id: str) -> str:
        if self.ledger.build(build_id) is None:
            raise ControlError(f"no build {build_id!r}")
        term = self.node.leadership.core.term
        await self.propose_anywhere(encode(Cancel(build_id, term)), what=f"cancel {build_id}")
        return f"cancelled {build_id}"

    # -- plumbing -------------------------------------------------------------------------

    def _spawn(self, coro) -> None:
        self._tasks.spawn(coro)

    async def close(self) -> None:
        await self._tasks.close()


def _op(entry: bytes) -> str | None:
    with contextlib.suppress(Exception):
        value = msgpack.unpackb(entry, raw=False)
        if isinstance(value, Mapping):
            return value.get("op")
    return None


def _unsatisfiable(r: Requires) -> str:
    wants = [f"{k}={v}" for k, v in (("arch", r.arch), ("kind", r.kind)) if v]
    wants += [f"tag {t}" for t in sorted(r.tags)] + [f"{r.cores} cores"]
    return "no member can run it (" + ", ".join(wants) + ")"

