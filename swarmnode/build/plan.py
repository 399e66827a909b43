"""Build plans: a TOML file of jobs, their files, their dependencies and where they may run.

A plan looks like this (paths in `inputs` are relative to the plan file's directory, `outputs`
are glob patterns relative to the job's own directory on the node that runs it)::

    name = "hello"

    [jobs.compile]
    cmd = "cc -c hello.c"
    inputs = ["hello.c"]
    outputs = ["*.o"]
    requires = { arch = "x86_64", cores = 1 }
    estimate = 2.5

    [jobs.link]
    cmd = ["cc", "-o", "hello", "hello.o"]
    deps = ["compile"]
    outputs = ["hello"]

Validation is strict and every error names the offending field as a TOML path (for instance
`jobs.link.deps[0]: unknown job 'compil' (did you mean 'compile'?)`), because a plan is sent to
other machines and a mistake found there costs a round trip and is harder to read. Job names
become directory names on the nodes, so they are restricted to a portable file-name alphabet,
and no path may leave the plan directory (inputs) or the job directory (outputs).
"""

from __future__ import annotations

import difflib
import heapq
import json
import math
import re
import tomllib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path, PurePosixPath

from swarmnode.facts import KINDS

MAX_JOBS = 100_000
MAX_ITEMS = 10_000  # entries in any one list (inputs, outputs, deps, tags, argv) or in env
MAX_EDGES = 1_000_000  # dependency edges in the whole plan
MAX_TEXT = 64 * 1024 * 1024  # bytes of plan text
MAX_NAME = 200  # characters in a job or plan name (file systems allow 255 bytes)
MAX_STRING = 100_000  # characters in a command, path, pattern or env value
MAX_CORES = 4096
MAX_ESTIMATE = 1e9  # seconds (about 31 years): larger is surely a unit mistake
DEFAULT_ESTIMATE = 1.0

PLAN_KEYS = ("name", "jobs")
JOB_KEYS = ("cmd", "inputs", "outputs", "deps", "requires", "estimate", "env")
REQUIRES_KEYS = ("arch", "kind", "tags", "cores")

# Names people reach for that difflib would not match to ours.
_ALIASES = {
    "command": "cmd",
    "run": "cmd",
    "script": "cmd",
    "input": "inputs",
    "files": "inputs",
    "sources": "inputs",
    "output": "outputs",
    "artifacts": "outputs",
    "depends": "deps",
    "depends_on": "deps",
    "dependencies": "deps",
    "after": "deps",
    "require": "requires",
    "requirements": "requires",
    "needs": "requires",
    "time": "estimate",
    "duration": "estimate",
    "cost": "estimate",
    "environment": "env",
    "architecture": "arch",
    "cpus": "cores",
    "cpu": "cores",
    "threads": "cores",
    "tag": "tags",
    "labels": "tags",
    "title": "name",
    "job": "jobs",
    "tasks": "jobs",
}

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class PlanError(ValueError):
    """A plan that cannot be built; the message starts with the path of the bad field."""


@dataclass(frozen=True)
class Requires:
    """What a node must offer to run a job; None and empty mean "any"."""

    arch: str | None = None
    kind: str | None = None
    tags: frozenset[str] = frozenset()
    cores: int = 1


@dataclass(frozen=True)
class Job:
    """One command run on one node, with the files it is sent and the files it yields."""

    name: str
    cmd: str | tuple[str, ...]  # a string runs under `sh -c`, a tuple is an argv
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    deps: tuple[str, ...] = ()
    requires: Requires = Requires()
    estimate: float = DEFAULT_ESTIMATE
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """A named set of jobs; `base_dir` is where inputs are read from, when known."""

    name: str
    jobs: dict[str, Job]
    base_dir: Path | None = None


# ---------------------------------------------------------------------------------------------
# Messages


def _show(value: object) -> str:
    """A value as the user wrote it in TOML, for "got ..." in messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 60 else text[:56] + '..."'
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict | Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, datetime | date | time):
        return f"a date/time ({value.isoformat()})"
    return type(value).__name__


def _key(name: str) -> str:
    """A key as it must be written in a dotted TOML path (quoted when not a bare key)."""
    return name if _BARE_KEY_RE.fullmatch(name) else json.dumps(name, ensure_ascii=False)


def _job_path(name: str) -> str:
    return f"jobs.{_key(name)}"


def _suggest(word: str, choices: Collection[str]) -> str:
    """' (did you mean 'x'?)' for a near miss, else ''."""
    if word in _ALIASES and _ALIASES[word] in choices:
        return f" (did you mean '{_ALIASES[word]}'?)"
    if len(choices) > 10_000:  # difflib is quadratic-ish; not worth seconds on an error path
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _fail(where: str, problem: str) -> PlanError:
    return PlanError(f"{where}: {problem}")


def _check_keys(
    table: Mapping[str, object], allowed: Sequence[str], where: str, *, job: str | None = None
) -> None:
    for key in table:
        if key in allowed:
            continue
        hint = _suggest(key, allowed)
        if not hint and job is not None and isinstance(table[key], dict):
            # `[jobs.gcc-13.2]` is parsed by TOML as job "gcc-13" with a sub-table "2".
            dotted = f"{job}.{key}"
            hint = f' (a job name containing "." must be quoted: [jobs."{dotted}"])'
        raise _fail(where, f"unknown key '{key}'{hint}")


# ---------------------------------------------------------------------------------------------
# Field parsers: each takes what TOML gave (or a typed field turned back into TOML shapes) and
# returns the typed value, or raises PlanError naming `where`.


def _string(
    value: object, where: str, *, what: str = "a non-empty string", empty: bool = False
) -> str:
    if not isinstance(value, str) or not (value or empty):
        raise _fail(where, f"must be {what}, got {_show(value)}")
    if len(value) > MAX_STRING:
        raise _fail(where, f"is longer than {MAX_STRING} characters")
    if "\x00" in value:
        raise _fail(where, "must not contain a NUL character")
    return value


def _array(value: object, where: str, what: str) -> list[object]:
    if not isinstance(value, list | tuple):
        raise _fail(where, f"must be an array of {what}, got {_show(value)}")
    if len(value) > MAX_ITEMS:
        raise _fail(where, f"has {len(value)} entries, more than the limit of {MAX_ITEMS}")
    return list(value)


def check_name(value: object, where: str) -> str:
    """A job or plan name: it becomes a directory name, so only [A-Za-z0-9._+-]."""
    name = _string(value, where)
    if len(name) > MAX_NAME:
        raise _fail(where, f"name is longer than {MAX_NAME} characters")
    if not NAME_RE.fullmatch(name):
        raise _fail(
            where,
            f"invalid name {_show(name)}: use only letters, digits and . _ + - "
            "and start with a letter, digit or _ (names become directory names)",
        )
    return name


def _relative(value: object, where: str, *, escape: str) -> str:
    """A relative POSIX path or pattern that stays inside its directory, normalised."""
    text = _string(value, where, what="a non-empty string (a relative path)")
    if text.startswith(("/", "\\")) or re.match(r"[A-Za-z]:[\\/]", text):
        raise _fail(where, f"must be a relative path, got absolute {_show(text)}")
    parts = PurePosixPath(text).parts
    if ".." in parts:
        raise _fail(where, f"must not contain '..' (it would leave {escape}), got {_show(text)}")
    normal = str(PurePosixPath(*parts))
    if normal == ".":
        raise _fail(where, f"must name something inside {escape}, got {_show(text)}")
    return normal


def _cmd(value: object, where: str) -> str | tuple[str, ...]:
    if isinstance(value, str):
        if not value.strip():
            raise _fail(where, "must not be empty")
        return _string(value, where)
    if isinstance(value, list | tuple):
        argv = _array(value, where, "strings")
        if not argv:
            raise _fail(where, "must not be an empty array")
        words = tuple(
            _string(word, f"{where}[{i}]", what="a string", empty=True)
            for i, word in enumerate(argv)
        )
        if not words[0]:
            raise _fail(f"{where}[0]", "the program name must not be empty")
        return words
    raise _fail(where, f"must be a string (run by sh -c) or an array (an argv), got {_show(value)}")


def _paths(value: object, where: str, *, escape: str) -> tuple[str, ...]:
    seen: dict[str, int] = {}
    for i, item in enumerate(_array(value, where, "relative paths")):
        path = _relative(item, f"{where}[{i}]", escape=escape)
        if path in seen:
            raise _fail(f"{where}[{i}]", f"duplicate of {where}[{seen[path]}] ({_show(path)})")
        seen[path] = i
    return tuple(seen)


def _existing_inputs(inputs: Sequence[str], base_dir: Path, where: str) -> None:
    """Inputs must be regular files inside base_dir, also after following symlinks."""
    root = base_dir.resolve()
    for i, rel in enumerate(inputs):
        spot = f"{where}[{i}]"
        try:
            real = (root / rel).resolve(strict=True)
        except (OSError, RuntimeError):
            raise _fail(spot, f"no such file: {root / rel}") from None
        if not real.is_relative_to(root):
            raise _fail(spot, f"{_show(rel)} leads outside the plan directory (to {real})")
        if not real.is_file():
            raise _fail(spot, f"{_show(rel)} is not a regular file (list the files to send)")


def _deps(value: object, where: str, job: str, known: Collection[str]) -> tuple[str, ...]:
    seen: dict[str, int] = {}
    for i, item in enumerate(_array(value, where, "job names")):
        spot = f"{where}[{i}]"
        dep = _string(item, spot, what="a job name")
        if dep == job:
            raise _fail(spot, "a job cannot depend on itself")
        if dep not in known:
            raise _fail(spot, f"unknown job '{dep}'{_suggest(dep, known)}")
        if dep in seen:
            raise _fail(spot, f"duplicate of {where}[{seen[dep]}] ('{dep}')")
        seen[dep] = i
    return tuple(seen)


def _cores(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(where, f"must be an integer >= 1, got {_show(value)}")
    if value > MAX_CORES:
        raise _fail(where, f"must be at most {MAX_CORES}, got {value}")
    return value


def _requires(value: object, where: str) -> Requires:
    if not isinstance(value, dict | Mapping):
        raise _fail(where, f"must be a table, got {_show(value)}")
    _check_keys(value, REQUIRES_KEYS, where)
    arch = kind = None
    if "arch" in value:
        arch = _string(value["arch"], f"{where}.arch")
    if "kind" in value:
        kind = value["kind"]
        if kind not in KINDS:
            raise _fail(f"{where}.kind", f"must be one of {', '.join(KINDS)}, got {_show(kind)}")
    tags: frozenset[str] = frozenset()
    if "tags" in value:
        items = _array(value["tags"], f"{where}.tags", "strings")
        tags = frozenset(_string(t, f"{where}.tags[{i}]") for i, t in enumerate(items))
    cores = _cores(value["cores"], f"{where}.cores") if "cores" in value else 1
    return Requires(arch=arch, kind=kind, tags=tags, cores=cores)


def _estimate(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(where, f"must be a number of seconds > 0, got {_show(value)}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise _fail(where, f"must be a number of seconds > 0, got {_show(value)}")
    if seconds > MAX_ESTIMATE:
        raise _fail(where, f"must be at most {MAX_ESTIMATE:g} seconds, got {value}")
    return seconds


def _env(value: object, where: str) -> dict[str, str]:
    if not isinstance(value, dict | Mapping):
        raise _fail(where, f"must be a table of strings, got {_show(value)}")
    if len(value) > MAX_ITEMS:
        raise _fail(where, f"has {len(value)} entries, more than the limit of {MAX_ITEMS}")
    env: dict[str, str] = {}
    for key, item in value.items():
        spot = f"{where}.{_key(key)}"
        if not _ENV_NAME_RE.fullmatch(key):
            raise _fail(spot, "is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
        env[key] = _string(item, spot, what="a string", empty=True)
    return env


def _job(name: str, raw: object, known: Collection[str], base_dir: Path | None) -> Job:
    where = _job_path(name)
    check_name(name, where)
    if not isinstance(raw, dict | Mapping):
        raise _fail(where, f"must be a table, got {_show(raw)}")
    _check_keys(raw, JOB_KEYS, where, job=name)
    if "cmd" not in raw:
        raise _fail(where, "missing required key 'cmd'")
    inputs = _paths(raw.get("inputs", []), f"{where}.inputs", escape="the plan directory")
    if base_dir is not None:
        _existing_inputs(inputs, base_dir, f"{where}.inputs")
    return Job(
        name=name,
        cmd=_cmd(raw["cmd"], f"{where}.cmd"),
        inputs=inputs,
        outputs=_paths(raw.get("outputs", []), f"{where}.outputs", escape="the job directory"),
        deps=_deps(raw.get("deps", []), f"{where}.deps", name, known),
        requires=_requires(raw.get("requires", {}), f"{where}.requires"),
        estimate=_estimate(raw.get("estimate", DEFAULT_ESTIMATE), f"{where}.estimate"),
        env=_env(raw.get("env", {}), f"{where}.env"),
    )


# ---------------------------------------------------------------------------------------------
# The graph


def _find_cycle(jobs: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A dependency cycle as [a, b, ..., a], or None; iterative, so deep chains are fine."""
    done: set[str] = set()
    for start in sorted(jobs):
        if start in done:
            continue
        path: list[str] = [start]
        on_path = {start: 0}
        stack = [iter(jobs[start])]
        while stack:
            dep = next(stack[-1], None)
            if dep is None:
                stack.pop()
                node = path.pop()
                del on_path[node]
                done.add(node)
                continue
            if dep in on_path:
                return [*path[on_path[dep] :], dep]
            if dep in done:
                continue
            on_path[dep] = len(path)
            path.append(dep)
            stack.append(iter(jobs[dep]))
    return None


def _check_graph(jobs: Mapping[str, Job]) -> None:
    edges = sum(len(job.deps) for job in jobs.values())
    if edges > MAX_EDGES:
        raise PlanError(f"jobs: {edges} dependencies, more than the limit of {MAX_EDGES}")
    cycle = _find_cycle({name: job.deps for name, job in jobs.items()})
    if cycle:
        raise PlanError("dependency cycle: " + " -> ".join(cycle))


def topological_order(plan: Plan) -> list[str]:
    """Job names with every job after its deps; ties broken by name, so the order is stable."""
    waiting = {name: len(job.deps) for name, job in plan.jobs.items()}
    dependents: dict[str, list[str]] = {name: [] for name in plan.jobs}
    for name, job in plan.jobs.items():
        for dep in job.deps:
            dependents[dep].append(name)
    ready = [name for name, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        name = heapq.heappop(ready)
        order.append(name)
        for child in dependents[name]:
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready, child)
    if len(order) != len(plan.jobs):
        raise PlanError("dependency cycle among: " + ", ".join(sorted(set(plan.jobs) - set(order))))
    return order


# ---------------------------------------------------------------------------------------------
# Entry points


def _build(
    raw_jobs: Mapping[str, object], name: str, name_where: str, base_dir: Path | None
) -> Plan:
    check_name(name, name_where)
    if not raw_jobs:
        raise PlanError("jobs: the plan has no jobs (add a [jobs.NAME] table)")
    if len(raw_jobs) > MAX_JOBS:
        raise PlanError(f"jobs: {len(raw_jobs)} jobs, more than the limit of {MAX_JOBS}")
    jobs = {job: _job(job, raw, raw_jobs, base_dir) for job, raw in raw_jobs.items()}
    _check_graph(jobs)
    return Plan(name=name, jobs=jobs, base_dir=base_dir)


def parse_plan(text: str, base_dir: Path | None = None, *, default_name: str = "build") -> Plan:
    """Parse and validate a TOML plan; with `base_dir`, inputs must exist inside it."""
    if len(text) > MAX_TEXT:
        raise PlanError(f"plan is {len(text)} characters, more than the limit of {MAX_TEXT}")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PlanError(f"invalid TOML: {exc}") from None
    _check_keys(raw, PLAN_KEYS, "plan")
    if not raw:
        raise PlanError("plan is empty (add a [jobs.NAME] table)")
    jobs = raw.get("jobs", {})
    if not isinstance(jobs, dict):
        raise PlanError(f"jobs: must be a table of jobs, got {_show(jobs)}")
    return _build(jobs, raw.get("name", default_name), "name", base_dir)


def load_plan(path: Path) -> Plan:
    """Read a plan file; inputs are relative to its directory, and its name defaults to the
    file's stem."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_TEXT + 1)
    except OSError as exc:
        raise PlanError(f"cannot read plan {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_TEXT:
        raise PlanError(f"{path}: larger than the limit of {MAX_TEXT} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlanError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    stem = re.sub(r"[^A-Za-z0-9._+-]", "_", path.stem)[:MAX_NAME].lstrip(".+-") or "build"
    return parse_plan(text, path.parent, default_name=stem)


def _as_raw(job: Job) -> dict[str, object]:
    """A Job back in TOML shapes, so that built plans go through the same checks as parsed."""
    req: dict[str, object] = {"tags": sorted(job.requires.tags), "cores": job.requires.cores}
    if job.requires.arch is not None:
        req["arch"] = job.requires.arch
    if job.requires.kind is not None:
        req["kind"] = job.requires.kind
    return {
        "cmd": job.cmd,
        "inputs": list(job.inputs),
        "outputs": list(job.outputs),
        "deps": list(job.deps),
        "requires": req,
        "estimate": job.estimate,
        "env": dict(job.env),
    }


def validate_plan(plan: Plan) -> Plan:
    """Check a plan built in code (not parsed) by the rules of parse_plan; returns it."""
    for name, job in plan.jobs.items():
        if job.name != name:
            raise _fail(_job_path(name), f"holds a job named {_show(job.name)}")
    raw = {name: _as_raw(job) for name, job in plan.jobs.items()}
    _build(raw, plan.name, "name", plan.base_dir)
    return plan
