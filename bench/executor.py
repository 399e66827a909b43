"""The executor alone: `true` jobs run through `Executor` beside a bare spawn loop.

What a worker spends per job before any message: the job directory, the log pipe, the slots,
the process start (from the niced thread) and its reaping, and the directory's removal. The
bare loop is the floor: `Popen` from a thread and a pidfd reaper, nothing else. Both run
`sh -c true`, `--parallel` at a time, in one process; CPU is this process's own and its
children's (the `sh`), per job. Rounds alternate the two, and the medians are reported.

    .venv/bin/python bench/executor.py [--jobs 1000] [--parallel 16] [--rounds 5]

Results on stdout and in /tmp/swarmnode-bench/executor.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import snapshot  # bench/ is on sys.path when run as a script

if __name__ == "__main__":
    snapshot.reexec_on_head(sys.argv[1:])

from swarmnode.build.executor import Executor, JobSpec, Slots


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


async def measure(run_one: Callable[[int], Awaitable[object]], jobs: int,
                  parallel: int) -> dict[str, float]:
    """Jobs per second and CPU per job (ms, own and children's) for `jobs` runs of `run_one`,
    `parallel` at a time."""
    limit = asyncio.Semaphore(parallel)

    async def one(i: int) -> object:
        async with limit:
            return await run_one(i)

    own, children = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(jobs)))
    took = time.perf_counter() - start
    return {"jobs_per_s": round(jobs / took, 1),
            "own_ms": round((_cpu(resource.RUSAGE_SELF) - own) / jobs * 1000, 3),
            "children_ms": round((_cpu(resource.RUSAGE_CHILDREN) - children) / jobs * 1000, 3)}


async def executor_round(root: Path, jobs: int, parallel: int, n: int) -> dict[str, float]:
    ex = Executor(root / f"jobs{n}", slots=Slots(parallel))

    async def run_one(i: int) -> object:
        spec = JobSpec(build_id="b", job=f"j{i}", cmd="true", cores=1, attempt=1)
        result = await ex.start(spec).wait()
        if not result.ok:
            raise RuntimeError(result.reason)
        return result

    return await measure(run_one, jobs, parallel)


async def bare_round(jobs: int, parallel: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(1)

    async def run_one(_i: int) -> object:
        proc = await loop.run_in_executor(pool, lambda: subprocess.Popen(
            ["sh", "-c", "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True, cwd="/"))
        fd = os.pidfd_open(proc.pid)
        ended = loop.create_future()

        def reap() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            proc.wait()
            ended.set_result(None)

        loop.add_reader(fd, reap)
        return await ended

    try:
        return await measure(run_one, jobs, parallel)
    finally:
        pool.shutdown()


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix="swarmnode-bench-executor-"))
    rounds: dict[str, list[dict[str, float]]] = {"executor": [], "bare": []}
    for n in range(args.rounds):
        rounds["executor"].append(await executor_round(root, args.jobs, args.parallel, n))
        rounds["bare"].append(await bare_round(args.jobs, args.parallel))
    return {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            for name, runs in rounds.items()}


def main() -> int:
    ap = snapshot.lab_parser(__doc__, "executor", swarmnode=False)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--parallel", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    res = {"commit": snapshot.commit(), "jobs": args.jobs, "parallel": args.parallel,
           **asyncio.run(main_async(args))}
    for name in ("executor", "bare"):
        r = res[name]
        print(f"{name:9s} {r['jobs_per_s']:7.1f} jobs/s   own {r['own_ms']:.2f} ms/job   "
              f"children {r['children_ms']:.2f} ms/job")
    snapshot.write_result(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
