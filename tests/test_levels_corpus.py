"""Read-time level detection over a corpus of real-world line shapes (issue 17, item 1).

The rule is shipper.filters.level.level_of (the agent's level filter), used by fetch --level and the
report through shipper.postmortem.selection.level_of. Lines the rule misses today are xfail(strict)
with the reason; the patch that fixes them is in the notes of issue 17 (R-A): when it is merged,
these cases XPASS and fail, and their marks are to be removed.
"""

from __future__ import annotations

import collections

import pytest

from shipper.filters.level import level_of, levels_of_blob
from shipper.postmortem import selection

def miss(reason: str, kind: str, line: str, level: str | None):
    return pytest.param(kind, line, level, marks=pytest.mark.xfail(reason=reason, strict=True))


MISS_GO_FATAL = "Go runtime's 'fatal error: ' at the line start (out of memory, deadlock) is not recognised"
MISS_APACHE = "Apache 2.4's [module:level] is not recognised, only [level]"
MISS_SYSLOG_LOWER = "a lower-case 'error:' after the syslog program tag ']: ' is not recognised"
MISS_ECS = "the ECS key \"log.level\" is not among the JSON keys"
MISS_PINO = "pino/bunyan numeric levels (\"level\":50) are not recognised"
MISS_DBUG = "log15's 'dbug' is not an alias of debug (eror, crit are)"
MISS_BARE_EXCEPTION = "a bare exception line (a traceback's last line read line by line) is not recognised"
MISS_HEROKU = "Heroku router's at=error: 'at' is too common a key to search cheaply; not proposed"

# (kind, line, the level it shows or None)
CORPUS = [
    # Python logging
    ("python", "2024-03-01 12:00:00,123 - app.db - ERROR - connection lost", "error"),
    ("python", "2024-03-01 12:00:00,123 WARNING [urllib3.connectionpool] Retrying (Retry(total=2))", "warn"),
    ("python", "INFO:root:started worker 3", "info"),
    ("python", "ERROR:django.request:Internal Server Error: /api/orders", "error"),
    ("python", "CRITICAL:app:out of memory", "critical"),
    ("python", "Traceback (most recent call last):\n  File \"app.py\", line 3, in <module>\nMemoryError", "error"),
    ("python", "[2024-03-01 12:00:00 +0000] [42] [CRITICAL] WORKER TIMEOUT (pid:43)", "critical"),
    ("python", "[2024-03-01 12:00:00 +0000] [42] [INFO] Booting worker with pid: 43", "info"),
    ("python", "2024-03-01 12:00:00.123 | DEBUG    | app:main:12 - cache warm", "debug"),
    miss(MISS_BARE_EXCEPTION, "python", "MemoryError", "error"),
    miss(MISS_BARE_EXCEPTION, "python", "KeyError: 'user_id'", "error"),
    # Java
    ("java", "2024-03-01 12:00:00.123 ERROR 1234 --- [main] o.s.boot.SpringApplication : Application run failed", "error"),
    ("java", "2024-03-01 12:00:00,123 [http-nio-8080-exec-1] WARN  c.e.OrderService - slow query", "warn"),
    ("java", "Exception in thread \"main\" java.lang.OutOfMemoryError: Java heap space", "error"),
    ("java", "SEVERE: Servlet.service() for servlet [jsp] threw exception", "error"),
    ("java", "Mar 01, 2024 12:00:00 PM org.apache.catalina.startup.Catalina start\nINFO: Server startup in 900 ms", "info"),
    ("java", "12:00:00.123 [main] FATAL com.example.App - cannot bind port", "fatal"),
    ("java", "2024-03-01T12:00:00.123Z TRACE [pool-1-thread-1] c.e.Cache - miss key=42", "trace"),
    # Go
    ("go", "panic: runtime error: invalid memory address or nil pointer dereference", "fatal"),
    ("go", "2024/03/01 12:00:00 [ERROR] upstream timed out", "error"),
    ("go", "time=\"2024-03-01T12:00:00Z\" level=warning msg=\"disk almost full\"", "warn"),
    ("go", "{\"level\":\"error\",\"ts\":1709294400.1,\"caller\":\"main.go:42\",\"msg\":\"dial failed\"}", "error"),
    ("go", "2024-03-01T12:00:00.000Z\tERROR\tserver/main.go:42\tlisten failed", "error"),
    ("go", "12:00PM WRN disk almost full path=/var", "warn"),
    ("go", "{\"time\":\"2024-03-01T12:00:00Z\",\"level\":\"INFO\",\"msg\":\"started\"}", "info"),
    miss(MISS_GO_FATAL, "go", "fatal error: all goroutines are asleep - deadlock!", "fatal"),
    # nginx / Apache
    ("nginx", "2024/03/01 12:00:00 [error] 1234#1234: *5 connect() failed (111: Connection refused) while connecting to upstream", "error"),
    ("nginx", "2024/03/01 12:00:00 [warn] 1234#1234: an upstream response is buffered to a temporary file", "warn"),
    ("nginx", "2024/03/01 12:00:00 [crit] 1234#1234: *1 open() \"/var/run/x\" failed (13: Permission denied)", "critical"),
    ("nginx", "2024/03/01 12:00:00 [emerg] 1234#1234: bind() to 0.0.0.0:80 failed (98: Address already in use)", "fatal"),
    miss(MISS_APACHE, "apache", "[Fri Mar 01 12:00:00.123456 2024] [core:error] [pid 1234] AH00124: Request exceeded the limit of 10 internal redirects", "error"),
    ("nginx", "10.0.0.1 - - [01/Mar/2024:12:00:00 +0000] \"GET / HTTP/1.1\" 200 612 \"-\" \"curl/8.0\"", None),
    # syslog
    ("syslog", "Mar  1 12:00:00 web1 kernel: Out of memory: Killed process 1234 (java)", None),
    miss(MISS_SYSLOG_LOWER, "syslog", "Mar  1 12:00:00 web1 sshd[1234]: error: kex_exchange_identification: Connection closed by remote host", "error"),
    ("syslog", "<11>Mar  1 12:00:00 web1 app[1]: ERR something broke", "error"),
    ("syslog", "Mar  1 12:00:00 web1 systemd[1]: app.service: Failed with result 'oom-kill'.", None),
    ("syslog", "Mar  1 12:00:00 web1 postgres[99]: [3-1] FATAL:  the database system is shutting down", "fatal"),
    ("syslog", "Mar  1 12:00:00 web1 postgres[99]: [3-1] WARNING:  there is no transaction in progress", "warn"),
    # glog / klog
    ("glog", "E0301 12:00:00.123456    1234 reflector.go:138] Failed to watch *v1.Pod", "error"),
    ("glog", "W0301 12:00:00.123456    1234 main.go:55] falling back to default", "warn"),
    ("glog", "I0301 12:00:00.123456    1234 server.go:10] serving on :8080", "info"),
    ("glog", "F0301 12:00:00.123456    1234 main.go:99] cannot start", "fatal"),
    # JSON
    ("json", "{\"severity\":\"WARNING\",\"message\":\"quota at 90%\"}", "warn"),
    ("json", "{\"levelname\": \"ERROR\", \"name\": \"app\", \"message\": \"boom\"}", "error"),
    miss(MISS_ECS, "json", "{\"@timestamp\":\"2024-03-01T12:00:00Z\",\"log.level\":\"error\",\"message\":\"boom\"}", "error"),
    miss(MISS_PINO, "json", "{\"level\":50,\"time\":1709294400000,\"msg\":\"request failed\"}", "error"),
    miss(MISS_DBUG, "json", "{\"lvl\":\"dbug\",\"msg\":\"cache miss\"}", "debug"),
    # logfmt
    ("logfmt", "ts=2024-03-01T12:00:00Z level=error caller=main.go:42 msg=\"listen failed\"", "error"),
    ("logfmt", "ts=2024-03-01T12:00:00Z lvl=info msg=started", "info"),
    miss(MISS_HEROKU, "logfmt", "at=error code=H12 desc=\"Request timeout\" method=GET path=\"/\"", "error"),
    ("logfmt", "t=2024-03-01T12:00:00+0000 lvl=eror msg=\"Failed to send alert\" logger=alerting", "error"),
    ("logfmt", "severity=warn component=scheduler msg=\"queue long\"", "warn"),
    # plain lines without a level, that must not get one
    ("plain", "user interrupted the download", None),
    ("plain", "Starting nginx: the errorlog is at /var/log/errors.log", None),
    ("plain", "processed 120 records, 0 errors", None),
    ("plain", "GET /api/error-report 200 12ms", None),
    ("plain", "ErrorHandler registered for /api", None),
]


def _plain(cases):
    return [case.values if hasattr(case, "values") else case for case in cases]


def test_the_corpus_covers_the_shapes_the_issue_names():
    kinds = collections.Counter(kind for kind, _, _ in _plain(CORPUS))
    assert len(CORPUS) >= 40
    for kind in ("python", "java", "go", "nginx", "syslog", "glog", "json", "logfmt"):
        assert kinds[kind] >= 4, kind
    assert sum(1 for _, _, level in _plain(CORPUS) if level is None) >= 6  # lines that must get no level


@pytest.mark.parametrize("kind, line, level", CORPUS)
def test_the_level_of_a_real_world_line(kind, line, level):
    assert level_of(line) == level


@pytest.mark.parametrize("kind, line, level", _plain(CORPUS))
def test_fetch_and_the_report_read_the_same_level_from_a_record_without_one(kind, line, level):
    # one rule: a record with only a message gets the level filter's answer (right or wrong)
    assert selection.level_of({"time": "2026-11-29T10:00:00Z", "tag": kind, "message": line}) == level_of(line)


def test_a_blob_of_the_corpus_lines_gets_the_levels_of_its_lines_one_by_one():
    single = [line for _, line, _ in _plain(CORPUS) if "\n" not in line]
    blob = ("\n".join(single) + "\n").encode()
    assert levels_of_blob(blob) == [level_of(line) for line in single]


def test_a_parsed_level_or_a_journald_priority_comes_before_the_message():
    record = {"message": "ERROR: not really, the parser knows better", "level": "info"}
    assert selection.level_of(record) == "info"
    assert selection.level_of({"message": "INFO x", "fields": {"severity": "Warning"}}) == "warn"
    assert selection.level_of({"message": "all fine", "priority": 2}) == "critical"   # journald crit
    assert selection.level_of({"message": "all fine", "priority": "3"}) == "error"
    assert selection.level_of({"message": "all fine", "priority": 7}) == "debug"
    # a parsed value that names no level does not hide the message's
    assert selection.level_of({"message": "2026 ERROR boom", "level": "ok?"}) == "error"
    assert selection.level_of({"message": "2026 ERROR boom", "priority": 42}) == "error"
    assert selection.level_of({"message": "2026 ERROR boom", "priority": True}) == "error"
    # no message, no level: a metrics sample
    assert selection.level_of({"metrics": {"cpu": {"percent": 99}}}) is None
    assert selection.level_of({"message": None}) is None and selection.level_of({"message": 3}) is None


def test_a_level_word_past_the_window_or_inside_a_word_is_not_a_level():
    assert level_of("x" * 300 + " ERROR late") is None   # only the start of a line is searched
    assert level_of("TERRORIST ERRORS") is None and level_of("informational reading") is None


def test_fetch_level_takes_any_name_of_a_level_and_refuses_others_naming_them():
    assert selection.check_level("WARNING") == "warn" and selection.check_level("err") == "error"
    assert selection.check_level("crit") == "critical" and selection.check_level("3") == "error"
    with pytest.raises(selection.SelectionError, match=r"--level 'loud': one of trace, debug, info"):
        selection.check_level("loud")
    wanted = selection.Filter(0, 2e9, level="warning")
    stamp = "2026-11-29T10:00:00Z"
    assert wanted.matches({"time": stamp, "message": "WARN disk 91%"})
    assert wanted.matches({"time": stamp, "message": "E1129 10:00:00.000000 1 x.go:1] boom"})
    assert not wanted.matches({"time": stamp, "message": "INFO ok"})
    assert not wanted.matches({"time": stamp, "message": "no level at all"})
    assert wanted.miss({"time": stamp, "message": "INFO ok"}) == "level"
