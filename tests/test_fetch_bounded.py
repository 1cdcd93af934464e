"""`shipper fetch`'s output path (fetch.output_of): bounded memory whatever the object sizes, the
raw-bytes prefilters never dropping a record the decoded filter keeps, time order across objects
decoded in worker processes, and broken objects among them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shipper.postmortem import fetch
from shipper.postmortem.selection import Filter, ObjectRef
from shipper.record import format_time

HOUR = (int(time.time() // 3600) - 1) * 3600
BASE = f"dt={time.strftime('%Y-%m-%d', time.gmtime(HOUR))}/hour={time.strftime('%H', time.gmtime(HOUR))}"


def key(tag: str = "app", minute: int = 0, seq: int = 1) -> str:
    start = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(HOUR + minute * 60))
    return f"{BASE}/instance=i-1/{tag}/{start}-{seq:06d}.ndjson.gz"


def record(at: float, message, tag: str = "app", **more) -> bytes:
    return orjson.dumps({"time": format_time(at), "tag": tag, "host": "h1", "instance_id": "i-1",
                         "message": message, **more})


def put(root: Path, name: str, lines: list[bytes]) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_gzip(lines))
    return path


def _gzip(lines: list[bytes]) -> bytes:
    packer = zlib.compressobj(1, zlib.DEFLATED, 31)
    return packer.compress(b"\n".join(lines) + b"\n") + packer.flush()


# A real subprocess running output_of as `shipper fetch` does for plain lines, reporting its own
# peak RSS (VmHWM) and its workers' (ru_maxrss of its children, after they ended).
DRIVER = """
import re, resource, sys
from shipper.postmortem import fetch
from shipper.postmortem.selection import Filter, time_range
from shipper.postmortem.sources import open_source
root, since, until, grep, workers = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
if workers != "auto":
    fetch.MAX_WORKERS = int(workers)
wanted = Filter(since, until, None, re.compile(grep) if grep else None, None)
def line_of(record):
    message = record.get("message")
    return None if message is None else str(message)
warn = lambda text: print("warn:", text, file=sys.stderr)
chunks = fetch.output_of(open_source(root), since, until, None, None, wanted, None, line_of, warn)
for chunk in chunks:
    sys.stdout.buffer.write(chunk)
sys.stdout.flush()
own = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]
print(f"peak {own} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", file=sys.stderr)
"""


def run_driver(root: Path, grep: str = "", workers: str = "auto", since: float = HOUR - 3600,
               until: float = HOUR + 3600) -> tuple[list[str], list[str], float, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent)] + sys.path)}
    result = subprocess.run([sys.executable, "-c", DRIVER, str(root), str(since), str(until), grep, workers],
                            capture_output=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    err = result.stderr.decode().splitlines()
    own, children = err[-1].split()[1:]
    return result.stdout.decode().splitlines(), err[:-1], int(own) / 1024, int(children) / 1024


# ---------------------------------------------------------------- memory bound

def test_a_small_object_of_100_mib_of_records_among_others_is_fetched_in_bounded_memory(tmp_path):
    filler = record(HOUR + 1, "x" * 200)
    count = (100 << 20) // len(filler) // 10_000 * 10_000
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    big = tmp_path / key(minute=0, seq=1)
    big.parent.mkdir(parents=True)
    with open(big, "wb") as handle:
        for _ in range(count // 10_000):
            handle.write(packer.compress((filler + b"\n") * 10_000))
        handle.write(packer.compress(record(HOUR + 2, "the last one of the big") + b"\n") + packer.flush())
    assert big.stat().st_size < 1 << 20  # under a MiB for 100 MiB of records
    for minute in (1, 2, 3):  # more objects: the workers are used
        put(tmp_path, key(minute=minute, seq=minute + 1), [record(HOUR + minute * 60 + n, f"m{minute} n{n}")
                                                           for n in range(100)])

    lines, said, own, workers = run_driver(tmp_path, grep="the last one|^m3 n99$", workers="2")
    assert lines == ["the last one of the big", "m3 n99"] and said == []
    assert own < 150 and workers < 150, f"peak RSS {own:.0f} MiB here, {workers:.0f} MiB in a worker"

    lines, said, own, workers = run_driver(tmp_path, grep="", workers="2")  # every line through the merge
    assert len(lines) == count + 1 + 300 and lines[-1] == "m3 n99"
    assert own < 150 and workers < 150, f"peak RSS {own:.0f} MiB here, {workers:.0f} MiB in a worker"


# ---------------------------------------------------------------- raw prefilters are safe

def encodings(record_: dict) -> list[bytes]:
    """How writers put a record on a line: orjson (the agent), Python's json with and without
    ASCII escapes, and with every slash escaped."""
    ascii_ = json.dumps(record_, separators=(",", ":")).encode()
    return [orjson.dumps(record_), ascii_, json.dumps(record_, ensure_ascii=False).encode(),
            ascii_.replace(b"/", b"\\/")]


messages = st.one_of(
    st.lists(st.sampled_from(list('ab/ "\\\'\n\t:,{}é€😀\x1b\u2028') + ["error", "time", "message"]),
             max_size=30).map("".join),
    st.lists(st.text(alphabet="ab', :", max_size=4), max_size=3),
    st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False), st.none(), st.booleans(),
    st.dictionaries(st.sampled_from(["message", "a", "time"]), st.text(alphabet="ab,: ", max_size=3), max_size=2))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=messages, start=st.integers(0, 20), length=st.integers(0, 12), extra=st.booleans())
@example(message='say "hi"', start=4, length=4, extra=False)
@example(message="a/b", start=0, length=3, extra=False)
@example(message=["a", "b"], start=0, length=8, extra=False)
@example(message=100000.0, start=0, length=8, extra=False)
def test_the_grep_prefilter_never_drops_a_line_whose_record_the_decoded_filter_keeps(message, start, length, extra):
    text = str(message or "")
    for pattern in {re.escape(text[start:start + length]), text[start:start + length], "err.r", "a.b", "x|y",
                    f"^{re.escape(text[:3])}", "time", '"', "\\\\", "é"}:
        try:
            grep = re.compile(pattern)
        except re.error:
            continue
        needle = fetch.grep_needle(grep)
        wanted = Filter(HOUR - 10, HOUR + 10, None, grep)
        body = {"time": format_time(HOUR), "tag": "app", "message": message}
        if extra:  # another "message" key, nested, and a second top-level key written after
            body["fields"] = {"message": "error a/b"}
        for line in encodings(body):
            decoded = orjson.loads(line)
            if wanted.matches(decoded) and needle is not None:
                assert fetch.may_match(line, needle), (pattern, needle, line)
    # a forged line with the message key twice: the later one is the record's
    twice = b'{"time":"%s","message":"nothing","message":"an error"}' % format_time(HOUR).encode()
    assert fetch.may_match(twice, b"error")


@settings(max_examples=300, deadline=None)
@given(at=st.floats(HOUR - 100, HOUR + 100), low=st.floats(HOUR - 50, HOUR), high=st.floats(HOUR, HOUR + 50),
       shape=st.sampled_from(["agent", "second time", "escaped", "nested", "spaces", "number"]))
def test_the_time_cut_never_drops_a_line_whose_record_is_in_range(at, low, high, shape):
    stamp = format_time(at)
    other = format_time(low + (high - low) / 2)
    line = {"agent": b'{"time":"%s","tag":"a","message":"m"}' % stamp.encode(),
            "second time": b'{"time":"%s","tag":"a","time":"%s"}' % (stamp.encode(), other.encode()),
            "escaped": b'{"time":"%s\\u0030","m":1}' % stamp[:-1].encode(),
            "nested": b'{"time":"%s","fields":{"time":"x"}}' % stamp.encode(),
            "spaces": b'{"time": "%s"}' % stamp.encode(),
            "number": b'{"time":%d}' % int(at)}[shape]
    wanted = fetch.Wanted(Filter(low, high), None, lambda r: r.get("message"))
    keyed = fetch.keyed([line])[0][0]
    if Filter(low, high).matches(orjson.loads(line)):
        assert not fetch.outside(line, keyed, wanted)


def reference(lines: list[bytes], wanted: Filter, host=None) -> list[tuple[bytes, str]]:
    """What the decoded filter keeps, line by line, in time order (the slow, obvious way)."""
    kept = []
    for key_, line in fetch.keyed(lines):
        try:
            record_ = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if type(record_) is dict and (host is None or record_.get("host") == host) and wanted.matches(record_):
            message = record_.get("message")
            if message is not None:
                kept.append((key_, str(message)))
    return kept


class PlainLine:
    """The plain output (the message, records without one left out) that says so: fetch may then
    render a plain line from its message alone (fetch.plain_messages)."""

    message_text = str

    def __call__(self, record):
        return None if record.get("message") is None else str(record["message"])


def part_of(lines: list[bytes], wanted: Filter, host=None, matched: bool = True,
            plain: bool = False) -> list[tuple[bytes, str]]:
    state = fetch.ObjectState(fetch.Wanted(wanted, host, lambda r: None))
    line_of = PlainLine() if plain else (lambda r: None if r.get("message") is None else str(r["message"]))
    if matched:
        state.funnel = None  # a record matched before: the prefilters apply
    part = fetch.render_part(lines, fetch.Wanted(wanted, host, line_of), state)
    if part is None:
        return []
    keys, text, ends = part
    starts = [0, *ends[:-1]]
    return [(k, text[a:b].decode()[:-1]) for k, a, b in zip(keys, starts, ends)]


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(-30, 30), messages, st.sampled_from(["app", "web"]),
                               st.sampled_from(["h1", "h2"]), st.sampled_from(["orjson", "ascii", "junk"])),
                     max_size=25),
       grep=st.sampled_from([None, "error", "a/b", '"', "é", "^a", "x|time"]),
       tags=st.sampled_from([None, ["app"]]), host=st.sampled_from([None, "h2"]), matched=st.booleans(),
       plain=st.booleans())
def test_a_piece_rendered_with_the_prefilters_is_exactly_what_the_decoded_filter_keeps(rows, grep, tags, host,
                                                                                       matched, plain):
    lines = []
    for offset, message, tag, host_, how in rows:
        body = {"time": format_time(HOUR + offset), "tag": tag, "host": host_, "message": message}
        lines.append({"orjson": orjson.dumps(body), "ascii": json.dumps(body, separators=(",", ":")).encode(),
                      "junk": b'{"time":"' + format_time(HOUR + offset).encode() + b'", not json'}[how])
    wanted = Filter(HOUR - 10, HOUR + 10, tags, re.compile(grep) if grep else None)
    assert part_of(lines, wanted, host, matched, plain) == reference(lines, wanted, host)


# Raw edits of one agent line: valid records the slicing must not misread, and lines that are no
# JSON at all (which decoding skips) that a careless slicing would print.
FORGERIES = {
    "none": lambda line: line,
    "key after message": lambda line: line[:-1] + b',"x":"y"}',
    "message cut open": lambda line: line[:-2] + b"}",
    "bracket": lambda line: line[:-1] + b"]",
    "escaped time key in head": lambda line: line.replace(b'","tag":', b'","\\u0074ime":"0","tag":', 1),
    "time key in head": lambda line: line.replace(b'","tag":', b'","time":"1970-01-01T00:00:00.000000Z","tag":', 1),
    "head time as a probe's": lambda line: line.replace(b'","tag":', b'","\\u0074ime":"%s","tag":' % (b"0" * 27), 1),
    "time cut short": lambda line: line[:20] + line[29:],
    "message key in head": lambda line: line.replace(b'","tag":', b'","message":"first","tag":', 1),
    "bad head": lambda line: line.replace(b'"tag":"', b'"tag":x"', 1),
    "space in message key": lambda line: line.replace(b',"message":"', b',"message": "', 1),
    "message split": lambda line: line[:-2] + b'","b"}',
    "message ends open": lambda line: line[:-2] + b'\\"}',
    "raw tab": lambda line: line[:-2] + b'\t"}',
    "not utf-8": lambda line: line[:-2] + b'\xff"}',
    "trailing space": lambda line: line + b" ",
}


@settings(max_examples=400, deadline=None)
@given(rows=st.lists(st.tuples(st.text(max_size=20) | st.sampled_from(['say "hi"', "a\\", "\\\"", "\u2028é😀", ""]),
                               st.sampled_from(["orjson", "ascii"]), st.sampled_from(sorted(FORGERIES)),
                               st.booleans()), min_size=1, max_size=12))
def test_a_message_sliced_from_its_line_is_exactly_what_decoding_the_line_gives(rows):
    lines, agent = [], True
    for n, (message, how, forgery, extra) in enumerate(rows):
        body = {"time": format_time(HOUR + n), "tag": "app", "host": "h1", **({"n": [1, {"a": None}]} if extra else {}),
                "message": message}
        line = orjson.dumps(body) if how == "orjson" else json.dumps(body, separators=(",", ":")).encode()
        lines.append(FORGERIES[forgery](line))
        agent = agent and forgery == "none" and extra == rows[0][3]  # (one head for all)
    got = fetch.message_piece(lines, {})
    if agent:  # the agent's own lines take the fast path
        assert got is not None
    if got is None:
        return
    for line, key_, message in zip(lines, *got, strict=True):
        decoded = orjson.loads(line)  # raises if slicing accepted a line that is no JSON
        assert type(decoded) is dict and decoded["message"] == message and decoded["time"].encode() == key_


def test_plain_lines_take_the_bulk_path_and_give_the_same_as_line_by_line():
    lines = [record(HOUR + n, f"line {n}") for n in range(-20, 20)]
    assert fetch.plain_times(lines) == [line[9:36] for line in lines]
    wanted = Filter(HOUR - 5, HOUR + 5)
    assert [m for _, m in part_of(lines, wanted)] == [f"line {n}" for n in range(-5, 6)]
    assert part_of(lines, wanted) == reference(lines, wanted) == part_of(lines, wanted, plain=True)
    assert part_of(lines, wanted, matched=False, plain=True) == reference(lines, wanted)  # the first piece too
    assert fetch.message_text_of(PlainLine()) is str and fetch.message_text_of(lambda r: "") is None
    unordered = lines[1:] + lines[:1]
    assert fetch.plain_times(unordered) is None and part_of(unordered, wanted) == reference(unordered, wanted)
    forged = lines + [b'{"time":"%s","time":"1970-01-01T00:00:00.000000Z","message":"old"}'
                      % format_time(HOUR + 30).encode()]
    assert fetch.plain_times(forged) is None  # a second time key: looked at line by line
    assert part_of(forged, wanted) == reference(forged, wanted)
    not_records = lines[:5] + [b'{"time":"%s"}x' % format_time(HOUR).encode(), b'["a"]']
    assert part_of(not_records, wanted) == reference(not_records, wanted)


# ---------------------------------------------------------------- order across objects, in workers

def test_objects_decoded_in_workers_come_out_in_time_order_with_nothing_lost(tmp_path):
    expected = []
    for tag in ("app", "web", "db"):  # three streams over the same minutes: objects overlap in time
        for minute in range(6):
            rows = [(HOUR + minute * 60 + n * 0.7 + len(tag) / 10, f"{tag} {minute} {n}") for n in range(80)]
            expected += rows
            put(tmp_path, key(tag, minute, minute + 1), [record(at, text, tag) for at, text in rows])
    # an event time before its object's start (still within the slack): late in the file, in order out
    put(tmp_path, key("late", 5, 99), [record(HOUR + 240.05, "late 240")])
    expected.append((HOUR + 240.05, "late 240"))
    expected.sort()
    for workers in ("0", "2", "3"):
        lines, said, _, _ = run_driver(tmp_path, workers=workers)
        assert said == [] and lines == [text for _, text in expected], workers


def test_broken_and_special_objects_among_others_are_said_and_the_rest_printed(tmp_path):
    for minute in range(4):
        put(tmp_path, key("app", minute, minute + 1), [record(HOUR + minute * 60 + n, f"ok {minute} {n}")
                                                       for n in range(50)])
    broken = tmp_path / key("app", 1, 50)
    data = _gzip([record(HOUR + 61 + n / 100, f"cut {n}") for n in range(2000)])
    broken.write_bytes(data[:len(data) // 2])
    os.mkfifo(tmp_path / key("app", 2, 51))
    (tmp_path / key("app", 3, 52)).write_bytes(_gzip([b"not json", record(HOUR + 200, "ok after junk")]))
    lines, said, _, _ = run_driver(tmp_path, workers="2")
    assert [line for line in lines if line.startswith("ok ")] == sorted(
        [f"ok {m} {n}" for m in range(4) for n in range(50)] + ["ok after junk"],
        key=lambda t: (int(t.split()[1]) * 60 + int(t.split()[2])) if t != "ok after junk" else 200.5)
    cut = [line for line in lines if line.startswith("cut ")]
    assert cut and cut == [f"cut {n}" for n in range(len(cut))] and len(cut) < 2000
    text = "\n".join(said)
    assert f"{key('app', 1, 50)}: truncated" in text and "the partial line at the break is left out" in text
    assert f"skipped {key('app', 2, 51)}: not read: a FIFO" in text
    assert f"{key('app', 3, 52)}: 1 lines that are not JSON records skipped" in text


def test_when_nothing_matches_the_filter_that_matched_nothing_is_named_across_workers(tmp_path):
    for minute in range(4):
        put(tmp_path, key("app", minute, minute + 1), [record(HOUR + minute * 60 + n, f"ok {n}") for n in range(50)])
    lines, said, _, _ = run_driver(tmp_path, grep="never there", workers="2")
    assert lines == [] and said == ["warn: --grep 'never there' matched nothing: 200 records read between "
                                    f"{format_time(HOUR - 3600)} and {format_time(HOUR + 3600)}"]
    lines, said, _, _ = run_driver(tmp_path, workers="2", since=HOUR + 400, until=HOUR + 500)
    assert lines == [] and len(said) == 1 and "200 records read from the objects of that range" in said[0]


def test_the_runs_merge_cuts_stretches_at_the_next_runs_head():
    merge = fetch.Runs(budget=1 << 20)
    texts = [b"a1\n", b"a3\n", b"a5\n"]
    merge.add([b"1", b"3", b"5"], b"".join(texts), fetch.array("Q", [3, 6, 9]))
    merge.add([b"2", b"4"], b"b2\nb4\n", fetch.array("Q", [3, 6]))
    assert b"".join(merge.emit(b"4")) == b"a1\nb2\na3\n"
    assert b"".join(merge.emit(None)) == b"b4\na5\n" and merge.late == 0
    merge.add([b"1"], b"late\n", fetch.array("Q", [5]))
    assert b"".join(merge.relieve()) == b"" and b"".join(merge.emit(None)) == b"late\n" and merge.late == 1


def test_an_object_ref_list_of_one_is_read_here_without_workers():
    assert fetch.worker_count(1) == 0 and fetch.worker_count(10) in (0, *range(2, fetch.MAX_WORKERS + 1))
    assert isinstance(ObjectRef("k", "i", "t", 0.0, 1), ObjectRef)
