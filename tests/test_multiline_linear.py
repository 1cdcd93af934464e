"""Multi-line presets and configured regexes cost time linear in a line's length (issue 12, finding 6).

No timed assertion: each test has a pytest-timeout far above what a linear scan of 1 MiB takes and
far below what the old, quadratic go pattern took on it (minutes: its cost grows with the square of
the line, ~25 s for 256 KiB). A test that backtracks quadratically is stopped by the timeout and fails.
"""

from __future__ import annotations

import pytest

from shipper.multiline import START_MATCH_CHARS, Joiner, go_rule, java_rule, make_rule, python_rule
from shipper.parsers import LineParser
from shipper.record import PARSE_ERROR

MIB = 1024 * 1024


def join(rule, lines: list[str]) -> list[str]:
    joiner = Joiner(rule, max_lines=500, max_bytes=4 * MIB)
    events: list[tuple[str, dict]] = []
    for line in lines:
        joiner.feed(line, len(line) + 1, None, events)
    joiner.flush(events)
    return [text for text, _ in events]


@pytest.mark.timeout(10)
def test_go_preset_is_linear_on_lines_that_almost_look_like_a_frame():
    in_panic = True
    # Each of these made the old continuation regex retry from every "(" to the end of the line.
    assert go_rule("(" * MIB, in_panic) == (False, False)
    assert go_rule("a(" * (MIB // 2) + "(", in_panic) == (False, False)
    assert go_rule("main.f(" * (MIB // 7) + " x", in_panic) == (False, False)
    assert go_rule("x.go:" * (MIB // 5), in_panic) == (False, False)
    # ... and these are frames or file lines, which continue the panic as before.
    assert go_rule("main.(*T).Run(" + "0x1, " * (MIB // 5) + ")", in_panic) == (True, True)
    assert go_rule("(" * MIB + ")", in_panic) == (True, True)
    assert go_rule("x" * MIB + ".go:12 +0x1d", in_panic) == (True, True)
    assert go_rule("main.main()", in_panic) == (True, True)
    assert go_rule("main.main()", False) == (False, False)  # not after a panic
    assert go_rule("()", in_panic) == (False, False)  # the function needs a name before its "("


@pytest.mark.timeout(10)
def test_go_preset_joins_a_panic_with_a_one_mib_line_after_it():
    long_line = "(" * MIB
    events = join(make_rule(None, "go"), ["starting", "panic: boom", "", "goroutine 1 [running]:",
                                           "main.main()", "\t/src/main.go:8 +0x1d", long_line, "next"])
    assert events == ["starting", "panic: boom\n\ngoroutine 1 [running]:\nmain.main()\n\t/src/main.go:8 +0x1d",
                      long_line, "next"]


@pytest.mark.timeout(10)
def test_python_and_java_presets_are_linear_on_one_mib_lines():
    assert python_rule("Traceback (most recent call last):", None) == (True, "tb")
    assert python_rule("A" * MIB + "!", "tb") == (False, None)  # nearly an exception line
    assert python_rule("Error" + "." * MIB + ": x", "tb") == (True, "after")
    assert python_rule(" " * MIB + "x", "tb") == (True, "tb")
    assert java_rule(" " * MIB + "at", None) == (True, None)  # indented: continues
    assert java_rule("\t" + "... 1" * (MIB // 5), None) == (True, None)
    assert java_rule("Caused" * (MIB // 6), None) == (False, None)


@pytest.mark.timeout(10)
def test_a_configured_start_regex_sees_only_the_head_of_a_line():
    rule = make_rule(r"a+b", None)  # backtracks quadratically on a run of "a"
    assert rule("a" * MIB, None) == (True, None)  # no start in the head: continues the event
    assert rule("ab" + "a" * MIB, None) == (False, None)
    # A start beyond the first START_MATCH_CHARS characters is not seen (the documented bound).
    assert rule("x" * START_MATCH_CHARS + "ab", None) == (True, None)
    assert rule("x" * (START_MATCH_CHARS - 2) + "ab", None) == (False, None)


@pytest.mark.timeout(10)
def test_the_regex_parser_sees_only_the_head_of_a_line():
    parser = LineParser("regex", r"(?P<run>a+)b")
    fields = parser.fields_for("a" * MIB)
    assert fields == {PARSE_ERROR: True}  # shipped raw and flagged, in bounded time
    parsed = parser.fields_for("aaab" + "a" * MIB)
    assert PARSE_ERROR not in parsed and "aaa" in repr(parsed)
    assert parser.fields_for("x" * MIB + "ab") == {PARSE_ERROR: True}  # beyond the head: not seen
