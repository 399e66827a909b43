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


async def test_assignment_runs_reports_and_stale_terms_are_refused(tmp_path):
    from tests.test_node import until

    running = await three_nodes(tmp_path)
    (_, _), (b, _), _ = running
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
