"""The worker side of builds: run what the leader assigns, and make sure it hears the result.

The leader sends `job.assign` (signed, over the member's proven route) carrying its term. The
worker obeys an assignment or cancellation only from the proven leader of that term (the
Raft core checked its `LeaderProof`: election/proof.py), so a member that merely claims to
lead, at whatever term, runs nothing and moves no fence; and it fences on terms — one from a
lower term than it has seen is refused, so a deposed leader cannot start or stop anything.
Acknowledgements, which let the worker forget a report, count only from the current leader.
The worker fetches the job's inputs and its dependencies' outputs (artifacts, from the members
named as sources), runs the job with the executor on free cores, stores the outputs in its
artifact store, and reports.

A report is persisted as it is sent (before any acknowledgement can arrive) and re-sent to
whoever leads now until one acknowledges it (at once to a new leader): a worker cut off from
the leader finishes its jobs and delivers the results when a leader is reachable again.
Whether a report still counts (the job may have been reassigned meanwhile) is the ledger's
decision, not the worker's. A job is reported started only once it has run STARTED_AFTER_S
(a shorter one goes from assigned to done or failed in the ledger).

Wire (msgpack maps inside the signed envelope). Assignments, reports and acknowledgements
made in one turn of the sender's loop travel together, one message per peer (a single map is
still understood as a list of one):
  job.assign  {assignments: [{build, job, attempt, term, cmd, env, outputs, cores, timeout,
               inputs: [[path, digest]], deps: {job: [[path, digest]]}, sources: [id]}],
               acks: [...]}  (acks as in job.report_ack: those of the same turn ride along)
  job.cancel  {build, job (or null: the whole build), term, attempt (optional: only that
              attempt of the job, e.g. one whose `started` the leader found stale)}
  job.report  {reports: [{build, job, attempt, node, status, outputs: [[path, digest, size]],
               reason, log_tail, duration}]}  (status "started": only build, job, attempt)
  job.report_ack {acks: [{build, job, attempt}]}
  job.held    {held: [[build, job, attempt]]}  to each new leader, then every HELD_S while
              this node holds attempts or the ledger has jobs on it
  job.confirm {rid, build, job, attempt}  to the leader, before starting an assignment the
              worker may have been out of touch for (see `Worker._in_touch`)
  job.confirm_reply {rid, state: current|moved|unknown, term}  the leader's answer
              (Builds.attempt_state); counts only from the proven leader of `term` >= the
              assignment's
  job.log     {rid, build, job, attempt, since, wait}  any member asks
  job.log_reply {rid, state: running|finished|unknown, total, data}  the output after
              offset `since` (the last 4 KiB at most); with `wait`, held up to LOG_WAIT_S
              until there is some, for `logs --follow`

The reports finished and the acknowledgements received in one turn are written to the outbox
in one transaction (one fsync), as the reports are sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from net.transport import Inbound
from swarmnode.artifact_service import ArtifactError
from swarmnode.artifacts import is_digest
from swarmnode.build.executor import (
    DEFAULT_PATH,
    EndedOutput,
    Executor,
    JobResult,
    JobSpec,
    Retention,
    RunningJob,
    Slots,
    SweepResult,
    sweep_job_dirs,
)
from swarmnode.build.plan import PlanError, check_name
from swarmnode.election.config import Config as ElectionConfig
from swarmnode.ledger import ACTIVE, Fence
from swarmnode.tasks import TaskSet

if TYPE_CHECKING:
    from swarmnode.node import Node

log = logging.getLogger(__name__)

ASSIGN, CANCEL, REPORT, REPORT_ACK = "job.assign", "job.cancel", "job.report", "job.report_ack"
HELD = "job.held"
LOG, LOG_REPLY = "job.log", "job.log_reply"
CONFIRM, CONFIRM_REPLY = "job.confirm", "job.confirm_reply"
TYPES = frozenset({ASSIGN, CANCEL, REPORT, REPORT_ACK, HELD, LOG, LOG_REPLY, CONFIRM,
                   CONFIRM_REPLY})
#: The leader's answers to `job.confirm` (Builds.attempt_state).
CURRENT, MOVED, UNKNOWN = "current", "moved", "unknown"
FENCE_KEY = "fence_term"
#: How often unacknowledged reports are sent again (to the current leader).
RESEND_S = 1.0
#: How often the worker tells the leader which attempts it holds (running, or reported and not
#: yet acknowledged): a node that restarted holds none, and its running jobs are requeued.
HELD_S = 5.0
#: Longest the worker's loop sleeps when no leader changes: its resends are due every
#: RESEND_S / 2 at the soonest (a new leader wakes it at once, see Leadership.on_leader).
WAKE_S = RESEND_S / 2
#: A job still running this long after it was started is reported started (a shorter one is
#: only reported finished: one message and one ledger command fewer for a short job).
STARTED_AFTER_S = 0.05
#: Bounds on an assignment: a job is a command line and a list of files, never megabytes.
MAX_BODY = 1024 * 1024
MAX_FILES = 10_000
MAX_TAIL = 4096
#: Attempts finished here whose report is not yet acknowledged, at most (each is also a report
#: in the outbox).
MAX_FINISHED = 10_000
#: How long an attempt is still remembered as finished here after the leader acknowledged its
#: report (the acknowledgement follows the commit of its result). No leader sends it again
#: after that commit; an assignment sent before it arrives within a round trip, or is older
#: than OUT_OF_TOUCH_S and asks the leader first; and this node's replica voids it once it has
#: applied the result. A minute is a wide margin, and keeps the set at a minute's jobs.
FINISHED_KEEP_S = 60.0
#: Finished jobs whose output (its last TAIL_BYTES, as an EndedOutput) this node keeps for
#: `logs`: at most ~4 MB. (The ledger keeps only a failure's tail; a successful job's
#: directory is removed.)
MAX_OUTPUTS = 1000
#: Longest a `job.log` request waits for new output of a running job (a long poll).
LOG_WAIT_S = 2.0
#: Out of touch: silence from a sender, or an assignment's age here, longer than the election
#: timeout (a follower that heard no leader this long may already be electing another). The
#: leader requeues a job only once membership declares its worker dead, seconds of silence
#: later (SWIM's suspicion timeout), so an assignment acted on within this of its arrival,
#: over a connection with no such silence before it, cannot have been done elsewhere.
OUT_OF_TOUCH_S = ElectionConfig().election_timeout_min
#: The leader's answer to `job.confirm` counts only if the job starts within this of asking
#: (a LAN or tailnet round trip is 1-50 ms; a stall in between would make the answer old).
#: No answer by then: not started; the leader re-sends the assignment (builds.RESEND_S).
CONFIRM_S = OUT_OF_TOUCH_S


class AssignmentError(ValueError):
    """A malformed assignment; the message names the field."""


@dataclass(frozen=True)
class Assignment:
    build: str
    job: str
    attempt: int
    term: int
    cmd: str | tuple[str, ...]
    env: Mapping[str, str]
    outputs: tuple[str, ...]
    cores: int
    timeout: float | None
    inputs: tuple[tuple[str, str], ...]
    deps: Mapping[str, tuple[tuple[str, str], ...]]
    sources: tuple[str, ...]

    def plain(self) -> dict[str, Any]:
        """The wire form (field by field: `asdict`'s deep copy costs more than the send)."""
        return {"build": self.build, "job": self.job, "attempt": self.attempt,
                "term": self.term,
                "cmd": list(self.cmd) if isinstance(self.cmd, tuple) else self.cmd,
                "env": dict(self.env), "outputs": list(self.outputs), "cores": self.cores,
                "timeout": self.timeout, "inputs": [list(p) for p in self.inputs],
                "deps": {k: [list(p) for p in v] for k, v in self.deps.items()},
                "sources": list(self.sources)}

    @classmethod
    def from_plain(cls, v: Any) -> Assignment:
        if not isinstance(v, dict):
            raise AssignmentError("assignment: not a map")
        try:
            for key in ("build", "job"):
                check_name(v.get(key), key)
            cmd = v.get("cmd")
            if isinstance(cmd, list) and cmd and all(isinstance(a, str) for a in cmd):
                cmd = tuple(cmd)
            elif not isinstance(cmd, str) or not cmd:
                raise AssignmentError("cmd: a command line or a list of strings")
            return cls(
                build=v["build"], job=v["job"], attempt=_int(v, "attempt"), term=_int(v, "term"),
                cmd=cmd, env=_env(v.get("env", {})), outputs=_strs(v.get("outputs", []), "outputs"),
                cores=max(1, _int(v, "cores")), timeout=_timeout(v.get("timeout")),
                inputs=_files(v.get("inputs", []), "inputs"),
                deps={check_name(k, "deps"): _files(f, f"deps.{k}")
                      for k, f in _map(v.get("deps", {}), "deps").items()},
                sources=_strs(v.get("sources", []), "sources"))
        except PlanError as exc:
            raise AssignmentError(str(exc)) from exc


def _int(v: dict[str, Any], key: str) -> int:
    n = v.get(key)
    if type(n) is not int or not 0 <= n < 2**63:
        raise AssignmentError(f"{key}: a non-negative integer")
    return n


def _timeout(t: Any) -> float | None:
    if t is None:
        return None
    if isinstance(t, bool) or not isinstance(t, int | float) or t <= 0:
        raise AssignmentError("timeout: positive seconds or null")
    return float(t)


def _map(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict) or len(v) > MAX_FILES:
        raise AssignmentError(f"{what}: a map")
    return v


def _env(v: Any) -> dict[str, str]:
    env = _map(v, "env")
    if not all(isinstance(k, str) and isinstance(x, str) for k, x in env.items()):
        raise AssignmentError("env: strings to strings")
    return env


def _strs(v: Any, what: str) -> tuple[str, ...]:
    if not isinstance(v, list) or len(v) > MAX_FILES or not all(isinstance(s, str) for s in v):
        raise AssignmentError(f"{what}: a list of strings")
    return tuple(v)


def _files(v: Any, what: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(v, list) or len(v) > MAX_FILES:
        raise AssignmentError(f"{what}: a list of [path, digest]")
    out = []
    for item in v:
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                or not is_digest(item[1])):
            raise AssignmentError(f"{what}: a list of [path, digest]")
        out.append((item[0], item[1]))
    return tuple(out)


@dataclass
class Contact:
    """What this node heard from one member: when last, since when without a silence longer
    than OUT_OF_TOUCH_S, the newest (epoch, seq) of its envelopes, and whether the message
    being handled came after a newer one (overtaken: it may have been held up on the way)."""

    last: float
    resumed: float
    newest: tuple[int, int]
    late: bool = False

    def heard(self, now: float, stamp: tuple[int, int]) -> None:
        if now - self.last > OUT_OF_TOUCH_S:
            self.resumed = now
        self.last = now
        self.late = stamp < self.newest
        self.newest = max(self.newest, stamp)


class Worker:
    def __init__(self, node: Node) -> None:
        self.node = node
        cores = int(node.core.record.facts_dict().get("cores", os.cpu_count() or 1))
        self.slots = Slots(cores)
        # (Portage's directory first: a Gentoo Prefix's emerge and its helpers are found)
        self.executor = Executor(node.home / "jobs", slots=self.slots, node=node.id,
                                 path=node.portage.path if node.portage else DEFAULT_PATH)
        self.fence = Fence(term=int(node.store.get(FENCE_KEY, 0)))
        self.running: dict[tuple[str, str], tuple[Assignment, Any]] = {}
        # attempts finished here: a leader re-sending an assignment it has not yet seen
        # reported must not make it run twice (those whose report waits on disk finished
        # before a restart: they count too); and those acknowledged, when, oldest first
        # (forgotten after FINISHED_KEEP_S)
        self.finished = finished_in(node.store.outbox())
        self.acked: OrderedDict[tuple[str, str, int], float] = OrderedDict()
        # finished here, newest last: their output, for `logs` (kept in memory only)
        self.outputs: OrderedDict[tuple[str, str, int], EndedOutput] = OrderedDict()
        self._sent_at: dict[str, float] = {}  # outbox key -> when the report was last sent
        # this turn's work, done once at its end: reports to write to the outbox, outbox keys
        # acknowledged, reports to send to the leader
        self._unsaved: list[dict[str, Any]] = []
        self._acked: list[str] = []
        self._outgoing: list[dict[str, Any]] = []
        self._flush_soon = False
        self._tasks = TaskSet()
        self._contact: dict[str, Contact] = {}  # member -> what this node heard from it
        # attempts received in touch with their leader -> when (`_in_touch`)
        self._fresh: dict[tuple[str, str, int], float] = {}
        # `job.confirm`s awaiting the leader's answer: rid -> (asked whom, term at least, fut)
        self._confirms: dict[bytes, tuple[str, int, asyncio.Future[str]]] = {}
        self._leader_moved = asyncio.Event()
        node.leadership.on_leader.append(lambda _leader: self._leader_moved.set())

    def handles(self, msg_type: str) -> bool:
        return msg_type in (ASSIGN, CANCEL, REPORT_ACK, LOG, CONFIRM_REPLY)

    def heard(self, sender: str, stamp: tuple[int, int], now: float) -> None:
        """An admitted member's message (any service's, the leader's heartbeats included)
        arrived: called by the node before it is handled. A node that was frozen hears
        nothing meanwhile, so a freeze shows here too, as a silence."""
        contact = self._contact.get(sender)
        if contact is None:
            self._contact[sender] = Contact(now, now, stamp)
        else:
            contact.heard(now, stamp)

    # -- inbound --------------------------------------------------------------------------

    def on_message(self, inbound: Inbound) -> None:
        env = inbound.envelope
        try:
            body = unpack_map(env.body)
            if env.type == CANCEL:
                self._on_cancel(env.sender, body)
                return
            if env.type == LOG:
                self._spawn(self._on_log(inbound, body))
                return
            if env.type == CONFIRM_REPLY:
                self._on_confirm_reply(env.sender, body)
                return
            items = batch(body, "assignments") if env.type == ASSIGN else []
            acks = batch(body, "acks") if env.type == REPORT_ACK or "acks" in body else []
        except (KeyError, TypeError, ValueError):
            self.node.drops.drop("malformed_job")
            return
        if acks and env.sender != self.node.leadership.leader:
            self.node.drops.drop("ack_not_from_leader")  # it would make us forget a report
            acks = []
        for item in items:
            try:
                self._on_assign(env.sender, Assignment.from_plain(item))
            except (AssignmentError, KeyError, TypeError, ValueError):
                self.node.drops.drop("malformed_job")
        for item in acks:
            try:
                self._on_ack(item)
            except (KeyError, TypeError, ValueError):
                self.node.drops.drop("malformed_job")

    def _admit_term(self, sender: str, term: Any, what: str) -> bool:
        before = self.fence.term
        if type(term) is not int or self.node.leadership.core.proven_leader(term) != sender:
            self.node.drops.drop("unproven_leader")
            self.node.event("job_refused", {"id": sender, "what": what, "term": term,
                                            "reason": "not the proven leader of that term"})
            return False
        if not self.fence.admit(term):
            self.node.drops.drop("stale_term")
            self.node.event("job_refused", {"id": sender, "what": what, "term": term,
                                            "seen": self.fence.term})
            return False
        if self.fence.term != before:  # durable before obeying the new leader
            self.node.store.put(**{FENCE_KEY: self.fence.term})
        return True

    def _on_assign(self, sender: str, a: Assignment) -> None:
        if not self._admit_term(sender, a.term, f"assign {a.build}/{a.job}"):
            return
        key = (a.build, a.job)
        current = self.running.get(key)
        if current is not None and current[0].attempt >= a.attempt:
            self._send_started(a)  # a re-send: the leader did not hear that it started
            return
        if (a.build, a.job, a.attempt) in self.finished:
            self._send_reports()  # the leader has not heard the result either
            return
        if (a.build, a.job, a.attempt) in self.acked:
            return  # sent before its result was committed
        if current is not None and current[1] is not None:
            current[1].cancel()  # (one still fetching its inputs sees it was superseded)
        self.running[key] = (a, None)
        now = time.monotonic()
        if self._arrived_in_touch(sender, now):
            self._fresh[(a.build, a.job, a.attempt)] = now
        self._spawn(self._run(a))

    def _arrived_in_touch(self, sender: str, now: float) -> bool:
        """Whether the message being handled came from another member whose messages have
        arrived with no silence longer than OUT_OF_TOUCH_S for at least that long, and not
        after a newer one of its own (`heard` has recorded it)."""
        contact = self._contact.get(sender)
        return (sender != self.node.id and contact is not None and not contact.late
                and now - contact.resumed >= OUT_OF_TOUCH_S)

    def _on_cancel(self, sender: str, body: dict[str, Any]) -> None:
        if not self._admit_term(sender, body.get("term"), f"cancel {body.get('build')}"):
            return
        attempt = body.get("attempt")
        self.cancel_build(body.get("build"), body.get("job"),
                          attempt if type(attempt) is int else None)

    def cancel_build(self, build: Any, job: Any = None, attempt: int | None = None) -> None:
        """Stop the build's running jobs (only `job`; only its `attempt`, when given)."""
        for (b, j), (a, handle) in list(self.running.items()):
            if (b == build and job in (None, j) and attempt in (None, a.attempt)
                    and handle is not None):
                handle.cancel()

    async def _on_log(self, inbound: Inbound, body: dict[str, Any]) -> None:
        """A member asks for a job's output from offset `since`: what is there now or, for a
        running job with nothing new, as soon as there is (at most LOG_WAIT_S)."""
        build, job, attempt, since = (body.get("build"), body.get("job"), body.get("attempt"),
                                      body.get("since", 0))
        if type(since) is not int or since < 0:
            since = 0
        total, data, state = 0, b"", "unknown"
        handle = self.job_output(build, job, attempt)
        if handle is not None:
            total, data = await handle.output_after(since, LOG_WAIT_S if body.get("wait")
                                                    else 0.0)
            state = "finished" if handle.done else "running"
        inbound.reply(LOG_REPLY, pack({"rid": body.get("rid"), "state": state,
                                       "total": total, "data": data}))

    def job_output(self, build: Any, job: Any, attempt: Any) -> RunningJob | EndedOutput | None:
        """The attempt of a job running or recently finished here, whose `output` can be
        read."""
        if not isinstance(build, str) or not isinstance(job, str) or type(attempt) is not int:
            return None
        current = self.running.get((build, job))
        if current is not None and current[1] is not None and current[0].attempt == attempt:
            return current[1]
        return self.outputs.get((build, job, attempt))

    def _on_ack(self, body: dict[str, Any]) -> None:
        key = _report_key(body)
        if self._sent_at.pop(key, None) is not None:
            self._acked.append(key)
            self._soon()
            attempt = (body.get("build"), body.get("job"), body.get("attempt"))
            if all(isinstance(x, str) for x in attempt[:2]) and type(attempt[2]) is int \
                    and attempt in self.finished:
                del self.finished[attempt]
                self.acked[attempt] = time.monotonic()
        self._forget_acked(time.monotonic())

    def _forget_acked(self, now: float) -> None:
        """Forget acknowledged attempts after FINISHED_KEEP_S (and beyond MAX_FINISHED)."""
        acked = self.acked
        while acked and (len(acked) > MAX_FINISHED
                         or now - next(iter(acked.values())) > FINISHED_KEEP_S):
            acked.popitem(last=False)

    # -- running --------------------------------------------------------------------------

    async def _run(self, a: Assignment) -> None:
        key = (a.build, a.job)
        try:
            outcome = await self._execute(a)
        finally:
            self._fresh.pop((a.build, a.job, a.attempt), None)
            mine, handle = self.running.get(key, (None, None))
            if mine is a:  # (not a newer attempt of the job, which took the slot)
                del self.running[key]
            if mine is a and handle is not None:
                self.outputs[(a.build, a.job, a.attempt)] = handle.ended()
                while len(self.outputs) > MAX_OUTPUTS:
                    self.outputs.popitem(last=False)
        if outcome is not None:
            self._report(a, *outcome)

    async def _execute(self, a: Assignment) -> tuple[JobResult | str, float] | None:
        """The job run here: its result (or why it could not run) and its energy share; None
        when it was not started for want of the leader's confirmation (nothing to report: the
        leader sends it again). Its inputs are pinned while it runs (the artifact GC keeps
        them)."""
        needed = [d for _p, d in a.inputs] + [d for f in a.deps.values() for _p, d in f]
        if not needed:
            return await self._fetched(a, ())
        artifacts = self.node.artifacts
        try:
            owner = artifacts.pin_run((a.build, a.job, a.attempt), needed)
        except OSError as exc:
            return f"could not pin its inputs: {exc.strerror or exc}", 0.0
        try:
            return await self._fetched(a, needed)
        finally:
            with contextlib.suppress(OSError):
                artifacts.store.release(owner)

    async def _fetched(self, a: Assignment,
                       needed: list[str]) -> tuple[JobResult | str, float] | None:
        store = self.node.artifacts.store
        try:
            for digest in dict.fromkeys(needed):
                await self.node.artifacts.fetch(digest, a.sources)
        except ArtifactError as exc:
            return f"could not fetch an input: {exc}", 0.0
        if not self._in_touch(a):
            asked = time.monotonic()
            verdict = await self._confirm(a)
            if verdict == MOVED:
                return "the leader has moved past this attempt", 0.0
            if verdict != CURRENT or time.monotonic() - asked > CONFIRM_S:
                self.node.drops.drop("job_unconfirmed")
                self.node.event("job_unconfirmed", {"build": a.build, "job": a.job,
                                                    "attempt": a.attempt, "answer": verdict})
                return None
        if self.running.get((a.build, a.job), (None,))[0] is not a:
            return "superseded by a newer attempt while fetching its inputs", 0.0
        if self._void(a):
            return "the ledger here has moved past this attempt", 0.0
        spec = JobSpec(build_id=a.build, job=a.job, cmd=a.cmd, outputs=a.outputs, env=a.env,
                       cores=min(a.cores, self.slots.total), attempt=a.attempt,
                       timeout=a.timeout)

        async def keep(path: Path, _output: Any) -> None:
            await asyncio.to_thread(store.put_file, path)

        handle = self.executor.start(
            spec, [(p, store.path(d)) for p, d in a.inputs],
            {k: [(p, store.path(d)) for p, d in f] for k, f in a.deps.items()}, store=keep)
        self.running[(a.build, a.job)] = (a, handle)
        # A job done within STARTED_AFTER_S is reported once, done (or failed) from assigned.
        asyncio.get_running_loop().call_later(STARTED_AFTER_S, self._still_running, a, handle)
        meter, run = self.node.power, object()  # (one key per run, however the job repeats)
        meter.share.start(time.monotonic(), run, spec.cores)
        try:
            result = await handle.wait()
        finally:
            now = time.monotonic()
            try:
                meter.refresh(now)  # the draw up to its end, shared
            finally:
                joules = meter.share.end(now, run)
        return result, joules

    def _void(self, a: Assignment) -> bool:
        """This node's replica of the ledger already requeued, reassigned or finished the
        attempt: an assignment that sat out a freeze (or its input fetch did) must not start
        a job done elsewhere meanwhile. (Not applied here yet: the leader sent it after
        committing it, so it stands.)"""
        job = self.node.leadership.ledger.job(f"{a.build}/{a.job}")
        if job is None or job.attempt < a.attempt:
            return False
        return (job.node, job.attempt) != (self.node.id, a.attempt) or job.state not in ACTIVE

    def _in_touch(self, a: Assignment) -> bool:
        """Whether `a` may start without asking the leader: it came from another member over
        a connection that had carried messages with no silence longer than OUT_OF_TOUCH_S for
        at least that long, not overtaken by a newer message from its sender, and arrived at
        most OUT_OF_TOUCH_S ago (time.monotonic runs on while the process is stopped: a
        freeze since counts); and the replica here has applied what it knows is committed.
        Otherwise the leader may have requeued it meanwhile (a frozen worker is declared
        dead), and the replica here need not show it yet. (The leader's own assignments to
        itself are confirmed in process: no round trip.)"""
        received = self._fresh.get((a.build, a.job, a.attempt))
        core = self.node.leadership.core
        return (received is not None and time.monotonic() - received <= OUT_OF_TOUCH_S
                and core.applied_index >= core.commit_index)

    async def _confirm(self, a: Assignment) -> str:
        """Ask the leader whether `a` is still this node's current attempt of its job
        (CURRENT, MOVED or UNKNOWN); UNKNOWN when no leader answers within CONFIRM_S. Only
        the proven leader of the assignment's term or a later one is believed."""
        leader = self.node.leadership.leader
        if leader == self.node.id:
            return self.node.builds.attempt_state(self.node.id, a.build, a.job, a.attempt)
        if leader is None:
            return UNKNOWN
        rid = os.urandom(8)
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._confirms[rid] = (leader, a.term, fut)
        try:
            self.node.send_raw(leader, CONFIRM, pack({"rid": rid, "build": a.build,
                                                      "job": a.job, "attempt": a.attempt}))
            async with asyncio.timeout(CONFIRM_S):
                return await fut
        except TimeoutError:
            return UNKNOWN
        finally:
            self._confirms.pop(rid, None)

    def _on_confirm_reply(self, sender: str, body: dict[str, Any]) -> None:
        rid, state, term = body.get("rid"), body.get("state"), body.get("term")
        waiting = self._confirms.get(rid) if isinstance(rid, bytes) else None
        if waiting is None or waiting[2].done():
            return
        asked, at_least, fut = waiting
        if (sender != asked or type(term) is not int or term < at_least
                or self.node.leadership.core.proven_leader(term) != sender):
            self.node.drops.drop("confirm_not_from_leader")
            return
        fut.set_result(state if state in (CURRENT, MOVED) else UNKNOWN)

    def _still_running(self, a: Assignment, handle: Any) -> None:
        if not handle.done and self.running.get((a.build, a.job), (None, None))[1] is handle:
            self._send_started(a)

    def _send_started(self, a: Assignment) -> None:
        self._outgoing.append({"build": a.build, "job": a.job, "attempt": a.attempt,
                               "status": "started", "node": self.node.id})
        self._soon()

    def _report(self, a: Assignment, result: JobResult | str, joules: float) -> None:
        if isinstance(result, str):
            report = {"status": "error", "reason": result, "outputs": [], "log_tail": "",
                      "duration": 0.0, "joules": 0.0}
        else:
            report = {"status": result.status, "reason": result.reason,
                      "outputs": [[o.path, o.sha256, o.size] for o in result.outputs],
                      "log_tail": result.log_tail[-MAX_TAIL:], "duration": result.duration,
                      "joules": round(joules, 3)}
            self.node.metrics.job_seconds.labels(result.status).observe(result.duration)
            self.node.metrics.job_joules.labels(result.status).inc(joules)
        report.update(build=a.build, job=a.job, attempt=a.attempt, node=self.node.id)
        self.finished[(a.build, a.job, a.attempt)] = None
        while len(self.finished) > MAX_FINISHED:
            self.finished.popitem(last=False)
        if report["status"] != "ok":  # the ledger records every job; the log, what went wrong
            self.node.event("job_failed_here", {"build": a.build, "job": a.job,
                                                "attempt": a.attempt, "status": report["status"],
                                                "reason": str(report["reason"])[:200]})
        self._unsaved.append(report)
        self._soon()

    def pending_reports(self) -> list[dict[str, Any]]:
        return self.node.store.outbox()

    def _soon(self) -> None:
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """The turn's reports in one message, and its outbox writes in one transaction right
        after (in the same callback: an acknowledgement cannot come before they are written;
        a crash between the two loses the reports just as a crash before sending would)."""
        self._flush_soon = False
        unsaved, acked, outgoing = self._unsaved, self._acked, self._outgoing
        self._unsaved, self._acked, self._outgoing = [], [], []
        self._send(outgoing + unsaved)
        if unsaved or acked:
            self.node.store.outbox_write([(_report_key(r), r) for r in unsaved], acked)

    def _send(self, reports: list[dict[str, Any]]) -> None:
        leader = self.node.leadership.leader
        now = time.monotonic() if leader else 0.0
        for report in reports:
            if report["status"] != "started":
                self._sent_at[_report_key(report)] = now
        if reports and leader is not None:  # else kept on disk; sent when a leader is known
            self.node.send_raw(leader, REPORT, pack({"reports": reports}))

    def _send_reports(self, older_than: float = 0.0) -> None:
        """Send the unacknowledged reports (those last sent at least `older_than` ago)."""
        now = time.monotonic()
        self._send([r for r in self.pending_reports()
                    if now - self._sent_at.get(_report_key(r), 0.0) >= older_than])

    def held(self) -> list[list[Any]]:
        """The attempts this node holds: running here, or finished and not yet acknowledged --
        including those finished in this turn, whose reports `_flush` has still to write and
        send (a held list sent in between must not make the leader requeue them)."""
        out = [[a.build, a.job, a.attempt] for a, _ in self.running.values()]
        reports = (*self._unsaved, *self._outgoing, *self.pending_reports())
        out += [[r.get("build"), r.get("job"), r.get("attempt")] for r in reports]
        return out

    def _owes_held(self) -> bool:
        """Whether the leader needs this node's held list: it holds attempts, or the ledger
        here has jobs on it (one it does not hold is requeued only once the leader hears so).
        At idle neither, and nothing is sent (40 nodes sent 8 lists a second for nothing)."""
        me = self.node.id
        return bool(self.held()) or any(j.node == me for j in self.node.leadership.ledger.active())

    def _send_held(self, leader: str) -> None:
        self.node.send_raw(leader, HELD, pack({"held": self.held()}))

    async def sweep(self, everything: bool = False) -> SweepResult:
        """Apply the `[disk]` retention to the kept job directories and remove those a crash
        left (executor.sweep_job_dirs, in a thread); `everything`: all no run holds."""
        d = self.node.node_config.disk
        result = await asyncio.to_thread(
            sweep_job_dirs, self.executor.resolved_root(), self.executor.busy,
            Retention(d.jobs_keep, d.jobs_keep_days * 86400, d.jobs_max_bytes), time.time(),
            everything)
        if result.removed:
            self.node.event("job_dirs_swept", {"removed": result.removed, "freed": result.freed,
                                               "leftovers": result.leftovers})
        return result

    async def run(self) -> None:
        """Re-send unacknowledged reports: all of them at once to a new leader (the old one may
        have died with them), else those unacknowledged for RESEND_S; tell the leader what this
        node holds (at once to a new leader, then every HELD_S). First, what a crash left:
        job directories and input pins of runs that died with the node."""
        self.node.artifacts.release_runs()
        await self.sweep()
        leader, resent, told = None, time.monotonic(), time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WAKE_S):
                    await self._leader_moved.wait()
            self._leader_moved.clear()
            now = time.monotonic()
            if self.node.leadership.leader != leader:
                leader = self.node.leadership.leader
                if leader is not None:
                    self._send_reports()
                    self._send_held(leader)
                    told = now
            elif leader is not None and now - told >= HELD_S:
                told = now
                if self._owes_held():
                    self._send_held(leader)
            elif now - resent >= RESEND_S / 2:
                resent = now
                self._send_reports(older_than=RESEND_S)

    def _spawn(self, coro) -> None:
        self._tasks.spawn(coro)

    async def close(self) -> None:
        for _a, handle in self.running.values():
            if handle is not None:
                handle.cancel()
        await self._tasks.close()


def batch(body: dict[str, Any], key: str) -> list[Any]:
    """The list of maps under `key`, or the body itself as a list of one (a single item)."""
    if key not in body:
        return [body]
    items = body[key]
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ValueError(f"{key}: a list of maps")
    return items


def finished_in(outbox: list[Any]) -> OrderedDict[tuple[str, str, int], None]:
    """The attempts whose results wait in the outbox for the leader's acknowledgement."""
    return OrderedDict(((r["build"], r["job"], r["attempt"]), None) for r in outbox
                       if isinstance(r, dict) and r.get("status") not in (None, "started")
                       and {"build", "job", "attempt"} <= r.keys())


def _report_key(r: Mapping[str, Any]) -> str:
    return f"report/{r.get('build')}/{r.get('job')}/{r.get('attempt')}"


def pack(value: Mapping[str, Any]) -> bytes:
    return msgpack.packb(dict(value))


def unpack_map(body: bytes, max_size: int = MAX_BODY) -> dict[str, Any]:
    """A bounded msgpack map (job and build messages); ValueError for anything else."""
    if len(body) > max_size:
        raise ValueError("oversized")
    try:
        value = msgpack.unpackb(body, raw=False, max_str_len=max_size, max_array_len=MAX_FILES,
                                max_map_len=MAX_FILES, max_bin_len=max_size)
    except (TypeError, msgpack.UnpackException) as exc:
        raise ValueError(str(exc)) from exc
    if not isinstance(value, dict):
        raise ValueError("not a map")
    return value
