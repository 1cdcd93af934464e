"""Retry timing shared by every output: capped exponential backoff with full jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 30.0, rand: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based): uniform in (0, min(cap, base*2^(attempt-1))].

    Full jitter spreads a fleet's retries after a shared outage instead of synchronising them.
    """
    ceiling = min(cap, base * (2 ** max(0, attempt - 1)))
    return max(0.001, (rand or random).uniform(0, ceiling))


@dataclass(frozen=True)
class Backoff:
    """The agent's ``retry_initial_delay`` and ``retry_max_delay``."""

    initial: float = 0.5
    maximum: float = 30.0

    def delay(self, attempt: int) -> float:
        return backoff_delay(attempt, self.initial, self.maximum)
