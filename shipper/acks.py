"""End-to-end acknowledgement bookkeeping.

A batch goes to every output whose ``match`` takes its tag; it is *done* only when each of
them confirmed it (delivered, or durably stored). A file's checkpoint then moves to the end
of the longest run of done batches from its committed offset, because outputs may confirm
batches out of order.
"""

from __future__ import annotations

import threading
from typing import Callable


class Acknowledgement:
    """Counts down the outputs a batch still waits for, then calls ``on_done`` once."""

    __slots__ = ("_remaining", "_on_done", "_lock")

    def __init__(self, outputs: int, on_done: Callable[[], None] | None):
        self._remaining = outputs
        self._on_done = on_done
        self._lock = threading.Lock()
        if outputs <= 0:
            self._finish()

    def confirm(self) -> None:
        with self._lock:
            self._remaining -= 1
            finished = self._remaining == 0
        if finished:
            self._finish()

    def _finish(self) -> None:
        if self._on_done is not None:
            callback, self._on_done = self._on_done, None
            callback()


class OutputAck:
    """One output's share of a batch's Acknowledgement: confirms it, and tells the output's runner
    (which keeps the oldest unconfirmed record's age for /metrics and /healthz)."""

    __slots__ = ("_parent", "_on_confirm", "_done")

    def __init__(self, parent: Acknowledgement, on_confirm: Callable[["OutputAck"], None]):
        self._parent = parent
        self._on_confirm = on_confirm
        self._done = False

    def confirm(self) -> None:
        if self._done:  # an output confirming twice must not count for another output
            return
        self._done = True
        self._on_confirm(self)
        self._parent.confirm()


class OffsetTracker:
    """The committed offset of one file: the end of the contiguous run of done byte ranges."""

    def __init__(self, committed: int = 0, owner: object = None):
        self._committed = committed
        self.owner = owner  # the followed file whose checkpoint this offset is (a copy may take it over)
        self._done: dict[int, int] = {}  # start -> end of ranges done ahead of the committed offset
        self._lock = threading.Lock()
        # Bumped when the file restarts (truncation): acknowledgements of older content are ignored.
        self.generation = 0

    @property
    def committed(self) -> int:
        return self._committed

    @property
    def pending_ranges(self) -> int:
        return len(self._done)

    def done(self, start: int, end: int, generation: int = 0) -> bool:
        """Mark [start, end) as done; return True when the committed offset moved."""
        with self._lock:
            if generation != self.generation or end <= self._committed:
                return False
            self._done[start] = max(end, self._done.get(start, end))
            moved = False
            while self._committed in self._done:
                self._committed = self._done.pop(self._committed)
                moved = True
            return moved

    def reset(self, offset: int) -> None:
        """Start over at ``offset`` (the file was truncated): ranges of the old content are void."""
        with self._lock:
            self._committed = offset
            self._done.clear()
            self.generation += 1
