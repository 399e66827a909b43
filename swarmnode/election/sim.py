"""Deterministic discrete-event simulator for the election core, with a safety checker.

It drives real `Election` instances exactly as the node shell does -- `handle` for each
delivered message, `tick` when `next_deadline` is due, `drain` after each, writing every
`Persist` to the node's "disk" before transmitting what follows it -- over a virtual clock and
a seeded RNG, with per-message latency (so reordering), loss, duplication, partitions, crashes
and restarts. A restarted node gets back only what it persisted. Same seed, same run.

After every step the acting node is checked against the safety invariants, and violations are
recorded (not raised) so a test can also show that a broken variant is caught:

- election safety: every (term, leader) ever seen is recorded; two leaders in one term is a
  violation, even if they never led at the same instant;
- lease safety: two live nodes never hold a valid leader lease at the same virtual instant.

`random_run` is one randomized fault schedule followed by a stable period with a liveness
check; `python -m swarmnode.election.sim --runs 2000` runs many and prints a summary.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .config import Config
from .core import LEADER, Election, Event, Persist, Persisted, Send
from .messages import Message, pack, unpack

Latency = tuple[float, float]

_DELIVER = 0
_TICK = 1
_INF = math.inf


@dataclass(slots=True)
class SimNode:
    id: str
    rng: random.Random
    election: Election | None = None
    up: bool = True
    tick_at: float = _INF
    disk: Persisted | None = None
    """What the node persisted; all a restart gets back."""
    lease_until: float = -_INF
    """The node's lease expiry after its last step (exact between its steps)."""


@dataclass(slots=True)
class Violation:
    time: float
    kind: str
    detail: str


class ElectionSim:
    """`voters` voting nodes "v0".. and `observers` non-voting nodes "o0".., started at time 0."""

    def __init__(
        self,
        voters: int,
        observers: int = 0,
        config: Config | None = None,
        seed: int = 0,
        loss: float = 0.0,
        latency: Latency = (0.0005, 0.005),
        duplicate: float = 0.0,
        *,
        codec: bool = False,
        record_events: bool = False,
        factory: Callable[..., Election] = Election,
    ) -> None:
        self.config = config or Config()
        self.factory = factory
        """Builds each node's state machine: tests pass deliberately broken variants to show
        the checker catches them."""
        self.rng = random.Random(seed)
        self.loss = loss
        self.latency = latency
        self.duplicate = duplicate
        self.codec = codec
        self.record_events = record_events
        self.now = 0.0
        self.voter_ids = frozenset(f"v{i}" for i in range(voters))
        self.observer_ids = frozenset(f"o{i}" for i in range(observers))
        self.nodes: dict[str, SimNode] = {}
        self.leaders: dict[int, set[str]] = {}
        """term -> every node that ever led in it (the election safety record)."""
        self.violations: list[Violation] = []
        self.events: list[tuple[float, str, Event]] = []
        self.event_counts: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self._heap: list[tuple[float, int, int, str, str, Any]] = []
        self._seq = 0
        self._group: dict[str, int] = {}
        self._cut: set[frozenset[str]] = set()
        for id_ in sorted(self.voter_ids) + sorted(self.observer_ids):
            node = SimNode(id_, random.Random(self.rng.getrandbits(64)))
            self.nodes[id_] = node
            self._start(node)

    # ------------------------------------------------------------------ perturbations

    def crash(self, id_: str) -> None:
        """kill -9: the process and everything in memory are gone; the disk stays."""
        node = self.nodes[id_]
        node.up = False
        node.election = None
        node.tick_at = _INF
        node.lease_until = -_INF
        self.stats["crashes"] += 1

    def restart(self, id_: str, *, keep_disk: bool = True) -> None:
        """Start a crashed node again from its disk (`keep_disk=False`: from nothing)."""
        node = self.nodes[id_]
        assert not node.up, f"{id_} is running"
        if not keep_disk:
            node.disk = None
        node.up = True
        self.stats["restarts"] += 1
        self._start(node)

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Nodes in different groups cannot talk; unlisted nodes form one more group."""
        self._group = {id_: gi for gi, g in enumerate(groups) for id_ in g}

    def cut(self, a: str, b: str) -> None:
        """Break the link between a and b only (both ways): partitions that are not groups,
        e.g. a follower that still hears the leader while another voter does not."""
        self._cut.add(frozenset((a, b)))

    def heal(self) -> None:
        """Remove every partition and cut link."""
        self._group = {}
        self._cut.clear()

    def set_voters(
        self,
        voters: Iterable[str],
        observers: Iterable[str] | None = None,
        at: Iterable[str] | None = None,
    ) -> None:
        """Give running nodes (all, or those in `at`) a new voter set; restarts use the newest."""
        self.voter_ids = frozenset(voters)
        if observers is not None:
            self.observer_ids = frozenset(observers) - self.voter_ids
        targets = list(at) if at is not None else list(self.nodes)
        for id_ in targets:
            node = self.nodes[id_]
            if node.up and node.election is not None:
                node.election.set_voters(self.now, self.voter_ids, self.observer_ids)
                self._flush(node)

    # ------------------------------------------------------------------ running

    def run_until(self, t: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= t:
            self._step()
        self.now = max(self.now, t)

    def run_for(self, dt: float) -> None:
        self.run_until(self.now + dt)

    def run_until_pred(
        self, pred: Callable[[ElectionSim], bool], timeout: float, step: float = 0.01
    ) -> bool:
        """Run until `pred(self)` holds (checked every `step`), or `timeout` seconds pass."""
        end = self.now + timeout
        while True:
            if pred(self):
                return True
            if self.now >= end:
                return False
            self.run_until(min(end, self.now + step))

    def _start(self, node: SimNode) -> None:
        node.election = self.factory(
            node.id,
            self.voter_ids,
            self.config,
            node.rng,
            self.now,
            node.disk,
            observers=self.observer_ids,
        )
        node.tick_at = _INF
        self._flush(node)

    def _push(self, t: float, kind: int, to: str, src: str, msg: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, to, src, msg))

    def _step(self) -> None:
        t, _, kind, to, src, msg = heapq.heappop(self._heap)
        self.now = t
        node = self.nodes[to]
        el = node.election
        if not node.up or el is None:
            self.stats["dropped_down"] += 1
            return
        if kind == _DELIVER:
            if self.codec:
                msg = unpack(*msg)
            self.stats["delivered"] += 1
            el.handle(t, src, msg)
        else:
            if node.tick_at != t:
                return  # superseded by an earlier deadline
            node.tick_at = _INF
            el.tick(t)
            self.stats["ticks"] += 1
        self._flush(node, after_tick=kind == _TICK)

    def _flush(self, node: SimNode, after_tick: bool = False) -> None:
        el = node.election
        assert el is not None
        for out in el.drain():
            if type(out) is Send:
                self._transmit(node.id, out.to, out.msg)
            elif type(out) is Persist:
                node.disk = Persisted(out.term, out.voted_for)  # durable before what follows
                self.stats["persists"] += 1
            else:
                self._observe(node.id, out)  # type: ignore[arg-type]
        self._check(node, el)
        nd = el.next_deadline()
        if nd <= self.now and after_tick:
            # A tick that leaves its own deadline due would spin forever: a core bug.
            self._violate("stalled_tick", f"{node.id} at {nd}")
            nd = self.now + 1e-6
        nd = max(nd, self.now)
        if nd < node.tick_at:
            node.tick_at = nd
            self._push(nd, _TICK, node.id, "", None)

    def _transmit(self, src: str, dst: str, msg: Message) -> None:
        self.stats["sent"] += 1
        if (self._group and self._group.get(src, -1) != self._group.get(dst, -1)) or (
            self._cut and frozenset((src, dst)) in self._cut
        ):
            self.stats["partitioned"] += 1
            return
        copies = 2 if self.duplicate and self.rng.random() < self.duplicate else 1
        wire: Any = pack(msg) if self.codec else msg
        for _ in range(copies):
            if self.loss and self.rng.random() < self.loss:
                self.stats["lost"] += 1
                continue
            self._push(self.now + self.rng.uniform(*self.latency), _DELIVER, dst, src, wire)

    def _observe(self, observer: str, ev: Event) -> None:
        self.event_counts[ev.kind] += 1
        if self.record_events:
            self.events.append((self.now, observer, ev))

    # ------------------------------------------------------------------ invariants

    def _check(self, node: SimNode, el: Election) -> None:
        """The safety assertions, run after every step of `node`."""
        if el.role == LEADER:
            seen = self.leaders.setdefault(el.term, set())
            if node.id not in seen:
                seen.add(node.id)
                if len(seen) > 1:
                    self._violate("two_leaders", f"term {el.term}: {sorted(seen)}")
        node.lease_until = el.lease_expiry()
        if node.lease_until > self.now:
            for other in self.nodes.values():
                if other is not node and other.up and other.lease_until > self.now:
                    self._violate("two_leases", f"{node.id} and {other.id}")

    def _violate(self, kind: str, detail: str) -> None:
        self.violations.append(Violation(self.now, kind, detail))

    # ------------------------------------------------------------------ queries

    def election(self, id_: str) -> Election:
        el = self.nodes[id_].election
        assert el is not None, f"{id_} is down"
        return el

    def up_ids(self) -> list[str]:
        return [i for i, n in self.nodes.items() if n.up]

    def current_leaders(self) -> list[str]:
        """Running nodes that consider themselves leader (any term)."""
        return [i for i in self.up_ids() if self.election(i).role == LEADER]

    def stable_leader(self, ids: Iterable[str] | None = None) -> str | None:
        """The leader every running node in `ids` (default: all) follows, if it leads them with a
        valid lease; else None."""
        group = list(ids) if ids is not None else self.up_ids()
        if not group:
            return None
        lead = self.election(group[0]).leader
        if lead is None or lead not in group or not self.nodes[lead].up:
            return None
        if not self.election(lead).leader_lease_valid(self.now):
            return None
        term = self.election(lead).term
        ok = all(self.election(i).leader == lead and self.election(i).term == term for i in group)
        return lead if ok else None

    def max_term(self) -> int:
        return max((self.election(i).term for i in self.up_ids()), default=0)


# ---------------------------------------------------------------------------------------------
# Randomized runs


@dataclass(slots=True)
class RunResult:
    seed: int
    voters: int
    observers: int
    faults: list[str] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    recovered_after: float | None = None
    """Seconds from the end of the faults to a leader followed by all with a valid lease."""
    max_term: int = 0
    messages: int = 0


def liveness_bound(config: Config) -> float:
    """How long a healed, loss-free cluster may take to agree on a leader: restarted voters
    refuse to vote for one minimum timeout, a stale leader needs up to check_quorum_timeout to
    step down, then each pre-vote/vote round takes one election timeout; allow eight rounds so
    that repeated split votes still pass."""
    cfg = config
    return cfg.election_timeout_min + cfg.check_quorum_timeout + 8 * cfg.election_timeout_max


def random_run(
    seed: int,
    config: Config | None = None,
    fault_time: float = 3.0,
    max_voters: int = 7,
    *,
    factory: Callable[..., Election] = Election,
    keep_disk: bool = True,
) -> RunResult:
    """One random cluster (1..max_voters voters, 0..2 observers) under a random fault schedule
    (crashes, restarts, partitions, loss, duplication, slow links) for `fault_time` virtual
    seconds, then healed with no loss until a leader is agreed (or the liveness bound passes).
    `keep_disk=False` restarts nodes without their persisted vote: a broken shell, to show
    that the checker notices."""
    cfg = config or Config()
    rng = random.Random(seed)
    n_voters = rng.randint(1, max_voters)
    n_obs = rng.choice((0, 0, 1, 2))
    sim = ElectionSim(
        n_voters,
        n_obs,
        cfg,
        seed=rng.getrandbits(32),
        loss=rng.choice((0.0, 0.0, 0.02, 0.1, 0.3)),
        latency=(0.0005, rng.choice((0.002, 0.02, 0.15))),
        duplicate=rng.choice((0.0, 0.0, 0.05)),
        codec=seed % 8 == 0,
        factory=factory,
    )
    res = RunResult(seed, n_voters, n_obs)
    ids = sorted(sim.nodes)
    t = 0.0
    while True:
        t += rng.expovariate(4 / fault_time)  # about four faults per run
        if t >= fault_time:
            break
        sim.run_until(t)
        res.faults.append(_random_fault(sim, rng, ids, keep_disk))
    sim.run_until(fault_time)
    sim.heal()
    sim.loss = 0.0
    for id_ in ids:
        if not sim.nodes[id_].up:
            sim.restart(id_, keep_disk=keep_disk)
    start = sim.now
    if sim.run_until_pred(lambda s: s.stable_leader() is not None, liveness_bound(cfg)):
        res.recovered_after = sim.now - start
    sim.run_for(cfg.election_timeout_max)  # let late messages land while still checking
    res.violations = sim.violations
    res.max_term = sim.max_term()
    res.messages = sim.stats["sent"]
    return res


def _random_fault(sim: ElectionSim, rng: random.Random, ids: list[str], keep_disk: bool) -> str:
    roll = rng.random()
    up = sim.up_ids()
    down = [i for i in ids if i not in up]
    if roll < 0.25 and up:
        leaders = sim.current_leaders()
        victim = rng.choice(leaders) if leaders and rng.random() < 0.5 else rng.choice(up)
        sim.crash(victim)
        return f"{sim.now:.3f} crash {victim}"
    if roll < 0.45 and down:
        back = rng.choice(down)
        sim.restart(back, keep_disk=keep_disk)
        return f"{sim.now:.3f} restart {back}"
    if roll < 0.7:
        shuffled = ids[:]
        rng.shuffle(shuffled)
        cuts = sorted(rng.sample(range(1, len(ids)), min(len(ids) - 1, rng.randint(1, 2))))
        groups = [shuffled[a:b] for a, b in zip([0, *cuts], [*cuts, len(ids)], strict=True)]
        sim.partition(groups)
        return f"{sim.now:.3f} partition {groups}"
    if roll < 0.8 and len(ids) > 1:
        a, b = rng.sample(ids, 2)
        sim.cut(a, b)
        return f"{sim.now:.3f} cut {a}-{b}"
    if roll < 0.9:
        sim.heal()
        return f"{sim.now:.3f} heal"
    sim.loss = rng.choice((0.0, 0.1, 0.5))
    return f"{sim.now:.3f} loss {sim.loss}"


def measure_failover(
    voters: int, seed: int, config: Config | None = None, latency: Latency = (0.0005, 0.005)
) -> float | None:
    """Seconds from killing a settled leader to a new leader holding a valid lease (able to
    schedule again), or None if that takes longer than the liveness bound."""
    cfg = config or Config()
    sim = ElectionSim(voters, 0, cfg, seed=seed, latency=latency)
    if not sim.run_until_pred(lambda s: s.stable_leader() is not None, liveness_bound(cfg)):
        return None
    sim.run_for(sim.rng.uniform(0.5, 1.5))  # kill at a random phase of the heartbeat cycle
    old = sim.current_leaders()
    if len(old) != 1:
        return None
    sim.crash(old[0])
    start = sim.now
    ok = sim.run_until_pred(
        lambda s: any(s.election(i).leader_lease_valid(s.now) for i in s.up_ids()),
        liveness_bound(cfg),
        step=0.001,
    )
    return sim.now - start if ok else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="randomized election safety runs and failover")
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--failover", type=int, default=200, help="failover samples (3 voters)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    recovered: list[float] = []
    bad = 0
    for seed in range(args.seed, args.seed + args.runs):
        res = random_run(seed)
        if res.violations or res.recovered_after is None:
            bad += 1
            print(f"seed {seed}: {res.violations or 'no leader within bound'}", flush=True)
        else:
            recovered.append(res.recovered_after)
    wall = time.perf_counter() - t0
    print(f"{args.runs} runs, {bad} bad, {wall:.1f} s wall")
    if recovered:
        qs = statistics.quantiles(recovered, n=100)
        print(f"recovery: median {qs[49]:.3f} s, p99 {qs[98]:.3f} s, max {max(recovered):.3f} s")
    times = [measure_failover(3, s) for s in range(args.failover)]
    done = [x for x in times if x is not None]
    if done:
        print(
            f"failover (3 voters): median {statistics.median(done):.3f} s, "
            f"max {max(done):.3f} s, {len(times) - len(done)} not recovered"
        )


if __name__ == "__main__":
    main()
