"""grep: the chunk cut equals searching line by line; rules in order; fields; keep_level; counters."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shipper.config import Settings
from shipper.filters import FilterContext
from shipper.filters.grep import GrepFilter, LinePattern, analyse
from shipper.record import PARSED, Batch
from shipper.stats import Stats

# Fragments that make patterns of every kind: byte-safe, text-only (., \s, \b, classes, non-ASCII,
# IGNORECASE), able to run over a newline (\s+, [^x]*, [\s\S]), empty matches, and the ones that are
# searched line by line (lookarounds, \A, \Z, scoped non-multiline anchors).
FRAGMENTS = ["a", "b", " ", "é", "^", "$", r"\s", r"\s+", r"\S", ".", ".*", "[^a]", "[^a]*", r"[\s\S]", r"\d",
             r"\b", r"\B", "(?i:A)", "x*", "a|b", "(a)", r"\1", "(?=b)", "(?<=a)", r"\A", r"\Z", "(?-m:^)",
             "(?-m:$)", "[ab]", "[a-z]+", "a?", "{2}", "(?:ab)+", "\t", r"\w"]
ALPHABET = ["a", "b", " ", "é", "\t", "1", "x", "A", "ab", "a b", "\u00e0"]


def reference(pattern: str, lines: list[str], keep_matching: bool) -> bytes:
    regex = re.compile(pattern, re.M)
    return "".join(line + "\n" for line in lines if (regex.search(line) is not None) == keep_matching).encode()


def valid(pattern: str) -> bool:
    try:
        re.compile(pattern, re.M)
        return True
    except re.error:
        return False


patterns = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=5).map("".join).filter(valid)
line_lists = st.lists(st.lists(st.sampled_from(ALPHABET), max_size=6).map("".join), max_size=12)


@settings(max_examples=1500, deadline=None)
@given(patterns, line_lists, st.booleans())
def test_chunk_cut_equals_line_by_line(pattern, lines, keep_matching):
    blob = "".join(line + "\n" for line in lines).encode()
    kept, count = LinePattern(pattern).cut(blob, keep_matching, len(lines))
    assert kept == reference(pattern, lines, keep_matching)
    assert count == kept.count(b"\n")  # counted in the runs only: the batch is not counted again


@pytest.mark.parametrize("pattern, chunked, byte_safe", [
    ("GET /health", True, True),
    ("^(GET|HEAD) /health$", True, True),
    ("level=[a-z]+", True, True),
    (r"\d+ms", True, False),           # \d is Unicode on text
    ("a.b", True, False),              # . is one character, not one byte
    ("[^ ]+", True, False),            # a negated class would match one byte of a character
    ("(?i)health", True, False),       # IGNORECASE folds non-ASCII letters (the Kelvin sign is a k)
    ("é", True, False),
    (r"(?<=a)b", False, True),         # a lookbehind would see the line before
    (r"a(?=\n)", False, True),
    (r"\Aa", False, True),
    ("(?-m:^a)", False, True),
])
def test_analyse(pattern, chunked, byte_safe):
    assert analyse(pattern) == (chunked, byte_safe)


def test_a_match_over_a_newline_is_not_trusted():
    # "a\s+b" finds "a\nb" over the blob; neither line has a match alone.
    pattern = LinePattern(r"a\s+b")
    assert pattern.cut(b"xa\nb\na  b\n", True, 3) == (b"a  b\n", 1)
    assert pattern.cut(b"xa\nb\na  b\n", False, 3) == (b"xa\nb\n", 2)


def make(rules, keep_level=None, name="grep.0"):
    stats = Stats()
    where = "filters[0]"
    settings = Settings(where, {"type": "grep", "match": ["*"], "rules": rules, "keep_level": keep_level})
    assert GrepFilter.problems(settings, where) == []
    return GrepFilter(settings, FilterContext(name, stats)), stats


def blob_batch(lines, tag="app", source="/var/log/app.log"):
    batch = Batch(tag, source, 0.0, blob="".join(line + "\n" for line in lines).encode(), start=10, end=99)
    batch.on_done = object()
    return batch


def test_exclude_health_checks_on_plain_lines_stays_a_blob_and_counts():
    grep, stats = make([{"exclude": "GET /health"}])
    batch = blob_batch(["GET /health 200", "GET /orders 200", "GET /healthz 200", "POST /orders 201"])
    [out] = grep.apply(batch)
    assert out.blob == b"GET /orders 200\nPOST /orders 201\n" and out.messages is None
    assert out.count == 2 and (out.start, out.end, out.on_done) == (10, 99, batch.on_done)
    assert stats.get("records_dropped", reason="filtered", filter="grep.0", input="app") == 2


def test_rules_apply_in_order_each_on_what_the_previous_kept():
    grep, stats = make([{"include": "ERROR|WARN"}, {"exclude": "retrying"}])
    batch = blob_batch(["INFO ok", "ERROR disk full", "WARN retrying", "ERROR retrying now", "WARN slow"])
    [out] = grep.apply(batch)
    assert out.message_list() == ["ERROR disk full", "WARN slow"]
    assert stats.get("records_dropped", reason="filtered") == 3


def test_rules_on_tag_and_source_keep_or_drop_a_whole_blob():
    grep, _ = make([{"include": r"\.log$", "field": "source"}, {"exclude": "^debug", "field": "tag"}])
    assert grep.apply(blob_batch(["x"], source="/a/b.log"))[0].count == 1
    assert grep.apply(blob_batch(["x"], source="/a/b.txt"))[0].count == 0
    assert grep.apply(blob_batch(["x"], tag="debug.app"))[0].count == 0
    assert grep.apply(blob_batch(["x"], source=None))[0].count == 0  # no source: an include cannot match


def test_a_field_plain_lines_do_not_have():
    include, _ = make([{"include": "error", "field": "level"}])
    exclude, _ = make([{"exclude": "error", "field": "level"}])
    assert include.apply(blob_batch(["a", "b"]))[0].count == 0
    assert exclude.apply(blob_batch(["a", "b"]))[0].count == 2


def records(*items, tag="app"):
    messages = [m for m, _ in items]
    fields = [f for _, f in items]
    return Batch(tag, "/var/log/app.log", 0.0, messages=messages, fields=fields)


def test_fields_parsed_nested_and_journald():
    grep, stats = make([{"include": "^5", "field": "http.status"}, {"exclude": "nginx", "field": "unit"}])
    batch = records(("a", {PARSED: {"http": {"status": 502}}}),
                    ("b", {PARSED: {"http": {"status": 200}}}),
                    ("c", {PARSED: {"http": {"status": 500}}, "unit": "nginx.service"}),
                    ("d", None))
    [out] = grep.apply(batch)
    assert out.messages == ["a"] and out.fields == [{PARSED: {"http": {"status": 502}}}]
    assert stats.get("records_dropped", reason="filtered") == 3


def test_level_field_is_normalised():
    grep, _ = make([{"include": "^(warn|error)$", "field": "level"}])
    batch = records(("a", {PARSED: {"level": "WARNING"}}), ("b", {PARSED: {"level": "info"}}),
                    ("c", {"priority": 3}), ("d", {PARSED: {"level": "Err"}}))
    assert grep.apply(batch)[0].messages == ["a", "c", "d"]


def test_keep_level_is_never_dropped():
    grep, stats = make([{"exclude": "."}], keep_level="error")
    batch = records(("a", {PARSED: {"level": "error"}}), ("b", {PARSED: {"level": "warn"}}),
                    ("c", {PARSED: {"level": "FATAL"}}), ("d", {PARSED: {"level": "nonsense"}}), ("e", None))
    assert grep.apply(batch)[0].messages == ["a", "c"]
    assert stats.get("records_dropped", reason="filtered") == 3


def test_multi_line_messages_match_at_each_line_start():
    grep, _ = make([{"exclude": r"^\s+at "}])
    batch = records(("Exception\n    at Foo.bar", None), ("fine", None))
    assert grep.apply(batch)[0].messages == ["fine"]


def test_nothing_removed_returns_the_same_batch():
    grep, stats = make([{"exclude": "never-there"}])
    batch = records(("a", None))
    assert grep.apply(batch) == [batch]
    plain = blob_batch(["a"])
    assert grep.apply(plain)[0] is plain
    assert stats.get("records_dropped") == 0


@pytest.mark.parametrize("rules, message", [
    ([], "filters[0].rules: at least one rule"),
    ([{"exclude": "("}], "filters[0].rules[0].exclude: invalid regular expression '('"),
    ([{"exlude": "x"}], "filters[0].rules[0].exlude: unknown key; did you mean exclude?"),
    ([{"include": "x", "exclude": "y"}], "filters[0].rules[0]: give exactly one of include or exclude"),
    (["x"], "filters[0].rules[0]: expected a table"),
    ([{"include": 3}], "filters[0].rules[0].include: expected a regular expression"),
    ([{"include": "x", "field": ""}], "filters[0].rules[0].field: expected a field name"),
])
def test_rule_problems(rules, message):
    settings = Settings("filters[0]", {"rules": rules, "keep_level": None})
    problems = GrepFilter.problems(settings, "filters[0]")
    assert any(p.startswith(message) for p in problems), problems


LEVEL_FIELDS = [None, {PARSED: {"level": "info"}}, {PARSED: {"level": "error"}}, {PARSED: {"level": "debug"}}]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["GET /health", "ERROR x", "ok", "é a", ""]),
                          st.integers(0, len(LEVEL_FIELDS) - 1)), max_size=12),
       st.sampled_from([None, "error", "info"]))
def test_plain_lines_with_shared_fields_filter_as_records_do(rows, keep_level):
    # The level filter gives plain lines shared fields dicts: the blob path (a flag per line, message
    # rules still cut over the blob) must keep exactly what the record path keeps, fields along.
    rules = [{"exclude": "health"}, {"include": "^(info|error)$", "field": "level"}, {"exclude": "^$"}]
    lines = [line for line, _ in rows]
    fields = [LEVEL_FIELDS[index] for _, index in rows]
    grep, _ = make(rules, keep_level=keep_level)
    plain = Batch("app", None, 0.0, blob="".join(f"{line}\n" for line in lines).encode(), fields=fields)
    general = Batch("app", None, 0.0, messages=list(lines), fields=list(fields))
    [from_blob] = grep.apply(plain)
    [from_records] = grep.apply(general)
    assert from_blob.blob is not None
    assert from_blob.message_list() == from_records.message_list()
    assert from_blob.fields == from_records.fields
    assert all(kept is shared for kept, shared in zip(from_blob.fields, from_records.fields))  # not copied


def test_keep_level_keeps_plain_lines_whose_detected_level_is_high_enough():
    """Plain lines have no parsed level: the level filter's rule decides, and adds nothing to them."""
    grep, stats = make([{"exclude": "payment"}], keep_level="error")
    lines = ["INFO payment ok", "ERROR payment failed", "INFO other", "CRITICAL payment service down"]
    [out] = grep.apply(blob_batch(lines))
    assert out.message_list() == ["ERROR payment failed", "INFO other", "CRITICAL payment service down"]
    assert out.fields is None and out.blob is not None
    assert stats.get("records_dropped", reason="filtered", filter="grep.0", input="app") == 1
    multiline = Batch("app", None, 0.0, messages=["Traceback (most recent call last):\n  payment", "payment"])
    [out] = grep.apply(multiline)
    assert out.message_list() == ["Traceback (most recent call last):\n  payment"]


def test_message_rules_leave_records_without_a_message_alone():
    """A metrics sample has no message: an include on messages (with the default match "*") keeps it."""
    grep, _ = make([{"include": "ERROR"}])
    samples = Batch("metrics", None, 0.0, messages=[None, "ERROR x", "INFO y"], fields=[{"m": 1}, None, None])
    [out] = grep.apply(samples)
    assert out.message_list() == [None, "ERROR x"]
