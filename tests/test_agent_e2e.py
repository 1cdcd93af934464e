"""The agent as a real subprocess: real files, real rotation, real signals.

Lines carry unique sequence numbers, so each test can say exactly what was lost (nothing)
and what was duplicated (nothing, or only what was in flight at a kill -9).
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import orjson
import pytest

from conftest import agent_config, checkpoint_offsets, messages, read_archive, seq_lines, seqs, wait_for

LINE_LEN = len(seq_lines(0, 1))


def archived(workdir):
    return read_archive(workdir / "data" / "archive")


def wait_for_seqs(workdir, expected: set[int], timeout: float = 20.0):
    return wait_for(lambda: expected <= set(seqs(archived(workdir))), timeout,
                    message=f"{len(expected)} sequence numbers in the archive")


class Writer(threading.Thread):
    """Appends sequence-numbered lines at a steady pace, as an application would."""

    def __init__(self, path, total: int, per_tick: int = 50, tick: float = 0.01):
        super().__init__(daemon=True)
        self.path, self.total, self.per_tick, self.tick = path, total, per_tick, tick
        self.written = 0
        self.lock = threading.Lock()  # held while writing, so a rotation happens between writes

    def run(self):
        while self.written < self.total:
            count = min(self.per_tick, self.total - self.written)
            with self.lock, open(self.path, "a") as f:
                f.write(seq_lines(self.written, count))
                self.written += count
            time.sleep(self.tick)


def test_sigterm_drains_everything_exits_zero_and_leaves_no_temporary_files(workdir, run_agent):
    log = workdir / "logs" / "app.log"
    log.write_text(seq_lines(0, 3000))
    agent = run_agent(agent_config(workdir / "logs", workdir / "data",
                                   upload_interval="1h"))  # only the drain closes objects
    wait_for(lambda: "tailing" in agent.log(), message="the agent to start tailing")
    with open(log, "a") as f:
        f.write(seq_lines(3000, 10))
    time.sleep(0.3)
    assert agent.stop(signal.SIGTERM) == 0, agent.log()
    records = archived(workdir)
    assert sorted(seqs(records)) == list(range(3010))
    assert list((workdir / "data" / "archive" / ".tmp").iterdir()) == []
    assert checkpoint_offsets(workdir)[str(log)] == log.stat().st_size
    assert "draining" in agent.log()


def test_rotation_by_rename_while_writing(workdir, run_agent):
    log = workdir / "logs" / "app.log"
    log.touch()
    agent = run_agent()
    writer = Writer(log, total=6000)
    writer.start()
    for generation in (1, 2):
        wait_for(lambda: writer.written >= generation * 2000, message="lines written")
        with writer.lock:
            os.rename(log, workdir / "logs" / f"app.log.{generation}")  # not matched by *.log
            log.touch()
    writer.join()
    wait_for_seqs(workdir, set(range(6000)))
    # Both rotated files are let go once drained and quiet for rotate_wait.
    wait_for(lambda: agent.log().count("released") == 2, message="both rotated files released")
    assert agent.stop() == 0
    counts = collections.Counter(seqs(archived(workdir)))
    assert set(counts) == set(range(6000))
    assert max(counts.values()) == 1  # no crash, so no duplicate either


def test_copytruncate_is_detected_even_when_the_file_regrows_past_the_old_offset(workdir, run_agent):
    log = workdir / "logs" / "app.log"
    agent = run_agent()
    written = 0
    for round_ in range(3):
        with open(log, "a") as f:
            f.write(seq_lines(written, 500))
        written += 500
        wait_for_seqs(workdir, set(range(written)))
        shutil.copyfile(log, workdir / "logs" / f"app.log.{round_}")
        os.truncate(log, 0)
        # Refill at once with more than was there: size alone cannot tell it was truncated.
        with open(log, "a") as f:
            f.write(seq_lines(written, 600))
        written += 600
    wait_for_seqs(workdir, set(range(written)))
    assert agent.stop() == 0
    counts = collections.Counter(seqs(archived(workdir)))
    assert set(counts) == set(range(written)) and max(counts.values()) == 1
    assert all(m.startswith("seq=") and len(m) == LINE_LEN - 1 for m in messages(archived(workdir)))


def test_kill_9_loses_nothing_and_duplicates_only_what_was_in_flight(workdir, run_agent):
    log = workdir / "logs" / "app.log"
    log.touch()
    total = 12000
    writer = Writer(log, total=total, per_tick=100, tick=0.01)
    agent = run_agent()
    writer.start()
    in_flight_bounds = []
    for kill_at in (3000, 7000):
        wait_for(lambda: writer.written >= kill_at, message="lines written")
        wait_for(lambda: checkpoint_offsets(workdir).get(str(log), 0) > 0, message="a first checkpoint")
        agent.kill()
        before = collections.Counter(seqs(archived(workdir)))
        committed_line = checkpoint_offsets(workdir)[str(log)] // LINE_LEN
        # Whatever was archived past the persisted checkpoint may be shipped again: that is the bound.
        in_flight_bounds.append((committed_line, sum(1 for s in before if s >= committed_line)))
        agent = run_agent()
    writer.join()
    wait_for_seqs(workdir, set(range(total)), timeout=30)
    assert agent.stop() == 0
    counts = collections.Counter(seqs(archived(workdir)))
    assert set(counts) == set(range(total)), "lines were lost across kill -9"
    duplicated = {s for s, n in counts.items() if n > 1}
    allowed = sum(bound for _, bound in in_flight_bounds)
    assert len(duplicated) <= allowed
    lowest_checkpoint = min(line for line, _ in in_flight_bounds)
    assert all(s >= lowest_checkpoint for s in duplicated), "a confirmed line was shipped twice"


def test_a_file_deleted_while_open_is_drained(workdir, run_agent):
    log = workdir / "logs" / "app.log"
    log.write_text(seq_lines(0, 100))
    agent = run_agent()
    wait_for_seqs(workdir, set(range(100)))
    with open(log, "a") as f:
        f.write(seq_lines(100, 400))
    log.unlink()
    wait_for_seqs(workdir, set(range(500)))
    wait_for(lambda: "released" in agent.log(), message="the deleted file to be released")
    wait_for(lambda: checkpoint_offsets(workdir) == {}, message="the deleted file's checkpoint to go")
    assert agent.stop() == 0


@pytest.mark.parametrize("discovery", ["inotify", "polling"])
def test_files_that_appear_after_start_are_followed(workdir, run_agent, discovery):
    # With inotify, the rescan is slow so only a directory event can find the file in time;
    # without it (watch = false), the periodic rescan must.
    options = {"refresh_interval": "30s"} if discovery == "inotify" else {"refresh_interval": "200ms"}
    agent = run_agent(agent_config(workdir / "logs", workdir / "data", pattern="*/*.log",
                                   input_extra="" if discovery == "inotify" else "watch = false", **options))
    time.sleep(0.5)
    (workdir / "logs" / "web").mkdir()
    (workdir / "logs" / "web" / "new.log").write_text(seq_lines(0, 10))
    (workdir / "logs" / "web" / "skip.txt").write_text(seq_lines(100, 10))
    wait_for_seqs(workdir, set(range(10)))
    assert agent.stop() == 0
    assert sorted(seqs(archived(workdir))) == list(range(10))


def test_inode_reuse_after_restart_reads_the_new_file_from_its_start(workdir, run_agent):
    log = workdir / "logs" / "app.log"
    log.write_text("old content line\n" * 50)
    agent = run_agent()
    wait_for(lambda: len(archived(workdir)) == 50, message="the old file archived")
    assert agent.stop() == 0
    inode = log.stat().st_ino
    # Same device and inode, new content longer than the old offset: only the fingerprint tells.
    with open(log, "r+") as f:
        f.truncate(0)
        f.write(seq_lines(0, 100))
    assert log.stat().st_ino == inode
    agent = run_agent()
    wait_for_seqs(workdir, set(range(100)))
    assert agent.stop() == 0
    assert sorted(seqs(archived(workdir))) == list(range(100))


def test_huge_line_and_invalid_utf8(workdir, run_agent):
    log = workdir / "logs" / "app.log"
    huge = ("0123456789abcdef" * (5 * 1024 * 1024 // 16)).encode()
    with open(log, "wb") as f:
        f.write(b"before\n" + huge + b"\n" + b"bad \xff\xfe bytes\n" + "é ok\n".encode() + b"after\n")
    agent = run_agent()
    wait_for(lambda: any(r["message"] == "after" for r in archived(workdir)), message="the last line")
    assert agent.stop() == 0
    records = archived(workdir)
    assert records[0]["message"] == "before" and "truncated" not in records[0]
    parts = [r for r in records if r.get("truncated")]
    assert len(parts) == 20 and all(len(p["message"]) <= 256 * 1024 for p in parts)
    assert "".join(p["message"] for p in parts).encode() == huge
    bad = next(r for r in records if r["message"].startswith("bad"))
    assert bad["message"] == "bad \ufffd\ufffd bytes" and bad["encoding_errors"] is True
    good = next(r for r in records if r["message"] == "é ok")
    assert "encoding_errors" not in good
    assert records[-1]["message"] == "after"


def test_an_unreadable_file_is_reported_once_and_the_others_keep_flowing(workdir, run_agent):
    secret = workdir / "logs" / "secret.log"
    secret.write_text("nope\n")
    secret.chmod(0)
    (workdir / "logs" / "app.log").write_text(seq_lines(0, 20))
    # As root, drop the capabilities that bypass file permissions, so the agent meets EACCES as a service would.
    wrapper = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    agent = run_agent(wrapper=wrapper)
    wait_for_seqs(workdir, set(range(20)))
    time.sleep(0.6)  # several rescans
    assert agent.stop() == 0
    assert agent.log().count(f"cannot read {secret}") == 1
    assert "Permission denied" in agent.log()
    assert "nope" not in messages(archived(workdir))


def test_a_line_without_newline_waits_then_ships(workdir, run_agent):
    log = workdir / "logs" / "app.log"
    agent = run_agent(agent_config(workdir / "logs", workdir / "data", partial_line_timeout="1s"))
    wait_for(lambda: "tailing" in agent.log() or True)
    with open(log, "a") as f:
        f.write("first half ")
        f.flush()
        time.sleep(0.3)
        f.write("second half\nno newline yet")
    wait_for(lambda: "no newline yet" in messages(archived(workdir)), message="the partial line after its timeout")
    assert agent.stop() == 0
    assert messages(archived(workdir)) == ["first half second half", "no newline yet"]


def test_start_at_end_skips_what_was_there(workdir, run_agent):
    log = workdir / "logs" / "app.log"
    log.write_text(seq_lines(0, 100))
    agent = run_agent(agent_config(workdir / "logs", workdir / "data", start_at="end"))
    wait_for(lambda: checkpoint_offsets(workdir).get(str(log)) == log.stat().st_size, message="a checkpoint")
    with open(log, "a") as f:
        f.write(seq_lines(100, 5))
    wait_for_seqs(workdir, set(range(100, 105)))
    assert agent.stop() == 0
    assert sorted(seqs(archived(workdir))) == list(range(100, 105))


def test_multiline_json_parser_labels_and_key_layout(workdir, run_agent):
    config = agent_config(workdir / "logs", workdir / "data",
                          input_extra='multiline = { preset = "python", timeout = "300ms" }',
                          agent_extra='[agent.labels]\napp = "web"\nimage_version = "${IMAGE_VERSION:-dev}"')
    config += f"""
[[inputs]]
type = "file"
tag = "events"
paths = ["{workdir}/logs/*.json"]
parser = "json"
time_key = "ts"
poll_interval = "50ms"
"""
    (workdir / "logs" / "app.log").write_text(
        "ERROR failed\nTraceback (most recent call last):\n  File \"a.py\", line 1, in <module>\n"
        "ValueError: bad\nINFO fine\n")
    (workdir / "logs" / "e.json").write_text('{"ts": 1764422238, "level": "warn", "tag": "x"}\nnot json\n')
    agent = run_agent(config, env={"IMAGE_VERSION": "2026.11.29-1"})
    wait_for(lambda: len(archived(workdir)) == 4, message="4 records")
    assert agent.stop() == 0
    by_message = {r["message"]: r for r in archived(workdir)}
    trace = by_message["ERROR failed\nTraceback (most recent call last):\n  File \"a.py\", line 1, in <module>\n"
                       "ValueError: bad"]
    assert trace["labels"] == {"app": "web", "image_version": "2026.11.29-1"}
    assert "INFO fine" in by_message
    event = by_message['{"ts": 1764422238, "level": "warn", "tag": "x"}']
    assert event["time"] == "2025-11-29T13:17:18.000000Z" and event["level"] == "warn"
    assert event["tag"] == "events" and event["fields"] == {"tag": "x"}
    assert by_message["not json"]["parse_error"] is True
    keys = [p.relative_to(workdir / "data" / "archive").parts for p in (workdir / "data" / "archive").rglob("*.gz")]
    assert {k[3] for k in keys} == {"app", "events"}
    assert all(k[0].startswith("dt=") and k[1].startswith("hour=") and k[2] == f"instance={os.uname().nodename}"
               for k in keys)


def test_a_bad_config_does_not_start(workdir, run_agent):
    agent = run_agent("[agent]\nflush_interval = \"never\"\n")
    assert agent.proc.wait(20) == 2
    assert "agent.flush_interval: expected a duration" in agent.log()
    assert "inputs: at least one [[inputs]] table is required" in agent.log()


@pytest.mark.parametrize("second_signal", [signal.SIGINT])
def test_sigint_also_drains(workdir, run_agent, second_signal):
    (workdir / "logs" / "app.log").write_text(seq_lines(0, 50))
    agent = run_agent()
    wait_for(lambda: "tailing" in agent.log(), message="tailing")
    assert agent.stop(second_signal) == 0
    assert sorted(seqs(archived(workdir))) == list(range(50))


def test_stdout_output_prints_one_json_record_per_line(workdir, run_agent):
    config = agent_config(workdir / "logs", workdir / "data") + '\n[[outputs]]\ntype = "stdout"\nmatch = ["app"]\n'
    (workdir / "logs" / "app.log").write_text(seq_lines(0, 30))
    agent = run_agent(config)
    wait_for_seqs(workdir, set(range(30)))  # the directory output has them; stdout got them first
    assert agent.stop() == 0
    printed = [orjson.loads(line) for line in agent.proc.stdout.read().splitlines()]
    assert seqs(printed) == list(range(30))
    assert printed[0]["tag"] == "app" and printed[0]["source"] == str(workdir / "logs" / "app.log")


def test_a_signal_delivered_twice_at_once_still_drains_but_a_later_one_exits_now(workdir, run_agent):
    (workdir / "logs" / "app.log").write_text(seq_lines(0, 50))
    agent = run_agent(agent_config(workdir / "logs", workdir / "data", upload_interval="1h"))
    wait_for(lambda: "tailing" in agent.log(), message="tailing")
    agent.send(signal.SIGINT)  # Ctrl-C reaches both make and the agent; make passes it on too
    agent.send(signal.SIGTERM)
    assert agent.proc.wait(20) == 0
    assert sorted(seqs(archived(workdir))) == list(range(50))


def test_a_second_signal_later_exits_at_once(workdir, run_agent, tmp_path):
    (workdir / "logs" / "app.log").write_text("x\n")
    config = agent_config(workdir / "logs", workdir / "data").replace('shutdown_timeout = "10s"',
                                                                      'shutdown_timeout = "40s"')
    (workdir / "data" / "archive" / ".tmp").mkdir(parents=True)
    (workdir / "data" / "archive" / ".tmp").chmod(0o555)  # the drain will wait on a refusing destination
    wrapper = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    agent = run_agent(config, wrapper=wrapper)
    wait_for(lambda: "delivery failed" in agent.log(), message="the failure")
    agent.send(signal.SIGTERM)
    time.sleep(1.5)
    assert agent.proc.poll() is None  # still draining
    agent.send(signal.SIGTERM)
    assert agent.proc.wait(10) == 1
    assert "second signal: exiting now" in agent.log()
    (workdir / "data" / "archive" / ".tmp").chmod(0o755)


def test_run_default_runs_the_embedded_default_in_the_current_directory(tmp_path):
    # `make run` runs `shipper run --default`: the embedded default even where /etc/shipper/shipper.toml exists
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "app.log").write_text(seq_lines(0, 5))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPPER_")}
    with open(tmp_path / "default.stderr", "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "shipper", "run", "--default"], cwd=tmp_path, env=env, stderr=stderr)
        try:
            wait_for(lambda: "tailing" in (tmp_path / "default.stderr").read_text(), message="tailing")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    log = (tmp_path / "default.stderr").read_text()
    assert "starting with <embedded default>" in log
    assert f"reading {tmp_path}/logs/*.log" in log and f"writing directory {tmp_path}/shipper-data/archive" in log
    assert sorted(seqs(read_archive(tmp_path / "shipper-data" / "archive"))) == list(range(5))
