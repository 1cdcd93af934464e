"""Multi-line events: join a stack trace and the line that announced it into one record.

A *rule* decides, line by line, whether a line continues the event before it. ``start``
regexes give a stateless rule (a line matching it begins an event); the presets for
Python, Java and Go are small state machines, because the last line of a Python
traceback ("ValueError: bad") looks like any other line unless you know you are in one.
"""

from __future__ import annotations

import re
from typing import Callable

# A rule: (line, state) -> (continues_previous_event, new_state).
Rule = Callable[[str, object], tuple[bool, object]]

PRESETS = ("python", "java", "go")


def start_rule(pattern: str) -> Rule:
    start = re.compile(pattern)

    def rule(line: str, state: object) -> tuple[bool, object]:
        return start.search(line) is None, None

    return rule


_PY_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):")
_PY_CHAINED = re.compile(r"^(During handling of the above exception|The above exception was the direct cause)")
_PY_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(:|$)")


def python_rule(line: str, state: object) -> tuple[bool, object]:
    """States: None (ordinary lines), "tb" (inside a traceback), "after" (just after its exception line)."""
    if _PY_TRACEBACK.match(line) or _PY_CHAINED.match(line):
        return True, "tb"
    if line[:1] in (" ", "\t"):
        return True, state
    if state == "tb":
        if not line or _PY_EXCEPTION_LINE.match(line):
            return True, "after" if line else "tb"  # "ValueError: bad" ends the frames
    elif state == "after" and not line:
        return True, "after"  # the blank line before "During handling of the above exception"
    return False, None


_JAVA_CONTINUATION = re.compile(
    r"^(\s+at\s|\s+\.\.\. \d+ (more|common frames omitted)|Caused by:|\s*Suppressed:|\s+)")


def java_rule(line: str, state: object) -> tuple[bool, object]:
    return _JAVA_CONTINUATION.match(line) is not None, None


_GO_PANIC = re.compile(r"^(panic: |fatal error: |runtime: )")
_GO_CONTINUATION = re.compile(
    r"^(\s|goroutine \d+ \[|\[signal |created by |exit status \d+|[\w./*()\[\]{}-]+\(.*\)$|\S+\.go:\d+|$)")


def go_rule(line: str, in_panic: object) -> tuple[bool, object]:
    if in_panic and _GO_CONTINUATION.match(line):
        return True, True
    if _GO_PANIC.match(line):
        # A panic message continues the log line above only when that line was itself a panic.
        return bool(in_panic), True
    return False, False


def make_rule(start: str | None, preset: str | None) -> Rule:
    if preset == "python":
        return python_rule
    if preset == "java":
        return java_rule
    if preset == "go":
        return go_rule
    if start:
        return start_rule(start)
    raise ValueError("multiline needs a start pattern or a preset")


class Joiner:
    """Groups messages into events; the last event is held until it is known to be complete.

    Each message comes with the number of file bytes it consumed, so the caller knows
    where the held event starts and never checkpoints past it.
    """

    def __init__(self, rule: Rule, max_lines: int, max_bytes: int):
        self.rule = rule
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.state: object = None
        self.pending: list[str] = []
        self.pending_flags: dict[str, bool] = {}
        self.pending_bytes = 0  # file bytes consumed by the held event
        self._pending_size = 0

    def feed(self, message: str, consumed: int, flags: dict[str, bool] | None,
             out: list[tuple[str, dict[str, bool]]]) -> None:
        """Add one line; append any event it completes to ``out`` as (message, flags)."""
        continues, self.state = self.rule(message, self.state)
        full = len(self.pending) >= self.max_lines or self._pending_size + len(message) > self.max_bytes
        if self.pending and (not continues or full):
            self.flush(out)
        self.pending.append(message)
        self.pending_bytes += consumed
        self._pending_size += len(message) + 1
        if flags:
            self.pending_flags.update(flags)

    def flush(self, out: list[tuple[str, dict[str, bool]]]) -> None:
        if self.pending:
            out.append(("\n".join(self.pending), self.pending_flags))
            self.pending = []
            self.pending_flags = {}
            self.pending_bytes = 0
            self._pending_size = 0
