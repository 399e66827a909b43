"""Issue 15's fault benchmark: a 60-job DAG on 5 lab hosts under a seeded nemesis, per seed.

Needs root. The harness is the fault test's (tests/lab/nemesis.py: five `lan` hosts, shipped
timers, kill -9 + restart on the same home, SIGSTOP 3-10 s, 2|3 partitions, the leader aimed
at about half the time, at most two hosts faulted). For each of `--seeds` seeds a fresh swarm
builds the DAG while the nemesis runs for `--fault-seconds` (or until the build ends); first,
`--calm` builds of the same DAG without faults give the baseline. Figures per seed and their
medians:

* re-runs: job starts after a ledger showed the job done (target 0) and re-runs of attempts
  cut short by a fault (reported), beside all job starts;
* the longest time with no leader among the healthy nodes while they held a majority of the
  voters (target < 2 s; measured to about the 0.15 s poll);
* build time under faults / the calm build's median (the ratio);
* every invariant violation, verbatim (the fault test's: outputs, ledgers, terms, voters).

    .venv/bin/python bench/fault.py [--seeds 10] [--fault-seconds 60] [--worktree] [--keep]

Results on stdout and in /tmp/swarmnode-bench/fault.json; homes and logs of a seed with a
violation are kept (and always with --keep).
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from typing import Any

import snapshot  # bench/ is on sys.path when run as a script

if __name__ == "__main__":
    snapshot.reexec_on_head(sys.argv[1:])
SRC = snapshot.source()
sys.path.insert(0, str(SRC))

from tests.lab import Lab  # noqa: E402
from tests.lab.nemesis import Outcome, Trial, form, run_trial  # noqa: E402
from tests.swarm import Swarm, short_root  # noqa: E402

TARGETS = {"reruns_after_done": 0, "max_leaderless_s": 2.0}


def one(trial: Trial, keep: bool) -> Outcome:
    """A fresh five-node swarm, one build (under the nemesis unless fault_s is 0)."""
    root = short_root()
    swarm: Swarm | None = None
    out: Outcome | None = None
    try:
        with Lab("snq", log_dir=root / "lab") as lab:
            swarm = Swarm(root, lab=lab)
            try:
                out = run_trial(form(swarm, lab), trial, root / "trial")
            finally:
                swarm.close()
    finally:
        if keep or out is None or out.violations:
            print(f"  homes and logs kept in {root}", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
    assert out is not None  # (run_trial returned, or its error went up)
    return out


def med(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def main() -> int:
    ap = snapshot.lab_parser(__doc__, "fault", swarmnode=False)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--fault-seconds", type=float, default=60.0)
    ap.add_argument("--jobs", type=int, default=60)
    ap.add_argument("--width", type=int, default=6)
    ap.add_argument("--job-seconds", type=float, default=5.0,
                    help="each job's run time (5 s: the calm DAG takes about the 60 s of faults)")
    ap.add_argument("--calm", type=int, default=2, help="calm builds for the baseline")
    ap.add_argument("--keep", action="store_true", help="keep every seed's homes and logs")
    args = ap.parse_args()
    if not snapshot.is_root():
        return 2
    shape = {"jobs": args.jobs, "width": args.width, "job_s": args.job_seconds}
    calm = []
    for i in range(args.calm):
        o = one(Trial(seed=0, fault_s=0.0, **shape), args.keep)
        calm.append(o.build_s)
        print(f"  calm build {i}: {o.build_s} s, {o.starts} job starts, "
              f"violations {o.violations}", flush=True)
    base = statistics.median(calm)
    seeds: list[dict[str, Any]] = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        o = one(Trial(seed=seed, fault_s=args.fault_seconds, **shape), args.keep)
        row = {"seed": seed, "build_s": o.build_s, "ratio": round(o.build_s / base, 3),
               "faults": len(o.faults), "leader_aimed": sum(f["leader_aimed"] for f in o.faults),
               "starts": o.starts, "reruns_after_done": o.reruns_after_done,
               "reruns_interrupted": o.reruns_interrupted,
               "max_leaderless_s": o.max_leaderless_s, "violations": o.violations,
               "fault_list": o.faults, "leaderless": o.leaderless}
        seeds.append(row)
        print(f"  seed {seed}: build {o.build_s} s (x{row['ratio']}), {row['faults']} faults "
              f"({row['leader_aimed']} at the leader), {o.starts} starts, "
              f"{o.reruns_after_done} after done, {o.reruns_interrupted} interrupted re-runs, "
              f"longest leaderless {o.max_leaderless_s} s, {len(o.violations)} violations",
              flush=True)
        for v in o.violations:
            print(f"    VIOLATION {v}", flush=True)
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "commit": snapshot.commit(),
           "shape": shape, "fault_s": args.fault_seconds, "targets": TARGETS,
           "calm_build_s": calm, "seeds": seeds,
           "median": {k: med([s[k] for s in seeds]) for k in
                      ("build_s", "ratio", "reruns_after_done", "reruns_interrupted",
                       "max_leaderless_s", "starts")},
           "max_leaderless_s": max((s["max_leaderless_s"] for s in seeds), default=None),
           "reruns_after_done": sum(s["reruns_after_done"] for s in seeds),
           "violations": sum(len(s["violations"]) for s in seeds)}
    m = res["median"]
    print(f"{len(seeds)} seeds, {args.fault_seconds:g} s of faults over {args.jobs} jobs: "
          f"done jobs started again {res['reruns_after_done']} (target 0), interrupted re-runs "
          f"median {m['reruns_interrupted']}; longest leaderless median "
          f"{m['max_leaderless_s']} s, max {res['max_leaderless_s']} s (target < 2 s); build "
          f"{m['build_s']} s vs calm {base:.2f} s (ratio median {m['ratio']}); "
          f"{res['violations']} invariant violations")
    snapshot.write_result(args.out, res)
    return 1 if res["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
