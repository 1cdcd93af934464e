"""Heartbeats of the input threads, for the systemd watchdog and /healthz.

Output runners beat as they loop (``OutputRunner.heartbeat``); an input cannot beat while it
legitimately waits for data, so it beats with how long it means to wait next instead.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

_current = threading.local()  # the heartbeat of the input whose thread this is (see bind)


class Heartbeat:
    """An input thread's promise to come back to its loop by ``due`` (monotonic seconds).

    An input beats with how long it means to wait next (its poll interval, the next sample), so a
    quiet input costs nothing and one stuck in an open, a read or a regex is seen as late. While it
    hands a batch on (waiting for room in the outputs' queues) it is not late: that wait is the
    outputs', and their runners have heartbeats of their own.
    """

    __slots__ = ("due", "_paused")
    STARTUP_GRACE = 60.0

    def __init__(self) -> None:
        self.due = time.monotonic() + self.STARTUP_GRACE
        self._paused = 0

    def beat(self, next_within: float) -> None:
        self.due = time.monotonic() + next_within

    def late_by(self, now: float) -> float:
        return 0.0 if self._paused else max(0.0, now - self.due)

    def paused(self) -> "Heartbeat":
        return self

    def __enter__(self) -> None:
        self._paused += 1

    def __exit__(self, *exc) -> None:
        self._paused -= 1


def bind(beat: "Heartbeat | None") -> None:
    """This thread is an input's: ``waiting()`` in it pauses that input's heartbeat."""
    _current.beat = beat


@contextlib.contextmanager
def waiting() -> Iterator[None]:
    """A wait on purpose (room in the outputs, a throttle holding the reader): not being stuck.
    Everything else the thread does, filters' regexes included, stays under its heartbeat."""
    beat = getattr(_current, "beat", None)
    if beat is None:
        yield
        return
    with beat.paused():
        yield


def late_inputs(inputs: list, period: float) -> list[str]:
    """The inputs that are more than ``period`` seconds late back to their loop (stuck)."""
    now = time.monotonic()
    return [input_name(source) for source in inputs
            if (beat := getattr(source, "heartbeat", None)) is not None and beat.late_by(now) > period]


def input_name(source) -> str:
    settings = getattr(source, "settings", None)
    return f"input {getattr(settings, 'type', '?')}:{getattr(settings, 'id', None) or getattr(source, 'tag', '?')}"
