"""The pusher's side of a rollout as a sans-I/O state machine: canaries first, then the rest.

Inputs are the states nodes report (`report`) and clock ticks (`tick`); outputs are `Stage`
(send the signed release to these nodes now) and `Publish` (announce it to the whole cluster
by gossip, which is also how nodes that are offline now catch up later). The shell carries
them out. A canary that rolls back, fails or does not become healthy in time halts the
rollout: the release is never published, so no other node installs it.

The rest goes in waves: at most `wave` nodes fetch, install and restart at once, and each
node that settles lets the next one in (Kubernetes' maxUnavailable, Salt's batch size). The
release is published once the last node is staged, since a node that sees it published
applies it on its own, wave or not.

When the release is the pusher's own code, the pusher goes last: restarting it ends the
rollout, so everything else must be settled first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: What a node reports, in order; the last three end its part of the rollout.
PROGRESS = ("fetching", "installed", "restarted", "healthy")
FAILED = ("rolled_back", "failed")
TERMINAL = ("healthy", *FAILED, "timed_out")
STAGE_SLACK_S = 30.0
"""Beyond the release's health timeout, how long a staged node may take to fetch and install
before it counts as timed out: a bundle is a few MB over a LAN or a Tailscale link."""
WAVE_SHARE = 0.25
"""By default a quarter of the nodes update at once (as Kubernetes' maxUnavailable): three
quarters keep building meanwhile, and the machines and links of a wave are not shared with
the other three. A 20 MiB push to all 39 nodes at once on two cores left 7-9 of them short
of healthy within their deadline, and the pusher (the leader) lost its quorum."""
MIN_WAVE = 4
"""...and at least this many, so a home lab of a handful of nodes updates in one go."""


def wave_size(nodes: int) -> int:
    """How many of `nodes` update at once by default (WAVE_SHARE, MIN_WAVE)."""
    return max(MIN_WAVE, math.ceil(nodes * WAVE_SHARE))


@dataclass(frozen=True, slots=True)
class Stage:
    nodes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Publish:
    pass


Output = Stage | Publish


@dataclass
class NodeState:
    state: str = "waiting"
    reason: str = ""
    canary: bool = False
    deadline: float = float("inf")
    since: float = 0.0


@dataclass
class Rollout:
    """One push: `targets` are the live members when it started (the pusher among them),
    `offline` those that will catch up from the published release when they return; after
    the canaries, at most `wave` of them at once (0: all)."""

    me: str
    targets: tuple[str, ...]
    canaries: tuple[str, ...]
    health_timeout: float
    self_last: bool
    offline: tuple[str, ...] = ()
    wave: int = 0
    nodes: dict[str, NodeState] = field(default_factory=dict)
    phase: str = "new"  # new -> canary -> rest -> [self] -> done | halted
    halted: tuple[str, str, str] | None = None  # (canary, its state, why) that stopped it
    _out: list[Output] = field(default_factory=list)
    _queue: list[str] = field(default_factory=list)  # the rest, not staged yet
    _published: bool = False

    def __post_init__(self) -> None:
        for n in self.targets:
            self.nodes[n] = NodeState(canary=n in self.canaries)
        for n in self.offline:
            self.nodes[n] = NodeState(state="offline")

    # -- inputs -------------------------------------------------------------------------

    def start(self, now: float) -> None:
        if self.canaries:
            self.phase = "canary"
            self._stage(now, self.canaries)
        else:
            self._go_rest(now)
        self._advance(now)  # nothing to wait for (a lone node updating itself) goes on at once

    def report(self, now: float, node: str, state: str, reason: str = "") -> None:
        s = self.nodes.get(node)
        if s is None or s.state in TERMINAL or s.state in ("waiting", "offline"):
            return  # not ours, already settled, or not staged (a stale or forged report)
        if state not in PROGRESS and state not in FAILED:
            return
        s.state, s.reason, s.since = state, reason, now
        self._advance(now)

    def gone(self, now: float, node: str, why: str) -> None:
        """Membership says `node` is dead or left. One still waiting for its wave is not
        staged (it would hold a place until its deadline) and counts as offline: it catches
        up from the published release when it returns. Staged ones keep their deadline (a
        self-update's restart can look like a death for a moment)."""
        s = self.nodes.get(node)
        if s is None or s.state != "waiting" or node == self.me or self.done:
            return
        if node in self._queue:
            self._queue.remove(node)
        s.state, s.reason, s.since = "offline", why, now
        self._advance(now)

    def tick(self, now: float) -> None:
        for s in self.nodes.values():
            if s.state not in (*TERMINAL, "waiting", "offline") and now >= s.deadline:
                s.reason = f"{s.state} for {now - s.since:.1f} s, no healthy report in time"
                s.state, s.since = "timed_out", now
        self._advance(now)

    def drain(self) -> list[Output]:
        out, self._out = self._out, []
        return out

    # -- views ----------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.phase in ("done", "halted")

    def failures(self) -> list[tuple[str, str, str]]:
        """(node, state, reason) of every node that did not end healthy."""
        return [(n, s.state, s.reason) for n, s in self.nodes.items()
                if s.state in FAILED or s.state == "timed_out"]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.nodes.values():
            out[s.state] = out.get(s.state, 0) + 1
        return out

    def next_deadline(self) -> float:
        return min((s.deadline for s in self.nodes.values()
                    if s.state not in TERMINAL and s.state != "offline"), default=float("inf"))

    # -- internals ------------------------------------------------------------------------

    def _stage(self, now: float, nodes: tuple[str, ...]) -> None:
        if not nodes:
            return
        for n in nodes:
            s = self.nodes[n]
            s.state, s.since, s.deadline = "staged", now, now + self.health_timeout + STAGE_SLACK_S
        self._out.append(Stage(nodes))

    def _settled(self, nodes: tuple[str, ...]) -> bool:
        return all(self.nodes[n].state in TERMINAL for n in nodes)

    def _go_rest(self, now: float) -> None:
        self.phase = "rest"
        self._queue = [n for n in self.targets if n not in self.canaries
                       and not (self.self_last and n == self.me)
                       and self.nodes[n].state == "waiting"]  # (not gone meanwhile)
        self._fill(now)

    def _fill(self, now: float) -> None:
        """Stage as many of the rest as the wave has room for; publish with the last."""
        if self.wave > 0:
            busy = sum(1 for s in self.nodes.values()
                       if s.state not in (*TERMINAL, "waiting", "offline"))
            room = max(0, self.wave - busy)
        else:
            room = len(self._queue)
        batch, self._queue = tuple(self._queue[:room]), self._queue[room:]
        if not self._queue and not self._published:
            self._published = True
            self._out.append(Publish())
        self._stage(now, batch)

    def _advance(self, now: float) -> None:
        if self.phase == "canary" and self._settled(self.canaries):
            bad = [(n, self.nodes[n]) for n in self.canaries if self.nodes[n].state != "healthy"]
            if bad:
                self.phase = "halted"
                n, s = bad[0]
                self.halted = (n, s.state, s.reason)
                return
            self._go_rest(now)
        if self.phase == "rest":
            self._fill(now)
            rest = tuple(n for n in self.targets
                         if self.nodes[n].state not in ("waiting", "offline"))
            if self._queue or not self._settled(rest):
                return
            if self.self_last and self.me in self.nodes and self.nodes[self.me].state == "waiting":
                self.phase = "self"
                self._stage(now, (self.me,))
                return
            self.phase = "done"
        if self.phase == "self" and self._settled((self.me,)):
            self.phase = "done"
