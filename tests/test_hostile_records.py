"""What a line says can never become what the agent says, and one bad record never stops it.

Findings 1 and 11 of issue 12 (NUL-led keys posing as agent keys and crashing the encoder; odd
event times written as malformed RFC 3339), the record-by-record fallback, and the quarantine
of batches that made the agent fail twice.
"""

from __future__ import annotations

import os
from datetime import datetime

import orjson
import pytest

from shipper.inputs.framing import RecordBuilder
from shipper.inputs.tail import LINES, Read
from shipper.multiline import Joiner, make_rule
from shipper.outputs.log_events import timestamp_ms
from shipper.parsers import LineParser, parse_time
from shipper.quarantine import Quarantine, Strike, merge_strikes, overlapping
from shipper.record import PARSED, Batch, Envelope, encode_ndjson, format_time, repair

ENVELOPE = Envelope({"host": "web-1", "instance_id": "i-0abc"}, {"app": "web"})
AGENT_KEYS = {"time", "tag", "host", "instance_id", "source", "message", "labels"}


def records_of(lines: list[str], parser: str = "json", **options) -> list[dict]:
    line_parser = LineParser(parser, **options)
    fields = [line_parser.fields_for(line) for line in lines]
    batch = Batch("app", "/var/log/app.log", 1764422238.0, messages=list(lines), fields=fields)
    return [orjson.loads(line) for line in encode_ndjson(batch, ENVELOPE).splitlines()]


FORGERIES = [
    '{"\\u0000fields":"x","time":1}',  # crashed _merge_fields with TypeError on the old code
    '{"\\u0000time":"1999-01-01T00:00:00.000000Z","\\u0000tag":"lifecycle","\\u0000host":"evil"}',
    '{"\\u0000labels":{"app":"forged"},"\\u0000instance_id":"i-forged","\\u0000message":"forged"}',
    '{"\\u0000metrics":{"cpu.percent":99},"\\u0000source":"/etc/shadow","tag":"t","labels":"l"}',
    '{"fields":"not a dict","time":5,"labels":[1]}',
]


@pytest.mark.parametrize("line", FORGERIES)
def test_parsed_keys_never_pose_as_agent_keys(line):
    [record] = records_of([line])
    assert record["time"] == "2025-11-29T13:17:18.000000Z"  # the read time, not a parsed one
    assert (record["tag"], record["host"], record["instance_id"]) == ("app", "web-1", "i-0abc")
    assert record["source"] == "/var/log/app.log"
    assert record["labels"] == {"app": "web"}
    assert record["message"] == line  # the raw line, always
    assert "metrics" not in record
    parsed = orjson.loads(line)
    assert set(record["fields"]) == {k for k in parsed if k[:1] == "\x00" or k in AGENT_KEYS | {"fields"}}


def test_a_raw_nul_in_a_logfmt_key_stays_a_parsed_field():
    [record] = records_of(["\x00time=1999 \x00tag=forged level=info"], parser="logfmt")
    assert record["tag"] == "app" and record["time"].startswith("2025-")
    assert record["fields"] == {"\x00time": "1999", "\x00tag": "forged"}
    assert record["level"] == "info"


def test_a_cloudwatch_timestamp_of_any_type_falls_back_to_the_read_time():
    for odd in (1, 1.5, ["x"], {"a": 1}, "9999999-01-01", "not a time"):
        assert timestamp_ms(odd, 42) == 42  # TypeError on the old code for the non-strings
    assert timestamp_ms("2025-11-29T13:17:18.500000Z", 0) == 1764422238500


@pytest.mark.parametrize("value", [-1.5, -62135596800, 1e300, "0001-01-01T00:00:00Z",
                                   "9999-12-31T23:59:59.9999999Z", float("nan"), float("inf"),
                                   "-1", "1e400", 10**30])
def test_odd_event_times_are_rejected_not_written_malformed(value):
    assert parse_time(value, "auto") is None


def test_a_rejected_event_time_keeps_the_read_time_and_says_so():
    [record] = records_of(['{"ts": -1.5, "a": 1}'], time_key="ts")
    assert record["time"] == "2025-11-29T13:17:18.000000Z"
    assert record["time_error"] is True
    assert record["ts"] == -1.5  # kept as a field, for whoever reads it


@pytest.mark.parametrize("epoch", [0.0, 0.9999999, 1764422238.9999996, 253402300799.9999999, -1.5, 1e20,
                                   float("nan")])
def test_format_time_always_writes_valid_rfc3339(epoch):
    stamp = format_time(epoch)
    assert len(stamp) == 27 and stamp.endswith("Z")
    moment = datetime.fromisoformat(stamp)
    assert 1970 <= moment.year <= 9999


def test_an_unencodable_record_is_shipped_raw_and_the_rest_untouched():
    class Unencodable:  # nothing a parser returns today; the fallback must hold for what comes next
        pass

    batch = Batch("app", "/f", 0.0, messages=["ok", "bad", "also ok"],
                  fields=[{PARSED: {"a": 1}}, {PARSED: {"obj": Unencodable()}}, None])
    records = [orjson.loads(line) for line in encode_ndjson(batch, ENVELOPE).splitlines()]
    assert [r["message"] for r in records] == ["ok", "bad", "also ok"]
    assert records[0]["a"] == 1 and "parse_error" not in records[0]
    assert records[1]["parse_error"] is True and "obj" not in records[1]
    assert batch.dropped == 0


def test_repair_drops_and_counts_what_cannot_be_encoded_even_raw():
    batch = Batch("app", "/f", 0.0, messages=["ok", "\ud800 lone surrogate"], fields=None)
    assert repair(batch, ENVELOPE) == 1
    assert batch.messages == ["ok"] and batch.count == 1


def test_a_parser_that_raises_ships_the_read_raw_and_the_next_read_parses_again():
    parser = LineParser("json")
    calls = []

    def flaky(line):
        calls.append(line)
        if "boom" in line:
            raise RuntimeError("a parser bug")
        return {"n": line}

    parser.parse = flaky
    joiner = Joiner(make_rule("^\\S", None), 100, 1 << 20)
    builder = RecordBuilder("app", "/f", parser, joiner, 0)
    assert builder.build(Read(0, 13, [(LINES, b"first\n  cont\n", 0)]), 0.0) is None  # held: may go on
    batch = builder.build(Read(13, 23, [(LINES, b"boom\nnext\n", 0)]), 0.0)
    assert builder.failures == 1
    assert batch.messages == ["first", "  cont", "boom", "next"]  # the held event and the read, raw
    assert all(f["\x00parse_error"] for f in batch.fields)
    assert (batch.start, batch.end) == (0, 23)  # every byte accounted for
    batch = builder.build(Read(23, 34, [(LINES, b"fine\nlater\n", 0)]), 0.0)
    assert batch.messages == ["fine"] and batch.fields == [{PARSED: {"n": "fine"}}]


def test_strikes_count_failures_in_a_row_on_overlapping_ranges():
    first = merge_strikes([], [("/a", 0, 100), ("/b", 0, 10)])
    assert first == [Strike("/a", 0, 100, 1), Strike("/b", 0, 10, 1)]
    second = merge_strikes(first, [("/a", 50, 150), ("/c", 0, 5)])
    assert second == [Strike("/a", 50, 150, 2), Strike("/c", 0, 5, 1)]  # /b was not involved: forgotten
    assert overlapping(second, "/a", 140, 200) == Strike("/a", 50, 150, 2)
    assert overlapping(second, "/a", 150, 200) is None
    assert overlapping(second, "/c", 0, 5) is None  # struck once only


def test_quarantine_is_taken_once_and_survives_a_damaged_file(tmp_path):
    quarantine = Quarantine(str(tmp_path))
    quarantine.strike([("/a", 0, 100)])
    quarantine.strike([("/a", 0, 100), ("/b", 0, 1)])
    assert quarantine.take() == [Strike("/a", 0, 100, 2)]
    assert quarantine.load() == [Strike("/b", 0, 1, 1)]
    assert quarantine.take() == []
    (tmp_path / "quarantine.json").write_bytes(b'{"strikes": [{"source": 1}]')
    assert quarantine.load() == []


def quarantined_input(tmp_path, content: bytes, strikes, multiline: str = "", same_file: bool = True):
    """A real file input on a real file, with these strikes taken at start (one poll, no thread)."""
    import threading

    from shipper.config import load_text
    from shipper.inputs.file import FileInput
    from shipper.pipeline import InputContext
    from shipper.stats import Stats

    log = tmp_path / "app.log"
    log.write_bytes(content)
    config = load_text(f"""
[agent]
data_dir = "{tmp_path}/data"
[[inputs]]
type = "file"
tag = "app"
paths = ["{log}"]
watch = false
{multiline}
[[outputs]]
type = "stdout"
""", "t.toml", {})
    stats = Stats()
    st = os.stat(log)
    identity = (st.st_dev, st.st_ino if same_file else st.st_ino + 1)
    strikes = [s._replace(source=str(log), identity=identity) for s in strikes]
    source = FileInput(config.inputs[0], InputContext(str(tmp_path / "data"), stats, 1.0, strikes))
    emitted = []
    source.discover(at_startup=True)
    source.poll(emitted.append, threading.Event())
    for tailed in list(source.files.values()):
        source._ship_held(tailed, emitted.append)
    return source, emitted, stats


def test_a_quarantined_range_is_moved_past_exactly_even_with_multiline(tmp_path):
    content = b"a\n a1\nPOISON\n p1\nb\n b1\n"
    poison_start, poison_end = content.index(b"POISON"), content.index(b"b\n")
    source, emitted, stats = quarantined_input(tmp_path, content, [Strike("", poison_start, poison_end, 2)],
                                               multiline='multiline = { start = "^\\\\S" }')
    messages = [m for batch in emitted for m in batch.message_list()]
    assert messages == ["a\n a1", "b\n b1"]  # before and after ship; the struck range does not
    assert stats.get("records_dropped", reason="quarantined") == 2
    [tailed] = source.files.values()
    for batch in emitted:
        tailed.tracker.done(batch.start, batch.end, tailed.tracker.generation)
    assert tailed.tracker.committed == len(content)  # the checkpoint moves past all of it


def test_a_strike_of_another_file_at_the_same_path_is_not_applied(tmp_path):
    _, emitted, stats = quarantined_input(tmp_path, b"one\ntwo\n", [Strike("", 0, 4, 2)])
    assert [m for b in emitted for m in b.message_list()] == ["two"]
    assert stats.get("records_dropped", reason="quarantined") == 1
    other = tmp_path / "rotated"
    other.mkdir()
    # the same path and offsets, struck on the inode of a file since rotated away: nothing skipped
    _, emitted, stats = quarantined_input(other, b"one\ntwo\n", [Strike("", 0, 4, 2)], same_file=False)
    assert [m for b in emitted for m in b.message_list()] == ["one", "two"]
    assert stats.get("records_dropped", reason="quarantined") == 0


def test_a_clean_stop_ends_the_run_of_failures(tmp_path):
    quarantine = Quarantine(str(tmp_path))
    quarantine.strike([("/a", 0, 100, (1, 2))])
    quarantine.clear()
    quarantine.strike([("/a", 0, 100, (1, 2))])
    assert quarantine.take() == []  # two failures, but not in a row
    quarantine.strike([("/a", 0, 100, (3, 4))])
    assert quarantine.take() == []  # another file (inode) at the same path and offsets
