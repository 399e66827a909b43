"""Lifeguard local health ("awareness"): a node that is itself slow should not accuse others.

Every failed probe that helpers did not confirm with nacks, and every time we must refute a
suspicion about ourselves, is evidence that *our* links or CPU are the problem. The score rises
with that evidence and falls with each successful direct probe; all probe timeouts are multiplied
by (score + 1), so an overloaded node slows down instead of spraying false suspicions.
"""

from __future__ import annotations


class Awareness:
    __slots__ = ("_max", "score")

    def __init__(self, max_multiplier: int) -> None:
        if max_multiplier < 1:
            raise ValueError("awareness max multiplier must be >= 1")
        self._max = max_multiplier
        self.score = 0

    def apply_delta(self, delta: int) -> None:
        """Move the score, clamped to [0, max_multiplier - 1]."""
        self.score = min(max(self.score + delta, 0), self._max - 1)

    def scale(self, timeout: float) -> float:
        """`timeout` stretched by our current ill health."""
        return timeout * (self.score + 1)
