"""Running one job on a worker node: a fresh directory, staged files, a niced process group, a
bounded log, and the outputs hashed.

Choices made here, and why:

* Every run gets its own directory `<root>/<build>/<job>/<attempt>/`, made fresh (a stale one
  left by a crashed run of the same attempt is removed), so nothing from an earlier attempt can
  leak into this one. `.swarmnode/` inside it is the executor's (the log, TMPDIR) and is never
  staged into nor collected.
* Staged files are hard links to the content store when the store's file is read-only, else
  copies. A link shares the inode, so a job writing into it in place would corrupt the store;
  with a read-only file that write fails instead. Linked or copied, each staged file's inode,
  mtime and size are recorded, and an output pattern matching a staged file that is still
  unchanged does not collect it: emerge-style patterns such as `binpkgs/**/*.tbz2` also match
  the dependencies' packages staged beside the job's own, and those are not this job's output.
* The command runs in its own session (so its process group can be killed as a whole), with
  stdin from /dev/null, a minimal environment (the node's may hold secrets and differs between
  nodes) and at `nice` 10: builds saturate every core, and the node's own event loop must keep
  answering gossip and election messages on time or it is declared dead under load. Setting
  the priority after the fork would race with the first children the job starts, so on Linux,
  where a nice value belongs to a thread and a child inherits its parent thread's, commands
  are started from one thread of the node that runs at +10 (no `nice` program wrapping each
  command: one exec fewer per job); elsewhere `nice` wraps the command. The command's exit is
  awaited through a pidfd in the event loop (asyncio's child watcher starts a thread per
  child in Python 3.11). A program that cannot be started is a failure with the exit status
  a shell gives it (127: not found, 126: not executable), as when `nice` started it.
* When the job's main process exits, whatever is left of its process group is killed and
  waited for: stragglers would otherwise write into the directory while its outputs are hashed
  or while it is removed. Cancellation and timeouts (counted from the command's start) send
  SIGTERM to the group, then SIGKILL after a grace period. A process that leaves the group
  (setsid) escapes this; if it keeps the output open, reading stops after the grace period.
* The environment's SWARMNODE_BUILD, _JOB, _ATTEMPT, _NODE, _CORES and MAKEFLAGS=-jN come
  last, so a job's env can neither raise the cores it was given nor pass for another job;
  anything else in the job's env (PATH, HOME, ...) wins over the base.
* Output patterns are globs relative to the job directory (`*`, `?`, `[...]` within a name,
  `**` for any number of directories; a trailing `**` means everything below). Only regular
  files are collected; a symlink is never followed while walking, and a matched symlink is
  collected as its target's content only when that is a regular file inside the job
  directory: one pointing outside fails the job (it would publish a file of the node's). A job
  whose declared outputs together match nothing it produced fails: a build that silently yields
  nothing is worse than one that stops. (Each pattern alone may match nothing: emerge jobs list
  the alternative package formats and produce one.)
* The job directory of anything but a successful job is kept, for `swarmnode logs`, and marked
  so (`.swarmnode/kept`); a successful one is removed once its outputs were handed to `store`,
  unless `keep` is set, and so are its job's and build's directories once empty (a busy node
  would otherwise collect thousands of empty ones). `sweep_job_dirs` applies the retention to
  the kept ones and removes what a run that died with the node left (unmarked, not running).
* A write of the executor's own that fails with ENOSPC (staging, the log, storing an output)
  fails the job with the reason "no space left on device"; the node carries on.
* Nothing a job does makes the executor raise: every problem is a JobResult with a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import functools
import hashlib
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from swarmnode.build.plan import Job, PlanError, check_name
from swarmnode.tasks import until

Status = Literal["ok", "failed", "cancelled", "timed_out", "error"]

#: PATH for jobs, unless the job's env sets one: the usual system directories.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Added to the node's own niceness for jobs (see the module notes).
NICENESS = 10
#: Seconds between SIGTERM and SIGKILL when a job is stopped.
GRACE_S = 5.0
#: Bytes of log kept per job; past that the head and the tail are kept around a marker.
LOG_LIMIT = 16 * 1024 * 1024
#: Bytes of the end of the output kept in results and while running (reports of failed jobs,
#: `logs` and `logs --follow`, which reads it from afar).
TAIL_BYTES = 4096
META = ".swarmnode"
LOG_NAME = "log"
#: In META of a directory kept after its job ended (a failed job's, or `keep`): the job-dir
#: sweep applies the retention to these and removes unmarked ones no run holds (a crash's).
KEPT = "kept"
NO_SPACE = "no space left on device"

_CHUNK = 64 * 1024
_MARKER_ROOM = 256
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

#: `(path relative to the job directory, file to stage there)`.
Staged = tuple[str, str | os.PathLike[str]]


class JobError(Exception):
    """The job cannot run as given (or the node cannot run it): an `error` result."""


class OutputError(Exception):
    """The job ran but its outputs are unacceptable: a `failed` result."""


@dataclass(frozen=True)
class JobSpec:
    """What a worker is told to run; `cores` is what the job is given, `timeout` in seconds
    counts from the start of the command."""

    build_id: str
    job: str
    cmd: str | tuple[str, ...]  # a string runs under `/bin/sh -c`, a tuple is an argv
    outputs: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cores: int = 1
    attempt: int = 0
    timeout: float | None = None

    @classmethod
    def from_job(
        cls,
        job: Job,
        build_id: str,
        *,
        attempt: int = 0,
        cores: int | None = None,
        timeout: float | None = None,
    ) -> JobSpec:
        return cls(
            build_id=build_id,
            job=job.name,
            cmd=job.cmd,
            outputs=job.outputs,
            env=dict(job.env),
            cores=job.requires.cores if cores is None else cores,
            attempt=attempt,
            timeout=timeout,
        )


@dataclass(frozen=True)
class Output:
    """A collected output file: its path relative to the job directory, sha256 hex, bytes."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class JobResult:
    """How a run ended. `duration` is the command's wall time from its spawn (0 if it never
    started); `job_dir` and `log_path` are None when they were never made or have been
    removed."""

    build_id: str
    job: str
    attempt: int
    status: Status
    reason: str
    exit_code: int | None = None  # negative: killed by that signal
    duration: float = 0.0
    outputs: tuple[Output, ...] = ()
    job_dir: Path | None = None
    log_path: Path | None = None
    log_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class _Mark:
    """A staged file as it was left for the job; unchanged means not produced by the job.
    (Not ctime: staging the same store file into another job changes it.)"""

    dev: int
    ino: int
    mtime_ns: int
    size: int

    @classmethod
    def of(cls, st: os.stat_result) -> _Mark:
        return cls(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


# ---------------------------------------------------------------------------------------------
# Slots


class Slots:
    """The node's cores as slots. Waiters are served first come, first served, so a job
    needing many cores is not starved by a stream of small ones."""

    def __init__(self, total: int) -> None:
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"a node has at least one core, got {total!r}")
        self.total = total
        self._free = total
        self._cond = asyncio.Condition()
        self._queue: deque[object] = deque()
        self._wakers: set[asyncio.Task[None]] = set()

    @property
    def free(self) -> int:
        return self._free

    def _check(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.total:
            raise ValueError(f"cores must be between 1 and {self.total}, got {n!r}")

    def try_acquire(self, n: int = 1) -> bool:
        """Take `n` cores now if they are free and nobody is waiting (never jumps the line)."""
        self._check(n)
        if self._queue or self._free < n:
            return False
        self._free -= n
        return True

    async def acquire(self, n: int = 1) -> None:
        """Wait until `n` cores are free and this caller is first in line, then take them."""
        self._check(n)
        ticket = object()
        async with self._cond:
            self._queue.append(ticket)
            try:
                await self._cond.wait_for(lambda: self._queue[0] is ticket and self._free >= n)
            except BaseException:  # cancelled: step out of line and let the next one look
                self._queue.remove(ticket)
                self._cond.notify_all()
                raise
            self._queue.popleft()
            self._free -= n
            self._cond.notify_all()  # the next in line may fit in what is left

    def release(self, n: int = 1) -> None:
        """Give back `n` cores. Synchronous, so it cannot be lost to a cancellation in a
        `finally`; waiters are woken by a task."""
        self._check(n)
        if self._free + n > self.total:
            raise ValueError(f"releasing {n} cores, but only {self.total - self._free} are taken")
        self._free += n
        if not self._queue:
            return  # nobody to wake
        task = asyncio.get_running_loop().create_task(self._wake())
        self._wakers.add(task)
        task.add_done_callback(self._wakers.discard)

    async def _wake(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def hold(self, n: int = 1) -> AsyncIterator[None]:
        await self.acquire(n)
        try:
            yield
        finally:
            self.release(n)


# ---------------------------------------------------------------------------------------------
# Checking what was sent


def _check_spec(spec: JobSpec) -> None:
    for what, name in (("build id", spec.build_id), ("job name", spec.job)):
        try:
            check_name(name, what)
        except PlanError as exc:
            raise JobError(str(exc)) from None
    for what, value, least in (("attempt", spec.attempt, 0), ("cores", spec.cores, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise JobError(f"{what}: must be an integer >= {least}, got {value!r}")
    timeout = spec.timeout
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise JobError(f"timeout: must be a number of seconds > 0, got {timeout!r}")
    _argv(spec.cmd)
    for key, value in spec.env.items():
        if not isinstance(key, str) or not _ENV_NAME_RE.fullmatch(key):
            raise JobError(f"env: {key!r} is not a valid environment variable name")
        if not isinstance(value, str) or "\x00" in value:
            raise JobError(f"env.{key}: must be a string without NUL")


def _argv(cmd: object) -> list[str]:
    if isinstance(cmd, str):
        if not cmd.strip() or "\x00" in cmd:
            raise JobError("cmd: must be a non-empty command without NUL")
        return ["/bin/sh", "-c", cmd]
    if isinstance(cmd, tuple | list) and cmd and all(isinstance(word, str) for word in cmd):
        if not cmd[0] or any("\x00" in word for word in cmd):
            raise JobError("cmd: the program name must not be empty, nor any word hold NUL")
        return list(cmd)
    raise JobError(f"cmd: must be a string or a non-empty list of strings, got {cmd!r}")


def _relative(path: object, where: str) -> str:
    """A path relative to the job directory, normalised; never leaving it or inside META."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise JobError(f"{where}: not a path: {path!r}")
    pure = PurePosixPath(path)
    if pure.is_absolute():
        raise JobError(f"{where}: {path!r} is absolute; paths are relative to the job directory")
    if ".." in pure.parts:
        raise JobError(f"{where}: {path!r} would leave the job directory")
    if not pure.parts:
        raise JobError(f"{where}: {path!r} names the job directory itself")
    if pure.parts[0] == META:
        raise JobError(f"{where}: {path!r} is inside {META}/, which the executor reserves")
    return str(pure)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a == b or os.path.samefile(a, b)
    except OSError:
        return False


def _staging(
    inputs: Iterable[Staged], deps: Mapping[str, Iterable[Staged]]
) -> dict[str, tuple[Path, str]]:
    """relpath -> (source, who provides it). Two providers of one path must give the same
    file (in a content store: the same object), and no path may be both a file and a
    directory."""
    files: dict[str, tuple[Path, str]] = {}
    groups = [("input", inputs)] + [(f"dependency '{name}'", items) for name, items in deps.items()]
    for origin, items in groups:
        for item in items:
            if not isinstance(item, tuple | list) or len(item) != 2:
                raise JobError(f"{origin}: expected (relative path, source), got {item!r}")
            rel = _relative(item[0], origin)
            source = Path(item[1])
            if rel in files:
                other_source, other = files[rel]
                if _same_file(other_source, source):
                    continue
                both = f"twice by {origin}" if other == origin else f"by both {other} and {origin}"
                raise JobError(f"conflict: '{rel}' is staged {both}, with different files")
            files[rel] = (source, origin)
    dirs: dict[str, str] = {}
    for rel, (_, origin) in files.items():
        for parent in PurePosixPath(rel).parents[:-1]:
            dirs.setdefault(str(parent), origin)
    for rel, (_, origin) in files.items():
        if rel in dirs:
            raise JobError(
                f"conflict: '{rel}' is a file from {origin} and a directory of files from "
                f"{dirs[rel]}"
            )
    return files


# ---------------------------------------------------------------------------------------------
# The job directory


def _remove_tree(path: Path) -> None:
    """rmtree that also empties read-only directories (Go's module cache makes them), and
    leaves alone what another remover took first (the executor and a sweep in its thread)."""

    def retry(func: Callable[[str], object], failed: str, _exc: object) -> None:
        if func not in (os.rmdir, os.unlink):  # (a lookup that failed: os.open, os.lstat,
            return  # os.scandir of something gone; retrying those takes other arguments)
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed), 0o700)
            func(failed)

    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, onerror=retry)


def _remove_bare(job_dir: Path) -> bool:
    """Remove a job directory holding only what the executor made (its log, an empty TMPDIR)
    at once, without a thread; False (nothing removed) when it holds anything else. (Plain
    strings: this runs once per job.)"""
    top = os.fspath(job_dir)
    meta = f"{top}/{META}"
    if os.listdir(top) != [META] or sorted(os.listdir(meta)) != [KEPT, LOG_NAME, "tmp"]:
        return False
    if os.listdir(f"{meta}/tmp"):
        return False
    os.unlink(f"{meta}/{LOG_NAME}")
    os.unlink(f"{meta}/{KEPT}")
    os.rmdir(f"{meta}/tmp")
    os.rmdir(meta)
    os.rmdir(top)
    return True


def _prune_parents(job_dir: Path) -> None:
    """Remove the job's directory, then the build's, if empty (another attempt or job still
    there: left alone)."""
    for level in (job_dir.parent, job_dir.parent.parent):
        try:
            os.rmdir(level)
        except OSError:
            return


def _make_level(level: Path) -> None:
    try:
        os.mkdir(level)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(level).st_mode):
            raise JobError(f"{level} is not a directory (a symlink?): refusing to run "
                           "a job through it") from None


#: Tries at making a job directory whose empty parents a sweep or another job's clean-up may
#: remove between the mkdirs (each try starts from the root again).
_MKDIR_TRIES = 3


def _fresh_dir(root: Path, spec: JobSpec, stale: bool = True) -> Path:
    """ROOT/BUILD/JOB/ATTEMPT and its META/tmp, new (`root`: resolved, existing). BUILD and JOB
    must be directories, not symlinks (a job could plant one to have a later job's directory
    made elsewhere): checked with one lstat each instead of resolving the whole path."""
    job_dir = root / spec.build_id / spec.job / str(spec.attempt)
    for tries_left in reversed(range(_MKDIR_TRIES)):
        try:
            for level in (job_dir.parent.parent, job_dir.parent):
                _make_level(level)
            if stale:  # a run of this attempt that died with the node
                _remove_tree(job_dir)
            os.mkdir(job_dir)
            break
        except FileNotFoundError:  # an empty parent was removed meanwhile: again
            if not tries_left:
                raise
    meta = f"{job_dir}/{META}"
    os.mkdir(meta)
    os.mkdir(f"{meta}/tmp")
    return job_dir


def _link_or_copy(source: Path, target: Path, st: os.stat_result) -> None:
    if not st.st_mode & 0o222:  # read-only: a link cannot be written through by accident
        try:
            os.link(source, target)
            return
        except OSError:  # another file system, or links not allowed: copy
            pass
    shutil.copy2(source, target)


def _stage(job_dir: Path, files: Mapping[str, tuple[Path, str]]) -> dict[str, _Mark]:
    marks: dict[str, _Mark] = {}
    for rel, (source, origin) in files.items():
        target = job_dir / rel
        try:
            st = os.stat(source)
            if not stat.S_ISREG(st.st_mode):
                raise JobError(f"cannot stage '{rel}' from {origin}: {source} is not a file")
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.parent.resolve().is_relative_to(job_dir):
                raise JobError(f"cannot stage '{rel}' from {origin}: it leads outside the job")
            _link_or_copy(source, target, st)
            marks[rel] = _Mark.of(target.lstat())
        except OSError as exc:
            why = NO_SPACE if _no_space(exc) else exc.strerror or exc
            raise JobError(f"cannot stage '{rel}' from {origin} ({source}): {why}") from None
    return marks


def job_env(spec: JobSpec, job_dir: Path, path: str = DEFAULT_PATH,
            node: str = "") -> dict[str, str]:
    """A small fixed base, then the job's env, then what the executor decides: which build,
    job and attempt this is and on which node (a job's log or outputs can say so), and the
    cores given, which the job cannot raise (MAKEFLAGS=-jN keeps make within them)."""
    env = {
        "PATH": path,
        "HOME": str(job_dir),
        "LANG": "C.UTF-8",
        "TMPDIR": str(job_dir / META / "tmp"),
    }
    env.update(spec.env)
    env.update(
        SWARMNODE_JOB=spec.job,
        SWARMNODE_BUILD=spec.build_id,
        SWARMNODE_ATTEMPT=str(spec.attempt),
        SWARMNODE_CORES=str(spec.cores),
        MAKEFLAGS=f"-j{spec.cores}",
    )
    if node:
        env["SWARMNODE_NODE"] = node
    return env


# ---------------------------------------------------------------------------------------------
# Output patterns


def _pattern_parts(pattern: str) -> tuple[str, ...]:
    parts = PurePosixPath(pattern).parts
    return (*parts, "*") if parts[-1] == "**" else parts  # `dir/**`: everything below dir


def _closure(parts: Sequence[str], states: Iterable[int]) -> frozenset[int]:
    """Add the states reached by letting each `**` match no directory at all."""
    out = set()
    for state in states:
        out.add(state)
        while state < len(parts) and parts[state] == "**":
            state += 1
            out.add(state)
    return frozenset(out)


def _advance(parts: Sequence[str], states: frozenset[int], name: str) -> frozenset[int]:
    nxt = set()
    for state in states:
        if state == len(parts):
            continue
        if parts[state] == "**":
            nxt.add(state)
        elif fnmatch.fnmatchcase(name, parts[state]):
            nxt.add(state + 1)
    return _closure(parts, nxt)


def match_output(pattern: str, path: str) -> bool:
    """Whether an output pattern matches a relative path (as collection does)."""
    parts = _pattern_parts(pattern)
    states = _closure(parts, {0})
    for name in PurePosixPath(path).parts:
        states = _advance(parts, states, name)
    return len(parts) in states


def _find(job_dir: Path, pattern: str) -> tuple[list[str], list[str]]:
    """Non-directories matching `pattern`, and the symlinked directories not walked into."""
    parts = _pattern_parts(pattern)
    hits: list[str] = []
    skipped: list[str] = []
    stack = [("", _closure(parts, {0}))]
    while stack:
        rel, states = stack.pop()
        try:
            with os.scandir(job_dir / rel) as entries:
                listed = list(entries)
        except OSError:
            continue
        for entry in listed:
            if not rel and entry.name == META:
                continue
            nxt = _advance(parts, states, entry.name)
            if not nxt:
                continue
            path = f"{rel}/{entry.name}" if rel else entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            if len(parts) in nxt and not is_dir:
                hits.append(path)
            if any(state < len(parts) for state in nxt):
                if is_dir:
                    stack.append((path, nxt))
                elif entry.is_symlink() and os.path.isdir(entry.path):
                    skipped.append(path)
    return hits, skipped


def _digest(path: Path) -> tuple[str, int]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"'{path}' changed into something other than a file")
        return hashlib.file_digest(handle, "sha256").hexdigest(), st.st_size


def collect_outputs(
    job_dir: Path, patterns: Sequence[str], staged: Mapping[str, _Mark] | None = None
) -> tuple[Output, ...]:
    """The files the job produced matching `patterns`, sorted by path (see the module notes).
    Raises OutputError for symlinks leading outside, or when the patterns match nothing."""
    job_dir = job_dir.resolve()
    staged = staged or {}
    found: dict[str, Path] = {}
    refused: list[str] = []
    notes: list[str] = []
    for pattern in patterns:
        hits, skipped = _find(job_dir, pattern)
        produced, only_staged = 0, False
        for rel in hits:
            full = job_dir / rel
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                real = Path(os.path.realpath(full))
                if not real.is_relative_to(job_dir):
                    refused.append(f"'{rel}' is a symlink to {real}, outside the job directory")
                elif real.is_file():
                    found[rel] = real
                    produced += 1
            elif stat.S_ISREG(st.st_mode):
                if staged.get(rel) == _Mark.of(st):
                    only_staged = True
                    continue
                found[rel] = full
                produced += 1
        if not produced and only_staged:
            notes.append(f"'{pattern}' matched only files staged for the job")
        elif not produced and skipped:
            shown = ", ".join(f"'{path}'" for path in skipped[:3])
            notes.append(f"'{pattern}': symlinked directories are not followed ({shown})")
    if refused:
        raise OutputError("refused outputs: " + "; ".join(refused[:10]))
    if patterns and not found:
        listed = ", ".join(f"'{pattern}'" for pattern in patterns)
        raise OutputError(
            f"the declared outputs ({listed}) match no file the job produced"
            + ("".join(f"; {note}" for note in notes))
        )
    outputs = []
    for rel in sorted(found):
        try:
            digest, size = _digest(found[rel])
        except OSError as exc:
            raise OutputError(f"cannot read output '{rel}': {exc.strerror or exc}") from None
        outputs.append(Output(rel, digest, size))
    return tuple(outputs)


# ---------------------------------------------------------------------------------------------
# The log


def _no_space(exc: BaseException) -> bool:
    """Whether `exc` is a full file system (ENOSPC, or EDQUOT: the user's quota)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _create(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _Log:
    """The job's output in a file of at most `limit` bytes: all of it while it fits; past that
    the first `limit/8` bytes, a marker saying how much was dropped, and the last bytes (kept
    in two spill files used in turn while running, so memory stays small)."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = limit
        self.head = limit // 8
        self.half = (limit - self.head - _MARKER_ROOM) // 2
        self.total = 0
        self.tail = b""
        self.error: str | None = None
        self.no_space = False  # the error was ENOSPC
        self._fd: int | None = _create(path)
        self._spills = (path.with_name(f"{path.name}.0"), path.with_name(f"{path.name}.1"))
        self._spill_fd: int | None = None
        self._spill_index = 1
        self._spill_size = 0
        self._overflowed = False

    def write(self, data: bytes) -> None:
        self.total += len(data)
        self.tail = (self.tail + data)[-TAIL_BYTES:]
        if self._fd is None:
            return
        try:
            if self._overflowed:
                self._spill(data)
            elif self.total <= self.limit:
                _write_all(self._fd, data)
            else:
                self._overflow(self._fd, data)
        except OSError as exc:
            self._fail(exc)

    def _overflow(self, fd: int, data: bytes) -> None:
        written = self.total - len(data)
        if written < self.head:
            take = self.head - written
            _write_all(fd, data[:take])
            data = data[take:]
        else:
            middle = os.pread(fd, written - self.head, self.head)
            os.ftruncate(fd, self.head)
            os.lseek(fd, self.head, os.SEEK_SET)
            self._spill(middle)
        self._overflowed = True
        self._spill(data)

    def _spill(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._spill_fd is None or self._spill_size >= self.half:
                if self._spill_fd is not None:
                    os.close(self._spill_fd)
                    self._spill_fd = None
                self._spill_index ^= 1
                self._spill_fd = _create(self._spills[self._spill_index])  # drops the older
                self._spill_size = 0
            n = min(len(view), self.half - self._spill_size)
            _write_all(self._spill_fd, view[:n])
            self._spill_size += n
            view = view[n:]

    def close(self) -> None:
        fd = self._fd
        if fd is None:
            return
        try:
            if self._overflowed:
                self._close_spill()
                order = [self._spills[self._spill_index ^ 1], self._spills[self._spill_index]]
                order = [spill for spill in order if spill.exists()]
                kept = sum(spill.stat().st_size for spill in order)
                dropped = self.total - self.head - kept
                _write_all(
                    fd,
                    f"\n[swarmnode: {dropped} bytes of output dropped here; the log "
                    f"keeps the first {self.head} and the last {kept}]\n".encode(),
                )
                for spill in order:
                    with spill.open("rb") as handle:
                        while chunk := handle.read(1024 * 1024):
                            _write_all(fd, chunk)
        except OSError as exc:
            self._fail(exc)
        finally:
            self._close_spill()
            for spill in self._spills if self._overflowed else ():  # (only then made)
                with contextlib.suppress(OSError):
                    spill.unlink()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _close_spill(self) -> None:
        if self._spill_fd is not None:
            os.close(self._spill_fd)
            self._spill_fd = None

    def _fail(self, exc: OSError) -> None:
        self.no_space = _no_space(exc)
        self.error = f"writing the log failed: {NO_SPACE if self.no_space else exc.strerror or exc}"
        self._close_spill()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------------------------------------
# Processes


def _signal_group(pgid: int, sig: int) -> bool:
    """Signal the group; False when nobody is left in it."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_alive(pgid: int) -> bool:
    """Whether a process (not a zombie: it cannot write any more) is still in the group."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return _signal_group(pgid, 0)
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                data = handle.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2 :].split()  # the command name may hold anything
        if len(fields) > 2 and fields[0] != b"Z" and int(fields[2]) == pgid:
            return True
    return False


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    hint = {126: " (command not executable)", 127: " (command not found)"}.get(code, "")
    return f"exit code {code}{hint}"


# ---------------------------------------------------------------------------------------------
# The executor

StoreFn = Callable[[Path, Output], Awaitable[object]]

#: Start commands from a thread at a higher nice value (Linux: nice values are per thread).
_THREAD_NICE = sys.platform == "linux"


def _nice_thread(niceness: int) -> None:
    """Initializer of the thread that starts commands: lower its own priority (only it)."""
    tid = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness))


class _Child:
    """A started command (`pid` 0 and a fixed `returncode` for one that could not start),
    waited for through a pidfd in the event loop, else in a thread."""

    def __init__(self, popen: subprocess.Popen[bytes] | None, returncode: int | None = None):
        self._popen = popen
        self.pid = popen.pid if popen is not None else 0
        self._returncode = returncode
        self._exited: asyncio.Future[object] | None = None

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode if self._popen is not None else self._returncode

    async def wait(self) -> int:
        if self.returncode is None:
            if self._exited is None:
                self._exited = self._watch()
            await asyncio.shield(self._exited)
        code = self.returncode
        assert code is not None
        return code

    def _watch(self) -> asyncio.Future[object]:
        popen = self._popen
        assert popen is not None
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):  # no pidfds here
            return asyncio.ensure_future(asyncio.to_thread(popen.wait))
        exited = loop.create_future()

        def reap() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            popen.wait()  # at once: it has exited
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(fd, reap)
        return exited


def _kill_started(started: asyncio.Future[subprocess.Popen[bytes]]) -> None:
    """The command started after its job was cancelled: kill its group (it is reaped in a
    thread)."""
    if started.cancelled() or started.exception() is not None:
        return
    popen = started.result()
    _signal_group(popen.pid, signal.SIGKILL)
    threading.Thread(target=popen.wait, daemon=True).start()


def _after(total: int, tail: bytes, since: int) -> tuple[int, bytes]:
    """(total, the bytes of `tail`, the last of `total` written, after offset `since`)."""
    start = total - len(tail)
    return total, tail[max(0, since - start):] if since < total else b""


@dataclass(frozen=True, slots=True)
class EndedOutput:
    """A finished job's output as `RunningJob.output` gave it: its length and last bytes."""

    total: int
    tail: bytes
    done = True

    def output(self, since: int = 0) -> tuple[int, bytes]:
        return _after(self.total, self.tail, since)

    async def output_after(self, since: int, timeout: float) -> tuple[int, bytes]:
        return self.output(since)  # (nothing more will come)


class RunningJob:
    """A job started by `Executor.start`: wait for it, follow its output, or cancel it."""

    def __init__(
        self,
        executor: Executor,
        spec: JobSpec,
        inputs: Iterable[Staged],
        deps: Mapping[str, Iterable[Staged]],
        keep: bool,
        store: StoreFn | None,
    ) -> None:
        self.spec = spec
        self.job_dir: Path | None = None
        self._executor = executor
        self._inputs = inputs
        self._deps = deps
        self._keep = keep
        self._store = store
        self._stop = asyncio.Event()
        self._stopped: Status | None = None
        self._log: _Log | None = None
        self._more = asyncio.Event()  # set on new output and at the end
        self._exit_code: int | None = None
        self._duration = 0.0
        self._finished = False
        self._task = asyncio.get_running_loop().create_task(self._main())

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.spec.build_id, self.spec.job, self.spec.attempt)

    @property
    def done(self) -> bool:
        return self._finished

    @property
    def log_path(self) -> Path | None:
        return self.job_dir / META / LOG_NAME if self.job_dir is not None else None

    def cancel(self) -> None:
        """Stop the job: SIGTERM to its process group, SIGKILL after the grace period. No
        effect once the command has ended (the result is then whatever it earned)."""
        self._stop.set()

    async def wait(self) -> JobResult:
        """The result; cancelling the caller does not cancel the job."""
        return await asyncio.shield(self._task)

    def output(self, since: int = 0) -> tuple[int, bytes]:
        """(bytes the job has written so far, those after offset `since` that are still held):
        the recent output is kept (the last TAIL_BYTES), so a reader that fell further behind
        gets all of it and sees the gap from the offsets."""
        log = self._log
        return (0, b"") if log is None else _after(log.total, log.tail, since)

    def ended(self) -> EndedOutput:
        """What `logs` still needs of this job once it has finished (a finished RunningJob
        holds its task, events, inputs and paths besides: ten times as much)."""
        total, tail = self.output()
        return EndedOutput(total, tail)

    async def output_after(self, since: int, timeout: float) -> tuple[int, bytes]:
        """`output(since)` as soon as there is output after `since` or the job has ended, or
        when `timeout` runs out (a long poll: `logs --follow` from another node)."""
        await until(self._more, lambda: self._finished or self.output(since)[1] != b"",
                    timeout)
        return self.output(since)

    # -- the run ------------------------------------------------------------------------------

    async def _main(self) -> JobResult:
        outputs: tuple[Output, ...] = ()
        try:
            status, reason, outputs = await self._attempt()
        except JobError as exc:
            status, reason = "error", str(exc)
        except OutputError as exc:
            status, reason = "failed", str(exc)
        except Exception as exc:  # the executor must outlive any job
            status, reason = "error", f"internal error: {exc!r}"
        finally:
            self._finished = True
            if self._log is not None:
                self._log.close()
            self._more.set()
            if self.job_dir is not None:  # (before it stops counting as running: see KEPT)
                with contextlib.suppress(OSError):
                    os.close(_create(self.job_dir / META / KEPT))
            if self._executor._active.get(self.key) is self:
                del self._executor._active[self.key]
        if status == "ok" and self._log is not None and self._log.no_space:
            status, outputs = "error", ()  # its log was cut short: not a clean success
        job_dir = self.job_dir
        if job_dir is not None and status == "ok" and not self._keep:
            with contextlib.suppress(OSError):  # if it stays, the result still names it
                if not _remove_bare(job_dir):  # left more than the executor's own files
                    await asyncio.to_thread(_remove_tree, job_dir)
                _prune_parents(job_dir)
            job_dir = job_dir if job_dir.exists() else None
        return self._result(status, reason, outputs, job_dir)

    async def _attempt(self) -> tuple[Status, str, tuple[Output, ...]]:
        executor, spec = self._executor, self.spec
        if executor._active.get(self.key) is not self:
            raise JobError(f"attempt {spec.attempt} of {spec.build_id}/{spec.job} is running")
        _check_spec(spec)
        files = _staging(self._inputs, self._deps)
        patterns = [_relative(pattern, "outputs") for pattern in spec.outputs]
        # A few mkdirs are made at once (a thread hop costs more); removing a stale directory
        # and staging files take a thread.
        root = executor.resolved_root()
        stale = os.path.lexists(root / spec.build_id / spec.job / str(spec.attempt))
        try:
            if stale:
                self.job_dir = await asyncio.to_thread(_fresh_dir, root, spec)
            else:
                self.job_dir = _fresh_dir(root, spec, stale=False)
            self._log = _Log(self.job_dir / META / LOG_NAME, executor.log_limit)
        except OSError as exc:
            why = NO_SPACE if _no_space(exc) else exc
            raise JobError(f"cannot make the job directory: {why}") from None
        marks = await asyncio.to_thread(_stage, self.job_dir, files) if files else {}
        if not await self._acquire():
            return "cancelled", "cancelled before it started", ()
        try:
            await self._execute(self.job_dir)
        finally:
            if executor.slots is not None:
                executor.slots.release(spec.cores)
        if self._stopped == "cancelled":
            return "cancelled", "cancelled; its process group was killed", ()
        if self._stopped == "timed_out":
            killed = f"timed out after {spec.timeout:g} s; its process group was killed"
            return "timed_out", killed, ()
        code = self._exit_code
        if code != 0:
            return "failed", _exit_reason(code) if code is not None else "no exit status", ()
        outputs = (await asyncio.to_thread(collect_outputs, self.job_dir, patterns, marks)
                   if patterns else ())
        if self._store is not None:
            for output in outputs:
                try:
                    await self._store(self.job_dir / output.path, output)
                except Exception as exc:
                    why = NO_SPACE if _no_space(exc) else repr(exc)
                    return "error", f"storing output '{output.path}' failed: {why}", outputs
        return "ok", "", outputs

    async def _acquire(self) -> bool:
        """Take the job's cores, unless it is cancelled first."""
        slots = self._executor.slots
        if self._stop.is_set():
            return False
        if slots is None:
            return True
        if self.spec.cores > slots.total:
            raise JobError(f"the job needs {self.spec.cores} cores, this node has {slots.total}")
        if slots.try_acquire(self.spec.cores):  # the usual case: free, and nobody waiting
            return True
        getting = asyncio.ensure_future(slots.acquire(self.spec.cores))
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({getting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            getting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await getting
        got = not getting.cancelled() and getting.exception() is None
        if got and self._stop.is_set():
            slots.release(self.spec.cores)
            return False
        return got

    def _argv(self) -> list[str]:
        argv = _argv(self.spec.cmd)
        executor = self._executor
        if executor.niceness and executor.nice_program:
            return [executor.nice_program, "-n", str(executor.niceness), "--", *argv]
        return argv

    async def _start(self, job_dir: Path, write_fd: int) -> _Child:
        """Start the command (from the executor's niced thread) writing to `write_fd`."""
        executor = self._executor
        argv = self._argv()
        spawn = functools.partial(
            subprocess.Popen, argv, cwd=job_dir, env=job_env(self.spec, job_dir, executor.path,
                                                              executor.node),
            stdin=subprocess.DEVNULL, stdout=write_fd, stderr=write_fd, start_new_session=True)
        started = asyncio.get_running_loop().run_in_executor(executor._spawner(), spawn)
        try:
            return _Child(await asyncio.shield(started))
        except asyncio.CancelledError:  # it starts anyway: stop it, and reap it
            started.add_done_callback(_kill_started)
            raise
        except OSError as exc:
            if exc.filename != argv[0] or not isinstance(exc, FileNotFoundError | PermissionError):
                raise JobError(f"cannot start the command: {exc}") from None
            # as a shell (or `nice`) has it: a failure with its exit status, not an error
            found = isinstance(exc, PermissionError)
            what = "permission denied" if found else "command not found"
            self._emit(f"swarmnode: {argv[0]}: {what}\n".encode())
            return _Child(None, 126 if found else 127)

    async def _execute(self, job_dir: Path) -> None:
        # Our own pipe rather than asyncio's: its wait() also waits for its pipes to close, so
        # a straggler holding the output open would hide that the job itself has ended.
        read_fd, write_fd = os.pipe()
        # Before the spawn: the child runs from the fork on, and a loaded machine may not give
        # this loop the CPU back for a while (a `sleep 0.3` was measured at 0.299 s).
        began = time.monotonic()
        try:
            proc = await self._start(job_dir, write_fd)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        pump = asyncio.ensure_future(self._pump(read_fd))
        try:
            ended = asyncio.ensure_future(proc.wait())
            stopping = asyncio.ensure_future(self._stop.wait())
            done, _ = await asyncio.wait(
                {ended, stopping}, timeout=self.spec.timeout, return_when=asyncio.FIRST_COMPLETED
            )
            stopping.cancel()
            if ended not in done:
                self._stopped = "cancelled" if self._stop.is_set() else "timed_out"
                await self._terminate(proc)
            self._exit_code = await proc.wait()
        finally:
            self._duration = time.monotonic() - began
            if proc.returncode is None:  # we are being cancelled ourselves
                _signal_group(proc.pid, signal.SIGKILL)
                await proc.wait()
            if proc.pid:
                await self._sweep(proc.pid)
            await self._drain(pump)

    async def _terminate(self, proc: _Child) -> None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(self._executor.grace):
                await proc.wait()
        except TimeoutError:
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def _sweep(self, pgid: int) -> None:
        """Kill what is left of the job's process group and wait until it is gone."""
        if not _signal_group(pgid, signal.SIGKILL):
            return
        deadline = time.monotonic() + max(self._executor.grace, 1.0)
        while _group_alive(pgid) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _drain(self, pump: asyncio.Future[None]) -> None:
        """Read the rest of the output; a process that left the group may hold the pipe open
        forever, so give up after the grace period."""
        try:
            async with asyncio.timeout(self._executor.grace):
                await pump
        except TimeoutError:
            self._emit(
                b"\n[swarmnode: stopped reading: the output stayed open after the job "
                b"ended (a process left its process group?)]\n"
            )

    async def _pump(self, fd: int) -> None:
        """Copy the output pipe to the log until its end (a reader callback: no stream or
        transport objects per job)."""
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            try:
                chunk = os.read(fd, _CHUNK)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if chunk:
                self._emit(chunk)
            elif not ended.done():
                ended.set_result(None)

        try:
            os.set_blocking(fd, False)
            loop.add_reader(fd, readable)
            await ended
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    def _emit(self, chunk: bytes) -> None:
        if self._log is not None:
            self._log.write(chunk)
        self._more.set()

    def _result(
        self, status: Status, reason: str, outputs: tuple[Output, ...], job_dir: Path | None
    ) -> JobResult:
        spec, log = self.spec, self._log
        if log is not None and log.error:
            reason = f"{reason} ({log.error})" if reason else log.error
        return JobResult(
            build_id=spec.build_id,
            job=spec.job,
            attempt=spec.attempt,
            status=status,
            reason=reason,
            exit_code=self._exit_code,
            duration=self._duration,
            outputs=outputs,
            job_dir=job_dir,
            log_path=job_dir / META / LOG_NAME if job_dir is not None else None,
            log_tail=log.tail.decode("utf-8", "replace") if log is not None else "",
        )


class Executor:
    """Runs jobs under `root`; with `slots`, each job first takes its cores from them."""

    def __init__(
        self,
        root: Path,
        *,
        slots: Slots | None = None,
        niceness: int = NICENESS,
        grace: float = GRACE_S,
        log_limit: int = LOG_LIMIT,
        path: str = DEFAULT_PATH,
        node: str = "",
    ) -> None:
        if log_limit < 4096:
            raise ValueError(f"log_limit must be at least 4096 bytes, got {log_limit}")
        self.root = Path(root)
        self.slots = slots
        self.niceness = niceness
        self.nice_program = shutil.which("nice") if niceness and not _THREAD_NICE else None
        self._pool: ThreadPoolExecutor | None = None
        self.grace = grace
        self.log_limit = log_limit
        self.path = path
        self.node = node  # the id of the node running the jobs (SWARMNODE_NODE), if any
        self._active: dict[tuple[str, str, int], RunningJob] = {}
        self._resolved: Path | None = None

    def resolved_root(self) -> Path:
        """`root`, made and resolved once (job directories are checked against it)."""
        if self._resolved is None or not self._resolved.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            self._resolved = self.root.resolve()
        return self._resolved

    def _spawner(self) -> ThreadPoolExecutor:
        """The thread commands are started from (at +niceness where that is per thread)."""
        if self._pool is None:
            nice = self.niceness if _THREAD_NICE and self.niceness else 0
            self._pool = ThreadPoolExecutor(1, "swarmnode-jobs", _nice_thread, (nice,))
        return self._pool

    def start(
        self,
        spec: JobSpec,
        inputs: Iterable[Staged] = (),
        deps: Mapping[str, Iterable[Staged]] | None = None,
        *,
        keep: bool = False,
        store: StoreFn | None = None,
    ) -> RunningJob:
        """Start a job; never raises for a bad one (its result says what is wrong).

        `inputs` and each of `deps` (by dependency job name) are `(relative path, source)`
        pairs. `store(path, output)` is awaited for each output of a successful job, before
        its directory is removed (unless `keep`)."""
        job = RunningJob(self, spec, inputs, deps or {}, keep, store)
        self._active.setdefault(job.key, job)
        return job

    async def run(
        self,
        spec: JobSpec,
        inputs: Iterable[Staged] = (),
        deps: Mapping[str, Iterable[Staged]] | None = None,
        *,
        keep: bool = False,
        store: StoreFn | None = None,
    ) -> JobResult:
        """`start` and wait."""
        return await self.start(spec, inputs, deps, keep=keep, store=store).wait()

    def running(self, build_id: str, job: str) -> RunningJob | None:
        """The latest running attempt of a job, to follow its output."""
        attempts = [run for key, run in self._active.items() if key[:2] == (build_id, job)]
        return max(attempts, key=lambda run: run.spec.attempt, default=None)

    async def discard(self, result: JobResult) -> None:
        """Remove a kept job directory (once its log is no longer wanted)."""
        job_dir = result.job_dir
        if job_dir is None or not job_dir.resolve().is_relative_to(self.resolved_root()):
            return
        await asyncio.to_thread(_remove_tree, job_dir)
        _prune_parents(job_dir)

    def busy(self, key: tuple[str, str, int]) -> bool:
        """Whether the attempt `key` (build, job, attempt) runs here now (its directory is in
        use). Safe to call from a thread (one dict lookup)."""
        return key in self._active


# ---------------------------------------------------------------------------------------------
# Retention of job directories


@dataclass(frozen=True)
class Retention:
    """How many kept job directories a node keeps, how long and how many bytes of them."""

    keep: int
    age: float  # seconds
    max_bytes: int


@dataclass(frozen=True)
class SweepResult:
    removed: int  # attempt directories removed
    freed: int  # bytes they used on disk
    leftovers: int  # of them, unmarked ones no run held (their run died with the node)
    empty: int  # empty job and build directories removed

    def __bool__(self) -> bool:
        return bool(self.removed or self.empty)


def _disk_bytes(path: Path) -> int:
    """Bytes on disk under `path` (allocated blocks; symlinks not followed)."""
    total = 0
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(top, name)).st_blocks * 512
    return total


def _subdirs(path: Path) -> list[Path]:
    """The directories in `path` (never through a symlink)."""
    try:
        return [Path(e.path) for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def sweep_job_dirs(root: Path, busy: Callable[[tuple[str, str, int]], bool],
                   retention: Retention, now: float, everything: bool = False) -> SweepResult:
    """Apply `retention` to the kept attempt directories under `root` (BUILD/JOB/ATTEMPT):
    the newest `keep` younger than `age` stay while together under `max_bytes`; remove
    unmarked ones (a run that died with the node), and empty job and build directories.
    `everything`: every directory no run holds goes (the disk is nearly full). Runs in a
    thread: a directory's run is asked (`busy`) just before it is removed."""
    kept: list[tuple[float, Path, int]] = []  # (when kept, directory, bytes)
    removed = freed = leftovers = empty = 0

    def remove(path: Path, size: int) -> None:
        nonlocal removed, freed
        _remove_tree(path)
        removed, freed = removed + 1, freed + size

    for build in _subdirs(root):
        for job in _subdirs(build):
            for attempt in _subdirs(job):
                if not attempt.name.isdigit():
                    continue
                if busy((build.name, job.name, int(attempt.name))):
                    continue
                try:  # (after asking: a run marks its directory before it stops being busy)
                    when: float | None = os.stat(attempt / META / KEPT).st_mtime
                except OSError:
                    when = None
                if when is None:
                    leftovers += 1
                    remove(attempt, _disk_bytes(attempt))
                else:
                    kept.append((when, attempt, _disk_bytes(attempt)))
    total = 0
    for i, (when, path, size) in enumerate(sorted(kept, reverse=True)):
        if (everything or i >= retention.keep or now - when > retention.age
                or total + size > retention.max_bytes):
            remove(path, size)
        else:
            total += size
    for build in _subdirs(root):
        for job in _subdirs(build):
            with contextlib.suppress(OSError):
                os.rmdir(job)
                empty += 1
        with contextlib.suppress(OSError):
            os.rmdir(build)
            empty += 1
    return SweepResult(removed, freed, leftovers, empty)


__all__ = [
    "DEFAULT_PATH",
    "EndedOutput",
    "Executor",
    "JobResult",
    "JobSpec",
    "Output",
    "Retention",
    "RunningJob",
    "Slots",
    "Status",
    "SweepResult",
    "collect_outputs",
    "job_env",
    "match_output",
    "sweep_job_dirs",
]
