"""A follower frozen for minutes: does the leader stay small? (Found in issue 15's soak.)

Three nodes on loopback with the shipped timers; a 20-job build (the soak's plan) every
`--every` seconds, submitted to the leader; after `--warm` seconds one follower is stopped
(SIGSTOP, as a frozen VM or a hung process: its TCP connections stay open, so what is sent to it
queues) for `--freeze` seconds, then continued. Sampled every `--sample-every` seconds: the
leader's RSS (VmRSS) and its bytes sent (`status`: bytes_out, and the Raft messages by type).
Reported: the leader's RSS before the freeze, its peak during it and its value after; its bytes
sent per second before and during; and how long the follower took to catch up once continued
(its applied index reaching the leader's, read just before).

    .venv/bin/python bench/frozen.py [--freeze 180] [--worktree]

Results on stdout and in /tmp/swarmnode-bench/frozen.json.
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import snapshot  # bench/ is on sys.path when run as a script

if __name__ == "__main__":
    snapshot.reexec_on_head(sys.argv[1:])
SRC = snapshot.source()
sys.path.insert(0, str(SRC))

from soak import Submitter  # noqa: E402

from swarmnode import control  # noqa: E402
from tests.lab.nemesis import make_dag  # noqa: E402
from tests.swarm import Swarm, loopback_addr, short_root  # noqa: E402

MIB = 1024 * 1024


def status(node: Any) -> dict[str, Any]:
    return control.call(node.home, "status", timeout=10)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise ValueError(f"no VmRSS for {pid}")


def main() -> int:
    ap = snapshot.lab_parser(__doc__, "frozen", swarmnode=False)
    ap.add_argument("--warm", type=float, default=60.0)
    ap.add_argument("--freeze", type=float, default=180.0)
    ap.add_argument("--after", type=float, default=60.0)
    ap.add_argument("--every", type=float, default=2.0, help="seconds between builds")
    ap.add_argument("--sample-every", type=float, default=5.0)
    args = ap.parse_args()
    root = short_root()
    plan = root / "plan.toml"
    plan.write_text(make_dag(20, 5).plan(0.5, root / "runs.log"))
    swarm = Swarm(root)
    samples: list[dict[str, Any]] = []
    try:
        first, token = swarm.init("n1", loopback_addr(1))
        swarm.start(first, fast=False)
        nodes = [first] + [swarm.start(swarm.add(f"n{i}", loopback_addr(i)), token, fast=False)
                           for i in (2, 3)]
        swarm.wait_converged(nodes, 60)
        swarm.grant(first, "build", *nodes[1:])
        swarm.wait_for(lambda: len(status(first)["voters"]) == 3 and status(first)["leader"],
                       60, "three voters and a leader")
        leader = next(n for n in nodes if n.id == status(first)["leader"])
        frozen = next(n for n in nodes if n is not leader)
        pid = status(leader)["pid"]
        sub = Submitter([leader], plan, args.every)
        sub.start()
        t0 = time.monotonic()
        phases = (("before", args.warm), ("frozen", args.freeze), ("after", args.after))
        caught_up: float | None = None
        for phase, seconds in phases:
            if phase == "frozen":
                os.killpg(frozen.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
            if phase == "after":
                os.killpg(frozen.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
                resumed = time.monotonic()
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                st = status(leader)
                samples.append({"t_s": round(time.monotonic() - t0, 1), "phase": phase,
                                "rss_mib": rss_mib(pid), "bytes_out": st["bytes_out"],
                                "append_entries": st["sent"].get("election.append_entries", 0),
                                "install_snapshot": st["sent"].get(
                                    "election.install_snapshot", 0)})
                # (the leader's applied index read just before: it moves on meanwhile)
                if phase == "after" and caught_up is None \
                        and status(frozen)["ledger"]["applied"] >= st["ledger"]["applied"]:
                    caught_up = round(time.monotonic() - resumed, 1)
                time.sleep(args.sample_every)
        sub.halt.set()
        sub.join()
    finally:
        swarm.close()

    def rate(phase: str) -> float:
        pts = [s for s in samples if s["phase"] == phase]
        return round((pts[-1]["bytes_out"] - pts[0]["bytes_out"]) / MIB
                     / max(pts[-1]["t_s"] - pts[0]["t_s"], 1e-9), 3)

    rss = {p: [s["rss_mib"] for s in samples if s["phase"] == p] for p, _s in phases}
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "commit": snapshot.commit(),
           "freeze_s": args.freeze, "builds": len(sub.builds), "submit_errors": sub.errors[:10],
           "leader_rss_before_mib": statistics.median(rss["before"]),
           "leader_rss_peak_frozen_mib": max(rss["frozen"]),
           "leader_rss_after_mib": rss["after"][-1],
           "leader_mib_out_per_s": {p: rate(p) for p, _s in phases},
           "caught_up_s": caught_up, "samples": samples}
    print({k: v for k, v in res.items() if k != "samples"})
    snapshot.write_result(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
