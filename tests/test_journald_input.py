"""The journald input against real journal files (systemd-journal-remote), read by a real journalctl."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import orjson
from journal import Journal, entries
from conftest import read_archive, seqs, wait_for

from shipper.config import COMMON_INPUT_OPTIONS, validate_section
from shipper.inputs import journald
from shipper.inputs.journald import (HEAD_BYTES, JournaldInput, LineSplitter, TooLong, cursor_in_head, entry_fields,
                                     journalctl_command, message_parts)
from shipper.pipeline import InputContext
from shipper.record import ENCODING_ERRORS, TIME, TRUNCATED
from shipper.stats import Stats

KIB = 1024


def settings_of(**options):
    problems: list[str] = []
    settings = validate_section("inputs[0]", {"type": "journald", **options},
                                {**COMMON_INPUT_OPTIONS, **journald.OPTIONS}, problems)
    assert problems == []
    return settings


def test_the_command_line_follows_the_settings_and_the_cursor():
    base = ["journalctl", "--output=json", "--all", "--follow", "--no-pager"]  # --all: long fields are not null
    assert journalctl_command(settings_of(), None) == [*base, "--lines=all", "--priority=debug", "--boot"]
    assert journalctl_command(settings_of(units=["a.service", "b.service"], priority="warning", directory="/j"),
                              "s=1;i=2") == [*base, "--lines=all", "--priority=warning", "--directory=/j",
                                             "--unit=a.service", "--unit=b.service", "--after-cursor=s=1;i=2"]
    assert journalctl_command(settings_of(start_at="end"), None) == [*base, "--lines=0", "--priority=debug"]
    assert journalctl_command(settings_of(start_at="beginning"), None) == [*base, "--lines=all", "--priority=debug"]


def test_an_entry_becomes_message_and_fields():
    message, fields, cursor = entry_fields({"MESSAGE": "hi", "_SYSTEMD_UNIT": "web.service", "PRIORITY": "3",
                                            "_PID": "42", "SYSLOG_IDENTIFIER": "web",
                                            "__REALTIME_TIMESTAMP": "1795958238123456", "__CURSOR": "c1"})
    assert (message, cursor) == ("hi", "c1")
    assert fields == {"unit": "web.service", "priority": 3, "pid": 42, "identifier": "web",
                      TIME: "2026-11-29T13:17:18.123456Z"}
    binary, flags, _ = entry_fields({"MESSAGE": [104, 105, 255]})
    assert binary == "hi\ufffd" and flags == {ENCODING_ERRORS: True}
    # journalctl also gives valid UTF-8 with control characters (colours) as bytes: not an error.
    assert entry_fields({"MESSAGE": list("\x1b[31mred\x1b[0m caf\u00e9".encode())})[:2] == (
        "\x1b[31mred\x1b[0m caf\u00e9", {})


def test_odd_entries_never_raise():
    # A field given twice in one entry comes as a list of its values (text or bytes).
    assert entry_fields({"MESSAGE": ["one", [116, 255]]})[:2] == ("one\nt\ufffd", {ENCODING_ERRORS: True})
    assert entry_fields({"MESSAGE": ["one", [116, 27]]})[:2] == ("one\nt\x1b", {})
    assert entry_fields({"MESSAGE": ["a", "b"]})[:2] == ("a\nb", {})
    assert entry_fields({"MESSAGE": [1, 300]})[:2] == ("1\n300", {ENCODING_ERRORS: True})  # not bytes
    assert entry_fields({"MESSAGE": [10 ** 9]})[0] == "1000000000"  # never bytes(10**9)
    assert entry_fields({"MESSAGE": None})[0] == ""
    assert entry_fields({"MESSAGE": 7})[0] == "7"
    # Odd values of the other fields are left out rather than raising.
    message, fields, cursor = entry_fields({"__REALTIME_TIMESTAMP": "\u00b2\u00b3", "PRIORITY": ["3", "4"],
                                            "_PID": "9" * 5000, "__CURSOR": ["c"]})
    assert (message, fields, cursor) == ("", {}, None)


def test_a_message_over_the_limit_is_cut_between_characters():
    assert message_parts("x" * 1000, 1024) is None and message_parts("\u20ac" * 341, 1024) is None
    text = "a\u00e9\u20ac" * 1000  # 1, 2 and 3 bytes: 6000 bytes
    parts = message_parts(text, 1024)
    assert "".join(parts) == text and len(parts) == 6
    assert all(len(part.encode()) <= 1024 for part in parts) and "\ufffd" not in "".join(parts)


def test_the_line_splitter_hands_on_lines_in_order_and_never_holds_a_line_over_its_limit():
    splitter = LineSplitter(limit=100)
    assert splitter.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert splitter.feed(b':2}\n\n') == [b'{"b":2}', b""]
    long_head = b'{"__CURSOR":"s=1;i=2",' + b"x" * (HEAD_BYTES + 100)
    assert splitter.feed(long_head[:60]) == []
    assert splitter.feed(long_head[60:]) == []  # over the limit: not kept, only its head
    assert splitter._parts == [] and splitter._size == 0
    lines = splitter.feed(b'x"}\n' + b"y" * 200 + b'\n{"c":3}\n')
    assert lines == [long_head[:HEAD_BYTES], b"y" * 200, b'{"c":3}']
    assert [type(line) for line in lines] == [TooLong, TooLong, bytes]
    assert cursor_in_head(lines[0]) == "s=1;i=2" and cursor_in_head(lines[1]) is None
    assert splitter.feed(b"z" * 100) == [] and splitter.feed(b"\n") == [b"z" * 100]  # exactly the limit: kept


def test_an_entry_too_long_is_dropped_counted_and_its_cursor_kept(tmp_path):
    stats = Stats()
    source = JournaldInput(settings_of(tag="journal", max_entry_bytes="64KiB", max_message_bytes="1KiB"),
                           InputContext(str(tmp_path), stats, 1.0))
    batches = []
    splitter = LineSplitter(source.settings.max_entry_bytes)
    big = orjson.dumps({"__CURSOR": "c2", "MESSAGE": "x" * 100 * KIB})
    lines = splitter.feed(orjson.dumps({"__CURSOR": "c1", "MESSAGE": "y" * 2500}) + b"\n" + big + b"\n[1]\n")
    source._emit(lines, batches.append)
    assert stats.get("records_dropped", input="journal", reason="too_long") == 1
    assert stats.get("parse_errors", input="journal") == 1  # [1]: JSON but not an entry
    assert [len(m) for m in batches[0].messages] == [1024, 1024, 452]
    assert batches[0].fields == [{TRUNCATED: True}] * 3
    assert source.cursors == {0: "c2"}  # the batch moves the cursor past the dropped entry


def journald_config(data: Path, journal: Journal, extra: str = "") -> str:
    return f"""
[agent]
data_dir = "{data}"
flush_interval = "100ms"
checkpoint_interval = "100ms"
[cloud]
metadata = "off"
[[inputs]]
type = "journald"
tag = "journal"
directory = "{journal.directory}"
start_at = "beginning"
poll_interval = "50ms"
{extra}
[[outputs]]
type = "directory"
path = "{data}/archive"
upload_interval = "200ms"
"""


def cursor_saved(data: Path) -> str | None:
    try:
        return orjson.loads((data / "checkpoints" / "journald-journal.json").read_bytes())["cursor"]
    except FileNotFoundError:
        return None


def test_entries_of_chosen_units_arrive_as_records_and_new_ones_are_followed(run_agent, workdir):
    journal = Journal(workdir / "journal")
    journal.append(entries(0, 300) + entries(900, 5, unit="other.service"))
    data = workdir / "data"
    agent = run_agent(journald_config(data, journal, 'units = ["web.service"]'))
    wait_for(lambda: seqs(read_archive(data / "archive")) == list(range(300)), message="300 journal entries")
    journal.append(entries(300, 50) + [{"_SYSTEMD_UNIT": "web.service", "MESSAGE": b"seq=0000350 \xff binary"}])
    wait_for(lambda: seqs(read_archive(data / "archive")) == list(range(351)), message="the entries appended")
    assert agent.stop() == 0
    records = read_archive(data / "archive")
    first = records[0]
    assert first["tag"] == "journal" and first["unit"] == "web.service" and first["priority"] == 6
    assert first["pid"] == 42 and first["identifier"] == "web" and first["source"] == "journald"
    written = dt.datetime.fromisoformat(first["time"])
    assert abs((dt.datetime.now(dt.timezone.utc) - written).total_seconds()) < 120  # the entry's own time
    assert records[-1]["encoding_errors"] is True and "\ufffd" in records[-1]["message"]


def test_kill_9_then_restart_resumes_after_the_saved_cursor(run_agent, workdir):
    journal = Journal(workdir / "journal")
    journal.append(entries(0, 500))
    data = workdir / "data"
    agent = run_agent(journald_config(data, journal))
    wait_for(lambda: seqs(read_archive(data / "archive")) == list(range(500)), message="the first entries")
    wait_for(lambda: cursor_saved(data), message="a saved cursor")
    saved = cursor_saved(data)
    agent.kill()
    journal.append(entries(500, 200))
    again = run_agent(journald_config(data, journal))
    wait_for(lambda: set(seqs(read_archive(data / "archive"))) == set(range(700)), message="every entry")
    assert again.stop() == 0
    got = seqs(read_archive(data / "archive"))
    assert sorted(set(got)) == list(range(700))
    assert len(got) - 700 <= 500  # only entries after the saved cursor can come twice
    assert cursor_saved(data) != saved


def test_sigterm_saves_the_cursor_so_a_restart_repeats_nothing(run_agent, workdir):
    journal = Journal(workdir / "journal")
    journal.append(entries(0, 100))
    data = workdir / "data"
    agent = run_agent(journald_config(data, journal))
    wait_for(lambda: len(read_archive(data / "archive")) == 100, message="100 entries")
    assert agent.stop() == 0
    journal.append(entries(100, 10))
    again = run_agent(journald_config(data, journal))
    wait_for(lambda: len(read_archive(data / "archive")) >= 110, message="the new entries")
    assert again.stop() == 0
    assert seqs(read_archive(data / "archive")) == list(range(110))


def sized(label: str, size: int) -> str:
    """A message of exactly ``size`` UTF-8 bytes with 1-, 2- and 3-byte characters, starting with ``label``."""
    text = (label + " " + "a\u00e9\u20ac" * (size // 6)).encode()[:size].decode(errors="ignore")
    return text + "z" * (size - len(text.encode()))


def test_messages_of_4_kib_64_kib_and_1_mib_arrive_whole_or_in_flagged_parts(run_agent, workdir):
    journal = Journal(workdir / "journal")
    small, medium, large = sized("four", 4 * KIB), sized("sixty-four", 64 * KIB), sized("one-mib", 1024 * KIB)
    binary = b"binary \xff " + b"b" * (64 * KIB)
    journal.append([{"_SYSTEMD_UNIT": "web.service", "MESSAGE": text} for text in (small, medium, large)]
                   + [{"_SYSTEMD_UNIT": "web.service", "MESSAGE": binary}]
                   + [{"MESSAGE": "colour \x1b[31mred\x1b[0m"}] + entries(0, 1))
    data = workdir / "data"
    agent = run_agent(journald_config(data, journal))
    wait_for(lambda: seqs(read_archive(data / "archive")) == [0], message="the entry after the long ones")
    assert agent.stop() == 0
    records = read_archive(data / "archive")
    got = [r["message"] for r in records]
    # Up to max_message_bytes (256 KiB) a message arrives whole; journalctl without --all gave null.
    assert got[0] == small and got[1] == medium
    assert "truncated" not in records[0] and "truncated" not in records[1]
    parts = records[2:-3]  # 1 MiB: parts of at most 256 KiB, each flagged, cut between characters
    assert len(parts) == 5 and "".join(r["message"] for r in parts) == large
    assert all(r["truncated"] is True and r["unit"] == "web.service" for r in parts)
    assert all(256 * KIB - 3 <= len(r["message"].encode()) <= 256 * KIB for r in parts[:-1])
    assert got[-3] == binary.decode(errors="replace") and records[-3]["encoding_errors"] is True
    # Valid UTF-8 with control characters: bytes in journalctl's JSON too, but not an encoding error.
    assert got[-2] == "colour \x1b[31mred\x1b[0m" and "encoding_errors" not in records[-2]
    assert not any("truncated" in r for r in records[-3:])


def test_an_entry_over_max_entry_bytes_is_dropped_counted_and_the_journal_goes_on(run_agent, workdir):
    journal = Journal(workdir / "journal")
    journal.append(entries(0, 2) + [{"MESSAGE": "x" * (1024 * KIB)}] + entries(2, 2))
    data = workdir / "data"
    agent = run_agent(journald_config(data, journal, 'max_entry_bytes = "256KiB"'))
    wait_for(lambda: seqs(read_archive(data / "archive")) == [0, 1, 2, 3], message="the entries around the big one")
    assert agent.stop() == 0
    assert all(len(r["message"]) < 100 for r in read_archive(data / "archive"))
    assert agent.log().count("longer than max_entry_bytes") == 1


def test_a_journalctl_that_writes_much_to_stderr_is_still_read(tmp_path):
    """journalctl warns on stderr about corrupt or rotated journal files; a stderr pipe nobody
    reads fills at 64 KiB and blocks it (nothing more arrived, and the heartbeat said ok)."""
    import threading

    fake = tmp_path / "journalctl"
    entry = orjson.dumps({"__CURSOR": "c1", "MESSAGE": "after the warnings", "__REALTIME_TIMESTAMP": "1"})
    fake.write_text(f"""#!/bin/sh
head -c 300000 /dev/zero | tr '\\\\0' w >&2
printf '%s\\n' '{entry.decode()}'
exec sleep 30
""")
    fake.chmod(0o755)
    source = JournaldInput(settings_of(tag="journal", journalctl=str(fake), poll_interval="50ms"),
                           InputContext(str(tmp_path), Stats(), 1.0))
    batches, stop = [], threading.Event()
    thread = threading.Thread(target=source.run, args=(batches.append, stop), daemon=True)
    thread.start()
    try:
        wait_for(lambda: batches, 10, message="the entry written after 300 KB of warnings")
    finally:
        stop.set()
        thread.join(10)
    assert batches[0].messages == ["after the warnings"]
