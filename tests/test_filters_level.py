"""The level filter: the rule for one line, the same rule over a blob (hypothesis), and the record
extension it relies on (a plain blob with per-line fields encodes like the general path)."""

import threading

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shipper.filters import FilterContext
from shipper.filters.level import LEVEL_FIELDS, LevelFilter, level_of, levels_of_blob
from shipper.record import PARSED, TIME, TRUNCATED, Batch, Envelope, _encode_records
from shipper.stats import Stats

CASES = [
    ("2026-11-18 11:06:40,007 ERROR [worker-7] app.mail: failed", "error"),
    ("2026-11-18 11:06:40,007 WARNING [worker-7] app: slow", "warn"),
    ("WARN something", "warn"),
    ("[error] 1234#0: *5 open() failed", "error"),
    ("[Notice] config reloaded", "notice"),
    ("ts=2026 level=error msg=boom", "error"),
    ('ts=2026 lvl="WARN" msg=x', "warn"),
    ("severity = info msg", "info"),
    ("log_level=debug x", "debug"),
    ('{"ts":"2026","level":"info","msg":"ok"}', "info"),
    ('{"severity": "CRITICAL", "msg":"x"}', "critical"),
    ("E1201 12:00:00.000000 1234 main.go:12] broken", "error"),
    ("W1201 12:00:00.000000 1234 main.go:12] hmm", "warn"),
    ("I1201 12:00:00.000000 1234 main.go:12] fine", "info"),
    ("F1201 12:00:00.000000 1234 main.go:12] dead", "fatal"),
    ("Traceback (most recent call last):", "error"),
    ('Exception in thread "main" java.lang.NullPointerException', "error"),
    ("panic: runtime error: index out of range", "fatal"),
    ("12:00 CRITICAL disk full", "critical"),
    ("FATAL: the database system is shutting down", "fatal"),
    ("DEBUG x", "debug"), ("TRACE y", "trace"), ("2026 INF zerolog line", "info"), ("2026 WRN zero", "warn"),
    ("NOTICE: extension created", "notice"),
    # first one wins
    ("INFO retrying after ERROR", "info"),
    # no level
    ("user info updated", None),
    ("GET /api/ERROR_CODES 200", None),
    ("TERROR alert", None),
    ("xlevel=error", None),
    ("status=error", None),
    ("at 12:00 E1201 12:00:00 later", None),
    ("recovered from panic: x", None),
    ("10.0.0.1 - - [18/Nov/2026:11:06:40 +0000] \"GET / HTTP/1.1\" 200", None),
    ("", None),
]


@pytest.mark.parametrize(("line", "level"), CASES)
def test_level_of_one_line(line, level):
    assert level_of(line) == level
    assert levels_of_blob(line.encode() + b"\n") == [level]


def test_only_the_start_of_a_long_line_is_looked_at():
    assert level_of("x" * 300 + " ERROR") is None
    assert level_of("x" * 100 + " ERROR") == "error"


WORDS = st.sampled_from(["ERROR", "INFO", "warn", "[error]", "level=", "level=info", '"level":"DEBUG"', "E1201",
                         "12:00:00", "panic: ", "Traceback (most recent call last)", "x", " ", "=", ":", '"',
                         "é", "日本", "FATAL", "_", "lvl", "v", "severity=crit"])
LINES = st.lists(st.lists(WORDS, max_size=8).map("".join), max_size=30)


@settings(max_examples=300, deadline=None)
@given(LINES)
def test_the_blob_rule_equals_the_line_rule(lines):
    blob = "".join(line + "\n" for line in lines).encode()
    assert levels_of_blob(blob) == [level_of(line) for line in lines]


# ---------------------------------------------------------------- the record extension

ENVELOPES = [Envelope({"host": "h", "instance_id": "i-1"}, {"app": "web"}), Envelope()]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\n"),
                                  max_size=20),
                          st.sampled_from([None, *LEVEL_FIELDS.values(), {TRUNCATED: True},
                                           {PARSED: {"level": "warn", "fields": 1}}])), max_size=20),
       st.sampled_from(ENVELOPES))
def test_a_blob_with_fields_encodes_as_the_general_path(rows, envelope):
    blob = "".join(text + "\n" for text, _ in rows).encode()
    batch = Batch("app", "/var/log/a.log", 1795000000.5, blob=blob, fields=[extra for _, extra in rows])
    fast = batch.ndjson(envelope)
    assert fast == _encode_records(batch, envelope)
    for line in fast.splitlines():
        orjson.loads(line)


def test_a_field_before_the_message_takes_the_general_path():
    batch = Batch("app", None, 0.0, blob=b"a\nb\n", fields=[{TIME: "2026-01-01T00:00:00.000000Z"}, None])
    records = [orjson.loads(line) for line in batch.ndjson(Envelope()).splitlines()]
    assert records[0]["time"] == "2026-01-01T00:00:00.000000Z" and records[1]["message"] == "b"


def test_every_view_of_a_blob_sees_its_fields():
    batch = Batch("app", "/x", 0.0, blob=b"ERROR a\nb\n", fields=[LEVEL_FIELDS["error"], None])
    assert [r.get("level") for r in batch.records(Envelope())] == ["error", None]
    assert batch.message_list() == ["ERROR a", "b"]
    assert [p.fields for p in batch.pieces()] == [[LEVEL_FIELDS["error"]], [None]]
    assert batch.as_raw().messages == ["ERROR a", "b"]


def test_fields_of_another_length_than_the_blob_are_refused():
    with pytest.raises(ValueError, match="2 lines with 1 fields"):
        Batch("app", None, 0.0, blob=b"a\nb\n", fields=[None])


# ---------------------------------------------------------------- the filter

def make_filter():
    stats = Stats()
    return LevelFilter(None, FilterContext("level.0", stats, Envelope(), threading.Event())), stats


def test_a_plain_blob_gets_shared_level_fields_and_stays_a_blob():
    level, stats = make_filter()
    batch = Batch("app", "/x", 0.0, blob=b"ERROR a\nno level\nINFO b\nERROR c\n")
    [out] = level.apply(batch)
    assert out.blob == batch.blob and out.fields[0] is out.fields[3] is LEVEL_FIELDS["error"]
    assert [r.get("level") for r in out.records(Envelope())] == ["error", None, "info", "error"]
    assert stats.get("levels_detected", filter="level.0") == 3


def test_a_level_already_there_is_kept_and_shared_dicts_are_not_changed():
    level, _ = make_filter()
    shared = {PARSED: {"msg": "x"}}
    batch = Batch("app", None, 0.0, messages=["ERROR one", "WARN two", "INFO three"],
                  fields=[{PARSED: {"level": "debug"}}, shared, shared])
    [out] = level.apply(batch)
    assert [r["level"] for r in out.records(Envelope())] == ["debug", "warn", "info"]
    assert shared == {PARSED: {"msg": "x"}}
    blob = Batch("app", None, 0.0, blob=b"ERROR one\nERROR two\n", fields=[shared, shared])
    [out] = level.apply(blob)
    assert out.fields[0] is out.fields[1] and out.fields[0][PARSED] == {"msg": "x", "level": "error"}
    assert shared == {PARSED: {"msg": "x"}}


def test_records_without_message_and_empty_batches_pass():
    level, _ = make_filter()
    assert level.apply(Batch("m", None, 0.0, messages=[None], fields=[{"\x00metrics": {}}]))[0].fields == [
        {"\x00metrics": {}}]
    assert level.apply(Batch("app", None, 0.0, blob=b""))[0].count == 0
