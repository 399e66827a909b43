"""Job directories: a finished job leaves no empty directory behind, kept ones get a retention,
a crash's leftovers are swept, and a full file system fails a job with a clear reason."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from swarmnode.build.executor import (
    KEPT,
    META,
    NO_SPACE,
    Executor,
    JobSpec,
    Retention,
    sweep_job_dirs,
)

LOTS = Retention(keep=100, age=1e9, max_bytes=1 << 40)


def spec(build: str, job: str, cmd: str = "true", attempt: int = 1, **kw) -> JobSpec:
    return JobSpec(build_id=build, job=job, cmd=cmd, attempt=attempt, **kw)


def dirs_under(root: Path) -> list[Path]:
    return [Path(top) for top, _d, _f in os.walk(root) if Path(top) != root]


def empty_dirs(root: Path) -> list[Path]:
    return [Path(top) for top, d, f in os.walk(root) if not d and not f and Path(top) != root]


async def test_successful_jobs_leave_no_directories_and_failed_ones_are_kept_marked(
        tmp_path: Path) -> None:
    ex = Executor(tmp_path / "jobs", grace=0.5)
    results = [await ex.run(spec(f"b{b}", f"j{j}", "echo hi > out.txt", outputs=("out.txt",)))
               for b in range(3) for j in range(3)]
    assert all(r.ok for r in results)
    assert dirs_under(tmp_path / "jobs") == []  # not even the empty build and job directories
    ok, bad = await ex.run(spec("b9", "ok")), await ex.run(spec("b9", "bad", "exit 3"))
    assert ok.ok and bad.status == "failed" and bad.job_dir is not None
    assert (bad.job_dir / META / KEPT).exists()
    assert sorted(p.name for p in (tmp_path / "jobs" / "b9").iterdir()) == ["bad"]
    await ex.discard(bad)
    assert dirs_under(tmp_path / "jobs") == []


async def test_a_sweep_removes_a_crashs_leftovers_and_keeps_running_and_retained_ones(
        tmp_path: Path) -> None:
    ex = Executor(tmp_path / "jobs", grace=0.5)
    root = ex.resolved_root()
    failed = [await ex.run(spec("b1", f"f{i}", "exit 1")) for i in range(4)]
    leftover = root / "b2" / "j" / "1"  # a run that died with the node: no marker
    (leftover / META).mkdir(parents=True)
    (leftover / "big").write_bytes(b"x" * 10000)
    running = ex.start(spec("b3", "r", "sleep 30"))
    while running.job_dir is None or not running.job_dir.exists():
        await _tick()
    result = sweep_job_dirs(root, ex.busy, LOTS, time.time())
    assert (result.removed, result.leftovers) == (1, 1) and result.freed >= 10000
    assert not (root / "b2").exists()  # its empty job and build directories too
    assert running.job_dir.exists() and all(f.job_dir.exists() for f in failed)
    # the retention: the newest 2 of the 4 failed ones
    result = sweep_job_dirs(root, ex.busy, Retention(keep=2, age=1e9, max_bytes=1 << 40),
                            time.time())
    assert result.removed == 2 and [f.job_dir.exists() for f in failed] == [False, False,
                                                                           True, True]
    # by age: none is a day old yet; in two days all are
    assert not sweep_job_dirs(root, ex.busy, Retention(2, 86400, 1 << 40), time.time())
    assert sweep_job_dirs(root, ex.busy, Retention(2, 86400, 1 << 40),
                          time.time() + 2 * 86400).removed == 2
    assert running.job_dir.exists()  # a running job's directory is never swept
    running.cancel()
    assert (await running.wait()).status == "cancelled"
    assert sweep_job_dirs(root, ex.busy, LOTS, time.time(), everything=True).removed == 1
    assert dirs_under(root) == []


async def test_a_size_cap_keeps_the_newest_kept_directories_that_fit(tmp_path: Path) -> None:
    ex = Executor(tmp_path / "jobs", grace=0.5)
    root = ex.resolved_root()
    failed = []
    for i in range(3):
        failed.append(await ex.run(spec("b", f"f{i}", "head -c 100000 /dev/zero > blob; exit 1")))
        os.utime(failed[-1].job_dir / META / KEPT, (1000.0 + i, 1000.0 + i))  # oldest first
    result = sweep_job_dirs(root, ex.busy, Retention(10, 1e12, 250_000), 2000.0)
    assert result.removed == 1 and [f.job_dir.exists() for f in failed] == [False, True, True]


async def test_a_sweep_racing_new_jobs_never_fails_one(tmp_path: Path) -> None:
    """Jobs of one build start while sweeps remove the empty build and job directories."""
    import asyncio

    ex = Executor(tmp_path / "jobs", grace=0.5)
    root = ex.resolved_root()
    stop = False

    def sweeper() -> int:
        n = 0
        while not stop:
            n += bool(sweep_job_dirs(root, ex.busy, LOTS, time.time()))
        return n

    sweeps = asyncio.ensure_future(asyncio.to_thread(sweeper))
    results = await asyncio.gather(*(ex.run(spec("b", f"j{i % 3}", attempt=i)) for i in range(60)))
    stop = True
    await sweeps
    assert all(r.ok for r in results), [r.reason for r in results if not r.ok]
    assert empty_dirs(root) == []


async def _tick() -> None:
    import asyncio

    await asyncio.sleep(0.01)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 1 MiB tmpfs (unmounted afterwards)."""
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@needs_root
async def test_enospc_in_the_log_staging_or_storing_fails_the_job_saying_so(
        tmp_path: Path, small_fs: Path) -> None:
    ex = Executor(small_fs / "jobs", grace=0.5)
    loud = await ex.run(spec("b", "loud", "head -c 3000000 /dev/zero; echo done"))
    assert loud.status == "error" and NO_SPACE in loud.reason, loud
    await ex.discard(loud)
    big = tmp_path / "big.in"
    big.write_bytes(b"y" * 3_000_000)
    staged = await ex.run(spec("b", "staged"), [("big.in", big)])
    assert staged.status == "error" and NO_SPACE in staged.reason, staged
    await ex.discard(staged)  # (its partial copy fills the file system)

    async def full(_path: Path, _output: object) -> None:
        raise OSError(28, os.strerror(28))

    stored = await ex.run(spec("b", "out", "echo x > o", outputs=("o",)), store=full)
    assert stored.status == "error" and NO_SPACE in stored.reason, stored
    ok = await ex.run(spec("b", "fine", "echo fine"))  # and the executor carries on
    assert ok.ok and "fine" in ok.log_tail
