"""Join dissemination in the simulator, beside Serf's published convergence model.

How long until 99.9% of the other members know of one join, for 30 .. 10,000 nodes, with the
shipped default `Config` (200 ms gossip, fanout 3), at 0% and 10% message loss, in both modes
the core offers:

- `eager`: the default; a node forwards news at once instead of waiting for its next round;
- `standard`: `eager_gossip=False`, plain SWIM/memberlist rounds every gossip interval. This is
  the fair comparison with Serf's model, which counts whole gossip rounds.

Each (mode, size, loss) cell runs in its own child process, so the peak RSS reported for a
cell is that cell's own (the 10,000-node figure is the memory of a 10,000-node simulation).
Simulated time is deterministic per seed; only wall time and RSS depend on the machine. By
default the product code is a clean snapshot of HEAD (see snapshot.py); `--worktree` measures
the working tree as it is.

    .venv/bin/python bench/sim_join.py                # full run, about 5 minutes
    .venv/bin/python bench/sim_join.py --sizes 30 100 --seeds 3

Results: a table on stdout and JSON in /tmp/swarmnode-bench/sim_join.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import snapshot  # bench/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]

#: Serf's convergence simulator (serf.io/docs/internals/simulator.html) at its defaults
#: (0.2 s interval, fanout 3, 0% loss): time to 99.9% convergence.
SERF_MODEL_S = {30: 1.4, 100: 1.6, 1000: 2.0, 10000: 2.2}
LARGE = 10000
#: measure_join's default: a join not known by the fraction within this many seconds is a timeout.
TIMEOUT_S = 20.0


def worker(mode: str, n: int, loss: float, seeds: list[int], fraction: float) -> dict[str, Any]:
    """Run one cell in this (child) process; return per-seed results and this process's peak RSS."""
    sys.path.insert(0, str(snapshot.source()))
    from swarmnode.membership.config import Config
    from swarmnode.sim import measure_join

    cfg = Config(eager_gossip=(mode == "eager"))
    runs = []
    t0 = time.perf_counter()
    for seed in seeds:
        r = measure_join(n, loss, seed, fraction, config=cfg)
        r["seed"] = seed
        runs.append(r)
    return {
        "mode": mode,
        "n": n,
        "loss": loss,
        "runs": runs,
        "wall_s": round(time.perf_counter() - t0, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run_cell(mode: str, n: int, loss: float, seeds: list[int], fraction: float) -> dict[str, Any]:
    argv = [
        sys.executable,
        __file__,
        "--worker",
        mode,
        str(n),
        str(loss),
        str(fraction),
        ",".join(map(str, seeds)),
    ]
    res = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=REPO)
    if res.returncode != 0:
        raise RuntimeError(f"worker {mode} n={n} loss={loss} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def summarise(cell: dict[str, Any]) -> dict[str, Any]:
    """Median and max over seeds; a run that timed out counts as slower than every other."""
    secs = [r["seconds"] for r in cell["runs"]]
    ranked = sorted(secs, key=lambda s: math.inf if s is None else s)
    mid = len(ranked) // 2
    if len(ranked) % 2:
        median = ranked[mid]
    elif ranked[mid] is None or ranked[mid - 1] is None:
        median = None
    else:
        median = (ranked[mid - 1] + ranked[mid]) / 2
    cell["median_s"] = None if median is None else round(median, 3)
    cell["max_s"] = None if ranked[-1] is None else round(ranked[-1], 3)
    cell["min_s"] = None if ranked[0] is None else round(ranked[0], 3)
    cell["timeouts"] = sum(1 for s in secs if s is None)
    cell["per_run_wall_s"] = [r["wall_s"] for r in cell["runs"]]
    return cell


def fmt(x: float | None) -> str:
    return f">{TIMEOUT_S:.0f}" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[30, 100, 1000, 10000])
    ap.add_argument("--loss", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument(
        "--modes", nargs="+", choices=["eager", "standard"], default=["eager", "standard"]
    )
    ap.add_argument("--seeds", type=int, default=9, help="seeds per cell below 10,000 nodes")
    ap.add_argument("--large-seeds", type=int, default=5, help="seeds per 10,000-node cell")
    ap.add_argument("--fraction", type=float, default=0.999)
    ap.add_argument("--out", type=Path, default=Path("/tmp/swarmnode-bench/sim_join.json"))
    ap.add_argument(
        "--worktree",
        action="store_true",
        help="measure the working tree instead of a snapshot of HEAD",
    )
    ap.add_argument(
        "--worker",
        nargs=5,
        metavar=("MODE", "N", "LOSS", "FRACTION", "SEEDS"),
        help=argparse.SUPPRESS,
    )
    args = ap.parse_args(argv)
    if not args.worker:
        snapshot.reexec_on_head(sys.argv[1:] if argv is None else argv)

    if args.worker:
        mode, n, loss, fraction, seeds = args.worker
        out = worker(mode, int(n), float(loss), [int(s) for s in seeds.split(",")], float(fraction))
        print(json.dumps(out))
        return

    started = time.time()
    cells = []
    for mode in args.modes:
        for n in args.sizes:
            for loss in args.loss:
                k = args.large_seeds if n >= LARGE else args.seeds
                cell = summarise(run_cell(mode, n, loss, list(range(1, k + 1)), args.fraction))
                cells.append(cell)
                print(
                    f"  {mode:8} n={n:<6} loss={loss:<4} seeds={k}"
                    f"  median={fmt(cell['median_s'])} s  max={fmt(cell['max_s'])} s"
                    f"  wall={cell['wall_s']} s"
                    f"  peak_rss={cell['peak_rss_mb']} MB",
                    flush=True,
                )

    def get(mode: str, n: int, loss: float) -> dict[str, Any] | None:
        for c in cells:
            if c["mode"] == mode and c["n"] == n and c["loss"] == loss:
                return c
        return None

    print()
    print(f"time until {args.fraction:.1%} of members know of a join (s): median / max over seeds")
    head = f"{'nodes':>6} | {'Serf model':>10}"
    for mode in args.modes:
        for loss in args.loss:
            head += f" | {mode + f' {loss:.0%} loss':>22}"
    print(head)
    print("-" * len(head))
    for n in args.sizes:
        serf = SERF_MODEL_S.get(n)
        row = f"{n:>6} | {fmt(serf) if serf else '-':>10}"
        for mode in args.modes:
            for loss in args.loss:
                c = get(mode, n, loss)
                assert c is not None
                txt = f"{fmt(c['median_s'])} / {fmt(c['max_s'])}"
                if serf and c["median_s"] is not None:
                    txt += f" ({c['median_s'] / serf:.2f}x)"
                if c["timeouts"]:
                    txt += f" [{c['timeouts']} t/o]"
                row += f" | {txt:>22}"
        print(row)
    print("(x) = median / Serf model")
    big = [c for c in cells if c["n"] >= LARGE]
    if big:
        print()
        print("10,000-node cells: wall time per run (s) and peak RSS of the cell's process")
        for c in big:
            print(
                f"  {c['mode']:8} loss={c['loss']:<4} per-run wall={c['per_run_wall_s']}"
                f"  peak_rss={c['peak_rss_mb']} MB"
            )
    total = round(time.time() - started, 1)
    print(f"\ntotal wall time {total} s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                },
                "commit": snapshot.commit(),
                "fraction": args.fraction,
                "serf_model_s": SERF_MODEL_S,
                "total_wall_s": total,
                "cells": cells,
            },
            indent=2,
        )
    )
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
