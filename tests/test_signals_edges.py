"""Issue 12 finding 16: signals at the edges. A SIGHUP or SIGTERM during start-up (before the pipeline
runs) must not kill the agent; a SIGTERM during a reload keeps one deadline for the whole stop.
Real agent subprocesses and real signals; start-up is held at a known point by an IMDS endpoint
that accepts the connection and answers only when the test says so."""

from __future__ import annotations

import signal
import socket
import time

from aws import CREDENTIALS, PROXY_VARIABLES, free_port
from conftest import agent_config, read_archive, wait_for

SIGNALS_CAUGHT = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}


def write(workdir, start: int, count: int) -> None:
    with open(workdir / "logs" / "app.log", "a") as handle:
        handle.writelines(f"line {n}\n" for n in range(start, start + count))


def caught_signals(pid: int) -> set[int]:
    with open(f"/proc/{pid}/status") as handle:
        mask = int(next(line.split()[1] for line in handle if line.startswith("SigCgt:")), 16)
    return {number for number in range(1, 65) if mask & (1 << (number - 1))}


class HeldImds:
    """An IMDS endpoint that accepts and never answers: the agent waits in start-up (imds_timeout)
    until the test closes the connection, which it then takes as "not on EC2"."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(30)
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def hold(self) -> socket.socket:
        """Wait for the agent to ask (it is then past reading its config, before its pipeline)."""
        connection, _ = self.listener.accept()
        return connection

    def close(self) -> None:
        self.listener.close()


def log_since(agent, mark: int) -> str:
    """What this agent logged (agents of one test share a log file)."""
    return agent.log()[mark:]


def log_size(workdir) -> int:
    path = workdir / "agent.stderr"
    return len(path.read_text(errors="replace")) if path.exists() else 0


def held_config(workdir, imds: HeldImds, labels: str = 'release = "one"') -> str:
    config = agent_config(workdir / "logs", workdir / "data", agent_extra=f"[agent.labels]\n{labels}")
    return config.replace('metadata = "off"', f'metadata = "ec2"\nimds_endpoint = "{imds.endpoint}"\n'
                                              f'imds_timeout = "10s"')


def test_a_sighup_during_start_up_is_remembered_and_applied_once_running(workdir, run_agent):
    imds = HeldImds()
    archive = workdir / "data" / "archive"
    try:
        for attempt in range(3):
            mark = log_size(workdir)
            agent = run_agent(held_config(workdir, imds))
            held = imds.hold()
            # The file changes after it was read: the SIGHUP asks for it, and gets it once running.
            agent.config_path.write_text(held_config(workdir, imds, f'release = "two-{attempt}"'))
            agent.send(signal.SIGHUP)
            time.sleep(0.2)
            assert agent.proc.poll() is None, "killed by a SIGHUP during start-up"
            assert SIGNALS_CAUGHT <= caught_signals(agent.proc.pid)
            agent.send(signal.SIGHUP)  # twice: still one reload
            held.close()
            wait_for(lambda: "reloaded with" in log_since(agent, mark) or agent.proc.poll() is not None,
                     timeout=30, message="the reload once running")
            assert agent.proc.poll() is None, log_since(agent, mark)
            write(workdir, attempt * 10, 10)
            wait_for(lambda: len(read_archive(archive)) == (attempt + 1) * 10, message="the lines shipped")
            records = read_archive(archive)[attempt * 10:]
            assert {r["labels"]["release"] for r in records} == {f"two-{attempt}"}
            assert agent.stop() == 0
            assert log_since(agent, mark).count("received SIGHUP: reloading") == 1  # two signals, one reload
    finally:
        imds.close()


def test_a_sighup_before_the_config_is_read_reloads_nothing(workdir, run_agent):
    """Sent as soon as the handlers exist (seen in /proc): the agent neither dies nor reloads for nothing."""
    config = agent_config(workdir / "logs", workdir / "data")
    for attempt in range(3):
        agent = run_agent(config)
        pid = agent.proc.pid
        wait_for(lambda: signal.SIGHUP in caught_signals(pid), timeout=30, interval=0.001,
                 message="the handlers")
        agent.send(signal.SIGHUP)
        write(workdir, attempt, 1)
        wait_for(lambda: len(read_archive(workdir / "data" / "archive")) == attempt + 1
                 or agent.proc.poll() is not None, message="a line shipped")
        assert agent.proc.poll() is None
        assert agent.stop() == 0


def test_a_sigterm_during_start_up_stops_cleanly(workdir, run_agent):
    imds = HeldImds()
    try:
        agent = run_agent(held_config(workdir, imds))
        held = imds.hold()
        agent.send(signal.SIGTERM)
        held.close()
        assert agent.proc.wait(30) == 0
        assert "stopped during start-up" in agent.log()
    finally:
        imds.close()


def test_a_sigterm_during_a_reload_against_a_failing_destination_keeps_one_deadline(workdir, run_agent):
    """S3 unreachable: the reload's drain waits up to shutdown_timeout; a SIGTERM meanwhile must not
    add the new pipeline's own shutdown_timeout on top (it took twice the timeout)."""
    timeout = 6.0
    output = f"""
[[outputs]]
type = "s3"
bucket = "unreachable"
endpoint_url = "http://127.0.0.1:{free_port()}"
region = "us-east-1"
upload_interval = "100ms"
"""
    config = agent_config(workdir / "logs", workdir / "data", output=output,
                          agent_extra='retry_initial_delay = "50ms"\nretry_max_delay = "200ms"')
    config = config.replace('shutdown_timeout = "10s"', f'shutdown_timeout = "{timeout:g}s"')
    env = {**CREDENTIALS, "AWS_EC2_METADATA_DISABLED": "true", **dict.fromkeys(PROXY_VARIABLES, "")}
    agent = run_agent(config, env=env)
    write(workdir, 0, 20)
    wait_for(lambda: "retrying with backoff" in agent.log(), timeout=30, message="the failing upload")
    agent.send(signal.SIGHUP)
    wait_for(lambda: "received SIGHUP: reloading" in agent.log(), message="the reload")
    time.sleep(0.3)  # the reload is draining the old pipeline into the unreachable bucket
    agent.send(signal.SIGTERM)
    stopped = time.monotonic()
    code = agent.proc.wait(4 * timeout)
    elapsed = time.monotonic() - stopped
    assert elapsed < timeout + 4, f"the stop took {elapsed:.1f}s with shutdown_timeout {timeout:g}s"
    assert code == 1  # undelivered: what was read waits in the spool for the next start
    log = agent.log()
    assert "stop requested during the reload" in log and "reloaded with" not in log
    spool = [p for p in (workdir / "data").rglob("*") if p.is_file() and "spool" in str(p)]
    assert spool, "the undelivered object stays in the spool"
