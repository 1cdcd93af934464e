"""A destination that refuses: nothing is lost, checkpoints wait, shutdown respects its deadline."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import time

import pytest

from conftest import agent_config, mounted_tmpfs, read_archive, seq_lines, seqs, wait_for
from shipper.inputs.checkpoints import CheckpointStore

# As root, drop the capabilities that bypass file permissions, so a read-only directory refuses writes.
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []


def checkpoint(workdir) -> int:
    files = list(CheckpointStore(str(workdir / "data"), "app").load().values())
    return files[0].offset if files else 0


def archived_seqs(workdir):
    return collections.Counter(seqs(read_archive(workdir / "data" / "archive")))


@pytest.fixture
def archive_tmp(workdir):
    tmp = workdir / "data" / "archive" / ".tmp"
    tmp.mkdir(parents=True)
    yield tmp
    tmp.chmod(0o755)


def test_outage_then_recovery_delivers_everything_once(workdir, run_agent, archive_tmp):
    log = workdir / "logs" / "app.log"
    log.write_text(seq_lines(0, 100))
    agent = run_agent(wrapper=NO_DAC)
    wait_for(lambda: set(archived_seqs(workdir)) == set(range(100)), message="the first 100 lines")
    wait_for(lambda: checkpoint(workdir) == log.stat().st_size, message="the checkpoint to reach them")
    confirmed = checkpoint(workdir)
    archive_tmp.chmod(0o555)  # the destination now refuses new objects
    with open(log, "a") as f:
        f.write(seq_lines(100, 200))
    wait_for(lambda: "delivery failed, retrying" in agent.log(), message="the failure to be reported")
    time.sleep(0.5)
    assert checkpoint(workdir) == confirmed, "the checkpoint moved past records that were not delivered"
    archive_tmp.chmod(0o755)
    wait_for(lambda: set(archived_seqs(workdir)) == set(range(300)), message="all 300 lines after recovery")
    assert agent.stop() == 0
    assert max(archived_seqs(workdir).values()) == 1
    assert "delivering again" in agent.log()
    assert agent.log().count("delivery failed, retrying") == 1  # one line per outage, not one per retry


def test_shutdown_deadline_with_a_dead_destination_keeps_records_for_the_next_start(workdir, run_agent, archive_tmp):
    log = workdir / "logs" / "app.log"
    config = agent_config(workdir / "logs", workdir / "data").replace('shutdown_timeout = "10s"',
                                                                      'shutdown_timeout = "1s"')
    archive_tmp.chmod(0o555)
    log.write_text(seq_lines(0, 50))
    agent = run_agent(config, wrapper=NO_DAC)
    wait_for(lambda: "delivery failed" in agent.log(), message="the failure")
    started = time.monotonic()
    assert agent.stop(signal.SIGTERM) == 1  # not everything delivered: say so
    assert time.monotonic() - started < 5
    assert "not delivered before shutdown_timeout" in agent.log()
    assert checkpoint(workdir) == 0
    archive_tmp.chmod(0o755)
    agent = run_agent(config, wrapper=NO_DAC)
    wait_for(lambda: set(archived_seqs(workdir)) == set(range(50)), message="delivery on the next start")
    assert agent.stop() == 0


def test_checkpoints_that_cannot_be_written_are_reported_once_and_delivery_goes_on(workdir, run_agent):
    checkpoints = workdir / "data" / "checkpoints"
    checkpoints.mkdir(parents=True)
    checkpoints.chmod(0o555)
    try:
        log = workdir / "logs" / "app.log"
        log.write_text(seq_lines(0, 10))
        agent = run_agent(wrapper=NO_DAC)
        wait_for(lambda: set(archived_seqs(workdir)) == set(range(10)), message="delivery without checkpoints")
        with open(log, "a") as f:
            f.write(seq_lines(10, 10))
        wait_for(lambda: set(archived_seqs(workdir)) == set(range(20)), message="more delivery")
        assert agent.log().count("cannot write checkpoints") == 1
        checkpoints.chmod(0o755)
        wait_for(lambda: checkpoint(workdir) == log.stat().st_size, message="checkpoints written again")
        assert agent.stop() == 0
        assert "checkpoints are written again" in agent.log()
    finally:
        checkpoints.chmod(0o755)


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 256 KiB tmpfs (needs root and mount), filled to the last byte."""
    with mounted_tmpfs(tmp_path / "tiny", "256k", "for a real ENOSPC") as mountpoint:
        subprocess.run(["dd", "if=/dev/zero", f"of={mountpoint}/filler", "bs=4k"], capture_output=True)
        yield mountpoint


def test_disk_full_holds_the_checkpoint_and_recovers_when_space_returns(workdir, run_agent, tiny_filesystem):
    archive = tiny_filesystem / "archive"
    config = agent_config(workdir / "logs", workdir / "data").replace(f'path = "{workdir}/data/archive"',
                                                                      f'path = "{archive}"')
    log = workdir / "logs" / "app.log"
    log.write_text(seq_lines(0, 200))
    agent = run_agent(config)
    wait_for(lambda: "delivery failed, retrying" in agent.log(), message="ENOSPC to be reported")
    assert "No space left on device" in agent.log()
    time.sleep(0.5)
    assert checkpoint(workdir) == 0
    (tiny_filesystem / "filler").unlink()  # space comes back
    wait_for(lambda: set(seqs(read_archive(archive))) == set(range(200)), message="delivery after space returns")
    assert agent.stop() == 0
    assert max(collections.Counter(seqs(read_archive(archive))).values()) == 1
    assert checkpoint(workdir) == log.stat().st_size
