"""What a rotation leaves behind is read exactly once (issue 15): the copy of a copytruncate (inside or
outside the globs, the agent running or down), a file rotated and compressed while the agent was down."""

from __future__ import annotations

import gzip
import os
import shutil
import time
import zlib
from pathlib import Path

import pytest

from conftest import agent_config, read_archive, wait_for
from shipper.inputs.discovery import path_matches
from shipper.inputs.rotation import compressed_chunks, find_compressed, find_copy, rotation_names


# ---------------------------------------------------------------- pure parts

def test_rotation_names_lead_from_a_rotated_name_to_the_file():
    assert "app.log" in rotation_names("app.log.1")
    assert "app.log" in rotation_names("app.log-20261201")
    assert "app.log" in rotation_names("app-20261201.log")
    assert "app.log" in rotation_names("app.log.1.gz")
    assert "app.log" not in rotation_names("other.log")
    assert rotation_names("plain") == ()


def test_path_matches_follows_the_globs_including_double_stars():
    assert path_matches("/l/app.log", "/l/*.log") and not path_matches("/l/app.log.1", "/l/*.log")
    assert path_matches("/l/a/b/app.log", "/l/**/*.log") and path_matches("/l/app.log", "/l/**/*.log")
    assert not path_matches("/m/app.log", "/l/**/*.log")


def test_find_copy_takes_the_file_with_the_old_first_bytes_and_enough_of_them(tmp_path):
    head = b"2026-12-01 first line of the old content\n"
    (tmp_path / "app.log").write_bytes(b"new\n")
    (tmp_path / "app.log.1").write_bytes(head + b"second\n")
    (tmp_path / "short.log").write_bytes(head)  # the right start, but shorter than where we were
    (tmp_path / "other.log").write_bytes(b"something else entirely\n" * 3)
    os.symlink(tmp_path / "app.log.1", tmp_path / "link.log")
    st = os.stat(tmp_path / "app.log")
    crc = zlib.crc32(head)
    found = find_copy(str(tmp_path / "app.log"), (st.st_dev, st.st_ino), len(head), crc, len(head) + 3)
    assert found == str(tmp_path / "app.log.1")
    assert find_copy(str(tmp_path / "app.log"), (st.st_dev, st.st_ino), len(head), crc, 10_000) is None
    assert find_copy(str(tmp_path / "app.log"), (st.st_dev, st.st_ino), 0, 0, 0) is None


def test_find_compressed_and_its_chunks_from_an_offset(tmp_path):
    content = b"".join(b"line %05d\n" % n for n in range(20_000))
    with gzip.open(tmp_path / "app.log.1.gz", "wb") as handle:
        handle.write(content)
    (tmp_path / "app.log").write_bytes(b"fresh\n")
    (tmp_path / "broken.log.gz").write_bytes(b"\x1f\x8b not really")
    found = find_compressed(str(tmp_path / "app.log"), 1024, zlib.crc32(content[:1024]))
    assert found == str(tmp_path / "app.log.1.gz")
    chunks = list(compressed_chunks(found, 150_000, chunk_size=65536))
    assert chunks[0][0] == 150_000 and b"".join(data for _, data in chunks) == content[150_000:]
    assert find_compressed(str(tmp_path / "app.log"), 1024, 12345) is None


# ---------------------------------------------------------------- end to end

def messages(workdir: Path) -> list[str]:
    return [r["message"] for r in read_archive(workdir / "data" / "archive")]


def write(path: Path, start: int, count: int) -> list[str]:
    lines = [f"seq={n:06d} {'x' * 60}" for n in range(start, start + count)]
    with open(path, "a") as handle:
        handle.write("".join(line + "\n" for line in lines))
    return lines


def every_line_once_after_a_restart(run_agent, config: str, workdir: Path, expected: list[str], said: str):
    """Start the agent again on what happened while it was down: every line arrives, once, and it says
    how it found them."""
    agent = run_agent(config)
    wait_for(lambda: len(messages(workdir)) >= len(expected), timeout=30, message="every line")
    assert agent.stop() == 0
    assert said in agent.log()
    got = messages(workdir)
    assert len(got) == len(expected) and sorted(got) == sorted(expected)
    return agent


def copytruncate(path: Path, copy: Path) -> None:
    shutil.copyfile(path, copy)  # logrotate's copytruncate: copy, then truncate the original in place
    os.truncate(path, 0)


def test_a_copy_seen_while_it_is_still_being_written_is_not_read_as_a_file_of_its_own(workdir, run_agent):
    # copytruncate copies, then truncates: an agent that looks in between sees a copy shorter than
    # the original's fingerprint. Read as a new file, its lines would all arrive twice.
    logs = workdir / "logs"
    app = logs / "app.log"
    expected = write(app, 0, 10)
    agent = run_agent(agent_config(logs, workdir / "data", pattern="app.log*", poll_interval="100ms",
                                   refresh_interval="1s"))
    wait_for(lambda: len(messages(workdir)) == 10, message="the first lines")
    expected += write(app, 10, 500)
    data = app.read_bytes()
    copy = logs / "app.log.1"
    copy.write_bytes(data[:20])  # the copy has begun ...
    wait_for(lambda: "app.log.1" in agent.log() or len(messages(workdir)) >= 510, message="a look at the copy")
    time.sleep(0.5)
    with open(copy, "ab") as handle:  # ... and ends, then the original is truncated
        handle.write(data[20:])
    os.truncate(app, 0)
    expected += write(app, 510, 20)
    wait_for(lambda: len(messages(workdir)) >= len(expected), timeout=30, message="every line")
    time.sleep(1.0)  # were the copy read as a file of its own, its 510 lines would come now
    assert agent.stop() == 0
    got = messages(workdir)
    assert len(got) == len(expected) and sorted(got) == sorted(expected)


@pytest.mark.parametrize("pattern, copy_name", [("*.log", "app.log.1"), ("app.log*", "app.log.1")],
                         ids=["copy outside the globs", "copy inside the globs"])
def test_copytruncate_while_running_loses_nothing_and_reads_nothing_twice(workdir, run_agent, pattern, copy_name):
    logs = workdir / "logs"
    app = logs / "app.log"
    expected = write(app, 0, 10)
    # A copy the globs take is a suspect for 2 refresh intervals (20 s by default): 0.4 s, the tests'
    # default, is shorter than a loaded CI machine may need between the copy and the truncation.
    agent = run_agent(agent_config(logs, workdir / "data", pattern=pattern, poll_interval="200ms",
                                   refresh_interval="2s"))
    wait_for(lambda: len(messages(workdir)) == 10, message="the first lines")
    seq = 10
    for cycle in range(3):
        # a burst, rotated at once: lines the agent has not read yet exist only in the copy now
        expected += write(app, seq, 3000)
        seq += 3000
        copy = logs / f"{copy_name}{'' if cycle == 0 else f'.{cycle}'}"
        copytruncate(app, copy)
        expected += write(app, seq, 50)
        seq += 50
        wait_for(lambda: len(messages(workdir)) >= len(expected), timeout=30, message=f"cycle {cycle}")
    wait_for(lambda: "copytruncate): reading the rest of its copy" in agent.log(), message="the copy followed")
    assert agent.stop() == 0
    got = messages(workdir)
    assert len(got) == len(expected) and sorted(got) == sorted(expected)


@pytest.mark.parametrize("pattern", ["*.log", "app.log*"], ids=["copy outside the globs", "copy inside the globs"])
def test_copytruncate_while_the_agent_is_down_reads_the_rest_of_the_copy(workdir, run_agent, pattern):
    logs = workdir / "logs"
    app = logs / "app.log"
    expected = write(app, 0, 100)
    config = agent_config(logs, workdir / "data", pattern=pattern)
    agent = run_agent(config)
    wait_for(lambda: len(messages(workdir)) == 100, message="the first lines")
    assert agent.stop() == 0
    expected += write(app, 100, 200)  # written while the agent is down, never read from app.log
    copytruncate(app, logs / "app.log.1")
    expected += write(app, 300, 20)
    every_line_once_after_a_restart(run_agent, config, workdir, expected,
                                    "truncated while the agent was down: reading the rest of its copy")


def test_a_file_rotated_and_compressed_while_the_agent_was_down_has_its_unread_rest_read(workdir, run_agent):
    logs = workdir / "logs"
    app = logs / "app.log"
    expected = write(app, 0, 100)
    config = agent_config(logs, workdir / "data")
    agent = run_agent(config)
    wait_for(lambda: len(messages(workdir)) == 100, message="the first lines")
    assert agent.stop() == 0
    expected += write(app, 100, 500)  # unread when logrotate ran: rotate + compress (no delaycompress)
    with open(app, "rb") as source, gzip.open(logs / "app.log.1.gz", "wb") as target:
        shutil.copyfileobj(source, target)
    app.unlink()
    expected += write(app, 600, 30)  # the new file
    agent = every_line_once_after_a_restart(run_agent, config, workdir, expected,
                                            "rotated and compressed unread: reading its rest from")
    # and once only: the next start reads nothing again
    starts = agent.log().count("starting")
    agent = run_agent(config)
    wait_for(lambda: agent.log().count("starting") > starts and agent.log().count("tailing") >= 3,
             message="the next start")
    assert agent.stop() == 0
    assert len(messages(workdir)) == len(expected)
