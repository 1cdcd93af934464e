"""Retry timing shared by every output: capped exponential backoff with full jitter."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 30.0, rand: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based): uniform in (0, min(cap, base*2^(attempt-1))].

    Full jitter spreads a fleet's retries after a shared outage instead of synchronising them.
    """
    ceiling = min(cap, base * (2 ** max(0, attempt - 1)))
    return max(0.001, (rand or random).uniform(0, ceiling))
