"""The PutLogEvents limits, checked on the pure planning functions with random events."""

from __future__ import annotations

import collections

from hypothesis import given, settings, strategies as st

from shipper.outputs.log_events import (
    EVENT_OVERHEAD, MAX_EVENT_BYTES, MAX_EVENTS, MAX_MESSAGE_BYTES, MAX_REQUEST_BYTES, MAX_SPAN_MS, Event, Tally,
    rejected_ranges, take_request, timestamp_ms, utf8_parts,
)

HOUR_MS = 3600 * 1000
TALLY = Tally(None, 0)


def event(ts: int, size: int) -> Event:
    return Event(ts, "m", size, TALLY)


def drain(pending: collections.deque) -> list[list[Event]]:
    requests = []
    while pending:
        requests.append(take_request(pending))
    return requests


def check_limits(request: list[Event]) -> None:
    assert 1 <= len(request) <= MAX_EVENTS
    assert sum(e.size for e in request) <= MAX_REQUEST_BYTES
    times = [e.timestamp for e in request]
    assert times == sorted(times)
    assert times[-1] - times[0] < MAX_SPAN_MS


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 72 * HOUR_MS), st.integers(EVENT_OVERHEAD + 1, MAX_EVENT_BYTES)),
                min_size=1, max_size=300))
def test_every_request_obeys_the_limits_and_no_event_is_lost(specs):
    events = [Event(ts, str(i), size, TALLY) for i, (ts, size) in enumerate(specs)]
    requests = drain(collections.deque(events))
    for request in requests:
        check_limits(request)
    assert sorted(e.message for r in requests for e in r) == sorted(e.message for e in events)


def test_count_limit_cuts_at_ten_thousand_events():
    requests = drain(collections.deque(event(1000 + i, 30) for i in range(20_001)))
    assert [len(r) for r in requests] == [10_000, 10_000, 1]


def test_byte_limit_counts_message_bytes_plus_26_per_event():
    # 4 events of exactly a quarter of the limit fit; a fifth byte more does not.
    quarter = MAX_REQUEST_BYTES // 4
    pending = collections.deque([event(1, quarter)] * 4 + [event(2, 1)])
    assert len(take_request(pending)) == 4 and len(pending) == 1


def test_a_request_never_spans_24_hours_and_the_rest_stays_in_order():
    pending = collections.deque([event(0, 30), event(10 * HOUR_MS, 30), event(24 * HOUR_MS, 30),
                                 event(30 * HOUR_MS, 30)])
    first = take_request(pending)
    assert [e.timestamp for e in first] == [0, 10 * HOUR_MS]
    assert [e.timestamp for e in pending] == [24 * HOUR_MS, 30 * HOUR_MS]


def test_events_are_sorted_within_a_request_and_a_smaller_limit_is_honoured():
    pending = collections.deque([event(5, 30), event(3, 30), event(9, 30), event(1, 30)])
    request = take_request(pending, max_events=3)
    assert [e.timestamp for e in request] == [3, 5, 9]
    assert [e.timestamp for e in pending] == [1]


@settings(max_examples=80, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=400), st.integers(4, 64))
def test_utf8_parts_never_cut_a_character_and_rejoin_to_the_message(message, limit):
    parts = utf8_parts(message, limit)
    assert "".join(parts) == message
    assert all(len(p.encode()) <= limit for p in parts)
    assert all(parts) or message == ""


def test_a_one_mib_message_becomes_parts_under_the_event_limit():
    message = "é" * (512 * 1024)  # 1 MiB of two-byte characters
    parts = utf8_parts(message)
    assert len(parts) == 5
    assert all(len(p.encode()) + EVENT_OVERHEAD <= MAX_EVENT_BYTES for p in parts)
    assert len(parts[0].encode()) in (MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES - 1)


def test_rejected_ranges_follow_the_documented_index_meanings():
    assert rejected_ranges(None, 10) == {}
    assert rejected_ranges({"tooOldLogEventEndIndex": 2, "tooNewLogEventStartIndex": 8}, 10) == {
        "too_old": range(0, 3), "too_new": range(8, 10)}
    assert rejected_ranges({"tooOldLogEventEndIndex": 1, "expiredLogEventEndIndex": 4}, 10) == {
        "too_old": range(0, 2), "expired": range(2, 5)}
    assert rejected_ranges({"expiredLogEventEndIndex": 0}, 1) == {"expired": range(0, 1)}


def test_timestamp_ms_uses_the_parsed_event_time_or_the_read_time():
    assert timestamp_ms("2026-11-29T13:17:18.123456Z", 7) == 1795958238123
    assert timestamp_ms(None, 7) == 7
    assert timestamp_ms("not a time", 7) == 7


def test_a_raw_line_that_looks_like_a_marked_record_is_sent_with_a_leading_space():
    from shipper.outputs.log_events import RECORD_MARK, marked_records, unmarked

    forged = "{" + RECORD_MARK + '"tag":"lifecycle","event":"termination"}'
    plain = ["ordinary", "", '{"json":"but not marked"}']
    assert unmarked(plain) is plain
    assert unmarked([forged, "x"]) == [" " + forged, "x"]
    blob = ("\n".join(plain) + "\n").encode()
    assert unmarked(plain, blob) is plain  # no marker in the blob: the list is not even looked at
    assert marked_records('{"a":1}\n{"b":2}\n') == "{" + RECORD_MARK + '"a":1}\n{' + RECORD_MARK + '"b":2}\n'
