"""The leader's compaction of finished builds: which builds it proposes to forget, and when
it holds back."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from swarmnode.builds import Builds
from swarmnode.config import NodeConfig
from swarmnode.control import ControlError
from swarmnode.ledger import Assign, Done, encode
from swarmnode.ledger.jobs import Forget
from tests.test_builds_reports import (  # noqa: F401 (`_home`: each test's history file)
    FakeNode,
    _home,
    member,
    submit,
)
from tests.test_ledger_jobs import arts


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_the_leader_forgets_builds_past_the_retention_or_beyond_the_cap() -> None:
    node = FakeNode()
    node.node_config = NodeConfig(build_retention=60.0, build_keep_max=2)
    for b in ("b1", "b2", "b3", "b4"):
        node.apply(encode(submit(b, "a")))
    for b in ("b1", "b2", "b3"):
        node.apply(encode(Assign(f"{b}/a", "w1", 1, 1)), encode(Done(f"{b}/a", "w1", 1, arts(b))))
    builds = Builds(node)  # type: ignore[arg-type]
    proposed: list[Any] = []

    async def propose(cmd: Any, _keys: list[str]) -> bool:
        proposed.append(cmd)
        node.apply(encode(cmd))
        return True

    builds._propose = propose  # type: ignore[method-assign]
    builds._compact()  # three finished, at most two held: the oldest goes
    await settle()
    assert proposed == [Forget(("b1",))] and node.ledger.build("b1") is None
    builds._compact()
    await settle()
    assert len(proposed) == 1  # b2 and b3 finished just now (as this leader saw it)
    builds._finished_at["b2"] -= 61.0
    builds._compact()
    await settle()
    assert proposed[1:] == [Forget(("b2",))]
    assert [b.build_id for b in node.ledger.builds()] == ["b3", "b4"]  # b4 never: unfinished

    builds._finished_at["b3"] -= 61.0
    node.members[1] = member("w2", 3)  # reads no `forget`: it would keep b3
    builds._compact()
    await settle()
    assert len(proposed) == 2 and node.ledger.build("b3") is not None
    await builds.close()


async def test_a_build_missing_from_the_ledger_is_answered_from_the_history_only_once_caught_up(
) -> None:
    """A restarted node's ledger may not hold a running build yet, and its history may lack
    the results it had not written when it stopped: it says it is catching up rather than
    call them lost; once caught up, a missing build that ended was forgotten."""
    node = FakeNode()
    node.member_name = lambda node_id: node_id  # type: ignore[attr-defined]
    builds = Builds(node)  # type: ignore[arg-type]
    builds.history.build("b9", name="x", submitter="w1", started=1.0, jobs=1, ended=2.0, done=1,
                         blocked=0, cancelled=0, joules=0.0)
    builds.history.attempt("b9", "a", 1, node="w1", term=1, assigned=1.0, ended=2.0,
                           result="done", seconds=1.0)
    builds.history.build("b8", name="y", submitter="w1", started=1.0, jobs=1)  # (no end)
    node.leadership.caught_up, node.leadership.leader = False, "w1"
    for ask in (builds.jobs_view, builds.build_view):
        with pytest.raises(ControlError, match=r"not in this node's ledger .* catching up"):
            ask("b9")
    node.leadership.caught_up = True
    assert [(j["job"], j["state"]) for j in builds.jobs_view("b9")] == [("a", "done")]
    assert builds.build_view("b9")["ok"]
    with pytest.raises(ControlError, match="no build"):
        builds.jobs_view("b8")
    await builds.close()
