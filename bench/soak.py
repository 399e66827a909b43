"""Issue 15's soak: does a busy swarm stay flat? 5 lab hosts, a 20-job build every 5 s.

Needs root. The five-host swarm of the fault test (tests/lab/nemesis.py: `lan1..lan5`, shipped
timers) gets a 20-job DAG (layers of 5, each job 0.5 s; the fault test's plan) submitted every
`--every` seconds from the nodes in turn, for `--minutes`. Every node is sampled at the start,
every `--sample-every` seconds and at the end: RSS, open fds and threads of its process
(/proc/PID), the sizes of ledger.db, history.db and state.db (with their -wal), the size and
file count of artifacts/ and jobs/, and the empty directories left in each. Reported per node:
start, end, the slope per hour (least squares over the samples), and RSS at the end beside RSS
after 10 minutes (issue 15's target: within +-5 MiB); and the builds submitted, finished and failed.

    .venv/bin/python bench/soak.py [--minutes 60] [--worktree]
    .venv/bin/python bench/soak.py --minutes 3 --sample-every 30     # a quick check

Results on stdout and in /tmp/swarmnode-bench/soak.json; --keep keeps homes and logs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import snapshot  # bench/ is on sys.path when run as a script

if __name__ == "__main__":
    snapshot.reexec_on_head(sys.argv[1:])
SRC = snapshot.source()
sys.path.insert(0, str(SRC))

from swarmnode import control  # noqa: E402
from tests.lab import Lab  # noqa: E402
from tests.lab.nemesis import Cluster, form, make_dag  # noqa: E402
from tests.swarm import Node, Swarm, short_root  # noqa: E402

MIB = 1024 * 1024
RSS_AFTER_S = 600.0  # the reference point: RSS after the first 10 minutes
RSS_TARGET_MIB = 5.0
FIGURES = ("rss_mib", "fds", "threads", "ledger_db_kib", "history_db_kib", "state_db_kib",
           "artifacts_mib", "artifacts_files",
           "artifacts_empty_dirs", "jobs_mib", "jobs_files", "jobs_empty_dirs")


def tree(path: Path) -> tuple[int, int, int]:
    """Bytes and files below `path`, and the directories in it with nothing inside."""
    size = files = empty = 0
    for root, dirs, names in os.walk(path):
        if root != str(path) and not dirs and not names:
            empty += 1
        for name in names:
            with contextlib.suppress(OSError):
                size += os.lstat(os.path.join(root, name)).st_size
                files += 1
    return size, files, empty


def proc_figures(pid: int) -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_mib": round(int(fields["VmRSS"].split()[0]) / 1024, 2),
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(fields["Threads"])}


def sample(node: Node, t0: float) -> dict[str, float]:
    pid = control.call(node.home, "status", timeout=5)["pid"]
    def db(name: str) -> float:  # (with its -wal and -shm)
        return round(sum(p.stat().st_size for p in node.home.glob(f"{name}*")
                         if p.is_file()) / 1024, 1)

    art = tree(node.home / "artifacts")
    jobs = tree(node.home / "jobs")
    return {"t_s": round(time.time() - t0, 1), **proc_figures(pid),
            "ledger_db_kib": db("ledger.db"), "history_db_kib": db("history.db"),
            "state_db_kib": db("state.db"),
            "artifacts_mib": round(art[0] / MIB, 3), "artifacts_files": art[1],
            "artifacts_empty_dirs": art[2],
            "jobs_mib": round(jobs[0] / MIB, 3), "jobs_files": jobs[1],
            "jobs_empty_dirs": jobs[2]}


def take_samples(nodes: list[Node], t0: float, samples: dict[str, list[dict[str, float]]],
                 missed: list[str]) -> None:
    """A sample of every node; a node slow to answer loses this sample, not the whole soak."""
    for n in nodes:
        try:
            samples.setdefault(n.name, []).append(sample(n, t0))
        except (control.ControlError, OSError) as exc:
            missed.append(f"{n.name} at {time.time() - t0:.0f} s: {exc}")


def slope_per_hour(points: list[dict[str, float]], key: str) -> float | None:
    """Least-squares slope of `key` over time, per hour."""
    if len(points) < 2:
        return None
    with contextlib.suppress(statistics.StatisticsError):
        fit = statistics.linear_regression([p["t_s"] for p in points], [p[key] for p in points])
        return round(fit.slope * 3600, 2)
    return None


class Submitter(threading.Thread):
    """Submits the plan every `every` seconds, from each node in turn, on a fixed cadence."""

    def __init__(self, nodes: list[Node], plan: Path, every: float) -> None:
        super().__init__(daemon=True, name="submitter")
        self.nodes, self.plan, self.every = nodes, plan, every
        self.builds: list[str] = []
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        i = 0
        while not self.halt.wait(max(0.0, start + i * self.every - time.monotonic())):
            node = self.nodes[i % len(self.nodes)]
            i += 1
            try:
                self.builds.append(control.call(node.home, "build", timeout=60,
                                                plan=str(self.plan)))
            except (control.ControlError, OSError, TimeoutError) as exc:
                self.errors.append(f"{node.name}: {exc}")


def outcome(c: Cluster, builds: list[str], wait_s: float) -> dict[str, int]:
    """How the submitted builds ended (waiting up to `wait_s` for the last ones)."""
    node = c.nodes[0]
    deadline = time.monotonic() + wait_s
    views: dict[str, dict[str, Any]] = {}
    for b in builds:
        while True:
            with contextlib.suppress(control.ControlError, OSError, TimeoutError):
                views[b] = control.call(node.home, "build_status", timeout=5, build=b)
            if b not in views or views[b]["finished"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    return {"submitted": len(builds),
            "finished_ok": sum(1 for v in views.values() if v["finished"] and v["ok"]),
            "failed": sum(1 for v in views.values() if v["finished"] and not v["ok"]),
            "unfinished": sum(1 for v in views.values() if not v["finished"]),
            "gone": len(builds) - len(views)}  # no longer in the ledger (compacted away)


def summary(points: list[dict[str, float]]) -> dict[str, Any]:
    first, last = points[0], points[-1]
    at10 = next((p for p in points if p["t_s"] >= RSS_AFTER_S), None)
    return {"start": first, "end": last,
            "slope_per_hour": {k: slope_per_hour(points, k) for k in FIGURES},
            "rss_vs_10min_mib": round(last["rss_mib"] - at10["rss_mib"], 2) if at10 else None}


def main() -> int:
    ap = snapshot.lab_parser(__doc__, "soak", swarmnode=False)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--every", type=float, default=5.0, help="seconds between builds")
    ap.add_argument("--sample-every", type=float, default=60.0)
    ap.add_argument("--keep", action="store_true", help="keep the homes and logs")
    args = ap.parse_args()
    if not snapshot.is_root():
        return 2
    root = short_root()
    plan = root / "plan.toml"
    plan.write_text(make_dag(20, 5).plan(0.5, root / "runs.log"))
    samples: dict[str, list[dict[str, float]]] = {}
    missed: list[str] = []
    with Lab("sns", log_dir=root / "lab") as lab:
        swarm = Swarm(root, lab=lab)
        try:
            c = form(swarm, lab)
            t0 = time.time()
            sub = Submitter(c.nodes, plan, args.every)
            sub.start()
            end = time.monotonic() + args.minutes * 60
            while True:
                take_samples(c.nodes, t0, samples, missed)
                print(f"  {samples['lan1'][-1]['t_s']:7.1f} s: {len(sub.builds)} builds; "
                      + ", ".join(f"{name} {s[-1]['rss_mib']} MiB"
                                  for name, s in samples.items()), flush=True)
                left = end - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(args.sample_every, left))
            sub.halt.set()
            sub.join()
            builds = outcome(c, sub.builds, 120.0)
            take_samples(c.nodes, t0, samples, missed)  # the end, once the builds are through
        finally:
            swarm.close()
    if args.keep:
        print(f"homes and logs kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    nodes = {name: summary(points) for name, points in samples.items()}
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "commit": snapshot.commit(),
           "minutes": args.minutes, "every_s": args.every, "jobs_per_build": 20,
           "builds": builds, "submit_errors": sub.errors[:20], "missed_samples": missed[:20],
           "rss_target_mib": RSS_TARGET_MIB, "nodes": nodes, "samples": samples}
    print(f"{args.minutes:g} min, a 20-job build every {args.every:g} s: {builds}")
    print(f"{'node':6} " + " ".join(f"{k:>22}" for k in FIGURES[:6]))
    for name, s in nodes.items():
        print(f"{name:6} " + " ".join(
            f"{s['start'][k]:>7g}->{s['end'][k]:<7g}{s['slope_per_hour'][k] or 0:+7g}/h"
            for k in FIGURES[:6]) + f"  RSS vs 10 min: {s['rss_vs_10min_mib']} MiB")
    print(f"{'node':6} " + " ".join(f"{k:>22}" for k in FIGURES[6:]))
    for name, s in nodes.items():
        print(f"{name:6} " + " ".join(
            f"{s['start'][k]:>7g}->{s['end'][k]:<7g}{s['slope_per_hour'][k] or 0:+7g}/h"
            for k in FIGURES[6:]))
    snapshot.write_result(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
