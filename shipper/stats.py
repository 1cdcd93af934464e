"""Counters of what flowed and what went wrong, kept per input and output.

Incremented once per batch (never per record) from any thread; read as a snapshot by the
health/metrics server, by logs on shutdown, and by tests.
"""

from __future__ import annotations

import threading
from collections import defaultdict


class Stats:
    def __init__(self) -> None:
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self._lock = threading.Lock()

    def add(self, name: str, value: float = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] += value

    def get(self, name: str, **labels: str) -> float:
        """The sum of ``name`` over every series whose labels include ``labels``."""
        wanted = set(labels.items())
        with self._lock:
            return sum(v for (n, ls), v in self._counters.items() if n == name and wanted <= set(ls))

    def snapshot(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with self._lock:
            return dict(self._counters)
