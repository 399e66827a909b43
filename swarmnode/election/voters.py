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

from collections.abc import Callable, Sequence

DEFAULT_MAX_VOTERS = 5
"""Five voters survive two failures; more would slow elections without helping a small swarm."""

STABILIZE_S = 30.0
"""How long a voter may be unreachable before a live member takes its place (Consul's autopilot
waits the same way before it trusts a change). Shorter, and every partition or reboot would
churn the voter set, shrinking it towards the side that happens to hold the leader, so that
the next fault leaves a connected majority of members with no majority of voters. Longer only
delays replacing a machine that is really gone, which a majority of voters survives anyway."""


def odd_size(members: int, max_voters: int = DEFAULT_MAX_VOTERS) -> int:
    """How many vote among `members` eligible members: the largest odd number up to
    `max_voters` (an even count tolerates no more failures than the odd one below it)."""
    size = min(max_voters, members)
    return max(1, size - (1 - size % 2))


def target_voters(current: frozenset[str], members: Sequence[tuple[str, float, bool]],
                  down_for: dict[str, float], max_voters: int = DEFAULT_MAX_VOTERS,
                  stabilize: float = STABILIZE_S) -> frozenset[str]:
    """Who should vote: `odd_size` of `members` ((id, admitted_at, alive) of the admitted
    members that are neither banned nor gone). Current voters stay while alive or down for
    less than `stabilize` (`down_for`: seconds since each was last seen alive); the
    longest-admitted alive members fill the rest. A voter down for longer leaves only for a
    live member, or when at least three voters (an odd number) remain without it: so sequential
    failures still shrink five voters to three, and three never to fewer."""
    known = {node_id: (admitted_at, alive) for node_id, admitted_at, alive in members}
    size = odd_size(len(known), max_voters)

    def rank(node_id: str) -> tuple[float, str]:
        return known[node_id][0], node_id

    def steady(node_id: str) -> bool:
        return known[node_id][1] or down_for.get(node_id, 0.0) < stabilize

    voters = [v for v in current if v in known]
    chosen = sorted((v for v in voters if steady(v)), key=rank)[:size]
    chosen += sorted((i for i, (_at, alive) in known.items() if alive and i not in current),
                     key=rank)[:size - len(chosen)]
    stale = sorted((v for v in voters if v not in chosen), key=rank)
    while len(chosen) < min(size, 3) and stale:
        chosen.append(stale.pop(0))
    if len(chosen) % 2 == 0 and chosen:  # (an even set tolerates no more than the odd below)
        if stale:
            chosen.append(stale.pop(0))
        else:
            chosen.pop()
    return frozenset(chosen)


def step_voters(current: frozenset[str], target: frozenset[str],
                ready: Callable[[str], bool] = lambda _member: True,
                away: Sequence[frozenset[str]] = ()) -> frozenset[str]:
    """One change from `current` toward `target`: a removal first (a voter leaves the set
    because it is no longer alive, and a dead voter only raises the quorum), taking the tiers
    of `away` in order before the rest (the shell's: out of reach, then leaving); else the
    addition of a newcomer that is `ready` (the leader's test: its log holds the commit, so
    the quorum it joins does not wait on it). Smallest id first within a tier, so every node
    takes the same path.

    Why the order: a founder that leaves a swarm of three shrinks the set to one. Dropping the
    other voter first leaves {founder, survivor} if the founder exits between the steps -- a
    set the survivor cannot win alone -- and a survivor elected alone holds a proof of one
    signature, which a member that missed both steps cannot believe. Dropping the founder
    first hands the lead to the two that stay, elected by both. A voter out of reach goes
    before it, though: {founder, survivor} then still has a leader while the founder stays.
    And a newcomer that is not ready does not hold up one that is: it may never be (a member
    that cannot yet believe the leader's proof catches up only once the set has grown)."""
    gone = current - target
    for tier in (*away, gone):
        if gone & tier:
            return current - {min(gone & tier)}
    new = sorted(member for member in target - current if ready(member))
    if new:
        return current | {new[0]}
    return current
