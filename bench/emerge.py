"""Real Portage through the swarm beside the same emerge commands run by hand.

The lab's graph (tests/lab/portage.py: 7 packages, a C program from a distfile) on a 1-worker
swarm (one node on loopback, `cores = 1` so its jobs run one at a time, as a person's would;
it is also the binhost) beside the same commands run by hand in the same order on the same
machine: `emerge --fetchonly` of the distfile, then for each package the job's own commands
(install its build-time dependencies from the binary packages built before it, then
`emerge --buildpkgonly`), each in a fresh directory with the packages it needs copied in.
Each round makes two fresh Portage prefixes, one per side, and alternates which side goes
first. Then the unchanged graph is submitted again: submit to `--wait` returning, when every
package is reused.

    .venv/bin/python bench/emerge.py [--rounds 5] [--worktree]

Figures: wall time of each side (median), the swarm's over the manual's (median of the
per-round ratios), the resubmission (median). Results on stdout and in
/tmp/swarmnode-bench/emerge.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import snapshot  # bench/ is on sys.path when run as a script

if __name__ == "__main__":
    snapshot.reexec_on_head(sys.argv[1:])

from swarmnode.portage.graph import JOB_SCRIPT
from tests.lab import portage as lab
from tests.ports import free_port
from tests.swarm import Swarm, loopback_addr

#: The lab graph in an order emerge would build it, each with the packages its job installs
#: first (its install closure).
ORDER = (
    ("libbase", "app-lab/libbase-1.0", ()),
    ("liba", "app-lab/liba-1.0", ("libbase",)),
    ("libb", "app-lab/libb-1.0", ("libbase",)),
    ("libmid", "app-lab/libmid-1.0", ("liba", "libb", "libbase")),
    ("hello", "app-lab/hello-1.0", ()),
    ("labdocs", "app-lab/labdocs-2.1-r1", ()),
    ("tool", "app-lab/tool-1.0", ("libmid", "hello", "liba", "libb", "libbase")),
)
TARGETS = {"overhead_ratio": 1.10, "reuse_s": 3.0}


def by_hand(prefix: lab.Prefix, work: Path) -> float:
    """The commands a person would run, in order; wall seconds."""
    env = prefix.env()
    start = time.perf_counter()
    subprocess.run([str(prefix.emerge), "--fetchonly", "--oneshot", "=app-lab/hello-1.0"],
                   env=env, check=True, capture_output=True)
    made: dict[str, Path] = {}
    for name, cpv, needs in ORDER:
        job = work / cpv.replace("/", "_")
        (job / "distfiles").mkdir(parents=True)
        shutil.copy(prefix.distdir / lab.DISTFILE, job / "distfiles")
        for dep in needs:
            target = job / "binpkgs" / made[dep].relative_to(made[dep].parents[2])
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(made[dep], target)
        subprocess.run(["sh", "-c", JOB_SCRIPT, "sh", f"={cpv}"], cwd=job, env=env, check=True,
                       capture_output=True)
        made[name] = next((job / "binpkgs").glob(f"*/{name}/*.gpkg.tar"))
    return time.perf_counter() - start


def through_swarm(prefix: lab.Prefix, work: Path) -> tuple[float, float]:
    """`swarmnode emerge app-lab/tool --wait` on a fresh 1-node swarm, then again; seconds."""
    swarm = Swarm(work / "swarm")
    try:
        node, _token = swarm.init("n1", loopback_addr(1))
        (node.home / "config.toml").write_text(
            f'emerge = "{prefix.emerge}"\ncores = 1\nroles = ["binhost"]\n'
            f'binhost_listen = "127.0.0.1:{free_port()}"\n')
        swarm.start(node)
        swarm.wait_for(lambda: swarm.query(node, "status")["portage"], 60,
                       "the node knows its Portage")
        times = []
        for expect in (7, 0):
            start = time.perf_counter()
            res = swarm.cli(node, "emerge", lab.TOP, "--wait", "--json", timeout=600)
            times.append(time.perf_counter() - start)
            view = json.loads(res.stdout)
            if not view["ok"] or view["built"] != expect:
                raise RuntimeError(f"emerge gave {view}")
        return times[0], times[1]
    finally:
        swarm.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--worktree", action="store_true", help="measure the working tree")
    args = parser.parse_args()
    reason = lab.unavailable_reason()
    if reason:
        print(f"cannot run: {reason}")
        return 2
    lab.ensure_portage_user()
    manual, swarm, ratios, reuse = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-emerge-") as tmp:
        root = Path(tmp)
        repo = lab.write_repo(root / "repo")
        mirror = lab.write_mirror(root / "mirror")
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                                   "--directory", str(mirror), str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for r in range(args.rounds):
                hand_p, swarm_p = lab.make_prefixes(
                    [root / f"r{r}/hand", root / f"r{r}/swarm"], repo,
                    mirror=f"http://127.0.0.1:{port}")
                sides = ["hand", "swarm"] if r % 2 == 0 else ["swarm", "hand"]
                took: dict[str, float] = {}
                for side in sides:
                    if side == "hand":
                        took["hand"] = by_hand(hand_p, root / f"r{r}/hand-work")
                    else:
                        took["swarm"], again = through_swarm(swarm_p, root / f"r{r}/sw")
                        reuse.append(again)
                manual.append(took["hand"])
                swarm.append(took["swarm"])
                ratios.append(took["swarm"] / took["hand"])
                print(f"round {r + 1}: by hand {took['hand']:.2f} s, swarm {took['swarm']:.2f}"
                      f" s (x{ratios[-1]:.3f}), resubmitted {reuse[-1]:.2f} s", flush=True)
        finally:
            server.kill()
            server.wait()
    result: dict[str, Any] = {
        "commit": snapshot.commit(), "rounds": args.rounds,
        "by_hand_s": round(statistics.median(manual), 2),
        "swarm_s": round(statistics.median(swarm), 2),
        "overhead_ratio": round(statistics.median(ratios), 3),
        "reuse_s": round(statistics.median(reuse), 2),
        "targets": TARGETS,
    }
    print(json.dumps(result, indent=2))
    snapshot.BASE.mkdir(parents=True, exist_ok=True)
    (snapshot.BASE / "emerge.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
