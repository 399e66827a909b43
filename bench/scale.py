"""What one node pays for the size of its swarm: N = 5, 20, 40 real nodes side by side.

Every cell is a fresh swarm of N real swarmnode processes on this machine's loopback addresses
(127.0.0.1..N, each its own home and process, the SHIPPED DEFAULT timers, no mDNS, no
Tailscale), started as tests/swarm.py does: the founder (`init`, `join`), then the N-1 others
(`add`, `join TOKEN`) spawned one after another over `--spread` seconds. Phases, in order:

1. converge: seconds from the last spawn until every node lists all N admitted and alive, from
   each node's own events (`node_started`, `member_join`/`member_alive`, `admitted`, read
   afterwards; `nodes` is polled once a second, only to know when; homes are made before, so
   a spawn is only the `join` process starting).
2. idle: once every node names the same leader, `--settle` s, then `--idle-seconds` with
   nothing asked of any node (the script only sleeps). Per node, from /proc: CPU (% of one
   core, utime+stime of the node's pid), VmRSS, established TCP connections (the node's
   socket inodes, /proc/PID/fd, matched in /proc/PID/net/tcp and tcp6, state 01); from its
   `status`: messages sent (`sent`, by type) and received (`received`, when the node has such
   a counter; else reported as missing) and wire bytes in and out (`bytes_in`, `bytes_out`),
   per second; from its /metrics: the p99 of `swarmnode_loop_lag_seconds` in the window (the
   histogram's difference, interpolated within a bucket as Prometheus' histogram_quantile
   does) and of `swarmnode_loop_held_seconds` (the lag less the loop thread's wait for a CPU:
   what the node's own steps held; with 40 nodes on two cores most of a lag is that wait),
   with the highest bucket the window reached (its worst); from its events: leader changes
   (`leader_elected`, one per election, summed over nodes; `leader_changed`, as each node saw
   them, the most on any node). The leader's figures
   are given apart from the followers' (median and max).
3. build: `--build-jobs` independent jobs of `sleep --job-seconds`, submitted on the founder,
   until the build is finished: its time, the leader changes in it, loop lag and held lag in
   it (the leader and the worst node).
4. push: `swarmnode push DIR --wait --json` of a small app (restart `true`, a health check;
   `--push-mib` adds that much random data) from the founder (it holds the push right) to
   all N: the CLI's wall time and its `elapsed`, loop lag and held lag of the pusher and the
   leader in it.
5. kill: `kill -9` of `--kill` nodes (neither founder nor leader; non-voters first): seconds
   until every other node lists each of them dead.

With `--steps MS`, the nodes run with bench/stepprobe on their PYTHONPATH: every loop step
using more than MS ms of the loop thread's CPU is logged with the task or callback that ran
it, and each phase (idle, build, push) reports, for the leader, the pusher and all nodes, how
many such steps there were, the longest, and what ran the most of them; the same for loop
passes (the steps of one turn between two polls: short steps in a row hold a timer too),
named by the longest step in each; and steps that spent over MS ms off the CPU by their
own doing (blocked in a syscall such as an fsync, or on the GIL), and SQLite transactions
over MS ms of wall time, by module.

Each figure is reported per N beside other commits: `--commit A --commit B` measures each in
turn from a clean snapshot (snapshot.unpack; the nodes, CLI and harness of that commit, this
script's measuring), alternating which goes first from one (size, round) to the next; without
`--commit`, HEAD alone; `--worktree` measures the working tree. A cell runs in a child process
of this script, which stops every node it started (also on failure, SIGTERM or Ctrl-C).

Then, per commit, the simulators (no processes, no sockets): messages sent per node per second
at idle, membership (swarmnode/sim.py, shipped `Config()`, a converged cluster) and Raft
(swarmnode/election/sim.py: 5 voters, the rest observers as in a node, shipped `Config()`), for
each of `--sim-sizes` members over `--sim-seconds` of simulated time after a warm-up.

    .venv/bin/python bench/scale.py [--sizes 5,20,40] [--idle-seconds 600] [--build-jobs 200]
        [--spread 12] [--kill 3] [--rounds 1] [--commit HEAD~1 --commit HEAD]
        [--sim-sizes 40,1000] [--sim-seconds 30] [--only nodes,sim] [--worktree] [--steps 50]
        [--push-mib 20] [--phases idle,build,push,kill]
    .venv/bin/python bench/scale.py --sizes 5 --idle-seconds 30 --build-jobs 20   # quick

Results: a table on stdout, JSON in /tmp/swarmnode-bench/scale.json (every cell, every round,
with per-node figures). A failed cell keeps its nodes' homes and logs and says where.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import snapshot  # bench/ is on sys.path when run as a script

#: Member states that count as "agrees it is dead" after a kill -9.
GONE = ("dead",)
#: A node's events that make a member alive in its view, and that take it out of it.
ALIVE_EVENTS = ("member_join", "member_alive")
GONE_EVENTS = ("member_suspect", "member_dead", "member_left", "member_reaped")
#: Where --steps' probe lives (this script's tree, whichever commit's nodes it measures).
STEP_PROBE = Path(__file__).resolve().parent / "stepprobe"
#: A probe's log line: "2026-12-07 11:24:36,018 WARNING swarmnode.steps: loop step 12.5 ms
#: cpu: task Node._timer_loop".
STEP_LINE = re.compile(r"^(\S+ \S+),(\d+) WARNING swarmnode\.steps: loop step (\S+) ms cpu: (.*)$")
#: ...a step's time off the CPU by its own doing (a syscall, the GIL): "... loop step 20.1 ms
#: blocked: task Leadership.run"...
BLOCKED_LINE = re.compile(
    r"^(\S+ \S+),(\d+) WARNING swarmnode\.steps: loop step (\S+) ms blocked: (.*)$")
#: ...a SQLite transaction's wall time: "... db transaction 31.2 ms wall: swarmnode.store"...
TX_LINE = re.compile(
    r"^(\S+ \S+),(\d+) WARNING swarmnode\.steps: db transaction (\S+) ms wall: (.*)$")
#: ...and a pass's: "... loop pass 31.0 ms cpu, 12 steps: task Transport._recv_loop 4.9; ...".
PASS_LINE = re.compile(r"^(\S+ \S+),(\d+) WARNING swarmnode\.steps: loop pass (\S+) ms cpu, "
                       r"\d+ steps: (.*?) [\d.]+(?:;|$)")
#: How often convergence is polled, only to know when to read the events that time it.
CONVERGE_POLL_S = 1.0


# ---------------------------------------------------------------------- the parent


def main() -> int:
    ap = snapshot.lab_parser(__doc__, "scale", swarmnode=False)
    ap.add_argument("--commit", action="append", default=[],
                    help="a commit to measure (repeat to compare; default HEAD)")
    ap.add_argument("--sizes", default="5,20,40")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--spread", type=float, default=12.0,
                    help="seconds over which the N-1 joiners are spawned")
    ap.add_argument("--settle", type=float, default=10.0,
                    help="seconds after all name one leader, before the idle window")
    ap.add_argument("--idle-seconds", type=float, default=600.0)
    ap.add_argument("--build-jobs", type=int, default=200)
    ap.add_argument("--job-seconds", type=float, default=0.5)
    ap.add_argument("--push-mib", type=float, default=0.0,
                    help="random data added to the pushed app (MiB): chunks to serve")
    ap.add_argument("--kill", type=int, default=3)
    ap.add_argument("--poll", type=float, default=0.1)
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="longest wait for convergence, the build, the push, the deaths")
    ap.add_argument("--sim-sizes", default="40,1000")
    ap.add_argument("--sim-seconds", type=float, default=30.0)
    ap.add_argument("--only", default="nodes,sim", help="parts to run: nodes, sim")
    ap.add_argument("--phases", default="idle,build,push,kill",
                    help="the nodes' phases after they converge (each needs the ones before "
                         "it only for its own figures)")
    ap.add_argument("--steps", type=float, default=None,
                    help="log loop steps over this many ms of CPU, and say what ran them")
    ap.add_argument("--child", help=argparse_suppress())
    ap.add_argument("--child-out", type=Path, help=argparse_suppress())
    args = ap.parse_args()
    if args.child:
        try:
            return child(args)
        except KeyboardInterrupt:
            return 130  # (its nodes are stopped: Cell.run's finally)
    signal.signal(signal.SIGTERM, on_term)
    if args.worktree and args.commit:
        ap.error("--worktree measures the working tree: give no --commit with it")
    trees: list[tuple[str, dict[str, str]]] = []
    if args.worktree:
        trees.append((snapshot.commit(), {k: v for k, v in os.environ.items()
                                          if k != snapshot.ENV}))
    else:
        for rev in args.commit or ["HEAD"]:
            dest = snapshot.unpack(rev)
            trees.append((snapshot.commit(dest), snapshot.env_for(dest)))
            print(f"commit {rev}: {snapshot.commit(dest)} (snapshot in {dest})", flush=True)
    names = [name for name, _ in trees]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    only = set(args.only.split(","))
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "commits": names,
                           "command": " ".join(sys.argv), "nodes": {}, "sim": {}}
    try:
        measure(args, trees, sizes, only, res)
    except KeyboardInterrupt:
        print("interrupted: every node this run started is stopped", file=sys.stderr)
        return 130
    print()
    print(report(res, names, sizes))
    snapshot.write_result(args.out, res)
    return 0


def measure(args: Any, trees: list[tuple[str, dict[str, str]]], sizes: list[int],
            only: set[str], res: dict[str, Any]) -> None:
    """Every cell, each in a child process; the simulators, once per tree."""
    started = time.monotonic()
    k = 0
    if "nodes" in only:
        for r in range(args.rounds):
            for n in sizes:
                order = trees if k % 2 == 0 else trees[::-1]
                k += 1
                for name, env in order:
                    print(f"--- round {r + 1}, N={n}, commit {name}", flush=True)
                    cell = run_child(env, f"nodes:{n}")
                    res["nodes"].setdefault(str(n), {}).setdefault(name, []).append(cell)
                    print(f"    {brief(cell)}", flush=True)
    if "sim" in only:
        for name, env in trees:
            print(f"--- simulators, commit {name}", flush=True)
            res["sim"][name] = run_child(env, "sim")
    res["seconds"] = round(time.monotonic() - started)


def on_term(_sig: int, _frame: Any) -> None:
    raise SystemExit(143)  # unwinds through the finally blocks that stop the nodes


def argparse_suppress() -> str:
    import argparse

    return argparse.SUPPRESS


def run_child(env: dict[str, str], spec: str) -> dict[str, Any]:
    """This script again, as `--child spec`, with `env` (a commit's snapshot); its JSON. On
    Ctrl-C the child (same process group) gets the SIGINT too and stops its nodes: wait for it;
    on anything else (this process's SIGTERM too), SIGTERM it (it stops its nodes) and wait."""
    with tempfile.NamedTemporaryFile(prefix="scale-", suffix=".json", delete=False) as f:
        out = Path(f.name)
    argv = [sys.executable, str(Path(sys.argv[0]).resolve()), *sys.argv[1:],
            "--child", spec, "--child-out", str(out)]
    try:
        proc = subprocess.Popen(argv, env=env)
        try:
            rc = proc.wait()
        except BaseException as exc:
            if not isinstance(exc, KeyboardInterrupt):  # (a Ctrl-C reached the child already)
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                print("the cell's process did not stop: its nodes may be left "
                      "(/tmp/sw-scale*)", file=sys.stderr)
            raise
        value = json.loads(out.read_text()) if out.stat().st_size else {}
    finally:
        out.unlink(missing_ok=True)
    if rc != 0 and "error" not in value:
        value["error"] = f"child exited {rc}"
    return value


def brief(cell: dict[str, Any]) -> str:
    if "error" in cell:
        return f"FAILED: {cell['error']}"
    f = cell["figures"]
    parts = [f"converged {f['converge_s']} s"]
    if "cpu_leader_pct" in f:  # (the phases run: --phases)
        parts.append(f"idle CPU leader {f['cpu_leader_pct']}%, voters "
                     f"{f['cpu_voter_med_pct']}%, observers {f['cpu_observer_med_pct']}%; "
                     f"sent/s {f['sent_leader_per_s']} / {f['sent_follower_med_per_s']}; "
                     f"tcp {f['tcp_med']}")
    if "dead_s" in f:
        parts.append(f"dead in {f['dead_s']} s")
    return "; ".join(parts)


#: (label, figure key, unit) of the table, in the order of the phases.
ROWS = (
    ("convergence after the last spawn", "converge_s", "s"),
    ("join: a node's start-up (spawn to started), median", "start_median_s", "s"),
    ("join: a node's start-up, slowest", "start_max_s", "s"),
    ("join: a node's start-up CPU, median", "start_cpu_median_s", "s"),
    ("join: last node started to seen alive by all", "last_seen_alive_by_all_s", "s"),
    ("join: last node started to admitted by all", "last_admitted_by_all_s", "s"),
    ("idle CPU, leader", "cpu_leader_pct", "% core"),
    ("idle CPU, followers median", "cpu_follower_med_pct", "% core"),
    ("idle CPU, followers max", "cpu_follower_max_pct", "% core"),
    ("idle CPU, voter followers median", "cpu_voter_med_pct", "% core"),
    ("idle CPU, observers median", "cpu_observer_med_pct", "% core"),
    ("messages sent/s, leader", "sent_leader_per_s", "/s"),
    ("messages sent/s, followers median", "sent_follower_med_per_s", "/s"),
    ("messages sent/s, mean per node (= mean received)", "sent_mean_per_s", "/s"),
    ("messages received/s, leader", "recv_leader_per_s", "/s"),
    ("messages received/s, followers median", "recv_follower_med_per_s", "/s"),
    ("wire KiB/s in, leader", "kib_in_leader_per_s", "KiB/s"),
    ("wire KiB/s out, leader", "kib_out_leader_per_s", "KiB/s"),
    ("wire KiB/s in, followers median", "kib_in_follower_med_per_s", "KiB/s"),
    ("wire KiB/s out, followers median", "kib_out_follower_med_per_s", "KiB/s"),
    ("established TCP, leader", "tcp_leader", ""),
    ("established TCP, median node", "tcp_med", ""),
    ("established TCP, max node", "tcp_max", ""),
    ("RSS, leader", "rss_leader_mib", "MiB"),
    ("RSS, median node", "rss_med_mib", "MiB"),
    ("RSS, max node", "rss_max_mib", "MiB"),
    ("loop-lag p99 idle, median node", "lag_p99_idle_med_ms", "ms"),
    ("loop-lag p99 idle, worst node", "lag_p99_idle_max_ms", "ms"),
    ("loop-lag worst since start, worst node", "lag_worst_ms", "ms"),
    ("held lag p99 idle, worst node", "held_p99_idle_max_ms", "ms"),
    ("elections in the idle window", "elections_idle", ""),
    ("leader changes seen idle, most on a node", "leader_changed_idle_max", ""),
    ("build: submit to finished", "build_s", "s"),
    ("elections during the build", "elections_build", ""),
    ("leader changes seen in the build, most on a node", "leader_changed_build_max", ""),
    ("loop-lag p99 in the build, worst node", "lag_p99_build_max_ms", "ms"),
    ("loop-lag p99 in the build, leader", "lag_p99_build_leader_ms", "ms"),
    ("held lag p99 in the build, leader", "held_p99_build_leader_ms", "ms"),
    ("held lag worst in the build, leader (bucket bound)", "held_top_build_leader_ms", "ms"),
    ("held lag p99 in the build, worst node", "held_p99_build_max_ms", "ms"),
    ("held lag worst in the build, worst node (bucket bound)", "held_top_build_max_ms", "ms"),
    ("push to all: CLI wall time", "push_wall_s", "s"),
    ("push to all: its `elapsed`", "push_elapsed_s", "s"),
    ("loop-lag p99 in the push, pusher", "lag_p99_push_pusher_ms", "ms"),
    ("held lag worst in the push, pusher (bucket bound)", "held_top_push_pusher_ms", "ms"),
    ("held lag worst in the push, leader (bucket bound)", "held_top_push_leader_ms", "ms"),
    ("kill -9 of k nodes: all others agree dead", "dead_s", "s"),
    # with --steps: loop steps over that much of the loop thread's CPU
    ("--steps: long steps idle, leader", "steps_idle_leader", ""),
    ("--steps: long steps idle, all nodes", "steps_idle_all", ""),
    ("--steps: longest step idle, all nodes", "steps_max_idle_all_ms", "ms CPU"),
    ("--steps: long steps in the build, leader", "steps_build_leader", ""),
    ("--steps: longest step in the build, leader", "steps_max_build_leader_ms", "ms CPU"),
    ("--steps: long steps in the build, all nodes", "steps_build_all", ""),
    ("--steps: long steps in the push, pusher", "steps_push_pusher", ""),
    ("--steps: longest step in the push, pusher", "steps_max_push_pusher_ms", "ms CPU"),
    ("--steps: long steps in the push, leader", "steps_push_leader", ""),
    ("--steps: long steps in the push, all nodes", "steps_push_all", ""),
    ("--steps: long passes in the build, leader", "passes_build_leader", ""),
    ("--steps: longest pass in the build, leader", "passes_max_build_leader_ms", "ms CPU"),
    ("--steps: long passes in the push, pusher", "passes_push_pusher", ""),
    ("--steps: longest pass in the push, pusher", "passes_max_push_pusher_ms", "ms CPU"),
    ("--steps: long passes in the push, leader", "passes_push_leader", ""),
    ("--steps: long passes in the push, all nodes", "passes_push_all", ""),
    ("--steps: blocked steps in the build, leader", "blocked_build_leader", ""),
    ("--steps: longest blocked in the build, leader", "blocked_max_build_leader_ms", "ms"),
    ("--steps: blocked steps in the push, pusher", "blocked_push_pusher", ""),
    ("--steps: longest blocked in the push, pusher", "blocked_max_push_pusher_ms", "ms"),
    ("--steps: blocked steps in the push, leader", "blocked_push_leader", ""),
    ("--steps: longest blocked in the push, leader", "blocked_max_push_leader_ms", "ms"),
    ("--steps: slow db transactions in the push, leader", "transactions_push_leader", ""),
    ("--steps: slowest db transaction in the push, leader", "transactions_max_push_leader_ms",
     "ms"),
    ("--steps: slow db transactions in the build, leader", "transactions_build_leader", ""),
)


def median_of(cells: list[dict[str, Any]], key: str) -> Any:
    xs = [c["figures"][key] for c in cells if "figures" in c and c["figures"].get(key)
          is not None]
    if not xs:
        return None
    return round(statistics.median(xs), 3) if len(xs) > 1 else xs[0]


def report(res: dict[str, Any], names: list[str], sizes: list[int]) -> str:
    lines: list[str] = []
    if res["nodes"]:
        cols = [(n, name) for n in sizes for name in names]
        lines.append("| figure (median of rounds) | " + " | ".join(
            f"N={n} {name}" for n, name in cols) + " |")
        lines.append("|---|" + "---:|" * len(cols))
        for label, key, unit in ROWS:
            vals = []
            for n, name in cols:
                v = median_of(res["nodes"].get(str(n), {}).get(name, []), key)
                vals.append("—" if v is None else str(v))
            lines.append(f"| {label}{f' ({unit})' if unit else ''} | " + " | ".join(vals)
                         + " |")
        failed = [f"N={n} {name}: {c['error']}" for n in sizes for name in names
                  for c in res["nodes"].get(str(n), {}).get(name, []) if "error" in c]
        failed += [f"N={n} {name}, phase {phase}: {error}" for n in sizes for name in names
                   for c in res["nodes"].get(str(n), {}).get(name, [])
                   for phase, error in c.get("failed_phases", {}).items()]
        lines += [f"FAILED {x}" for x in failed]
        missing = {m for n in sizes for name in names
                   for c in res["nodes"].get(str(n), {}).get(name, [])
                   for m in c.get("missing", [])}
        lines += [f"not exposed by the node: {m}" for m in sorted(missing)]
        for n in sizes:  # --steps: what ran the long steps
            for name in names:
                for c in res["nodes"].get(str(n), {}).get(name, []):
                    for where, got in c.get("details", {}).get("steps", {}).items():
                        if got["top"]:
                            what = ("long passes (by their longest step)" if where.endswith(
                                "_passes") else "blocked steps" if where.endswith(
                                "_blocked") else "slow db transactions" if where.endswith(
                                "_transactions") else "long steps")
                            lines.append(f"{what}, N={n} {name} {where}: " + ", ".join(
                                f"{what} x{k}" for what, k in got["top"]))
    if res["sim"]:
        lines += ["", "| simulators, idle, messages sent per node per second | " + " | ".join(
            f"n={n} {name}" for name in names for n in res["sim"][name].get("sizes", [])) + " |"]
        cols = [(name, n) for name in names for n in res["sim"][name].get("sizes", [])]
        lines.append("|---|" + "---:|" * len(cols))
        for label, part, key in (("membership (SWIM), mean", "membership", "per_node_per_s"),
                                 ("Raft, mean over members", "election", "per_node_per_s"),
                                 ("Raft, the leader", "election", "leader_per_s"),
                                 ("Raft, the leader receives", "election",
                                  "leader_received_per_s"),
                                 ("Raft, a voter (median)", "election", "voter_per_s"),
                                 ("Raft, an observer (median)", "election", "observer_per_s")):
            vals = [str(res["sim"][name].get(part, {}).get(str(n), {}).get(key, "—"))
                    for name, n in cols]
            lines.append(f"| {label} | " + " | ".join(vals) + " |")
        for name in names:
            if "error" in res["sim"][name]:
                lines.append(f"FAILED simulators {name}: {res['sim'][name]['error']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- a child


def child(args: Any) -> int:
    """One cell (`nodes:N`) or the simulators (`sim`), on the tree PYTHONPATH names."""
    sys.path.insert(0, str(snapshot.source()))

    signal.signal(signal.SIGTERM, on_term)
    res: dict[str, Any] = {"commit": snapshot.commit()}
    try:
        if args.child == "sim":
            res.update(simulators([int(s) for s in args.sim_sizes.split(",") if s],
                                  args.sim_seconds))
        else:
            res.update(Cell(args, int(args.child.split(":")[1])).run())
    except Exception as exc:  # the parent reports it and goes on with the next cell
        res["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
        print(f"cell failed: {res['error']}", file=sys.stderr, flush=True)
    args.child_out.write_text(json.dumps(res))
    return 1 if "error" in res else 0


@dataclass
class JoinView:
    """One node's view of the join, from its events (wall-clock seconds)."""

    full: float = 0.0  # it first listed every member admitted and alive
    started: float | None = None  # its own node_started
    start_cpu: float | None = None  # the CPU seconds its start took (node_started's cpu_s)
    alive: dict[str, float] = field(default_factory=dict)  # member -> first seen alive
    admitted: dict[str, float] = field(default_factory=dict)  # member -> first seen admitted


class Cell:
    """N nodes through the phases; `run` returns figures (and per-node details)."""

    def __init__(self, args: Any, n: int) -> None:
        from tests.swarm import Swarm

        self.args = args
        self.n = n
        self.root = Path(tempfile.mkdtemp(prefix=f"sw-scale{n}-", dir="/tmp"))
        if args.steps is not None:  # (the nodes' environment is this process's: tests/swarm)
            os.environ["SWARMNODE_STEP_PROBE_MS"] = str(args.steps)
            os.environ["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(STEP_PROBE), os.environ.get("PYTHONPATH")) if p)
        self.phases: dict[str, tuple[float, float]] = {}  # phase -> wall-clock window
        self.swarm = Swarm(self.root)
        self.nodes: list[Any] = []
        self.pids: dict[str, int] = {}
        self.missing: set[str] = set()

    def run(self) -> dict[str, Any]:
        ok = False
        try:
            fig: dict[str, Any] = {}
            det: dict[str, Any] = {"n": self.n}
            fig["converge_s"] = self.converge(det)
            fig.update({k: v for k, v in det["join_timeline"].items() if k != "last_start_s"})
            leader = self.one_leader()
            time.sleep(self.args.settle)  # voters step in after a settle (not measured)
            phases = set(self.args.phases.split(","))
            failed: dict[str, str] = {}
            for phase in ("idle", "build", "push", "kill"):
                if phase in phases:
                    try:
                        getattr(self, phase)(fig, det)
                    except Exception as exc:  # the other phases' figures still count
                        failed[phase] = f"{type(exc).__name__}: {str(exc)[:1000]}"
                        print(f"phase {phase} failed: {failed[phase]}", file=sys.stderr,
                              flush=True)
            if self.args.steps is not None:
                det["steps"] = self.steps(fig, leader)
            ok = not failed
            return {"figures": fig, "details": det, "leader_at_start": leader[:12],
                    "missing": sorted(self.missing), "failed_phases": failed}
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C: still stop them all
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self.swarm.close()
            if ok:
                shutil.rmtree(self.root, ignore_errors=True)
            else:
                print(f"homes and logs kept in {self.root}", file=sys.stderr, flush=True)

    # -------------------------------------------------------------- asking
    def q(self, node: Any, cmd: str, timeout: float = 10.0, **kw: Any) -> Any:
        from swarmnode import control

        return control.call(node.home, cmd, timeout=timeout, **kw)

    def running(self) -> list[Any]:
        return [n for n in self.nodes if n.running]

    # -------------------------------------------------------------- 1. converge
    def converge(self, det: dict[str, Any]) -> float:
        from tests.swarm import loopback_addr

        sw = self.swarm
        founder, token = sw.init("n1", loopback_addr(1))
        sw.start(founder, fast=False)
        others = [sw.add(f"n{i}", loopback_addr(i)) for i in range(2, self.n + 1)]
        self.nodes = [founder, *others]
        gap = self.args.spread / max(1, len(others) - 1)
        t0 = time.monotonic()
        spawned: dict[str, float] = {}  # wall-clock, as the nodes' events have it
        for i, node in enumerate(others):
            time.sleep(max(0.0, t0 + i * gap - time.monotonic()))
            spawned[node.name] = time.time()
            sw.start(node, token, fast=False, wait=False)
        last_spawn, last_spawn_ts = time.monotonic(), time.time()
        det["spawn_spread_s"] = round(last_spawn - t0, 2)
        want = {node.id for node in self.nodes}
        pending = list(self.nodes)  # polled (gently) only until each lists all alive
        deadline = last_spawn + self.args.timeout
        while pending:
            sweep = time.monotonic()
            for node in list(pending):
                if not node.running:
                    raise RuntimeError(f"{node.name} exited before convergence\n"
                                       f"{sw.dump()[-6000:]}")
                try:
                    alive = {m["id"] for m in self.q(node, "nodes", timeout=5)
                             if m.get("state") == "alive"}
                except Exception:
                    continue
                if want <= alive:
                    pending.remove(node)
            if pending and sweep > deadline:
                raise RuntimeError(f"{len(pending)} of {self.n} nodes do not list all alive "
                                   f"after {self.args.timeout} s")
            time.sleep(max(0.0, sweep + CONVERGE_POLL_S - time.monotonic()))
        views = {node.name: self.joined(node, want) for node in self.nodes}
        first_full = {name: round(v.full - last_spawn_ts, 2) for name, v in views.items()}
        took = max(first_full.values())
        det["converged_per_node_s"] = first_full
        det["join_timeline"] = self.timeline(views, spawned, others[-1])
        for node in self.nodes:
            self.pids[node.name] = self.q(node, "status")["pid"]
        return round(took, 2)

    def joined(self, node: Any, want: set[str]) -> JoinView:
        """From `node`'s own events (wall-clock `ts`), read afterwards: reading them costs the
        nodes nothing while they converge, where polling 40 nodes for their member lists
        would take a core of two. When it first listed every member of `want` admitted and
        alive; when it started; when it first saw each member alive and admitted."""
        alive: set[str] = set()
        admitted: set[str] = set()
        view = JoinView()
        for e in sorted(self.q(node, "events", timeout=20, limit=10_000),
                        key=lambda e: e["seq"]):
            who, kind, ts = e.get("id"), e["kind"], float(e["ts"])
            if kind == "node_started" and who == node.id:
                view.started = ts
                view.start_cpu = e.get("cpu_s")
            if kind == "node_started" or kind in ALIVE_EVENTS:
                alive.add(who)
                view.alive.setdefault(who, ts)
            elif kind in GONE_EVENTS:
                alive.discard(who)
            elif kind == "admitted":
                admitted.add(who)
                view.admitted.setdefault(who, ts)
            if want <= alive & admitted and not view.full:
                view.full = ts
        if not view.full:
            raise RuntimeError(f"{node.name}'s events never list all {len(want)} alive")
        return view

    @staticmethod
    def timeline(views: dict[str, JoinView], spawned: dict[str, float],
                 last: Any) -> dict[str, float | None]:
        """Where a join's seconds go: every node's start-up (spawn to its node_started) and,
        for the last-spawned node, from its start until every other node saw it alive and
        admitted -- start-up on a saturated machine or spreading the news."""
        starts = sorted(views[name].started - t for name, t in spawned.items()
                        if views[name].started)
        cpus = [v.start_cpu for v in views.values() if v.start_cpu is not None]
        started = views[last.name].started
        others = [v for name, v in views.items() if name != last.name]

        def by_all(seen: list[float | None]) -> float | None:
            return round(max(seen) - started, 2) if started and None not in seen else None

        return {
            "start_median_s": round(statistics.median(starts), 2) if starts else None,
            "start_max_s": round(starts[-1], 2) if starts else None,
            "start_cpu_median_s": round(statistics.median(cpus), 3) if cpus else None,
            "last_start_s": round(started - spawned[last.name], 2) if started else None,
            "last_seen_alive_by_all_s": by_all([v.alive.get(last.id) for v in others]),
            "last_admitted_by_all_s": by_all([v.admitted.get(last.id) for v in others]),
        }

    def one_leader(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            leaders = {self.q(node, "status").get("leader") for node in self.running()}
            if len(leaders) == 1 and None not in leaders:
                return str(leaders.pop())
            if time.monotonic() > deadline:
                raise RuntimeError(f"no single leader after {timeout} s: {leaders}")
            time.sleep(0.5)

    # -------------------------------------------------------------- 2. idle
    def sample(self) -> dict[str, dict[str, Any]]:
        """Counters of every running node, now (status, /metrics, CPU)."""
        out = {}
        for node in self.running():
            st = self.q(node, "status")
            out[node.name] = {"t": time.monotonic(), "cpu": snapshot.cpu_seconds(
                self.pids[node.name]), "st": st, "lag": self.lag_buckets(node, st)}
        return out

    def lag_buckets(self, node: Any, st: dict[str, Any]) -> dict[str, dict[float, float]] | None:
        """The node's loop-lag histograms from its /metrics, each as le -> cumulative count:
        "lag" (how late the loop woke a timer) and, where the node has it, "held" (that lag
        less the loop thread's wait for a CPU: its own steps)."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        url = st.get("dashboard")
        token_file = node.home / "dashboard.token"
        if not url or not token_file.exists():
            self.missing.add("/metrics (no dashboard URL)")
            return None
        req = urllib.request.Request(url.split("?")[0].rstrip("/") + "/metrics", headers={
            "Authorization": f"Bearer {token_file.read_text().strip()}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            text = resp.read().decode()
        names = {"swarmnode_loop_lag_seconds": "lag", "swarmnode_loop_held_seconds": "held"}
        got = {names[fam.name]: {float(s.labels["le"]): s.value for s in fam.samples
                                 if s.name.endswith("_bucket")}
               for fam in text_string_to_metric_families(text) if fam.name in names}
        for name, key in names.items():
            if key not in got:
                self.missing.add(f"{name} in /metrics")
        return got or None

    def window(self, a: dict[str, Any], b: dict[str, Any], leader: str) -> dict[str, Any]:
        """Per-node rates between two samples, and the leader's apart."""
        per: dict[str, dict[str, Any]] = {}
        for name, x in a.items():
            y = b.get(name)
            if y is None:
                continue
            dt = y["t"] - x["t"]
            sx, sy = x["st"], y["st"]
            node = self.swarm.nodes[name]
            row: dict[str, Any] = {
                "leader": node.id == leader,
                "cpu_pct": round((y["cpu"] - x["cpu"]) / dt * 100, 2),
                "kib_in_per_s": round((sy.get("bytes_in", 0) - sx.get("bytes_in", 0))
                                      / dt / 1024, 2),
                "kib_out_per_s": round((sy.get("bytes_out", 0) - sx.get("bytes_out", 0))
                                       / dt / 1024, 2),
            }
            if "sent" in sy:
                by = {t: round((c - sx["sent"].get(t, 0)) / dt, 2)
                      for t, c in sy["sent"].items() if c - sx["sent"].get(t, 0)}
                row["sent_per_s"] = round(sum(by.values()), 1)
                row["sent_by_type_per_s"] = dict(sorted(by.items(), key=lambda kv: -kv[1]))
            else:
                self.missing.add("status `sent` (messages sent by type)")
            if "received" in sy:
                row["recv_per_s"] = round(sum(sy["received"].values()) / dt
                                          - sum(sx["received"].values()) / dt, 1)
            else:
                self.missing.add("status `received` (messages received, by type)")
            for key in ("lag", "held"):
                if x["lag"] and y["lag"] and key in x["lag"] and key in y["lag"]:
                    hist = {le: y["lag"][key][le] - x["lag"][key].get(le, 0)
                            for le in y["lag"][key]}
                    row[f"{key}_p99_ms"] = quantile(0.99, hist)
                    row[f"{key}_top_ms"] = top_bucket(hist)
            row["lag_worst_ms"] = sy.get("loop_lag_worst_ms")
            per[name] = row
        return per

    def idle(self, fig: dict[str, Any], det: dict[str, Any]) -> None:
        leader = self.q(self.nodes[0], "status")["leader"]
        ts0 = time.time()
        a = self.sample()
        time.sleep(self.args.idle_seconds)  # the window: nothing asked of any node
        procs = {node.name: proc_figures(self.pids[node.name]) for node in self.running()}
        b = self.sample()
        ts1 = time.time()
        self.phases["idle"] = (ts0, ts1)
        per = self.window(a, b, leader)
        for name, extra in procs.items():
            per[name].update(extra)
        lead = next((r for r in per.values() if r["leader"]), None)
        foll = [r for r in per.values() if not r["leader"]]
        det["idle"] = {"seconds": self.args.idle_seconds, "leader": leader[:12], "nodes": per}
        fig["cpu_leader_pct"] = lead and lead["cpu_pct"]
        fig["cpu_follower_med_pct"] = med(foll, "cpu_pct")
        fig["cpu_follower_max_pct"] = mx(foll, "cpu_pct")
        voters = set(self.q(self.nodes[0], "status").get("voters") or ())
        ids = {node.name: node.id for node in self.nodes}
        fig["cpu_voter_med_pct"] = med([r for name, r in per.items()
                                        if not r["leader"] and ids[name] in voters], "cpu_pct")
        fig["cpu_observer_med_pct"] = med([r for name, r in per.items()
                                           if ids[name] not in voters], "cpu_pct")
        fig["sent_leader_per_s"] = lead and lead.get("sent_per_s")
        fig["sent_follower_med_per_s"] = med(foll, "sent_per_s")
        fig["sent_mean_per_s"] = mean(list(per.values()), "sent_per_s")
        fig["recv_leader_per_s"] = lead and lead.get("recv_per_s")
        fig["recv_follower_med_per_s"] = med(foll, "recv_per_s")
        for d in ("in", "out"):
            fig[f"kib_{d}_leader_per_s"] = lead and lead[f"kib_{d}_per_s"]
            fig[f"kib_{d}_follower_med_per_s"] = med(foll, f"kib_{d}_per_s")
        rows = list(per.values())
        fig["tcp_leader"] = lead and lead["tcp_established"]
        fig["tcp_med"] = med(rows, "tcp_established")
        fig["tcp_max"] = mx(rows, "tcp_established")
        fig["rss_leader_mib"] = lead and lead["rss_mib"]
        fig["rss_med_mib"] = med(rows, "rss_mib")
        fig["rss_max_mib"] = mx(rows, "rss_mib")
        fig["lag_p99_idle_med_ms"] = med(rows, "lag_p99_ms")
        fig["lag_p99_idle_max_ms"] = mx(rows, "lag_p99_ms")
        fig["held_p99_idle_max_ms"] = mx(rows, "held_p99_ms")
        fig["lag_worst_ms"] = mx(rows, "lag_worst_ms")
        ch = self.leader_changes(ts0, ts1)
        det["idle"]["leader_changes"] = ch
        fig["elections_idle"] = ch["elections"]
        fig["leader_changed_idle_max"] = ch["leader_changed_max"]

    def leader_changes(self, t0: float, t1: float) -> dict[str, Any]:
        """From every running node's events in [t0, t1]: elections won (`leader_elected`),
        step-downs, and the `leader_changed` each node saw."""
        kinds: Counter[str] = Counter()
        seen: dict[str, int] = {}
        terms: set[int] = set()
        for node in self.running():
            evs = [e for e in self.q(node, "events", timeout=20, limit=10_000)
                   if t0 <= e.get("ts", 0) <= t1]
            for e in evs:
                if e["kind"] in ("leader_elected", "stepped_down", "leader_changed"):
                    kinds[e["kind"]] += 1
                    if e.get("term") is not None:
                        terms.add(e["term"])
            seen[node.name] = sum(1 for e in evs if e["kind"] == "leader_changed")
        return {"elections": kinds["leader_elected"], "stepped_down": kinds["stepped_down"],
                "leader_changed_max": max(seen.values(), default=0),
                "leader_changed_per_node": seen, "terms": sorted(terms)}

    # -------------------------------------------------------------- 3. build
    def build(self, fig: dict[str, Any], det: dict[str, Any]) -> None:
        founder = self.nodes[0]
        plan = self.root / "scale-build.toml"
        plan.write_text('name = "scale"\n' + "".join(
            f'[jobs.s{i}]\ncmd = "sleep {self.args.job_seconds}"\n'
            for i in range(self.args.build_jobs)))
        leader = self.q(founder, "status")["leader"]
        a = self.sample()
        ts0 = time.time()
        t0 = time.monotonic()
        got = self.q(founder, "build", timeout=120, plan=str(plan))
        build_id = got["build"] if isinstance(got, dict) else got
        deadline = t0 + self.args.timeout
        while True:
            asked = time.monotonic()
            st = self.q(founder, "build_status", timeout=15, build=build_id, wait=5.0)
            if st.get("finished"):
                break
            if asked > deadline:
                raise RuntimeError(f"build {build_id} not finished in {self.args.timeout} s")
            if time.monotonic() - asked < 1.0:
                time.sleep(0.05)
        took = time.monotonic() - t0
        ts1 = time.time()
        self.phases["build"] = (ts0, ts1)
        b = self.sample()
        per = self.window(a, b, leader)
        ch = self.leader_changes(ts0, ts1)
        det["build"] = {"jobs": self.args.build_jobs, "ok": st.get("ok"), "leader_changes": ch,
                        "nodes": per}
        fig["build_s"] = round(took, 2)
        fig["elections_build"] = ch["elections"]
        fig["leader_changed_build_max"] = ch["leader_changed_max"]
        rows = list(per.values())
        lead = next((r for r in rows if r["leader"]), {})
        fig["lag_p99_build_max_ms"] = mx(rows, "lag_p99_ms")
        fig["lag_p99_build_leader_ms"] = lead.get("lag_p99_ms")
        fig["held_p99_build_leader_ms"] = lead.get("held_p99_ms")
        fig["held_top_build_leader_ms"] = lead.get("held_top_ms")
        fig["held_p99_build_max_ms"] = mx(rows, "held_p99_ms")
        fig["held_top_build_max_ms"] = mx(rows, "held_top_ms")
        if not st.get("ok"):
            raise RuntimeError(f"build {build_id} did not succeed: {st}")

    # -------------------------------------------------------------- 4. push
    def push(self, fig: dict[str, Any], det: dict[str, Any]) -> None:
        app = self.root / "scale-app"
        app.mkdir()
        (app / "data.txt").write_text(f"scale {time.time()}\n")
        if self.args.push_mib:
            (app / "blob").write_bytes(os.urandom(int(self.args.push_mib * (1 << 20))))
        (app / "swarmnode-push.toml").write_text(
            'name = "scale"\nrestart = "true"\nhealth = "test -f data.txt"\n'
            "health_timeout = 30\n")
        leader = self.q(self.nodes[0], "status")["leader"]
        a = self.sample()
        t0, ts0 = time.monotonic(), time.time()
        res = self.swarm.cli(self.nodes[0], "push", str(app), "--wait", "--json",
                             timeout=self.args.timeout, check=False)
        wall = time.monotonic() - t0
        self.phases["push"] = (ts0, time.time())
        try:
            view = json.loads(res.stdout)
        except ValueError:
            view = {}
        per = self.window(a, self.sample(), leader)
        pusher = per.get(self.nodes[0].name, {})
        det["push"] = {"rc": res.returncode, "counts": view.get("counts"),
                       "stderr": res.stderr[-500:], "nodes": per}
        fig["lag_p99_push_pusher_ms"] = pusher.get("lag_p99_ms")
        fig["held_top_push_pusher_ms"] = pusher.get("held_top_ms")
        fig["held_top_push_leader_ms"] = next(
            (r.get("held_top_ms") for r in per.values() if r["leader"]), None)
        if res.returncode != 0 or view.get("counts") != {"healthy": self.n}:
            raise RuntimeError(f"push failed: rc {res.returncode}, {view.get('counts')}, "
                               f"{res.stderr[-500:]}")
        fig["push_wall_s"] = round(wall, 2)
        fig["push_elapsed_s"] = round(view["elapsed"], 2) if view.get("elapsed") else None

    # -------------------------------------------------------------- --steps
    def steps(self, fig: dict[str, Any], leader: str) -> dict[str, Any]:
        """The probe's logged steps in each phase's window: for the leader (at the start),
        the pusher (the founder) and all nodes, how many, the longest (ms of CPU) and what
        ran the most of them."""
        patterns = {"steps": STEP_LINE, "passes": PASS_LINE, "blocked": BLOCKED_LINE,
                    "transactions": TX_LINE}
        found: dict[str, list[tuple[float, str, float, str]]] = {k: [] for k in patterns}
        for node in self.nodes:  # (ts, node, ms, what) of each step and pass logged
            for line in node.log.read_text(errors="replace").splitlines():
                for kind, pattern in patterns.items():
                    m = pattern.match(line)
                    if m:
                        ts = time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) + int(
                            m[2]) / 1e3
                        found[kind].append((ts, node.name, float(m[3]), m[4]))
        lead = next((n.name for n in self.nodes if n.id == leader), None)
        roles = {"leader": {lead}, "pusher": {self.nodes[0].name},
                 "all": {n.name for n in self.nodes}}
        out: dict[str, Any] = {}
        for kind, logged in found.items():
            for phase, (t0, t1) in self.phases.items():
                for role, names in roles.items():
                    hits = [(ms, what) for ts, name, ms, what in logged
                            if t0 <= ts <= t1 and name in names]
                    key = f"{phase}_{role}" + ("" if kind == "steps" else f"_{kind}")
                    out[key] = {kind: len(hits),
                                "max_ms": max((ms for ms, _ in hits), default=None),
                                "top": Counter(what for _, what in hits).most_common(3)}
                    fig[f"{kind}_{phase}_{role}"] = len(hits)
                    fig[f"{kind}_max_{phase}_{role}_ms"] = out[key]["max_ms"]
        return out

    # -------------------------------------------------------------- 5. kill
    def kill(self, fig: dict[str, Any], det: dict[str, Any]) -> None:
        founder = self.nodes[0]
        st = self.q(founder, "status")
        voters = set(st.get("voters") or [])
        candidates = [node for node in self.nodes[1:] if node.id != st["leader"]]
        candidates.sort(key=lambda node: (node.id in voters, int(node.name[1:])))
        k = min(self.args.kill, self.n - 2)
        victims = candidates[:k]
        for node in victims:
            self.swarm.kill9(node)
        t_kill = time.monotonic()
        gone = {node.id for node in victims}
        survivors = self.running()
        agreed: dict[str, float] = {}
        deadline = t_kill + self.args.timeout
        while len(agreed) < len(survivors):
            sweep = time.monotonic()
            for node in survivors:
                if node.name in agreed:
                    continue
                with_state = {m["id"]: m.get("state") for m in self.q(node, "nodes")}
                if all(with_state.get(i) in GONE for i in gone):
                    agreed[node.name] = round(time.monotonic() - t_kill, 2)
            if sweep > deadline:
                raise RuntimeError(f"only {len(agreed)} of {len(survivors)} agree on the "
                                   f"deaths after {self.args.timeout} s")
            time.sleep(max(0.0, sweep + self.args.poll - time.monotonic()))
        det["kill"] = {"victims": [n.name for n in victims],
                       "voters_killed": sum(1 for n in victims if n.id in voters),
                       "agreed_per_node_s": agreed}
        fig["dead_s"] = max(agreed.values())


# ---------------------------------------------------------------------- helpers


def proc_figures(pid: int) -> dict[str, Any]:
    """VmRSS (MiB) and established TCP connections of process `pid`, from /proc."""
    rss = None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = round(int(line.split()[1]) / 1024, 1)
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    est = 0
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "01" and cols[9] in inodes:
                est += 1
    return {"rss_mib": rss, "tcp_established": est}


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile (ms) of a cumulative histogram {le: count}, interpolated linearly within
    its bucket as Prometheus' histogram_quantile does; None when it holds nothing."""
    les = sorted(buckets)
    total = buckets[les[-1]] if les else 0
    if not total:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le in les:
        count = buckets[le]
        if count >= rank:
            if le == float("inf"):
                return round(lower * 1000, 2)
            share = (rank - below) / (count - below) if count > below else 1.0
            return round((lower + (le - lower) * share) * 1000, 2)
        lower, below = le, count
    return round(lower * 1000, 2)


def top_bucket(buckets: dict[float, float]) -> float | None:
    """The upper bound (ms) of the highest bucket a cumulative histogram {le: count} has a
    count in: the worst value in its window lies below it (inf: above the last bound)."""
    les = sorted(buckets)
    prev = 0.0
    top = None
    for le in les:
        if buckets[le] > prev:
            top = le
        prev = buckets[le]
    return None if top is None else top * 1000


def med(rows: list[dict[str, Any]], key: str) -> float | None:
    xs = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(xs), 2) if xs else None


def mean(rows: list[dict[str, Any]], key: str) -> float | None:
    xs = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.fmean(xs), 2) if xs else None


def mx(rows: list[dict[str, Any]], key: str) -> float | None:
    xs = [r[key] for r in rows if r.get(key) is not None]
    return max(xs) if xs else None


# ---------------------------------------------------------------------- the simulators


def simulators(sizes: list[int], seconds: float, warmup: float = 5.0) -> dict[str, Any]:
    """Messages sent per node per simulated second at idle, by membership and by Raft."""
    from swarmnode.election.config import Config as RaftConfig
    from swarmnode.election.sim import ElectionSim
    from swarmnode.membership.config import Config
    from swarmnode.sim import Simulation

    class Members(Simulation):
        def __init__(self, *a: Any, **kw: Any) -> None:
            self.by_type: Counter[str] = Counter()
            super().__init__(*a, **kw)

        def _transmit(self, src: str, dst: str, msg: Any) -> None:
            self.by_type[type(msg).__name__] += 1
            super()._transmit(src, dst, msg)

    class Raft(ElectionSim):
        def __init__(self, *a: Any, **kw: Any) -> None:
            self.by_src: Counter[str] = Counter()
            self.by_dst: Counter[str] = Counter()
            self.by_type: Counter[str] = Counter()
            super().__init__(*a, **kw)

        def _transmit(self, src: str, dst: str, msg: Any) -> None:
            self.by_src[src] += 1
            self.by_dst[dst] += 1
            self.by_type[type(msg).__name__] += 1
            super()._transmit(src, dst, msg)

    out: dict[str, Any] = {"sizes": sizes, "seconds": seconds, "membership": {},
                           "election": {}}
    for n in sizes:
        t0 = time.perf_counter()
        sim = Members(n, Config(), seed=1)
        sim.run_for(warmup)
        before, types = sim.stats["sent"], Counter(sim.by_type)
        sim.run_for(seconds)
        out["membership"][str(n)] = {
            "per_node_per_s": round((sim.stats["sent"] - before) / n / seconds, 2),
            "by_type_per_node_per_s": {t: round((c - types[t]) / n / seconds, 2)
                                       for t, c in sim.by_type.most_common() if c > types[t]},
            "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"membership n={n}: {out['membership'][str(n)]}", flush=True)
        t0 = time.perf_counter()
        voters = min(5, n if n % 2 else n - 1)
        raft = Raft(voters, n - voters, RaftConfig(), seed=1)
        raft.run_for(warmup)
        leader = raft.stable_leader()
        src0, dst0, types0 = Counter(raft.by_src), Counter(raft.by_dst), Counter(raft.by_type)
        raft.run_for(seconds)
        sent = {i: (raft.by_src[i] - src0[i]) / seconds for i in raft.nodes}
        out["election"][str(n)] = {
            "voters": voters, "leader_stable": leader is not None
            and raft.stable_leader() == leader,
            "per_node_per_s": round(sum(sent.values()) / n, 2),
            "leader_per_s": round(sent[leader], 1) if leader else None,
            "voter_per_s": round(statistics.median(
                [v for i, v in sent.items() if i.startswith("v") and i != leader]), 2)
            if voters > 1 else None,
            "observer_per_s": round(statistics.median(
                [v for i, v in sent.items() if i.startswith("o")]), 2)
            if n > voters else None,
            "leader_received_per_s": round((raft.by_dst[leader] - dst0[leader]) / seconds, 1)
            if leader else None,
            "by_type_per_s": {t: round((c - types0[t]) / seconds, 1)
                              for t, c in raft.by_type.most_common() if c > types0[t]},
            "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"raft n={n}: {out['election'][str(n)]}", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
