"""The replicated job ledger under faults: Raft cores, ledgers, clients, a scheduler, workers.

`LedgerSim` extends the election simulator (which already checks one leader per term, log
matching, state machine safety, leader completeness and durability) with the node shell's
ledger duties, played by the simulator the way the shell will play them:

- every node applies committed entries to its own `JobLedger` (restored from the snapshot on
  restart; snapshots carry the ledger);
- clients submit builds at random nodes; a node that leads proposes (half the time in its next
  `Batch`), any other forwards to the leader it knows (one hop). A submission is *accepted*
  when the leader that proposed it applies it (it is committed) and tells the node the client
  asked; unanswered clients retry, so duplicates happen and the ledger must absorb them;
- the leader, once `can_schedule`, assigns ready jobs (term, attempt) -- and, as the node shell
  does, jobs whose last dependency's result is among the reports of the same batch -- in one
  `Batch` entry per loop with the submissions and reports it holds, sends each assignment to
  its worker (again while it is not running), requeues jobs of nodes it cannot reach for a
  while (the failure detector's verdict, taken from the network here), and now and then
  cancels a build or blocks a job, or forgets the finished builds whose clients were told
  FORGET_AFTER ago (`Forget`; the node shell waits `build_retention`, far longer than a
  client retries);
- workers obey an assignment or cancellation only from the proven leader of its term (the
  node whose `LeaderProof` their core checked, as the node's worker does), fence them by term
  (`Fence`), run jobs for a random time, keep their reports in a durable outbox and deliver
  them to the leader they know until their own ledger shows them resolved -- so a worker cut
  off from the leader finishes and reports when it can. The leader gathers the reports it
  receives for its next `Batch` (a `started` is dropped when its job's result is in the same
  batch, as the node shell does), without judging them: the ledger must reject the stale ones
  inside a batch;
- now and then a node sends a deliberately stale report (an older attempt, another node, a
  requeued attempt), remembered as known stale: into the leader's next batch, or as an entry
  of its own (the single-report entries a log written before batching can hold).

Checks on top of the election simulator's, after every step:

- every node's ledger produces the same events for the same entry (determinism);
- no stale completion is applied: an independent tracker of each job's current (node, attempt),
  fed only by assignments and voiding events, must agree with every accepted report, and every
  known-stale report must come out `rejected_stale`;
- a forgotten build had no job held by a node (`forgot_unfinished`), and nodes at the same
  index hold identical ledgers, forgotten builds gone from each;
- no accepted build and no finished result is lost: a leader that can schedule has every build
  accepted so far and every done result in its ledger (checked once per leadership), and at the
  end every node has.

- with `byzantine` members (election/byzantine.py, added by the election simulator), which
  also forge `AssignJob`s and `CancelBuild`s at the current, next and maximum term and reports
  about themselves (the shell attributes a report to its sender; these are known stale): every
  order a worker obeys was sent by a real leader (`ordered`), else `unordered_obeyed`.

`random_run` adds a random fault schedule, then heals and requires that every client was
answered, every accepted build finished and all nodes agree, within a bound.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from swarmnode.election.byzantine import Byzantine
from swarmnode.election.config import Config
from swarmnode.election.core import LEADER, Apply, Election
from swarmnode.election.sim import (
    ElectionSim,
    SimNode,
    Violation,
    random_links,
    run_faults,
    with_random_tail,
)

from .jobs import (
    ACTIVE,
    DONE,
    FAILED,
    MAX_FORGET,
    QUEUED,
    Assign,
    Batch,
    Batched,
    Block,
    Cancel,
    Command,
    Done,
    Failed,
    Fence,
    Forget,
    JobLedger,
    JobSpec,
    LedgerError,
    LedgerEvent,
    Requeue,
    Started,
    SubmitBuild,
    decode,
    encode,
)

_INF = math.inf
LOOP = 0.1
"""Each node's shell loop period (scheduling, outbox delivery)."""
RETRY = 0.3
"""Clients and outboxes resend an unanswered request after this long."""
FORGET_RATE = 2.0
"""Forget entries a second a random run's leader proposes (when it has finished builds)."""
FORGET_AFTER = 1.0
"""A finished build is forgotten only when its clients were told this long ago: no retry of
theirs is still on its way (it would submit the build again, as a new one); messages take at
most 0.15 s here, retries come every RETRY."""
RESEND_ASSIGN = 0.5
"""The leader resends an assignment that has not started (or a running one, in case the
worker restarted) this often."""


# ---------------------------------------------------------------------------------------------
# Shell-to-shell messages (not Raft's)


@dataclass(frozen=True, slots=True)
class Forward:
    """To the leader: propose `entry`; answer `Accepted(req)` to `origin` once applied."""

    req: int
    origin: str
    entry: bytes


@dataclass(frozen=True, slots=True)
class Accepted:
    req: int


@dataclass(frozen=True, slots=True)
class AssignJob:
    """Leader to worker: run this attempt. `term` is the sending leader's (fenced)."""

    job_key: str
    attempt: int
    term: int


@dataclass(frozen=True, slots=True)
class ReportJob:
    """Worker (or anyone) to the leader: put this report in your next `Reports` entry."""

    report: Started | Done | Failed


@dataclass(frozen=True, slots=True)
class CancelBuild:
    build_id: str
    term: int


# ---------------------------------------------------------------------------------------------
# Per-node shell state


@dataclass(slots=True)
class AppDisk:
    """The worker's own durable state: the fence term and the undelivered reports."""

    fence_term: int = 0
    outbox: dict[int, tuple[bytes, Command]] = field(default_factory=dict)
    """req -> (entry, its command) of each report not yet known resolved."""


@dataclass(slots=True)
class NodeApp:
    ledger: JobLedger
    fence: Fence
    requeue_after: float
    running: dict[str, int] = field(default_factory=dict)
    """job key -> the attempt this worker is executing."""
    finished: set[tuple[str, int]] = field(default_factory=set)
    last_try: dict[int, float] = field(default_factory=dict)
    # leader duties (reset when it stops leading)
    lead_term: int = -1
    proposed: dict[int, list[tuple[int, str, int]]] = field(default_factory=dict)
    """log index -> (term, origin, req) of each submission it proposed there for someone."""
    submits: list[tuple[str, int, SubmitBuild]] = field(default_factory=list)
    """Submissions (origin, req, build) for the next `Batch`."""
    inflight: dict[str, int] = field(default_factory=dict)
    """job key (or "cancel:"/"block:" + id) -> index of an unapplied proposal about it."""
    assign_sent: dict[tuple[str, int], float] = field(default_factory=dict)
    reports: dict[tuple[str, str, int], Command] = field(default_factory=dict)
    """Reports received for the next `Reports` entry, by (job key, node, attempt)."""
    lost_since: dict[str, float] = field(default_factory=dict)
    lead_checked: bool = False


@dataclass(slots=True)
class Request:
    build_id: str
    entry: bytes
    told: bool = False
    told_at: float = _INF


class LedgerSim(ElectionSim):
    """An `ElectionSim` whose nodes run the ledger shell duties described in the module
    docstring. `ledger_factory` builds each node's ledger (tests pass broken variants)."""

    def __init__(
        self,
        voters: int,
        observers: int = 0,
        config: Config | None = None,
        seed: int = 0,
        *,
        ledger_factory: type[JobLedger] = JobLedger,
        fail_rate: float = 0.15,
        stale_rate: float = 1.0,
        cancel_rate: float = 0.05,
        block_rate: float = 0.05,
        forget_rate: float = 0.0,
        requeue_after: tuple[float, float] = (0.5, 2.0),
        **kw: Any,
    ) -> None:
        self.ledger_factory = ledger_factory
        self.app_rng = random.Random(seed ^ 0x5EED)
        self.fail_rate = fail_rate
        self.stale_rate = stale_rate
        self.cancel_rate = cancel_rate
        self.block_rate = block_rate
        self.forget_rate = forget_rate
        self.forgotten: dict[str, int] = {}
        """build id -> the log index that forgot it (where first applied)."""
        self.requeue_after = requeue_after
        self.app_disks: dict[str, AppDisk] = {}
        self.requests: dict[int, Request] = {}
        self.accepted: dict[str, int] = {}
        """build id -> the log index at which it was first accepted."""
        self.results: dict[str, tuple[tuple[str, str], ...]] = {}
        """job key -> artifacts of its accepted done report."""
        self.known_stale: set[Command] = set()
        self.outcomes: list[str] = [""]
        """index -> the events its entry produced where it was first applied."""
        self.current: dict[str, tuple[str, int]] = {}
        """The independent tracker: job key -> its current (node, attempt)."""
        self.assigns: dict[tuple[str, int], str] = {}
        self.orders: list[tuple[str, str, AssignJob | CancelBuild]] = []
        """Recent assignments and cancellations sent, (leader, worker, order): to replay as
        a deposed leader's."""
        self.ordered: set[tuple[str, str, AssignJob | CancelBuild]] = set()
        """Every (leader, worker, order) a real leader sent: all a worker may obey."""
        self._req = 0
        self._decoded: dict[bytes, Command | bytes] = {}
        super().__init__(voters, observers, config, seed, **kw)

    # ------------------------------------------------------------------ clients

    def submit(self, build: SubmitBuild, at: str | None = None) -> int:
        """A client submits `build` now, at node `at` (default: a random running node), and
        retries at random running nodes until told."""
        self._req += 1
        req = self._req
        self.requests[req] = Request(build.build_id, encode(build))
        self._client_try(req, at)
        return req

    def _client_try(self, req: int, at: str | None = None) -> None:
        r = self.requests[req]
        if r.told:
            return
        up = self.up_ids()
        if up:
            node = self.nodes[at if at is not None else self.app_rng.choice(up)]
            self._route(node, req, r.entry)
            self._flush(node)
        self.at(self.now + RETRY, lambda: self._client_try(req))

    def all_told(self) -> bool:
        return all(r.told for r in self.requests.values())

    # ------------------------------------------------------------------ hooks

    def _on_start(self, node: SimNode) -> None:
        disk = self.app_disks.setdefault(node.id, AppDisk())
        after = self.app_rng.uniform(*self.requeue_after)
        node.app = NodeApp(self.ledger_factory(), Fence(disk.fence_term), after)
        self.call_at(self.now + self.app_rng.uniform(0, LOOP), node.id, self._looper(node.id))

    def _sm_snapshot(self, node: SimNode) -> bytes:
        return node.app.ledger.snapshot()

    def _sm_load(self, node: SimNode, data: bytes) -> None:
        try:
            node.app.ledger = self.ledger_factory.restore(data)
        except LedgerError as exc:  # a forged snapshot a broken core installed: keep going
            self._violate("bad_snapshot", f"{node.id}: {exc}")
            node.app.ledger = self.ledger_factory()
            node.app.ledger.applied = node.applied

    def _command(self, entry: bytes) -> Command | bytes:
        """The entry decoded once for all nodes (the bytes themselves if not a command)."""
        cmd = self._decoded.get(entry)
        if cmd is None:
            try:
                cmd = decode(entry) if entry else entry
            except LedgerError:
                cmd = entry
            self._decoded[entry] = cmd
        return cmd

    def _on_apply(self, node: SimNode, o: Apply) -> None:
        app: NodeApp = node.app
        parts = app.ledger.apply_parts(o.index, self._command(o.entry))
        events = [e for _cmd, evs in parts for e in evs]
        said = repr([(e.kind, e.data) for e in events])
        if o.index == len(self.outcomes):
            self.outcomes.append(said)
            batched = isinstance(self._command(o.entry), Batch)
            for cmd, evs in parts:
                self._track(o.index, cmd, evs, batched)
        elif o.index < len(self.outcomes) and self.outcomes[o.index] != said:
            self._violate("ledger_divergence", f"{node.id}: entry {o.index} gave {said}")
        # the leader's duties on applying
        app.inflight = {k: i for k, i in app.inflight.items() if i > o.index}
        for term, origin, req in app.proposed.pop(o.index, ()):
            if term == o.term:
                self._answer(node, origin, req, o.index)
        el = node.election
        if el is not None and el.role == LEADER:
            for ev in events:
                if ev.kind == "assigned":
                    self._send_assignment(node, ev.data["job_key"], ev.data["attempt"])

    def _deliver_app(self, node: SimNode, src: str, msg: Any) -> None:
        kind = type(msg)
        if kind is Forward:
            self._offer(node, msg.entry, msg.origin, msg.req)
        elif kind is Accepted:
            r = self.requests.get(msg.req)
            if r is not None and not r.told:
                r.told, r.told_at = True, self.now
        elif kind is AssignJob:
            self._on_assignment(node, src, msg)
        elif kind is CancelBuild:
            self._on_cancel(node, src, msg)
        elif kind is ReportJob:
            self._on_report(node, msg.report)

    # ------------------------------------------------------------------ the shell loop

    def _looper(self, id_: str) -> Callable[[], None]:
        def loop() -> None:
            node = self.nodes[id_]
            el, app = node.election, node.app
            assert el is not None
            app.fence.observe(el.term)
            self.app_disks[id_].fence_term = app.fence.term
            self._sync_lead(node)
            if el.can_schedule(self.now):
                if not app.lead_checked:
                    self._check_complete(node)
                    app.lead_checked = True
                self._schedule(node)
            self._deliver_outbox(node)
            if self.stale_rate and self.app_rng.random() < self.stale_rate * LOOP:
                self._inject_stale(node)
            if self.orders and self.app_rng.random() < self.stale_rate * LOOP:
                self._replay_order(node)
            self.call_at(self.now + LOOP, id_, loop)

        return loop

    def _sync_lead(self, node: SimNode) -> None:
        """Forget the leader duties' state of a leadership that ended."""
        el, app = node.election, node.app
        assert el is not None
        term = el.term if el.role == LEADER else -1
        if term != app.lead_term:
            app.lead_term = term
            app.proposed.clear()
            app.inflight.clear()
            app.assign_sent.clear()
            app.reports.clear()
            app.submits.clear()
            app.lost_since.clear()
            app.lead_checked = False

    def _propose(self, node: SimNode, entry: bytes, origin: str = "", req: int = 0) -> int | None:
        """Propose if leading with a lease; a follower forwards to the leader it knows (once:
        a forwarded request is never forwarded again)."""
        el = node.election
        assert el is not None
        index = el.propose(self.now, entry)
        if index is not None:
            self._sync_lead(node)
            node.app.proposed.setdefault(index, []).append((el.term, origin or node.id, req))
        elif not origin and el.leader not in (None, node.id):
            self.send_app(node.id, el.leader, Forward(req, node.id, entry))  # type: ignore[arg-type]
        return index

    def _route(self, node: SimNode, req: int, entry: bytes) -> None:
        self._offer(node, entry, "", req)

    def _offer(self, node: SimNode, entry: bytes, origin: str, req: int) -> None:
        """A leader keeps half the submissions for its next `Batch`; anything else is proposed
        (or forwarded) at once."""
        el = node.election
        assert el is not None
        cmd = self._command(entry)
        if el.role == LEADER and isinstance(cmd, SubmitBuild) and self.app_rng.random() < 0.5:
            self._sync_lead(node)
            node.app.submits.append((origin or node.id, req, cmd))
        else:
            self._propose(node, entry, origin, req)

    def _answer(self, node: SimNode, origin: str, req: int, index: int) -> None:
        r = self.requests.get(req)
        if r is None:
            return
        self.accepted.setdefault(r.build_id, index)
        self.stats["client_accepted"] += 1
        self.send_app(node.id, origin, Accepted(req))

    # ------------------------------------------------------------------ the leader

    def _schedule(self, node: SimNode) -> None:
        el, app = node.election, node.app
        assert el is not None
        led: JobLedger = app.ledger
        term, rng = el.term, self.app_rng
        everyone = sorted(self.nodes)
        for id_ in everyone:
            if self.nodes[id_].up and self.linked(node.id, id_):
                app.lost_since.pop(id_, None)
            else:
                app.lost_since.setdefault(id_, self.now)
        reports = list(app.reports.values())
        done = {r.job_key for r in reports if isinstance(r, Done)}
        candidates = {j.key: j for j in led.ready()}
        for key in sorted(done):  # their dependents may start once the batch has the results
            for dep in led.dependents(key):
                j = led.job(dep)
                assert j is not None
                if j.state in (QUEUED, FAILED) and all(
                    f"{j.build_id}/{d}" in done or led.job(f"{j.build_id}/{d}").state == DONE
                    for d in j.spec.deps
                ):
                    candidates.setdefault(j.key, j)
        chosen: list[Batched] = []
        for job in candidates.values():
            if job.key in app.inflight or len(chosen) >= 8:
                continue
            fresh = [i for i in everyone if i not in job.failed_on and i not in app.lost_since]
            chosen.append(Assign(job.key, rng.choice(fresh or everyone), term, job.attempt + 1))
        items = [cmd for _o, _r, cmd in app.submits] + reports + chosen
        if items:
            index = self._propose(node, encode(Batch(tuple(items))))
            if index is None:
                return
            app.proposed[index] += [(term, origin, req) for origin, req, _c in app.submits]
            for a in chosen:
                app.inflight[a.job_key] = index  # type: ignore[union-attr]
            self.stats["batches"] += 1
            self.stats["batched"] += len(items)
            self.stats["batched_assigns"] += len(chosen)
            app.reports.clear()
            app.submits.clear()
        for b in led.builds():
            for job in led.jobs(b.build_id):
                if job.state not in ACTIVE or job.key in app.inflight:
                    continue
                assert job.node is not None
                lost = app.lost_since.get(job.node)
                if lost is None:
                    self._send_assignment(node, job.key, job.attempt, resend=True)
                elif self.now - lost >= app.requeue_after:
                    index = self._propose(node, encode(Requeue(job.key, "node lost")))
                    if index is not None:
                        app.inflight[job.key] = index
        self._maybe_cancel_or_block(node, led, term)
        self._maybe_forget(node, led)

    def _maybe_forget(self, node: SimNode, led: JobLedger) -> None:
        app = node.app
        if "forget" in app.inflight or self.app_rng.random() >= self.forget_rate * LOOP:
            return
        recent = {r.build_id for r in self.requests.values()
                  if self.now - r.told_at < FORGET_AFTER}
        ids = [b.build_id for b in led.builds()
               if led.finished(b.build_id) and b.build_id not in recent]
        if ids:
            index = self._propose(node, encode(Forget(tuple(ids[:MAX_FORGET]))))
            if index is not None:
                app.inflight["forget"] = index

    def _maybe_cancel_or_block(self, node: SimNode, led: JobLedger, term: int) -> None:
        rng, app = self.app_rng, node.app
        open_builds = [b for b in led.builds() if b.cancelled_term is None]
        if open_builds and rng.random() < self.cancel_rate * LOOP:
            b = rng.choice(open_builds)
            if self._propose(node, encode(Cancel(b.build_id, term))) is not None:
                for id_ in sorted(self.nodes):
                    self._order(node, id_, CancelBuild(b.build_id, term))
        ready = [j for j in led.ready() if j.key not in app.inflight]
        if ready and rng.random() < self.block_rate * LOOP:
            j = rng.choice(ready)
            index = self._propose(node, encode(Block(j.key, "blocked by the test")))
            if index is not None:
                app.inflight[j.key] = index

    def _send_assignment(self, node: SimNode, key: str, attempt: int, resend: bool = False) -> None:
        el, app = node.election, node.app
        assert el is not None
        job = app.ledger.job(key)
        if job is None or job.node is None:
            return
        last = app.assign_sent.get((key, attempt), -_INF)
        if resend and self.now - last < RESEND_ASSIGN:
            return
        app.assign_sent[(key, attempt)] = self.now
        self._order(node, job.node, AssignJob(key, attempt, el.term))

    def _order(self, node: SimNode, to: str, msg: AssignJob | CancelBuild) -> None:
        """A leader's order to a worker (recorded: the orders a worker may obey)."""
        order = (node.id, to, msg)
        self.ordered.add(order)
        self.orders.append(order)
        del self.orders[:-64]
        self.send_app(node.id, to, msg)

    def _replay_order(self, node: SimNode) -> None:
        """Deliver an old assignment or cancellation again, as a deposed leader (or the network)
        would: only the worker's fence stands between it and a wasted or wrong run."""
        src, to, msg = self.app_rng.choice(self.orders)
        self.stats["orders_replayed"] += 1
        self.send_app(src, to, msg)

    def _forge_app(self, attacker: Byzantine, victim: str) -> list[Any]:
        """A Byzantine member's orders at its lying terms (naming real jobs when there are
        any: an observer holds the log) and reports about itself, the only worker the shell
        lets a report speak for; those are stale (it is never assigned) and known so."""
        rng = attacker.rng
        jobs = sorted(self.current.items())
        key, (_node, attempt) = rng.choice(jobs) if jobs else ("forged/job", (attacker.id, 1))
        out: list[Any] = []
        for t in attacker.terms():
            out.append(AssignJob(key, attempt + rng.choice((0, 1, 1000)), t))
            out.append(CancelBuild(key.partition("/")[0], t))
        if jobs:
            for report in (Started(key, attacker.id, attempt),
                           Done(key, attacker.id, attempt, _artifacts(key, attempt))):
                self.known_stale.add(report)
                out.append(ReportJob(report))
        self.stats["forged_orders"] += 2 * len(attacker.terms())
        return out

    # ------------------------------------------------------------------ workers

    def _admit(self, node: SimNode, src: str, msg: AssignJob | CancelBuild) -> bool:
        """As the node shell's worker: only the proven leader of the order's term is obeyed,
        and only if that term is not older than the fence's (persisted when it grows)."""
        app: NodeApp = node.app
        if not self._from_leader(node, src, msg.term):
            self.stats["unproven_order"] += 1
            return False
        if not app.fence.admit(msg.term):
            self.stats["fenced"] += 1
            return False
        self.app_disks[node.id].fence_term = app.fence.term
        if (src, node.id, msg) not in self.ordered:
            self._violate("unordered_obeyed", f"{node.id} obeys {src}: {msg}")
        return True

    def _from_leader(self, node: SimNode, src: str, term: int) -> bool:
        """Is `src` the leader of `term` whose proof `node` checked?"""
        el = node.election
        assert el is not None
        return el.proven_leader(term) == src

    def _on_assignment(self, node: SimNode, src: str, msg: AssignJob) -> None:
        app: NodeApp = node.app
        if not self._admit(node, src, msg):
            return
        key, attempt = msg.job_key, msg.attempt
        if app.running.get(key) == attempt or (key, attempt) in app.finished:
            return
        app.running[key] = attempt
        self._report(node, Started(key, node.id, attempt))
        run_for = self.app_rng.uniform(0.02, 0.3)
        self.call_at(self.now + run_for, node.id, lambda: self._finish(node.id, key, attempt))

    def _on_report(self, node: SimNode, report: Command) -> None:
        """The leader keeps a report for its next `Reports` entry (a non-leader drops it: the
        sender tries again); a result replaces the `started` of the same attempt."""
        el, app = node.election, node.app
        assert el is not None and isinstance(report, Started | Done | Failed)
        if el.role != LEADER:
            return
        self._sync_lead(node)
        ident = (report.job_key, report.node, report.attempt)
        if not isinstance(app.reports.get(ident), Done | Failed):
            app.reports[ident] = report

    def _send_report(self, node: SimNode, report: Command) -> None:
        el = node.election
        assert el is not None
        if el.leader == node.id:
            self._on_report(node, report)
        elif el.leader is not None:
            self.send_app(node.id, el.leader, ReportJob(report))  # type: ignore[arg-type]

    def _on_cancel(self, node: SimNode, src: str, msg: CancelBuild) -> None:
        app: NodeApp = node.app
        if not self._admit(node, src, msg):
            return
        for key in [k for k in app.running if k.startswith(msg.build_id + "/")]:
            del app.running[key]

    def _finish(self, id_: str, key: str, attempt: int) -> None:
        node = self.nodes[id_]
        app: NodeApp = node.app
        if app.running.get(key) != attempt:
            return  # cancelled meanwhile
        del app.running[key]
        app.finished.add((key, attempt))
        roll = hashlib.blake2b(f"{key}:{attempt}:{id_}".encode(), digest_size=2).digest()
        if roll[0] < self.fail_rate * 256:
            self._report(node, Failed(key, id_, attempt, "exit status 1", "error: it broke"))
        else:
            self._report(node, Done(key, id_, attempt, _artifacts(key, attempt)))

    def _report(self, node: SimNode, cmd: Command) -> None:
        self._req += 1
        self.app_disks[node.id].outbox[self._req] = (encode(cmd), cmd)

    def _deliver_outbox(self, node: SimNode) -> None:
        app: NodeApp = node.app
        outbox = self.app_disks[node.id].outbox
        for req, (_entry, cmd) in list(outbox.items()):
            if _resolved(app.ledger, cmd) or cmd.job_key.partition("/")[0] in self.forgotten:
                # (a forgotten build's jobs were all final: its reports are moot)
                del outbox[req]
                app.last_try.pop(req, None)
            elif self.now - app.last_try.get(req, -_INF) >= RETRY:
                app.last_try[req] = self.now
                self._send_report(node, cmd)

    def _inject_stale(self, node: SimNode) -> None:
        """Send a report that the committed history already makes stale, forever."""
        led: JobLedger = node.app.ledger
        jobs = [j for b in led.builds() for j in led.jobs(b.build_id) if j.attempt >= 1]
        if not jobs:
            return
        rng = self.app_rng
        j = rng.choice(jobs)
        if j.attempt >= 2 and rng.random() < 0.5:
            attempt = j.attempt - 1
            who = self.assigns.get((j.key, attempt), rng.choice(sorted(self.nodes)))
        elif j.state in ACTIVE:
            attempt = j.attempt
            others = [i for i in sorted(self.nodes) if i != j.node]
            if not others:
                return
            who = rng.choice(others)
        elif j.state == QUEUED:  # requeued: its last attempt was voided
            attempt = j.attempt
            who = self.assigns.get((j.key, attempt), rng.choice(sorted(self.nodes)))
        else:
            return
        report = Done(j.key, who, attempt, _artifacts(j.key, attempt))
        self.known_stale.add(report)
        self.stats["stale_sent"] += 1
        if rng.random() < 0.25:  # an entry of its own, as logs from before batching hold
            self._route(node, 0, encode(report))
        else:
            self._send_report(node, report)

    # ------------------------------------------------------------------ checks

    def _track(
        self, index: int, cmd: Command | None, events: list[LedgerEvent], batched: bool = False
    ) -> None:
        """The independent tracker of current assignments, fed by the first application of
        each committed command (each item of a batch entry on its own); judges every accepted
        report."""
        if cmd is None:
            return
        kinds = {e.kind for e in events}
        if isinstance(cmd, Assign) and "assigned" in kinds:
            self.current[cmd.job_key] = (cmd.node, cmd.attempt)
            self.assigns[(cmd.job_key, cmd.attempt)] = cmd.node
        elif isinstance(cmd, Assign) and batched:
            self.stats["batched_assigns_refused"] += 1
        elif isinstance(cmd, Started | Done | Failed):
            if kinds & {"started", "done", "failed"}:
                if self.current.get(cmd.job_key) != (cmd.node, cmd.attempt):
                    self._violate("stale_applied", f"entry {index}: {cmd}")
                if cmd in self.known_stale:
                    self._violate("stale_applied", f"entry {index}: known stale {cmd}")
                if isinstance(cmd, Done):
                    self.results[cmd.job_key] = cmd.artifacts
                if not isinstance(cmd, Started):
                    self.current.pop(cmd.job_key, None)
            elif cmd in self.known_stale:
                self.stats["stale_rejected"] += 1
                self.stats["stale_rejected_in_batch"] += batched
                gone = self.forgotten.get(cmd.job_key.partition("/")[0], index) < index
                if "rejected_stale" not in kinds and not (gone and kinds == {"rejected"}):
                    # (a forgotten build's job is unknown: plainly `rejected`)
                    self._violate("stale_not_rejected", f"entry {index}: {cmd} -> {kinds}")
        elif isinstance(cmd, Requeue) and "requeued" in kinds:
            self.current.pop(cmd.job_key, None)
        elif isinstance(cmd, Cancel) and "cancelled" in kinds:
            for key in [k for k in self.current if k.startswith(cmd.build_id + "/")]:
                del self.current[key]
        for e in events:
            if e.kind == "blocked":
                self.current.pop(e.data["job_key"], None)
            elif e.kind == "forgotten":
                build_id = e.data["build_id"]
                self.forgotten.setdefault(build_id, index)
                self.stats["forgotten"] += 1
                if any(k.startswith(build_id + "/") for k in self.current):
                    self._violate("forgot_unfinished", f"entry {index}: {build_id}")

    def _check_complete(self, node: SimNode, when: str = "leader") -> None:
        """Every accepted build and every done result is in this node's ledger."""
        led: JobLedger = node.app.ledger
        for build_id, index in self.accepted.items():
            if build_id in self.forgotten:
                continue  # (`check_final`: the replicas agree on what they forgot)
            if index <= led.applied and led.build(build_id) is None:
                self._violate("accepted_build_lost", f"{when} {node.id}: {build_id} ({index})")
        for key, arts in self.results.items():
            if key.partition("/")[0] in self.forgotten:
                continue
            j = led.job(key)
            if j is not None and (j.state != "done" or j.artifacts != arts):
                self._violate("result_lost", f"{when} {node.id}: {key} is {j.state}")
            elif j is None and led.applied >= len(self.outcomes) - 1:
                self._violate("result_lost", f"{when} {node.id}: {key} missing")

    def check_final(self) -> None:
        """At the end: every running node holds every accepted build and result, and nodes at
        the same applied index hold identical ledgers."""
        by_index: dict[int, bytes] = {}
        for id_ in self.up_ids():
            node = self.nodes[id_]
            self._check_complete(node, "final")
            led: JobLedger = node.app.ledger
            snap = led.snapshot()
            if by_index.setdefault(led.applied, snap) != snap:
                self._violate("ledger_divergence", f"{id_} at {led.applied}")

    def ledger(self, id_: str) -> JobLedger:
        node = self.nodes[id_]
        assert node.up, f"{id_} is down"
        return node.app.ledger

    def settled(self, ids: list[str] | None = None) -> bool:
        """Caught up, every client told, every accepted build finished, outboxes empty (among
        the running nodes in `ids`, default all)."""
        lead = self.caught_up(ids)
        if lead is None or not self.all_told():
            return False
        led: JobLedger = self.nodes[lead].app.ledger
        if not all(led.finished(b) or b in self.forgotten for b in self.accepted):
            return False
        return not any(self.app_disks[i].outbox for i in (ids or self.up_ids()))


def _artifacts(key: str, attempt: int) -> tuple[tuple[str, str], ...]:
    name = key.partition("/")[2]
    return ((f"{name}.out", hashlib.sha256(f"{key}:{attempt}".encode()).hexdigest()),)


def _resolved(led: JobLedger, cmd: Command) -> bool:
    """Whether a report needs no more delivery, as far as this node's ledger knows."""
    assert isinstance(cmd, Started | Done | Failed)
    job = led.job(cmd.job_key)
    if job is None or job.attempt < cmd.attempt:
        return False  # our ledger has not caught up with the assignment yet
    if (job.node, job.attempt) != (cmd.node, cmd.attempt):
        return True  # stale for good
    if isinstance(cmd, Started):
        return job.state != "assigned"
    return job.state not in ACTIVE


def random_build(rng: random.Random, build_id: str, submitter: str) -> SubmitBuild:
    """1..4 jobs, each depending on a random subset of the earlier ones."""
    n = rng.randint(1, 4)
    names = [f"j{i}" for i in range(n)]
    jobs = []
    for i, name in enumerate(names):
        deps = tuple(d for d in names[:i] if rng.random() < 0.5)
        spec_hash = hashlib.sha256(f"{build_id}/{name}".encode()).hexdigest()
        jobs.append((name, JobSpec(deps=deps, estimate=rng.uniform(0.1, 2), spec_hash=spec_hash)))
    return SubmitBuild(build_id, f"build-{build_id}", submitter, tuple(jobs))


# ---------------------------------------------------------------------------------------------
# Randomized runs


@dataclass(slots=True)
class LedgerRunResult:
    seed: int
    voters: int
    observers: int
    faults: list[str] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    settled_after: float | None = None
    """Seconds from healing to every client told and every accepted build finished."""
    stats: Counter[str] = field(default_factory=Counter)


def settle_bound(config: Config) -> float:
    """Healing to finished builds: an election, then chains of up to four jobs of up to 0.6 s
    each, failures retried elsewhere, requeues, and retries every 0.3 s; generous on purpose."""
    return 4 * config.election_timeout_max + 30.0


def random_run(
    seed: int,
    config: Config | None = None,
    fault_time: float = 3.0,
    max_voters: int = 5,
    *,
    factory: Callable[..., Election] = Election,
    ledger_factory: type[JobLedger] = JobLedger,
    keep_disk: bool = True,
    builds: float = 2.0,
    byzantine: int = 0,
) -> LedgerRunResult:
    """One random cluster under a random fault schedule, with `builds` submissions per second
    during the faults; then healed until settled (or the bound passes). `byzantine` Byzantine
    members lie throughout, settling included."""
    cfg = with_random_tail(config or Config(), seed)
    rng = random.Random(seed)
    n_voters = rng.randint(1, max_voters)
    n_obs = rng.choice((0, 0, 1, 2))
    sim = LedgerSim(
        n_voters,
        n_obs,
        cfg,
        seed=rng.getrandbits(32),
        **random_links(rng),
        codec=seed % 8 == 0,
        factory=factory,
        ledger_factory=ledger_factory,
        snapshot_every=rng.choice((None, 5, 20)),
        byzantine=byzantine,
        forget_rate=FORGET_RATE,
    )
    res = LedgerRunResult(seed, n_voters, n_obs)
    n_builds = 0

    def submit() -> None:
        nonlocal n_builds
        n_builds += 1
        sim.submit(random_build(rng, f"b{n_builds}", "client"))

    run_faults(sim, rng, keep_disk, fault_time, builds, submit, res.faults)
    start = sim.now
    if sim.run_until_pred(lambda s: s.settled(), settle_bound(cfg), step=0.05):
        res.settled_after = sim.now - start
    sim.run_for(cfg.election_timeout_max)
    sim.check_final()
    res.violations = sim.violations
    res.stats = sim.stats
    res.stats["builds"] = n_builds
    res.stats["accepted_builds"] = len(sim.accepted)
    res.stats["results"] = len(sim.results)
    res.stats["committed"] = len(sim.committed) - 1
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="randomized job-ledger safety runs")
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    bad = 0
    totals: Counter[str] = Counter()
    settle: list[float] = []
    for seed in range(args.seed, args.seed + args.runs):
        res = random_run(seed)
        totals.update(res.stats)
        if res.violations or res.settled_after is None:
            bad += 1
            print(f"seed {seed}: {res.violations[:3] or 'not settled'}", flush=True)
        else:
            settle.append(res.settled_after)
    wall = time.perf_counter() - t0
    keys = (
        "builds",
        "accepted_builds",
        "results",
        "committed",
        "batches",
        "batched",
        "batched_assigns",
        "batched_assigns_refused",
        "stale_sent",
        "stale_rejected",
        "stale_rejected_in_batch",
        "fenced",
        "crashes",
        "restores",
        "compactions",
        "forgotten",
    )
    print(f"{args.runs} runs, {bad} bad, {wall:.1f} s wall")
    print(", ".join(f"{k} {totals[k]}" for k in keys))
    if settle:
        settle.sort()
        median, worst = settle[len(settle) // 2], settle[-1]
        print(f"settled after healing: median {median:.2f} s, max {worst:.2f} s")


if __name__ == "__main__":
    main()
