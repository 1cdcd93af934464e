"""The throttle filter: the token bucket with a fake clock, cutting a blob (hypothesis), drop with
keep_level, keys per field with bounded memory, hold (waits, wakes on stop), summary records; end to
end: a flood of one file does not hold back another, hold loses nothing."""

import math
import threading

import pytest
from aws import free_port
from conftest import agent_config, checkpoint_offset, one_filter_config, read_archive, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from shipper.filters import FilterContext
from shipper.filters.level import LEVEL_FIELDS
from shipper.filters.throttle import ThrottleFilter, TokenBucket, blob_cut
from shipper.record import PARSED, THROTTLED, Batch, Envelope
from shipper.stats import Stats


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def make(extra: str, clock=None, stop=None):
    config = one_filter_config("throttle", extra)
    stats = Stats()
    context = FilterContext("throttle.0", stats, Envelope(), stop or threading.Event())
    return ThrottleFilter(config.filters[0], context, clock or Clock()), stats


def blob(lines, source="/a.log"):
    return Batch("app", source, 0.0, blob="".join(f"{line}\n" for line in lines).encode())


def test_token_bucket_with_a_fake_clock():
    bucket = TokenBucket(10.0, 20.0, now=0.0)
    assert bucket.refill(0.0) == 20.0
    bucket.take(25)
    assert bucket.refill(0.0) == -5.0 and bucket.wait_for(10) == pytest.approx(1.5)
    assert bucket.refill(1.0) == 5.0
    assert bucket.refill(0.5) == 5.0  # a clock going back adds nothing
    assert bucket.refill(100.0) == 20.0  # never more than the capacity
    assert bucket.wait_for(1000) == 0.0  # a request larger than the capacity waits for a full bucket


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="ab é", max_size=12), max_size=30),
       st.one_of(st.just(math.inf), st.integers(0, 40)), st.one_of(st.just(math.inf), st.integers(0, 200)))
def test_blob_cut_keeps_the_longest_head_that_fits(lines, max_lines, max_bytes):
    data = "".join(f"{line}\n" for line in lines).encode()
    end, count = blob_cut(data, max_lines, max_bytes)
    expected_end = expected_count = 0
    for line in lines:  # line by line: whole lines, while both limits hold
        size = len(line.encode()) + 1
        if expected_count + 1 > max_lines or expected_end + size > max_bytes:
            break
        expected_end += size
        expected_count += 1
    assert (end, count) == (expected_end, expected_count)


def test_drop_keeps_what_the_tokens_allow_and_counts_the_rest():
    clock = Clock()
    throttle, stats = make("lines_per_second = 10", clock)
    [out] = throttle.apply(blob([f"line {i}" for i in range(25)]))
    assert out.blob == b"".join(f"line {i}\n".encode() for i in range(10)) and out.count == 10
    assert stats.get("records_dropped", reason="throttled", filter="throttle.0", input="app") == 15
    clock.now += 0.5
    assert throttle.apply(blob(["a"] * 10))[0].count == 5
    [other] = throttle.apply(blob(["b"] * 10, source="/other.log"))  # its own bucket
    assert other.count == 10


def test_bytes_limit_and_keep_level():
    throttle, stats = make('bytes_per_second = "20B"\nkeep_level = "error"')
    lines = ["0123456789", "abcdefgh", "x INFO over", "ERROR kept anyway", "FATAL too", "WARN no"]
    [out] = throttle.apply(blob(lines))  # 11 + 9 bytes fit in 20
    assert out.message_list() == ["0123456789", "abcdefgh", "ERROR kept anyway", "FATAL too"]
    assert stats.get("records_dropped", reason="throttled") == 2
    # a level the level filter set counts too, and fields are cut along with the lines
    throttle, _ = make('lines_per_second = 1\nkeep_level = "warn"')
    batch = Batch("app", "/a.log", 0.0, blob=b"a\nb\nc\n", fields=[None, LEVEL_FIELDS["warn"], LEVEL_FIELDS["info"]])
    [out] = throttle.apply(batch)
    assert out.message_list() == ["a", "b"] and out.fields == [None, LEVEL_FIELDS["warn"]]


def test_a_field_key_has_a_bucket_per_value_and_memory_is_bounded():
    throttle, stats = make('key = "unit"\nlines_per_second = 1\nmax_keys = 5')
    fields = [{"unit": f"u{i % 5}"} for i in range(20)]
    batch = Batch("journal", None, 0.0, messages=[f"m{i}" for i in range(20)], fields=fields)
    [out] = throttle.apply(batch)
    assert out.messages == ["m0", "m1", "m2", "m3", "m4"]  # one each
    assert stats.get("records_dropped", reason="throttled") == 15
    # more keys than max_keys: the least recently used goes (and comes back with a full bucket)
    small, _ = make('key = "unit"\nlines_per_second = 1\nmax_keys = 3')
    small.apply(Batch("journal", None, 0.0, messages=[f"m{i}" for i in range(2000)],
                      fields=[{"unit": f"u{i}"} for i in range(2000)]))
    assert list(small.limits) == ["u1997", "u1998", "u1999"]
    parsed = Batch("app", None, 0.0, messages=["a", "b", "c"], fields=[{PARSED: {"unit": "x"}}] * 3)
    assert make('key = "unit"\nlines_per_second = 2')[0].apply(parsed)[0].messages == ["a", "b"]


def test_summary_records_once_an_interval_and_at_stop():
    clock = Clock()
    throttle, _ = make("lines_per_second = 1", clock)
    throttle.apply(blob(["a"] * 5))
    assert throttle.flush(clock.now + 30, False) == []
    [summary] = throttle.flush(clock.now + 60, False)
    [record] = summary.records(Envelope())
    assert record["throttled"] == {"source": "/a.log", "dropped": 4, "since": record["throttled"]["since"],
                                   "filter": "throttle.0"}
    assert record["source"] == "/a.log" and record["tag"] == "app" and "dropped 4 records" in record["message"]
    assert throttle.flush(clock.now + 200, True) == []  # reported once
    throttle.apply(blob(["a"] * 3))
    [final] = throttle.flush(clock.now + 1, True)
    assert final.fields[0][THROTTLED]["dropped"] == 3
    parsed = Batch("app", None, 0.0, messages=["x"], fields=[{PARSED: {"throttled": "mine"}}])
    assert next(parsed.records(Envelope()))["fields"] == {"throttled": "mine"}  # a parsed field never poses as one


def test_hold_waits_for_tokens_and_wakes_on_stop():
    stop = threading.Event()
    throttle, stats = make('lines_per_second = 200\nburst = "100ms"\nwhen_exceeded = "hold"', clock=None, stop=stop)
    throttle.clock = __import__("time").monotonic
    batches = [throttle.apply(blob([f"l{i}"] * 20))[0] for i in range(4)]
    assert [b.count for b in batches] == [20] * 4
    assert stats.get("throttle_held_seconds", filter="throttle.0") > 0
    assert stats.get("records_dropped") == 0
    throttle.limits["/a.log"].lines.tokens = -1e9  # would wait for ages
    done = []
    worker = threading.Thread(target=lambda: done.append(throttle.apply(blob(["z"] * 5))[0].count))
    worker.start()
    stop.set()
    worker.join(10)
    assert done == [5]


@pytest.mark.parametrize(("extra", "message"), [
    ("", "filters[0].lines_per_second: set lines_per_second or bytes_per_second"),
    ('lines_per_second = 1\nkeep_level = "loud"', "filters[0].keep_level: unknown level 'loud'"),
    ('lines_per_second = 1\nwhen_exceeded = "hold"\nkeep_level = "error"', "filters[0].keep_level: only with"),
    ("lines_per_second = -1", "filters[0].lines_per_second: must be at least 0"),
])
def test_config_errors_name_the_key(extra, message):
    from shipper.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        make(extra)
    assert any(p.startswith(message) for p in caught.value.problems), caught.value.problems


# ---------------------------------------------------------------- end to end

@pytest.mark.timeout(90)
def test_a_flood_of_one_file_does_not_hold_back_another(workdir, run_agent):
    logs, data = workdir / "logs", workdir / "data"
    flood = "".join(f"flood {i:06d} {'x' * 60}\n" for i in range(20000))
    quiet = "".join(f"quiet {i:04d}\n" for i in range(50))
    (logs / "flood.log").write_text(flood)
    (logs / "quiet.log").write_text(quiet)
    port = free_port()
    config = agent_config(logs, data, server=f'listen = "127.0.0.1:{port}"') + """
[[filters]]
type = "throttle"
lines_per_second = 100
summary_interval = "1s"
"""
    agent = run_agent(config)
    sizes = {"flood.log": len(flood), "quiet.log": len(quiet)}
    wait_for(lambda: all(checkpoint_offset(workdir, name) == n for name, n in sizes.items()),
             message="both checkpoints at their file's end", timeout=60)
    assert agent.stop() == 0
    records = read_archive(data / "archive")
    quiet_seen = [r["message"] for r in records if r["message"].startswith("quiet")]
    assert quiet_seen == [f"quiet {i:04d}" for i in range(50)]  # none held back, none dropped
    flood_seen = [r for r in records if r["message"].startswith("flood")]
    summaries = [r["throttled"] for r in records if "throttled" in r]
    assert 100 <= len(flood_seen) < 20000
    assert {s["source"] for s in summaries} == {str(logs / "flood.log")}
    assert sum(s["dropped"] for s in summaries) == 20000 - len(flood_seen)


@pytest.mark.timeout(90)
def test_hold_makes_the_reader_wait_and_loses_nothing(workdir, run_agent):
    logs, data = workdir / "logs", workdir / "data"
    text = "".join(f"seq={i:07d} held\n" for i in range(1500))
    more = "".join(f"seq={i:07d} held\n" for i in range(1500, 3000))
    (logs / "app.log").write_text(text)
    port = free_port()
    config = agent_config(logs, data, server=f'listen = "127.0.0.1:{port}"') + """
[[filters]]
type = "throttle"
lines_per_second = 1000
burst = "200ms"
when_exceeded = "hold"
"""
    agent = run_agent(config)
    wait_for(lambda: checkpoint_offset(workdir) == len(text), message="first part read", timeout=60)
    with (logs / "app.log").open("a") as handle:  # the bucket is in debt now: this read must wait it out
        handle.write(more)
    wait_for(lambda: checkpoint_offset(workdir) == len(text) + len(more),
             message="checkpoint at the end of app.log", timeout=60)
    import urllib.request

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    held = [line for line in metrics.splitlines() if line.startswith("shipper_throttle_held_seconds_total")]
    assert held and float(held[0].rsplit(" ", 1)[1]) > 0
    assert agent.stop() == 0
    records = read_archive(data / "archive")
    assert [r["message"] for r in records] == [f"seq={i:07d} held" for i in range(3000)]  # all, once, in order


def general(messages, fields, source="/a.log"):
    return Batch("app", source, 0.0, messages=list(messages), fields=list(fields))


def test_a_summary_keyed_by_a_secret_named_field_shows_a_digest_not_the_value():
    throttle, _ = make('key = "api_key"\nlines_per_second = 1\nburst = "1s"')
    secret = "sk_live_0123456789abcdef"
    throttle.apply(general(["a", "b", "c"], [{PARSED: {"api_key": secret}}] * 3))
    (summary,) = throttle.flush(2000.0, final=True)
    text = repr(summary.messages) + repr(summary.fields)
    assert secret not in text and "sha256:" in text
    assert summary.fields[0][THROTTLED]["dropped"] == 2


def test_long_field_values_are_keyed_by_their_digest_bounded_memory():
    throttle, _ = make('key = "request"\nlines_per_second = 1000')
    values = ["x" * 10_000 + str(n) for n in range(50)]
    throttle.apply(general(values, [{PARSED: {"request": v}} for v in values]))
    assert len(throttle.limits) == 50
    assert all(len(key) <= 64 for key in throttle.limits)


def test_records_without_the_key_field_are_limited_per_file_not_in_one_bucket():
    throttle, _ = make('key = "unit"\nlines_per_second = 2\nburst = "1s"')
    noisy = throttle.apply(general(["n"] * 10, [None] * 10, source="/noisy.log"))[0]
    quiet = throttle.apply(general(["q"], [None], source="/quiet.log"))[0]
    assert noisy.count == 2 and quiet.count == 1  # the noisy file does not use up the quiet one's share
    (summary,) = throttle.flush(2000.0, final=True)
    assert summary.fields[0][THROTTLED]["source"] == "/noisy.log"


def test_a_line_longer_than_the_byte_bucket_passes_when_the_bucket_is_full():
    clock = Clock()
    throttle, _ = make('bytes_per_second = 100\nburst = "1s"', clock)
    huge = "y" * 500
    assert throttle.apply(blob([huge, "after"]))[0].message_list() == [huge]  # in debt now
    clock.now += 1.0
    assert throttle.apply(blob(["z"]))[0].count == 0  # the debt is waited out
    clock.now += 10.0
    assert throttle.apply(general([huge], [None]))[0].count == 1  # full again: one more passes
