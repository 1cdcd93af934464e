import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from shipper import record as record_module
from shipper.record import _NOT_CONTROL as NOT_CONTROL
from shipper.record import (ENCODING_ERRORS, TIME, Batch, Envelope, encode_ndjson, encode_plain_lines,
                            format_time)

PREFIX = b'{"time":"2026-11-29T13:17:18.123456Z","tag":"app","message":'
SUFFIX = b',"labels":{"app":"web"}}\n'


def reference(blob: bytes) -> list[dict]:
    return [{"time": "2026-11-29T13:17:18.123456Z", "tag": "app", "message": line, "labels": {"app": "web"}}
            for line in blob.decode().split("\n")[:-1]]


@settings(max_examples=500)
@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\n", blacklist_categories=("Cs",))),
                min_size=1, max_size=20))
def test_plain_lines_encode_exactly_like_one_object_per_line(lines):
    blob = "".join(line + "\n" for line in lines).encode()
    out = encode_plain_lines(blob, PREFIX, SUFFIX)
    assert out.endswith(b"\n")
    assert [orjson.loads(line) for line in out.split(b"\n")[:-1]] == reference(blob)


@settings(max_examples=300)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), whitelist_characters='\t\r"\\')),
                min_size=1, max_size=20))
def test_fast_path_without_control_characters_is_exact(lines):
    blob = "".join(line + "\n" for line in lines).encode()
    assert not blob.translate(None, NOT_CONTROL)  # really the fast path
    out = encode_plain_lines(blob, PREFIX, SUFFIX)
    assert [orjson.loads(line) for line in out.split(b"\n")[:-1]] == reference(blob)


def test_backslashes_and_quotes():
    blob = b'path C:\\new\\name\nnext "quoted" \\\\n\n\n'
    out = encode_plain_lines(blob, PREFIX, SUFFIX)
    assert [orjson.loads(line)["message"] for line in out.splitlines()] == \
        ['path C:\\new\\name', 'next "quoted" \\\\n', '']


def test_format_time():
    assert format_time(0) == "1970-01-01T00:00:00.000000Z"
    assert format_time(1764422238.1234567) == "2025-11-29T13:17:18.123457Z"
    assert format_time(1.9999999) == "1970-01-01T00:00:02.000000Z"


def test_envelope_fields_order_and_parsed_field_collisions():
    envelope = Envelope({"host": "ip-10-0-1-7", "instance_id": "i-0abc"}, {"app": "web"})
    batch = Batch("app", "/var/log/app/web.log", 0.5, messages=["m1", "m2"],
                  fields=[{"level": "info", "host": "other", "time": "x", TIME: "2026-01-01T00:00:00.000000Z"},
                          {ENCODING_ERRORS: True}])
    first, second = [orjson.loads(line) for line in encode_ndjson(batch, envelope).splitlines()]
    assert list(first) == ["time", "tag", "host", "instance_id", "source", "message", "level", "fields", "labels"]
    assert first["time"] == "2026-01-01T00:00:00.000000Z"  # the event time from the parser
    assert first["host"] == "ip-10-0-1-7" and first["fields"] == {"host": "other", "time": "x"}
    assert second["encoding_errors"] is True and second["time"] == "1970-01-01T00:00:00.500000Z"


def test_plain_batch_views_agree():
    envelope = Envelope({"host": "h"}, {})
    batch = Batch("app", "/f", 0.0, blob=b"a\nb\n")
    assert batch.count == 2
    assert batch.message_list() == ["a", "b"]
    assert [orjson.loads(l) for l in batch.ndjson(envelope).splitlines()] == list(batch.records(envelope))


def test_control_characters_take_the_exact_path():
    blob = "bell \x07 and nul \x00 and esc \x1b[0m\ttab\r\nnext\n".encode()
    out = encode_plain_lines(blob, PREFIX, SUFFIX)
    assert [orjson.loads(line) for line in out.split(b"\n")[:-1]] == reference(blob)


def test_parsed_rows_spliced_give_the_records_the_dict_path_gives():
    from shipper.record import PARSED, TIME, encode_ndjson

    cases = [  # (message, fields) as the json parser and the forward input make them
        ("plain", {PARSED: {"user": "ann", "n": 1}, TIME: "2026-12-01T00:00:00.000001Z"}),
        ("no time", {PARSED: {"a": [1, {"b": None}]}}),
        (None, {PARSED: {"only": "fields"}, TIME: "2026-12-01T00:00:00.000002Z"}),
        ("docker", {PARSED: {"container_id": "c", "source": "stdout", "time": "theirs", "labels": "x"}}),
        ("all reserved", {PARSED: {"source": "stdout", "fields": {"deep": 1}}}),
        ("nul-led name", {PARSED: {"\x00time": "pose", "ok": 1}}),
        ("nul in a value", {PARSED: {"v": "\x00x"}}),
        ("bytes", {PARSED: {"raw": b"\xffbin"}}),
        ("empty parsed", {PARSED: {}, TIME: "2026-12-01T00:00:00.000003Z"}),
        ("agent flags too", {PARSED: {"a": 1}, "\x00truncated": True}),
        ("no fields", None),
        ("int keys", {PARSED: {1: "one"}}),
    ]
    for labels in ({}, {"team": "core"}):
        envelope = Envelope({"host": "h", "instance_id": "i-1"}, labels)
        encodable = Batch("app", "forward", 1764547200.0, messages=[m for m, _ in cases[:-1]],
                          fields=[f for _, f in cases[:-1]])
        expected = [orjson.loads(orjson.dumps(r, default=record_module.json_default))
                    for r in encodable.records(envelope)]  # the dict path, record by record
        batch = Batch("app", "forward", 1764547200.0, messages=[m for m, _ in cases], fields=[f for _, f in cases])
        lines = [orjson.loads(line) for line in encode_ndjson(batch, envelope).splitlines()]
        assert len(lines) == len(cases)
        assert lines[:-1] == expected
        docker = lines[3]
        assert docker["source"] == "forward" and docker["fields"] == {"source": "stdout", "time": "theirs", "labels": "x"}
        assert lines[7]["raw"] == "\ufffdbin" and lines[5]["fields"] == {"\x00time": "pose"}
        assert lines[-1].get("parse_error") is True  # a key that is not text: the raw line, flagged


_NAMES = st.sampled_from(["user", "n", "source", "time", "message", "fields", "labels", "tag", "host",
                          "\x00time", "\x1f\x1d", "\x1f\x1e", "ok\x00", ""])
_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1), st.text(max_size=8),
              st.sampled_from(["\x1f\x1e", "\x1f\x1d", "\x00x", 0])),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_NAMES, inner, max_size=3), max_leaves=6)
_ROWS = st.lists(st.tuples(
    st.one_of(st.none(), st.text(max_size=8), st.sampled_from(["\x1f\x1e", '"\\u001f\\u001e"'])),
    st.one_of(st.none(),
              st.fixed_dictionaries({record_module.PARSED: st.dictionaries(_NAMES, _VALUES, max_size=4)},
                                    optional={TIME: st.sampled_from(["2026-12-01T00:00:00.000001Z"])}),
              st.dictionaries(_NAMES | st.sampled_from([TIME, record_module.TRUNCATED]), _VALUES, max_size=4))),
    max_size=12)


@settings(max_examples=400, deadline=None)
@given(_ROWS, st.booleans())
def test_a_batch_encoded_in_one_call_gives_the_records_of_the_dict_path(rows, labelled):
    # The batch's records go through one orjson call with marker items between them and a marker key
    # for the head; whatever a record holds (the markers themselves among its names and values), the
    # lines are the records the dict path makes, one per row.
    envelope = Envelope({"host": "h"}, {"team": "core"} if labelled else {})
    batch = Batch("app", "forward", 1764547200.0, messages=[m for m, _ in rows], fields=[f for _, f in rows])
    expected = [orjson.loads(orjson.dumps(r, default=record_module.json_default)) for r in batch.records(envelope)]
    out = encode_ndjson(batch, envelope)
    assert out == b"" if not rows else out.endswith(b"\n")
    assert [orjson.loads(line) for line in out.splitlines()] == expected
    # and the batch is as it was: other outputs make their records from the same rows
    assert [orjson.loads(orjson.dumps(r, default=record_module.json_default)) for r in batch.records(envelope)] == expected


def _spliced(batch: Batch, envelope: Envelope) -> bytes | None:
    """What one orjson call for the whole batch gives (None: it cannot be spliced)."""
    head = envelope.head(format_time(batch.read_time), batch.tag, batch.source)
    rest_of_head = orjson.dumps({k: v for k, v in head.items() if k != "time"})[1:-1]
    return record_module._splice(batch.message_list(), batch.fields, head, rest_of_head, envelope.labels)


def test_the_common_shapes_are_spliced_in_one_call():
    from shipper.record import PARSED

    envelope = Envelope({"host": "h", "instance_id": "i-1"}, {"team": "core"})
    batch = Batch("docker.web", "forward", 1764547200.0, messages=["GET /", "POST /", "daemon started"],
                  fields=[{PARSED: {"container_id": "c1", "source": "stdout"}, TIME: "2026-12-01T00:00:00.000001Z"},
                          {PARSED: {"user": "ann"}},
                          {"facility": "daemon", "host": "web-1", TIME: "2026-12-01T00:00:00.000002Z"}])
    spliced = _spliced(batch, envelope)
    assert spliced is not None and spliced == encode_ndjson(batch, envelope)
    assert orjson.loads(spliced.splitlines()[2]) == {
        "time": "2026-12-01T00:00:00.000002Z", "tag": "docker.web", "host": "h", "instance_id": "i-1",
        "source": "forward", "message": "daemon started", "facility": "daemon", "fields": {"host": "web-1"},
        "labels": {"team": "core"}}


def test_marker_look_alikes_in_a_record_take_the_record_by_record_path():
    from shipper.record import PARSED

    envelope = Envelope({"host": "h"}, {})
    for fields in ({PARSED: {"list": ["a", "\x1f\x1e", "b"]}},   # the item between records, inside one
                   {PARSED: {"\x1f\x1d": 0}},                   # the head's key, with its value
                   {PARSED: {"deep": {"\x1f\x1d": 0.5}}}):      # the head's key and a value like its own
        batch = Batch("app", "forward", 1764547200.0, messages=["one", "two"], fields=[fields, {PARSED: {"n": 1}}])
        assert _spliced(batch, envelope) is None
        lines = [orjson.loads(line) for line in encode_ndjson(batch, envelope).splitlines()]
        assert lines[0] == {"time": "2025-12-01T00:00:00.000000Z", "tag": "app", "host": "h", "source": "forward",
                            "message": "one", **fields[PARSED]}
        assert lines[1]["n"] == 1 and lines[1]["message"] == "two"


def test_odd_records_in_a_big_batch_cost_their_piece_and_change_nothing():
    from shipper.record import PARSED, SPLICE_PIECE

    envelope = Envelope({"host": "h"}, {"team": "core"})
    count = SPLICE_PIECE * 3 + 5
    fields = [{PARSED: {"n": n}} for n in range(count)]
    for odd in (0, SPLICE_PIECE + 1, count - 1):
        fields[odd] = {PARSED: {"\x00nul-led": odd, "n": odd}}
    fields[SPLICE_PIECE * 2] = {PARSED: {1: "not a text name"}}
    batch = Batch("app", "forward", 1764547200.0, messages=[f"line {n}" for n in range(count)], fields=fields)
    assert _spliced(batch, envelope) is None
    lines = [orjson.loads(line) for line in encode_ndjson(batch, envelope).splitlines()]
    assert len(lines) == count
    assert [line.get("n") for line in lines] == [None if n == SPLICE_PIECE * 2 else n for n in range(count)]
    assert lines[SPLICE_PIECE + 1]["fields"] == {"\x00nul-led": SPLICE_PIECE + 1}
    assert lines[SPLICE_PIECE * 2]["parse_error"] is True  # the one that cannot be JSON: its raw line
    assert all(line["labels"] == {"team": "core"} and line["message"] == f"line {n}" for n, line in enumerate(lines))


@settings(max_examples=300)
@given(st.lists(st.one_of(st.floats(0, 253402300799.999), st.integers(0, 3).map(lambda k: 1764547200.5 + k)),
                min_size=1, max_size=20))
def test_format_time_keeps_its_last_second_without_mixing_seconds_up(epochs):
    import datetime

    for epoch in epochs:  # runs of one second and jumps between seconds, in any order
        text = format_time(epoch)
        parsed = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
        assert abs(parsed.timestamp() - epoch) <= 1e-6 * max(1.0, epoch / 1e9) + 5e-7
