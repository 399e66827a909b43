"""The worker side of builds, between real nodes in-process (real ZeroMQ, real gcc).

What must hold: an assignment runs on the worker with its inputs fetched from the member that
has them; its outputs land in the worker's artifact store and a report waits on disk until the
leader acknowledges it; an assignment or cancellation from a lower term than seen is refused.
"""

from __future__ import annotations

import dataclasses
import shutil

import msgpack
import pytest

from swarmnode import worker as jobs
from tests.test_artifact_service import stop, three_nodes

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")]

A_C = b'#include <stdio.h>\nint main(void) { puts("hello from the swarm"); return 0; }\n'


async def proven_leader(running, worker):
    """The leader `worker` checked the proof of, and its term: only its assignments count."""
    from tests.test_node import until

    core = worker.leadership.core
    await until(lambda: core.proven_leader(core.term) is not None, timeout=30)
    term = core.term
    return next(n for n, _ in running if n.id == core.proven_leader(term)), term


def vouch(running) -> None:
    """Every node, as leader, calls the tests' assignments current: they are sent by hand and
    are in no ledger, so a worker that asks first (`Worker._in_touch`: here, one whose input
    fetch took long, or that heard its leader only lately) would be told they moved on."""
    for node, _ in running:
        node.builds.attempt_state = lambda *_args: jobs.CURRENT


async def test_assignment_runs_reports_and_stale_terms_are_refused(tmp_path):
    from tests.test_node import until

    running = await three_nodes(tmp_path)
    (_, _), (b, _), _ = running
    vouch(running)
    try:
        a, term = await proven_leader(running, b)
        src = a.artifacts.store.put_bytes(A_C)
        assignment = jobs.Assignment(
            build="b1", job="hello", attempt=1, term=term, cmd=("gcc", "-O2", "-o", "hello",
                                                              "src/hello.c"),
            env={}, outputs=("hello",), cores=1, timeout=60.0, inputs=(("src/hello.c", src),),
            deps={}, sources=(a.id,))
        a.send_raw(b.id, jobs.ASSIGN, jobs.pack(assignment.plain()))
        await until(lambda: b.worker.pending_reports(), timeout=30)
        [report] = b.worker.pending_reports()
        assert (report["status"], report["job"], report["attempt"]) == ("ok", "hello", 1), report
        [(path, digest, size)] = report["outputs"]
        assert path == "hello" and b.artifacts.store.size(digest) == size
        out = tmp_path / "hello"
        b.artifacts.store.export(digest, out, link=False)
        import subprocess

        out.chmod(0o755)
        assert subprocess.run([str(out)], capture_output=True, text=True).stdout == \
            "hello from the swarm\n"
        assert b.worker.fence.term == term and b.store.get(jobs.FENCE_KEY) == term

        # a leader of an earlier term can neither start nor cancel anything
        stale = jobs.Assignment(**{**assignment.__dict__, "attempt": 2, "term": term - 1})
        a.send_raw(b.id, jobs.ASSIGN, jobs.pack(stale.plain()))
        a.send_raw(b.id, jobs.CANCEL, jobs.pack({"build": "b1", "job": None,
                                                 "term": term - 1}))
        await until(lambda: len([e for e in b.store.events(limit=1000)
                                 if e["kind"] == "job_refused"]) == 2)
        assert not b.worker.running

        # the leader's acknowledgement clears the report from disk
        a.send_raw(b.id, jobs.REPORT_ACK, msgpack.packb({"build": "b1", "job": "hello",
                                                         "attempt": 1}))
        await until(lambda: not b.worker.pending_reports())

        # the assignment again (sent before its result was committed) does not run it again:
        # the stale one after it is refused, so both have been handled (in order)
        a.send_raw(b.id, jobs.ASSIGN, jobs.pack(assignment.plain()))
        a.send_raw(b.id, jobs.ASSIGN, jobs.pack(stale.plain()))
        await until(lambda: len([e for e in b.store.events(limit=1000)
                                 if e["kind"] == "job_refused"]) == 3)
        assert not b.worker.running and not b.worker.pending_reports()
        assert list(b.worker.acked) == [("b1", "hello", 1)]
    finally:
        await stop(running)


def test_malformed_assignments_are_named():
    good = {"build": "b", "job": "j", "attempt": 0, "term": 1, "cmd": "make", "cores": 2}
    assert jobs.Assignment.from_plain(good).cmd == "make"
    for bad, field in (({"job": "../x"}, "job"), ({"cmd": []}, "cmd"), ({"term": -1}, "term"),
                       ({"inputs": [["a", "nothex"]]}, "inputs"), ({"timeout": 0}, "timeout"),
                       ({"env": {"A": 1}}, "env")):
        with pytest.raises(jobs.AssignmentError, match=field):
            jobs.Assignment.from_plain({**good, **bad})


def test_an_assignment_survives_its_wire_form():
    """`plain` is written field by field: every field goes, and comes back equal."""
    a = jobs.Assignment(build="b", job="j", attempt=2, term=3, cmd=("cc", "-c", "x.c"),
                        env={"CFLAGS": "-O2"}, outputs=("*.o",), cores=4, timeout=60.0,
                        inputs=(("x.c", "ab" * 32),), deps={"gen": (("gen.h", "cd" * 32),)},
                        sources=("n1", "n2"))
    plain = jobs.Assignment.from_plain(msgpack.unpackb(jobs.pack(a.plain()), raw=False))
    assert set(a.plain()) == {f.name for f in dataclasses.fields(jobs.Assignment)}
    assert plain == a


def test_held_includes_reports_finished_this_turn():
    """A report finished this turn is not yet in the outbox (`_flush` writes it at the turn's
    end): a held list sent in between must still name its attempt, or the leader requeues a
    job whose result is on its way."""
    from types import SimpleNamespace

    w = object.__new__(jobs.Worker)
    outbox = [{"build": "b", "job": "old", "attempt": 1, "status": "ok"}]
    w.node = SimpleNamespace(store=SimpleNamespace(outbox=lambda: list(outbox)))
    a = jobs.Assignment(build="b", job="run", attempt=2, term=1, cmd="true", env={}, outputs=(),
                        cores=1, timeout=None, inputs=(), deps={}, sources=())
    w.running = {("b", "run"): (a, None)}
    w._unsaved = [{"build": "b", "job": "just", "attempt": 3, "status": "ok"}]
    w._outgoing = [{"build": "b", "job": "run", "attempt": 2, "status": "started"}]
    held = {tuple(h) for h in w.held()}
    assert held == {("b", "run", 2), ("b", "just", 3), ("b", "old", 1)}


def test_the_held_list_is_sent_only_when_the_leader_needs_it():
    """Every HELD_S only while the node holds attempts or the ledger has jobs on it: an idle
    node sends none (the leader requeues a job the ledger has here and the node does not
    hold: for that it must hear the empty list)."""
    from types import SimpleNamespace

    w = object.__new__(jobs.Worker)
    outbox: list[dict] = []
    active: list[SimpleNamespace] = []
    w.node = SimpleNamespace(id="me", store=SimpleNamespace(outbox=lambda: list(outbox)),
                             leadership=SimpleNamespace(ledger=SimpleNamespace(
                                 active=lambda: list(active))))
    w.running, w._unsaved, w._outgoing = {}, [], []
    assert not w._owes_held()  # idle
    active.append(SimpleNamespace(node="other"))
    assert not w._owes_held()  # jobs elsewhere
    active.append(SimpleNamespace(node="me"))
    assert w._owes_held()  # a job the ledger has here (held or lost by a restart)
    active.clear()
    outbox.append({"build": "b", "job": "j", "attempt": 1, "status": "ok"})
    assert w._owes_held()  # a report not yet acknowledged


def test_an_acknowledged_attempt_is_remembered_for_a_while_then_forgotten():
    """Acknowledged (its result committed), an attempt moves from `finished` to `acked`,
    which forgets it after FINISHED_KEEP_S: memory stays at a minute's jobs. An
    acknowledgement of a report never sent, or with odd fields, changes nothing."""
    from collections import OrderedDict

    w = object.__new__(jobs.Worker)
    w.finished = jobs.finished_in([{"build": "b", "job": "j", "attempt": 1, "status": "ok"},
                                   {"build": "b", "job": "k", "attempt": 2, "status": "ok"}])
    w.acked, w._acked, w._soon = OrderedDict(), [], lambda: None
    w._sent_at = {"report/b/j/1": 0.0, "report/b/k/2": 0.0, "report/['b']/k/2": 0.0}
    w._on_ack({"build": "b", "job": "j", "attempt": 1})
    w._on_ack({"build": "b", "job": "k", "attempt": 3})  # never sent
    w._on_ack({"build": ["b"], "job": "k", "attempt": 2})  # (matches a sent key's text)
    assert list(w.finished) == [("b", "k", 2)] and list(w.acked) == [("b", "j", 1)]
    assert w._acked == ["report/b/j/1", "report/['b']/k/2"]
    at = w.acked[("b", "j", 1)]
    w._forget_acked(at + jobs.FINISHED_KEEP_S)
    assert list(w.acked) == [("b", "j", 1)]
    w._forget_acked(at + jobs.FINISHED_KEEP_S + 0.1)
    assert not w.acked


def test_a_restarted_worker_knows_the_attempts_whose_reports_wait_on_disk():
    """Killed after a job ended but before the leader acknowledged it, a worker must not run
    that attempt again when the leader re-sends it: its report on disk says it finished."""
    outbox = [{"build": "b", "job": "done", "attempt": 2, "status": "ok"},
              {"build": "b", "job": "bad", "attempt": 1, "status": "failed"},
              {"build": "b", "job": "odd"}, "junk"]
    assert list(jobs.finished_in(outbox)) == [("b", "done", 2), ("b", "bad", 1)]


async def test_a_newer_attempt_keeps_its_slot_when_the_older_one_ends(tmp_path):
    """Attempt 2 of a job arriving while attempt 1 runs cancels attempt 1; attempt 1's end
    must not take attempt 2 out of the running table (it would then be started again on
    the next re-send, and its output lost), and each attempt's energy share is its own."""
    from tests.test_node import until

    running = await three_nodes(tmp_path)
    (_, _), (b, _), _ = running
    vouch(running)
    try:
        a, term = await proven_leader(running, b)
        first = jobs.Assignment(
            build="b1", job="slow", attempt=1, term=term, cmd=("sleep", "30"), env={},
            outputs=(), cores=1, timeout=60.0, inputs=(), deps={}, sources=(a.id,))
        a.send_raw(b.id, jobs.ASSIGN, jobs.pack(first.plain()))
        await until(lambda: (r := b.worker.running.get(("b1", "slow"))) and r[1] is not None)
        second = dataclasses.replace(first, attempt=2, cmd=("sleep", "1"))
        a.send_raw(b.id, jobs.ASSIGN, jobs.pack(second.plain()))
        await until(lambda: any(r["attempt"] == 1 for r in b.worker.pending_reports()))
        assert b.worker.running[("b1", "slow")][0].attempt == 2  # still there
        await until(lambda: any(r["attempt"] == 2 for r in b.worker.pending_reports()))
        reports = {r["attempt"]: r for r in b.worker.pending_reports()}
        assert reports[2]["status"] == "ok" and reports[1]["status"] != "ok", reports
        assert not b.worker.running
        assert reports[2]["joules"] >= 0 and b.power.share._busy == 0  # every core given back
    finally:
        await stop(running)


def test_an_assignment_the_ledger_here_has_moved_past_is_not_started():
    """Frozen (or cut off) after its leader sent an assignment, a worker that wakes finds its
    replica requeued, reassigned or finished that attempt meanwhile: it must not start it (the
    fault test saw such jobs run again after another node had done them)."""
    from types import SimpleNamespace

    from swarmnode.ledger import jobs as ledger

    spec = ledger.JobSpec()
    held: dict[str, ledger.Job] = {}
    w = object.__new__(jobs.Worker)
    w.node = SimpleNamespace(id="me", leadership=SimpleNamespace(
        ledger=SimpleNamespace(job=held.get)))
    a = jobs.Assignment(build="b", job="j", attempt=2, term=1, cmd="true", env={}, outputs=(),
                        cores=1, timeout=None, inputs=(), deps={}, sources=())

    def void(state: str, node: str | None, attempt: int) -> bool:
        held["b/j"] = ledger.Job("b", "j", spec, state=state, node=node, attempt=attempt)
        return w._void(a)

    assert not w._void(a)  # not applied here yet
    assert not void("assigned", "other", 1)  # the replica is behind
    assert not void("assigned", "me", 2) and not void("running", "me", 2)
    assert void("queued", None, 2)  # requeued
    assert void("assigned", "other", 3) and void("done", "other", 3)
    assert void("done", "other", 2) and void("cancelled", None, 2)


def test_only_an_assignment_that_came_in_touch_and_is_young_starts_unasked():
    """The start rule's local half: a leader heard without a long silence for a while, an
    envelope not overtaken by a newer one, a young assignment and a replica that applied
    what it knows is committed; anything else makes the worker ask the leader first."""
    from types import SimpleNamespace

    w = object.__new__(jobs.Worker)
    core = SimpleNamespace(applied_index=5, commit_index=5)
    w.node = SimpleNamespace(id="me", leadership=SimpleNamespace(core=core))
    w._contact, w._fresh = {}, {}
    gap = jobs.OUT_OF_TOUCH_S
    assert not w._arrived_in_touch("L", 100.0)  # never heard
    for t in (100.0, 100.1, 100.2, 100.3, 100.4):  # heartbeats
        w.heard("L", (1, int(t * 10)), t)
    assert w._arrived_in_touch("L", 100.4)
    w.heard("L", (1, 2000), 100.4 + gap + 0.01)  # first message after a freeze or a cut
    assert not w._arrived_in_touch("L", 100.4 + gap + 0.01)
    w.heard("L", (1, 2001), 100.5 + gap)  # the rest of the burst
    assert not w._arrived_in_touch("L", 100.5 + gap)
    for i, t in enumerate((100.6, 100.7, 100.8, 100.9, 101.0)):
        w.heard("L", (1, 2002 + i), t + gap)
    assert w._arrived_in_touch("L", 101.0 + gap)
    w.heard("L", (1, 1999), 101.05 + gap)  # overtaken on the way by a newer one
    assert not w._arrived_in_touch("L", 101.05 + gap)
    w._contact["me"] = w._contact["L"]
    assert not w._arrived_in_touch("me", 101.05 + gap)  # its own: confirmed in process

    import time

    a = jobs.Assignment(build="b", job="j", attempt=1, term=1, cmd="true", env={}, outputs=(),
                        cores=1, timeout=None, inputs=(), deps={}, sources=())
    assert not w._in_touch(a)  # not received in touch
    w._fresh[("b", "j", 1)] = time.monotonic()
    assert w._in_touch(a)
    core.commit_index = 6  # the replica has still to apply a committed entry
    assert not w._in_touch(a)
    core.commit_index = 5
    w._fresh[("b", "j", 1)] = time.monotonic() - gap - 0.01  # waited (or stalled) since
    assert not w._in_touch(a)


async def test_an_assignment_that_sat_out_a_freeze_starts_only_when_the_leader_confirms_it(
        tmp_path):
    """The fault test's race, made deterministic: an assignment reaches a worker that has just
    been thawed (SIGSTOP: it heard nothing meanwhile), its input is already local (nothing to
    fetch: no yield) and no ledger here shows it moved.
    The worker must not fork it on its own word: only when the leader says it is current;
    not at all when the leader says it moved on or does not answer."""
    import time

    from tests.test_node import until

    running = await three_nodes(tmp_path)
    try:
        leader, term = await proven_leader(running, running[1][0])
        w = next(n for n, _ in running if n is not leader)
        await until(lambda: w.leadership.leader == leader.id and
                    w.worker._arrived_in_touch(leader.id, time.monotonic()), timeout=30)
        answer, asked = [jobs.UNKNOWN], []

        def attempt_state(worker, build, job, attempt):
            asked.append((worker, build, job, attempt))
            return answer[0]

        for node, _ in running:
            node.builds.attempt_state = attempt_state
        src = w.artifacts.store.put_bytes(b"local input\n")
        # as if the worker had just been thawed: the first message after a silence sets
        # `resumed` (the test above), and until OUT_OF_TOUCH_S later nothing counts as in
        # touch (set ahead, so that the case does not depend on how fast the loop runs)
        w.worker._contact[leader.id].resumed = time.monotonic() + 60

        def assign(attempt: int) -> jobs.Assignment:
            marker = tmp_path / f"ran-{attempt}"
            a = jobs.Assignment(
                build="b1", job="j", attempt=attempt, term=term,
                cmd=("sh", "-c", f"cat in.txt > {marker}"), env={}, outputs=(), cores=1,
                timeout=60.0, inputs=(("in.txt", src),), deps={}, sources=(leader.id,))
            leader.send_raw(w.id, jobs.ASSIGN, jobs.pack(a.plain()))
            return a

        def reports(attempt: int) -> list[dict]:
            return [r for r in w.worker.pending_reports() if r["attempt"] == attempt]

        def dropped() -> int:
            return w.drops["job_unconfirmed"]

        async def answered(attempt: int) -> None:
            """Assign until the worker acted on an answer (as the leader re-sends: an
            election in between leaves it without one)."""
            while True:
                before = dropped()
                assign(attempt)
                await until(lambda n=before: reports(attempt) or dropped() > n)
                if reports(attempt):
                    return

        # no answer the worker can use: not started, nothing reported (the leader re-sends)
        assign(1)
        await until(lambda: dropped() == 1 and not w.worker.running)
        assert not reports(1) and not (tmp_path / "ran-1").exists()
        assert set(asked) <= {(w.id, "b1", "j", 1)}

        # the leader moved on (requeued, done elsewhere): never started
        answer[0] = jobs.MOVED
        await answered(2)
        assert reports(2)[0]["status"] == "error" and not (tmp_path / "ran-2").exists()
        assert (w.id, "b1", "j", 2) in asked

        # the leader says it is still this worker's: it runs
        answer[0] = jobs.CURRENT
        await answered(3)
        assert reports(3)[0]["status"] == "ok", reports(3)
        assert (tmp_path / "ran-3").read_text() == "local input\n"
        assert (w.id, "b1", "j", 3) in asked
    finally:
        await stop(running)


def test_the_leader_calls_an_attempt_current_only_from_a_complete_ledger_with_nothing_on_its_way():
    from types import SimpleNamespace

    from swarmnode.builds import Builds
    from swarmnode.ledger import jobs as ledger

    held: dict[str, ledger.Job] = {}
    states = {"w": "alive", "s": "suspect"}
    leading = [True]
    b = object.__new__(Builds)
    b._proposing = {}
    b.node = SimpleNamespace(
        clock=lambda: 0.0, leadership=SimpleNamespace(
            ledger=SimpleNamespace(job=held.get),
            core=SimpleNamespace(can_schedule=lambda _now: leading[0])),
        core=SimpleNamespace(member=lambda m: SimpleNamespace(state=states[m])
                             if m in states else None))

    def state(ledger_state: str, node: str | None, attempt: int, asker: str = "w") -> str:
        held["b/j"] = ledger.Job("b", "j", ledger.JobSpec(), state=ledger_state, node=node,
                                 attempt=attempt)
        return b.attempt_state(asker, "b", "j", 2)

    assert b.attempt_state("w", "b", "j", 2) == jobs.MOVED  # not in the ledger (forgotten)
    assert state("assigned", "w", 2) == jobs.CURRENT == state("running", "w", 2)
    assert state("done", "w", 2) == jobs.MOVED  # (done here before: not again)
    assert state("queued", None, 2) == jobs.MOVED  # requeued
    assert state("assigned", "x", 3) == jobs.MOVED == state("done", "x", 3)
    assert state("assigned", "s", 2, asker="s") == jobs.UNKNOWN  # suspected: may die soon
    b._proposing["b/j"] = 1  # a requeue on its way
    assert state("assigned", "w", 2) == jobs.UNKNOWN
    del b._proposing["b/j"]
    leading[0] = False  # no lease, or this term's ledger not complete yet
    assert state("assigned", "w", 2) == jobs.UNKNOWN
    assert b.attempt_state("w", None, "j", 2) == jobs.UNKNOWN


def test_a_stale_started_report_or_held_attempt_makes_the_leader_stop_that_attempt():
    """Defense in depth: a worker that started (or holds) an attempt the ledger has moved past
    is told to stop that attempt (and only that one: a newer attempt it may run stays)."""
    from types import SimpleNamespace

    import msgpack

    from swarmnode.builds import Builds
    from swarmnode.ledger import jobs as ledger

    held = {"b/j": ledger.Job("b", "j", ledger.JobSpec(), state="done", node="x", attempt=3)}
    sent, events = [], []
    b = object.__new__(Builds)
    b.node = SimpleNamespace(
        id="L", clock=lambda: 0.0, event=lambda kind, data: events.append(kind),
        send_raw=lambda to, t, body: sent.append((to, t, msgpack.unpackb(body))),
        leadership=SimpleNamespace(ledger=SimpleNamespace(job=held.get), core=SimpleNamespace(
            can_schedule=lambda _now: True, term=7)))
    b._on_report("w", {"build": "b", "job": "j", "attempt": 2, "status": "started"})
    assert sent == [("w", jobs.CANCEL, {"build": "b", "job": "j", "attempt": 2, "term": 7})]
    assert events == ["report_stale"]
    sent.clear()
    b._on_report("w", {"build": "b", "job": "gone", "attempt": 2, "status": "started"})
    assert not sent  # not in the ledger: nothing to judge by

    # an attempt it holds (runs on after a freeze, its `started` long sent) likewise
    held["b/k"] = ledger.Job("b", "k", ledger.JobSpec(), state="running", node="w", attempt=1)
    b._stop_stale("w", {("b", "j", 2), ("b", "j", 3), ("b", "k", 1), ("b", "gone", 1),
                        ("b", 5, 1)})
    assert sorted((to, t, m["job"], m["attempt"]) for to, t, m in sent) == [
        ("w", jobs.CANCEL, "j", 2), ("w", jobs.CANCEL, "j", 3)]  # (j's attempt 3 is x's)
    sent.clear()
    held["b/k"] = ledger.Job("b", "k", ledger.JobSpec(), state="running", node="w", attempt=2)
    b._stop_stale("w", {("b", "k", 1)})
    assert not sent  # its attempt 2 there replaces attempt 1 (an older worker would stop 2)
