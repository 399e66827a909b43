"""Roles: the operate and build rights beside the push right (grants, revokes, who outranks
whom), what each lets a member have the leader propose, and the pieces that keep an SSH action
on the member itself (ctl/home checks, identity proof)."""

from __future__ import annotations

import os
import shlex
from collections.abc import Collection
from pathlib import Path
from types import SimpleNamespace

import pytest

from swarmnode import config as node_config
from swarmnode.actions import Actions
from swarmnode.identity import Identity, load_or_create
from swarmnode.ledger import Cancel, Job, JobSpec, Redo, Requeue, SetVoters, SubmitBuild
from swarmnode.ledger.jobs import Build, Pause
from swarmnode.membership import MemberView, Note
from swarmnode.push.release import (
    BUILD,
    GRANT_TOPIC,
    OPERATE,
    PUSH,
    REVOKE_TOPIC,
    holders,
    levels,
    right_key,
)
from swarmnode.rights import redo_refusal, refusal
from swarmnode.ssh_actions import (
    CHALLENGE_BYTES,
    Refused,
    check_proof,
    checked_path,
    proof_body,
    prove,
)

FOUNDER = {"f"}.__contains__


def view(id: str, state: str = "alive") -> MemberView:
    return MemberView(id, state, 0, None, 0.0, "f", "token", id)


def say(by: str, topic: str, to: str, ts: int = 1, right: str = OPERATE) -> Note:
    return Note(topic, right_key(right, to), b"", by, ts, b"s" * 64)


MEMBERS = [view(i) for i in ("f", "a", "b", "c", "d")]


def test_only_the_founder_operates_until_it_grants_and_push_grants_do_not_operate() -> None:
    assert holders(OPERATE, MEMBERS, [], FOUNDER) == {"f"}
    pushes = [say("f", GRANT_TOPIC, "a", right=PUSH)]
    assert holders(OPERATE, MEMBERS, pushes, FOUNDER) == {"f"}
    assert holders(PUSH, MEMBERS, pushes, FOUNDER) == {"f", "a"}
    # a member granting itself, or being granted by a non-operator, counts for nothing
    forged = [say("a", GRANT_TOPIC, "a"), say("b", GRANT_TOPIC, "c")]
    assert holders(OPERATE, MEMBERS, forged, FOUNDER) == {"f"}
    assert holders(OPERATE, MEMBERS, [say("f", GRANT_TOPIC, "a")], FOUNDER) == {"f", "a"}


def test_a_revoke_counts_only_from_closer_to_the_founder() -> None:
    grants = [say("f", GRANT_TOPIC, "a"), say("f", GRANT_TOPIC, "b"),
              say("a", GRANT_TOPIC, "c"), say("c", GRANT_TOPIC, "d")]
    assert levels(OPERATE, MEMBERS, grants, FOUNDER) == {"f": 0, "a": 1, "b": 1, "c": 2, "d": 3}
    # the founder revokes a: a, and c and d that held the right only through a, lose it
    assert holders(OPERATE, MEMBERS, [*grants, say("f", REVOKE_TOPIC, "a", ts=2)],
                   FOUNDER) == {"f", "b"}
    # nobody revokes the founder, its own granter or a peer at the same level
    for revoke in (say("a", REVOKE_TOPIC, "f"), say("c", REVOKE_TOPIC, "a"),
                   say("b", REVOKE_TOPIC, "a")):
        assert holders(OPERATE, MEMBERS, [*grants, revoke], FOUNDER) == {"f", "a", "b", "c",
                                                                        "d"}
    # b (level 1) outranks d (level 3), though it did not grant it
    assert holders(OPERATE, MEMBERS, [*grants, say("b", REVOKE_TOPIC, "d")],
                   FOUNDER) == {"f", "a", "b", "c"}
    # a revoked holder's revokes no longer count
    assert holders(OPERATE, MEMBERS, [*grants, say("f", REVOKE_TOPIC, "b"),
                                      say("b", REVOKE_TOPIC, "d")], FOUNDER) == {"f", "a", "c",
                                                                                 "d"}


def test_an_authors_newest_word_counts_and_a_tie_is_a_revoke() -> None:
    grant, revoke = say("f", GRANT_TOPIC, "a", ts=5), say("f", REVOKE_TOPIC, "a", ts=6)
    assert holders(OPERATE, MEMBERS, [grant, revoke], FOUNDER) == {"f"}
    regrant = say("f", GRANT_TOPIC, "a", ts=7)
    assert holders(OPERATE, MEMBERS, [regrant, revoke], FOUNDER) == {"f", "a"}
    tie = say("f", REVOKE_TOPIC, "a", ts=7)
    assert holders(OPERATE, MEMBERS, [regrant, tie], FOUNDER) == {"f"}
    # a ban ends the right, whatever was granted
    banned = [view("f"), view("a", state="banned")]
    assert holders(OPERATE, banned, [regrant], FOUNDER) == {"f"}


def test_no_right_implies_another_and_the_founder_holds_all_three() -> None:
    for right in (PUSH, OPERATE, BUILD):
        others = [say("f", GRANT_TOPIC, "a", right=r) for r in (PUSH, OPERATE, BUILD)
                  if r != right]
        assert holders(right, MEMBERS, others, FOUNDER) == {"f"}
    grants = [say("f", GRANT_TOPIC, "a", right=BUILD), say("a", GRANT_TOPIC, "b", right=BUILD)]
    assert levels(BUILD, MEMBERS, grants, FOUNDER) == {"f": 0, "a": 1, "b": 2}
    revoked = [*grants, say("f", REVOKE_TOPIC, "a", ts=2, right=BUILD)]
    assert holders(BUILD, MEMBERS, revoked, FOUNDER) == {"f"}


def _refusal(sender: str, cmd: object, operators: Collection[str] = frozenset({"f"}),
             builders: Collection[str] = frozenset({"f", "b"})) -> str | None:
    """`refusal` with these holders and one build, "b1", submitted by "b"."""
    rights = {OPERATE: frozenset(operators), BUILD: frozenset(builders)}
    builds = {"b1": Build("b1", "b1", "b", ("j",), 3)}
    return refusal(sender, cmd, rights.__getitem__, builds.get, lambda i: f"<{i}>")


def test_a_build_is_submitted_by_a_holder_of_the_build_right_in_its_own_name() -> None:
    """Regression (issue 13): the leader proposed any member's build (its jobs run as root
    on the workers), in anyone's name."""
    assert _refusal("b", SubmitBuild("b2", "x", "b", ())) is None
    assert _refusal("f", SubmitBuild("b2", "x", "f", ())) is None
    # an operator that does not hold `build` does not build (no right implies another)
    assert _refusal("o", SubmitBuild("b2", "x", "o", ()), operators={"f", "o"}) == (
        "<o> does not hold the build right (a holder of it can allow it with "
        "`swarmnode grant build <o>`)")
    assert _refusal("b", SubmitBuild("b2", "x", "f", ())) == (
        "<b> sent a build naming <f> as its submitter: a member submits builds as itself only")


def test_a_build_is_cancelled_by_its_submitter_or_an_operator() -> None:
    cancel = Cancel("b1", 3)
    assert _refusal("b", cancel) is None
    assert _refusal("f", cancel) is None
    assert _refusal("b", cancel, builders=set()) is None  # its own, the right since revoked
    assert _refusal("m", cancel) == (
        "<m> may not cancel b1: only its submitter (<b>) or an operator may (an operator can "
        "allow it with `swarmnode grant operate <m>`)")
    assert _refusal("m", Cancel("nope", 3)) == "no build 'nope'"


def test_a_job_whose_outputs_were_lost_is_built_again_for_its_submitter_or_an_operator() -> None:
    redo = Redo("b1/j", "its outputs were lost")
    assert _refusal("b", redo) is None
    assert _refusal("f", redo) is None
    assert _refusal("m", redo) == (
        "<m> may not have b1/j built again: only its build's submitter (<b>) or an operator may")
    assert _refusal("b", Redo("nope/j", "x")) == "no build for 'nope/j'"


@pytest.mark.parametrize(("state", "worker_state", "gone_for", "why"), [
    ("done", "dead", 30.0, None),
    ("done", "dead", 29.9, "b1/j's outputs are on <w>, dead for 30 s: they are waited for "
                           "until it has been dead 30 s (`redo_after`)"),
    ("done", "dead", 0.0, "b1/j's outputs are on <w>, dead for 0 s: they are waited for until "
                          "it has been dead 30 s (`redo_after`)"),
    ("done", "left", 0.0, None),
    ("done", "banned", 0.0, None),
    ("done", None, 0.0, None),  # (no such member any more)
    ("done", "alive", 999.0, "b1/j's outputs are on <w>, which is alive: fetch them from it"),
    ("done", "suspect", 999.0, "b1/j's outputs are on <w>, which is suspect: fetch them from it"),
    ("running", "dead", 999.0, "b1/j is not done"),  # (a requeue's business, and the leader's)
])
def test_the_leader_builds_a_done_job_again_only_once_its_worker_is_gone_for_good(
        state: str, worker_state: str | None, gone_for: float, why: str | None) -> None:
    """Gone for good: left, banned, forgotten, or dead `redo_after` (30 s here); a worker
    killed and restarted within it comes back with the outputs, which were never lost."""
    job = Job("b1", "j", JobSpec(), state=state, node="w", attempt=1)
    assert redo_refusal(Redo("b1/j", "x"), job, worker_state, gone_for, 30.0,
                        lambda i: f"<{i}>") == why
    assert redo_refusal(Redo("b1/k", "x"), None, None, 999.0, 30.0, str) == "b1/k is not done"


@pytest.mark.parametrize("cmd", [Pause("x", True), Pause("x", False), SetVoters(("m",)),
                                 SetVoters(())])
def test_pausing_resuming_and_setting_voters_need_the_operate_right(cmd: object) -> None:
    assert _refusal("f", cmd) is None
    assert _refusal("o", cmd, operators={"f", "o"}) is None
    refused = _refusal("b", cmd)
    assert refused is not None and refused.startswith("<b> is not an operator: only an ")
    assert refused.endswith("(an operator can allow it with `swarmnode grant operate <b>`)")


def test_entries_only_the_leader_makes_are_never_proposed_for_a_member() -> None:
    assert _refusal("f", Requeue("b1/j", "x")) == (
        "only the leader itself proposes Requeue entries")


def test_accept_actions_from_takes_ids_only() -> None:
    some = Identity.generate().id
    cfg = node_config.parse(f'accept_actions_from = ["{some}"]')
    assert cfg.accept_actions_from == (some,)
    assert node_config.parse("").accept_actions_from == ()
    with pytest.raises(node_config.ConfigError, match="not a node id"):
        node_config.parse('accept_actions_from = ["n2"]')


@pytest.mark.parametrize("bad", [
    "swarmnode",  # not absolute
    "/usr/bin/swarmnode; touch /tmp/owned",
    "/usr/bin/swarmnode $(id)",
    "/tmp/x/../swarmnode",  # not normalised
    "/bin/sh",  # not swarmnode
    "/opt/swarm node/swarmnode",
    "/usr/bin/swarmnode\n",
    None, 7,
])
def test_a_ctl_fact_is_an_absolute_path_to_swarmnode_and_nothing_else(bad: object) -> None:
    with pytest.raises(Refused, match="ctl fact"):
        checked_path(bad, "ctl", "swarmnode")


def test_good_paths_pass_and_quote_to_themselves() -> None:
    ctl = "/opt/venv-1.2/bin/swarmnode"
    assert checked_path(ctl, "ctl", "swarmnode") == ctl
    assert checked_path("/var/lib/swarmnode", "home") == "/var/lib/swarmnode"
    assert shlex.split(shlex.join([ctl, "--home", "/tmp/a", "prove-identity", "ab"])) == [
        ctl, "--home", "/tmp/a", "prove-identity", "ab"]
    with pytest.raises(Refused, match="home fact"):
        checked_path("/tmp/a b", "home")


def test_the_identity_proof_needs_the_members_key(tmp_path: Path) -> None:
    member, other = tmp_path / "m", tmp_path / "o"
    me, them = load_or_create(member), load_or_create(other)
    challenge = os.urandom(CHALLENGE_BYTES)
    assert check_proof(me.id, challenge, prove(member, challenge.hex())) is None
    # another machine's swarmnode answers with its own id, or forges ours: refused
    assert "swarmnode there is" in check_proof(me.id, challenge, prove(other, challenge.hex()))
    forged = f"{me.id} {them.sign(proof_body(challenge, me.id)).hex()}"
    assert "bad signature" in check_proof(me.id, challenge, forged)
    # a replayed proof of an earlier challenge, or a bare id (the old check), is refused
    old = prove(member, os.urandom(CHALLENGE_BYTES).hex())
    assert "bad signature" in check_proof(me.id, challenge, old)
    assert check_proof(me.id, challenge, me.id) == "no identity proof"
    # the signature is domain-separated: our key signing the raw challenge proves nothing
    raw = f"{me.id} {me.sign(challenge).hex()}"
    assert "bad signature" in check_proof(me.id, challenge, raw)


def test_proving_never_creates_a_key_in_a_home_named_by_the_asker(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no swarmnode identity"):
        prove(tmp_path / "etc-cron.d", os.urandom(CHALLENGE_BYTES).hex())
    assert not (tmp_path / "etc-cron.d").exists()
    with pytest.raises(ValueError):
        prove(tmp_path, "00")


class _Rights:
    def __init__(self, operators: set[str]) -> None:
        self.operators = operators

    def holders(self, right: str) -> frozenset[str]:
        return frozenset(self.operators) if right == OPERATE else frozenset()


def _target(operators: set[str], config: str = "") -> Actions:
    node = SimpleNamespace(id="t" * 52, name="target", kind="vm", rights=_Rights(operators),
                           node_config=node_config.parse(config),
                           is_admitted_member=lambda peer: True, member_name=lambda peer: peer)
    return Actions(node)  # type: ignore[arg-type]


def test_the_receiving_node_checks_the_operate_right_and_its_own_config() -> None:
    """Regression (issue 13): any admitted member's act_req used to run; the requester's own
    check is no boundary (a hostile member skips it), so the target decides."""
    op, member = Identity.generate().id, Identity.generate().id
    body = {"target": "t" * 52, "verb": "exec", "argv": ["true"], "force": False}
    assert _target({op})._refusal(op, body) is None
    assert "is not an operator" in _target({op})._refusal(member, body)
    for verb in ("restart", "reboot"):
        assert "is not an operator" in _target({op})._refusal(member, {**body, "verb": verb})
    assert "accept_actions" in _target({op}, "accept_actions = false")._refusal(op, body)
    other = Identity.generate().id
    narrowed = _target({op, other}, f'accept_actions_from = ["{other}"]')
    assert "accept_actions_from" in narrowed._refusal(op, body)
    assert narrowed._refusal(other, body) is None
    # listing a non-operator never widens the right
    widened = _target({op}, f'accept_actions_from = ["{member}"]')
    assert "is not an operator" in widened._refusal(member, body)
