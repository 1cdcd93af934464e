"""The journald input against real journal files (systemd-journal-remote), read by a real journalctl."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import orjson
from journal import Journal, entries
from conftest import read_archive, seqs, wait_for

from shipper.config import COMMON_INPUT_OPTIONS, validate_section
from shipper.inputs import journald
from shipper.inputs.journald import entry_fields, journalctl_command
from shipper.record import ENCODING_ERRORS, TIME


def settings_of(**options):
    problems: list[str] = []
    settings = validate_section("inputs[0]", {"type": "journald", **options},
                                {**COMMON_INPUT_OPTIONS, **journald.OPTIONS}, problems)
    assert problems == []
    return settings


def test_the_command_line_follows_the_settings_and_the_cursor():
    base = ["journalctl", "--output=json", "--follow", "--no-pager"]
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
