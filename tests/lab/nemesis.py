"""A seeded nemesis for five real swarmnode processes in the lab, and the invariants it checks.

Issue 15's fault test, shared by tests/test_faults_lab.py (a short seed set in CI) and
bench/fault.py (ten 60 s runs, with figures). Five hosts `lan1..lan5` on one switch run the real
`swarmnode join` with the SHIPPED timers; a DAG of jobs builds while a `random.Random(seed)`
applies faults one step at a time, each healed before the next:

* kill: every process of one or two hosts SIGKILLed (power lost), restarted on the same home
  after 1-5 s;
* stop: one or two hosts frozen with SIGSTOP (node and jobs, as a paused VM) for 3-10 s;
* partition: two hosts cut from the other three with iptables for 3-10 s.

About half the steps aim at the leader of the moment (it is among the victims or on the two-
side), the rest at random hosts; at most two of the five are ever faulted. Meanwhile a thread
per node polls its control socket (`status`, `jobs`) every POLL_S, and every job appends
`<time> <build> <job> <attempt> <node> start|end` to one shared file (namespaces share the file
system). From those, after healing and the build's end:

* safety: the build finished with every output as computed here from its deps' outputs; every
  node's ledger holds the same jobs, states, attempts, nodes and artifacts; no node ever saw a
  done job change again (a result accepted twice), nor two nodes lead one term;
* availability: no job started again after a ledger showed it done, nor after an attempt of it
  ended well on a node that stayed healthy while its report was still current (re-runs of
  interrupted attempts are counted, not violations); voters odd and >= 3; the longest time
  without a leader while a majority of voters was up and connected.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from swarmnode import control
from tests.lab import Lab, incident_topology
from tests.swarm import Node, Swarm

HOSTS = 5
PORT = 7946
#: Forming five nodes and settling their voters with the shipped timers.
JOIN_S = 60.0
#: How often each node is asked for its status and jobs: a leaderless time is measured to
#: about this much.
POLL_S = 0.15
#: A control request to a live node answers in milliseconds; longer means busy or frozen.
ASK_S = 1.0
#: A sample older than this says nothing about the present (its node stopped answering).
FRESH_S = 1.0
#: Step of the timeline the leaderless time is computed on.
STEP_S = 0.05
KILL_DOWN_S = (1.0, 5.0)
STOP_S = (3.0, 10.0)
PARTITION_S = (3.0, 10.0)
GAP_S = (0.5, 2.0)
#: After the faults: time for the build to end and every ledger to agree.
FINISH_S = 180.0


# ---------------------------------------------------------------------- the build
@dataclass(frozen=True)
class Dag:
    """Jobs and their deps, in layers of `width`; each job's output is the sha256 of its name
    and its deps' outputs, so a wrong, missing or stale input shows in every job after it."""

    deps: dict[str, tuple[str, ...]]

    def expected(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, deps in self.deps.items():  # layer order: deps come first
            text = f"{name}\n" + "".join(out[d] for d in deps)
            out[name] = hashlib.sha256(text.encode()).hexdigest() + "  -\n"
        return out

    def plan(self, seconds: float, runs_log: Path) -> str:
        """The plan's TOML: each job logs its start (with when its process was forked, in
        clock ticks since boot: a host frozen right after the fork runs the first line only
        once thawed), sleeps `seconds`, computes, logs its end."""
        mark = (f'echo "$(date +%s.%N) $SWARMNODE_BUILD $SWARMNODE_JOB $SWARMNODE_ATTEMPT '
                f'$SWARMNODE_NODE {{}}" >> {runs_log}')
        forked = "start $(cut -d' ' -f22 /proc/$$/stat)"
        parts = ['name = "nemesis"\n']
        for name, deps in self.deps.items():
            cat = " ".join(f"{d}.out" for d in deps)
            cmd = (f"{mark.format(forked)}; sleep {seconds}; "
                   f"{{ echo {name}; {'cat ' + cat + '; ' if cat else ''}}} | sha256sum "
                   f"> {name}.out && {mark.format('end')}")
            parts.append(f"[jobs.{name}]\ncmd = '''{cmd}'''\noutputs = [\"{name}.out\"]\n"
                         f"deps = {json.dumps(list(deps))}\nestimate = {seconds}\n")
        return "\n".join(parts)


def make_dag(jobs: int, width: int) -> Dag:
    """`jobs` jobs in layers of `width`; each after one or two of the layer before (the same
    shape for a given size, so a faulted build and a calm one compare)."""
    rng = random.Random(jobs)
    deps: dict[str, tuple[str, ...]] = {}
    names = [f"j{i:02d}" for i in range(jobs)]
    for i, name in enumerate(names):
        layer = i // width
        prev = names[(layer - 1) * width: layer * width] if layer else []
        deps[name] = tuple(sorted(rng.sample(prev, min(len(prev), rng.randint(1, 2)))))
    return Dag(deps)


# ---------------------------------------------------------------------- the swarm
@dataclass
class Cluster:
    """Five lab hosts, each running a node with the shipped timers."""

    swarm: Swarm
    lab: Lab
    nodes: list[Node]
    tokens: dict[str, str | None]  # node name -> the token it joined with (None: founder)

    def by_id(self, node_id: str) -> Node | None:
        return next((n for n in self.nodes if n.id == node_id), None)

    def restart(self, node: Node) -> None:
        """The same `join` again, on the same home (identity, ledger, outbox)."""
        self.swarm.start(node, self.tokens[node.name], fast=False)

    def crash(self, node: Node) -> None:
        self.lab.crash(node.host or "")
        if node.proc is not None:
            node.proc.wait(timeout=10)
            node.exits.append(node.proc.returncode)

    def cut(self, side: list[Node], rest: list[Node], heal: bool = False) -> None:
        for a in side:
            for b in rest:
                (self.lab.uncut if heal else self.lab.cut)(a.host or "", addr(b))


def addr(node: Node) -> str:
    return node.listen.rsplit(":", 1)[0]


def form(swarm: Swarm, lab: Lab) -> Cluster:
    """Five admitted nodes with the build right, all five voting, one leader. (Started and
    granted all at once: a few seconds of a short test's budget.)"""
    topo = incident_topology(lab, lan_hosts=HOSTS, tarn=False, far=False)
    first, token = swarm.init("lan1", f"{topo.addr('lan1')}:{PORT}", host="lan1")
    swarm.start(first, fast=False)
    nodes = [first] + [swarm.start(swarm.add(h, f"{topo.addr(h)}:{PORT}", host=h), token,
                                   fast=False, wait=False)
                       for h in (f"lan{i}" for i in range(2, HOSTS + 1))]
    for n in nodes:
        swarm.wait_ready(n)
    swarm.wait_converged(nodes, JOIN_S)
    for n in nodes[1:]:
        swarm.cli(first, "grant", "build", n.name)
    keys = {f"build:{n.id}" for n in nodes[1:]}
    ids = {n.id for n in nodes}

    def settled(n: Node) -> bool:
        held = {e["key"] for e in swarm.events(n, "note") if e.get("topic") == "grant"}
        return keys <= held and set(swarm.query(n, "status")["voters"]) == ids

    for n in nodes:
        swarm.wait_for(lambda n=n: settled(n), JOIN_S,
                       f"{n.name} holds every build grant and counts five voters")
    swarm.wait_for(lambda: len({swarm.query(n, "status")["leader"] for n in nodes}) == 1
                   and swarm.query(first, "status")["leader"], JOIN_S, "one leader")
    return Cluster(swarm, lab, nodes, {n.name: (None if n is first else token) for n in nodes})


# ---------------------------------------------------------------------- observation
@dataclass(frozen=True)
class Sample:
    t: float
    role: str
    leader: str | None
    term: int
    voters: tuple[str, ...]
    jobs: dict[str, tuple[str, int, str | None]] | None  # job -> (state, attempt, node)
    # what the election core refused and why, by then (written out for a post-mortem)
    counters: dict[str, int] = field(default_factory=dict)


class Poller(threading.Thread):
    """Asks one node for its status (and the build's jobs) every POLL_S; skips while frozen."""

    def __init__(self, node: Node) -> None:
        super().__init__(daemon=True, name=f"poll-{node.name}")
        self.node = node
        self.samples: list[Sample] = []
        self.build: str | None = None
        self.frozen = False
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(POLL_S):
            if not self.frozen:
                with contextlib.suppress(control.ControlError, OSError, TimeoutError,
                                         ValueError, KeyError):
                    self.samples.append(self._sample())

    def _sample(self) -> Sample:
        home = self.node.home
        st = control.call(home, "status", timeout=ASK_S)
        jobs = None
        if self.build is not None:  # (a node catching up after a restart says it is)
            with contextlib.suppress(control.ControlError):
                jobs = {j["job"]: (j["state"], j["attempt"], j["node"])
                        for j in control.call(home, "jobs", timeout=ASK_S, build=self.build)}
        return Sample(time.time(), st["role"], st["leader"], st["term"], tuple(st["voters"]),
                      jobs, st.get("election_counters", {}))

    def latest(self, at: float) -> Sample | None:
        """The last sample taken at or before `at`, if still fresh then."""
        best = None
        for s in reversed(self.samples):
            if s.t <= at:
                best = s
                break
        return best if best is not None and at - best.t < FRESH_S else None


# ---------------------------------------------------------------------- faults
@dataclass
class Fault:
    kind: str  # kill | stop | partition
    hosts: tuple[str, ...]  # node names faulted (partition: the two-side)
    leader_aimed: bool
    start: float
    end: float = 0.0  # healed (kill: restarted and answering again)

    def covers(self, name: str, t0: float, t1: float) -> bool:
        return name in self.hosts and self.start <= t1 and (self.end or t1) >= t0


class Nemesis:
    """Seeded faults, one step at a time (each healed before the next)."""

    def __init__(self, cluster: Cluster, pollers: dict[str, Poller], seed: int) -> None:
        self.c = cluster
        self.pollers = pollers
        self.rng = random.Random(seed)
        self.faults: list[Fault] = []

    def leader(self) -> Node | None:
        now = time.time()
        best: tuple[int, str] | None = None
        for name, p in self.pollers.items():
            s = p.latest(now)
            if s is not None and s.role == "leader" and (best is None or s.term > best[0]):
                best = (s.term, name)
        return next((n for n in self.c.nodes if best and n.name == best[1]), None)

    def run(self, seconds: float, done: Callable[[], bool]) -> list[Fault]:
        """Fault steps until `seconds` have passed or `done()`; every fault healed on return
        (also when a step raises)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and not done():
            self.step()
            time.sleep(self.rng.uniform(*GAP_S))
        return self.faults

    def _victims(self, count: int) -> tuple[list[Node], bool]:
        aimed = self.rng.random() < 0.5
        leader = self.leader() if aimed else None
        pool = [n for n in self.c.nodes if n is not leader]
        picked = self.rng.sample(pool, count - (leader is not None))
        return ([leader] if leader is not None else []) + picked, leader is not None

    def step(self) -> None:
        kind = self.rng.choice(("kill", "stop", "partition"))
        count = 2 if kind == "partition" or self.rng.random() < 0.25 else 1
        victims, aimed = self._victims(count)
        hold = self.rng.uniform(*{"kill": KILL_DOWN_S, "stop": STOP_S,
                                  "partition": PARTITION_S}[kind])
        fault = Fault(kind, tuple(v.name for v in victims), aimed, time.time())
        self.faults.append(fault)
        rest = [n for n in self.c.nodes if n not in victims]
        try:
            if kind == "kill":
                for v in victims:
                    self.c.crash(v)
                time.sleep(hold)
            elif kind == "stop":
                for v in victims:
                    self.pollers[v.name].frozen = True
                    self.c.lab.send_signal(v.host or "", signal.SIGSTOP)
                time.sleep(hold)
            else:
                self.c.cut(victims, rest)
                time.sleep(hold)
        finally:
            self._heal(kind, victims, rest)
            fault.end = time.time()

    def _heal(self, kind: str, victims: list[Node], rest: list[Node]) -> None:
        if kind == "kill":
            for v in victims:
                if not v.running:
                    self.c.restart(v)
        elif kind == "stop":
            for v in victims:
                self.c.lab.send_signal(v.host or "", signal.SIGCONT)
                self.pollers[v.name].frozen = False
        else:
            self.c.cut(victims, rest, heal=True)


# ---------------------------------------------------------------------- the outcome
@dataclass(frozen=True)
class Run:
    t: float  # when its process was forked
    job: str
    attempt: int
    node: str  # node id
    end: float | None = None  # when it ended well (None: it did not)


@dataclass
class Outcome:
    seed: int
    jobs: int
    build_s: float
    faults: list[dict[str, Any]]
    violations: list[str] = field(default_factory=list)
    starts: int = 0  # job processes started (a calm build: one per job)
    reruns_after_done: int = 0  # starts after a ledger showed the job done (target 0)
    reruns_interrupted: int = 0  # starts of a job whose earlier attempt was cut short
    max_leaderless_s: float = 0.0  # while a majority of voters was up and connected
    leaderless: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds)

    def plain(self) -> dict[str, Any]:
        return asdict(self)


def boot_time() -> float:
    """The wall-clock time of boot, as process start times in /proc count from it."""
    return time.time() - float(Path("/proc/uptime").read_text().split()[0])


def read_runs(path: Path, build: str, booted: float | None = None) -> dict[str, list[Run]]:
    """Each job's runs in fork order, an `end` line closing the run of its attempt on its
    node (a re-run of one attempt on one node pairs with the start before it)."""
    booted = boot_time() if booted is None else booted
    tick = os.sysconf("SC_CLK_TCK")
    runs: dict[str, list[Run]] = {}
    text = path.read_text() if path.exists() else ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) not in (6, 7) or parts[1] != build:
            continue
        t, _, job, attempt, node, what = parts[:6]
        mine = runs.setdefault(job, [])
        if what == "start":
            forked = booted + int(parts[6]) / tick if len(parts) == 7 else float(t)
            mine.append(Run(forked, job, int(attempt), node))
            mine.sort(key=lambda r: r.t)
            continue
        for i in range(len(mine) - 1, -1, -1):
            r = mine[i]
            if (r.attempt, r.node) == (int(attempt), node) and r.end is None:
                mine[i] = Run(r.t, job, r.attempt, node, float(t))
                break
    return runs


def _done_at(pollers: dict[str, Poller]) -> dict[str, float]:
    """When a ledger (any node's) was first seen holding each job done."""
    first: dict[str, float] = {}
    for p in pollers.values():
        for s in p.samples:
            for job, (state, _a, _n) in (s.jobs or {}).items():
                if state == "done" and s.t < first.get(job, float("inf")):
                    first[job] = s.t
    return first


def voided_attempts(swarm: Swarm, nodes: list[Node], build: str) -> set[tuple[str, int]]:
    """The attempts the ledger voided -- requeued (their node declared dead, or it lost them),
    cancelled, blocked -- from a node's history of every attempt: the polled samples miss a
    requeue committed a few milliseconds before its attempt ended well."""
    for n in nodes:
        if n.running:
            with contextlib.suppress(control.ControlError, OSError, TimeoutError):
                rows = swarm.query(n, "jobs", timeout=ASK_S, history=True, build=build)
                return {(r["job"], r["attempt"]) for r in rows
                        if r["result"] in ("requeued", "cancelled", "blocked")}
    return set()


def _superseded(pollers: dict[str, Poller], r: Run,
                voided: Collection[tuple[str, int]] = ()) -> bool:
    """The ledger voided the attempt (requeued or replaced) before it ended well: its report
    could not count, so starting the job again was right. From the history, or a ledger
    sample showing it."""
    assert r.end is not None
    if (r.job, r.attempt) in voided:
        return True
    for p in pollers.values():
        for s in p.samples:
            if r.t <= s.t <= r.end and s.jobs and r.job in s.jobs:
                state, attempt, _node = s.jobs[r.job]
                if attempt > r.attempt or (attempt == r.attempt and state == "queued"):
                    return True
    return False


def check_reruns(out: Outcome, runs: dict[str, list[Run]], pollers: dict[str, Poller],
                 faults: list[Fault], names: dict[str, str],
                 voided: Collection[tuple[str, int]] = ()) -> None:
    done_at = _done_at(pollers)
    out.starts = sum(len(mine) for mine in runs.values())
    for job, mine in sorted(runs.items()):
        for i, s in enumerate(mine[1:], start=1):
            where = f"{job} attempt {s.attempt} on {names.get(s.node, s.node[:12])} at {s.t:.2f}"
            if s.t > done_at.get(job, float("inf")):
                out.reruns_after_done += 1
                out.violations.append(f"{where}: started after a ledger showed it done "
                                      f"(at {done_at[job]:.2f})")
                continue
            ok = [r for r in mine[:i] if r.end is not None and r.end < s.t]
            healthy = [r for r in ok if not _superseded(pollers, r, voided) and not any(
                f.covers(names.get(r.node, ""), r.end or 0, s.t) for f in faults)]
            if healthy:
                r = healthy[-1]
                out.violations.append(
                    f"{where}: started again although attempt {r.attempt} ended well at "
                    f"{r.end:.2f} on {names.get(r.node, r.node[:12])}, unfaulted since")
            else:
                out.reruns_interrupted += 1


def check_ledgers(out: Outcome, pollers: dict[str, Poller], names: dict[str, str]) -> None:
    """Per node: a job once seen done never shows anything else (no second acceptance); one
    leader per term; voters odd and at least three."""
    leaders: dict[int, set[str]] = {}
    for name, p in pollers.items():
        done: dict[str, tuple[str, int, str | None]] = {}
        for s in p.samples:
            if s.role == "leader":
                leaders.setdefault(s.term, set()).add(name)
            if len(s.voters) % 2 == 0 or len(s.voters) < 3:
                out.violations.append(f"{name} at {s.t:.2f}: {len(s.voters)} voters "
                                      f"({sorted(names.get(v, v[:12]) for v in s.voters)})")
            for job, seen in (s.jobs or {}).items():
                if job in done and seen != done[job]:
                    out.violations.append(f"{name} at {s.t:.2f}: {job} was done {done[job]}, "
                                          f"now {seen}")
                if seen[0] == "done":
                    done.setdefault(job, seen)
    for term, who in sorted(leaders.items()):
        if len(who) > 1:
            out.violations.append(f"term {term} had leaders {sorted(who)}")


def leaderless(pollers: dict[str, Poller], faults: list[Fault], t0: float,
               t1: float) -> list[tuple[float, float]]:
    """(start, seconds) of each stretch in [t0, t1] with no leader among the healthy nodes
    (up, unfrozen, on the three-side) while they held a majority of the voters."""
    spans: list[tuple[float, float]] = []
    since: float | None = None
    voters: tuple[str, ...] = ()
    ids = {p.node.id: name for name, p in pollers.items()}
    t = t0
    while t <= t1:
        healthy = [n for n in pollers if not any(f.covers(n, t, t) for f in faults)]
        latest = {n: pollers[n].latest(t) for n in healthy}
        voters = next((s.voters for s in latest.values() if s and s.voters), voters)
        majority = sum(1 for v in voters if ids.get(v) in healthy) * 2 > len(voters)
        led = any(s is not None and s.role == "leader" for s in latest.values())
        if majority and not led:
            since = t if since is None else since
        elif since is not None:
            spans.append((since, round(t - since, 2)))
            since = None
        t += STEP_S
    if since is not None:
        spans.append((since, round(t1 - since, 2)))
    return spans


# ---------------------------------------------------------------------- one trial
@dataclass(frozen=True)
class Trial:
    seed: int
    jobs: int = 60
    width: int = 6
    job_s: float = 1.0
    fault_s: float = 60.0  # 0: a calm build, for comparison


def run_trial(cluster: Cluster, trial: Trial, work: Path) -> Outcome:
    """Build the DAG under the nemesis (or calmly), heal, wait for the end; the outcome with
    every invariant violation found."""
    swarm, nodes = cluster.swarm, cluster.nodes
    dag = make_dag(trial.jobs, trial.width)
    work.mkdir(parents=True, exist_ok=True)
    runs_log = work / "runs.log"
    plan = work / "plan.toml"
    plan.write_text(dag.plan(trial.job_s, runs_log))
    pollers = {n.name: Poller(n) for n in nodes}
    for p in pollers.values():
        p.start()
    nemesis = Nemesis(cluster, pollers, trial.seed)
    submitter = random.Random(trial.seed).choice(nodes)
    try:
        t0 = time.time()
        build = swarm.cli(submitter, "build", str(plan)).stdout.strip()
        for p in pollers.values():
            p.build = build

        def finished() -> bool:
            with contextlib.suppress(control.ControlError, OSError, TimeoutError):
                return any(swarm.query(n, "build_status", timeout=ASK_S, build=build)["finished"]
                           for n in nodes if n.running
                           and not pollers[n.name].frozen)
            return False

        faults = nemesis.run(trial.fault_s, finished) if trial.fault_s else []
        swarm.wait_for(finished, FINISH_S, f"build {build} finishes")
        t_end = time.time()
        views = swarm.wait_for(lambda: _agreed(swarm, nodes, build), FINISH_S,
                               "every ledger holds the same jobs")
    finally:
        for p in pollers.values():
            p.halt.set()
        for p in pollers.values():
            p.join()
        write_samples(work / "samples.jsonl", pollers)
    out = Outcome(trial.seed, trial.jobs, round(t_end - t0, 2),
                  [asdict(f) for f in faults])
    names = {n.id: n.name for n in nodes}
    check_outputs(out, swarm, submitter, build, dag, views, work / "out")
    check_reruns(out, read_runs(runs_log, build), pollers, faults, names,
                 voided_attempts(swarm, nodes, build))
    check_ledgers(out, pollers, names)
    check_elections(out, swarm, nodes, t0)
    out.leaderless = leaderless(pollers, faults, t0, t_end)
    out.max_leaderless_s = max((s for _t, s in out.leaderless), default=0.0)
    return out


def write_samples(path: Path, pollers: dict[str, Poller]) -> None:
    """Every node's polled status (not the jobs), one JSON line each, in time order: what a
    post-mortem of a leaderless stretch reads beside the nodes' events."""
    rows = sorted(((s.t, name, s) for name, p in pollers.items() for s in p.samples),
                  key=lambda row: row[:2])
    with path.open("w") as f:
        for t, name, s in rows:
            f.write(json.dumps({"t": t, "node": name, "role": s.role, "leader": s.leader,
                                "term": s.term, "counters": s.counters}) + "\n")


def _agreed(swarm: Swarm, nodes: list[Node], build: str) -> list[dict[str, Any]] | None:
    views = []
    for n in nodes:
        view = sorted((j["job"], j["state"], j["attempt"], j["node"],
                        json.dumps(j["artifacts"], sort_keys=True))
                       for j in swarm.query(n, "jobs", build=build))
        views.append(view)
    if all(v == views[0] for v in views):
        return swarm.query(nodes[0], "jobs", build=build)
    return None


def check_outputs(out: Outcome, swarm: Swarm, node: Node, build: str, dag: Dag,
                  jobs: list[dict[str, Any]], dest: Path) -> None:
    expected = dag.expected()
    not_done = sorted(j["job"] for j in jobs if j["state"] != "done")
    if not_done or len(jobs) != len(expected):
        out.violations.append(f"build {build}: {len(jobs)} jobs, not done: {not_done}")
    swarm.query(node, "fetch_outputs", timeout=120, build=build, out=str(dest))
    for name, text in expected.items():
        path = dest / name / f"{name}.out"
        got = path.read_text() if path.exists() else None
        if got != text:
            out.violations.append(f"{name}: output {got!r}, expected {text!r}")


def check_elections(out: Outcome, swarm: Swarm, nodes: list[Node], since: float) -> None:
    """One winner per term among every node's own `leader_elected` events."""
    won: dict[int, set[str]] = {}
    for n in nodes:
        for ev in swarm.events(n, "leader_elected"):
            if ev["ts"] >= since:
                won.setdefault(int(ev["term"]), set()).add(n.name)
    for term, who in sorted(won.items()):
        if len(who) > 1:
            out.violations.append(f"term {term} was won by {sorted(who)}")
