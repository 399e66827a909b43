"""Lifeguard suspicion timer with independent confirmations (sans-I/O: it only computes deadlines).

A suspicion starts at `max_timeout` and shrinks towards `min_timeout` as distinct members
independently report the same suspect: many independent accusers make a true failure likely, so
we can declare it sooner; a lone accuser (perhaps with a bad link) must wait long enough for the
accused to hear about it and refute. The shrink is logarithmic in the number of confirmations, as
in memberlist, so the first confirmations matter most.
"""

from __future__ import annotations

import math
from collections.abc import Hashable


def suspicion_timeouts(
    suspicion_mult: int, max_timeout_mult: int, n: int, probe_interval: float
) -> tuple[float, float]:
    """(min, max) suspicion timeout for a cluster of n live members.

    min grows with log10(n) because gossip needs ~log(n) rounds to reach the accused.
    """
    scale = max(1.0, math.log10(max(1, n)))
    min_t = suspicion_mult * scale * probe_interval
    return min_t, max_timeout_mult * min_t


def expected_confirmations(suspicion_mult: int, n: int) -> int:
    """How many independent confirmations to wait for: none when too few members could confirm
    (the suspect and ourselves excluded)."""
    k = suspicion_mult - 2
    return 0 if n - 2 < k else max(k, 0)


def remaining_timeout(confirmations: int, k: int, min_t: float, max_t: float) -> float:
    """Total timeout after `confirmations` of `k` expected ones: max -> min, log-scaled."""
    if k < 1:
        return min_t
    frac = math.log(confirmations + 1) / math.log(k + 1)
    return max(min_t, max_t - frac * (max_t - min_t))


class Suspicion:
    """One outstanding suspicion of one member."""

    __slots__ = ("_seen", "confirmations", "k", "max_timeout", "min_timeout", "start")

    def __init__(
        self, start: float, accuser: Hashable, k: int, min_timeout: float, max_timeout: float
    ):
        self.start = start
        self.k = k
        self.min_timeout = min_timeout
        self.max_timeout = max_timeout if k >= 1 else min_timeout
        self.confirmations = 0
        self._seen: set[Hashable] = {accuser}

    def confirm(self, accuser: Hashable) -> bool:
        """Count an independent confirmation; False for a repeat or once k were seen."""
        if self.confirmations >= self.k or accuser in self._seen:
            return False
        self._seen.add(accuser)
        self.confirmations += 1
        return True

    def deadline(self) -> float:
        return self.start + remaining_timeout(
            self.confirmations, self.k, self.min_timeout, self.max_timeout
        )
