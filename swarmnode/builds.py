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
  `requires`, avoiding nodes a job failed on, nodes paused by the circuit breaker and nodes
  an operator paused (`pause` entries in the ledger) and nodes stating a nearly full disk
  (the `disk_low` fact, swarmnode/disk.py); each
  decision is an assignment (node, term, attempt). After it commits the leader sends each
  worker its jobs (one message per worker), and re-sends them until the worker says it
  started.
* One entry per turn of the leader's loop: the builds submitted, the workers' reports
  (started, done, failed) and the assignments of a scheduling pass that arrived or were
  decided in that turn go to the log as one `batch` entry -- one Raft round trip for all of
  them. The pass counts the results in the batch (and in batches on their way) as done, so a
  job whose last dependency just finished is assigned in the same entry as that result, and a
  new build's first jobs in the same entry as the build. A `started` whose job's result is
  already in the batch is left out. The ledger itself judges each command: it rejects a
  report from a node the job is no longer assigned to, and an assignment whose dependency's
  result it rejected. Only after the entry is committed is the worker told to forget its
  report.
* A job whose node is confirmed dead by membership (never while it is alive) is requeued.
* The submitting node fetches every finished job's artifacts, so it keeps a copy.
* Finished builds leave the ledger (a `forget` entry the leader proposes) once they finished
  `build_retention` seconds ago, or when more than `build_keep_max` are held; every node
  records each attempt in its on-disk history (swarmnode/history.py) as it applies the
  entries, and answers for a forgotten build from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from net.transport import Inbound
from swarmnode.artifact_service import ArtifactError
from swarmnode.binhost_service import BINHOST_REPLY
from swarmnode.build.plan import Plan, Requires, load_plan, topological_order
from swarmnode.build.schedule import Ready, Slot, assign, bottom_levels, satisfiable
from swarmnode.control import ControlError
from swarmnode.disk import FACT as DISK_LOW
from swarmnode.election import MAX_ENTRY, EntryError
from swarmnode.history import DB_FILE as HISTORY_DB
from swarmnode.history import History, job_ends
from swarmnode.leadership import NotLeader
from swarmnode.ledger import (
    ACTIVE,
    ASSIGNED,
    BLOCKED,
    CANCELLED,
    DONE,
    FAILED,
    QUEUED,
    RUNNING,
    STATES,
    Assign,
    Block,
    Cancel,
    Done,
    Failed,
    Job,
    JobLedger,
    JobSpec,
    LedgerError,
    LedgerEvent,
    Redo,
    Requeue,
    SetVoters,
    Started,
    SubmitBuild,
    decode,
    encode,
    job_key,
    to_plain,
)
from swarmnode.ledger.jobs import (
    MAX_BATCH,
    MAX_FORGET,
    MAX_JOULES,
    MAX_REASON,
    MAX_SECONDS,
    Batch,
    Forget,
    Pause,
    Report,
    checked,
    in_range,
)
from swarmnode.portage.graph import TAG_PREFIX, worker_tags
from swarmnode.rights import GONE, outputs_lost, redo_refusal
from swarmnode.tasks import TaskSet, until
from swarmnode.views import cores_fact
from swarmnode.worker import (
    ASSIGN,
    CANCEL,
    CONFIRM,
    CONFIRM_REPLY,
    CURRENT,
    HELD,
    LOG,
    LOG_REPLY,
    LOG_WAIT_S,
    MOVED,
    REPORT,
    REPORT_ACK,
    UNKNOWN,
    Assignment,
    batch,
    pack,
    unpack_map,
)

if TYPE_CHECKING:
    from swarmnode.node import Node

#: A command for a `batch` entry: (command, its job key, what to do once it is committed: the
#: report's acknowledgement, the submitter's future).
_Item = tuple[Any, str | None, Any]

log = logging.getLogger(__name__)

PROPOSE, PROPOSE_REPLY = "ledger.propose", "ledger.propose_reply"
TYPES = frozenset({PROPOSE, PROPOSE_REPLY, REPORT, HELD, CONFIRM, LOG_REPLY, BINHOST_REPLY})
#: A running job missing from its worker's held list is requeued only when it was reported
#: started at least this long ago (a held list crossing the started report is not evidence).
HELD_GRACE_S = 3.0
#: Stale attempts a worker's held list can make the leader stop at once (they are rare: one
#: per job it ran while cut off; the next list names any others).
MAX_STALE_STOPS = 100
#: Characters of a refusal's reason in a propose reply (a sentence naming a member and a build).
MAX_REFUSAL = 400
#: The leader schedules on every ledger change, and at least this often (dead nodes' jobs,
#: unstarted assignments, members that joined).
TICK_S = 0.25
#: An assignment not yet reported started is sent again after this long.
RESEND_S = 2.0
#: A long-polled build status answers a change of progress no sooner than this (its end at once).
PROGRESS_S = 0.25
#: Consecutive failures after which a node gets no work for PAUSE_S (the circuit breaker).
BREAKER_FAILURES = 3
PAUSE_S = 300.0
SPEC_VERSION = 1
#: A forwarded proposal: the entry and its request id.
MAX_PROPOSAL = MAX_ENTRY + 1024
#: Bytes of commands gathered into one `batch` entry (the log takes entries up to 896 KiB).
BATCH_BYTES = 192 * 1024
#: Bytes of assignments in one message to a worker (it takes messages up to 1 MiB).
ASSIGN_BYTES = 512 * 1024
#: Job specs fetched from a submitter at a time.
SPEC_FETCHES = 16
#: A scheduling pass considers the highest-priority ready jobs only, this many plus this many
#: per free core (the others could not start now anyway).
PASS_JOBS, PASS_JOBS_PER_CORE = 64, 4
#: How often `build wait` on a node catching up (just restarted) looks again whether its
#: ledger holds the build now: a leader becoming known applies no entry to wake it.
CATCH_UP_POLL_S = 0.1
#: How often the leader looks for finished builds to forget (a scan of the builds).
COMPACT_S = 5.0
#: A submitter that cannot have a done job's outputs, whose worker is gone, asks the leader to
#: build it again (`Redo`) at most this often per job (the ask waits for a leader itself).
REDO_ASK_S = 5.0
#: `fetch_outputs` waits this long at most for jobs built again because their outputs were lost
#: (within the 600 s the CLI gives it; a longer rebuild is waited for with `build wait`).
REDO_WAIT_S = 540.0
#: Ledger formats that readers need: costs and pauses (3), `forget` entries (4).
FORMAT_COSTS, FORMAT_FORGET = 3, 4


class Builds:
    def __init__(self, node: Node) -> None:
        self.node = node
        node.leadership.on_applied.append(self._on_applied)
        self._sent: dict[str, float] = {}  # job key -> when its assignment was last sent
        self._proposing: dict[str, int] = {}  # job key -> entries about it on their way
        # reports for the next `reports` entry: job key -> (report, worker to acknowledge it
        # once committed, or None for a `started`); and the keys whose done/failed report is
        # in an entry on its way (a re-sent copy is acknowledged when that one commits)
        self._reports: dict[str, tuple[Report, dict[str, Any] | None]] = {}
        self._reporting: set[str] = set()
        self._done_inflight: set[str] = set()  # keys whose `done` is in an entry on its way
        self._batches = 0  # batch entries on their way
        self._submits: list[tuple[SubmitBuild, asyncio.Future[bool]]] = []  # for this turn
        # assignments in an entry on its way: job key -> (node, cores, estimate)
        self._holding: dict[str, tuple[str, int, float]] = {}
        self._acks: dict[str, list[dict[str, Any]]] = {}  # worker -> this turn's acks
        self._assigning: dict[str, Job] = {}  # assignments to send at the end of this turn
        self._since: dict[str, float] = {}  # job key -> when this leader first sent it
        self._failures: dict[str, int] = {}
        self._paused: dict[str, float] = {}  # node -> until
        self._replies: dict[bytes, asyncio.Future[dict[str, Any]]] = {}  # `_request`s
        self._specs: dict[str, dict[str, Any]] = {}
        self._tasks = TaskSet()
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()  # set by every ledger event applied here
        self._levels: dict[str, dict[str, float]] = {}  # build -> job -> bottom level
        self._order: dict[str, tuple[float, int, str]] = {}  # job key -> its place in a pass
        self._format3_until = -1.0  # `_format3`'s answer holds until then
        self._format3_now = False
        config = node.node_config
        self.history = History(node.home / HISTORY_DB, config.history_attempts,
                               config.history_builds)
        self._finished_at: dict[str, float] = {}  # leader: build id -> when it saw it finished
        self._forgetting = False  # a `forget` entry on its way
        self._forgot = False  # builds were forgotten: the spec cache is pruned next turn
        # submitter: done jobs of its builds whose outputs it could not have -> when it last
        # looked after them (0: not yet); and those of them waited for (their worker dead
        # less than `redo_after`: it may come back with them), told once in an event
        self._lost: dict[str, float] = {}
        self._awaited: set[str] = set()

    @property
    def ledger(self) -> JobLedger:
        return self.node.leadership.ledger

    def _format3(self) -> bool:
        """Whether every admitted member reads ledger format 3, so that reports' seconds and
        joules and `pause` entries may go into the ledger (a node from before would find a
        whole batch invalid and fall out of step). Looked at once a second: reports come by
        the thousand."""
        now = time.monotonic()
        if now >= self._format3_until:
            self._format3_until = now + 1.0
            self._format3_now = not self._before(FORMAT_COSTS)
        return self._format3_now

    def _before(self, fmt: int) -> list[str]:
        """The admitted members that do not state ledger format `fmt` (or have no record)."""
        return [m.name for m in self.node.core.members()
                if m.admitted_by is not None and m.state not in ("banned", "left")
                and (m.record is None or type(f := m.record.facts_dict().get("ledger")) is not int
                     or f < fmt)]

    def handles(self, msg_type: str) -> bool:
        return msg_type in TYPES

    # -- submitting -----------------------------------------------------------------------

    def package(self, plan: Plan, build_id: str,
                stored: Mapping[str, str] | None = None) -> SubmitBuild:
        """Store the plan's inputs and job specs here; the entry names them by digest. Each
        distinct input file and spec is stored and pinned once (jobs often share them).
        `stored` names inputs already in the store (path -> digest)."""
        store = self.node.artifacts.store
        base = plan.base_dir or Path.cwd()
        jobs: list[tuple[str, JobSpec]] = []
        files: dict[str, str] = dict(stored or {})  # input path -> digest
        specs: dict[bytes, str] = {}  # spec bytes -> digest
        for name in topological_order(plan):
            job = plan.jobs[name]
            for rel in job.inputs:
                if rel not in files:
                    files[rel] = store.put_file(base / rel)
            inputs = [[rel, files[rel]] for rel in job.inputs]
            spec = {"v": SPEC_VERSION, "cmd": job.cmd if isinstance(job.cmd, str)
                    else list(job.cmd), "env": dict(job.env), "outputs": list(job.outputs),
                    "inputs": inputs}
            data = msgpack.packb(spec)
            if data not in specs:
                specs[data] = store.put_bytes(data)
            jobs.append((name, JobSpec(deps=tuple(job.deps), requires=job.requires,
                                       estimate=job.estimate, spec_hash=specs[data])))
        for digest in {*files.values(), *specs.values()}:
            store.pin(digest, build_id)
        return SubmitBuild(build_id, plan.name, self.node.id, tuple(sorted(jobs)))

    async def submit(self, plan_path: Path) -> str:
        return await self.submit_plan(load_plan(plan_path))

    async def submit_plan(self, plan: Plan, stored: Mapping[str, str] | None = None) -> str:
        build_id = f"{plan.name[:40]}-{time.strftime('%H%M%S')}-{os.urandom(3).hex()}"
        cmd = await asyncio.to_thread(self.package, plan, build_id, stored)  # (fsyncs)
        try:
            entry = encode(cmd)
        except EntryError:
            raise ControlError(f"the plan is too large: the graph of its {len(plan.jobs)} jobs "
                               f"does not fit one ledger entry ({MAX_ENTRY} bytes); split it "
                               "into several builds") from None
        await self.propose_anywhere(entry, what=f"build {build_id}")
        await self._until(lambda: self.ledger.build(build_id) is not None,
                          f"build {build_id} was committed but has not reached this node")
        self.node.event("build_submitted", {"build": build_id, "jobs": len(plan.jobs)})
        return build_id

    async def _until(self, cond, what: str, timeout: float = 10.0) -> None:
        """Wait for the replicated ledger here to show `cond` (committed entries reach every
        member shortly after the leader applies them), looking again at each entry applied."""
        if not await until(self._changed, cond, timeout):
            raise ControlError(what)

    async def propose_anywhere(self, entry: bytes, what: str, timeout: float = 30.0) -> None:
        """Get `entry` committed: proposed here when leading (`_decide`), else forwarded to the
        leader; retried across leader changes until `timeout`. ControlError when the leader
        refuses it (this node lacks the right: retrying would not help)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ok, refused = await self._decide(self.node.id, entry)
            except NotLeader as exc:
                ok, refused = (False, None) if exc.leader is None else await self._forward(
                    exc.leader, entry)
            if refused is not None:
                raise ControlError(f"refused: {refused}")
            if ok:
                return
            await asyncio.sleep(0.2)
        raise ControlError(f"{what}: no leader committed it within {timeout:g} s (is a "
                           "majority of the voters up? `swarmnode voters`)")

    async def _forward(self, leader: str, entry: bytes) -> tuple[bool, str | None]:
        """Ask `leader` to propose `entry` for this node: (committed, the leader's refusal).
        A leader from before refusals answers only `ok`."""
        reply = await self._request(leader, PROPOSE, {"entry": entry}, 6.0)
        if reply is None:
            return False, None
        reason = reply.get("reason")
        if reply.get("ok") is True or not isinstance(reason, str):
            return reply.get("ok") is True, None
        return False, "".join(c for c in reason[:MAX_REFUSAL] if c.isprintable())

    async def _decide(self, sender: str, entry: bytes) -> tuple[bool, str | None]:
        """As leader (only the leader decides): propose `entry` for `sender` if its rights
        allow it (`rights.refusal`; this node's own requests too, so the rule does not depend
        on who leads): (committed, why refused). A build goes into this turn's batch, with its
        first jobs. NotLeader when this node does not lead, or leads without its ledger
        complete yet (`leading`: a cancel is judged by the build's submitter), so the caller
        asks again."""
        leadership = self.node.leadership
        if not self.leading:
            raise NotLeader(None if leadership.leader == self.node.id else leadership.leader)
        try:
            cmd = decode(entry)
        except LedgerError as exc:
            refused: str | None = f"not a ledger entry ({exc})"
        else:
            refused = self.node.rights.refusal(sender, cmd)
            if refused is None and isinstance(cmd, Redo):
                refused, cmd = self._redo(cmd)
                entry = encode(cmd)
        if refused is not None:
            self.node.drops.drop("propose_refused")
            self.node.event("propose_refused", {"id": sender, "op": _op(entry),
                                                "reason": refused})
            return False, refused
        if isinstance(cmd, SubmitBuild):
            return await self._submit_here(cmd), None
        return await leadership.propose(entry), None

    def _redo(self, cmd: Redo) -> tuple[str | None, Redo]:
        """The leader's own check of a submitter's ask to build a done job again
        (`rights.redo_refusal`), and the entry it proposes then: its own reason, not the
        asker's."""
        job = self.ledger.job(cmd.job_key)
        state, gone_for = self._worker_state(job.node if job else None)
        refused = redo_refusal(cmd, job, state, gone_for, self.node.node_config.redo_after,
                               self.node.member_name)
        if refused is not None or job is None or job.node is None:
            return refused, cmd
        return None, Redo(cmd.job_key, f"its outputs were lost with {self._name(job.node)} "
                                       f"({state or 'gone'})"[:MAX_REASON])

    async def _request(self, peer: str, msg_type: str, body: dict[str, Any],
                       timeout: float) -> dict[str, Any] | None:
        """Send `body` with a fresh request id to `peer` (ourselves too: `send_raw` delivers
        it here); its reply's body, or None after `timeout`."""
        rid = os.urandom(8)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[rid] = fut
        try:
            self.node.send_raw(peer, msg_type, msgpack.packb({**body, "rid": rid}))
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            return None
        finally:
            self._replies.pop(rid, None)

    # -- inbound --------------------------------------------------------------------------

    def on_message(self, inbound: Inbound) -> None:
        env = inbound.envelope
        try:
            body = unpack_map(env.body, MAX_PROPOSAL)
        except ValueError:
            self.node.drops.drop("malformed_build")
            return
        if env.type == PROPOSE:
            self._spawn(self._on_propose(inbound, body))
        elif env.type in (PROPOSE_REPLY, LOG_REPLY, BINHOST_REPLY):
            rid = body.get("rid")
            fut = self._replies.get(rid) if isinstance(rid, bytes) else None
            if fut is not None and not fut.done():
                fut.set_result(body)
        elif env.type == HELD:
            self._on_held(env.sender, body.get("held"))
        elif env.type == CONFIRM:
            state = self.attempt_state(env.sender, body.get("build"), body.get("job"),
                                       body.get("attempt"))
            inbound.reply(CONFIRM_REPLY, pack({"rid": body.get("rid"), "state": state,
                                               "term": self.node.leadership.core.term}))
        else:
            try:
                reports = batch(body, "reports")
            except ValueError:
                self.node.drops.drop("malformed_build")
                return
            for report in reports:
                try:
                    self._on_report(env.sender, report)
                except (LookupError, TypeError, ValueError):  # a bug: the others still count
                    log.exception("report from %s not handled", env.sender)
                    self.node.drops.drop("malformed_build")

    async def _on_propose(self, inbound: Inbound, body: dict[str, Any]) -> None:
        """A member asks this node, as leader, to propose an entry for it: decided by the
        envelope's (authenticated) sender's rights. The reply's `reason` says why it was
        refused (a node from before reads only `ok`)."""
        entry = body.get("entry")
        ok, refused = False, None
        if isinstance(entry, bytes):
            with contextlib.suppress(NotLeader):
                ok, refused = await self._decide(inbound.envelope.sender, entry)
        else:
            self.node.drops.drop("malformed_build")
        reply: dict[str, Any] = {"rid": body.get("rid"), "ok": ok}
        if refused is not None:
            reply["reason"] = refused[:MAX_REFUSAL]
        inbound.reply(PROPOSE_REPLY, msgpack.packb(reply))

    async def _submit_here(self, cmd: SubmitBuild, timeout: float = 5.0) -> bool:
        """As leader: the build goes into this turn's batch (its first jobs assigned in the
        same entry); True once committed."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._submits.append((cmd, fut))
        self._wake.set()
        # the specs while the entry commits, so sending the first jobs waits for nothing
        jobs = [Job(cmd.build_id, name, spec) for name, spec in cmd.jobs]
        self._spawn(self._fetch_specs(jobs, cmd.submitter))
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            return False

    def _on_report(self, worker: str, report: dict[str, Any]) -> None:
        """A worker's report goes into this turn's batch; the worker forgets it once that is
        committed."""
        if not self.leading:
            return  # it will re-send to whoever leads
        key = job_key(str(report.get("build")), str(report.get("job")))
        attempt, status = report.get("attempt"), report.get("status")
        job = self.ledger.job(key)
        if job is None or type(attempt) is not int:
            return
        current = job.state in ACTIVE and (job.node, job.attempt) == (worker, attempt)
        if status == "started" and not current:
            # it runs an attempt the ledger has moved past (it should have asked first:
            # `Worker._in_touch`): stop that attempt, or a whole job's CPU is wasted
            self.node.event("report_stale", {"id": worker, "job": key, "attempt": attempt,
                                             "status": status})
            self._stop_attempt(worker, job, attempt)
            return
        if status == "started":
            if current and job.state == ASSIGNED:
                self._sent.pop(key, None)
                self._since[key] = time.monotonic()  # (when it should end: backfilling)
                if key not in self._reports and key not in self._reporting:
                    self._queue_report(key, Started(key, worker, attempt), None)
            return
        ack = {"build": report.get("build"), "job": report.get("job"), "attempt": attempt}
        if not current:  # the ledger has moved on (or has it already): forget it
            if (job.node, job.attempt) != (worker, attempt):
                self.node.event("report_stale", {"id": worker, "job": key, "attempt": attempt})
            self._ack(worker, ack)
            return
        pending = self._reports.get(key)
        if key in self._reporting or (pending is not None and pending[1] is not None):
            return  # a re-sent copy of a report on its way: acknowledged with that one
        try:
            cmd = _report_command(key, worker, attempt, status, report, self._format3())
        except LedgerError as exc:
            # Not valid as a ledger command (in a batch it would void the batch's other
            # commands): recorded as a failure of this attempt instead; the job runs again.
            error = str(exc)[:300]
            self.node.drops.drop("invalid_report")
            self.node.event("report_invalid", {"id": worker, "job": key, "attempt": attempt,
                                               "error": error})
            try:
                reason = f"invalid report: {error}"[:MAX_REASON]
                cmd = checked(Failed(key, worker, attempt, reason))
            except LedgerError:  # (the job's own key, node and attempt: cannot happen)
                log.error("no valid failure for %s's report on %s", worker, key)
                return
        if isinstance(cmd, Done):
            self._failures.pop(worker, None)
        else:
            self._breaker(worker, cmd.reason)  # type: ignore[union-attr]
        self._queue_report(key, cmd, ack)  # replaces its `started`, if that is still here

    def _queue_report(self, key: str, cmd: Report, ack: dict[str, Any] | None) -> None:
        self._reports[key] = (cmd, ack)
        self._wake.set()

    def _ack(self, worker: str, ack: dict[str, Any]) -> None:
        """Acknowledge a report at the end of this turn, with the worker's new assignments."""
        self._turn_soon()
        self._acks.setdefault(worker, []).append(ack)

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
        """A step whenever something happened (an entry applied, a build submitted, a report
        received), and every TICK_S anyway (members come and go)."""
        swept = compacted = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    await self._wake.wait()
            self._wake.clear()
            self._housekeeping()
            if not self.leading:
                self._sent.clear()
                self._since.clear()
                self._reports.clear()  # the workers send them again to whoever leads
                for _cmd, fut in self._submits:
                    if not fut.done():
                        fut.set_result(False)
                self._submits.clear()
                continue
            try:
                if time.monotonic() - swept >= TICK_S:  # the full sweeps scan every job
                    swept = time.monotonic()
                    self._sweep()
                if time.monotonic() - compacted >= COMPACT_S:
                    compacted = time.monotonic()
                    self._compact()
                if not self._batches or self._submits:
                    self._step()
            except Exception:  # a bug here must not stop scheduling for good
                log.exception("scheduler step failed")

    def _housekeeping(self) -> None:
        """Every node, each turn: the history's waiting rows when due, and the spec cache
        cut to the builds still in the ledger after some were forgotten."""
        if self.history.due():
            try:
                self.history.flush()
            except sqlite3.Error as exc:  # a record only: the node goes on without it
                log.warning("cannot write the build history: %s", exc)
        if self._lost:
            self._reclaim()
        if self._forgot:
            self._forgot = False
            used = {j.spec.spec_hash for b in self.ledger.builds()
                    for j in self.ledger.jobs(b.build_id)}
            self._specs = {h: spec for h, spec in self._specs.items() if h in used}

    def _compact(self) -> None:
        """As leader: propose forgetting the finished builds that finished `build_retention`
        seconds ago (as this leader saw it: a new leader starts their clocks again) and the
        oldest beyond `build_keep_max`; one entry at a time, MAX_FORGET builds in it. Not while
        a member cannot read the entry (it would keep the builds the others forgot)."""
        if self._forgetting:
            return
        now, config = time.monotonic(), self.node.node_config
        finished = [b.build_id for b in self.ledger.builds() if self.ledger.finished(b.build_id)]
        self._finished_at = {b: self._finished_at.get(b, now) for b in finished}
        surplus = set(finished[:max(0, len(finished) - config.build_keep_max)])
        forget = [b for b in finished
                  if b in surplus or now - self._finished_at[b] >= config.build_retention]
        if forget and not self._before(FORMAT_FORGET):
            self._forgetting = True
            self._spawn(self._forget(Forget(tuple(forget[:MAX_FORGET]))))

    async def _forget(self, cmd: Forget) -> None:
        try:
            await self._propose(cmd, [])
        finally:
            self._forgetting = False

    def _step(self) -> None:
        """This turn's builds, reports and the assignments of a scheduling pass (which counts
        the reported results as done already: the assignments come after them in the entry)
        go to the log together, in one `batch` entry (a few when they are large)."""
        submits, self._submits = self._submits, []
        reports, self._reports = self._reports, {}
        # on their way from now on (their cores are free, their results count as done)
        self._reporting |= {k for k, (cmd, _ack) in reports.items() if not isinstance(cmd, Started)}
        self._done_inflight |= {k for k, (cmd, _ack) in reports.items() if isinstance(cmd, Done)}
        new = [cmd for cmd, _fut in submits if self.ledger.build(cmd.build_id) is None]
        items: list[_Item] = [(cmd, None, fut) for cmd, fut in submits]
        items += [(cmd, key, ack) for key, (cmd, ack) in reports.items()]
        items += [(a, a.job_key, None) for a in self._schedule(new, self._done_inflight)]
        chunk: list[_Item] = []
        size = 0
        for item in items:
            n = len(msgpack.packb(to_plain(item[0])))
            if chunk and (size + n > BATCH_BYTES or len(chunk) >= MAX_BATCH):
                self._spawn(self._propose_batch(chunk))
                chunk, size = [], 0
            chunk.append(item)
            size += n
        if chunk:
            self._spawn(self._propose_batch(chunk))

    async def _propose_batch(self, items: list[_Item]) -> None:
        """Propose one batch (its reports are marked on their way already) and carry out what
        follows its commit: acknowledgements, the submitters' answers."""
        final = {key for cmd, key, _x in items if isinstance(cmd, Done | Failed)}
        done = {key for cmd, key, _x in items if isinstance(cmd, Done)}
        committed = False
        self._batches += 1
        try:
            entry = Batch(tuple(cmd for cmd, _key, _x in items))
            committed = await self._propose(entry, [key for _c, key, _x in items if key])
        finally:
            self._batches -= 1
            self._wake.set()
            self._reporting -= final  # type: ignore[arg-type]
            self._done_inflight -= done  # type: ignore[arg-type]
            for cmd, key, _x in items:
                if isinstance(cmd, Assign):
                    self._holding.pop(key, None)  # type: ignore[arg-type]
            for cmd, _key, extra in items:
                if isinstance(cmd, SubmitBuild) and not extra.done():
                    extra.set_result(committed)
        if committed:
            for cmd, _key, extra in items:
                if isinstance(cmd, Done | Failed) and extra is not None:
                    self._ack(cmd.node, extra)

    def _slots(self) -> list[Slot]:
        """The members' free cores (a job whose result has reached us holds none any more,
        though its entry may not be committed yet; an assignment on its way to the log holds
        its cores already), and when their running jobs should end."""
        now = time.monotonic()
        busy: dict[str, int] = {}
        releases: dict[str, list[tuple[float, int]]] = {}
        for job in self.ledger.active():
            key, node, cores = job.key, job.node, job.spec.requires.cores
            assert node is not None
            pending = self._reports.get(key)
            if key in self._reporting or (pending is not None and pending[1] is not None):
                continue
            busy[node] = busy.get(node, 0) + cores
            left = max(0.0, job.spec.estimate - (now - self._since.get(key, now)))
            releases.setdefault(node, []).append((left, cores))
        for key, (node, cores, estimate) in self._holding.items():
            job = self.ledger.job(key)
            if job is None or job.state not in ACTIVE:
                busy[node] = busy.get(node, 0) + cores
                releases.setdefault(node, []).append((estimate, cores))
        slots = []
        for m in self.node.core.members():
            if m.admitted_by is None or m.state != "alive" or m.record is None:
                continue
            facts = m.record.facts_dict()
            cores = cores_fact(facts) or 1  # (a fact that is not a positive number: one)
            slots.append(Slot(m.id, max(0, cores - busy.get(m.id, 0)), str(facts.get("arch", "")),
                              str(facts.get("kind", "")), worker_tags(facts), cores=cores,
                              paused=(self._paused.get(m.id, 0.0) > now
                                      or m.id in self.ledger.paused
                                      or bool(facts.get(DISK_LOW))),
                              releases=tuple(releases.get(m.id, ()))))
        return slots

    def _schedule(self, new: list[SubmitBuild], done: set[str]) -> list[Assign]:
        """One scheduling pass over the ready jobs, counting the builds in `new` as submitted
        and the jobs in `done` as done (both are in entries before the assignments). Skipped
        while no member has a free core (a queue of thousands is not scanned for nothing), and
        while nothing is ready (an idle leader looked at every member's facts ten times a
        second)."""
        if not new and not done and not self.ledger.ready_keys():
            return []
        slots = self._slots()
        if not any(s.free_cores for s in slots if not s.paused):
            return []
        # The ready set by set operations and a cached order, so that a pass costs the jobs it
        # can start, not the queue's length (thousands of ready jobs are common).
        keys = self.ledger.ready_keys() - self._proposing.keys()
        extra: dict[str, Job] = {}  # ready only counting `done` and `new`: not in the ledger yet
        for key in done:  # dependents whose last dependencies are among the results
            for dep in self.ledger.dependents(key):
                job = self.ledger.job(dep)
                if (job is not None and job.state in (QUEUED, FAILED) and dep not in keys
                        and dep not in self._proposing and all(
                            (k := job_key(job.build_id, d)) in done
                            or getattr(self.ledger.job(k), "state", None) == DONE
                            for d in job.spec.deps)):
                    extra[dep] = job
        levels = self._levels
        for cmd in new:
            levels[cmd.build_id] = bottom_levels({n: (s.deps, s.estimate) for n, s in cmd.jobs})
            for name, spec in cmd.jobs:
                if not spec.deps:
                    extra[job_key(cmd.build_id, name)] = Job(cmd.build_id, name, spec)
        keys |= extra.keys()
        if not keys:
            return []
        order = self._order
        for key in keys - order.keys():
            job = extra.get(key) or self.ledger.job(key)
            assert job is not None
            if job.build_id not in levels:  # a build's graph never changes: once
                graph = {j.name: (j.spec.deps, j.spec.estimate)
                         for j in self.ledger.jobs(job.build_id)}
                levels[job.build_id] = bottom_levels(graph)
            order[key] = (-levels[job.build_id][job.name], -job.spec.requires.cores, key)
        free = sum(s.free_cores for s in slots if not s.paused)
        if len(keys) > PASS_JOBS + free * PASS_JOBS_PER_CORE:  # the rest cannot start now
            keys = heapq.nsmallest(PASS_JOBS + free * PASS_JOBS_PER_CORE, keys,
                                   key=order.__getitem__)
        ready = {key: extra.get(key) or self.ledger.job(key) for key in keys}
        candidates: Iterable[Job] = ready.values()  # type: ignore[assignment]
        entries: list[Ready] = []
        can: dict[tuple[Requires, tuple[str, ...]], bool] = {}  # most jobs ask alike
        for job in candidates:
            asks = (job.spec.requires, job.failed_on)
            if asks not in can:
                can[asks] = satisfiable(job.spec.requires, slots, set(job.failed_on))
            if not can[asks]:
                if all(not s.paused for s in slots) and slots and self.ledger.job(job.key):
                    block = Block(job.key, _unsatisfiable(job.spec.requires))
                    self._spawn(self._propose(block, [job.key]))
                continue
            entries.append(Ready(job.key, job.spec.requires, levels[job.build_id][job.name],
                                 job.spec.estimate))
        avoid = {e.job: set(ready[e.job].failed_on) for e in entries if ready[e.job].failed_on}
        term = self.node.leadership.core.term
        chosen = []
        for key, node in assign(entries, slots, avoid):
            job = ready[key]
            chosen.append(Assign(key, node, term, job.attempt + 1))
            self._holding[key] = (node, job.spec.requires.cores, job.spec.estimate)
        return chosen

    def _on_held(self, worker: str, held: Any) -> None:
        """A worker's list of the attempts it holds. A job the ledger has running there that it
        does not hold was lost by a restart (a self-update, a crash and a quick systemd
        restart): requeued, since the member is alive and its death will never come."""
        if not self.leading or not isinstance(held, list):
            return
        holds = {tuple(h) for h in held[:100_000] if isinstance(h, list) and len(h) == 3
                 and all(isinstance(x, str | int) for x in h)}
        self._stop_stale(worker, holds)
        now = time.monotonic()
        for job in self.ledger.active():
            key = job.key
            if job.node != worker or job.state != RUNNING or key in self._proposing:
                continue
            if (job.build_id, job.name, job.attempt) in holds or key in self._reports \
                    or key in self._reporting:
                continue
            if now - self._since.setdefault(key, now) < HELD_GRACE_S:
                continue
            why = f"{self.node.member_name(worker)} no longer runs it (it restarted)"
            self._spawn(self._propose(Requeue(key, why), [key]))

    def _stop_stale(self, worker: str, holds: set[tuple[Any, ...]]) -> None:
        """Stop the attempts `worker` holds that the ledger has moved past (requeued while it
        was cut off or frozen, say): an attempt it still runs stops within HELD_S (one that
        already ended is not running: the cancellation changes nothing). At most
        MAX_STALE_STOPS a list (a peer's list is not trusted to be small)."""
        stopped = 0
        for build, name, attempt in holds:
            if not (isinstance(build, str) and isinstance(name, str) and type(attempt) is int):
                continue
            job = self.ledger.job(job_key(build, name))
            if job is not None and (job.node, job.attempt) != (worker, attempt):
                self._stop_attempt(worker, job, attempt)
                stopped += 1
                if stopped >= MAX_STALE_STOPS:
                    return

    def _sweep(self) -> None:
        """Requeue the jobs of members membership declares gone (never merely suspected), and
        re-send assignments not yet reported started."""
        now = time.monotonic()
        active = self.ledger.active()
        self._since = {job.key: self._since[job.key] for job in active if job.key in self._since}
        for job in active:
            assert job.node is not None
            view = self.node.core.member(job.node)
            if view is None or view.state in GONE:
                if job.key not in self._proposing:
                    why = f"{view.name if view else job.node[:12]} is " \
                          f"{view.state if view else 'gone'}"
                    self._spawn(self._propose(Requeue(job.key, why), [job.key]))
            elif job.state == ASSIGNED and now - self._sent.get(job.key, 0.0) >= RESEND_S:
                self._send_soon(job)

    async def _propose(self, cmd: Any, keys: list[str]) -> bool:
        """Propose `cmd` (about the jobs `keys`) and wait until it is committed (True) or lost."""
        proposing = self._proposing
        for key in keys:
            proposing[key] = proposing.get(key, 0) + 1
        try:
            return await self.node.leadership.propose(encode(cmd))
        except NotLeader:
            return False
        finally:
            for key in keys:
                if proposing[key] > 1:
                    proposing[key] -= 1
                else:
                    del proposing[key]

    def _on_applied(self, ev: LedgerEvent) -> None:
        self._wake.set()
        self._changed.set()
        self._record(ev)
        key = ev.data.get("job_key")
        if ev.kind == "assigned" and self.leading and key:
            job = self.ledger.job(key)
            # only this leader's own assignments: an older term's, met while a new leader
            # applies its log, was sent by its leader and may be done a few entries later
            # (the sweep re-sends one still not started; a worker that lost it says so)
            if job is not None and job.term == self.node.leadership.core.term:
                self._send_soon(job)
        if ev.kind in ("done", "failed", "requeued", "blocked") and key:
            self._sent.pop(key, None)
            self._since.pop(key, None)
            if ev.kind in ("done", "blocked"):
                self._order.pop(key, None)
                build_id = key.partition("/")[0]
                if self.ledger.finished(build_id):
                    self._levels.pop(build_id, None)
        if ev.kind == "done" and key:
            job = self.ledger.job(key)
            build = self.ledger.build(job.build_id) if job else None
            if job and build and build.submitter == self.node.id:
                self._spawn(self._keep_artifacts(job))
            if job:
                self.node.binhost.on_job_done(job)
        if ev.kind == "submitted" and self.leading:  # (a forwarded build's are on their way)
            build_id = str(ev.data.get("build_id"))
            self._spawn(self._fetch_specs(self.ledger.jobs(build_id)))
        if ev.kind == "cancelled":
            for job in self.ledger.jobs(str(ev.data.get("build_id"))):
                self._order.pop(job.key, None)
            if self.leading:
                self._stop_build(str(ev.data.get("build_id")))
        if ev.kind in ("paused", "resumed"):
            self.node.event(f"node_{ev.kind}_by_operator", {"id": str(ev.data.get("node"))})
        if ev.kind == "forgotten":
            build_id = str(ev.data.get("build_id"))
            self._levels.pop(build_id, None)
            self._finished_at.pop(build_id, None)
            self._forgot = True
        if ev.kind in ("done", "requeued", "redone", "blocked", "cancelled", "failed",
                       "rejected_stale"):
            self.node.event(f"job_{ev.kind}", {k: v for k, v in ev.data.items()
                                               if isinstance(v, str | int | float)})

    def _record(self, ev: LedgerEvent) -> None:
        """Write what `ev` did to the history: the attempt it assigned, started or ended,
        the build it submitted or finished (times: this node's clock as it applies)."""
        data, now, history = ev.data, time.time(), self.history
        key = data.get("job_key")
        build_id, _, name = (str(key) if key else str(data.get("build_id"))).partition("/")
        attempt = data.get("attempt", 0)
        if ev.kind == "submitted":
            build = self.ledger.build(build_id)
            if build is not None:
                history.build(build_id, name=build.name, submitter=build.submitter,
                              started=now, jobs=len(build.jobs))
        elif ev.kind in ("assigned", "started"):
            history.attempt(build_id, name, attempt, node=data.get("node"),
                            term=data.get("term"), **{ev.kind: now})
        elif ev.kind in ("done", "failed", "requeued", "blocked"):
            job = self.ledger.job(str(key))
            history.attempt(build_id, name, attempt, node=data.get("node"), ended=now,
                            result=ev.kind, seconds=data.get("seconds"),
                            reason=data.get("reason"),
                            artifacts=dict(job.artifacts) if ev.kind == "done" and job else None)
        elif ev.kind == "cancelled":
            for job in self.ledger.jobs(build_id):
                if job.state == CANCELLED:  # (its held attempt, if any, and the job's end)
                    for n in {job.attempt, 0}:
                        history.attempt(build_id, job.name, n, ended=now, result="cancelled",
                                        reason="cancelled")
        elif ev.kind == "restored":
            self._record_ledger(now)
            return
        else:
            return
        if self.ledger.finished(build_id):
            self._record_end(build_id, now)

    def _record_end(self, build_id: str, now: float) -> None:
        progress = self.ledger.progress(build_id)
        self.history.build(build_id, ended=now, done=progress["done"],
                           blocked=progress["blocked"], cancelled=progress["cancelled"],
                           joules=self.ledger.energy(build_id))

    def _record_ledger(self, now: float) -> None:
        """After a snapshot replaced the ledger (this node missed the entries in it): every
        build and each job's last attempt as the snapshot has them, where the history has
        nothing yet."""
        for build in self.ledger.builds():
            self.history.build(build.build_id, name=build.name, submitter=build.submitter,
                               jobs=len(build.jobs))
            for job in self.ledger.jobs(build.build_id):
                ended = job.state in (DONE, FAILED)
                if job.attempt:
                    self.history.attempt(build.build_id, job.name, job.attempt, node=job.node,
                                         term=job.term, ended=now if ended else None,
                                         result=job.state if ended else None,
                                         seconds=job.seconds if ended else None)
                if job.state in (BLOCKED, CANCELLED):
                    self.history.attempt(build.build_id, job.name, 0, ended=now,
                                         result=job.state, reason=job.reason)
            if self.ledger.finished(build.build_id):
                self._record_end(build.build_id, now)

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

    def _stop_attempt(self, worker: str, job: Job, attempt: int) -> None:
        """Tell `worker` to stop `attempt` of `job` (that attempt only: a newer one it may run
        stays). Not when the job's current attempt is the worker's own: a worker runs one
        attempt of a job, and the newer one's assignment stops the older there (a worker from
        before `attempt` in `job.cancel` would stop the newer one instead)."""
        if job.node == worker:
            return
        term = self.node.leadership.core.term
        if worker == self.node.id:
            self.node.worker.cancel_build(job.build_id, job.name, attempt)
        else:
            self.node.send_raw(worker, CANCEL, pack({"build": job.build_id, "job": job.name,
                                                     "attempt": attempt, "term": term}))

    def attempt_state(self, worker: str, build: Any, job: Any, attempt: Any) -> str:
        """As leader, whether `attempt` of `build`/`job` is `worker`'s current assignment
        (a worker asks before starting one it may have been out of touch for): CURRENT when
        the ledger holds it assigned or running there, no entry about the job is on its way
        and membership counts the worker alive (a requeue needs it declared dead first, and
        suspicion precedes that by seconds); MOVED when the ledger holds another attempt, or
        the job finished; UNKNOWN when this node cannot tell now (not leading with a lease
        and a complete ledger, an entry on its way, the worker suspected)."""
        if not self.leading or not isinstance(build, str) or not isinstance(job, str):
            return UNKNOWN
        key = job_key(build, job)
        held = self.ledger.job(key)
        if held is None or held.state not in ACTIVE or (held.node, held.attempt) != (worker,
                                                                                  attempt):
            return MOVED
        view = self.node.core.member(worker)
        if key in self._proposing or view is None or view.state != "alive":
            return UNKNOWN
        return CURRENT

    def _send_soon(self, job: Job) -> None:
        """Send `job` to its worker at the end of this turn, with the turn's other ones."""
        self._turn_soon()
        self._assigning[job.key] = job
        self._sent[job.key] = time.monotonic()
        self._since.setdefault(job.key, self._sent[job.key])

    def _turn_soon(self) -> None:
        """`_send_turn` once this turn is over: two hops of the loop, so that the proposals
        woken by the same commit (which acknowledge its reports) have run first and their
        acknowledgements ride with the assignments it made."""
        if not self._assigning and not self._acks:
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.call_soon, self._send_turn)

    def _send_turn(self) -> None:
        """This turn's assignments and acknowledgements, one message per worker (or a few:
        bounded in size); assignments whose spec has still to be fetched follow once it is
        here."""
        jobs, self._assigning = self._assigning, {}
        acks, self._acks = self._acks, {}
        plains: list[tuple[str, dict[str, Any]]] = []
        later: list[Job] = []
        for job in jobs.values():
            if not self._still_assigned(job):
                continue
            spec = self._specs.get(job.spec.spec_hash)
            if spec is None:
                later.append(job)
            else:
                plains.append((job.node, self._assignment(job, spec)))
        self._send_plains(plains, acks)
        if later:
            self._spawn(self._send_fetched(later))

    def _still_assigned(self, job: Job) -> bool:
        """Whether the applied ledger still holds `job`'s attempt as assigned to its node: a
        job done, failed, requeued or cancelled since it was queued for sending is not sent
        (a finished job is never started again)."""
        now = self.ledger.job(job.key)
        return (now is not None and now.state == ASSIGNED and now.node is not None
                and now.node == job.node and now.attempt == job.attempt
                and self.ledger.build(job.build_id) is not None)

    async def _send_fetched(self, jobs: list[Job]) -> None:
        await self._fetch_specs(jobs)
        plains = []
        for job in jobs:
            spec = self._specs.get(job.spec.spec_hash)
            if spec is not None and self._still_assigned(job):
                plains.append((job.node, self._assignment(job, spec)))
        self._send_plains(plains)

    def _send_plains(self, plains: list[tuple[str, dict[str, Any]]],
                     acks: dict[str, list[dict[str, Any]]] | None = None) -> None:
        """Assignments (and acknowledgements) per worker, in messages of at most ASSIGN_BYTES
        of assignments."""
        acks = dict(acks or {})
        chunks: dict[str, list[list[dict[str, Any]]]] = {}
        sizes: dict[str, int] = {}  # node -> bytes in its last chunk
        for node, plain in plains:
            size = len(pack(plain))
            mine = chunks.setdefault(node, [[]])
            if mine[-1] and sizes.get(node, 0) + size > ASSIGN_BYTES:
                mine.append([])
                sizes[node] = 0
            mine[-1].append(plain)
            sizes[node] = sizes.get(node, 0) + size
        for node, items in chunks.items():
            for chunk in items:
                body: dict[str, Any] = {"assignments": chunk}
                if node in acks:
                    body["acks"] = acks.pop(node)
                self.node.send_raw(node, ASSIGN, pack(body))
        for node, items in acks.items():
            self.node.send_raw(node, REPORT_ACK, pack({"acks": items}))

    def _assignment(self, job: Job, spec: dict[str, Any]) -> dict[str, Any]:
        submitter = self.ledger.build(job.build_id).submitter  # type: ignore[union-attr]
        deps: dict[str, tuple[tuple[str, str], ...]] = {}
        sources = {submitter}
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
        return a.plain()

    async def _fetch_specs(self, jobs: list[Job], submitter: str | None = None) -> None:
        """The specs of `jobs` into the cache, fetched from their submitter (SPEC_FETCHES at a
        time); a spec that cannot be fetched is logged and left out."""
        wanted: dict[str, str] = {}
        for job in jobs:
            build = self.ledger.build(job.build_id)
            source = submitter or (build.submitter if build else None)
            if source and job.spec.spec_hash not in self._specs:
                wanted.setdefault(job.spec.spec_hash, source)
        limit = asyncio.Semaphore(SPEC_FETCHES)

        async def one(digest: str, source: str) -> None:
            async with limit:
                try:
                    await self.node.artifacts.fetch(digest, [source])
                    with self.node.artifacts.store.open(digest) as f:
                        self._specs[digest] = msgpack.unpackb(f.read(), raw=False)
                except (ArtifactError, OSError, ValueError) as exc:
                    log.warning("cannot read the job spec %s: %s", digest[:12], exc)

        await asyncio.gather(*(one(d, s) for d, s in wanted.items()))

    async def _keep_artifacts(self, job: Job) -> None:
        """As the build's submitter: hold a done job's outputs, fetched from its worker. What
        cannot be had is looked after by `_reclaim` (fetched again, or built again once the
        worker is gone)."""
        sources = self._live([job.node] if job.node else [])
        for _path, digest in job.artifacts:
            try:
                await self.node.artifacts.fetch(digest, sources)
                self.node.artifacts.store.pin(digest, job.build_id)
            except ArtifactError as exc:
                self.node.event("artifact_missing", {"job": job.key, "digest": digest,
                                                     "error": str(exc)[:200]})
                self._lost.setdefault(job.key, 0.0)  # (looked after at the next turn)
                self._wake.set()
                return
        self._lost.pop(job.key, None)
        self._awaited.discard(job.key)

    def _reclaim(self) -> None:
        """As submitter, each turn: the done jobs of its builds whose outputs it could not
        have, looked at again at most every REDO_ASK_S. Fetched again while the worker lives
        (or comes back); once the outputs are lost with it (`rights.outputs_lost`: never while
        merely suspected or dead less than `redo_after`) the leader is asked to build the job
        again (`Redo`). A job built again is fetched at its new `done`."""
        now = time.monotonic()
        for key, tried in list(self._lost.items()):
            job = self.ledger.job(key)
            if job is None or job.state != DONE:  # forgotten, or being built again
                del self._lost[key]
                self._awaited.discard(key)
            elif now - tried >= REDO_ASK_S:
                self._lost[key] = now
                if self._live([job.node] if job.node else []):
                    self._spawn(self._keep_artifacts(job))
                elif self._outputs_lost(job.node):
                    self._spawn(self._ask_redo(key))
                elif key not in self._awaited:
                    self._awaited.add(key)
                    self.node.event("outputs_awaited", {
                        "job": key, "node": job.node, "node_name": self._name(job.node),
                        "redo_after": self.node.node_config.redo_after})

    def _outputs_lost(self, worker: str | None) -> bool:
        """By this node's view, the outputs only `worker` held are lost with it."""
        if worker == self.node.id:
            return False
        return outputs_lost(*self._worker_state(worker), self.node.node_config.redo_after)

    def _worker_state(self, worker: str | None) -> tuple[str | None, float]:
        """`worker`'s state by this node's view (None: no member) and for how long it has
        been in it, as `rights.outputs_lost` takes them."""
        view = self.node.core.member(worker) if worker else None
        return (view.state, self.node.clock() - view.since) if view else (None, 0.0)

    async def _ask_redo(self, key: str) -> None:
        try:
            await self.propose_anywhere(encode(Redo(key, "its outputs were lost")),
                                        f"build {key} again", timeout=REDO_ASK_S)
        except ControlError as exc:
            log.warning("cannot have %s built again: %s", key, exc)

    def _live(self, nodes: Iterable[str]) -> list[str]:
        """`nodes` less the members gone for good (the outputs only they held are lost)."""
        core = self.node.core
        return [n for n in nodes if n == self.node.id
                or ((view := core.member(n)) is not None and view.state not in GONE)]

    async def job_env(self, job: Job) -> dict[str, str]:
        """The env of a job's spec (fetched from its submitter if not cached here); empty
        when the spec cannot be had."""
        await self._fetch_specs([job])
        env = self._specs.get(job.spec.spec_hash, {}).get("env")
        return dict(env) if isinstance(env, dict) else {}

    # -- queries and commands -------------------------------------------------------------

    def jobs_view(self, build_id: str | None = None) -> list[dict[str, Any]]:
        """Each job of the ledger's builds (or of `build_id`: from the history when the
        ledger has forgotten it) with its state, node and last attempt."""
        if build_id is not None and self.ledger.build(build_id) is None:
            return [{"build": build_id, "job": job, "state": row["result"] or "lost",
                     "node": row["node"], "node_name": self._name(row["node"]),
                     "attempt": row["attempt"], "term": row["term"], "reason": row["reason"],
                     "seconds": row["seconds"] or 0.0, "joules": 0.0,
                     "artifacts": row["artifacts"]}
                    for job, row in sorted(self._forgotten(build_id).items())]
        builds = [b for b in self.ledger.builds() if build_id in (None, b.build_id)]
        out = []
        for b in builds:
            for j in self.ledger.jobs(b.build_id):
                out.append({"build": b.build_id, "job": j.name, "state": j.state,
                            "node": j.node, "node_name": self.node.member_name(j.node)
                            if j.node else None, "attempt": j.attempt, "term": j.term,
                            "reason": j.reason, "seconds": j.seconds, "joules": j.joules,
                            "artifacts": dict(j.artifacts)})
        return out

    def history_view(self, build_id: str | None = None) -> list[dict[str, Any]]:
        """Every attempt in this node's history (of `build_id`, or the newest of all builds):
        node, term, its times (this node's clock as it applied them), result, seconds."""
        return [{**row, "node_name": self._name(row["node"])}
                for row in self.history.attempts(build_id)]

    def _name(self, node: str | None) -> str | None:
        return self.node.member_name(node) if node else None

    def _forgotten(self, build_id: str) -> dict[str, dict[str, Any]]:
        """The end of each job of a build the ledger no longer holds, from the history
        (ControlError when it is not a build that ended: see `_history_row`)."""
        self._history_row(build_id)
        return job_ends(self.history.attempts(build_id))

    def _history_row(self, build_id: str) -> dict[str, Any]:
        """The history's row of a build the ledger here does not hold, if the build ended
        (the ledger forgot it). ControlError otherwise, and while this replica catches up: a
        restarted node's ledger may not hold a build yet that runs on, whose last results
        its history had not written when it stopped."""
        if not self.node.leadership.caught_up:
            why = ("it is catching up with the leader" if self.node.leadership.leader else
                   "it knows no leader (cut off, or an election is on)")
            raise ControlError(f"build {build_id!r} is not in this node's ledger (yet?): {why}; "
                               "ask again, or another node")
        row = self.history.build_row(build_id)
        if row is None or row["ended"] is None:
            raise ControlError(f"no build {build_id!r}")
        return row

    async def wait_view(self, build_id: str, wait: float,
                        known: dict[str, int] | None) -> dict[str, Any]:
        """`build_view` as soon as the build finishes; else, when `known` (the progress the
        caller last saw) is given, once the progress differs from it, but not before
        PROGRESS_S (a busy build changes every few ms); else after `wait` seconds. A long
        poll: `build --wait` shows the end at once without asking twice a second."""
        wait = min(max(wait, 0.0), 30.0)
        deadline = time.monotonic() + wait
        def here() -> bool:
            return self.ledger.build(build_id) is not None or self.node.leadership.caught_up

        while not here() and time.monotonic() < deadline:  # (a node catching up applies
            await until(self._changed, here, CATCH_UP_POLL_S)  # entries: each wakes this)
        if self.ledger.build(build_id) is None:
            return self.build_view(build_id)  # (forgotten: its end, from the history)
        first = wait if known is None else min(wait, PROGRESS_S)
        def finished() -> bool:
            return self.ledger.finished(build_id)

        if not await until(self._changed, finished, first) and known is not None:
            await until(self._changed,
                        lambda: finished() or self.ledger.progress(build_id) != known,
                        max(0.0, deadline - time.monotonic()))
        return self.build_view(build_id)

    def build_view(self, build_id: str) -> dict[str, Any]:
        build = self.ledger.build(build_id)
        if build is None:
            return self._ended_view(build_id)
        progress = self.ledger.progress(build_id)
        running: dict[str, int] = {}
        for j in self.ledger.active_in(build_id):
            if j.node:
                name = self.node.member_name(j.node)
                running[name] = running.get(name, 0) + 1
        return {"build": build_id, "name": build.name, "progress": progress,
                "running": running, "finished": self.ledger.finished(build_id),
                "ok": progress["done"] == progress["total"],
                "kwh": self.ledger.energy(build_id) / 3.6e6}

    def _ended_view(self, build_id: str) -> dict[str, Any]:
        """`build_view` of a build the ledger has forgotten: its end, from the history."""
        row = self._history_row(build_id)
        progress = dict.fromkeys(STATES, 0)
        for state in (DONE, BLOCKED, CANCELLED):
            progress[state] = row[state] or 0
        progress["total"] = row["jobs"] or 0
        return {"build": build_id, "name": row["name"], "progress": progress, "running": {},
                "finished": True, "ok": progress["done"] == progress["total"],
                "kwh": (row["joules"] or 0.0) / 3.6e6, "forgotten": True}

    async def fetch_outputs(self, build_id: str, out: Path) -> list[str]:
        """Each done job's artifacts as OUT/JOB/PATH (fetched from its worker, else from the
        submitter, which keeps a copy, if not here); for a build the ledger has forgotten, as
        the history recorded them. Waits for the build's end (it may be running again: a job
        whose outputs were lost with its worker is built again, `_reclaim`), up to REDO_WAIT_S
        in all."""
        build = self.ledger.build(build_id)
        if build is None:
            submitter = (self.history.build_row(build_id) or {}).get("submitter")
            written: list[str] = []
            for name, row in sorted(self._forgotten(build_id).items()):
                if row["result"] == DONE:
                    sources = self._live(n for n in (row["node"], submitter) if n)
                    written += await self._export(name, tuple(row["artifacts"].items()),
                                                  sources, out)
            return written
        deadline = time.monotonic() + REDO_WAIT_S
        if not await until(self._changed, lambda: self.ledger.build(build_id) is None
                           or self.ledger.finished(build_id), REDO_WAIT_S):
            raise ControlError(f"build {build_id} is still running: wait for it "
                               f"(`swarmnode build wait {build_id}`) and fetch its outputs then")
        if self.ledger.build(build_id) is None:  # (forgotten meanwhile: from the history)
            return await self.fetch_outputs(build_id, out)
        written = []
        for job in [j for j in self.ledger.jobs(build_id) if j.state == DONE]:
            written += await self._job_outputs(job.key, build.submitter, out, deadline)
        return written

    async def _job_outputs(self, key: str, submitter: str, out: Path,
                           deadline: float) -> list[str]:
        while True:
            job = self.ledger.job(key)
            if job is None:
                raise ControlError(f"{key} was forgotten while its outputs were fetched")
            if job.state == DONE:
                sources = self._live(dict.fromkeys(n for n in (job.node, submitter) if n))
                try:
                    return await self._export(job.name, job.artifacts, sources, out)
                except ArtifactError:
                    if self._live([job.node] if job.node else []):
                        raise
                    if submitter == self.node.id:  # (fetched again by `_reclaim`, or built again)
                        self._lost.setdefault(key, 0.0)
                        self._wake.set()
            elif job.state not in (QUEUED, ASSIGNED, RUNNING):
                raise ControlError(f"{key} is {job.state} now: its outputs are gone")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ControlError(
                    f"{key}'s outputs were lost with its worker, which is not back, and it is "
                    "not built again yet: wait for the build (`swarmnode build wait "
                    f"{key.partition('/')[0]}`) and fetch them then")

            def again(attempt: int = job.attempt) -> bool:  # done again, or forgotten
                j = self.ledger.job(key)
                return j is None or (j.state == DONE and j.attempt != attempt)

            # (and looked at again every REDO_ASK_S: the worker may be back with the outputs,
            # or the submitter have had them from it, which no ledger entry says)
            await until(self._changed, again, min(left, REDO_ASK_S))

    async def _export(self, name: str, artifacts: Iterable[tuple[str, str]],
                      sources: list[str], out: Path) -> list[str]:
        written = []
        for path, digest in artifacts:
            await self.node.artifacts.fetch(digest, sources)
            dest = out / name / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.node.artifacts.store.export(digest, dest, link=False, overwrite=True)
            written.append(str(dest))
        return written

    async def log_view(self, name: str, since: int = 0, wait: bool = False) -> dict[str, Any]:
        """The ledger's record of a job (`BUILD/JOB`, or JOB in the newest build having it) and
        its output from offset `since`, asked of the node that runs or ran it (`wait`: a long
        poll for new output of a running job). `output` is None when that node does not have
        it (it restarted, or no longer keeps it); `total` is the output's length so far and
        `start` the offset `output` begins at (after `since` when bytes were not kept). A
        `BUILD/JOB` of a build the ledger forgot: its end from the history."""
        job = self.ledger.job(name) if "/" in name else next(
            (self.ledger.job(job_key(b.build_id, name)) for b in reversed(self.ledger.builds())
             if self.ledger.job(job_key(b.build_id, name))), None)
        if job is None and "/" in name and self.ledger.build(name.partition("/")[0]) is None:
            return await self._forgotten_log(name, since)
        if job is None:
            raise ControlError(f"no job {name!r}")
        view = {"job": job.key, "state": job.state, "node": self._name(job.node),
                "attempt": job.attempt, "reason": job.reason,
                "failed_on": [self.node.member_name(n) for n in job.failed_on],
                "log_tail": job.log_tail}
        got = await self._job_output(job.node, job.build_id, job.name, job.attempt, since,
                                     wait) if job.node and job.attempt else None
        return _with_output(view, got)

    async def _forgotten_log(self, name: str, since: int) -> dict[str, Any]:
        """`log_view` of a job of a build the ledger forgot: its end from the history, and its
        output from its node (which keeps its last MAX_OUTPUTS jobs' output)."""
        build_id, _, job_name = name.partition("/")
        self._history_row(build_id)  # (ControlError: no such build, or still catching up)
        end = job_ends(self.history.attempts(build_id)).get(job_name)
        if end is None:
            raise ControlError(f"no job {name!r}")
        view = {"job": name, "state": end["result"], "node": self._name(end["node"]),
                "attempt": end["attempt"], "reason": end["reason"], "failed_on": [],
                "log_tail": ""}
        got = await self._job_output(end["node"], build_id, job_name, end["attempt"], since,
                                     False) if end["node"] and end["attempt"] else None
        return _with_output(view, got)

    async def _job_output(self, node: str, build_id: str, job: str, attempt: int, since: int,
                          wait: bool) -> dict[str, Any] | None:
        """A `job.log` request to the job's node (this one too)."""
        return await self._request(node, LOG, {
            "build": build_id, "job": job, "attempt": attempt,
            "since": max(0, since), "wait": wait}, LOG_WAIT_S + 3.0)

    async def set_voters(self, voters: list[str]) -> list[str]:
        """Commit the operator's voter set (empty: automatic again); every node then steps
        toward it one member at a time."""
        cmd = SetVoters(tuple(sorted(set(voters))))
        await self.propose_anywhere(encode(cmd), what="set voters")
        await self._until(lambda: self.ledger.pinned_voters == cmd.voters,
                          "the voter change was committed but has not reached this node")
        return list(self.ledger.pinned_voters)

    async def pause(self, node: str, paused: bool) -> None:
        """Commit an operator's pause (or resume) of `node`: whoever leads gives it no new
        work while paused; its running jobs finish (and jobs only it could run wait)."""
        if behind := self._before(FORMAT_COSTS):
            raise ControlError(
                f"{', '.join(sorted(behind)[:5])} cannot read a pause: a swarmnode from before "
                "ledger format 3 (push the new version to every node), or no record yet "
                "(a member that was never heard from: wait, or remove it)")
        await self.propose_anywhere(encode(Pause(node, paused)),
                                    what="pause" if paused else "resume")
        await self._until(lambda: (node in self.ledger.paused) == paused,
                          "the pause was committed but has not reached this node")

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
        try:
            self.history.close()
        except sqlite3.Error as exc:
            log.warning("cannot write the build history: %s", exc)


def _with_output(view: dict[str, Any], got: dict[str, Any] | None) -> dict[str, Any]:
    """`view` with the output a job's node answered (None when it does not have it)."""
    view.update(output=None, total=0, start=0, live=False)
    if got is not None and got.get("state") in ("running", "finished"):
        data, total = got.get("data"), got.get("total")
        if isinstance(data, bytes) and type(total) is int:
            view.update(output=data.decode("utf-8", "replace"), total=total,
                        start=total - len(data), live=got["state"] == "running")
    return view


def _report_command(key: str, worker: str, attempt: int, status: Any,
                    report: Mapping[str, Any], costed: bool) -> Report:
    """The ledger command for a worker's `done`/`failed` report on `key`, as the replicas will
    read it (with its seconds and joules if `costed`; a figure out of range counts as not
    stated); raises LedgerError (only) for a report that is not a valid command: outputs that
    are not a list of [path, digest, size] with distinct paths, a digest that is not sha256,
    too many outputs, a path too long or not normalised."""
    cost = (_figure(report.get("duration"), MAX_SECONDS),
            _figure(report.get("joules"), MAX_JOULES)) if costed else (0.0, 0.0)
    if status != "ok":
        reason = f"{status}: {report.get('reason') or ''}".strip()[:900]
        return checked(Failed(key, worker, attempt, reason,  # type: ignore[return-value]
                              str(report.get("log_tail", ""))[-8000:], *cost))
    outputs = report.get("outputs")
    outputs = [] if outputs is None else outputs
    if type(outputs) is not list or not all(type(o) is list and len(o) == 3 for o in outputs):
        raise LedgerError("outputs: expected a list of [path, digest, size]")
    done = checked(Done(key, worker, attempt, tuple((o[0], o[1]) for o in outputs), *cost))
    if len(done.artifacts) != len(outputs):  # type: ignore[union-attr]
        raise LedgerError("outputs: a path twice")
    return done  # type: ignore[return-value]


def _figure(value: Any, most: float) -> float:
    return float(value) if in_range(value, most) else 0.0


def _op(entry: bytes) -> str | None:
    with contextlib.suppress(Exception):
        value = msgpack.unpackb(entry, raw=False)
        if isinstance(value, Mapping):
            return value.get("op")
    return None


def _unsatisfiable(r: Requires) -> str:
    wants = [f"{k}={v}" for k, v in (("arch", r.arch), ("kind", r.kind)) if v]
    wants += [f"Portage environment {t.removeprefix(TAG_PREFIX)} (`swarmnode nodes` shows "
              "which members differ, and in what)" if t.startswith(TAG_PREFIX) else f"tag {t}"
              for t in sorted(r.tags)] + [f"{r.cores} cores"]
    return "no member can run it (" + ", ".join(wants) + ")"

