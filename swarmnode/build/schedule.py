"""Where to run ready jobs: critical-path-first list scheduling, pure and deterministic.

The leader calls `assign` whenever something changes (a job finished or failed, a node joined,
left or was paused) with the jobs whose dependencies are done and the nodes' free cores. Jobs
are taken by priority, the length of the longest chain of estimates from the job to the end of
the build (its "bottom level"): starting the job that the most work waits on first is the
classic list-scheduling heuristic and keeps the makespan close to the critical path when there
are enough cores. Nodes are chosen best fit, and a job too big for any node's free cores holds
one node it could use so that the node drains for it (see `assign`): without that, a stream of
small jobs can starve a big one indefinitely. While it drains, the held node still takes jobs
expected to end before enough of its cores come free for the big one (backfilling, from the
estimates of the jobs running there and of the job): the big job starts no later, and the
cores do not idle meanwhile. Equal inputs always give equal answers, so a new leader elected
mid-build decides as the old one would have.

`simulate` replays a plan on imaginary nodes with the estimates as durations, calling `assign`
at every event as the leader would; `lower_bound` is what no schedule can beat. Together they
measure the heuristic without a swarm.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from swarmnode.build.plan import Plan, Requires


@dataclass(frozen=True)
class Slot:
    """A node as the scheduler sees it now; `cores` is its total (None: same as free)."""

    node: str
    free_cores: int
    arch: str
    kind: str
    tags: frozenset[str] = frozenset()
    paused: bool = False
    cores: int | None = None
    releases: tuple[tuple[float, int], ...] = ()
    """(seconds from now, cores): when each job running here is expected to end, and the cores
    it frees then. Without them a held node takes no other job until it has drained."""

    @property
    def capacity(self) -> int:
        """The most cores a single job could ever get here."""
        return self.free_cores if self.cores is None else self.cores

    def free_after(self, free: int, cores: int) -> float:
        """Seconds until `cores` are free here, `free` being free now (0.0: unknown)."""
        for after, freed in sorted(self.releases):
            free += freed
            if free >= cores:
                return after
        return 0.0


@dataclass(frozen=True)
class Ready:
    """A job whose dependencies are done, with its critical-path priority."""

    job: str
    requires: Requires
    priority: float
    estimate: float | None = None
    """Its expected run time (None: unknown, never backfilled into a held node)."""

    @property
    def cores(self) -> int:
        return self.requires.cores


@dataclass(frozen=True)
class Placement:
    """Where and when a simulated job ran."""

    node: str
    start: float
    end: float


def fits(requires: Requires, slot: Slot) -> bool:
    """Whether the node is of the arch, kind and tags the job requires (cores aside)."""
    return (
        (requires.arch is None or requires.arch == slot.arch)
        and (requires.kind is None or requires.kind == slot.kind)
        and requires.tags <= slot.tags
    )


def satisfiable(
    requires: Requires, nodes: Iterable[Slot], avoid: Collection[str] = frozenset()
) -> bool:
    """Whether some node, busy or paused or not, could ever run the job; if none can, the
    caller should mark the job blocked rather than wait for it forever."""
    return any(
        fits(requires, slot) and requires.cores <= slot.capacity and slot.node not in avoid
        for slot in nodes
    )


def _dependents_of(deps: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    dependents: dict[str, list[str]] = {name: [] for name in deps}
    for name, before in deps.items():
        for dep in before:
            dependents[dep].append(name)
    return dependents


def _dependents(plan: Plan) -> dict[str, list[str]]:
    return _dependents_of({name: job.deps for name, job in plan.jobs.items()})


def bottom_levels(graph: Mapping[str, tuple[Iterable[str], float]]) -> dict[str, float]:
    """Each job's estimate plus the longest chain of estimates after it, for a graph given as
    {job: (deps, estimate)} (a plan's, or a build's as the ledger holds it)."""
    dependents = _dependents_of({name: deps for name, (deps, _est) in graph.items()})
    pending = {name: len(tuple(deps)) for name, (deps, _est) in graph.items()}
    order = [name for name, n in pending.items() if n == 0]
    for name in order:  # Kahn's order: every job after its deps (the list grows as we go)
        for child in dependents[name]:
            pending[child] -= 1
            if pending[child] == 0:
                order.append(child)
    level: dict[str, float] = {}
    for name in reversed(order):
        after = max((level[child] for child in dependents[name]), default=0.0)
        level[name] = graph[name][1] + after
    return level


def priorities(plan: Plan) -> dict[str, float]:
    """Each job's bottom level: its estimate plus the longest chain of estimates after it."""
    return bottom_levels({name: (job.deps, job.estimate) for name, job in plan.jobs.items()})


def ready_jobs(
    plan: Plan,
    finished: Collection[str],
    started: Collection[str] = (),
    prio: Mapping[str, float] | None = None,
) -> list[Ready]:
    """Jobs neither finished nor started whose dependencies have all finished."""
    prio = priorities(plan) if prio is None else prio
    return [
        Ready(name, job.requires, prio[name])
        for name, job in plan.jobs.items()
        if name not in finished and name not in started and all(dep in finished for dep in job.deps)
    ]


def assign(
    ready: Sequence[Ready],
    slots: Sequence[Slot],
    avoid: Mapping[str, Collection[str]] | None = None,
) -> list[tuple[str, str]]:
    """(job, node) pairs to start now.

    Jobs go highest priority first (then more cores, then name) to the fitting node with the
    fewest free cores that still suffice, then node id: best fit leaves the big nodes whole for
    the big jobs that need them. A job that fits nowhere now but would fit on a node once that
    node is idle reserves one such node (the one with the most free cores, nearest to fitting)
    against the lower-priority jobs after it, so the node drains for it instead of being
    refilled by small jobs forever; nodes it could never use stay open to them. A held node
    still takes a later job that fits in its free cores and whose `estimate` is at most the
    time until the held job's cores are expected free (`Slot.releases`): it ends before the
    held job could start. `avoid[job]` lists nodes the job already failed on; paused nodes get
    nothing; no node is given more cores than it has free. Reserving needs `Slot.cores`;
    without it a busy node is never reserved.
    """
    avoid = avoid or {}
    open_ = sorted((slot for slot in slots if not slot.paused), key=lambda slot: slot.node)
    free = {slot.node: slot.free_cores for slot in open_}
    spare = sum(free.values())  # free cores on open and held nodes: at 0 nothing can start
    held: dict[str, float] = {}  # held node -> seconds until its held job could start
    pairs: list[tuple[str, str]] = []
    for job in sorted(ready, key=lambda r: (-r.priority, -r.cores, r.job)):
        if spare <= 0:
            break
        shunned = avoid.get(job.job, ())
        usable = [s for s in open_ if s.node not in shunned and fits(job.requires, s)]
        now = [s for s in usable if free[s.node] >= job.cores and (
            s.node not in held or (job.estimate is not None and job.estimate <= held[s.node]))]
        if now:
            best = min(now, key=lambda s: free[s.node])  # first of equals: lowest node id
            free[best.node] -= job.cores
            spare -= job.cores
            pairs.append((job.job, best.node))
            continue
        later = [s for s in usable if s.capacity >= job.cores and s.node not in held]
        if later:
            node = max(later, key=lambda s: free[s.node])  # first of equals: lowest node id
            held[node.node] = node.free_after(free[node.node], job.cores)
    return pairs


def lower_bound(plan: Plan, total_cores: int) -> float:
    """No schedule is shorter than the critical path, nor than all core-seconds spread evenly."""
    work = sum(job.estimate * job.requires.cores for job in plan.jobs.values())
    return max(max(priorities(plan).values()), work / total_cores)


def _slots(nodes: Sequence[Slot] | Sequence[tuple[str, int]]) -> tuple[list[Slot], bool]:
    """Nodes as Slots; plain (name, cores) pairs are nodes that fit any job's arch/kind/tags."""
    slots: list[Slot] = []
    wildcard = False
    for node in nodes:
        if isinstance(node, Slot):
            slots.append(node)
        else:
            name, cores = node
            slots.append(Slot(name, cores, arch="", kind="", cores=cores))
            wildcard = True
    return slots, wildcard


def simulate_schedule(
    plan: Plan, nodes: Sequence[Slot] | Sequence[tuple[str, int]]
) -> dict[str, Placement]:
    """Run the plan on idle imaginary nodes, durations = estimates, `assign` at every event.

    Raises ValueError when jobs remain that no node can run.
    """
    slots, wildcard = _slots(nodes)
    prio = priorities(plan)
    dependents = _dependents(plan)
    needs = {
        name: Requires(cores=job.requires.cores) if wildcard else job.requires
        for name, job in plan.jobs.items()
    }
    waiting = {name: len(job.deps) for name, job in plan.jobs.items()}
    ready = {name for name, count in waiting.items() if count == 0}
    free = {slot.node: slot.capacity for slot in slots}
    running: list[tuple[float, str, str]] = []  # (end, job, node), a heap
    placements: dict[str, Placement] = {}
    now = 0.0
    while ready or running:
        releases: dict[str, list[tuple[float, int]]] = {}
        for end, job, node in running:
            releases.setdefault(node, []).append((end - now, needs[job].cores))
        current = [
            Slot(s.node, free[s.node], s.arch, s.kind, s.tags, s.paused, s.cores,
                 tuple(releases.get(s.node, ()))) for s in slots
        ]
        entries = [Ready(j, needs[j], prio[j], plan.jobs[j].estimate) for j in ready]
        for job, node in assign(entries, current):
            end = now + plan.jobs[job].estimate
            ready.discard(job)
            free[node] -= needs[job].cores
            placements[job] = Placement(node, now, end)
            heapq.heappush(running, (end, job, node))
        if not running:
            raise ValueError("no node can run: " + ", ".join(sorted(ready)))
        now = running[0][0]
        while running and running[0][0] == now:
            _, job, node = heapq.heappop(running)
            free[node] += needs[job].cores
            for child in dependents[job]:
                waiting[child] -= 1
                if waiting[child] == 0:
                    ready.add(child)
    return placements


def simulate(plan: Plan, nodes: Sequence[Slot] | Sequence[tuple[str, int]]) -> float:
    """The makespan of `simulate_schedule`."""
    return max(placement.end for placement in simulate_schedule(plan, nodes).values())
