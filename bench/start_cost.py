"""What starting a node costs: its CPU from spawn until its control socket answers.

A founder, then `--joins` nodes joining it one after another, each started with the tree's own
harness (`tests/swarm.py`: the real `swarmnode join`, the CLI's parse and the exec included,
since the process's CPU clock survives the exec); each joiner's CPU is read from
/proc/PID/stat once it answers. Several trees are measured in turn, alternating, so the
machine's noise falls on all of them alike:

    .venv/bin/python bench/start_cost.py --tree /path/to/a --tree /path/to/b [--rounds 3]
        [--joins 5]

Prints the median and range per tree. A tree is a checkout (worktree) with its own code;
the interpreter is this one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

#: Run inside each tree: its harness, its code.
CHILD = """
import json, os, sys
sys.path.insert(0, os.getcwd())
from tests.swarm import Swarm, loopback_addr, short_root

def cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

swarm = Swarm(short_root())
try:
    founder, token = swarm.init("n1", loopback_addr(1))
    swarm.start(founder, fast=False)
    out = []
    for i in range(2, 2 + int(sys.argv[1])):
        node = swarm.start(swarm.add(f"n{i}", loopback_addr(i)), token, fast=False)
        out.append(cpu(node.proc.pid))
        swarm.wait_converged([founder, node], 30)
    print(json.dumps(out))
finally:
    swarm.close()
"""


def measure(tree: Path, joins: int) -> list[float]:
    res = subprocess.run([sys.executable, "-c", CHILD, str(joins)], cwd=tree, check=True,
                         capture_output=True, text=True, timeout=600)
    return [float(x) for x in json.loads(res.stdout.strip().splitlines()[-1])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--joins", type=int, default=5)
    args = ap.parse_args()
    got: dict[Path, list[float]] = {tree: [] for tree in args.tree}
    for r in range(args.rounds):
        order = args.tree if r % 2 == 0 else list(reversed(args.tree))
        for tree in order:
            got[tree] += measure(tree.resolve(), args.joins)
            print(f"round {r + 1}, {tree}: {got[tree][-args.joins:]}", flush=True)
    print("\n| tree | starts | CPU per start, median (s) | range (s) |\n|---|---:|---:|---:|")
    for tree, cpus in got.items():
        print(f"| {os.fspath(tree)} | {len(cpus)} | {statistics.median(cpus):.2f} | "
              f"{min(cpus):.2f}-{max(cpus):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
