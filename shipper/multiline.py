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


# A configured start regex looks at most this many characters of a line: a pattern that
# backtracks (even quadratically) then costs a bounded time per line however long the line is.
START_MATCH_CHARS = 4096


def start_rule(pattern: str) -> Rule:
    start = re.compile(pattern)

    def rule(line: str, state: object) -> tuple[bool, object]:
        return start.search(line, 0, START_MATCH_CHARS) is None, None

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
# The preset patterns are anchored and no quantifier in them can give back what another one
# took, so a line costs time linear in its length (tests/test_multiline_linear.py: 1 MiB lines).
_GO_CONTINUATION = re.compile(r"^(\s|goroutine \d+ \[|\[signal |created by |exit status \d+|\S+\.go:\d+|$)")
# A frame's function, "main.(*T).Run(0x1, ...)": a run of these characters holding a "(", and a
# ")" at the end of the line. Checked without a regex: as the regex [\w./*()\[\]{}-]+\(.*\)$ it
# backtracked quadratically (a 256 KiB line of "(" took a minute of CPU).
_GO_FUNCTION_CHARS = re.compile(r"[\w./*()\[\]{}-]*")


def is_go_function_line(line: str) -> bool:
    if not line.endswith(")"):
        return False
    run = _GO_FUNCTION_CHARS.match(line).end()
    return line.find("(", 1, run) != -1


def go_rule(line: str, in_panic: object) -> tuple[bool, object]:
    if in_panic and (_GO_CONTINUATION.match(line) or is_go_function_line(line)):
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

    def snapshot(self) -> tuple:
        """What the joiner holds, to go back to if feeding a read fails half way (see restore)."""
        return list(self.pending), dict(self.pending_flags), self.pending_bytes, self._pending_size, self.state

    def restore(self, snapshot: tuple) -> None:
        pending, flags, self.pending_bytes, self._pending_size, self.state = snapshot
        self.pending, self.pending_flags = list(pending), dict(flags)

    def reset(self) -> None:
        """Forget the held event and the rule's state (the file starts over, or a read failed)."""
        self.flush([])
        self.state = None

    def flush(self, out: list[tuple[str, dict[str, bool]]]) -> None:
        if self.pending:
            out.append(("\n".join(self.pending), self.pending_flags))
            self.pending = []
            self.pending_flags = {}
            self.pending_bytes = 0
            self._pending_size = 0
