"""Who may do what: the `push`, `operate` and `build` rights, read from signed grant and
revoke notes, and what each lets a member ask the leader to propose (`refusal`).

The rules (who holds a right, who may revoke whom) are `push.release.levels`; this is the
node's side: the current holders, and the grant and revoke statements this node signs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from swarmnode import control
from swarmnode.ledger import Cancel, Redo, SetVoters, SubmitBuild
from swarmnode.ledger.jobs import DONE, Build, Job, Pause
from swarmnode.push.release import (
    BUILD,
    GRANT_TOPIC,
    OPERATE,
    REVOKE_TOPIC,
    RIGHTS,
    levels,
    right_key,
)

if TYPE_CHECKING:
    from swarmnode.membership import MemberView
    from swarmnode.node import Node


def refusal(sender: str, cmd: object, holders: Callable[[str], frozenset[str]],
            build: Callable[[str], Build | None], name: Callable[[str], str]) -> str | None:
    """Why the leader will not propose ledger command `cmd` for member `sender` (None: it
    may). A build is submitted by its own submitter holding `build` (its jobs run commands on
    the workers); a build is cancelled, and a done job whose outputs were lost built again, by
    its submitter or an operator; pausing, resuming and setting the voters need `operate`;
    any other command only the leader itself proposes."""
    who = name(sender)
    if isinstance(cmd, SubmitBuild):
        if cmd.submitter != sender:
            return (f"{who} sent a build naming {name(cmd.submitter)} as its submitter: a "
                    "member submits builds as itself only")
        if sender not in holders(BUILD):
            return (f"{who} does not hold the build right (a holder of it can allow it with "
                    f"`swarmnode grant build {who}`)")
        return None
    if isinstance(cmd, Cancel):
        known = build(cmd.build_id)
        if known is None:
            return f"no build {cmd.build_id!r}"
        if sender == known.submitter or sender in holders(OPERATE):
            return None
        return (f"{who} may not cancel {cmd.build_id}: only its submitter "
                f"({name(known.submitter)}) or an operator may (an operator can allow it "
                f"with `swarmnode grant operate {who}`)")
    if isinstance(cmd, Redo):
        known = build(cmd.job_key.partition("/")[0])
        if known is None:
            return f"no build for {cmd.job_key!r}"
        if sender == known.submitter or sender in holders(OPERATE):
            return None
        return (f"{who} may not have {cmd.job_key} built again: only its build's submitter "
                f"({name(known.submitter)}) or an operator may")
    if isinstance(cmd, Pause | SetVoters):
        if sender in holders(OPERATE):
            return None
        what = "pause or resume a node" if isinstance(cmd, Pause) else "set the voters"
        return (f"{who} is not an operator: only an operator may {what} (an operator can "
                f"allow it with `swarmnode grant operate {who}`)")
    return f"only the leader itself proposes {type(cmd).__name__} entries"


GONE = ("dead", "left", "banned")
"""Member states of one gone (never merely suspected): the jobs it held are requeued; the
outputs only it held are lost when `outputs_lost` says so (a dead one may come back)."""


def outputs_lost(worker_state: str | None, gone_for: float, redo_after: float) -> bool:
    """Whether the outputs only a worker held are lost with it: it is no member any more, left,
    is banned, or has been dead `redo_after` seconds (`gone_for`: since its state last changed).
    A worker killed or rebooted comes back with them sooner, and building its jobs again then
    would waste their work (Serf gives a failed member a reconnect time the same way)."""
    if worker_state == "dead":
        return gone_for >= redo_after
    return worker_state is None or worker_state in GONE


def redo_refusal(cmd: Redo, job: Job | None, worker_state: str | None, gone_for: float,
                 redo_after: float, name: Callable[[str], str]) -> str | None:
    """Why the leader will not build a done job again for its submitter (after `refusal`
    allowed the asker): None only when the job is done and its outputs are lost with its
    worker, the one holder the submitter could not reach, by the leader's own view
    (`outputs_lost`) -- never while it is merely suspected, or dead too briefly."""
    if job is None or job.state != DONE or job.node is None:
        return f"{cmd.job_key} is not done"
    if outputs_lost(worker_state, gone_for, redo_after):
        return None
    if worker_state == "dead":
        return (f"{cmd.job_key}'s outputs are on {name(job.node)}, dead for {gone_for:.0f} s: "
                f"they are waited for until it has been dead {redo_after:g} s (`redo_after`)")
    return (f"{cmd.job_key}'s outputs are on {name(job.node)}, which is {worker_state}: "
            "fetch them from it")


class Rights:
    def __init__(self, node: Node) -> None:
        self.node = node

    def levels(self, right: str) -> dict[str, int]:
        core = self.node.core
        return levels(right, core.members(),
                      core.notes(GRANT_TOPIC) + core.notes(REVOKE_TOPIC), self.node.is_founder)

    def holders(self, right: str) -> frozenset[str]:
        return frozenset(self.levels(right))

    def refusal(self, sender: str, cmd: object) -> str | None:
        """Why `sender` may not have `cmd` proposed, judged by this node's view (`refusal`)."""
        node = self.node
        return refusal(sender, cmd, self.holders, node.leadership.ledger.build,
                       node.member_name)

    def grant(self, right: str, target: MemberView) -> str:
        """Sign and spread a grant of `right` to `target` (only a holder may)."""
        self._mine(right)
        if target.admitted_by is None or target.state in ("pending", "banned"):
            raise control.ControlError(f"{target.name} is {target.state}: admit it first")
        self._state(GRANT_TOPIC, REVOKE_TOPIC, right, target)
        return f"{target.name} ({target.id[:12]}) may {right}"

    def revoke(self, right: str, target: MemberView) -> str:
        """Sign and spread a revoke of `right` from `target`. It counts only when this node
        is closer to the founder than `target` (`levels`): refused here otherwise, so the
        caller is told rather than left with a statement that changes nothing."""
        theirs = self._outrank(right, self._mine(right), target, f"revoke its {right} right")
        self._state(REVOKE_TOPIC, GRANT_TOPIC, right, target)
        return f"{target.name} ({target.id[:12]}) may no longer {right}" + (
            "" if theirs is not None else " (it did not hold the right)")

    def operator(self, doing: str) -> int:
        """This node's operate level, or a ControlError saying why it cannot do `doing`:
        admissions, bans, renames of others and join tokens count only from operators, so a
        non-operator is told now rather than left with statements every member ignores."""
        if not self.node.admitted:
            raise control.ControlError("this node is not an admitted member")
        mine = self.levels(OPERATE).get(self.node.id)
        if mine is None:
            raise control.ControlError(
                f"this node is not an operator, so it cannot {doing}: members count only an "
                "operator's (an operator can allow it with `swarmnode grant operate "
                f"{self.node.name}`)")
        return mine

    def may_ban(self, target: MemberView) -> None:
        """Refuse (ControlError) a ban the members would not count (see `levels`)."""
        self._outrank(OPERATE, self.operator("ban"), target, "ban it")

    def _outrank(self, right: str, mine: int, target: MemberView, doing: str) -> int | None:
        """`target`'s level for `right`, refused unless this node (at `mine`) is closer to the
        founder: nobody acts against the founder, its own granter or its peers."""
        theirs = self.levels(right).get(target.id)
        if theirs is not None and theirs <= mine:
            whom = "the founder" if theirs == 0 else "a holder as close to the founder as you"
            raise control.ControlError(
                f"{target.name} is {whom}: only a holder of {right} closer to the founder can "
                f"{doing}")
        return theirs

    def _mine(self, right: str) -> int:
        if right not in RIGHTS:
            raise control.ControlError(f"unknown right {right!r}; the rights are "
                                       f"{', '.join(RIGHTS)}")
        if not self.node.admitted:
            raise control.ControlError("this node is not an admitted member")
        mine = self.levels(right).get(self.node.id)
        if mine is None:
            raise control.ControlError(f"this node may not {right}, so it cannot grant or "
                                       "revoke it either")
        return mine

    def _state(self, topic: str, other: str, right: str, target: MemberView) -> None:
        """Sign `topic` about `target`, newer than this node's statement under `other`, so
        this node's last word about the target is the one that counts."""
        node, key = self.node, right_key(right, target.id)
        mine = [n.ts for n in node.core.notes(other) if n.key == key and n.by == node.id]
        note = node.core.sign_note(node.clock(), topic, key, b"", after=max(mine, default=-1))
        node.core.add_note(node.clock(), note)
        if note not in node.core.notes(topic):
            raise control.ControlError(
                f"this node could not keep its {topic} of {right} for {target.name}: its note "
                "budget is full (see the drop_note_* counters); nothing was sent")
        node.flush()
        node.save_snapshot()
