"""The agent as a systemd service: notify and watchdog, /healthz, /metrics and `shipper status`, SIGHUP
reload, termination notices. Real agent subprocesses, a real datagram socket, real HTTP."""

from __future__ import annotations

import gzip
import signal
import socket
import subprocess
import sys
import threading
import time

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aws import free_port, s3_output
from conftest import http_get as get, FAST_RETRIES, Agent, agent_config, messages, read_archive, wait_for
from imds import FakeImds
from shipper.outputs.base import Output, OutputContext
from shipper.pipeline import OutputRunner, stalled
from shipper.record import Envelope
from shipper.acks import Acknowledgement, OutputAck
from shipper.stats import Stats
from shipper.systemd import Notifier, Watchdog


def write(workdir, start: int, count: int, name: str = "app.log") -> None:
    with open(workdir / "logs" / name, "a") as handle:
        handle.writelines(f"line {n}\n" for n in range(start, start + count))


class NotifySocket:
    """What systemd listens on: a datagram socket whose messages the test reads."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.path = str(path)
        self.messages: list[dict[str, str]] = []

    def receive(self, until, timeout: float = 15.0) -> list[dict[str, str]]:
        """Read messages until ``until(messages)`` holds."""
        deadline = time.monotonic() + timeout
        while not until(self.messages):
            if time.monotonic() > deadline:
                raise AssertionError(f"systemd was not told that; got {self.messages}")
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))
        return self.messages

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def start_agent(workdir, config: str, env: dict | None = None) -> Agent:
    return Agent(workdir, config, env=env).start()


def test_systemd_is_told_ready_pinged_and_told_stopping(workdir, notify_socket):
    config = agent_config(workdir / "logs", workdir / "data")
    agent = start_agent(workdir, config, env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "600000"})
    try:
        ready = notify_socket.receive(lambda ms: any(m.get("READY") == "1" for m in ms))
        first = next(m for m in ready if m.get("READY") == "1")
        assert first["MAINPID"] == str(agent.proc.pid) and "records in" in first["STATUS"]
        notify_socket.receive(lambda ms: sum(m.get("WATCHDOG") == "1" for m in ms) >= 3)  # every 0.3 s
        assert agent.stop() == 0
        notify_socket.receive(lambda ms: any(m.get("STOPPING") == "1" for m in ms))
    finally:
        agent.ensure_stopped()


def test_notifier_is_a_no_op_without_notify_socket_and_speaks_the_abstract_namespace():
    assert not Notifier({}).send(ready="1")
    name = f"shipper-test-{time.monotonic_ns()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name)
    listener.settimeout(5)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "2000000"})
        assert notifier.watchdog_seconds == 2.0
        assert notifier.status("all good")
        assert listener.recv(100) == b"STATUS=all good"
    finally:
        listener.close()
    assert Notifier({"NOTIFY_SOCKET": "/nonexistent/socket"}).send(ready="1") is False  # reported, not raised
    assert Notifier({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "1"}).watchdog_seconds is None  # not ours


class HangingOutput(Output):
    """Delivers until ``hang`` is set, then blocks in deliver() like a call that never returns."""

    def __init__(self):
        super().__init__(None, OutputContext("hanging.0", "/nonexistent", Envelope(), Stats()))
        self.hang = threading.Event()
        self.release = threading.Event()

    def accept(self, batch):
        batch.ack.confirm()

    def deliver(self, now, force):
        if self.hang.is_set():
            self.release.wait(30)


def test_the_watchdog_stops_pinging_when_an_output_is_stuck(notify_socket):
    output = HangingOutput()
    runner = OutputRunner(output, ["*"], 1 << 20, 0.05, output.context.stats, threading.Event())
    runner.start()
    notifier = Notifier({"NOTIFY_SOCKET": notify_socket.path})
    watchdog = Watchdog(notifier, lambda: stalled([runner], 0.5) == [], period=0.2)
    watchdog.start()
    try:
        notify_socket.receive(lambda ms: len(ms) >= 5)  # pinging while the runner loops
        output.hang.set()
        time.sleep(0.8)  # the runner is now stuck in deliver() for longer than 0.5 s
        pings = watchdog.pings
        time.sleep(0.6)
        assert watchdog.pings == pings  # no ping while stuck: systemd restarts the agent
        output.release.set()
        output.hang.clear()
        wait_for(lambda: watchdog.pings > pings, timeout=5, message="pings again once it moves")
    finally:
        watchdog.stop()
        output.release.set()
        runner.finish()
        runner.join(5)


def test_an_output_ack_confirms_once_and_tells_its_runner():
    done, told = [], []
    parent = Acknowledgement(2, lambda: done.append(True))
    first, second = OutputAck(parent, told.append), OutputAck(parent, told.append)
    first.confirm()
    first.confirm()  # twice from one output must not stand in for the other output
    assert done == [] and told == [first]
    second.confirm()
    assert done == [True] and told == [first, second]


def test_metrics_parse_and_count_what_was_shipped_and_status_shows_it(workdir):
    port = free_port()
    config = agent_config(workdir / "logs", workdir / "data", server=f'listen = "127.0.0.1:{port}"')
    agent = start_agent(workdir, config)
    try:
        write(workdir, 0, 300)
        wait_for(lambda: len(read_archive(workdir / "data" / "archive")) == 300, message="300 records archived")
        wait_for(lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200, message="the server")

        def samples():
            text = get(f"http://127.0.0.1:{port}/metrics")[1].decode()
            return {(s.name, tuple(sorted(s.labels.items()))): s.value
                    for family in text_string_to_metric_families(text) for s in family.samples}

        metrics = wait_for(lambda: (m := samples())[("shipper_records_out_total", (("output", "directory.0"),))]
                           == 300 and m, message="records_out 300")
        assert metrics[("shipper_records_in_total", (("input", "app"),))] == 300
        size = (workdir / "logs" / "app.log").stat().st_size
        assert metrics[("shipper_bytes_in_total", (("input", "app"),))] == size
        assert metrics[("shipper_output_healthy", (("output", "directory.0"),))] == 1
        path = str(workdir / "logs" / "app.log")
        wait_for(lambda: samples()[("shipper_file_checkpoint_lag_bytes", (("input", "app"), ("path", path)))] == 0,
                 message="no checkpoint lag once everything is confirmed")
        assert ("shipper_build_info", (("host", socket.gethostname()), ("version", "0.1.0"))) in metrics
        assert metrics[("shipper_uptime_seconds", ())] > 0

        status = subprocess.run([sys.executable, "-m", "shipper", "status", "--url", f"http://127.0.0.1:{port}",
                                 "--interval", "0.2"], capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr
        assert "healthy" in status.stdout.splitlines()[0]
        app_row = next(line.split() for line in status.stdout.splitlines() if line.startswith("app "))
        assert app_row[:2] == ["app", "file"] and app_row[3] == "300"
        out_row = next(line.split() for line in status.stdout.splitlines() if line.startswith("directory.0"))
        assert out_row[1] == "ok" and out_row[3] == "300"
        assert get(f"http://127.0.0.1:{port}/nope")[0] == 404
    finally:
        agent.stop()
        agent.ensure_stopped()


def test_status_says_clearly_when_no_agent_answers(workdir):
    result = subprocess.run([sys.executable, "-m", "shipper", "status", "--url", f"http://127.0.0.1:{free_port()}"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "no agent answers at" in result.stderr


def test_healthz_turns_503_while_s3_is_down_and_200_again_after(workdir, aws):
    aws.s3.create_bucket(Bucket="health")
    port = free_port()
    output = s3_output(aws.endpoint, "health", upload_interval="200ms")
    config = agent_config(workdir / "logs", workdir / "data", output=output, agent_extra=FAST_RETRIES,
                          server=f'listen = "127.0.0.1:{port}"\nunhealthy_after = "1s"')
    agent = start_agent(workdir, config, env=aws.env)
    try:
        write(workdir, 0, 10)
        wait_for(lambda: aws.s3.list_objects_v2(Bucket="health").get("KeyCount"), message="a first upload")
        assert get(f"http://127.0.0.1:{port}/healthz") == (200, b'{"status":"ok"}')
        aws.proxy.set_down(True)
        write(workdir, 10, 10)
        code, body = wait_for(lambda: (r := get(f"http://127.0.0.1:{port}/healthz"))[0] == 503 and r, timeout=20,
                              message="503 while the bucket is unreachable")
        reason = orjson.loads(body)
        assert reason["status"] == "unhealthy" and "delivery failing for" in reason["outputs"]["s3.0"]
        status = subprocess.run([sys.executable, "-m", "shipper", "status", "--url", f"http://127.0.0.1:{port}",
                                 "--interval", "0.1"], capture_output=True, text=True, timeout=30)
        assert status.returncode == 1 and "UNHEALTHY" in status.stdout and "s3.0: delivery failing" in status.stdout
        aws.proxy.set_down(False)
        wait_for(lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200, timeout=20, message="200 after recovery")
        assert agent.stop() == 0
    finally:
        aws.proxy.set_down(False)
        agent.ensure_stopped()


def test_sighup_with_a_broken_config_keeps_the_running_pipeline_then_a_good_one_applies(workdir):
    config = agent_config(workdir / "logs", workdir / "data", agent_extra='[agent.labels]\nrelease = "one"')
    agent = start_agent(workdir, config)
    try:
        write(workdir, 0, 100)
        archive = workdir / "data" / "archive"
        wait_for(lambda: len(read_archive(archive)) == 100, message="the first 100 lines")
        agent.config_path.write_text(config + "\n[[outputs]]\ntype = \"nonsense\"\n")
        agent.send(signal.SIGHUP)
        wait_for(lambda: "reload refused" in agent.log(), message="the refusal")
        assert "outputs[1].type: unknown" in agent.log()
        write(workdir, 100, 100)  # still shipped by the old pipeline
        wait_for(lambda: len(read_archive(archive)) == 200, message="lines after the refused reload")
        agent.config_path.write_text(config.replace('release = "one"', 'release = "two"'))
        write(workdir, 200, 100)  # written around the reload: none lost, none twice
        agent.send(signal.SIGHUP)
        wait_for(lambda: "reloaded with" in agent.log(), message="the reload")
        write(workdir, 300, 100)
        wait_for(lambda: len(read_archive(archive)) >= 400, message="every line")
        assert agent.stop() == 0
        records = read_archive(archive)
        assert sorted(messages(records), key=lambda m: int(m.split()[1])) == [f"line {n}" for n in range(400)]
        assert {r["labels"]["release"] for r in records if int(r["message"].split()[1]) >= 300} == {"two"}
        assert {r["labels"]["release"] for r in records if int(r["message"].split()[1]) < 200} == {"one"}
    finally:
        agent.ensure_stopped()


def test_a_spot_termination_notice_ships_the_open_s3_object_within_seconds(workdir, aws):
    aws.s3.create_bucket(Bucket="doomed")
    output = s3_output(aws.endpoint, "doomed", upload_interval="1h")
    with FakeImds() as imds:
        config = agent_config(workdir / "logs", workdir / "data", output=output, agent_extra=FAST_RETRIES)
        config = config.replace('metadata = "off"', f'metadata = "ec2"\nimds_endpoint = "{imds.endpoint}"\n'
                                                      f'termination_check_interval = "300ms"')
        agent = start_agent(workdir, config, env=aws.env)
        try:
            write(workdir, 0, 50)
            wait_for(lambda: any("meta-data/spot/instance-action" in r[1] for r in imds.requests),
                     message="the watcher asking IMDS")
            time.sleep(0.5)
            assert not aws.s3.list_objects_v2(Bucket="doomed").get("KeyCount")  # held for upload_interval (1 h)
            imds.metadata["meta-data/spot/instance-action"] = '{"action": "terminate", "time": "2026-11-29T20:00:00Z"}'
            noticed = time.monotonic()

            def shipped():
                listing = aws.s3.list_objects_v2(Bucket="doomed").get("Contents", [])
                records = [orjson.loads(line) for obj in listing
                           for line in gzip.decompress(aws.s3.get_object(Bucket="doomed", Key=obj["Key"])["Body"]
                                                       .read()).splitlines()]
                lines = sorted(r["message"] for r in records if r["tag"] == "app")
                return len(lines) == 50 and any(r["tag"] == "lifecycle" for r in records) and records

            records = wait_for(shipped, timeout=15, interval=0.2, message="the object and the lifecycle record in S3")
            assert time.monotonic() - noticed < 10
            notice = next(r for r in records if r["tag"] == "lifecycle")
            assert notice["event"] == "termination_notice" and notice["action"] == "terminate"
            assert notice["instance_id"] == "i-0abc1234def567890"
            assert "termination notice (spot): terminate at 2026-11-29T20:00:00Z" in agent.log()
            assert agent.stop() == 0
        finally:
            agent.ensure_stopped()


def test_lifecycle_notice_decisions():
    from shipper.lifecycle import termination_notice

    assert termination_notice(None, "InService") is None
    assert termination_notice(None, None) is None
    assert termination_notice('{"action": "terminate", "time": "T"}', None) == {
        "source": "spot", "action": "terminate", "at": "T"}
    assert termination_notice("not json", "Terminated") == {"source": "autoscaling", "action": "terminate", "at": ""}
    assert termination_notice('{"action": "none"}', "Warmed:Pending") is None


def test_a_taken_port_does_not_stop_shipping(workdir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = agent_config(workdir / "logs", workdir / "data", server=f'listen = "127.0.0.1:{port}"')
        agent = start_agent(workdir, config)
        try:
            write(workdir, 0, 10)
            wait_for(lambda: len(read_archive(workdir / "data" / "archive")) == 10, message="lines shipped")
            assert f"cannot serve /healthz and /metrics on 127.0.0.1:{port}" in agent.log()
            assert agent.stop() == 0
        finally:
            agent.ensure_stopped()


def test_listen_is_checked_with_the_config():
    from shipper.config import load_text
    from shipper.errors import ConfigError

    text = '[server]\nlisten = "localhost"\n[[inputs]]\ntype = "file"\npaths = ["x"]\n' \
           '[[outputs]]\ntype = "directory"\npath = "y"\n'
    with pytest.raises(ConfigError) as caught:
        load_text(text, "t.toml")
    assert "server.listen: 'localhost' is not host:port" in str(caught.value)


def test_a_signal_received_by_another_thread_wakes_the_main_thread_at_once():
    """The kernel may deliver SIGTERM to any thread; the main thread must not sleep on until a timeout."""
    from shipper.service import Wakeup

    wakeup = Wakeup()
    handled = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: handled.append(signum))
    old_fd = wakeup.catch_signals() or -1
    try:
        ready = threading.Event()
        other = threading.Thread(target=lambda: (ready.set(), time.sleep(2)))
        other.start()
        ready.wait()
        threading.Timer(0.2, lambda: signal.pthread_kill(other.ident, signal.SIGUSR1)).start()
        started = time.monotonic()
        wakeup.wait(30)
        assert time.monotonic() - started < 10 and handled == [signal.SIGUSR1]  # not the 30 s timeout
        threading.Timer(0.1, wakeup.set).start()  # and a set() from any thread
        started = time.monotonic()
        wakeup.wait(30)
        assert time.monotonic() - started < 10
        other.join()
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGUSR1, previous)
