"""Who may do what: the `push` and `operate` rights, read from signed grant and revoke notes.

The rules (who holds a right, who may revoke whom) are `push.release.levels`; this is the
node's side: the current holders, and the grant and revoke statements this node signs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from swarmnode import control
from swarmnode.push.release import GRANT_TOPIC, OPERATE, REVOKE_TOPIC, RIGHTS, levels, right_key

if TYPE_CHECKING:
    from swarmnode.membership import MemberView
    from swarmnode.node import Node


class Rights:
    def __init__(self, node: Node) -> None:
        self.node = node

    def levels(self, right: str) -> dict[str, int]:
        core = self.node.core
        return levels(right, core.members(),
                      core.notes(GRANT_TOPIC) + core.notes(REVOKE_TOPIC), self.node.is_founder)

    def holders(self, right: str) -> frozenset[str]:
        return frozenset(self.levels(right))

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
        node.flush()
        node.save_snapshot()
