"""The job ledger: a deterministic state machine applied from committed log entries.

Every node applies the same committed entries in the same order (`Apply` outputs of the Raft
core), so every node holds the same ledger and any node can answer queries. Nothing here reads
a clock, a random source or the node's identity: an entry's effect depends only on the ledger
before it, which is what makes the replicas agree. Invalid or inapplicable entries are not
errors -- they were committed, so every replica must skip them the same way -- they become
`rejected`/`invalid` events and counts.

A job's lifecycle::

    queued -> assigned(node, term) -> running -> done(artifacts)
                 |  \\__________________|_____-> failed(reason) -> assigned ... (retry)
                 +-> queued (requeue: the node died)      \\-> blocked (failed on 2 nodes)
    any unfinished state -> blocked (block, or a dependency blocked) / cancelled (cancel)
    done -> queued (redo: its outputs were lost with its worker, gone before the submitter
                    held them; the one way a done job runs again)

Fencing: each assignment has an attempt number (1, 2, ...) and carries the leader's term. A
report (started, done, failed) counts only if its (node, attempt) is the job's *current*
assignment -- not a previous attempt, not another node, not an assignment voided by a requeue,
block or cancel. Anything else is `rejected_stale`: counted, an event, and otherwise ignored.
A real peer once lost 82% of its results to stale reports overwriting current ones; here a
stale report cannot change anything. Workers fence on terms themselves (`Fence`).
"""

from __future__ import annotations

import io
import math
import re
from collections import Counter
from collections.abc import Iterable, KeysView, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from swarmnode.build.plan import MAX_CORES, MAX_ESTIMATE, MAX_NAME, NAME_RE, Requires
from swarmnode.election.log import EntryError, decode_entry, encode_entry
from swarmnode.facts import KINDS

QUEUED = "queued"
ASSIGNED = "assigned"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
BLOCKED = "blocked"
CANCELLED = "cancelled"
STATES = (QUEUED, ASSIGNED, RUNNING, DONE, FAILED, BLOCKED, CANCELLED)
ACTIVE = frozenset({ASSIGNED, RUNNING})
"""States in which a node holds the job: only its reports count."""
FINAL = frozenset({DONE, BLOCKED, CANCELLED})
BLOCK_AFTER_NODES = 2
"""A job that failed on this many different nodes is blocked: the job, not the node, is broken."""

MAX_ID = 64
MAX_VOTERS = 9
MAX_BUILD_JOBS = 10_000
MAX_ARTIFACTS = 10_000
MAX_PATH = 1024
MAX_REASON = 1000
MAX_LOG_TAIL = 16 * 1024
MAX_U63 = (1 << 63) - 1
MAX_BATCH = 4096
"""Commands in one `Batch` entry (the entry's byte limit usually binds first)."""
LEDGER_FORMAT = 4
"""The entries this code reads, stated in a node's facts (`ledger`): 3 adds reports'
`seconds` and `joules` and `pause` entries, 4 `forget` entries. A leader writes the new fields
and entries only when every member states that format or more (a node from before would find
a whole batch invalid, or keep builds the others forgot)."""
MAX_FORGET = 256
"""Builds in one `forget` entry (a few KiB; the leader forgets more in the next one)."""
SNAPSHOT_VERSION = 3
"""3: jobs' seconds and joules, paused nodes. Version 2 snapshots are still read."""
MAX_SECONDS = 1e9
MAX_JOULES = 1e13
_HEX64 = re.compile(r"[0-9a-f]{64}")
ANYWHERE = Requires()


class LedgerError(ValueError):
    """An entry or snapshot that is not valid."""


# ---------------------------------------------------------------------------------------------
# Entries


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What the scheduler needs to know about a job; the command and files travel by
    `spec_hash` (content-addressed), so the ledger stays small."""

    deps: tuple[str, ...] = ()
    requires: Requires = ANYWHERE
    estimate: float = 1.0
    spec_hash: str = "0" * 64


@dataclass(frozen=True, slots=True)
class SubmitBuild:
    build_id: str
    name: str
    submitter: str
    jobs: tuple[tuple[str, JobSpec], ...]
    """(job name, spec), sorted by name."""


@dataclass(frozen=True, slots=True)
class Assign:
    job_key: str
    node: str
    term: int
    attempt: int


@dataclass(frozen=True, slots=True)
class Started:
    job_key: str
    node: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Done:
    job_key: str
    node: str
    attempt: int
    artifacts: tuple[tuple[str, str], ...]
    """(path, sha256 hex), sorted by path."""
    seconds: float = 0.0
    """How long the attempt ran, as its worker measured it (0: not stated)."""
    joules: float = 0.0
    """The worker's energy share for the attempt (`power.EnergyShare`; 0: not stated)."""


@dataclass(frozen=True, slots=True)
class Failed:
    job_key: str
    node: str
    attempt: int
    reason: str
    log_tail: str = ""
    seconds: float = 0.0
    joules: float = 0.0


@dataclass(frozen=True, slots=True)
class Block:
    job_key: str
    reason: str


@dataclass(frozen=True, slots=True)
class Cancel:
    build_id: str
    term: int


@dataclass(frozen=True, slots=True)
class Requeue:
    job_key: str
    reason: str


@dataclass(frozen=True, slots=True)
class Redo:
    """A done job whose outputs were lost with its worker (gone before its submitter held
    them): queued again, for a new attempt elsewhere. The one way a done job runs again; the
    leader proposes it only when the submitter says it cannot have the outputs and the worker
    is gone (`rights.refusal`, `Builds._decide`)."""

    job_key: str
    reason: str


@dataclass(frozen=True, slots=True)
class SetVoters:
    """An operator's choice of voters (`swarmnode voters --set`); empty: back to automatic
    (the longest-admitted live members). Committed, so every node steps toward the same set."""

    voters: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Pause:
    """An operator's pause of a node (`swarmnode pause`): no new work goes to it, what runs
    there finishes. Committed, so whichever node leads next keeps it paused."""

    node: str
    paused: bool


@dataclass(frozen=True, slots=True)
class Forget:
    """The leader's compaction: these finished builds (every job done, blocked or cancelled)
    leave the ledger, its indexes and its snapshots on every replica; the nodes' on-disk
    history keeps their record. A build not finished, or unknown, is rejected (and stays)."""

    build_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Voters:
    """The voter configuration in force from this entry on. Only the leader proposes it, one
    member added or removed at a time, the next only after this one is applied: every voter
    set in use then overlaps the one before in a majority, and a node cut off from the
    majority can never commit a smaller set for itself."""

    voters: tuple[str, ...]


Report = Started | Done | Failed
Batched = SubmitBuild | Assign | Started | Done | Failed


@dataclass(frozen=True, slots=True)
class Batch:
    """What the leader has for the log at the end of one turn of its loop, in one entry: the
    builds submitted, the workers' reports and its scheduling pass's assignments. Each command
    is applied in order exactly as an entry of its own would be (so each is judged on its own:
    a stale report is rejected, the others still count; an assignment whose dependency's
    result is in the same batch but was rejected is refused). One entry, one Raft round trip
    and one fsync per replica, for all of them."""

    items: tuple[Batched, ...]


Command = (SubmitBuild | Assign | Started | Done | Failed | Batch | Block | Cancel | Requeue
           | Redo | SetVoters | Voters | Pause | Forget)

_OPS: dict[type, str] = {
    SubmitBuild: "submit_build",
    Assign: "assign",
    Started: "started",
    Done: "done",
    Failed: "failed",
    Batch: "batch",
    Block: "block",
    Cancel: "cancel",
    Requeue: "requeue",
    Redo: "redo",
    SetVoters: "set_voters",
    Voters: "voters",
    Pause: "pause",
    Forget: "forget",
}
_CLASSES = {op: cls for cls, op in _OPS.items()}


def job_key(build_id: str, name: str) -> str:
    return f"{build_id}/{name}"


def _fail(what: str, problem: str) -> LedgerError:
    return LedgerError(f"{what}: {problem}")


def _str(value: object, what: str, max_len: int, *, empty: bool = False) -> str:
    if type(value) is not str or len(value) > max_len or (not empty and not value):
        raise _fail(what, f"expected a string of {0 if empty else 1}..{max_len} characters")
    return value


def _name(value: object, what: str, max_len: int = MAX_NAME) -> str:
    name = _str(value, what, max_len)
    if not NAME_RE.fullmatch(name):
        raise _fail(what, "expected letters, digits and . _ + - (not first . + -)")
    return name


def _u63(value: object, what: str, minimum: int = 0) -> int:
    if type(value) is not int or not minimum <= value <= MAX_U63:
        raise _fail(what, f"expected an integer >= {minimum}")
    return value


def _sha256(value: object, what: str) -> str:
    if type(value) is not str or not _HEX64.fullmatch(value):
        raise _fail(what, "expected 64 lower-case hex digits")
    return value


def _keys(obj: object, keys: Iterable[str], what: str) -> Mapping[str, Any]:
    if type(obj) is not dict or obj.keys() != set(keys):
        raise _fail(what, f"expected a map with keys {sorted(keys)}")
    return obj


def _job_key(value: object, what: str) -> str:
    key = _str(value, what, MAX_ID + 1 + MAX_NAME)
    build_id, sep, name = key.partition("/")
    if not sep:
        raise _fail(what, "expected build_id/job_name")
    _name(build_id, what, MAX_ID)
    _name(name, what)
    return key


def _path(value: object, what: str) -> str:
    path = _str(value, what, MAX_PATH)
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise _fail(what, "expected a normalised relative path")
    return path


def requires_to_plain(r: Requires) -> dict[str, Any]:
    return {"arch": r.arch, "kind": r.kind, "tags": sorted(r.tags), "cores": r.cores}


def _requires(obj: object, what: str) -> Requires:
    m = _keys(obj, ("arch", "kind", "tags", "cores"), what)
    arch = None if m["arch"] is None else _str(m["arch"], f"{what}.arch", MAX_NAME)
    kind = m["kind"]
    if kind is not None and kind not in KINDS:
        raise _fail(f"{what}.kind", f"expected one of {', '.join(KINDS)}")
    tags = m["tags"]
    if type(tags) is not list or len(tags) > 64 or tags != sorted(set(tags)):
        raise _fail(f"{what}.tags", "expected a sorted list of distinct strings")
    for t in tags:
        _str(t, f"{what}.tags", MAX_NAME)
    cores = _u63(m["cores"], f"{what}.cores", 1)
    if cores > MAX_CORES:
        raise _fail(f"{what}.cores", f"expected at most {MAX_CORES}")
    return Requires(arch=arch, kind=kind, tags=frozenset(tags), cores=cores)


def _spec(obj: object, what: str) -> JobSpec:
    m = _keys(obj, ("deps", "requires", "estimate", "spec_hash"), what)
    deps = m["deps"]
    if type(deps) is not list or len(deps) > MAX_BUILD_JOBS:
        raise _fail(f"{what}.deps", "expected a list of job names")
    est = m["estimate"]
    if type(est) not in (int, float) or not (math.isfinite(est) and 0 <= est <= MAX_ESTIMATE):
        raise _fail(f"{what}.estimate", f"expected seconds in 0..{MAX_ESTIMATE:g}")
    return JobSpec(
        deps=tuple(_name(d, f"{what}.deps") for d in deps),
        requires=_requires(m["requires"], f"{what}.requires"),
        estimate=float(est),
        spec_hash=_sha256(m["spec_hash"], f"{what}.spec_hash"),
    )


def _check_graph(jobs: Mapping[str, JobSpec], what: str) -> None:
    """Deps name jobs of the same build, once each, and form no cycle."""
    for name, spec in jobs.items():
        if len(set(spec.deps)) != len(spec.deps) or name in spec.deps:
            raise _fail(f"{what}.{name}.deps", "repeats a job or names the job itself")
        for d in spec.deps:
            if d not in jobs:
                raise _fail(f"{what}.{name}.deps", f"unknown job {d!r}")
    color: dict[str, int] = {}  # 1: on the current path, 2: finished
    for root in sorted(jobs):
        if root in color:
            continue
        color[root] = 1
        stack = [(root, iter(jobs[root].deps))]
        while stack:
            node, deps = stack[-1]
            dep = next(deps, None)
            if dep is None:
                color[node] = 2
                stack.pop()
            elif color.get(dep) == 1:
                raise _fail(what, f"dependency cycle through {dep!r}")
            elif dep not in color:
                color[dep] = 1
                stack.append((dep, iter(jobs[dep].deps)))


def _submit(m: Mapping[str, Any]) -> SubmitBuild:
    jobs = m["jobs"]
    if type(jobs) is not dict or not 1 <= len(jobs) <= MAX_BUILD_JOBS:
        raise _fail("submit_build.jobs", f"expected a map of 1..{MAX_BUILD_JOBS} jobs")
    specs = {
        _name(n, "submit_build.jobs"): _spec(s, f"submit_build.jobs.{n}") for n, s in jobs.items()
    }
    _check_graph(specs, "submit_build.jobs")
    return SubmitBuild(
        build_id=_name(m["build_id"], "submit_build.build_id", MAX_ID),
        name=_name(m["name"], "submit_build.name"),
        submitter=_str(m["submitter"], "submit_build.submitter", MAX_ID),
        jobs=tuple(sorted(specs.items())),
    )


def _artifacts(obj: object, what: str) -> tuple[tuple[str, str], ...]:
    if type(obj) is not dict or len(obj) > MAX_ARTIFACTS:
        raise _fail(what, f"expected a map of at most {MAX_ARTIFACTS} paths to sha256")
    return tuple(sorted((_path(p, what), _sha256(h, f"{what}.{p}")) for p, h in obj.items()))


def _parse(op: str, m: Mapping[str, Any]) -> Command:
    w = op
    if op == "submit_build":
        return _submit(m)
    if op == "assign":
        node = _str(m["node"], f"{w}.node", MAX_ID)
        return Assign(_job_key(m["job_key"], w), node, _u63(m["term"], w), _u63(m["attempt"], w, 1))
    if op == "started":
        node = _str(m["node"], f"{w}.node", MAX_ID)
        return Started(_job_key(m["job_key"], w), node, _u63(m["attempt"], w, 1))
    if op == "done":
        node = _str(m["node"], f"{w}.node", MAX_ID)
        arts = _artifacts(m["artifacts"], f"{w}.artifacts")
        return Done(_job_key(m["job_key"], w), node, _u63(m["attempt"], w, 1), arts,
                    *_cost(m, w))
    if op == "failed":
        return Failed(
            _job_key(m["job_key"], w),
            _str(m["node"], f"{w}.node", MAX_ID),
            _u63(m["attempt"], w, 1),
            _str(m["reason"], f"{w}.reason", MAX_REASON),
            _str(m["log_tail"], f"{w}.log_tail", MAX_LOG_TAIL, empty=True),
            *_cost(m, w),
        )
    if op == "pause":
        if type(m["paused"]) is not bool:
            raise _fail(f"{w}.paused", "expected true or false")
        return Pause(_str(m["node"], f"{w}.node", MAX_ID), m["paused"])
    if op == "batch":
        items = m["items"]
        if type(items) is not list or not 1 <= len(items) <= MAX_BATCH:
            raise _fail(f"{w}.items", f"expected a list of 1..{MAX_BATCH} commands")
        for item in items:
            if type(item) is not dict or item.get("op") not in _BATCHED:
                raise _fail(f"{w}.items", f"expected maps with op in {sorted(_BATCHED)}")
        return Batch(tuple(from_plain(item) for item in items))  # type: ignore[misc]
    if op == "block":
        return Block(_job_key(m["job_key"], w), _str(m["reason"], f"{w}.reason", MAX_REASON))
    if op == "cancel":
        return Cancel(_name(m["build_id"], f"{w}.build_id", MAX_ID), _u63(m["term"], w))
    if op == "forget":
        ids = m["build_ids"]
        if type(ids) is not list or not 1 <= len(ids) <= MAX_FORGET or len(set(ids)) != len(ids):
            raise _fail(f"{w}.build_ids", f"expected a list of 1..{MAX_FORGET} distinct builds")
        return Forget(tuple(_name(b, f"{w}.build_ids", MAX_ID) for b in ids))
    if op in ("set_voters", "voters"):
        voters = m["voters"]
        if type(voters) is not list or len(voters) > MAX_VOTERS:
            raise _fail(w, f"expected a list of at most {MAX_VOTERS} node ids")
        ids = tuple(sorted({_str(v, f"{w}.voters", MAX_ID) for v in voters}))
        return SetVoters(ids) if op == "set_voters" else Voters(ids)
    cls = Redo if op == "redo" else Requeue
    return cls(_job_key(m["job_key"], w), _str(m["reason"], f"{w}.reason", MAX_REASON))


_BATCHED = frozenset({"submit_build", "assign", "started", "done", "failed"})


def in_range(value: object, most: float) -> bool:
    """A number (not a bool) from 0 up to, not including, `most` (NaN is not)."""
    return type(value) in (int, float) and 0 <= value < most  # type: ignore[operator]


def _amount(value: object, what: str, most: float) -> float:
    if not in_range(value, most):
        raise _fail(what, f"expected a number from 0 to {most:g}")
    return float(value)  # type: ignore[arg-type]


def _cost(m: Mapping[str, Any], w: str) -> tuple[float, float]:
    """A report's optional seconds and joules (written only when stated, so that an entry
    without them reads the same to nodes from before they existed)."""
    return (_amount(m.get("seconds", 0.0), f"{w}.seconds", MAX_SECONDS),
            _amount(m.get("joules", 0.0), f"{w}.joules", MAX_JOULES))


_FIELDS: dict[str, tuple[str, ...]] = {
    "submit_build": ("build_id", "name", "submitter", "jobs"),
    "assign": ("job_key", "node", "term", "attempt"),
    "batch": ("items",),
    "started": ("job_key", "node", "attempt"),
    "done": ("job_key", "node", "attempt", "artifacts"),
    "failed": ("job_key", "node", "attempt", "reason", "log_tail"),
    "block": ("job_key", "reason"),
    "cancel": ("build_id", "term"),
    "requeue": ("job_key", "reason"),
    "redo": ("job_key", "reason"),
    "set_voters": ("voters",),
    "voters": ("voters",),
    "pause": ("node", "paused"),
    "forget": ("build_ids",),
}
_OPTIONAL: dict[str, tuple[str, ...]] = {"done": ("seconds", "joules"),
                                         "failed": ("seconds", "joules")}


def from_plain(obj: object) -> Command:
    """Strictly validate a plain entry ({"op": ..., fields}); raises LedgerError (only)."""
    if type(obj) is not dict or type(obj.get("op")) is not str or obj["op"] not in _FIELDS:
        raise LedgerError(f"entry: expected a map with op in {sorted(_FIELDS)}")
    op = obj["op"]
    required = ("op", *_FIELDS[op])
    optional = _OPTIONAL.get(op, ())
    if obj.keys() - set(optional) != set(required):
        also = f" (and optionally {sorted(optional)})" if optional else ""
        raise _fail(op, f"expected a map with keys {sorted(required)}{also}")
    return _parse(op, obj)


def spec_to_plain(s: JobSpec) -> dict[str, Any]:
    return {
        "deps": list(s.deps),
        "requires": requires_to_plain(s.requires),
        "estimate": s.estimate,
        "spec_hash": s.spec_hash,
    }


def to_plain(cmd: Command) -> dict[str, Any]:
    """The plain (msgpack-able) form of an entry."""
    op = _OPS[type(cmd)]
    plain: dict[str, Any] = {"op": op}
    for name in _FIELDS[op]:
        value = getattr(cmd, name)
        if name == "items":
            value = [to_plain(c) for c in value]
        elif name == "jobs":
            value = {n: spec_to_plain(s) for n, s in value}
        elif name == "artifacts":
            value = dict(value)
        elif name in ("voters", "build_ids"):
            value = list(value)
        plain[name] = value
    for name in _OPTIONAL.get(op, ()):
        if value := getattr(cmd, name):
            plain[name] = value
    return plain


def encode(cmd: Command) -> bytes:
    """Entry bytes for `Election.propose`."""
    return encode_entry(to_plain(cmd))


def decode(data: bytes) -> Command:
    """The command in entry bytes; raises LedgerError (only)."""
    try:
        return from_plain(decode_entry(data))
    except EntryError as exc:
        raise LedgerError(str(exc)) from None


def checked(cmd: Batched) -> Batched:
    """`cmd` as every replica reads it back from a `Batch` entry (e.g. a `Done`'s artifacts
    sorted by path); raises LedgerError (only) if it is not a valid command, or if a batch of
    it alone would not fit in an entry. A batch is parsed whole (one invalid command makes
    the entry `invalid`, voiding the others), so the leader checks each command it did not
    make itself -- a worker's report -- before it joins one."""
    try:
        entry = decode(encode(Batch((cmd,))))
    except LedgerError:
        raise
    except (TypeError, ValueError, OverflowError, KeyError, AttributeError) as exc:
        # not encodable (EntryError: too large; or fields of the wrong shape)
        raise LedgerError(f"{_OPS.get(type(cmd), 'entry')}: {exc}") from None
    assert type(entry) is Batch and len(entry.items) == 1
    return entry.items[0]


# ---------------------------------------------------------------------------------------------
# State


@dataclass(frozen=True, slots=True)
class Job:
    """One job's ledger record. `node`/`term`/`attempt` describe the latest assignment: current
    while `state` is assigned or running, then the attempt that finished it (done, failed);
    a requeue, block or cancel voids it (`node` becomes None), so its reports become stale."""

    build_id: str
    name: str
    spec: JobSpec
    state: str = QUEUED
    node: str | None = None
    term: int = 0
    attempt: int = 0
    artifacts: tuple[tuple[str, str], ...] = ()
    reason: str | None = None
    log_tail: str = ""
    failed_on: tuple[str, ...] = ()
    """The distinct nodes the job failed on, in order."""
    seconds: float = 0.0
    """How long its last finished attempt ran (0: not stated)."""
    joules: float = 0.0
    """The energy of all its finished attempts, failed ones included."""

    @property
    def key(self) -> str:
        return job_key(self.build_id, self.name)


@dataclass(frozen=True, slots=True)
class Build:
    build_id: str
    name: str
    submitter: str
    jobs: tuple[str, ...]
    index: int
    """The log index that submitted it (builds are listed in this order)."""
    cancelled_term: int | None = None


@dataclass(frozen=True, slots=True)
class LedgerEvent:
    """What an applied entry did. kind: submitted, duplicate, assigned, started, done, failed,
    blocked, cancelled, requeued, paused, resumed, voters_set, voters_changed, forgotten,
    rejected_stale, rejected (an inapplicable entry, `reason`
    says why), invalid (not a valid entry); and `restored` (the shell's: a snapshot replaced
    the whole ledger)."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)


class JobLedger:
    """The replicated job ledger. Feed it every `Apply` (in order) and every `Restore`."""

    def __init__(self) -> None:
        self.applied = 0
        """The last applied log index."""
        self.tally: Counter[str] = Counter()
        """Applied entries by outcome (part of the replicated state: rejected_stale counts)."""
        self._builds: dict[str, Build] = {}
        self._jobs: dict[str, Job] = {}
        # Derived from the two above and kept in step by `_put`, so that the leader's queries
        # on every turn cost what they return, not the size of the ledger:
        self._dependents: dict[str, tuple[str, ...]] = {}
        self._waiting: dict[str, int] = {}  # job key -> its dependencies not done
        self._ready: dict[str, None] = {}  # keys: queued or failed, every dependency done
        self._active: dict[str, None] = {}  # keys: assigned or running
        self._counts: dict[str, Counter[str]] = {}  # build id -> its jobs per state
        self._rank: dict[str, tuple[int, int]] = {}  # key -> (build's index, position)
        self._mj: dict[str, int] = {}  # build id -> its jobs' millijoules (integers: the sum
        # is the same on every replica, whatever order it was added up in)
        self.pinned_voters: tuple[str, ...] = ()
        """The operator's voter set; empty: chosen automatically."""
        self.voters: tuple[str, ...] = ()
        """The committed voter configuration (empty until the first `Voters` entry)."""
        self.paused: frozenset[str] = frozenset()
        """Nodes an operator paused: no new work goes to them."""

    # ------------------------------------------------------------------ applying

    def apply(self, index: int, entry: bytes | Mapping[str, Any] | Command) -> list[LedgerEvent]:
        """Apply committed entry `index`: bytes from `Apply.entry` (b"" is a leader's no-op),
        its plain form, or the command already decoded from them. Never raises for a bad entry
        (it becomes an `invalid` event); raises ValueError if `index` does not follow the last
        applied one (a shell bug)."""
        return [ev for _cmd, events in self.apply_parts(index, entry) for ev in events]

    def apply_parts(
        self, index: int, entry: bytes | Mapping[str, Any] | Command
    ) -> list[tuple[Command | None, list[LedgerEvent]]]:
        """`apply`, with the events of each command apart: one part per command of a `Batch`,
        in order; one part for any other entry (command None for an invalid one); none for a
        no-op."""
        if index != self.applied + 1:
            raise ValueError(f"entry {index} does not follow applied entry {self.applied}")
        self.applied = index
        if type(entry) in _APPLY:
            cmd: Command = entry  # type: ignore[assignment]
        elif isinstance(entry, bytes | bytearray) and not entry:
            return []
        else:
            try:
                cmd = (decode(bytes(entry)) if isinstance(entry, bytes | bytearray)
                       else from_plain(entry))
            except LedgerError as exc:
                event = LedgerEvent("invalid", {"index": index, "error": str(exc)})
                return [(None, self._events([event]))]
        items: tuple[Command, ...] = cmd.items if type(cmd) is Batch else (cmd,)
        return [(c, self._events(_APPLY[type(c)](self, index, c))) for c in items]

    def _events(self, events: list[LedgerEvent]) -> list[LedgerEvent]:
        for ev in events:
            self.tally[ev.kind] += 1
        return events

    def _put(self, job: Job) -> None:
        """Store `job` (new, or in a new state) and keep the derived indexes in step."""
        key, state = job.key, job.state
        old = self._jobs.get(key)
        self._jobs[key] = job
        if job.joules != (old.joules if old is not None else 0.0):
            self._mj[job.build_id] = (self._mj.get(job.build_id, 0) + round(job.joules * 1000)
                                      - (round(old.joules * 1000) if old is not None else 0))
        counts = self._counts[job.build_id]
        counts[state] += 1
        if old is not None:
            counts[old.state] -= 1
        if state in ACTIVE:
            self._active[key] = None
        else:
            self._active.pop(key, None)
        if state in (QUEUED, FAILED) and not self._waiting[key]:
            self._ready[key] = None
        else:
            self._ready.pop(key, None)
        if old is None or (state == DONE) == (old.state == DONE):
            return  # (a job restored done was never counted in its dependents' `_waiting`)
        for d in self._dependents.get(key, ()):  # done, or done no more (a redo)
            self._waiting[d] += -1 if state == DONE else 1
            if not self._waiting[d] and self._jobs[d].state in (QUEUED, FAILED):
                self._ready[d] = None
            else:
                self._ready.pop(d, None)

    def _add_build(self, build: Build, jobs: Iterable[Job]) -> None:
        """A build and its jobs (new, or from a snapshot), with their indexes."""
        self._builds[build.build_id] = build
        self._counts[build.build_id] = Counter()
        jobs = list(jobs)
        states = {job.name: job.state for job in jobs}
        deps: dict[str, list[str]] = {}
        for pos, job in enumerate(jobs):
            self._rank[job.key] = (build.index, pos)
            self._waiting[job.key] = sum(states[d] != DONE for d in job.spec.deps)
            for d in job.spec.deps:
                deps.setdefault(job_key(build.build_id, d), []).append(job.key)
        self._dependents.update({k: tuple(v) for k, v in deps.items()})
        for job in jobs:
            self._put(job)

    def _submit(self, index: int, c: SubmitBuild) -> list[LedgerEvent]:
        old = self._builds.get(c.build_id)
        if old is not None:
            same = (old.name, old.submitter) == (c.name, c.submitter) and old.jobs == tuple(
                n for n, _ in c.jobs
            )
            same = same and all(self._jobs[job_key(c.build_id, n)].spec == s for n, s in c.jobs)
            if same:  # a client's retry after a lost answer: accepted once, acknowledged again
                return [LedgerEvent("duplicate", {"build_id": c.build_id})]
            return [_rejected(c.build_id, "build_id_taken")]
        build = Build(c.build_id, c.name, c.submitter, tuple(n for n, _ in c.jobs), index)
        self._add_build(build, (Job(c.build_id, name, spec) for name, spec in c.jobs))
        return [LedgerEvent("submitted", {"build_id": c.build_id, "jobs": len(c.jobs)})]

    def _assign(self, index: int, c: Assign) -> list[LedgerEvent]:
        job = self._jobs.get(c.job_key)
        if job is None:
            return [_rejected(c.job_key, "unknown_job")]
        if job.state not in (QUEUED, FAILED):
            return [_rejected(c.job_key, f"not_assignable_{job.state}")]
        if c.attempt != job.attempt + 1:
            return [_rejected(c.job_key, "wrong_attempt")]
        if c.term < job.term:
            return [_rejected(c.job_key, "older_term")]
        if not self._deps_done(job):
            return [_rejected(c.job_key, "deps_not_done")]
        self._put(replace(job, state=ASSIGNED, node=c.node, term=c.term, attempt=c.attempt))
        data = {"job_key": c.job_key, "node": c.node, "term": c.term, "attempt": c.attempt}
        return [LedgerEvent("assigned", data)]

    def _started(self, index: int, c: Started) -> list[LedgerEvent]:
        job, event = self._report(c.job_key, c.node, c.attempt, RUNNING)
        if job is None:
            return [event]
        self._put(replace(job, state=RUNNING))
        return [LedgerEvent("started", {"job_key": c.job_key, "node": c.node,
                                         "attempt": c.attempt})]

    def _done(self, index: int, c: Done) -> list[LedgerEvent]:
        job, event = self._report(c.job_key, c.node, c.attempt, DONE)
        if job is None:
            if event.kind == "duplicate" and self._jobs[c.job_key].artifacts != c.artifacts:
                event = _stale(c.job_key, c.node, c.attempt, self._jobs[c.job_key])
            return [event]
        self._put(replace(job, state=DONE, artifacts=c.artifacts, reason=None,
                          seconds=c.seconds, joules=job.joules + c.joules))
        return [LedgerEvent("done", {"job_key": c.job_key, "node": c.node, "attempt": c.attempt,
                                     "seconds": c.seconds})]

    def _failed(self, index: int, c: Failed) -> list[LedgerEvent]:
        job, event = self._report(c.job_key, c.node, c.attempt, FAILED)
        if job is None:
            return [event]
        failed_on = job.failed_on if c.node in job.failed_on else (*job.failed_on, c.node)
        job = replace(job, state=FAILED, reason=c.reason, log_tail=c.log_tail, failed_on=failed_on,
                      seconds=c.seconds, joules=job.joules + c.joules)
        self._put(job)
        events = [LedgerEvent("failed", {"job_key": c.job_key, "node": c.node,
                                         "attempt": c.attempt, "seconds": c.seconds,
                                         "reason": c.reason})]
        if len(failed_on) >= BLOCK_AFTER_NODES:
            why = f"failed on {', '.join(failed_on)}: {c.reason}"
            events += self._block_job(c.job_key, why[:MAX_REASON], keep_node=True)
        return events

    def _block(self, index: int, c: Block) -> list[LedgerEvent]:
        job = self._jobs.get(c.job_key)
        if job is None:
            return [_rejected(c.job_key, "unknown_job")]
        if job.state in FINAL:
            return [_rejected(c.job_key, f"already_{job.state}")]
        return self._block_job(c.job_key, c.reason)

    def _cancel(self, index: int, c: Cancel) -> list[LedgerEvent]:
        build = self._builds.get(c.build_id)
        if build is None:
            return [_rejected(c.build_id, "unknown_build")]
        if build.cancelled_term is not None:
            return [LedgerEvent("duplicate", {"build_id": c.build_id})]
        self._builds[c.build_id] = replace(build, cancelled_term=c.term)
        n = 0
        for name in build.jobs:
            key = job_key(c.build_id, name)
            job = self._jobs[key]
            if job.state != DONE:
                self._put(replace(job, state=CANCELLED, node=None, reason="cancelled"))
                n += 1
        return [LedgerEvent("cancelled", {"build_id": c.build_id, "term": c.term, "jobs": n})]

    def _forget(self, index: int, c: Forget) -> list[LedgerEvent]:
        events = []
        for build_id in c.build_ids:
            build = self._builds.get(build_id)
            if build is None:
                events.append(_rejected(build_id, "unknown_build"))
            elif not self.finished(build_id):
                events.append(_rejected(build_id, "not_finished"))
            else:
                self._drop_build(build)
                events.append(LedgerEvent("forgotten", {"build_id": build_id,
                                                        "jobs": len(build.jobs)}))
        return events

    def _drop_build(self, build: Build) -> None:
        """Remove a finished build, its jobs and every index entry of theirs (none of them is
        ready or active: every job is final)."""
        del self._builds[build.build_id]
        del self._counts[build.build_id]
        self._mj.pop(build.build_id, None)
        for name in build.jobs:
            key = job_key(build.build_id, name)
            for index in (self._jobs, self._rank, self._waiting, self._dependents):
                index.pop(key, None)

    def _voters(self, index: int, c: Voters) -> list[LedgerEvent]:
        self.voters = c.voters
        return [LedgerEvent("voters_changed", {"voters": list(c.voters)})]

    def _set_voters(self, index: int, c: SetVoters) -> list[LedgerEvent]:
        self.pinned_voters = c.voters
        return [LedgerEvent("voters_set", {"voters": list(c.voters)})]

    def _pause(self, index: int, c: Pause) -> list[LedgerEvent]:
        if (c.node in self.paused) == c.paused:
            return [LedgerEvent("duplicate", {"node": c.node, "paused": c.paused})]
        self.paused = self.paused | {c.node} if c.paused else self.paused - {c.node}
        return [LedgerEvent("paused" if c.paused else "resumed", {"node": c.node})]

    def _redo(self, index: int, c: Redo) -> list[LedgerEvent]:
        job = self._jobs.get(c.job_key)
        if job is None:
            return [_rejected(c.job_key, "unknown_job")]
        if job.state != DONE:
            return [_rejected(c.job_key, f"not_done_{job.state}")]
        self._put(replace(job, state=QUEUED, node=None, artifacts=(), reason=c.reason))
        return [LedgerEvent("redone", {"job_key": c.job_key, "reason": c.reason,
                                       "node": job.node, "attempt": job.attempt})]

    def _requeue(self, index: int, c: Requeue) -> list[LedgerEvent]:
        job = self._jobs.get(c.job_key)
        if job is None:
            return [_rejected(c.job_key, "unknown_job")]
        if job.state not in ACTIVE:
            return [_rejected(c.job_key, f"not_active_{job.state}")]
        self._put(replace(job, state=QUEUED, node=None, reason=c.reason))
        return [LedgerEvent("requeued", {"job_key": c.job_key, "reason": c.reason,
                                         "node": job.node, "attempt": job.attempt})]

    def _report(
        self, key: str, node: str, attempt: int, outcome: str
    ) -> tuple[Job, None] | tuple[None, LedgerEvent]:
        """The job if a report of `outcome` by (node, attempt) applies to it now: that is its
        current assignment (latest, and not voided). Otherwise the event to record instead: a
        duplicate (the same report again: the job already shows that attempt's `outcome`),
        rejected_stale, or rejected for an unknown job."""
        job = self._jobs.get(key)
        if job is None:
            return None, _rejected(key, "unknown_job")
        if (job.node, job.attempt) == (node, attempt):
            if job.state in ACTIVE and not (outcome == RUNNING and job.state == RUNNING):
                return job, None
            outcomes = (FAILED, BLOCKED) if outcome == FAILED else (outcome,)
            if job.state in outcomes:
                return None, _duplicate(key, node, attempt)
        return None, _stale(key, node, attempt, job)

    def _block_job(self, key: str, reason: str, *, keep_node: bool = False) -> list[LedgerEvent]:
        """Block `key` and, transitively, every dependent that has not finished (it can never
        run now)."""
        events = []
        todo = [(key, reason)]
        while todo:
            k, why = todo.pop(0)
            job = self._jobs[k]
            if job.state in FINAL:
                continue
            node = job.node if keep_node and k == key else None
            self._put(replace(job, state=BLOCKED, reason=why, node=node))
            # (`attempt`: the attempt the block voided, if the job was held by a node)
            voided = {"attempt": job.attempt} if job.state in ACTIVE else {}
            events.append(LedgerEvent("blocked", {"job_key": k, "reason": why, **voided}))
            todo += [(d, f"dependency {job.name} blocked") for d in self._dependents.get(k, ())]
        return events

    # ------------------------------------------------------------------ queries

    def job(self, key: str) -> Job | None:
        return self._jobs.get(key)

    def build(self, build_id: str) -> Build | None:
        return self._builds.get(build_id)

    def builds(self) -> list[Build]:
        """Every build, in submission order."""
        return sorted(self._builds.values(), key=lambda b: b.index)

    def jobs(self, build_id: str) -> list[Job]:
        """The jobs of a build, by name (empty for an unknown build)."""
        build = self._builds.get(build_id)
        if build is None:
            return []
        return [self._jobs[job_key(build_id, n)] for n in build.jobs]

    def size(self) -> dict[str, int]:
        """The builds and jobs held (what the ledger's memory and snapshots grow with)."""
        return {"builds": len(self._builds), "jobs": len(self._jobs)}

    def _sorted(self, keys: Iterable[str]) -> list[Job]:
        """The jobs `keys`, oldest build first, each build's in plan order."""
        return [self._jobs[k] for k in sorted(keys, key=self._rank.__getitem__)]

    def ready(self) -> list[Job]:
        """Jobs that may be assigned now (queued, or failed on fewer than two nodes, with every
        dependency done), oldest build first."""
        return self._sorted(self._ready)

    def ready_keys(self) -> KeysView[str]:
        """The keys of `ready()`, unordered, without building the list (a live view: the
        leader's pass takes set differences of it each turn)."""
        return self._ready.keys()

    def active(self) -> list[Job]:
        """Jobs held by a node now (assigned or running), oldest build first."""
        return self._sorted(self._active)

    def busy_nodes(self) -> set[str]:
        """The nodes holding a job now (unordered, without sorting the jobs)."""
        return {n for k in self._active if (n := self._jobs[k].node)}

    def active_in(self, build_id: str) -> list[Job]:
        """The build's jobs held by a node now."""
        return [j for j in self.active() if j.build_id == build_id]

    def running_on(self, node: str) -> list[Job]:
        """Jobs currently assigned to `node` (assigned or running)."""
        return [j for j in self.active() if j.node == node]

    def progress(self, build_id: str) -> dict[str, int]:
        """Jobs of the build per state (every state listed), and "total"."""
        have = self._counts.get(build_id, Counter())
        counts = {state: have[state] for state in STATES}
        counts["total"] = sum(counts.values())
        return counts

    def energy(self, build_id: str) -> float:
        """The joules of the build's finished attempts, as their workers stated them."""
        return self._mj.get(build_id, 0) / 1000

    def finished(self, build_id: str) -> bool:
        """Every job of the build is done, blocked or cancelled."""
        counts = self._counts.get(build_id)
        return counts is not None and not any(n for st, n in counts.items() if st not in FINAL)

    def dependents(self, key: str) -> tuple[str, ...]:
        """The keys of the jobs that depend on job `key`."""
        return self._dependents.get(key, ())

    def _deps_done(self, job: Job) -> bool:
        return not self._waiting[job.key]

    # ------------------------------------------------------------------ snapshots

    def to_plain(self) -> dict[str, Any]:
        """The whole state, plain and in a fixed order (equal ledgers give equal bytes). In
        version 2's form while nothing needs version 3 (no pause, no job's seconds or joules):
        a node from before format 3 can still restore it (a self-update rolled back)."""
        head, v3 = self._head()
        return {**head, "builds": [self._build_to_plain(b, v3) for b in self.builds()]}

    def _head(self) -> tuple[dict[str, Any], bool]:
        """`to_plain` but its builds (last), and whether it takes version 3's form."""
        v3 = bool(self.paused) or any(j.seconds or j.joules for j in self._jobs.values())
        return {
            "v": SNAPSHOT_VERSION if v3 else 2,
            "applied": self.applied,
            "tally": dict(sorted(self.tally.items())),
            "voters": list(self.pinned_voters),
            "config": list(self.voters),
            **({"paused": sorted(self.paused)} if v3 else {}),
        }, v3

    def _build_to_plain(self, b: Build, v3: bool) -> dict[str, Any]:
        return {
            "build_id": b.build_id,
            "name": b.name,
            "submitter": b.submitter,
            "index": b.index,
            "cancelled_term": b.cancelled_term,
            "jobs": [_job_to_plain(j, v3) for j in self.jobs(b.build_id)],
        }

    def snapshot(self) -> bytes:
        """The state as bytes for `Election.compact`: msgpack of `to_plain`, deterministic,
        packed a build at a time (the whole plain form at once would cost a few times the
        snapshot's size in short-lived objects at every compaction, and fragment the heap)."""
        head, v3 = self._head()
        packer = msgpack.Packer(use_bin_type=True)
        out = io.BytesIO()
        out.write(packer.pack_map_header(len(head) + 1))
        for key, value in head.items():
            out.write(packer.pack(key))
            out.write(packer.pack(value))
        builds = self.builds()
        out.write(packer.pack("builds"))
        out.write(packer.pack_array_header(len(builds)))
        for b in builds:
            out.write(packer.pack(self._build_to_plain(b, v3)))
        return out.getvalue()

    @classmethod
    def restore(cls, data: bytes) -> JobLedger:
        """A ledger from `snapshot` bytes; raises LedgerError for anything malformed."""
        try:
            plain = msgpack.unpackb(data, raw=False, strict_map_key=True)
            return cls._from_plain(plain)
        except LedgerError:
            raise
        except Exception as exc:  # malformed bytes or shapes: one error type for the shell
            raise LedgerError(f"snapshot: malformed ({type(exc).__name__}: {exc})") from None

    @classmethod
    def _from_plain(cls, plain: Any) -> JobLedger:
        version = plain.get("v") if type(plain) is dict else None
        if version not in (2, SNAPSHOT_VERSION):
            raise LedgerError(f"snapshot: unknown version {version!r}")
        m = _keys(plain, ("v", "applied", "tally", "voters", "config", "builds",
                          *(("paused",) if version == SNAPSHOT_VERSION else ())), "snapshot")
        led = cls()
        led.paused = frozenset(_str(n, "snapshot.paused", MAX_ID) for n in m.get("paused", []))
        voters = from_plain({"op": "set_voters", "voters": m["voters"]})
        led.pinned_voters = voters.voters  # type: ignore[union-attr]
        config = from_plain({"op": "voters", "voters": m["config"]})
        led.voters = config.voters  # type: ignore[union-attr]
        led.applied = _u63(m["applied"], "snapshot.applied")
        led.tally = Counter({str(k): _u63(v, "snapshot.tally") for k, v in m["tally"].items()})
        for b in m["builds"]:
            jobs = [_job_from_plain(b["build_id"], jp) for jp in b["jobs"]]
            led._add_build(Build(b["build_id"], b["name"], b["submitter"],
                                 tuple(j.name for j in jobs), b["index"], b["cancelled_term"]),
                           jobs)
        return led


def _job_to_plain(j: Job, v3: bool) -> dict[str, Any]:
    plain = {
        "name": j.name,
        "spec": spec_to_plain(j.spec),
        "state": j.state,
        "node": j.node,
        "term": j.term,
        "attempt": j.attempt,
        "artifacts": [list(a) for a in j.artifacts],
        "reason": j.reason,
        "log_tail": j.log_tail,
        "failed_on": list(j.failed_on),
    }
    if v3:
        plain |= {"seconds": j.seconds, "joules": j.joules}
    return plain


def _job_from_plain(build_id: str, p: dict[str, Any]) -> Job:
    if p["state"] not in STATES:
        raise LedgerError(f"snapshot: unknown state {p['state']!r}")
    return Job(
        build_id=build_id,
        name=p["name"],
        spec=_spec(p["spec"], "snapshot.spec"),
        state=p["state"],
        node=p["node"],
        term=p["term"],
        attempt=p["attempt"],
        artifacts=tuple((a, h) for a, h in p["artifacts"]),
        reason=p["reason"],
        log_tail=p["log_tail"],
        failed_on=tuple(p["failed_on"]),
        seconds=_amount(p.get("seconds", 0.0), "snapshot.seconds", MAX_SECONDS),
        # (a job's joules add up over its attempts: no bound but being a finite number)
        joules=_amount(p.get("joules", 0.0), "snapshot.joules", math.inf),
    )


def _rejected(subject: str, reason: str) -> LedgerEvent:
    return LedgerEvent("rejected", {"subject": subject, "reason": reason})


def _stale(key: str, node: str, attempt: int, job: Job) -> LedgerEvent:
    data = {
        "job_key": key,
        "node": node,
        "attempt": attempt,
        "current": [job.node, job.attempt] if job.state in ACTIVE else None,
        "state": job.state,
    }
    return LedgerEvent("rejected_stale", data)


def _duplicate(key: str, node: str, attempt: int) -> LedgerEvent:
    return LedgerEvent("duplicate", {"job_key": key, "node": node, "attempt": attempt})


_APPLY: dict[type, Any] = {
    SetVoters: JobLedger._set_voters,
    Voters: JobLedger._voters,
    SubmitBuild: JobLedger._submit,
    Assign: JobLedger._assign,
    Started: JobLedger._started,
    Done: JobLedger._done,
    Failed: JobLedger._failed,
    Batch: None,  # its commands are applied one by one (apply_parts)
    Block: JobLedger._block,
    Cancel: JobLedger._cancel,
    Requeue: JobLedger._requeue,
    Redo: JobLedger._redo,
    Pause: JobLedger._pause,
    Forget: JobLedger._forget,
}


# ---------------------------------------------------------------------------------------------
# The worker's side


@dataclass(slots=True)
class Fence:
    """A worker's guard against deposed leaders: the highest leader term it has seen. An
    assignment or cancellation from a lower term comes from a leader that has been replaced
    (it may not know yet) and is refused. The shell should persist `term` and feed it the
    terms it learns elsewhere (`observe`), e.g. from the Raft core."""

    term: int = 0
    refused: int = 0

    def observe(self, term: int) -> None:
        """A term seen elsewhere (the core's current term): never goes backwards."""
        self.term = max(self.term, term)

    def admit(self, term: int) -> bool:
        """May an assignment or cancellation from a leader of `term` be obeyed?"""
        if term < self.term:
            self.refused += 1
            return False
        self.term = term
        return True
