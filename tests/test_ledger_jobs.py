"""The job ledger state machine: entries and their validation, the job lifecycle, fencing of
stale reports, queries, snapshots, and the worker-side fence."""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections import Counter
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmnode.build.plan import Requires
from swarmnode.ledger import (
    ACTIVE,
    ASSIGNED,
    BLOCKED,
    CANCELLED,
    DONE,
    FAILED,
    QUEUED,
    RUNNING,
    Assign,
    Block,
    Cancel,
    Command,
    Done,
    Failed,
    Fence,
    JobLedger,
    JobSpec,
    LedgerError,
    Redo,
    Requeue,
    Started,
    SubmitBuild,
    decode,
    encode,
    from_plain,
    to_plain,
)
from swarmnode.ledger.jobs import (
    MAX_ARTIFACTS,
    MAX_BATCH,
    MAX_FORGET,
    MAX_PATH,
    SNAPSHOT_VERSION,
    Batch,
    Forget,
    Pause,
    SetVoters,
    Voters,
    checked,
)

H = "ab" * 32


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def build(build_id: str = "b1", **deps: tuple[str, ...]) -> SubmitBuild:
    """A build whose jobs are the keyword names, each with the given dependencies."""
    specs = deps or {"only": ()}
    jobs = tuple(sorted((n, JobSpec(deps=d, spec_hash=sha(n))) for n, d in specs.items()))
    return SubmitBuild(build_id, "hello", "client-1", jobs)


class Ledger:
    """A JobLedger fed with consecutive indexes, for short tests."""

    def __init__(self) -> None:
        self.led = JobLedger()

    def __call__(self, cmd: Command | bytes | dict[str, Any]) -> list[str]:
        entry = cmd if isinstance(cmd, bytes | dict) else encode(cmd)
        return [e.kind for e in self.led.apply(self.led.applied + 1, entry)]

    def state(self, key: str) -> str:
        job = self.led.job(key)
        assert job is not None
        return job.state


def arts(text: str) -> tuple[tuple[str, str], ...]:
    return (("out/bin", sha(text)),)


# ---------------------------------------------------------------------------------------------
# Entries


ALL = [
    build(),
    SubmitBuild(
        "b2",
        "x",
        "n",
        (
            ("a", JobSpec((), Requires("x86_64", "lxc", frozenset({"gpu"}), 8), 2.5, H)),
            ("b", JobSpec(("a",), estimate=0.0, spec_hash=H)),
        ),
    ),
    Assign("b1/only", "node-a", 3, 1),
    Started("b1/only", "node-a", 1),
    Done("b1/only", "node-a", 1, (("a/b.o", H), ("c", H))),
    Done("b1/only", "node-a", 1, (("c", H),), 12.5, 340.25),
    Failed("b1/only", "node-a", 2, "exit 2", "last lines"),
    Failed("b1/only", "node-a", 2, "exit 2", "", 0.0, 3.0),
    Pause("node-a", True),
    Pause("node-a", False),
    Block("b1/only", "operator"),
    Cancel("b1", 4),
    Requeue("b1/only", "node died"),
    Forget(("b1", "b2")),
    Batch((build("b3"), Assign("b3/only", "node-a", 3, 1), Started("b1/only", "node-a", 1),
           Done("b1/only", "node-a", 1, (("o", H),)), Failed("b1/x", "node-b", 2, "exit 2"))),
]


@pytest.mark.parametrize("cmd", ALL, ids=lambda c: type(c).__name__)
def test_entries_round_trip(cmd: Command) -> None:
    plain = to_plain(cmd)
    assert from_plain(msgpack.unpackb(msgpack.packb(plain))) == cmd
    assert decode(encode(cmd)) == cmd


def _plain(cmd: Command, **changes: Any) -> dict[str, Any]:
    plain = to_plain(cmd)
    plain.update(changes)
    return plain


def _job(**changes: Any) -> dict[str, Any]:
    spec = {"deps": [], "requires": to_plain(build())["jobs"]["only"]["requires"]}
    spec |= {"estimate": 1.0, "spec_hash": H, **changes}
    return _plain(build(), jobs={"only": spec})


BAD = [
    None,
    [],
    {"op": "nope"},
    {"op": "cancel", "build_id": "b1"},
    _plain(Cancel("b1", 1), extra=1),
    _plain(Cancel("b1", 1), term=-1),
    _plain(Cancel("b1", 1), term=True),
    _plain(Cancel("b1", 1), build_id="../etc"),
    _plain(Cancel("b1", 1), build_id="x" * 65),
    _plain(Assign("b1/j", "n", 1, 1), attempt=0),
    _plain(Assign("b1/j", "n", 1, 1), job_key="no-slash"),
    _plain(Assign("b1/j", "n", 1, 1), job_key="b1/.hidden"),
    _plain(Assign("b1/j", "n", 1, 1), node=""),
    _plain(Done("b1/j", "n", 1, ()), artifacts={"/abs": H}),
    _plain(Done("b1/j", "n", 1, ()), artifacts={"a/../b": H}),
    _plain(Done("b1/j", "n", 1, ()), artifacts={"a": "not-a-hash"}),
    _plain(Done("b1/j", "n", 1, ()), artifacts={"a": H.upper()}),
    _plain(Failed("b1/j", "n", 1, "r"), log_tail=None),
    _plain(Failed("b1/j", "n", 1, "r"), reason="x" * 1001),
    _plain(Failed("b1/j", "n", 1, "r"), seconds=-1.0),
    _plain(Done("b1/j", "n", 1, ()), joules=float("nan")),
    _plain(Done("b1/j", "n", 1, ()), seconds="3"),
    _plain(Done("b1/j", "n", 1, ()), seconds=True),
    _plain(Done("b1/j", "n", 1, ()), joules=1e13),
    _plain(Done("b1/j", "n", 1, ()), watts=1.0),
    _plain(Pause("n", True), paused=1),
    _plain(Pause("n", True), node=""),
    _plain(Pause("n", True), seconds=1.0),
    {"op": "batch", "items": [to_plain(Pause("n", True))]},
    _plain(build(), jobs={}),
    _plain(build(a=("b",), b=("a",))),
    _plain(build(a=("a",))),
    _plain(build(a=("ghost",))),
    _plain(build(a=(), b=("a", "a"))),
    _job(estimate=float("nan")),
    _job(estimate=-1),
    _job(spec_hash="0" * 63),
    _job(requires={"arch": None, "kind": "mainframe", "tags": [], "cores": 1}),
    _job(requires={"arch": None, "kind": None, "tags": ["b", "a"], "cores": 1}),
    _job(requires={"arch": None, "kind": None, "tags": [], "cores": 0}),
    _job(requires={"cores": 1}),
    {"op": "batch", "items": []},
    {"op": "batch", "items": [to_plain(Cancel("b1", 1))]},  # only what the leader batches
    {"op": "batch", "items": [to_plain(Voters(("n1",)))]},
    {"op": "batch", "items": [to_plain(SetVoters(("n1",)))]},
    {"op": "batch", "items": [{"op": "batch", "items": [to_plain(Started("b1/j", "n", 1))]}]},
    {"op": "batch", "items": [to_plain(Started("b1/j", "n", 1))] * (MAX_BATCH + 1)},
    {"op": "batch", "items": [to_plain(Started("b1/j", "n", 1)), "started"]},
    {"op": "batch", "items": [_plain(Assign("b1/j", "n", 1, 1), attempt=0)]},
    {"op": "batch", "items": to_plain(Started("b1/j", "n", 1))},
    {"op": "forget", "build_ids": []},
    {"op": "forget", "build_ids": ["b1", "b1"]},
    {"op": "forget", "build_ids": [f"b{i}" for i in range(MAX_FORGET + 1)]},
    {"op": "forget", "build_ids": ["../b1"]},
    {"op": "forget", "build_ids": "b1"},
    {"op": "batch", "items": [to_plain(Forget(("b1",)))]},  # its own entry only
]


@pytest.mark.parametrize("plain", BAD)
def test_invalid_entries_are_refused(plain: object) -> None:
    with pytest.raises(LedgerError):
        from_plain(plain)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["op", "job_key", "node", "term", "attempt", "artifacts", "build_id"]),
        st.one_of(
            st.sampled_from(["assign", "done", "cancel", "b1/j", "n"]),
            st.integers(),
            st.booleans(),
            st.none(),
            st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
        ),
    )
)
def test_validation_raises_only_ledger_error(plain: dict[str, Any]) -> None:
    with contextlib.suppress(LedgerError):
        from_plain(plain)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_committed_entries_are_skipped_alike_everywhere(data: bytes) -> None:
    a, b = JobLedger(), JobLedger()
    assert a.apply(1, data) == b.apply(1, data)
    assert a.applied == 1 and a.snapshot() == b.snapshot()


# ---------------------------------------------------------------------------------------------
# The lifecycle


def test_a_build_runs_in_dependency_order() -> None:
    led = Ledger()
    assert led(build(compile=(), link=("compile",))) == ["submitted"]
    assert [j.key for j in led.led.ready()] == ["b1/compile"]
    assert led(Assign("b1/compile", "n1", 1, 1)) == ["assigned"]
    job = led.led.job("b1/compile")
    assert job is not None and (job.state, job.node, job.term) == (ASSIGNED, "n1", 1)
    assert led(Assign("b1/link", "n2", 1, 1)) == ["rejected"]  # its dependency is not done
    assert led(Started("b1/compile", "n1", 1)) == ["started"]
    assert [j.key for j in led.led.running_on("n1")] == ["b1/compile"]
    assert led(Done("b1/compile", "n1", 1, arts("c"))) == ["done"]
    assert led.led.running_on("n1") == []
    assert [j.key for j in led.led.ready()] == ["b1/link"]
    assert led(Assign("b1/link", "n2", 1, 1)) == ["assigned"]
    assert led(Done("b1/link", "n2", 1, arts("l"))) == ["done"]  # started may be lost
    assert led.led.finished("b1")
    assert led.led.progress("b1") == {
        "queued": 0,
        "assigned": 0,
        "running": 0,
        "done": 2,
        "failed": 0,
        "blocked": 0,
        "cancelled": 0,
        "total": 2,
    }
    done = led.led.job("b1/compile")
    assert done is not None and done.artifacts == arts("c")


def test_assignments_need_the_next_attempt_and_no_older_term() -> None:
    led = Ledger()
    led(build())
    assert led(Assign("b1/only", "n1", 5, 2)) == ["rejected"]  # attempt 1 comes first
    assert led(Assign("b1/nope", "n1", 5, 1)) == ["rejected"]
    assert led(Assign("b1/only", "n1", 5, 1)) == ["assigned"]
    assert led(Assign("b1/only", "n2", 5, 2)) == ["rejected"]  # still assigned
    assert led(Requeue("b1/only", "n1 died")) == ["requeued"]
    assert led(Assign("b1/only", "n2", 4, 2)) == ["rejected"]  # from a deposed leader
    assert led(Assign("b1/only", "n2", 6, 2)) == ["assigned"]
    assert led.led.tally["rejected"] == 4


@pytest.mark.parametrize(
    "report",
    [
        Done("b1/only", "n1", 1, arts("x")),  # the previous attempt
        Done("b1/only", "n3", 2, arts("x")),  # another node
        Failed("b1/only", "n1", 1, "late"),
        Started("b1/only", "n1", 1),
    ],
    ids=["old-attempt", "other-node", "old-failure", "old-start"],
)
def test_stale_reports_are_rejected_and_counted(report: Command) -> None:
    led = Ledger()
    led(build())
    led(Assign("b1/only", "n1", 1, 1))
    led(Requeue("b1/only", "n1 unreachable"))
    led(Assign("b1/only", "n2", 2, 2))
    assert led(report) == ["rejected_stale"]
    assert led.state("b1/only") == ASSIGNED and led.led.tally["rejected_stale"] == 1
    assert led(Done("b1/only", "n2", 2, arts("good"))) == ["done"]
    assert led(report) == ["rejected_stale"]  # nor can it overwrite the result
    job = led.led.job("b1/only")
    assert job is not None and job.artifacts == arts("good") and job.node == "n2"


def test_a_requeued_attempt_is_stale_even_with_no_new_assignment_yet() -> None:
    led = Ledger()
    led(build())
    led(Assign("b1/only", "n1", 1, 1))
    led(Requeue("b1/only", "n1 unreachable"))
    assert led(Done("b1/only", "n1", 1, arts("x"))) == ["rejected_stale"]
    assert led.state("b1/only") == QUEUED


def test_redelivered_reports_are_duplicates_not_stale() -> None:
    led = Ledger()
    led(build())
    led(Assign("b1/only", "n1", 1, 1))
    assert led(Started("b1/only", "n1", 1)) == ["started"]
    assert led(Started("b1/only", "n1", 1)) == ["duplicate"]
    assert led.state("b1/only") == RUNNING
    assert led(Done("b1/only", "n1", 1, arts("x"))) == ["done"]
    assert led(Done("b1/only", "n1", 1, arts("x"))) == ["duplicate"]
    assert led(Started("b1/only", "n1", 1)) == ["rejected_stale"]  # a start after the end
    assert led(Done("b1/only", "n1", 1, arts("different"))) == ["rejected_stale"]
    assert led.led.tally["rejected_stale"] == 2


def test_failing_on_two_nodes_blocks_the_job_and_its_dependents() -> None:
    led = Ledger()
    led(build(a=(), b=("a",), c=("b",), d=()))
    led(Assign("b1/a", "n1", 1, 1))
    assert led(Failed("b1/a", "n1", 1, "exit 1", "boom")) == ["failed"]
    assert led.state("b1/a") == FAILED and "b1/a" in [j.key for j in led.led.ready()]
    led(Assign("b1/a", "n1", 1, 2))
    assert led(Failed("b1/a", "n1", 2, "exit 1")) == ["failed"]  # same node again: retry
    assert led(Failed("b1/a", "n1", 2, "exit 1")) == ["duplicate"]
    led(Assign("b1/a", "n2", 1, 3))
    assert led(Failed("b1/a", "n2", 3, "exit 1")) == ["failed", "blocked", "blocked", "blocked"]
    assert [led.state(f"b1/{n}") for n in "abcd"] == [BLOCKED, BLOCKED, BLOCKED, QUEUED]
    a = led.led.job("b1/a")
    assert a is not None and a.failed_on == ("n1", "n2") and a.reason is not None
    assert a.reason.startswith("failed on n1, n2")
    assert led(Assign("b1/a", "n3", 1, 4)) == ["rejected"]


def test_block_voids_the_assignment() -> None:
    led = Ledger()
    led(build())
    led(Assign("b1/only", "n1", 1, 1))
    assert led(Block("b1/only", "needs a person")) == ["blocked"]
    assert led(Done("b1/only", "n1", 1, arts("x"))) == ["rejected_stale"]
    assert led(Block("b1/only", "again")) == ["rejected"]


def test_cancel_stops_everything_but_what_is_done() -> None:
    led = Ledger()
    led(build(a=(), b=("a",), c=()))
    led(Assign("b1/a", "n1", 1, 1))
    led(Done("b1/a", "n1", 1, arts("a")))
    led(Assign("b1/c", "n2", 1, 1))
    assert led(Cancel("b1", 2)) == ["cancelled"]
    assert [led.state(f"b1/{n}") for n in "abc"] == [DONE, CANCELLED, CANCELLED]
    assert led(Done("b1/c", "n2", 1, arts("c"))) == ["rejected_stale"]
    assert led.led.ready() == [] and led.led.finished("b1")
    assert led(Cancel("b1", 3)) == ["duplicate"]
    b = led.led.build("b1")
    assert b is not None and b.cancelled_term == 2
    assert led(Cancel("nope", 3)) == ["rejected"]


def test_a_resubmitted_build_is_a_duplicate_and_a_different_one_is_refused() -> None:
    led = Ledger()
    assert led(build()) == ["submitted"]
    assert led(build()) == ["duplicate"]
    assert led(build(other=())) == ["rejected"]
    assert [b.build_id for b in led.led.builds()] == ["b1"]


def test_noops_and_invalid_entries_only_advance_the_index() -> None:
    led = Ledger()
    before = led.led.snapshot()
    assert led(b"") == []
    assert led(b"\xc1") == ["invalid"]
    assert led({"op": "assign"}) == ["invalid"]
    assert led.led.applied == 3
    assert JobLedger.restore(led.led.snapshot()).tally["invalid"] == 2
    assert before != led.led.snapshot()
    with pytest.raises(ValueError):
        led.led.apply(7, b"")


def test_requeue_only_applies_to_a_held_job() -> None:
    led = Ledger()
    led(build())
    assert led(Requeue("b1/only", "x")) == ["rejected"]
    led(Assign("b1/only", "n1", 1, 1))
    led(Started("b1/only", "n1", 1))
    assert led(Requeue("b1/only", "n1 died")) == ["requeued"]
    job = led.led.job("b1/only")
    assert job is not None and (job.state, job.node, job.attempt) == (QUEUED, None, 1)


def test_a_done_job_is_built_again_only_by_a_redo_and_then_as_a_new_attempt() -> None:
    led = Ledger()
    led(build())
    assert led(Redo("b1/only", "lost")) == ["rejected"]  # queued: nothing to build again
    led(Assign("b1/only", "n1", 1, 1))
    assert led(Redo("b1/only", "lost")) == ["rejected"]  # held: a requeue's business
    led(Done("b1/only", "n1", 1, (("out", H),)))
    assert led.led.finished("b1")
    assert led(Redo("b1/only", "its outputs were lost with n1 (dead)")) == ["redone"]
    job = led.led.job("b1/only")
    assert job is not None and (job.state, job.node, job.artifacts, job.reason) == (
        QUEUED, None, (), "its outputs were lost with n1 (dead)")
    assert not led.led.finished("b1")
    assert led(Done("b1/only", "n1", 1, (("out", H),))) == ["rejected_stale"]  # (the lost one)
    led(Assign("b1/only", "n2", 2, 2))
    led(Done("b1/only", "n2", 2, (("out", H),)))
    assert led.led.finished("b1") and led.led.job("b1/only").attempt == 2  # type: ignore[union-attr]
    assert decode(encode(Redo("b1/only", "x"))) == Redo("b1/only", "x")


def test_a_redone_job_holds_back_its_dependents_until_it_is_done_again() -> None:
    """Seen in the fault benchmark: j03 was redone while its dependent j10, requeued from a
    dead worker, waited; j10 was then started at once, without j03's output. Before redo a
    done job stayed done, so its dependents' count of unfinished dependencies only fell."""
    led = Ledger()
    led(build(a=(), b=("a",), c=("a",)))
    led(Assign("b1/a", "n1", 1, 1))
    led(Done("b1/a", "n1", 1, (("out", H),)))
    led(Assign("b1/c", "n1", 1, 1))
    led(Done("b1/c", "n1", 1, (("out", H),)))  # (c already ran with a's outputs: it stays done)
    assert [j.name for j in led.led.ready()] == ["b"]
    assert led(Redo("b1/a", "its outputs were lost with n1 (dead)")) == ["redone"]
    assert [j.name for j in led.led.ready()] == ["a"]  # not b: its input is gone
    assert led.led.job("b1/c").state == "done"  # type: ignore[union-attr]
    led(Assign("b1/a", "n2", 2, 2))
    led(Done("b1/a", "n2", 2, (("out", H),)))
    assert [j.name for j in led.led.ready()] == ["b"]
    restored = JobLedger.restore(led.led.snapshot())
    assert [j.name for j in restored.ready()] == ["b"]


# ---------------------------------------------------------------------------------------------
# Snapshots


def _random_commands(rng: random.Random, n: int) -> list[Command]:
    cmds: list[Command] = [build(f"b{i}", a=(), b=("a",), c=("a", "b")) for i in range(3)]
    keys = [f"b{i}/{j}" for i in range(3) for j in "abc"]
    nodes = ["n1", "n2", "n3"]
    for _ in range(n):
        key, node, attempt = rng.choice(keys), rng.choice(nodes), rng.randint(1, 4)
        cmds.append(
            rng.choice(
                [
                    Assign(key, node, rng.randint(1, 3), attempt),
                    Started(key, node, attempt),
                    Done(key, node, attempt, arts(key)),
                    Failed(key, node, attempt, "exit 1"),
                    Requeue(key, "lost"),
                    Redo(key, "its outputs were lost"),
                    Block(key, "op"),
                    Cancel(key.split("/")[0], 3),
                ]
            )
        )
    return cmds


@pytest.mark.parametrize("seed", range(20))
def test_a_restored_snapshot_continues_exactly_like_the_original(seed: int) -> None:
    rng = random.Random(seed)
    cmds = [encode(c) for c in _random_commands(rng, 300)]
    whole = JobLedger()
    for i, c in enumerate(cmds, 1):
        whole.apply(i, c)
    cut = rng.randint(0, len(cmds))
    half = JobLedger()
    for i, c in enumerate(cmds[:cut], 1):
        half.apply(i, c)
    resumed = JobLedger.restore(half.snapshot())
    assert resumed.snapshot() == half.snapshot()
    for i, c in enumerate(cmds[cut:], cut + 1):
        resumed.apply(i, c)
    assert resumed.snapshot() == whole.snapshot()
    assert resumed.tally == whole.tally and resumed.ready() == whole.ready()


def test_malformed_snapshots_raise_ledger_error() -> None:
    for data in (b"", b"\xc1", msgpack.packb({"v": 9}), msgpack.packb({"v": 1, "applied": 1})):
        with pytest.raises(LedgerError):
            JobLedger.restore(data)


# ---------------------------------------------------------------------------------------------
# The worker's fence


def test_the_fence_refuses_orders_from_deposed_leaders() -> None:
    f = Fence()
    assert f.admit(3) and f.term == 3
    assert f.admit(3)  # the same leader again
    assert not f.admit(2) and f.refused == 1
    f.observe(5)  # e.g. the node's own Raft term
    assert not f.admit(4) and f.admit(5) and f.admit(7) and f.term == 7
    f.observe(6)
    assert f.term == 7  # never backwards


def test_pinned_voters_are_committed_state_and_survive_a_snapshot():
    from swarmnode.ledger import JobLedger, LedgerError, SetVoters, decode, encode, from_plain

    led = JobLedger()
    [ev] = led.apply(1, encode(SetVoters(("b" * 52, "a" * 52))))
    assert ev.kind == "voters_set" and led.pinned_voters == ("a" * 52, "b" * 52)
    again = JobLedger.restore(led.snapshot())
    assert again.pinned_voters == led.pinned_voters and again.snapshot() == led.snapshot()
    led.apply(2, encode(SetVoters(())))
    assert led.pinned_voters == ()
    assert decode(encode(SetVoters(("x",)))) == SetVoters(("x",))
    with pytest.raises(LedgerError, match="set_voters"):
        from_plain({"op": "set_voters", "voters": ["v"] * 10})
    with pytest.raises(LedgerError):
        from_plain({"op": "set_voters", "voters": "abc"})


# ---------------------------------------------------------------------------------------------
# Batches


def test_a_batch_is_applied_exactly_as_its_commands_one_by_one() -> None:
    """Whatever the commands, a `Batch` gives the same state and events as the same commands
    in entries of their own; each is judged on its own (a stale report in the middle is
    rejected, the rest still count), and an assignment whose dependency's result comes
    earlier in the same batch is accepted -- or refused if that result was stale."""
    rng = random.Random(3)
    for _ in range(200):
        cmds: list[Command] = [build("b1", a=(), b=("a",), c=("a",)), build("b2")]
        for _ in range(rng.randint(1, 12)):
            key = rng.choice(["b1/a", "b1/b", "b1/c", "b2/only"])
            node, attempt = rng.choice(["n1", "n2"]), rng.randint(1, 3)
            cmds.append(rng.choice([
                Assign(key, node, rng.randint(1, 2), attempt),
                Started(key, node, attempt),
                Done(key, node, attempt, arts(key)),
                Failed(key, node, attempt, "exit 1"),
            ]))
        one_by_one, batched = JobLedger(), JobLedger()
        events = [e for i, c in enumerate(cmds, 1) for e in one_by_one.apply(i, encode(c))]
        batched.apply(1, encode(cmds[0]))
        parts = batched.apply_parts(2, encode(Batch(tuple(cmds[1:]))))
        assert [c for c, _evs in parts] == cmds[1:]
        events_b = batched.tally  # same outcomes, counted alike
        assert Counter(e.kind for e in events) == events_b
        for b in ("b1", "b2"):
            assert [(j.state, j.node, j.attempt, j.artifacts) for j in one_by_one.jobs(b)] == [
                (j.state, j.node, j.attempt, j.artifacts) for j in batched.jobs(b)]


def test_a_stale_report_in_a_batch_is_rejected_and_the_rest_count() -> None:
    led = Ledger()
    led(build(a=(), b=("a",)))
    led(Assign("b1/a", "n1", 1, 1))
    led(Requeue("b1/a", "n1 unreachable"))
    led(Assign("b1/a", "n2", 2, 2))
    assert led(Batch((
        Done("b1/a", "n1", 1, arts("old")),  # stale: requeued
        Assign("b1/b", "n1", 2, 1),  # so its dependency is not done: refused
        Done("b1/a", "n2", 2, arts("good")),
        Assign("b1/b", "n3", 2, 1),  # now it is
        Started("b1/b", "n3", 1),
    ))) == ["rejected_stale", "rejected", "done", "assigned", "started"]
    a, b = led.led.job("b1/a"), led.led.job("b1/b")
    assert a is not None and (a.state, a.artifacts) == (DONE, arts("good"))
    assert b is not None and b.state in ACTIVE and b.node == "n3"


def test_one_invalid_command_voids_a_batch_so_checked_refuses_it_first() -> None:
    """A batch is parsed whole: a Done with a bad digest makes the entry invalid (the build
    and the valid report with it are lost). `checked` refuses such a command up front, and
    gives a valid one as the replicas will read it."""
    led = Ledger()
    led(build(a=(), b=()))
    led(Assign("b1/a", "n1", 1, 1))
    led(Assign("b1/b", "n2", 1, 1))
    good = Done("b1/b", "n2", 1, arts("good"))
    bad = Done("b1/a", "n1", 1, (("a", "not-a-digest"),))
    assert led(Batch((build("b2"), good, bad))) == ["invalid"]
    for cmd in (
        bad,
        Done("b1/a", "n1", 1, (("a" * (MAX_PATH + 1), H),)),
        Done("b1/a", "n1", 1, tuple((f"f{i}", H) for i in range(MAX_ARTIFACTS + 1))),
        Done("b1/a", "n1", 1, (("a", H, 1),)),  # type: ignore[arg-type]
        Done("b1/a", "n1", 1, ((["a"], H),)),  # type: ignore[arg-type]
        Done("b1/a", "n1", 1, None),  # type: ignore[arg-type]
        Failed("b1/a", "n1", 1, "x" * 5000),
        Failed("b1/a", "n1", 1, "exit 1", "t" * (300 * 1024)),  # too large for an entry
        Started("b1/a", "n1", 0),
    ):
        with pytest.raises(LedgerError):
            checked(cmd)
    assert checked(good) == good
    unsorted = Done("b1/a", "n1", 1, (("z", H), ("a", H)))
    assert checked(unsorted) == Done("b1/a", "n1", 1, (("a", H), ("z", H)))
    assert led(Batch((build("b2"), good, checked(unsorted)))) == ["submitted", "done", "done"]


# ---------------------------------------------------------------------------------------------
# The derived indexes (ready, active, progress) against a recomputation from the jobs


def _recomputed(led: JobLedger) -> tuple[list[str], list[str], dict[str, dict[str, int]]]:
    """ready, active and progress as their definitions say, from every job of every build."""
    ready, active, progress = [], [], {}
    for b in led.builds():
        jobs = led.jobs(b.build_id)
        done = {j.name for j in jobs if j.state == DONE}
        ready += [j.key for j in jobs if j.state in (QUEUED, FAILED) and set(j.spec.deps) <= done]
        active += [j.key for j in jobs if j.state in ACTIVE]
        counts = Counter(j.state for j in jobs)
        progress[b.build_id] = {s: counts[s] for s in (QUEUED, ASSIGNED, RUNNING, DONE, FAILED,
                                                       BLOCKED, CANCELLED)}
        progress[b.build_id]["total"] = len(jobs)
    return ready, active, progress


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_the_indexes_match_the_jobs_after_any_sequence_of_commands(seed: int) -> None:
    """Random graphs and random (valid or not) commands: after each one, `ready`, `active`,
    `progress` and `finished` equal what the jobs say, and a ledger restored from a snapshot
    has the same indexes."""
    rng = random.Random(seed)
    led = Ledger()
    names = [f"j{i}" for i in range(6)]
    for b in ("b1", "b2"):
        led(build(b, **{n: tuple(sorted({rng.choice(names[:i]) for _ in range(rng.randint(0, 2))}
                                         if i else ())) for i, n in enumerate(names)}))
    for step in range(60):
        key = f"{rng.choice(('b1', 'b2'))}/{rng.choice(names)}"
        node, job = rng.choice(("n1", "n2", "n3")), led.led.job(key)
        assert job is not None
        pick = rng.random()
        if pick < 0.35:
            cmd: Command = Assign(key, node, 1, job.attempt + 1)
        elif pick < 0.45:
            cmd = Started(key, job.node or node, job.attempt)
        elif pick < 0.7:
            cmd = Done(key, job.node or node, job.attempt, arts(key), 1.5, rng.choice((0, 8.25)))
        elif pick < 0.82:
            cmd = Failed(key, rng.choice((job.node or node, node)), job.attempt, "broke",
                         joules=rng.choice((0.0, 2.5)))
        elif pick < 0.9:
            cmd = Requeue(key, "node gone")
        elif pick < 0.96:
            cmd = Block(key, "no member")
        else:
            cmd = Cancel(key.split("/")[0], 1)
        led(cmd)
        ready, active, progress = _recomputed(led.led)
        assert [j.key for j in led.led.ready()] == ready, step
        assert set(led.led.ready_keys()) == set(ready)
        assert [j.key for j in led.led.active()] == active
        for b, counts in progress.items():
            assert led.led.progress(b) == counts
            assert led.led.finished(b) == (counts["total"] == sum(
                counts[s] for s in (DONE, BLOCKED, CANCELLED)))
            assert led.led.energy(b) == pytest.approx(sum(j.joules for j in led.led.jobs(b)))
    copy = JobLedger.restore(led.led.snapshot())
    assert all(copy.energy(b.build_id) == led.led.energy(b.build_id) for b in copy.builds())
    assert [j.key for j in copy.ready()] == [j.key for j in led.led.ready()]
    assert [j.key for j in copy.active()] == [j.key for j in led.led.active()]
    assert all(copy.progress(b.build_id) == led.led.progress(b.build_id) for b in copy.builds())


# ---------------------------------------------------------------------------------------------
# Costs (seconds, joules) and operator pauses


def test_reports_without_costs_are_written_as_before_and_costs_add_up_per_build() -> None:
    """A report that states no seconds or joules has the plain form nodes from before them
    read; the joules of failed and done attempts add up to the build's energy, a job's
    seconds are its last attempt's."""
    assert set(to_plain(Done("b1/a", "n", 1, ()))) == {"op", "job_key", "node", "attempt",
                                                       "artifacts"}
    assert "joules" in to_plain(Done("b1/a", "n", 1, (), 0.0, 1.0))
    led = Ledger()
    led(build("b1", a=(), b=()))
    led(Assign("b1/a", "n1", 1, 1))
    led(Failed("b1/a", "n1", 1, "exit 1", "", 4.0, 100.0))
    led(Assign("b1/a", "n2", 1, 2))
    led(Done("b1/a", "n2", 2, arts("a"), 2.5, 50.0))
    led(Assign("b1/b", "n2", 1, 1))
    led(Done("b1/b", "n2", 1, arts("b"), 1.0, 0.0))
    job = led.led.job("b1/a")
    assert job is not None and (job.seconds, job.joules) == (2.5, 150.0)
    assert led.led.energy("b1") == 150.0 and led.led.energy("nope") == 0.0
    copy = JobLedger.restore(led.led.snapshot())
    assert copy.job("b1/a") == job and copy.energy("b1") == 150.0
    # a stale or duplicate report adds nothing
    assert led(Done("b1/a", "n2", 2, arts("a"), 2.5, 50.0)) == ["duplicate"]
    assert led.led.energy("b1") == 150.0


def test_pause_and_resume_are_replicated_and_survive_a_snapshot() -> None:
    led = Ledger()
    assert led(Pause("n1", True)) == ["paused"]
    assert led(Pause("n1", True)) == ["duplicate"]
    assert led(Pause("n2", True)) == ["paused"]
    assert led(Pause("n1", False)) == ["resumed"]
    assert led.led.paused == {"n2"}
    assert JobLedger.restore(led.led.snapshot()).paused == {"n2"}


def test_energy_is_the_same_on_every_replica_and_any_sum_restores() -> None:
    """The per-build sum does not depend on the order it was added up in (a replica restored
    from a snapshot adds in job order), and a job's joules summed over attempts past the
    bound of one report still restore."""
    rng = random.Random(7)
    led = Ledger()
    led(build("b1", **{f"j{i}": () for i in range(40)}))
    for i in range(40):
        led(Assign(f"b1/j{i}", "n1", 1, 1))
    for i in rng.sample(range(40), 40):  # finishing in a random order
        led(Done(f"b1/j{i}", "n1", 1, arts(str(i)), 1.0, rng.uniform(0, 1000)))
    copy = JobLedger.restore(led.led.snapshot())
    assert copy.energy("b1") == led.led.energy("b1")
    big = Ledger()
    big(build("b2"))
    for attempt, node in ((1, "n1"), (2, "n2")):
        big(Assign("b2/only", node, 1, attempt))
        big(Failed("b2/only", node, attempt, "exit 1", "", 1.0, 9.9e12))
    job = big.led.job("b2/only")
    assert job is not None and job.joules == 1.98e13
    assert JobLedger.restore(big.led.snapshot()).job("b2/only") == job


def test_snapshots_keep_version_2s_form_until_something_needs_3() -> None:
    """A node rolled back to a version before format 3 can still restore the ledger, until a
    pause or a job's figures are in it."""
    led = Ledger()
    led(build("b1", a=(), b=()))
    led(Assign("b1/a", "n1", 1, 1))
    led(Done("b1/a", "n1", 1, arts("a")))
    plain = led.led.to_plain()
    assert plain["v"] == 2 and "paused" not in plain
    assert all(set(j) == {"name", "spec", "state", "node", "term", "attempt", "artifacts",
                          "reason", "log_tail", "failed_on"} for j in plain["builds"][0]["jobs"])
    led(Pause("n2", True))
    assert led.led.to_plain()["v"] == 3
    led(Pause("n2", False))
    assert led.led.to_plain()["v"] == 2
    led(Assign("b1/b", "n1", 1, 1))
    led(Done("b1/b", "n1", 1, arts("b"), 0.5))
    assert led.led.to_plain()["v"] == 3


def test_the_snapshot_packed_a_build_at_a_time_is_the_plain_forms_msgpack() -> None:
    """`snapshot` streams (no whole plain form in memory at once) yet gives the very bytes
    of packing `to_plain`, in both forms, empty or not, so replicas still compare equal."""
    led = Ledger()

    def same() -> None:
        data = led.led.snapshot()
        assert data == msgpack.packb(led.led.to_plain(), use_bin_type=True)
        assert JobLedger.restore(data).to_plain() == led.led.to_plain()

    same()
    led(build("b1", a=(), b=("a",)))
    led(build("b2"))
    led(Assign("b1/a", "n1", 1, 1))
    led(Done("b1/a", "n1", 1, arts("a")))
    same()  # version 2's form
    led(Pause("n2", True))
    led(Done("b1/a", "n1", 1, arts("a"), 0.5, 2.0))
    same()  # version 3's


def test_a_version_2_snapshot_is_still_read() -> None:
    """Snapshots from before costs and pauses: no `paused`, jobs without seconds/joules."""
    led = Ledger()
    led(build("b1"))
    led(Assign("b1/only", "n1", 1, 1))
    led(Done("b1/only", "n1", 1, arts("x"), 3.0, 9.0))
    plain = led.led.to_plain()
    assert plain["v"] == SNAPSHOT_VERSION == 3
    del plain["paused"]
    for b in plain["builds"]:
        for j in b["jobs"]:
            del j["seconds"], j["joules"]
    old = JobLedger.restore(msgpack.packb({**plain, "v": 2}))
    job = old.job("b1/only")
    assert job is not None and job.state == DONE and (job.seconds, job.joules) == (0.0, 0.0)
    assert old.paused == frozenset()
    with pytest.raises(LedgerError, match="keys"):  # v3 without `paused`
        JobLedger.restore(msgpack.packb({**plain, "v": 3}))
    with pytest.raises(LedgerError, match="version"):
        JobLedger.restore(msgpack.packb({**plain, "v": 1}))


# ---------------------------------------------------------------------------------------------
# Forgetting finished builds


def _finished_build(led: Ledger, build_id: str) -> None:
    """Submit `build_id` (a <- b) and finish it: a fails on n1, is done on n2, b is done."""
    led(build(build_id, a=(), b=("a",)))
    led(Assign(f"{build_id}/a", "n1", 1, 1))
    led(Failed(f"{build_id}/a", "n1", 1, "exit 1"))
    led(Assign(f"{build_id}/a", "n2", 1, 2))
    led(Done(f"{build_id}/a", "n2", 1 + 1, arts("a"), 1.0, 2.0))
    led(Assign(f"{build_id}/b", "n1", 1, 1))
    led(Done(f"{build_id}/b", "n1", 1, arts("b"), 1.0, 3.0))


def test_a_forgotten_build_leaves_the_ledger_its_indexes_and_its_snapshot() -> None:
    led = Ledger()
    fresh = JobLedger()  # the same ledger that never held b1
    _finished_build(led, "b1")
    led(build("b2", a=(), b=("a",)))
    fresh.applied = led.led.applied - 1
    fresh.apply(fresh.applied + 1, encode(build("b2", a=(), b=("a",))))
    assert led(Forget(("b1",))) == ["forgotten"]
    assert led.led.build("b1") is None and led.led.jobs("b1") == [] and led.led.job("b1/a") is None
    assert not led.led.finished("b1") and led.led.energy("b1") == 0
    assert led.led.progress("b1")["total"] == 0 and led.led.dependents("b1/a") == ()
    inner = led.led
    for index in (inner._rank, inner._waiting, inner._dependents, inner._jobs):
        assert not any(k.startswith("b1/") for k in index)
    assert "b1" not in inner._counts and "b1" not in inner._mj
    # what remains equals a ledger that never had b1 (but for the index and the tally)
    assert [j.key for j in led.led.ready()] == [j.key for j in fresh.ready()] == ["b2/a"]
    mine, theirs = led.led.to_plain(), fresh.to_plain()
    assert mine["builds"] == theirs["builds"]
    restored = JobLedger.restore(led.led.snapshot())
    assert restored.snapshot() == led.led.snapshot() and restored.build("b1") is None


def test_forget_is_rejected_for_unfinished_and_unknown_builds_and_judged_per_build() -> None:
    led = Ledger()
    _finished_build(led, "b1")
    led(build("b2", a=()))
    led(Assign("b2/a", "n1", 1, 1))
    before = led.led.snapshot()
    assert led(Forget(("b2",))) == ["rejected"]  # one job still running
    assert led(Forget(("nope",))) == ["rejected"]
    assert led.led.tally["rejected"] == 2
    assert led.led.build("b2") is not None and led.led.to_plain()["builds"] == \
        JobLedger.restore(before).to_plain()["builds"]
    assert led(Forget(("b2", "b1", "nope"))) == ["rejected", "forgotten", "rejected"]
    assert led(Forget(("b1",))) == ["rejected"]  # once
    led(Block("b2/a", "operator"))
    assert led(Forget(("b2",))) == ["forgotten"] and led.led.builds() == []


def test_a_cancelled_build_can_be_forgotten_and_a_forgotten_id_is_a_new_build() -> None:
    led = Ledger()
    led(build("b1", a=(), b=("a",)))
    led(Cancel("b1", 1))
    assert led(Forget(("b1",))) == ["forgotten"]
    assert led(build("b1", a=(), b=("a",))) == ["submitted"]
    assert led.state("b1/a") == QUEUED


@pytest.mark.parametrize("seed", range(10))
def test_replicas_forgetting_alike_hold_equal_snapshots(seed: int) -> None:
    """Random commands with forgets among them, applied by two replicas, one restored from a
    snapshot on the way: equal snapshots, and a forget removes exactly the finished builds."""
    rng = random.Random(seed)
    cmds = _random_commands(rng, 200)
    for i in range(len(cmds) // 20):
        ids = tuple(rng.sample([f"b{i}" for i in range(3)], rng.randint(1, 3)))
        cmds.insert(rng.randint(3, len(cmds)), Forget(ids))
    a, b = JobLedger(), JobLedger()
    cut = rng.randint(0, len(cmds))
    for i, c in enumerate(cmds, 1):
        if i == cut:
            b = JobLedger.restore(b.snapshot())
        if isinstance(c, Forget):
            finished = {x for x in c.build_ids if a.finished(x)}
        events = a.apply(i, encode(c))
        assert b.apply(i, encode(c)) == events
        if isinstance(c, Forget):
            assert {e.data["build_id"] for e in events if e.kind == "forgotten"} == finished
            assert all(a.build(x) is None for x in finished)
    assert a.snapshot() == b.snapshot() and a.tally == b.tally


def test_the_ledger_size_is_bounded_by_the_builds_it_holds() -> None:
    """The RSS argument: after forgetting, the snapshot (the ledger's size) is what it was
    before the builds came."""
    led = Ledger()
    led(build("b0", a=()))
    empty = len(led.led.snapshot())
    for i in range(1, 51):
        _finished_build(led, f"b{i}")
    assert len(led.led.snapshot()) > 20 * empty
    for first in range(1, 51, 10):
        led(Forget(tuple(f"b{i}" for i in range(first, first + 10))))
    assert len(led.led.snapshot()) <= empty + 64  # (the tally's counts grow, not the builds)
