"""Tests for swarmnode.build.executor: real processes, real gcc, no sleeps for synchronisation."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from swarmnode.build.emerge import Package, binpkg_outputs
from swarmnode.build.executor import (
    LOG_LIMIT,
    TAIL_BYTES,
    Executor,
    JobError,
    JobResult,
    JobSpec,
    Output,
    RunningJob,
    Slots,
    _stage,
    match_output,
)
from swarmnode.build.plan import Job, Requires

GCC = shutil.which("gcc")
needs_gcc = pytest.mark.skipif(GCC is None, reason="gcc is not installed")

A_C = 'const char *greeting(void) { return "hello from a"; }\n'
B_C = """#include <stdio.h>
const char *greeting(void);
int main(void) { printf("%s, linked with b\\n", greeting()); return 0; }
"""


class Cas:
    """A toy content store: files by sha256, read-only (so staging links them)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.stored: dict[str, Path] = {}

    async def put(self, path: Path, output: Output) -> None:
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == output.sha256
        assert len(data) == output.size
        dest = self.root / output.sha256
        if not dest.exists():
            shutil.copyfile(path, dest)
            os.chmod(dest, stat.S_IMODE(path.stat().st_mode) & ~0o222)
        self.stored[output.path] = dest

    def path(self, output: Output) -> Path:
        return self.root / output.sha256


def spec(job: str = "j", cmd: Any = "true", **kw: Any) -> JobSpec:
    return JobSpec(build_id=kw.pop("build_id", "b1"), job=job, cmd=cmd, **kw)


def executor(tmp_path: Path, **kw: Any) -> Executor:
    kw.setdefault("grace", 0.5)
    return Executor(tmp_path / "jobs", **kw)


def source(tmp_path: Path, name: str, text: str, mode: int = 0o644) -> Path:
    path = tmp_path / "src" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)
    return path


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (a killed orphan waiting for init to
    reap it is gone as far as the job is concerned: it cannot run or write)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state != b"Z"


async def read_until(job: RunningJob, needle: bytes) -> bytes:
    """The job's output, read live with `output_after`, until it shows `needle`."""
    seen = b""
    while needle not in seen:
        total, data = await job.output_after(len(seen), timeout=10)
        assert total == len(seen) + len(data)  # (these outputs are small: nothing skipped)
        if not data and job.done:
            raise AssertionError(f"the job ended without printing {needle!r}: {seen!r}")
        seen += data
    return seen


# --- a small C project, job by job ------------------------------------------------------------


@needs_gcc
async def test_c_project_compiled_and_linked_across_jobs(tmp_path: Path) -> None:
    ex = executor(tmp_path)
    cas = Cas(tmp_path / "cas")
    a_c, b_c = source(tmp_path, "a.c", A_C), source(tmp_path, "b.c", B_C)

    a = await ex.run(
        spec("A", "gcc -O2 -c a.c -o a.o", outputs=("*.o",)), [("a.c", a_c)], store=cas.put
    )
    b = await ex.run(
        spec("B", ("gcc", "-O2", "-c", "src/b.c", "-o", "b.o"), outputs=("*.o",)),
        [("src/b.c", b_c)],
        store=cas.put,
    )
    assert (a.status, a.exit_code, a.reason) == ("ok", 0, "")
    assert b.ok, b.reason
    assert [o.path for o in a.outputs] == ["a.o"] and [o.path for o in b.outputs] == ["b.o"]
    for result in (a, b):  # successful and stored: the job directory is gone
        assert result.job_dir is None and result.log_path is None
    assert not (tmp_path / "jobs" / "b1" / "A" / "0").exists()

    deps = {"A": [("a.o", cas.path(a.outputs[0]))], "B": [("b.o", cas.path(b.outputs[0]))]}
    # "*.o" also matches the staged a.o and b.o: they are the deps' outputs, not C's.
    c = await ex.run(
        spec("C", ("gcc", "-o", "prog", "a.o", "b.o"), outputs=("prog", "*.o")),
        deps=deps,
        keep=True,
        store=cas.put,
    )
    assert c.ok, c.reason
    assert [o.path for o in c.outputs] == ["prog"]
    assert c.job_dir is not None
    for name, stored in (("a.o", deps["A"][0][1]), ("b.o", deps["B"][0][1])):
        assert (c.job_dir / name).stat().st_ino == stored.stat().st_ino  # read-only: linked
    for output in (*a.outputs, *b.outputs, *c.outputs):
        data = cas.path(output).read_bytes()
        assert output.sha256 == hashlib.sha256(data).hexdigest() and output.size == len(data)

    ran = subprocess.run([cas.path(c.outputs[0])], capture_output=True, text=True, check=True)
    assert ran.stdout == "hello from a, linked with b\n"

    # The same build by hand gives the same objects and a program printing the same.
    direct = tmp_path / "direct"
    direct.mkdir()
    shutil.copy(a_c, direct / "a.c")
    (direct / "src").mkdir()
    shutil.copy(b_c, direct / "src" / "b.c")
    for argv in (["gcc", "-O2", "-c", "a.c", "-o", "a.o"],
                 ["gcc", "-O2", "-c", "src/b.c", "-o", "b.o"],
                 ["gcc", "-o", "prog", "a.o", "b.o"]):
        subprocess.run(argv, cwd=direct, check=True)
    assert (direct / "a.o").read_bytes() == cas.path(a.outputs[0]).read_bytes()
    assert (direct / "b.o").read_bytes() == cas.path(b.outputs[0]).read_bytes()
    by_hand = subprocess.run([direct / "prog"], capture_output=True, text=True, check=True)
    assert by_hand.stdout == ran.stdout

    await ex.discard(c)
    assert not c.job_dir.exists()


# --- failures, logs -----------------------------------------------------------------------


async def test_failure_keeps_exit_code_log_and_directory(tmp_path: Path) -> None:
    result = await executor(tmp_path).run(spec(cmd="echo before; echo oops >&2; exit 3"))
    assert (result.status, result.exit_code) == ("failed", 3)
    assert result.reason == "exit code 3"
    assert result.log_tail == "before\noops\n"  # stdout and stderr interleaved, in order
    assert result.log_path is not None and result.log_path.read_text() == "before\noops\n"
    assert result.job_dir == tmp_path.resolve() / "jobs" / "b1" / "j" / "0"


async def test_command_not_found_is_a_failure(tmp_path: Path) -> None:
    result = await executor(tmp_path).run(spec(cmd=("no-such-command-swarmnode",)))
    assert (result.status, result.exit_code) == ("failed", 127)
    assert "command not found" in result.reason
    assert "no-such-command-swarmnode" in result.log_tail


async def test_huge_output_is_bounded_and_keeps_head_and_tail(tmp_path: Path) -> None:
    size = 50_000_000
    result = await executor(tmp_path).run(
        spec(cmd=f"yes 0123456789abcdef | head -c {size}; echo the-end")
    )
    assert result.status == "ok", result.reason
    line = b"0123456789abcdef\n"
    expected = (line * (size // len(line) + 1))[:size] + b"the-end\n"
    assert result.log_tail.encode() == expected[-TAIL_BYTES:]

    result = await executor(tmp_path).run(
        spec("k", cmd=f"yes 0123456789abcdef | head -c {size}; echo the-end"), keep=True
    )
    assert result.log_path is not None
    log = result.log_path.read_bytes()
    assert len(log) <= LOG_LIMIT
    marker = re.search(rb"\n\[swarmnode: (\d+) bytes of output dropped here; the log keeps the "
                       rb"first (\d+) and the last (\d+)\]\n", log)
    assert marker is not None
    dropped, head, kept = (int(n) for n in marker.groups())
    assert log[: marker.start()] == expected[:head]
    assert log[marker.end():] == expected[-kept:]
    assert head + dropped + kept == len(expected)
    assert kept >= (LOG_LIMIT - head) // 3  # a real tail, not a scrap
    assert sorted(p.name for p in result.log_path.parent.iterdir()) == ["kept", "log", "tmp"]


async def test_small_log_limit_still_exact(tmp_path: Path) -> None:
    result = await executor(tmp_path, log_limit=4096).run(spec(cmd="seq 1 20000"), keep=True)
    expected = "".join(f"{n}\n" for n in range(1, 20001)).encode()
    assert result.log_path is not None
    log = result.log_path.read_bytes()
    assert len(log) <= 4096
    head, _, rest = log.partition(b"\n[swarmnode: ")
    tail = rest.split(b"]\n", 1)[1]
    assert expected.startswith(head) and expected.endswith(tail) and len(tail) > 1000


async def test_output_is_read_live_and_after_the_end(tmp_path: Path) -> None:
    ex = executor(tmp_path)
    job = ex.start(spec(cmd="echo one; echo two >&2; sleep 0.3; echo three"))
    assert ex.running("b1", "j") is job
    assert await read_until(job, b"two\n") == b"one\ntwo\n"  # while it sleeps
    assert not job.done
    total, rest = await job.output_after(8, timeout=10)  # waits for what comes next
    assert (total, rest) == (14, b"three\n")
    result = await job.wait()
    assert result.ok and ex.running("b1", "j") is None
    assert job.output(0) == (14, b"one\ntwo\nthree\n")  # after the end: still there
    assert await job.output_after(14, timeout=10) == (14, b"")  # ended: no wait
    ended = job.ended()  # what the worker keeps of it for `logs`
    assert ended.done and all(ended.output(n) == job.output(n) for n in (0, 4, 13, 14, 99))
    assert await ended.output_after(8, timeout=10) == (14, b"three\n")


async def test_a_reader_that_fell_behind_gets_the_recent_tail(tmp_path: Path) -> None:
    ex = executor(tmp_path)
    job = ex.start(spec(cmd="seq 1 5000"))
    await job.wait()
    total, data = job.output(10)
    assert total == len("".join(f"{n}\n" for n in range(1, 5001)))
    assert len(data) == TAIL_BYTES and data.endswith(b"4999\n5000\n")  # offsets show the gap
    assert job.ended().output(10) == (total, data)


# --- stopping -----------------------------------------------------------------------------


async def test_timeout_kills_the_process_group(tmp_path: Path) -> None:
    ex = executor(tmp_path)
    job = ex.start(spec(cmd="sleep 1000 & echo child=$!; wait", timeout=1.0))
    seen = await read_until(job, b"\n")
    child = int(seen.split(b"=")[1])
    result = await job.wait()
    assert result.status == "timed_out"
    assert "timed out after 1 s" in result.reason
    assert result.exit_code == -15 and result.duration >= 1.0
    assert not alive(child)


async def test_cancel_escalates_to_sigkill_for_the_whole_group(tmp_path: Path) -> None:
    ex = executor(tmp_path, grace=0.3)
    # Both the shell and its child ignore SIGTERM: only the SIGKILL after the grace ends them.
    job = ex.start(spec(cmd="trap '' TERM; sleep 1000 & echo child=$!; wait; echo survived"))
    seen = await read_until(job, b"\n")
    child = int(seen.split(b"=")[1])
    assert alive(child)
    job.cancel()
    job.cancel()  # twice is harmless
    result = await job.wait()
    assert (result.status, result.exit_code) == ("cancelled", -9)
    assert "survived" not in result.log_tail
    assert not alive(child)
    assert result.job_dir is not None and result.job_dir.exists()  # kept for `logs`


async def test_stragglers_are_killed_when_the_job_exits(tmp_path: Path) -> None:
    result = await executor(tmp_path).run(spec(cmd="sleep 1000 & echo child=$!"))
    assert result.ok, result.reason
    assert not alive(int(result.log_tail.split("=")[1]))


async def test_a_process_leaving_the_group_does_not_hang_the_job(tmp_path: Path) -> None:
    # setsid puts the sleep in a session of its own, out of reach of the group kill; it keeps
    # the output pipe open, so the executor stops reading after the grace period.
    # The fifo holds the job until the escaped shell runs (after setsid), so it surely escaped.
    cmd = "mkfifo f; setsid sh -c 'echo $$ > f; exec sleep 1000' & read pid < f; echo c=$pid"
    result = await executor(tmp_path, grace=0.2).run(spec(cmd=cmd))
    escaped = int(result.log_tail.split("=")[1].split()[0])
    try:
        assert result.ok, result.reason
        assert "stopped reading: the output stayed open" in result.log_tail
    finally:
        os.kill(escaped, 9)


async def test_cancel_while_waiting_for_cores(tmp_path: Path) -> None:
    slots = Slots(1)
    await slots.acquire(1)
    ex = executor(tmp_path, slots=slots)
    marker = tmp_path / "ran"
    job = ex.start(spec(cmd=f"touch {marker}"))
    job.cancel()
    result = await job.wait()
    assert (result.status, result.reason) == ("cancelled", "cancelled before it started")
    assert not marker.exists() and result.exit_code is None
    slots.release(1)
    assert slots.free == 1


async def test_jobs_take_their_cores_from_the_slots(tmp_path: Path) -> None:
    ex = executor(tmp_path, slots=Slots(3))
    lock = tmp_path / "lock"
    # Each job needs 2 of the 3 cores, so no two may overlap (the mkdir would fail).
    cmd = f"mkdir {lock} || exit 9; sleep 0.2; rmdir {lock}"
    results = await asyncio.gather(
        *(ex.run(spec(f"j{i}", cmd, cores=2)) for i in range(3))
    )
    assert [r.status for r in results] == ["ok"] * 3, [r.reason for r in results]
    too_big = await ex.run(spec("big", cores=4))
    assert too_big.status == "error" and "needs 4 cores" in too_big.reason


# --- outputs ------------------------------------------------------------------------------


async def test_output_symlink_leading_outside_is_refused(tmp_path: Path) -> None:
    ex = executor(tmp_path)
    result = await ex.run(spec(cmd="echo fine > fine.txt; ln -s /etc/passwd leak.txt",
                               outputs=("*.txt",)))
    assert result.status == "failed" and result.exit_code == 0
    assert "'leak.txt' is a symlink to /etc/passwd, outside the job directory" in result.reason
    assert result.outputs == ()

    result = await ex.run(spec("d", cmd="ln -s /etc etc", outputs=("etc/passwd", "etc/**")))
    assert result.status == "failed"
    assert "match no file" in result.reason
    assert "symlinked directories are not followed ('etc')" in result.reason

    result = await ex.run(spec("in", cmd="echo hi > real; ln -s real link.txt",
                               outputs=("*.txt",)))
    assert result.ok, result.reason
    assert result.outputs == (Output("link.txt", hashlib.sha256(b"hi\n").hexdigest(), 3),)


async def test_outputs_matching_nothing_fail_the_job(tmp_path: Path) -> None:
    ex = executor(tmp_path)
    result = await ex.run(spec(cmd="echo built nothing", outputs=("*.o", "lib/**")))
    assert result.status == "failed" and result.exit_code == 0
    assert result.reason == "the declared outputs ('*.o', 'lib/**') match no file the job produced"
    assert (await ex.run(spec("none"))).outputs == ()  # none declared: none needed


async def test_globs_recurse_and_skip_the_executors_directory(tmp_path: Path) -> None:
    result = await executor(tmp_path).run(
        spec(cmd="mkdir -p out/a/b; echo 1 > out/x.o; echo 2 > out/a/b/y.o; echo 3 > out/a/n.c; "
                 "echo 4 > $TMPDIR/t.o", outputs=("**/*.o", "out/a/**")),
    )
    assert result.ok, result.reason
    assert [o.path for o in result.outputs] == ["out/a/b/y.o", "out/a/n.c", "out/x.o"]


def test_match_output() -> None:
    cases = [
        ("*.o", "a.o", True), ("*.o", "d/a.o", False), ("**/*.o", "a.o", True),
        ("**/*.o", "d/e/a.o", True), ("out/**", "out/a/b", True), ("out/**", "out", False),
        ("a/**/b", "a/b", True), ("a/**/b", "a/x/y/b", True), ("a/**/b", "a/x/c", False),
        ("[ab].c", "b.c", True), ("?.c", "ab.c", False), ("**", "x/y", True),
    ]
    for pattern, path, expected in cases:
        assert match_output(pattern, path) is expected, (pattern, path)
    xpak = binpkg_outputs(Package(atom="dev-libs/foo", version="1.2"))[2]
    assert match_output(xpak, "binpkgs/dev-libs/foo/foo-1.2-3.xpak")


async def test_staged_dependency_packages_are_not_collected_again(tmp_path: Path) -> None:
    ex = executor(tmp_path)
    dep_pkg = source(tmp_path, "dep.tbz2", "dep package", mode=0o444)
    deps = {"dev-libs_dep-1": [("binpkgs/dev-libs/dep-1.tbz2", dep_pkg)]}
    me = Package(atom="dev-libs/me", version="2")
    build = "mkdir -p binpkgs/dev-libs && echo me > binpkgs/dev-libs/me-2.tbz2"
    for outputs in (binpkg_outputs(me), ("binpkgs/**",), ("binpkgs/**/*.tbz2",)):
        result = await ex.run(spec("me", build, outputs=outputs), deps=deps)
        assert result.ok, result.reason
        assert [o.path for o in result.outputs] == ["binpkgs/dev-libs/me-2.tbz2"]

    result = await ex.run(spec("me", "true", outputs=("binpkgs/**",)), deps=deps)
    assert result.status == "failed"
    assert "'binpkgs/**' matched only files staged for the job" in result.reason


async def test_staged_files_the_job_changes_are_outputs(tmp_path: Path) -> None:
    writable = source(tmp_path, "notes.txt", "first\n")
    result = await executor(tmp_path).run(
        spec(cmd="echo second >> notes.txt", outputs=("*.txt",)), [("notes.txt", writable)]
    )
    assert result.ok, result.reason
    assert result.outputs[0].sha256 == hashlib.sha256(b"first\nsecond\n").hexdigest()
    assert writable.read_text() == "first\n"  # writable sources are copied, never linked


async def test_storing_failure_is_an_error_and_keeps_the_directory(tmp_path: Path) -> None:
    async def broken(path: Path, output: Output) -> None:
        raise OSError("disk full")

    result = await executor(tmp_path).run(
        spec(cmd="echo x > x.o", outputs=("*.o",)), store=broken
    )
    assert result.status == "error" and "storing output 'x.o' failed" in result.reason
    assert result.job_dir is not None and (result.job_dir / "x.o").exists()


# --- staging ------------------------------------------------------------------------------


async def test_inputs_cannot_leave_the_job_directory(tmp_path: Path) -> None:
    ex = executor(tmp_path)
    src = source(tmp_path, "x", "x")
    for rel, why in (("../evil", "would leave the job directory"),
                     ("a/../../evil", "would leave the job directory"),
                     ("/tmp/evil", "is absolute"),
                     (".swarmnode/log", "reserves"),
                     (".", "names the job directory itself")):
        result = await ex.run(spec(cmd="true"), [(rel, src)])
        assert result.status == "error" and why in result.reason, (rel, result.reason)
        assert result.job_dir is None
    assert not (tmp_path / "jobs" / "b1" / "evil").exists()
    assert not (tmp_path / "evil").exists()


async def test_a_planted_symlink_cannot_move_a_job_directory(tmp_path: Path) -> None:
    """A job can write next to its own directory; a symlink it leaves where a later job's
    build or job directory goes must not make that job run (or clean up) elsewhere."""
    ex = executor(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "j" / "0").mkdir(parents=True)
    (elsewhere / "j" / "0" / "precious").write_text("keep")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "b1").symlink_to(elsewhere)  # the build's directory
    result = await ex.run(spec("j", cmd="touch made"))
    assert result.status == "error" and "is not a directory (a symlink?)" in result.reason
    assert (elsewhere / "j" / "0" / "precious").read_text() == "keep"
    assert sorted(p.name for p in elsewhere.rglob("*")) == ["0", "j", "precious"]
    (tmp_path / "jobs" / "b1").unlink()
    (tmp_path / "jobs" / "b1" / "j").mkdir(parents=True)
    (tmp_path / "jobs" / "b1" / "k").symlink_to(elsewhere)  # a job's directory
    result = await ex.run(spec("k", cmd="touch made"))
    assert result.status == "error" and "is not a directory (a symlink?)" in result.reason
    assert (await ex.run(spec("j", cmd="touch made"))).ok  # the real ones still run


def test_staging_checks_the_resolved_path(tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (tmp_path / "outside").mkdir()
    (job_dir / "sub").symlink_to(tmp_path / "outside")
    src = source(tmp_path, "x", "x")
    with pytest.raises(JobError, match="leads outside the job"):
        _stage(job_dir, {"sub/x": (src, "input")})
    assert not (tmp_path / "outside" / "x").exists()


async def test_dependency_conflicts_name_both(tmp_path: Path) -> None:
    ex = executor(tmp_path)
    one, two = source(tmp_path, "one.h", "1"), source(tmp_path, "two.h", "2")
    result = await ex.run(spec(), deps={"A": [("inc/x.h", one)], "B": [("inc/x.h", two)]})
    assert result.status == "error"
    assert result.reason == (
        "conflict: 'inc/x.h' is staged by both dependency 'A' and dependency 'B', "
        "with different files"
    )
    result = await ex.run(spec(), [("inc", one)], deps={"B": [("inc/x.h", two)]})
    assert result.status == "error" and "input" in result.reason and "'B'" in result.reason
    same = await ex.run(spec(cmd="cat inc/x.h"), deps={"A": [("inc/x.h", one)],
                                                       "B": [("inc/x.h", one)]})
    assert same.ok and same.log_tail == "1"


async def test_read_only_sources_are_linked_others_copied(tmp_path: Path) -> None:
    ro, rw = source(tmp_path, "ro", "ro", mode=0o444), source(tmp_path, "rw", "rw")
    result = await executor(tmp_path).run(spec(), [("ro", ro), ("d/rw", rw)], keep=True)
    assert result.ok and result.job_dir is not None
    assert (result.job_dir / "ro").stat().st_ino == ro.stat().st_ino
    assert (result.job_dir / "d" / "rw").stat().st_ino != rw.stat().st_ino
    assert (result.job_dir / "d" / "rw").read_text() == "rw"


async def test_missing_source_is_an_error(tmp_path: Path) -> None:
    result = await executor(tmp_path).run(spec(), [("a.c", tmp_path / "nope.c")])
    assert result.status == "error" and "cannot stage 'a.c' from input" in result.reason


async def test_stale_directory_of_the_same_attempt_is_replaced(tmp_path: Path) -> None:
    stale = tmp_path / "jobs" / "b1" / "j" / "4"
    stale.mkdir(parents=True)
    (stale / "old.o").write_text("stale")
    result = await executor(tmp_path).run(spec(attempt=4, outputs=("*.o",)))
    assert result.status == "failed" and "match no file" in result.reason


# --- environment and process set-up -------------------------------------------------------


async def test_environment_priority_session_and_stdin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NODE_SECRET", "hunter2")
    job = spec("envjob", cmd="env; echo nice=$(nice); echo stdin=$(readlink /proc/self/fd/0); "
                             "echo ids=$$ $(cut -d' ' -f5,6 /proc/$$/stat)",
               cores=3, attempt=2,
               env={"FOO": "bar", "SWARMNODE_CORES": "99", "MAKEFLAGS": "-j99",
                    "SWARMNODE_JOB": "another"})
    result = await executor(tmp_path, node="n1-id").run(job, keep=True)
    assert result.ok and result.job_dir is not None
    assert result.log_path is not None
    lines = result.log_path.read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if "=" in line)
    assert env["FOO"] == "bar"
    assert (env["SWARMNODE_CORES"], env["MAKEFLAGS"]) == ("3", "-j3")
    assert (env["SWARMNODE_JOB"], env["SWARMNODE_BUILD"]) == ("envjob", "b1")
    assert (env["SWARMNODE_ATTEMPT"], env["SWARMNODE_NODE"]) == ("2", "n1-id")
    assert env["HOME"] == str(result.job_dir) and env["LANG"] == "C.UTF-8"
    assert env["TMPDIR"] == str(result.job_dir / ".swarmnode" / "tmp")
    assert "NODE_SECRET" not in env
    assert env["nice"] == str(min(19, os.nice(0) + 10))
    assert env["stdin"] == "/dev/null"
    pid, pgid, sid = env["ids"].split()
    assert pid == pgid == sid  # its own session and process group


async def test_bad_specs_are_error_results(tmp_path: Path) -> None:
    ex = executor(tmp_path)
    bad = [
        (spec(build_id="../up"), "build id: invalid name"),
        (spec(job="a/b"), "job name: invalid name"),
        (spec(cmd="  "), "cmd: must be a non-empty command"),
        (spec(cmd=()), "cmd: must be a string or a non-empty list"),
        (spec(cores=0), "cores: must be an integer >= 1"),
        (spec(attempt=-1), "attempt: must be an integer >= 0"),
        (spec(timeout=-1.0), "timeout: must be a number of seconds > 0"),
        (spec(env={"A=B": "x"}), "not a valid environment variable name"),
        (spec(outputs=("../x",)), "would leave the job directory"),
    ]
    for job, why in bad:
        result = await ex.run(job)
        assert isinstance(result, JobResult)
        assert result.status == "error" and why in result.reason, (job, result.reason)
    result = await ex.run(spec(), [("only-one-element",)])  # type: ignore[list-item]
    assert result.status == "error" and "expected (relative path, source)" in result.reason
    assert not (tmp_path / "up").exists()


async def test_same_attempt_twice_at_once_is_refused(tmp_path: Path) -> None:
    ex = executor(tmp_path)
    first, second = ex.start(spec(cmd="echo first")), ex.start(spec(cmd="echo second"))
    results = await asyncio.gather(first.wait(), second.wait())
    assert results[0].ok
    assert results[1].status == "error" and "is running" in results[1].reason


def test_spec_from_plan_job() -> None:
    job = Job(name="c", cmd=("make",), outputs=("*.o",), requires=Requires(cores=4),
              env={"CFLAGS": "-O2"})
    got = JobSpec.from_job(job, "b7", attempt=2)
    assert (got.job, got.cmd, got.cores, got.attempt, got.env) == (
        "c", ("make",), 4, 2, {"CFLAGS": "-O2"}
    )


# --- slots --------------------------------------------------------------------------------


async def test_slots_never_over_commit() -> None:
    slots = Slots(4)
    in_use = peak = 0
    rng = random.Random(7)

    async def worker(n: int) -> None:
        nonlocal in_use, peak
        async with slots.hold(n):
            in_use += n
            peak = max(peak, in_use)
            assert in_use <= slots.total
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)  # let others interleave (not synchronisation)
            in_use -= n

    await asyncio.gather(*(worker(rng.randint(1, 4)) for _ in range(200)))
    assert peak == 4 and in_use == 0 and slots.free == 4


async def test_slots_serve_in_order_and_survive_cancelled_waiters() -> None:
    slots = Slots(2)
    order: list[str] = []
    await slots.acquire(1)

    async def take(name: str, n: int) -> None:
        await slots.acquire(n)
        order.append(name)

    big = asyncio.ensure_future(take("big", 2))
    await asyncio.sleep(0)
    gone = asyncio.ensure_future(take("gone", 1))
    await asyncio.sleep(0)
    small = asyncio.ensure_future(take("small", 1))
    await asyncio.sleep(0)
    assert order == [] and slots.free == 1  # small fits, but waits behind big
    gone.cancel()
    slots.release(1)
    await big
    assert order == ["big"] and slots.free == 0
    slots.release(2)
    await small
    assert order == ["big", "small"] and slots.free == 1
    with pytest.raises(ValueError):
        await slots.acquire(3)
    with pytest.raises(ValueError):
        slots.release(2)
