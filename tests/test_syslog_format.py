"""Syslog parsing and TCP framing (shipper.inputs.syslog_format), on messages as real daemons send
them: RFC 5424 from rsyslog and Docker's syslog driver, RFC 3164 from glibc's syslog(3) (no host),
journald's ForwardToSyslog, nginx, haproxy, sshd; the RFCs' own examples; and broken input."""

from __future__ import annotations

import calendar

import pytest
from hypothesis import given, settings, strategies as st

from shipper.inputs.syslog_format import FramingError, OctetOrLineFramer, parse

RECEIVED = calendar.timegm((2026, 12, 2, 12, 0, 0))


def utc(*parts) -> float:
    return float(calendar.timegm(parts))


@pytest.mark.parametrize("raw, message, moment, fields", [
    # RFC 5424's examples (section 6.5), the BOM as the bytes it stands for
    ("<34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - \ufeff'su root' failed for lonvick on "
     "/dev/pts/8", "'su root' failed for lonvick on /dev/pts/8", utc(2003, 10, 11, 22, 14, 15) + 0.003,
     {"facility": "auth", "severity": "crit", "host": "mymachine.example.com", "app_name": "su", "msgid": "ID47"}),
    ("<165>1 2003-08-24T05:14:15.000003-07:00 192.0.2.1 myproc 8710 - - %% It's time to make the do-nuts.",
     "%% It's time to make the do-nuts.", utc(2003, 8, 24, 12, 14, 15) + 0.000003,
     {"facility": "local4", "severity": "notice", "host": "192.0.2.1", "app_name": "myproc", "pid": 8710}),
    ('<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut="3" '
     'eventSource="Application" eventID="1011"][examplePriority@32473 class="high"] An application event',
     "An application event", utc(2003, 10, 11, 22, 14, 15) + 0.003,
     {"facility": "local4", "severity": "notice", "host": "mymachine.example.com", "app_name": "evntslog",
      "msgid": "ID47", "structured_data": {"exampleSDID@32473": {"iut": "3", "eventSource": "Application",
                                                                 "eventID": "1011"},
                                           "examplePriority@32473": {"class": "high"}}}),
    # Docker's syslog driver (syslog-format=rfc5424), rsyslog's RFC 5424 forwarding with escapes in SD
    ("<30>1 2026-12-02T11:59:58Z ip-10-0-0-1 web 4242 web - GET / 200",
     "GET / 200", utc(2026, 12, 2, 11, 59, 58),
     {"facility": "daemon", "severity": "info", "host": "ip-10-0-0-1", "app_name": "web", "pid": 4242,
      "msgid": "web"}),
    ('<14>1 2026-12-02T11:59:59.5+01:00 db1 rsyslogd - - [origin software="rsyslogd" x="a\\"b\\]c"] start',
     "start", utc(2026, 12, 2, 10, 59, 59) + 0.5,
     {"facility": "user", "severity": "info", "host": "db1", "app_name": "rsyslogd",
      "structured_data": {"origin": {"software": "rsyslogd", "x": 'a"b]c'}}}),
    ("<13>1 - - - - - -", "", None, {"facility": "user", "severity": "notice"}),
    # RFC 3164's example, and what daemons send
    ("<34>Oct 11 22:14:15 mymachine su: 'su root' failed for lonvick on /dev/pts/8",
     "'su root' failed for lonvick on /dev/pts/8", utc(2026, 10, 11, 22, 14, 15),
     {"facility": "auth", "severity": "crit", "host": "mymachine", "app_name": "su"}),
    ("<86>Dec  2 11:58:00 sshd[812]: Accepted publickey for admin from 192.0.2.7 port 50022 ssh2",  # glibc: no host
     "Accepted publickey for admin from 192.0.2.7 port 50022 ssh2", utc(2026, 12, 2, 11, 58, 0),
     {"facility": "authpriv", "severity": "info", "app_name": "sshd", "pid": 812}),
    ("<30>Dec  2 11:57:01 systemd[1]: Started nginx.service - A high performance web server.",  # journald forward
     "Started nginx.service - A high performance web server.", utc(2026, 12, 2, 11, 57, 1),
     {"facility": "daemon", "severity": "info", "app_name": "systemd", "pid": 1}),
    ('<190>Dec 02 11:59:00 web1 nginx: 10.0.0.1 - - [02/Dec/2026:11:59:00 +0000] "GET / HTTP/1.1" 200 612',
     '10.0.0.1 - - [02/Dec/2026:11:59:00 +0000] "GET / HTTP/1.1" 200 612', utc(2026, 12, 2, 11, 59, 0),
     {"facility": "local7", "severity": "info", "host": "web1", "app_name": "nginx"}),
    ("<134>Dec  2 11:59:30 haproxy[3001]: 10.0.0.2:40000 [02/Dec/2026:11:59:30.001] fe be/srv 0/0/1/2/3 200 120",
     "10.0.0.2:40000 [02/Dec/2026:11:59:30.001] fe be/srv 0/0/1/2/3 200 120", utc(2026, 12, 2, 11, 59, 30),
     {"facility": "local0", "severity": "info", "app_name": "haproxy", "pid": 3001}),
    ("<13>2026-12-02T11:00:00.250+00:00 web1 app[7]: rsyslog's RFC 3339 time in BSD format",
     "rsyslog's RFC 3339 time in BSD format", utc(2026, 12, 2, 11, 0, 0) + 0.25,
     {"facility": "user", "severity": "notice", "host": "web1", "app_name": "app", "pid": 7}),
    ("<13>just a message, no time", "just a message, no time", None, {"facility": "user", "severity": "notice"}),
])
def test_a_real_daemons_message_gives_its_time_fields_and_message(raw, message, moment, fields):
    parsed = parse(raw, RECEIVED)
    assert not parsed.malformed
    assert parsed.message == message
    assert parsed.fields == fields
    assert parsed.time == pytest.approx(moment) if moment is not None else parsed.time is None


@pytest.mark.parametrize("received, raw, moment", [
    (utc(2027, 1, 1, 0, 0, 5), "<13>Dec 31 23:59:59 h app: late", utc(2026, 12, 31, 23, 59, 59)),  # last year's
    (utc(2026, 12, 2, 12, 0, 0), "<13>Dec  3 11:00:00 h app: skew", utc(2026, 12, 3, 11, 0, 0)),  # clock a day ahead
    (utc(2026, 12, 2, 12, 0, 0), "<13>Dec  5 11:00:00 h app: old", utc(2025, 12, 5, 11, 0, 0)),  # more: last year
    (utc(2029, 3, 1, 0, 0, 0), "<13>Feb 29 10:00:00 h app: leap", utc(2028, 2, 29, 10, 0, 0)),  # a leap year's
])
def test_a_bsd_time_gets_the_year_nearest_before_its_receipt(received, raw, moment):
    assert parse(raw, received).time == moment


@pytest.mark.parametrize("raw", ["no angle bracket", "<>1 x", "<192>too high", "<012>leading zero", "<1a>x", "<13",
                                 ""])
def test_what_is_not_syslog_is_kept_whole_and_flagged(raw):
    parsed = parse(raw, RECEIVED)
    assert parsed.malformed and parsed.message == raw and parsed.fields == {} and parsed.time is None


def test_a_broken_time_or_structured_data_keeps_the_rest():
    parsed = parse("<14>1 yesterday h app - - - text", RECEIVED)
    assert parsed.time is None and parsed.fields["time_invalid"] == "yesterday" and parsed.message == "text"
    unclosed = parse('<14>1 2026-12-02T00:00:00Z h app - - [id k="v" text', RECEIVED)
    assert "structured_data" not in unclosed.fields and unclosed.message == '[id k="v" text'


# ------------------------------------------------------------------ TCP framing (RFC 6587)


def test_octet_counting_and_newline_framing_across_reads():
    framer = OctetOrLineFramer()
    assert framer.feed(b"11 <13>he") == []
    assert framer.feed(b"llo w") == [(b"<13>hello w", False)]
    # a counted message may hold a newline; then newline-framed ones, CR LF or LF, an empty line skipped
    stream = b"13 <13>two\nlines<14>line one\r\n\n<14>line two\n<14>partial"
    assert framer.feed(stream[:5]) == []
    assert framer.feed(stream[5:]) == [(b"<13>two\nlines", False), (b"<14>line one", False), (b"<14>line two", False)]
    assert framer.buffer == b"<14>partial"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b
                                                                                   and not b[:1].isdigit())),
                min_size=1, max_size=12),
       st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=20))
def test_any_split_of_a_stream_gives_the_same_messages(messages, cuts):
    stream = b"".join(b"%d %s" % (len(m), m) if counted else m + b"\n" for counted, m in messages)
    framer = OctetOrLineFramer()
    got, at = [], 0
    for cut in cuts:
        got += framer.feed(stream[at:at + cut])
        at += cut
    got += framer.feed(stream[at:])
    expected = []
    for counted, message in messages:
        if not counted and message.endswith(b"\r"):
            message = message[:-1]
        if counted or message:
            expected.append(message)
    assert [m for m, _ in got] == expected and not [cut for _, cut in got if cut]


def test_an_oversized_count_or_a_garbage_count_is_a_framing_error():
    with pytest.raises(FramingError, match="over the limit"):
        OctetOrLineFramer(max_bytes=100).feed(b"101 " + b"x" * 101)
    with pytest.raises(FramingError, match="without its space"):
        OctetOrLineFramer().feed(b"123456789012345")


def test_a_line_longer_than_the_limit_is_cut_and_its_rest_dropped():
    framer = OctetOrLineFramer(max_bytes=10)
    assert framer.feed(b"<13>" + b"a" * 20) == [(b"<13>aaaaaa", True)]
    assert framer.feed(b"aaaa\n<13>next\n") == [(b"<13>next", False)]
