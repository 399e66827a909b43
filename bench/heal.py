"""After a partition heals, how long until the cut-off followers hear their leader again.

Needs root. Five lab hosts with the shipped timers (the fault benchmark's swarm,
tests/lab/nemesis.py `form`). Each round cuts the leader and one follower off from the other
three for `--hold` seconds, while the three elect a leader, heals, and polls the two (every
20 ms, over their control sockets) until each names the new leader; the figure is the later
of the two, from the heal. By default the fault benchmark's DAG builds meanwhile, so that
members hold connections to each other and the new leader has entries to send.

Why: in the fault benchmark (seed 9, 2 runs of 6) a partition that began 1.9 s after another
healed found the earlier one's two nodes still not following the leader elected while they
were cut off (no `leader_changed` on either), their logs behind, so that only one node of
the three could win, and it was slow to campaign (its own stalls had stretched its timeout):
3 s without a leader. This measures the first part alone.

    .venv/bin/python bench/heal.py [--rounds 8] [--hold 4.5] [--idle] [--worktree]

Results on stdout and in /tmp/swarmnode-bench/heal.json.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time

import snapshot  # bench/ is on sys.path when run as a script

if __name__ == "__main__":
    snapshot.reexec_on_head(sys.argv[1:])
SRC = snapshot.source()
sys.path.insert(0, str(SRC))

from swarmnode import control  # noqa: E402
from tests.lab import Lab  # noqa: E402
from tests.lab.nemesis import form, make_dag  # noqa: E402
from tests.swarm import Node, Swarm, short_root  # noqa: E402

POLL_S = 0.02
GIVE_UP_S = 30.0
SETTLE_S = 3.0  # between rounds: every connection back, the followers caught up


def leader_of(node: Node) -> str | None:
    try:
        return control.call(node.home, "status", timeout=2.0)["leader"]
    except (control.ControlError, OSError, TimeoutError, KeyError):
        return None


def one_round(cluster, hold: float) -> float:
    """Cut the leader and one follower off for `hold` s (the other three elect a leader of
    their own meanwhile), heal; seconds from the heal until both name the new leader."""
    nodes = cluster.nodes
    old = leader_of(nodes[0])
    cut = [n for n in nodes if n.id == old] + [n for n in nodes if n.id != old][:1]
    rest = [n for n in nodes if n not in cut]
    cluster.cut(cut, rest)
    time.sleep(hold)
    new = leader_of(rest[0])
    if new in (None, old) or any(leader_of(n) != new for n in rest):
        raise RuntimeError("the three did not agree on a new leader during the cut")
    cluster.cut(cut, rest, heal=True)
    healed = time.monotonic()
    waiting = cut
    while waiting:
        if time.monotonic() - healed > GIVE_UP_S:
            raise RuntimeError(f"{[n.name for n in waiting]} never heard the leader again")
        waiting = [n for n in waiting if leader_of(n) != new]
        time.sleep(POLL_S)
    return time.monotonic() - healed


def main() -> int:
    ap = snapshot.lab_parser(__doc__, "heal", swarmnode=False)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--hold", type=float, default=4.5, help="seconds each cut lasts")
    ap.add_argument("--idle", action="store_true",
                    help="no build meanwhile (by default the fault benchmark's DAG runs, so "
                         "that members hold connections to each other when the cut comes)")
    args = ap.parse_args()
    if not snapshot.is_root():
        return 2
    root = short_root()
    times: list[float] = []
    try:
        with Lab("snh", log_dir=root / "lab") as lab:
            swarm = Swarm(root, lab=lab)
            try:
                cluster = form(swarm, lab)
                if not args.idle:  # (as long as the rounds: 8 of 8.5 s)
                    plan = root / "plan.toml"
                    plan.write_text(make_dag(6 * 12 * args.rounds // 8, 6).plan(
                        5.0, root / "runs.log"))
                    swarm.cli(cluster.nodes[0], "build", str(plan))
                for i in range(args.rounds):
                    time.sleep(SETTLE_S)
                    t = one_round(cluster, args.hold)
                    times.append(round(t, 3))
                    print(f"  round {i + 1}: both hear the new leader {t:.3f} s after "
                          "the heal", flush=True)
            finally:
                swarm.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "commit": snapshot.commit(),
           "hold_s": args.hold, "busy": not args.idle, "rounds": times,
           "median": round(statistics.median(times), 3), "max": max(times)}
    print(f"{len(times)} cuts of {args.hold:g} s: the two cut off hear the new leader "
          f"a median {res['median']} s after the heal (max {res['max']} s)")
    snapshot.write_result(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
