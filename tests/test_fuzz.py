"""Property tests over everything that turns outside bytes into what leaves the box.

Random bytes, random JSON and logfmt objects with arbitrary keys and values, and random
multi-line sequences go through framing (a real file, read by the tailer), parsing, record
encoding and every output's encoder: NDJSON, forward msgpack, PutLogEvents, EMF and
PutMetricData. For every example: no exception escapes, the output decodes, the agent's keys
are never overwritten by parsed data, and every input byte is in exactly one batch's range.

A few seconds by default; ``SHIPPER_FUZZ_EXAMPLES=5000 make test PYTEST_ARGS=tests/test_fuzz.py``
for a longer run.
"""

from __future__ import annotations

import collections
import json
import math
import os
import tempfile
from types import SimpleNamespace

import msgpack
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shipper.inputs.framing import RecordBuilder
from shipper.inputs.tail import TailedFile
from shipper.multiline import Joiner, make_rule
from shipper.outputs import log_events
from shipper.outputs.cloudwatch_logs import CloudWatchLogsOutput
from shipper.outputs.forward_protocol import encode_entries
from shipper.outputs.metric_data import MAX_DATUMS, datums, emf_events, requests
from shipper.parsers import LineParser
from shipper.record import METRICS, TIME, Batch, Envelope, format_time

EXAMPLES = int(os.environ.get("SHIPPER_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IDENTITY = {"host": "web-1", "instance_id": "i-0abc", "image_id": "ami-1", "region": "eu-west-1"}
ENVELOPE = Envelope(IDENTITY, {"app": "web"})
READ_TIME = 1764422238.25
SOURCE = "/var/log/app/fuzz.log"

# Keys with the agent's names, NUL-led copies of them, control characters and dots.
AGENT_NAMES = ["time", "tag", "host", "instance_id", "source", "message", "labels", "fields", "metrics",
               "truncated", "parse_error", "encoding_errors", "time_error"]
keys = st.one_of(st.sampled_from(AGENT_NAMES), st.sampled_from(AGENT_NAMES).map(lambda k: "\x00" + k),
                 st.text(max_size=12), st.text(alphabet="\x00\x01\x1b.$\n ", max_size=4))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=3),
    max_leaves=8)
json_lines = st.dictionaries(keys, json_values, max_size=6).map(lambda d: json.dumps(d, ensure_ascii=False))
logfmt_lines = st.lists(st.tuples(st.text(alphabet="ab\x00=\" \\.time", min_size=1, max_size=6),
                                  st.text(alphabet="xy\x00=\" \\", max_size=6)), max_size=5).map(
    lambda pairs: " ".join(f"{k}={v}" for k, v in pairs))
multiline_lines = st.sampled_from([
    "Traceback (most recent call last):", '  File "a.py", line 1, in f', "ValueError: bad", "",
    "panic: boom", "goroutine 1 [running]:", "main.f(0x1, {0x2})", "\t/src/main.go:10 +0x1d",
    "java.lang.IllegalStateException: x", "\tat com.example.A.b(A.java:1)", "Caused by: y", "... 3 more",
    "2026-11-29 13:17:18 INFO plain line", "During handling of the above exception, another exception occurred:",
])
text_lines = st.one_of(json_lines, logfmt_lines, multiline_lines, st.text(max_size=40))
byte_lines = st.one_of(text_lines.map(lambda t: t.replace("\n", " ").encode("utf-8", "surrogatepass")),
                       st.binary(max_size=60))
inputs = st.fixed_dictionaries({
    "lines": st.lists(byte_lines, max_size=25),
    "tail": st.binary(max_size=30).filter(lambda b: b"\n" not in b),  # a last line without newline
    "parser": st.sampled_from(["none", "json", "logfmt", "regex"]),
    "multiline": st.sampled_from([None, "python", "java", "go", "^\\S"]),
    "max_line_bytes": st.sampled_from([24, 64, 4096]),
    "read_bytes": st.sampled_from([7, 64, 1 << 20]),
    "time_key": st.sampled_from([None, "time", "\x00time", "ts"]),
})


def batches_of(data: bytes, case: dict) -> list[Batch]:
    """The batches the file input makes of ``data``: a real file, read by the real tailer."""
    with tempfile.NamedTemporaryFile() as handle:
        handle.write(data)
        handle.flush()
        fd = os.open(handle.name, os.O_RDONLY)
        try:
            tailed = TailedFile(SOURCE, fd, 0, case["max_line_bytes"])
            parser = LineParser(case["parser"], "(?P<word>\\w+) (?P<ts>\\S+)" if case["parser"] == "regex" else None,
                                case["time_key"])
            joiner = None
            if case["multiline"]:
                start = case["multiline"] if case["multiline"].startswith("^") else None
                preset = None if start else case["multiline"]
                joiner = Joiner(make_rule(start, preset), 5, case["max_line_bytes"])
            builder = RecordBuilder("app", SOURCE, parser, joiner, 0)
            out = []
            while (read := tailed.read(case["read_bytes"])) is not None:
                out.append(builder.build(read, READ_TIME))
            out.append(builder.build(tailed.flush_carry(), READ_TIME) if tailed.carry else None)
            out.append(builder.flush_pending(READ_TIME))
        finally:
            os.close(fd)
    return [b for b in out if b is not None]


def check_record(record: dict) -> None:
    assert record["tag"] == "app" and record["source"] == SOURCE
    assert {k: record[k] for k in IDENTITY} == IDENTITY
    assert record["labels"] == {"app": "web"}
    assert isinstance(record["message"], str)
    assert "metrics" not in record
    assert record["time"] == format_time(READ_TIME) or record["time"][:4].isdigit() and record["time"][-1] == "Z"
    if "fields" in record:
        assert isinstance(record["fields"], dict)
    for flag in ("truncated", "parse_error", "encoding_errors", "time_error"):
        assert record.get(flag, True) is True


@FUZZ
@given(inputs)
def test_framing_parsing_and_every_encoder_hold_for_any_input(case):
    data = b"".join(line + b"\n" for line in case["lines"]) + case["tail"]
    batches = batches_of(data, case)

    # every byte is in exactly one batch's range, in order
    offset = 0
    for batch in batches:
        assert batch.start == offset and batch.end >= batch.start
        offset = batch.end
    assert offset == len(data)

    for batch in batches:
        batch.source = SOURCE
        ndjson = batch.ndjson(ENVELOPE)
        records = [orjson.loads(line) for line in ndjson.split(b"\n")[:-1]]
        assert len(records) == batch.count
        for record in records:
            check_record(record)
            assert datetime_ok(record["time"])
            if case["time_key"] is None or case["parser"] == "none":
                assert record["time"] == format_time(READ_TIME)  # no parsed value can set it

        entries = list(msgpack.Unpacker(__import__("io").BytesIO(encode_entries(batch, ENVELOPE)), raw=False,
                                        ext_hook=lambda code, data: (code, data)))
        assert len(entries) == batch.count
        for (code, stamp), entry in entries:
            assert code == 0 and len(stamp) == 8
            assert entry["source"] == SOURCE and entry["host"] == "web-1" and isinstance(entry["message"], str)

        for output_format in ("raw", "json"):
            check_put_log_events(batch, output_format)


def datetime_ok(stamp: str) -> bool:
    from datetime import datetime
    return 1970 <= datetime.fromisoformat(stamp).year <= 9999


def check_put_log_events(batch: Batch, output_format: str) -> None:
    stand_in = SimpleNamespace(settings=SimpleNamespace(format=output_format),
                               context=SimpleNamespace(envelope=ENVELOPE, name="cloudwatch_logs.0",
                                                       stats=SimpleNamespace(add=lambda *a, **k: None)))
    tally = log_events.Tally(None, 0)
    events = collections.deque(CloudWatchLogsOutput._events(stand_in, batch, tally))
    while events:
        request = log_events.take_request(events)
        assert request, "an event that fits no request"
        assert len(request) <= log_events.MAX_EVENTS
        assert sum(len(e.message.encode()) + log_events.EVENT_OVERHEAD for e in request) <= log_events.MAX_REQUEST_BYTES
        assert all(e.message for e in request)
        assert all(len(e.message.encode()) <= log_events.MAX_MESSAGE_BYTES for e in request)
        assert [e.timestamp for e in request] == sorted(e.timestamp for e in request)
        assert request[-1].timestamp - request[0].timestamp < log_events.MAX_SPAN_MS


metric_names = st.one_of(st.sampled_from(["cpu.percent", "disk.used_bytes", "network.rx_bytes_per_second",
                                          "process.rss_bytes"]), st.text(max_size=30))
numbers = st.one_of(st.floats(), st.integers(-(2**70), 2**70), st.booleans(), st.none(), st.text(max_size=3))
samples = st.dictionaries(metric_names, st.one_of(numbers, st.dictionaries(st.text(max_size=10), numbers,
                                                                          max_size=4)), max_size=30)


@FUZZ
@given(samples, st.integers(0, 2**45))
def test_metric_encoders_hold_for_any_sample(sample, stamp_ms):
    made, dropped = datums(sample, stamp_ms / 1000, {"InstanceId": "i-0abc"}, [], [], 60)
    for request in requests(made):
        assert 0 < len(request) <= MAX_DATUMS
        for datum in request:
            assert math.isfinite(datum["Value"])
        orjson.dumps(request)
    events, dropped_emf = emf_events(sample, stamp_ms, "Shipper", {"InstanceId": "i-0abc"}, [], [], 60)
    assert dropped == dropped_emf
    for event in events:
        decoded = orjson.loads(orjson.dumps(event))
        assert decoded["_aws"]["Timestamp"] == stamp_ms
    batch = Batch("metrics", None, stamp_ms / 1000, messages=[None],
                  fields=[{METRICS: sample, TIME: format_time(stamp_ms / 1000)}])
    for line in batch.ndjson(ENVELOPE).splitlines():
        record = orjson.loads(line)
        assert record["tag"] == "metrics" and record["host"] == "web-1"
