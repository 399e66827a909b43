"""Leader failover of real swarmnode processes on 5 separate hosts (network namespaces).

Needs root. The 5-host LAN of lab_membership.py, shipped default timers. `--trials` times:
find the leader every node agrees on, `kill -9` it, and time until every survivor reports
the same new leader (polling each node's control socket every `--poll` s; the new leader's
own `leader_elected` event timestamp gives the same figure without polling). The killed node
is then restarted from its home and the cluster given time to settle before the next trial.

    .venv/bin/python bench/lab_failover.py [--trials 20] [--worktree]

Results on stdout and in /tmp/swarmnode-bench/lab_failover.json.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import snapshot  # bench/ is on sys.path when run as a script

if __name__ == "__main__":
    snapshot.reexec_on_head(sys.argv[1:])

from lab_membership import HOSTS, Bench, Node, build, form_cluster

from swarmnode import control
from tests.lab import Lab

TARGET_S = 2.0
SETTLE_S = 8.0  # a restarted node observes for 3 s, then voters step back one a second


def agreed(b: Bench, nodes: list[Node]) -> tuple[str, int] | None:
    seen = set()
    for n in nodes:
        try:
            st = control.call(n.home, "status", timeout=2)
        except (control.ControlError, OSError, TimeoutError):
            return None
        seen.add((st["leader"], st["term"]))
    if len(seen) == 1:
        leader, term = seen.pop()
        return (leader, term) if leader else None
    return None


def wait(cond, timeout: float, poll: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    return None


def trial(b: Bench, poll: float) -> dict[str, Any]:
    running = b.running()
    first = wait(lambda: agreed(b, running), 30, poll)
    if first is None:
        raise RuntimeError("no agreed leader before the trial")
    leader, term = first
    victim = next(n for n in running if n.id == leader)
    rest = [n for n in running if n is not victim]
    t_kill = time.time()
    b.lab.kill9(victim.proc)
    new = wait(lambda: (a := agreed(b, rest)) and a[0] != leader and a, 30, poll)
    t_new = time.time()
    if new is None:
        raise RuntimeError("no new leader within 30 s")
    elected = b.event_ts(next(n for n in rest if n.id == new[0]), "leader_elected",
                         after=t_kill)
    b.start(victim)  # same home, same identity
    with contextlib.suppress(RuntimeError):
        wait(lambda: b.all_alive(1), 30, poll)
    time.sleep(SETTLE_S)  # let voters step back before the next kill (not a measurement)
    return {"killed": victim.host, "old_term": term, "new_term": new[1],
            "agreed_s": round(t_new - t_kill, 3),
            "elected_event_s": round(elected - t_kill, 3) if elected else None}


def main() -> int:
    ap = snapshot.lab_parser(__doc__, "lab_failover")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--poll", type=float, default=0.02)
    args = ap.parse_args()
    if not snapshot.is_root():
        return 2
    root = Path(tempfile.mkdtemp(prefix="swarmnode-bench-failover-"))
    trials: list[dict[str, Any]] = []
    with Lab("snf", log_dir=root / "lab") as lab:
        b = Bench(lab=lab, root=root, swarmnode=args.swarmnode, poll=args.poll)
        build(lab)
        form_cluster(b)
        b.start(b.new_home(f"n{HOSTS}"))
        if not b.all_alive(60):
            raise RuntimeError("5 nodes did not converge")
        time.sleep(SETTLE_S)
        for i in range(args.trials):
            trials.append(trial(b, args.poll))
            print(f"  trial {i}: {trials[-1]}", flush=True)
        for n in b.running():
            b.stop(n)
    agreed_s = [t["agreed_s"] for t in trials]
    events = [t["elected_event_s"] for t in trials if t["elected_event_s"] is not None]
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "commit": snapshot.commit(),
           "trials": trials, "target_s": TARGET_S,
           "agreed_median_s": round(statistics.median(agreed_s), 3),
           "agreed_max_s": max(agreed_s),
           "elected_event_median_s": round(statistics.median(events), 3) if events else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"kill -9 leader -> all survivors agree on a new leader: median "
          f"{res['agreed_median_s']} s, max {res['agreed_max_s']} s (n={len(trials)}); "
          f"leader_elected event median {res['elected_event_median_s']} s; "
          f"target < {TARGET_S} s")
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
