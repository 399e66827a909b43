"""The pusher's rollout core and the release/rights rules, sans-I/O and deterministic."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmnode.identity import Identity
from swarmnode.membership import MemberView, Note
from swarmnode.membership.messages import note_body
from swarmnode.push.bundle import PushSpec
from swarmnode.push.release import (
    PUSH,
    Release,
    ReleaseError,
    check,
    holders,
    newest,
    right_key,
    verify_stage,
)
from swarmnode.push.rollout import (
    STAGE_SLACK_S,
    TERMINAL,
    Publish,
    Rollout,
    Stage,
    wave_size,
)

D1 = "a" * 64
D2 = "b" * 64


def make(n: int, canaries: int, self_last: bool = False, offline: tuple[str, ...] = (),
         wave: int = 0):
    nodes = tuple(f"n{i}" for i in range(n))
    r = Rollout("n0", nodes, nodes[1:1 + canaries], 5.0, self_last, offline, wave)
    r.start(0.0)
    return r


def heal(r: Rollout, nodes, t: float = 1.0) -> None:
    for n in nodes:
        for state in ("fetching", "installed", "restarted", "healthy"):
            r.report(t, n, state)


def test_canary_first_then_published_to_the_rest() -> None:
    r = make(5, canaries=1)
    assert r.drain() == [Stage(("n1",))]  # nothing published while the canary is on trial
    heal(r, ["n1"])
    assert r.drain() == [Publish(), Stage(("n0", "n2", "n3", "n4"))]
    heal(r, ["n0", "n2", "n3"])
    assert not r.done
    heal(r, ["n4"])
    assert r.done and not r.halted and not r.failures()
    assert r.counts() == {"healthy": 5}


def test_a_failed_canary_halts_and_nothing_is_published() -> None:
    r = make(5, canaries=2)
    assert r.drain() == [Stage(("n1", "n2"))]
    heal(r, ["n1"])
    r.report(1.0, "n2", "fetching")
    r.report(1.5, "n2", "rolled_back", "health command exited 3")
    assert r.done and r.halted == ("n2", "rolled_back", "health command exited 3")
    assert r.drain() == []
    assert r.failures() == [("n2", "rolled_back", "health command exited 3")]
    assert r.nodes["n3"].state == "waiting"


def test_a_silent_canary_times_out_and_halts() -> None:
    r = make(3, canaries=1)
    r.drain()
    r.report(0.1, "n1", "fetching")
    r.tick(5.0 + STAGE_SLACK_S - 0.01)
    assert not r.done
    assert r.next_deadline() == pytest.approx(5.0 + STAGE_SLACK_S)
    r.tick(5.0 + STAGE_SLACK_S)
    assert r.done and r.halted[:2] == ("n1", "timed_out")
    assert "fetching" in r.nodes["n1"].reason


def test_failures_after_the_canaries_are_reported_not_halting() -> None:
    r = make(4, canaries=1)
    heal(r, ["n1"])
    r.drain()
    heal(r, ["n0", "n2"])
    r.report(2.0, "n3", "failed", "ArtifactError: every source dropped")
    assert r.done and not r.halted
    assert r.failures() == [("n3", "failed", "ArtifactError: every source dropped")]


def test_self_update_restarts_the_pusher_last() -> None:
    r = make(3, canaries=1, self_last=True)
    assert r.drain() == [Stage(("n1",))]
    heal(r, ["n1"])
    assert r.drain() == [Publish(), Stage(("n2",))]
    heal(r, ["n2"])
    assert r.phase == "self" and r.drain() == [Stage(("n0",))]
    heal(r, ["n0"])
    assert r.done


def test_reports_from_unstaged_or_unknown_nodes_or_after_the_end_change_nothing() -> None:
    r = make(4, canaries=1, offline=("gone",))
    r.drain()
    r.report(0.1, "n2", "healthy")  # not staged yet: a forged or stale report
    r.report(0.1, "stranger", "healthy")
    r.report(0.1, "gone", "healthy")
    r.report(0.1, "n1", "bogus-state")
    assert r.nodes["n2"].state == "waiting" and r.nodes["n1"].state == "staged"
    assert r.nodes["gone"].state == "offline"
    heal(r, ["n1"])
    r.report(3.0, "n1", "rolled_back", "late")  # settled already
    assert r.nodes["n1"].state == "healthy"


def test_two_nodes_without_canaries() -> None:
    r = make(2, canaries=0)
    assert r.drain() == [Publish(), Stage(("n0", "n1"))]


def test_the_rest_goes_in_waves_and_the_release_is_published_with_the_last() -> None:
    r = make(8, canaries=1, wave=3)
    assert r.drain() == [Stage(("n1",))]
    heal(r, ["n1"])
    assert r.drain() == [Stage(("n0", "n2", "n3"))]  # not published: all would take it
    heal(r, ["n2"])
    assert r.drain() == [Stage(("n4",))]
    r.report(2.0, "n3", "failed", "ArtifactError: no source left")  # settled: frees its place
    assert r.drain() == [Stage(("n5",))]
    deadline = 1.0 + 5.0 + STAGE_SLACK_S  # n0's and n4's, staged at 1.0
    r.tick(deadline)  # they time out: their places go to the last two
    assert r.drain() == [Publish(), Stage(("n6", "n7"))]
    assert r.nodes["n7"].deadline == deadline + 5.0 + STAGE_SLACK_S  # counted from its stage
    heal(r, ["n5", "n6", "n7"], t=deadline + 1.0)
    assert r.done and not r.halted
    assert r.counts() == {"healthy": 5, "failed": 1, "timed_out": 2}


def test_the_pusher_of_a_self_update_waits_for_the_last_wave() -> None:
    r = make(5, canaries=1, self_last=True, wave=2)
    assert r.drain() == [Stage(("n1",))]
    heal(r, ["n1"])
    assert r.drain() == [Stage(("n2", "n3"))]
    heal(r, ["n2", "n3"])
    assert r.drain() == [Publish(), Stage(("n4",))]
    heal(r, ["n4"])
    assert r.phase == "self" and r.drain() == [Stage(("n0",))]


def test_a_node_gone_before_its_wave_is_skipped_and_one_gone_after_keeps_its_deadline() -> None:
    r = make(6, canaries=1, wave=2)
    r.drain()
    r.gone(0.5, "n3", "dead when its wave came")  # still the canaries' turn: n3 waits
    heal(r, ["n1"])
    assert r.drain() == [Stage(("n0", "n2"))]
    r.gone(1.5, "n2", "dead")  # staged: its deadline decides (a restart can look like death)
    assert r.nodes["n2"].state == "staged"
    heal(r, ["n0"], t=2.0)
    assert r.drain() == [Stage(("n4",))]  # n3 skipped
    heal(r, ["n2"], t=2.5)
    assert r.drain() == [Publish(), Stage(("n5",))]
    assert r.nodes["n3"].state == "offline" and r.nodes["n3"].reason == "dead when its wave came"
    heal(r, ["n4", "n5"], t=3.0)
    assert r.done and r.counts() == {"healthy": 5, "offline": 1} and not r.failures()


def test_the_default_wave_is_a_quarter_and_at_least_four() -> None:
    assert [wave_size(n) for n in (1, 5, 16, 17, 40, 1000)] == [4, 4, 4, 5, 10, 250]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 12), canaries=st.integers(0, 2), wave=st.integers(0, 4),
       self_last=st.booleans(),
       steps=st.lists(st.tuples(st.integers(0, 11), st.sampled_from(
           ["fetching", "installed", "healthy", "failed", "tick", "gone"])), max_size=80))
def test_waves_never_overlap_and_every_node_is_staged_once_published_once(
        n: int, canaries: int, wave: int, self_last: bool, steps) -> None:
    r = make(n, min(canaries, n - 1), self_last=self_last, wave=wave)
    staged: list[str] = []
    published = 0
    t = 0.0

    def take() -> None:
        nonlocal published
        for out in r.drain():
            if isinstance(out, Publish):
                published += 1
                assert not r._queue, "published while nodes still wait for their wave"
            else:
                staged.extend(out.nodes)
        busy = [k for k, s in r.nodes.items()
                if s.state not in (*TERMINAL, "waiting", "offline")]
        limit = max(wave, len(r.canaries), 1) if wave else n
        assert len(busy) <= limit, (busy, wave)

    take()
    for i, what in steps + [(k, "healthy") for k in range(n)] * 4:
        t += 1.0
        if what == "tick":
            r.tick(t + STAGE_SLACK_S + 5.0)
        elif what == "gone":
            r.gone(t, f"n{i % n}", "dead")
        elif r.nodes[f"n{i % n}"].state not in ("waiting", *TERMINAL):
            r.report(t, f"n{i % n}", what)
        take()
    if not r.halted:
        skipped = [k for k, v in r.nodes.items() if v.state == "offline"]
        assert r.done and sorted(staged + skipped) == sorted(r.targets) and published == 1
    assert len(staged) == len(set(staged))


def view(id: str, how: str = "token", by: str = "f", state: str = "alive") -> MemberView:
    return MemberView(id, state, 0, None, 0.0, by, how, id)


def note(by: str, topic: str, key: str, value: bytes = b"", ts: int = 1) -> Note:
    return Note(topic, key, value, by, ts, b"s" * 64)


def test_push_rights_come_from_founders_and_grants_and_bans_remove_them() -> None:
    members = [view("f", "founder", "f"), view("a"), view("b"), view("c"),
               view("x", state="banned")]
    # b may not push: its grant counts only later
    grants = [note("b", "grant", right_key(PUSH, "c")),
              note("f", "grant", right_key(PUSH, "a")),
              note("a", "grant", right_key(PUSH, "b")),
              note("f", "grant", right_key(PUSH, "x")),
              note("c", "grant", "other:thing")]
    founder = {"f"}.__contains__  # the id the cluster id names
    assert holders(PUSH, members, grants, founder) == {"f", "a", "b", "c"}
    assert holders(PUSH, members, grants[:1], founder) == {"f"}
    # "x" signing itself a founder's admission counts for nothing; a reaped founder's grants do
    members.append(view("y", "founder", "y"))
    assert holders(PUSH, members, grants, founder) == {"f", "a", "b", "c"}
    assert holders(PUSH, members[1:], grants, founder) == {"f", "a", "b", "c"}


def test_newest_release_per_app_from_allowed_authors_only() -> None:
    r1 = Release(PushSpec("web", "true", "true", 5.0), D1, 10)
    r2 = Release(PushSpec("web"), D2, 10)
    notes = [note("f", "release", "web", r1.pack(), ts=5),
             note("a", "release", "web", r2.pack(), ts=9),  # newer, but a may not push
             note("f", "release", "swarmnode", Release.of_self(D2, 3).pack(), ts=1),
             note("f", "release", "other", r1.pack(), ts=7),  # key and app disagree
             note("f", "release", "junk", b"\x93garbage", ts=8)]
    best = newest(notes, frozenset({"f"}))
    assert {app: r.digest for app, (_, r) in best.items()} == {"web": D1, "swarmnode": D2}
    assert best["web"][1] == r1
    with pytest.raises(ReleaseError, match="not allowed"):
        check(notes[1], frozenset({"f"}))


def spec(**kw: object) -> dict[str, object]:
    return {**PushSpec("web").plain(), **kw}


@pytest.mark.parametrize("bad", [
    [1, spec(), "zz", 1],
    [1, spec(name="../x"), D1, 1],
    [1, spec(), D1, -1],
    [1, spec(restart=7), D1, 1],
    [1, spec(health_timeout=0), D1, 1],
    [1, spec(health_timeout=1e9), D1, 1],
    [1, spec(extra=1), D1, 1],
    [2, spec(), D1, 1],
    [1, spec(), D1],
    {"app": "web"},
])
def test_malformed_releases_are_refused(bad: object) -> None:
    with pytest.raises(ReleaseError):
        Release.unpack(msgpack.packb(bad))


def test_a_staged_release_must_be_signed_by_its_sender_who_may_push() -> None:
    pusher, rogue = Identity.generate(), Identity.generate()
    value = Release(PushSpec("web"), D1, 10).pack()

    def signed(by: Identity, value: bytes = value, key: str = "web") -> Note:
        return Note("release", key, value, by.id, 7, by.sign(note_body("release", key, value,
                                                                         by.id, 7)))

    allowed = frozenset({pusher.id})
    good = signed(pusher)
    assert verify_stage(pusher.id, good, allowed).digest == D1
    tampered = Note("release", "web", Release(PushSpec("web"), D2, 10).pack(), pusher.id, 7,
                    good.sig)
    for sender, note, why in [
        (pusher.id, tampered, "bad signature"),
        (rogue.id, good, "must come from its pusher"),  # relayed or replayed by another
        (rogue.id, signed(rogue), "not allowed to push"),
        (pusher.id, signed(pusher, key="other"), "does not match"),
    ]:
        with pytest.raises(ReleaseError, match=why):
            verify_stage(sender, note, allowed)


def test_a_lone_node_updating_itself_goes_straight_to_itself() -> None:
    r = Rollout("n0", ("n0",), (), 5.0, self_last=True)
    r.start(0.0)
    assert r.drain() == [Publish(), Stage(("n0",))] and r.phase == "self"
    heal(r, ["n0"])
    assert r.done


OUTCOMES = ("healthy", "rolled_back", "failed", "silent")


@given(st.integers(1, 8), st.integers(0, 3), st.booleans(), st.data())
@settings(max_examples=300, deadline=None)
def test_rollout_invariants_over_random_outcomes(n: int, canaries: int, self_last: bool,
                                                 data: st.DataObject) -> None:
    """Whatever each node does and in whatever order: nothing is published unless every
    canary is healthy; nobody but a canary is staged before that; the pusher of its own code
    goes last; every rollout ends by its deadlines; and the failures are exactly the nodes
    that did not end healthy."""
    nodes = tuple(f"n{i}" for i in range(n))
    canaries = min(canaries, n - 1)
    outcome = {x: data.draw(st.sampled_from(OUTCOMES), label=x) for x in nodes}
    r = Rollout("n0", nodes, nodes[1:1 + canaries], 5.0, self_last)
    now, staged, published = 0.0, [], False
    r.start(now)
    for _ in range(4 * n + 4):
        for out in r.drain():
            if isinstance(out, Publish):
                assert all(outcome[c] == "healthy" for c in r.canaries)
                published = True
            else:
                for x in out.nodes:
                    assert published or x in r.canaries
                    if self_last and x == "n0" and n > 1:
                        assert all(r.nodes[o].state in ("healthy", "rolled_back", "failed",
                                                         "timed_out") for o in nodes if o != x)
                    staged.append(x)
        pending = [x for x in staged if r.nodes[x].state == "staged"
                   and outcome[x] != "silent"]
        if pending:
            x = data.draw(st.sampled_from(pending), label="next report")
            now += 0.1
            r.report(now, x, "fetching")
            r.report(now, x, outcome[x], "" if outcome[x] == "healthy" else "because")
        else:
            now = max(now, min(r.next_deadline(), now + 100.0))
            r.tick(now)
        if r.done:
            break
    assert r.done
    assert published == all(outcome[c] == "healthy" for c in r.canaries)
    ended = {x: r.nodes[x].state for x in staged}
    want_fail = {x for x in staged if outcome[x] != "healthy"}
    assert {x for x, _, _ in r.failures()} == want_fail
    assert all(ended[x] == ("timed_out" if outcome[x] == "silent" else outcome[x])
               for x in staged)
