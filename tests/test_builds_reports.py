"""The leader's handling of workers' reports: a report that is not a valid ledger command (a
bad output digest, too many outputs, a path too long, outputs of the wrong shape) becomes a
failure of that attempt instead of voiding the batch it would have joined -- the other
builds, reports and assignments of that batch still count -- and never raises."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from swarmnode.builds import Builds
from swarmnode.config import NodeConfig
from swarmnode.control import ControlError
from swarmnode.ledger import (
    DONE,
    FAILED,
    Assign,
    Done,
    Failed,
    JobLedger,
    JobSpec,
    SubmitBuild,
    encode,
)
from swarmnode.ledger.jobs import (
    LEDGER_FORMAT,
    MAX_ARTIFACTS,
    MAX_PATH,
    Batch,
    Pause,
    to_plain,
)
from tests.test_ledger_jobs import H, sha


def submit(build_id: str, *names: str) -> SubmitBuild:
    jobs = tuple(sorted((n, JobSpec(spec_hash=sha(n))) for n in names))
    return SubmitBuild(build_id, "hello", "client-1", jobs)


def member(mid: str, ledger_format: object) -> SimpleNamespace:
    facts = {"cores": 2} | ({} if ledger_format is None else {"ledger": ledger_format})
    return SimpleNamespace(id=mid, name=mid, admitted_by="w1", state="alive",
                           record=SimpleNamespace(facts_dict=lambda: facts))


class FakeNode:
    """What `Builds` uses of a node to take reports as the leader."""

    home: Path  # (where its history file goes: each test's tmp_path, `_home`)

    def __init__(self) -> None:
        self.members = [member("w1", LEDGER_FORMAT), member("w2", LEDGER_FORMAT)]
        self.core = SimpleNamespace(members=lambda: self.members)
        self.ledger = JobLedger()
        self.leadership = SimpleNamespace(
            on_applied=[], ledger=self.ledger,
            core=SimpleNamespace(can_schedule=lambda _now: True))
        self.drops: Counter[str] = Counter()
        self.drops.drop = lambda reason: self.drops.update([reason])  # type: ignore[attr-defined]
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.sent: list[tuple[str, str, bytes]] = []
        self.node_config = NodeConfig()

    def clock(self) -> float:
        return 0.0

    def event(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, data))

    def send_raw(self, peer: str, msg_type: str, body: bytes) -> None:
        self.sent.append((peer, msg_type, body))

    def apply(self, *cmds: Any) -> list[str]:
        return [ev.kind for c in cmds for ev in self.ledger.apply(self.ledger.applied + 1, c)]


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeNode, "home", tmp_path, raising=False)


def leader() -> tuple[Builds, FakeNode]:
    """A leader whose ledger has build b1 (jobs a, b, c), a on w1 and b on w2 (attempt 1)."""
    node = FakeNode()
    node.apply(submit("b1", "a", "b", "c"), Assign("b1/a", "w1", 1, 1), Assign("b1/b", "w2", 1, 1))
    return Builds(node), node  # type: ignore[arg-type]


def ok(job: str, outputs: Any) -> dict[str, Any]:
    return {"build": "b1", "job": job, "attempt": 1, "status": "ok", "outputs": outputs,
            "reason": None, "log_tail": "", "duration": 0.1, "joules": 2.5}


async def test_an_invalid_report_does_not_void_the_others_in_its_batch():
    builds, node = leader()
    # the reviewer's reproduction: all-or-nothing, one bad Done voids the batch
    bad = Done("b1/a", "w1", 1, (("a", "not-a-digest"),))
    good = Done("b1/b", "w2", 1, (("out", H),), 0.1, 2.5)
    copy = JobLedger.restore(node.ledger.snapshot())
    assert [e.kind for e in copy.apply(copy.applied + 1, encode(Batch((submit("b2", "x"), good,
                                                                         bad))))] == ["invalid"]

    # through the leader: the bad report becomes a failure of its attempt
    builds._on_report("w1", ok("a", [["a", "not-a-digest", 3]]))
    builds._on_report("w2", ok("b", [["out", H, 3]]))
    (cmd_a, _), (cmd_b, _) = builds._reports["b1/a"], builds._reports["b1/b"]
    assert isinstance(cmd_a, Failed) and cmd_a.reason.startswith("invalid report: ")
    assert cmd_b == good
    assert node.drops["invalid_report"] == 1
    assert [k for k, _ in node.events] == ["report_invalid"]

    # ... and the batch it joins (with a new build) is applied whole
    async def propose(cmd: Any, _keys: list[str]) -> bool:
        node.apply(encode(cmd))
        return True

    builds._propose = propose  # type: ignore[method-assign]
    fut = asyncio.get_running_loop().create_future()
    items = [(submit("b2", "x"), None, fut)]
    items += [(cmd, key, ack) for key, (cmd, ack) in builds._reports.items()]
    await builds._propose_batch(items)
    assert fut.result() is True
    assert node.ledger.build("b2") is not None
    assert node.ledger.job("b1/b").state == DONE
    assert node.ledger.job("b1/b").artifacts == (("out", H),)
    assert node.ledger.job("b1/a").state == FAILED  # assignable again: it retries elsewhere
    assert "invalid" not in node.ledger.tally
    # both workers are told to forget their reports (w1's counted, as a failure)
    builds._send_turn()
    assert sorted(peer for peer, _t, _b in node.sent) == ["w1", "w2"]


@pytest.mark.parametrize("outputs", [
    5, "abc", {"a": H}, [1, 2], [["a", H]], [("a", H, 1)], [[1, H, 1]], [[["a"], H, 1]],
    [["a", 7, 1]], [["a", "not-a-digest", 1]], [["a", H.upper(), 1]], [["/abs", H, 1]],
    [["../up", H, 1]], [["a" * (MAX_PATH + 1), H, 1]], [["a", H, 1], ["a", sha("x"), 1]],
    [[f"f{i}", H, 1] for i in range(MAX_ARTIFACTS + 1)], [[None, None, None]],
])
async def test_garbage_outputs_become_a_failure_and_never_raise(outputs):
    builds, node = leader()
    builds._on_report("w1", ok("a", outputs))
    cmd, ack = builds._reports["b1/a"]
    assert isinstance(cmd, Failed) and cmd.reason.startswith("invalid report: ")
    assert ack == {"build": "b1", "job": "a", "attempt": 1}
    assert node.drops["invalid_report"] == 1
    assert node.apply(encode(Batch((cmd,)))) == ["failed"]


async def test_valid_outputs_are_kept_and_sorted():
    builds, _node = leader()
    builds._on_report("w1", ok("a", [["z", H, 1], ["a/b", sha("x"), 2]]))
    assert builds._reports["b1/a"][0] == Done("b1/a", "w1", 1, (("a/b", sha("x")), ("z", H)),
                                              0.1, 2.5)
    builds._reports.clear()
    builds._on_report("w1", ok("a", None))  # no outputs at all
    assert builds._reports["b1/a"][0] == Done("b1/a", "w1", 1, (), 0.1, 2.5)


@pytest.mark.parametrize("duration, joules", [(-1, 2.5), ("3", None), (float("nan"), True),
                                              (1e12, 1e14), (None, float("inf"))])
async def test_bad_figures_in_a_report_count_as_not_stated(duration, joules):
    """A job's result is never lost to a bad figure: the report counts, without it."""
    builds, node = leader()
    builds._on_report("w1", {**ok("a", []), "duration": duration, "joules": joules})
    cmd = builds._reports["b1/a"][0]
    assert cmd == Done("b1/a", "w1", 1, (), *(
        v if type(v) is float and 0 <= v < 1e9 else 0.0 for v in (duration, joules)))
    assert node.apply(encode(Batch((cmd,)))) == ["done"]


async def test_costs_are_left_out_while_a_member_reads_an_older_ledger_format():
    """A member from before ledger format 3 would find a batch with `seconds`/`joules`
    invalid: while one is admitted, the leader writes reports as before."""
    for odd in (None, 2, "3", "no record"):  # none stated, older, not a number, no record
        builds, node = leader()
        node.members.append(member("old", odd))
        if odd == "no record":
            node.members[-1].record = None
        builds._on_report("w1", ok("a", []))
        cmd = builds._reports["b1/a"][0]
        assert cmd == Done("b1/a", "w1", 1, ())
        assert to_plain(cmd).keys() == {"op", "job_key", "node", "attempt", "artifacts"}


async def test_malformed_failure_fields_are_bounded():
    builds, node = leader()
    report = {**ok("a", []), "status": ["odd"], "reason": {"x": "y" * 5000},
              "log_tail": "t" * 100_000}
    builds._on_report("w1", report)
    cmd, _ack = builds._reports["b1/a"]
    assert isinstance(cmd, Failed) and not cmd.reason.startswith("invalid report")
    assert node.apply(encode(Batch((cmd,)))) == ["failed"]


async def test_an_operators_pause_is_honoured_by_the_scheduling_pass_and_needs_format_3():
    builds, node = leader()
    node.apply(Pause("w2", True))
    assert {slot.node: slot.paused for slot in builds._slots()} == {"w1": False, "w2": True}
    node.apply(Pause("w2", False))
    assert {slot.node: slot.paused for slot in builds._slots()} == {"w1": False, "w2": False}
    node.members.append(member("old", 2))
    builds._format3_until = -1.0  # (looked at again now, not a second later)
    with pytest.raises(ControlError, match=r"old cannot read a pause.*ledger format 3"):
        await builds.pause("w2", True)


async def test_an_idle_leader_makes_no_scheduling_pass():
    """With nothing ready, nothing new and no results in flight, `_schedule` returns at once:
    an idle leader of 40 looked at every member's facts on every turn."""
    builds, node = leader()
    node.leadership.core.term = 1
    looked = Counter[str]()
    node.members = [SimpleNamespace(**vars(m)) for m in node.members]
    for m in node.members:
        facts = m.record.facts_dict
        m.record = SimpleNamespace(facts_dict=lambda f=facts: looked.update(["facts"]) or f())
    node.apply(Done("b1/a", "w1", 1, ()), Done("b1/b", "w2", 1, ()))
    assert builds._schedule([], set())  # c is ready: a pass, which looks at the members
    assert looked["facts"] == 2
    node.apply(Assign("b1/c", "w1", 1, 1), Done("b1/c", "w1", 1, ()))
    assert not node.ledger.ready_keys()
    assert builds._schedule([], set()) == [] and looked["facts"] == 2  # idle: no look
