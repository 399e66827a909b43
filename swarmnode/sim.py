"""Deterministic discrete-event simulator for the membership core.

It drives real `Membership` instances exactly as the node shell does -- `handle` for each
delivered message, `tick` when `next_deadline` is due, `drain` after each -- over a virtual clock
and a seeded RNG, with per-message latency, loss, partitions, crashes, restarts and graceful
leaves. Same seed, same run.

Large clusters start from one converged, shared, immutable member snapshot (copy-on-write in
each node's table) instead of simulating thousands of joins, so 10,000 nodes fit in memory and
a join benchmark runs in about a minute:

    python -m swarmnode.sim --n 1000 --loss 0.1
"""

from __future__ import annotations

import argparse
import base64
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import nacl.signing

from .identity import Identity
from .membership.config import Config
from .membership.core import FOUNDER, Event, Membership, Send
from .membership.messages import (
    Admit,
    Gossip,
    Item,
    Record,
    admit_body,
    decode,
    encode,
    make_record,
)
from .membership.state import ALIVE, Entry, SharedMembers
from .simclock import EventClock

Latency = tuple[float, float] | Callable[[random.Random], float]

_DELIVER = 0
_TICK = 1
_STOP = 2
_FORGE = 3
_INF = math.inf


class NullCrypto:
    """Signs nothing and accepts everything: for speed where signatures are not under test."""

    __slots__ = ()

    def sign(self, data: bytes) -> bytes:
        return b""

    def verify(self, node_id: str, data: bytes, signature: bytes) -> bool:
        return True


def fake_id(rng: random.Random) -> str:
    """A well-formed node id (52 base32 chars) without generating a key."""
    return base64.b32encode(rng.randbytes(32)).decode("ascii").rstrip("=").lower()


@dataclass(slots=True)
class SimNode:
    id: str
    crypto: Any
    record: Record
    rng: random.Random
    member: Membership | None = None
    up: bool = True
    left: bool = False
    tick_at: float = _INF
    saved: dict[str, Any] | None = None
    joined_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class Simulation(EventClock):
    """A cluster of n nodes, converged at time 0, ready to be perturbed and observed."""

    def __init__(
        self,
        n: int,
        config: Config | None = None,
        seed: int = 0,
        loss: float = 0.0,
        latency: Latency = (0.0005, 0.002),
        *,
        real_crypto: bool = False,
        codec: bool = False,
        record_events: bool = False,
    ) -> None:
        self.config = config or Config.fast()
        self.rng = random.Random(seed)
        self.loss = loss
        self.latency = latency
        self.real_crypto = real_crypto
        self.codec = codec
        self.record_events = record_events
        super().__init__()
        self.nodes: dict[str, SimNode] = {}
        self.events: list[tuple[float, str, str, dict[str, Any]]] = []
        self.event_counts: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self.learned: dict[str, dict[str, float]] = {}  # id -> {observer: time it saw id alive}
        self._group: dict[str, int] = {}
        if n:
            self._build(n)

    # ------------------------------------------------------------------ construction

    def _new_identity(self) -> tuple[str, Any]:
        if self.real_crypto:
            ident = Identity(nacl.signing.SigningKey(self.rng.randbytes(32)))
            return ident.id, ident
        return fake_id(self.rng), NullCrypto()

    def _new_record(self, id_: str, crypto: Any, i: int) -> Record:
        addr = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:7946"
        facts = {"arch": "x86_64", "cores": 8, "os": "linux"}
        return make_record(crypto, id_, 0, f"n{i}", (addr,), facts)

    def _build(self, n: int) -> None:
        """n nodes that all know each other alive, sharing one immutable table."""
        nodes = []
        for i in range(n):
            id_, crypto = self._new_identity()
            rec = self._new_record(id_, crypto, i)
            nodes.append(SimNode(id_, crypto, rec, random.Random(self.rng.getrandbits(64))))
        founder = nodes[0]
        entries = []
        for node in nodes:
            how = FOUNDER if node is founder else "seed"
            sig = founder.crypto.sign(admit_body(node.id, founder.id, how, 0))
            admit = Admit(node.id, founder.id, how, 0, sig)
            entries.append(Entry(node.id, ALIVE, 0, node.record, 0.0, admit=admit))
        base = SharedMembers(entries)
        for node in nodes:
            node.member = Membership(
                node.record, node.crypto, self.config, node.rng, 0.0, base=base
            )
            self.nodes[node.id] = node
            self._flush(node)

    def add_node(
        self, contact: str | None = None, how: str = "token", *, admit_first: bool = False
    ) -> str:
        """A new machine joins: it says hello to `contact`, is admitted, then push-pulls.

        `admit_first` admits before taking the record, as the node shell does with a valid
        join token (the admission then goes out before the record)."""
        if contact is None:
            contact = self.rng.choice(self.live_ids())
        id_, crypto = self._new_identity()
        rec = self._new_record(id_, crypto, len(self.nodes))
        node = SimNode(id_, crypto, rec, random.Random(self.rng.getrandbits(64)))
        node.member = Membership(rec, crypto, self.config, node.rng, self.now)
        node.joined_at = self.now
        self.nodes[id_] = node
        self.learned[id_] = {}
        c = self.nodes[contact]
        assert c.member is not None
        if admit_first:
            c.member.admit(self.now, id_, how)
            c.member.hello(self.now, id_, rec, how)
        else:
            c.member.hello(self.now, id_, rec, how)
            c.member.admit(self.now, id_, how)
        self._flush(c)
        node.member.join(self.now, [contact])
        self._flush(node)
        return id_

    # ------------------------------------------------------------------ perturbations

    def crash(self, id_: str) -> None:
        """The node stops without a word; its last state is kept for `restart`."""
        node = self.nodes[id_]
        assert node.member is not None
        node.saved = node.member.snapshot()
        node.up = False
        node.tick_at = _INF

    def restart(self, id_: str) -> None:
        """A crashed node comes back from its saved snapshot and rejoins."""
        node = self.nodes[id_]
        assert node.saved is not None and not node.up
        node.member = Membership.restore(
            node.saved, node.record, node.crypto, self.config, node.rng, self.now
        )
        node.record = node.member.record
        node.up = True
        node.left = False
        self._flush(node)

    def leave(self, id_: str, linger: float | None = None) -> None:
        """Graceful leave; the node keeps gossiping for `linger` seconds, then stops."""
        node = self.nodes[id_]
        assert node.member is not None
        node.member.leave(self.now)
        node.left = True
        self._flush(node)
        if linger is None:
            linger = 5 * self.config.gossip_interval
        self._push(self.now + linger, _STOP, id_, "", None)

    def byzantine(
        self, id_: str, forge: Callable[[Simulation], Iterable[Item]], every: float
    ) -> None:
        """From now on `id_` (a member whose key an attacker holds) also sends every other node
        a gossip of the items `forge` makes, every `every` seconds, beside its honest protocol."""
        self.nodes[id_].extra["forge"] = (forge, every)
        self._push(self.now, _FORGE, id_, "", None)

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Nodes in different groups cannot talk; unlisted nodes form one more group."""
        self._group = {id_: gi for gi, g in enumerate(groups) for id_ in g}

    def heal(self) -> None:
        self._group = {}

    # ------------------------------------------------------------------ running

    def run_until_pred(
        self, pred: Callable[[Simulation], bool], timeout: float, step: float | None = None
    ) -> bool:
        """Run until `pred(self)` holds (checked every `step`), or `timeout` seconds pass."""
        return super().run_until_pred(pred, timeout, step or self.config.gossip_interval / 2)

    def _step(self) -> None:
        t, _, kind, to, src, msg = self._pop()
        node = self.nodes.get(to)
        if node is None or node.member is None:
            return
        if kind == _DELIVER:
            if not node.up:
                self.stats["dropped_down"] += 1
                return
            if self.codec:
                msg = decode(*msg)
            self.stats["delivered"] += 1
            node.member.handle(t, src, msg)
            self._flush(node)
        elif kind == _TICK:
            if not node.up or node.tick_at != t:
                return
            node.tick_at = _INF
            node.member.tick(t)
            self.stats["ticks"] += 1
            self._flush(node, after_tick=True)
        elif kind == _STOP:
            node.up = False
            node.tick_at = _INF
        elif kind == _FORGE and node.up:
            forge, every = node.extra["forge"]
            lie = Gossip(tuple(forge(self)))
            for dst in self.live_ids():
                if dst != to:
                    self._transmit(to, dst, lie)
            self._push(t + every, _FORGE, to, "", None)

    def _flush(self, node: SimNode, after_tick: bool = False) -> None:
        m = node.member
        assert m is not None
        for out in m.drain():
            if type(out) is Send:
                self._transmit(node.id, out.to, out.msg)
            else:
                self._observe(node.id, out)  # type: ignore[arg-type]
        if not node.up:
            return
        nd = m.next_deadline()
        if nd <= self.now:
            if after_tick and nd < self.now:
                self.stats["stalled_tick"] += 1
                nd = self.now + 1e-6
            nd = max(nd, self.now)
        if nd < node.tick_at:
            node.tick_at = nd
            self._push(nd, _TICK, node.id, "", None)

    def _transmit(self, src: str, dst: str, msg: Any) -> None:
        self.stats["sent"] += 1
        if self.loss and self.rng.random() < self.loss:
            self.stats["lost"] += 1
            return
        if self._group and self._group.get(src, -1) != self._group.get(dst, -1):
            self.stats["partitioned"] += 1
            return
        lat = self.latency
        delay = self.rng.uniform(*lat) if isinstance(lat, tuple) else lat(self.rng)
        if self.codec:
            msg = encode(msg)
        self._push(self.now + delay, _DELIVER, dst, src, msg)

    def _observe(self, observer: str, ev: Event) -> None:
        self.event_counts[ev.kind] += 1
        if self.record_events:
            self.events.append((self.now, observer, ev.kind, ev.data))
        if ev.kind in ("member_join", "member_alive"):
            seen = self.learned.get(ev.data["id"])
            if seen is not None and observer not in seen:
                seen[observer] = self.now

    # ------------------------------------------------------------------ queries

    def member(self, id_: str) -> Membership:
        m = self.nodes[id_].member
        assert m is not None
        return m

    def live_ids(self) -> list[str]:
        """Nodes running and not leaving, in creation order."""
        return [i for i, n in self.nodes.items() if n.up and not n.left]

    def fraction_knowing(self, target: str, states: Iterable[str] = (ALIVE,)) -> float:
        """Fraction of the other live nodes that hold `target` in one of `states`."""
        wanted = set(states)
        others = [i for i in self.live_ids() if i != target]
        if not others:
            return 1.0
        hits = sum(1 for i in others if self.member(i).state_of(target) in wanted)
        return hits / len(others)

    def views_agree(self, ids: Iterable[str] | None = None) -> bool:
        """Every live node sees every other live node alive (O(n^2): small clusters only)."""
        live = list(ids) if ids is not None else self.live_ids()
        return all(self.member(a).state_of(b) == ALIVE for a in live for b in live if a != b)

    def time_to_fraction(self, target: str, fraction: float) -> float | None:
        """Seconds from `target`'s join until `fraction` of the other live nodes knew it alive."""
        seen = self.learned.get(target, {})
        others = len([i for i in self.live_ids() if i != target])
        need = math.ceil(fraction * others)
        times = sorted(seen.values())
        if need == 0:
            return 0.0
        if len(times) < need:
            return None
        return times[need - 1] - self.nodes[target].joined_at


def measure_join(
    n: int,
    loss: float = 0.0,
    seed: int = 1,
    fraction: float = 0.999,
    config: Config | None = None,
    warmup: float = 2.0,
    timeout: float = 20.0,
    latency: Latency = (0.0005, 0.002),
) -> dict[str, Any]:
    """Seconds until `fraction` of an n-node cluster knows of one join (plus cost figures)."""
    t0 = time.perf_counter()
    sim = Simulation(n, config or Config(), seed=seed, loss=loss, latency=latency)
    built = time.perf_counter() - t0
    sim.run_for(warmup)
    new = sim.add_node()
    ok = sim.run_until_pred(
        lambda s: s.time_to_fraction(new, fraction) is not None, timeout, step=0.05
    )
    result = sim.time_to_fraction(new, fraction) if ok else None
    return {
        "n": n,
        "loss": loss,
        "fraction": fraction,
        "seconds": result,
        "messages": sim.stats["sent"],
        "build_s": round(built, 2),
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="membership join dissemination benchmark")
    ap.add_argument("--n", type=int, nargs="+", default=[30, 100, 1000])
    ap.add_argument("--loss", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-eager", action="store_true", help="disable eager gossip")
    args = ap.parse_args(argv)
    cfg = Config(eager_gossip=not args.no_eager)
    for n in args.n:
        for loss in args.loss:
            print(measure_join(n, loss, args.seed, config=cfg), flush=True)


if __name__ == "__main__":
    main()
