"""Build scheduling figures of real swarmnode processes on 5 separate hosts (namespaces).

Needs root. The 5-host LAN of lab_membership.py with the shipped default timers; each node
offers a different number of cores through config.toml (`cores`: 2, 4, 4, 8, 16 — the jobs
sleep, so these are slots, not this 2-core machine's CPUs). Jobs record when they start and
end in a file outside their job directory (the namespaces share the file system), so times
come from one clock. Phases:

1. latency: `--repeats` one-job builds on the idle swarm; submit (the control request the CLI
   sends) to the job's first instruction, median.
2. dispatch: `--dispatches` builds of `--empty` jobs running `true`; jobs per second from
   submit to the build finished (median), the CPU the nodes spent per job (with the jobs
   themselves: a `sh -c true` costs about 0.8 ms here) and the messages they sent per job.
3. makespan: a 200-job random DAG of sleep jobs (known durations, 1-8 cores each); makespan over
   its lower bound max(critical path, work / cores), and the share of cores busy while runnable
   work was queued (there: mostly the moments between a dependency's end and its dependent's
   start, so this share measures the hop).
4. backlog: 300 independent jobs of the same kinds, more work than cores: the share of cores
   busy while runnable work is queued (from the submit until the last job starts), and the
   makespan over its bound.
5. failover: a build of sleep jobs is running; `kill -9` the leader; time until a job starts
   under the new leader.

Before the first phase the founder grants the build and operate rights to the other nodes
(`grant_all`, once, not measured): they submit and cancel the builds.

    .venv/bin/python bench/lab_builds.py [--repeats 20] [--empty 500] [--dispatches 5]
        [--failovers 5] [--only latency,dispatch,makespan,backlog,failover] [--worktree]

Results on stdout and in /tmp/swarmnode-bench/lab_builds.json.
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import snapshot  # bench/ is on sys.path when run as a script

if __name__ == "__main__":
    snapshot.reexec_on_head(sys.argv[1:])

from lab_membership import HOSTS, Bench, build, form_cluster

from swarmnode import control
from swarmnode.build.plan import load_plan
from swarmnode.build.schedule import lower_bound
from tests.lab import Lab

CORES = [2, 4, 4, 8, 16]
TARGETS = {"latency_ms": 20.0, "dispatch_per_s": 500.0, "makespan_ratio": 1.10,
           "utilisation": 0.90, "failover_s": 2.0}


def asker(b: Bench):
    """A running node that does not lead (the failover phase kills the leader)."""
    for n in b.running():
        st = control.call(n.home, "status", timeout=5)
        if st["leader"] and st["leader"] != n.id:
            return n
    raise RuntimeError("no follower that knows a leader")


def grant_all(b: Bench, founder_host: str = "n1", timeout: float = 60.0) -> None:
    """Before any measurement: the founder lets every other node submit builds and cancel them
    (the build and operate rights, issue 13), and every node holds each grant (whichever
    leads judges a request by them). A release from before these rights has none to grant
    and needs none: its "unknown right" is skipped, so the same script benchmarks both."""
    founder = b.nodes[founder_host]
    others = [n for n in b.running() if n is not founder]
    for right in ("build", "operate"):
        for n in others:
            res = b.cli(founder, "grant", right, n.id)
            if res.returncode != 0:
                if "unknown right" in res.stderr + res.stdout:
                    continue
                raise RuntimeError(f"grant {right} {n.id[:12]}: {res.stderr.strip()}")
            key, deadline = f"{right}:{n.id}", time.monotonic() + timeout
            while not all(any(e.get("kind") == "note" and e.get("key") == key
                              for e in control.call(m.home, "events", timeout=5, limit=10_000))
                          for m in b.running()):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the grant of {key} did not reach every node")
                time.sleep(b.poll)


def submit(b: Bench, plan: Path) -> tuple[str, float]:
    node = asker(b)
    t0 = time.time()
    build_id = control.call(node.home, "build", timeout=120, plan=str(plan))
    return build_id, t0


def wait_finished(b: Bench, build_id: str, timeout: float) -> dict[str, Any]:
    """The build's status once finished: a long poll (the node answers when it sees the end);
    a node too old for that answers at once, and is asked again every 20 ms."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        asked = time.monotonic()
        st = control.call(asker(b).home, "build_status", timeout=15, build=build_id, wait=5.0)
        if st["finished"]:
            return st
        if time.monotonic() - asked < 1.0:
            time.sleep(0.02)
    raise RuntimeError(f"build {build_id} did not finish in {timeout} s")


def stamp(marks: Path, name: str) -> str:
    return f"echo {name} start $(date +%s.%N) >> {marks}"


def phase_latency(b: Bench, root: Path, repeats: int) -> dict[str, Any]:
    out = []
    for i in range(repeats):
        marks = root / f"lat-{i}.txt"
        plan = root / f"lat-{i}.toml"
        plan.write_text(f'name = "lat{i}"\n[jobs.one]\ncmd = "{stamp(marks, "one")}"\n')
        build_id, t0 = submit(b, plan)
        wait_finished(b, build_id, 30)
        started = float(marks.read_text().split()[2])
        out.append(started - t0)
    return {"each_ms": [round(x * 1000, 1) for x in out],
            "median_ms": round(statistics.median(out) * 1000, 1)}


def phase_dispatch(b: Bench, root: Path, n: int, runs: int) -> dict[str, Any]:
    """`runs` builds of `n` jobs running `true`: jobs per second from submit to the build
    finished, and the CPU the five nodes (with the jobs they ran) spent per job."""
    pids = [control.call(node.home, "status", timeout=5)["pid"] for node in b.running()]
    rates, cpu_ms, ok = [], [], True
    sent_before = messages_sent(b)

    def used() -> float:
        return sum(snapshot.cpu_seconds(pid, children=True) for pid in pids)
    for r in range(runs):
        plan = root / f"empty{r}.toml"
        plan.write_text(f'name = "empty{r}"\n' + "".join(f'[jobs.e{i}]\ncmd = "true"\n'
                                                         for i in range(n)))
        before = used()
        build_id, t0 = submit(b, plan)
        st = wait_finished(b, build_id, 600)
        took = time.time() - t0
        cpu_ms.append(round((used() - before) / n * 1000, 2))
        rates.append(round(n / took, 1))
        ok = ok and st["ok"]
    sent = {t: round((c - sent_before.get(t, 0)) / (n * runs), 3)
            for t, c in sorted(messages_sent(b).items()) if c - sent_before.get(t, 0) > n / 100}
    return {"jobs": n, "each_jobs_per_s": rates, "jobs_per_s": statistics.median(rates),
            "cpu_ms_per_job": statistics.median(cpu_ms), "messages_per_job": sent, "ok": ok}


def messages_sent(b: Bench) -> dict[str, int]:
    """Messages every node sent so far, by type, summed (`status` of older nodes has none)."""
    total: dict[str, int] = {}
    for node in b.running():
        for kind, count in control.call(node.home, "status", timeout=5).get("sent", {}).items():
            total[kind] = total.get(kind, 0) + count
    return total


def dag(root: Path, marks: Path, n: int = 200, seed: int = 1, name: str = "dag",
        with_deps: bool = True) -> Path:
    """A random graph of sleep jobs (1-8 cores, log-normal durations) recording their start and
    end in `marks`; `with_deps=False`: the same kind of jobs, all independent."""
    rng = random.Random(seed)
    lines = [f'name = "{name}"\n']
    for i in range(n):
        deps = sorted({f"j{rng.randrange(max(0, i - 20), i)}" for _ in range(rng.randint(0, 3))}
                      if i and with_deps else set())
        cores = rng.choices([1, 2, 4, 8], [50, 25, 15, 10])[0]
        secs = round(min(3.0, rng.lognormvariate(-1.0, 0.5)), 2)
        cmd = (f"echo j{i} start $(date +%s.%N) {cores} >> {marks}; sleep {secs}; "
               f"echo j{i} end $(date +%s.%N) {cores} >> {marks}")
        dep_list = ", ".join(f'"{d}"' for d in deps)
        lines.append(f'[jobs.j{i}]\ncmd = "{cmd}"\ndeps = [{dep_list}]\nestimate = {secs}\n'
                     f'requires = {{ cores = {cores} }}\n')
    plan = root / f"{name}.toml"
    plan.write_text("\n".join(lines))
    return plan


def run_marked(b: Bench, root: Path, name: str, **kw: Any) -> dict[str, Any]:
    """Build a `dag` and read its marks: makespan, its lower bound, and the busy share."""
    marks = root / f"{name}-marks.txt"
    plan = dag(root, marks, name=name, **kw)
    bound = lower_bound(load_plan(plan), sum(CORES))
    build_id, t0 = submit(b, plan)
    st = wait_finished(b, build_id, 600)
    starts, ends, cores = {}, {}, {}
    for line in marks.read_text().split("\n"):
        if line:
            job, what, ts, c = line.split()
            (starts if what == "start" else ends)[job] = float(ts)
            cores[job] = int(c)
    first, last_end = min(starts.values()), max(ends.values())
    makespan = last_end - first
    return {"ok": st["ok"], "makespan_s": round(makespan, 2),
            "submit_to_end_s": round(last_end - t0, 2), "lower_bound_s": round(bound, 2),
            "ratio": round(makespan / bound, 3),
            "utilisation_while_runnable": utilisation(load_plan(plan), t0, starts, ends, cores)}


def phase_makespan(b: Bench, root: Path) -> dict[str, Any]:
    return run_marked(b, root, "dag")


def phase_backlog(b: Bench, root: Path) -> dict[str, Any]:
    """300 independent jobs of the same kinds: runnable work is queued from the submit until
    the last job starts, so the busy share is the scheduler's packing and dispatch."""
    return run_marked(b, root, "backlog", n=300, seed=2, with_deps=False)


def utilisation(plan, t0: float, starts: dict[str, float], ends: dict[str, float],
                cores: dict[str, int], step: float = 0.01) -> float | None:
    """Busy share of all cores, sampled at the moments when some job was ready (its deps
    done, or submitted) but not yet started: the issue's "while the queue has runnable work"."""
    ready = {j: max((ends[d] for d in plan.jobs[j].deps), default=t0) for j in starts}
    busy_sum, samples = 0.0, 0
    t = min(starts.values())
    end = max(ends.values())
    while t < end:
        if any(ready[j] <= t < starts[j] for j in starts):
            busy_sum += sum(cores[j] for j in starts if starts[j] <= t < ends[j])
            samples += 1
        t += step
    return round(busy_sum / (samples * sum(CORES)), 3) if samples else None


def leader_node(b: Bench):
    st = control.call(asker(b).home, "status", timeout=5)
    return next(n for n in b.running() if n.id == st["leader"])


def phase_failover(b: Bench, root: Path, trials: int) -> dict[str, Any]:
    gaps = []
    for t in range(trials):
        marks = root / f"fo-{t}.txt"
        plan = root / f"fo-{t}.toml"
        plan.write_text(f'name = "fo{t}"\n' + "".join(
            f'[jobs.s{i}]\ncmd = "echo s{i} start $(date +%s.%N) >> {marks}; sleep 0.3"\n'
            f"requires = {{ cores = 2 }}\n" for i in range(150)))
        leader = leader_node(b)
        watcher = asker(b)
        old_term = control.call(watcher.home, "status", timeout=5)["term"]
        build_id, _ = submit(b, plan)
        while not marks.exists() or len(marks.read_text().splitlines()) < 10:
            time.sleep(0.01)
        t_kill = time.time()
        b.lab.kill9(leader.proc)
        gap = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and gap is None:
            jobs = control.call(watcher.home, "jobs", timeout=10, build=build_id)
            newer = {j["job"] for j in jobs if j["term"] > old_term
                     and j["state"] in ("running", "done")}
            started = {x.split()[0]: float(x.split()[2]) for x in marks.read_text().splitlines()}
            times = [started[n] for n in newer if n in started]
            if times:  # the first job the new leader assigned has started
                gap = min(times) - t_kill
            time.sleep(0.02)
        gaps.append(gap)
        control.call(watcher.home, "cancel", timeout=60, build=build_id)
        b.start(leader)
        b.all_alive(30)
        time.sleep(8)  # voters settle back (not a measurement)
    ok = [g for g in gaps if g is not None]
    return {"each_s": gaps, "median_s": round(statistics.median(ok), 3) if ok else None}


def main() -> int:
    ap = snapshot.lab_parser(__doc__, "lab_builds")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--empty", type=int, default=500)
    ap.add_argument("--failovers", type=int, default=5)
    ap.add_argument("--dispatches", type=int, default=5, help="dispatch runs (median)")
    ap.add_argument("--only", default="", help="phases to run, comma-separated (default all)")
    args = ap.parse_args()
    if not snapshot.is_root():
        return 2
    root = Path(tempfile.mkdtemp(prefix="swarmnode-bench-builds-"))
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                           "commit": snapshot.commit(), "cores": CORES, "targets": TARGETS}
    with Lab("snx", log_dir=root / "lab") as lab:
        b = Bench(lab=lab, root=root, swarmnode=args.swarmnode, poll=0.02)
        build(lab)
        original = b.new_home

        def new_home(host: str, addr: str = ""):
            node = original(host, addr)
            (node.home / "config.toml").write_text(f"cores = {CORES[int(host[1:]) - 1]}\n")
            return node

        b.new_home = new_home  # type: ignore[method-assign]
        form_cluster(b)
        b.start(b.new_home(f"n{HOSTS}"))
        if not b.all_alive(60):
            raise RuntimeError("5 nodes did not converge")
        time.sleep(8)  # voters step in one a second after a 3 s settle (not a measurement)
        grant_all(b)
        for name, phase in (("latency", lambda: phase_latency(b, root, args.repeats)),
                            ("dispatch", lambda: phase_dispatch(b, root, args.empty,
                                                                args.dispatches)),
                            ("makespan", lambda: phase_makespan(b, root)),
                            ("backlog", lambda: phase_backlog(b, root)),
                            ("failover", lambda: phase_failover(b, root, args.failovers))):
            if args.only and name not in args.only.split(","):
                continue
            res[name] = phase()
            print(f"{name}: {res[name]}", flush=True)
        for n in b.running():
            b.stop(n)
    snapshot.write_result(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
