"""The file input with many files (issue 15): reads follow inotify events, descriptors stay under
max_open_files (and a low RLIMIT_NOFILE), idle files are closed and taken up again where they were,
through rotation while closed; ignore_older."""

from __future__ import annotations

import os
import random
import shutil
import stat
import time
from pathlib import Path

import pytest

from aws import free_port
from conftest import FAST_RETRIES, agent_config, http_get, mounted_tmpfs, read_archive, wait_for
from shipper.inputs.file import BUSY_FOR, EVENTS_FROM_FILES, RESERVED_DESCRIPTORS, default_max_open_files


def test_the_default_cap_leaves_room_for_the_rest_of_the_agent_and_is_shared_by_the_inputs():
    assert default_max_open_files(1024) == 1024 - RESERVED_DESCRIPTORS
    assert default_max_open_files(65536, file_inputs=2) == (65536 - RESERVED_DESCRIPTORS) // 2
    assert default_max_open_files(100) == 16  # never none


def open_log_descriptors(pid: int, logs: Path) -> int:
    """The agent's descriptors of regular files under ``logs`` (not the directories it scans)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = f"/proc/{pid}/fd/{fd}"
            count += os.readlink(link).startswith(str(logs)) and stat.S_ISREG(os.stat(link).st_mode)
        except OSError:
            pass
    return count


def messages(workdir: Path) -> list[str]:
    return [r["message"] for r in read_archive(workdir / "data" / "archive")]


def test_many_files_under_a_low_descriptor_limit_every_line_once_through_rotation_while_closed(workdir, run_agent):
    logs = workdir / "logs"
    files = 3000
    for n in range(files):
        (logs / f"f{n:04d}.log").write_text(f"f{n:04d} line 0\n")
    config = agent_config(logs, workdir / "data", close_inactive="1s")
    # A soft limit of 256: the default cap derived from it holds and nothing runs out.
    cap = default_max_open_files(256)
    agent = run_agent(config, wrapper=["prlimit", "--nofile=256:4096"])
    peak = 0

    def all_arrived(expected: int) -> bool:
        nonlocal peak
        peak = max(peak, open_log_descriptors(agent.proc.pid, logs))
        return len(messages(workdir)) >= expected

    wait_for(lambda: all_arrived(files), timeout=60, message="the first line of every file")
    expected = [f"f{n:04d} line 0" for n in range(files)]
    rng = random.Random(7)
    # Lines to random files in random order, most of them closed as idle by now.
    written = 0
    for step in range(300):
        n = rng.randrange(files)
        with open(logs / f"f{n:04d}.log", "a") as handle:
            handle.write(f"f{n:04d} extra {step}\n")
        expected.append(f"f{n:04d} extra {step}")
        written += 1
        if step % 50 == 0:
            time.sleep(0.2)
    wait_for(lambda: all_arrived(len(expected)), timeout=60, message="the random lines")
    time.sleep(1.5)  # closed as idle again (close_inactive 1 s)
    # Rotation of idle (closed) files: by rename (the writer keeps writing to the renamed file, then
    # a new file) and by copytruncate (the copy outside the globs).
    for n in range(0, 20):
        path = logs / f"f{n:04d}.log"
        if n % 2:
            os.rename(path, logs / f"f{n:04d}.log.1")
            with open(logs / f"f{n:04d}.log.1", "a") as handle:
                handle.write(f"f{n:04d} after rename\n")
            path.write_text(f"f{n:04d} new file\n")
            expected += [f"f{n:04d} after rename", f"f{n:04d} new file"]
        else:
            shutil.copyfile(path, logs / f"f{n:04d}.log.1")
            os.truncate(path, 0)
            with open(path, "a") as handle:
                handle.write(f"f{n:04d} after truncate\n")
            expected.append(f"f{n:04d} after truncate")
    wait_for(lambda: all_arrived(len(expected)), timeout=60, message="the lines after rotation")
    time.sleep(1)
    assert agent.stop() == 0
    got = messages(workdir)
    assert sorted(got) == sorted(expected)  # every line once: none lost, none twice
    assert 0 < peak <= cap
    log = agent.log()
    assert "out of descriptors" not in log and "Too many open files" not in log


def test_ignore_older_skips_old_files_found_at_start_but_reads_what_is_written_to_them_later(workdir, run_agent):
    logs = workdir / "logs"
    (logs / "old.log").write_text("old line\n")
    two_days_ago = time.time() - 2 * 86400
    os.utime(logs / "old.log", (two_days_ago, two_days_ago))
    (logs / "fresh.log").write_text("fresh line\n")
    agent = run_agent(agent_config(logs, workdir / "data", ignore_older="1d"))
    wait_for(lambda: "fresh line" in messages(workdir), message="the fresh file")
    wait_for(lambda: "ignore_older" in agent.log(), message="the old file set aside")
    with open(logs / "old.log", "a") as handle:
        handle.write("written later\n")
    wait_for(lambda: "written later" in messages(workdir), message="the later line")
    assert agent.stop() == 0
    assert sorted(messages(workdir)) == ["fresh line", "written later"]


def test_with_many_files_a_quiet_one_is_read_on_its_inotify_event(workdir, run_agent):
    logs = workdir / "logs"
    for n in range(EVENTS_FROM_FILES + 6):  # past the count where reads follow inotify
        (logs / f"f{n:03d}.log").write_text(f"first {n}\n")
    # No sweep or rescan for an hour: a quiet file can only be found written through its event.
    agent = run_agent(agent_config(logs, workdir / "data", poll_interval="200ms", refresh_interval="10m"))
    wait_for(lambda: len(messages(workdir)) == EVENTS_FROM_FILES + 6, message="the first lines")
    time.sleep(BUSY_FOR + 1)  # no longer active: not visited every poll
    with open(logs / "f003.log", "a") as handle:
        handle.write("second\n")
    wait_for(lambda: "second" in messages(workdir), message="the line, by its event")
    assert agent.stop() == 0
    assert messages(workdir).count("second") == 1


@pytest.fixture
def small_filesystem(tmp_path):
    """An 8 MiB tmpfs for the log directory (needs root and mount)."""
    with mounted_tmpfs(tmp_path / "small", "8m", "a small file system to fill") as mountpoint:
        yield mountpoint


def free_bytes(path: Path) -> int:
    fs = os.statvfs(path)
    return fs.f_bavail * fs.f_frsize


def test_a_deleted_file_held_open_in_an_outage_is_released_when_its_disk_is_nearly_full(tmp_path, small_filesystem,
                                                                                         run_agent):
    logs, data = small_filesystem, tmp_path / "data"
    with open(logs / "app.log", "w") as handle:
        for n in range(30_000):
            handle.write(f"seq={n:06d} {'x' * 90}\n")  # 3 MiB
    port = free_port()
    refused = free_port()  # nothing listens there: the output cannot deliver (an outage)
    output = f'[[outputs]]\ntype = "fluentd"\nhosts = ["127.0.0.1:{refused}"]\nbuffer_max_bytes = "1KiB"\n'
    config = agent_config(logs, data, output=output, agent_extra=FAST_RETRIES,
                          server=f'listen = "127.0.0.1:{port}"', read_bytes="64KiB")
    agent = run_agent(config)
    wait_for(lambda: "tailing" in agent.log(), message="the file followed")
    time.sleep(1)  # reading is held up by the outage now
    (logs / "app.log").unlink()
    held = free_bytes(logs)
    with open(logs / "filler", "wb") as handle:  # the application fills its disk: under 5 % free
        handle.write(b"\0" * (held - 200 * 1024))
    wait_for(lambda: "released because its file system has" in agent.log(), timeout=20, message="the release")
    wait_for(lambda: free_bytes(logs) > 2 * 1024 * 1024, message="the space given back")
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    dropped = [line for line in body.decode().splitlines()
               if line.startswith("shipper_bytes_dropped_total") and 'reason="released_deleted"' in line]
    assert status == 200 and len(dropped) == 1 and float(dropped[0].split()[-1]) > 2_000_000
    agent.kill()
