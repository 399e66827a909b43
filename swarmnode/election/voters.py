"""Which members vote: pure functions from the membership view to a voter set.

Voters are few on purpose: an election needs a majority of voters, so every extra voter is one
more machine that must answer quickly, and five already survive two failures. Other members
still take work; they follow the leader without voting.

The longest-admitted members are chosen because admission time is a cluster-wide fact (signed
and gossiped), so every node that sees the same alive members computes the same set. Views can
still differ (one side of a partition sees the other dead): the election stays safe only while
any two voter sets in use differ by at most one member added or removed (then every two
majorities overlap), which is why a shell should move toward a new set with `step_voters`, one
change at a time, rather than jump.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_MAX_VOTERS = 5
"""Five voters survive two failures; more would slow elections without helping a small swarm."""


def choose_voters(
    members: Sequence[tuple[str, float]], max_voters: int = DEFAULT_MAX_VOTERS
) -> frozenset[str]:
    """The `max_voters` longest-admitted of `members` ((id, admitted_at) of admitted alive
    members); ties by id so every node breaks them the same way. A repeated id counts once,
    with its earliest admission."""
    if max_voters < 1:
        raise ValueError("max_voters must be at least 1")
    earliest: dict[str, float] = {}
    for node_id, admitted_at in members:
        if node_id not in earliest or admitted_at < earliest[node_id]:
            earliest[node_id] = admitted_at
    ranked = sorted(earliest.items(), key=lambda item: (item[1], item[0]))
    return frozenset(node_id for node_id, _ in ranked[:max_voters])


def step_voters(current: frozenset[str], target: frozenset[str]) -> frozenset[str]:
    """One change from `current` toward `target`: a removal first (a voter leaves the set
    because it is no longer alive, and a dead voter only raises the quorum), else an addition.
    Smallest id first, so every node takes the same path."""
    gone = current - target
    if gone:
        return current - {min(gone)}
    new = target - current
    if new:
        return current | {min(new)}
    return current
