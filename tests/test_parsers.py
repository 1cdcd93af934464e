import pytest

from shipper.multiline import Joiner, make_rule
from shipper.parsers import LineParser, parse_logfmt, parse_time
from shipper.record import PARSE_ERROR, PARSED, TIME, TIME_ERROR


def test_json_parser_and_time_extraction():
    parser = LineParser("json", time_key="ts")
    fields = parser.fields_for('{"ts": "2026-11-29T13:17:18.5Z", "level": "error", "n": 3}')
    assert fields == {PARSED: {"level": "error", "n": 3}, TIME: "2026-11-29T13:17:18.500000Z"}
    assert parser.fields_for("not json") == {PARSE_ERROR: True}
    assert parser.fields_for("[1, 2]") == {PARSE_ERROR: True}  # valid JSON but not an object


def test_unparseable_time_keeps_fields_and_is_counted():
    parser = LineParser("json", time_key="ts")
    assert parser.fields_for('{"ts": "yesterday-ish", "a": 1}') == \
        {PARSED: {"ts": "yesterday-ish", "a": 1}, TIME_ERROR: True}
    assert parser.time_errors == 1


def test_logfmt():
    assert parse_logfmt('level=info msg="hello \\"world\\"" dur=3ms debug') == \
        {"level": "info", "msg": 'hello "world"', "dur": "3ms", "debug": True}
    assert parse_logfmt("just some words") is None
    assert LineParser("logfmt").fields_for("plain text") == {PARSE_ERROR: True}


def test_regex_parser_with_strptime_time():
    parser = LineParser("regex", r"^(?P<ts>\S+ \S+) (?P<level>[A-Z]+) (?P<msg>.*)$", "ts", "%Y-%m-%d %H:%M:%S")
    assert parser.fields_for("2026-11-29 13:17:18 WARN disk almost full") == \
        {PARSED: {"level": "WARN", "msg": "disk almost full"}, TIME: "2026-11-29T13:17:18.000000Z"}
    assert parser.fields_for("garbage") == {PARSE_ERROR: True}


@pytest.mark.parametrize("value,fmt,expected", [
    (1764422238, "auto", "2025-11-29T13:17:18.000000Z"),
    (1764422238500, "auto", "2025-11-29T13:17:18.500000Z"),
    ("1764422238500", "epoch_ms", "2025-11-29T13:17:18.500000Z"),
    ("2026-11-29T15:17:18+02:00", "auto", "2026-11-29T13:17:18.000000Z"),
    ("29/Nov/2026:13:17:18 +0000", "%d/%b/%Y:%H:%M:%S %z", "2026-11-29T13:17:18.000000Z"),
    ("nonsense", "auto", None),
    (["list"], "auto", None),
])
def test_parse_time(value, fmt, expected):
    assert parse_time(value, fmt) == expected


def join(rule, lines):
    joiner = Joiner(rule, max_lines=100, max_bytes=1 << 20)
    events = []
    for line in lines:
        joiner.feed(line, len(line) + 1, None, events)
    held = joiner.pending_bytes
    joiner.flush(events)
    return [text for text, _ in events], held


PYTHON_TRACE = """2026-11-29 13:17:18 ERROR request failed
Traceback (most recent call last):
  File "app.py", line 10, in handle
    do()
KeyError: 'id'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "app.py", line 12, in handle
    raise RuntimeError("wrapped")
RuntimeError: wrapped
2026-11-29 13:17:19 INFO next request""".split("\n")


def test_python_preset():
    events, held = join(make_rule(None, "python"), PYTHON_TRACE)
    assert events == ["\n".join(PYTHON_TRACE[:-1]), PYTHON_TRACE[-1]]
    assert held == len(PYTHON_TRACE[-1]) + 1  # the last event is held until it is known complete


JAVA_TRACE = """2026-11-29 13:17:18 ERROR boom
java.lang.IllegalStateException: bad state
	at com.example.App.run(App.java:10)
	at com.example.App.main(App.java:3)
Caused by: java.io.IOException: disk
	at com.example.Io.write(Io.java:7)
	... 2 more
2026-11-29 13:17:19 INFO ok""".split("\n")


def test_java_preset():
    # The exception line itself starts at column 0; with the java preset it begins its own event
    # unless a start regex says otherwise, as in Fluent Bit's java parser.
    events, _ = join(make_rule(None, "java"), JAVA_TRACE)
    assert events == [JAVA_TRACE[0], "\n".join(JAVA_TRACE[1:7]), JAVA_TRACE[7]]


GO_PANIC = """2026/11/29 13:17:18 serving on :8080
panic: runtime error: index out of range [5] with length 3

goroutine 1 [running]:
main.main()
	/src/main.go:8 +0x1d
exit status 2
2026/11/29 13:17:20 restarted""".split("\n")


def test_go_preset():
    events, _ = join(make_rule(None, "go"), GO_PANIC)
    assert events == [GO_PANIC[0], "\n".join(GO_PANIC[1:7]), GO_PANIC[7]]


def test_start_regex_and_max_lines():
    rule = make_rule(r"^\d{4}-", None)
    joiner = Joiner(rule, max_lines=3, max_bytes=1 << 20)
    events = []
    for line in ["2026-01 a", " b", " c", " d", "2026-02 e"]:
        joiner.feed(line, len(line) + 1, None, events)
    assert [text for text, _ in events] == ["2026-01 a\n b\n c", " d"]
