"""Issue 12 findings 5, 17 and 22: the status server under hostile clients, its listen address, and
credentials in endpoint URLs. Real agent subprocesses, real sockets on 127.0.0.1."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from unittest import mock

import orjson
import pytest

from aws import CREDENTIALS, PROXY_VARIABLES, free_port
from conftest import http_get as get, agent_config, read_archive, wait_for
from shipper.config import load_text
from shipper.errors import ConfigError


def poll(url: str) -> tuple[int, bytes]:
    """get(), with 0 while the server is not up yet."""
    try:
        return get(url)
    except OSError:
        return 0, b""


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("Threads:"))


def write(workdir, start: int, count: int) -> None:
    with open(workdir / "logs" / "app.log", "a") as handle:
        handle.writelines(f"line {n}\n" for n in range(start, start + count))


# ---------------------------------------------------------------- 5: slow clients

class Trickler:
    """Many connections that send a request one byte at a time, as slowly as a hostile client would."""

    def __init__(self, port: int, count: int):
        self.open: list[socket.socket] = []
        self.answers: list[bytes] = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.setblocking(False)
            self.open.append(sock)
        self.request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 10_000

    def step(self, sent: int) -> None:
        """One more byte on each connection still open; forget those the server closed."""
        still = []
        for sock in self.open:
            try:
                data = sock.recv(65536)
                if data:
                    self.answers.append(data)
                    still.append(sock)  # the close follows
                    continue
                sock.close()  # closed by the server
                continue
            except BlockingIOError:
                pass
            except OSError:
                sock.close()
                continue
            try:
                sock.send(self.request[sent:sent + 1])
                still.append(sock)
            except BlockingIOError:
                still.append(sock)
            except OSError:
                sock.close()
        self.open = still

    def close(self) -> None:
        for sock in self.open:
            sock.close()


def test_hundreds_of_slow_connections_neither_multiply_threads_nor_stop_the_agent(workdir, run_agent):
    port = free_port()
    agent = run_agent(agent_config(workdir / "logs", workdir / "data", server=f'listen = "127.0.0.1:{port}"'))
    archive = workdir / "data" / "archive"
    write(workdir, 0, 100)
    wait_for(lambda: len(read_archive(archive)) == 100, message="the first lines")
    wait_for(lambda: poll(f"http://127.0.0.1:{port}/healthz")[0] == 200, message="the server")
    before = threads_of(agent.proc.pid)

    trickler = Trickler(port, 300)
    most, sent, written = before, 0, 100
    try:
        # Longer than the server's whole-request deadline (5 s): a per-byte timeout never ends them.
        deadline = time.monotonic() + 15
        while trickler.open and time.monotonic() < deadline:
            trickler.step(sent)
            sent += 1
            most = max(most, threads_of(agent.proc.pid))
            write(workdir, written, 10)
            written += 10
            time.sleep(0.2)
        assert most <= before + 5, f"{most} threads with 300 slow clients (before: {before})"
        assert trickler.open == [], f"{len(trickler.open)} slow connections still held"
    finally:
        trickler.close()
    assert agent.proc.poll() is None
    busy = [a for a in trickler.answers if a.startswith(b"HTTP/1.1 503")]
    timed_out = [a for a in trickler.answers if a.startswith(b"HTTP/1.1 408")]
    assert len(busy) >= 250 and timed_out, (len(busy), len(timed_out))
    code, body = get(f"http://127.0.0.1:{port}/healthz")  # a fresh client is served again
    assert (code, body) == (200, b'{"status":"ok"}')
    wait_for(lambda: len(read_archive(archive)) == written, message="every line written during the flood")
    counters = orjson.loads(get(f"http://127.0.0.1:{port}/status")[1])["counters"]["server_connections_dropped"]
    by_reason = {c["labels"]["reason"]: c["value"] for c in counters}
    assert by_reason["too_many"] >= 250 and by_reason["deadline"] >= 1
    assert agent.stop() == 0


def test_the_server_answers_odd_requests_and_survives_a_failing_route(caplog):
    from shipper.server import Server

    state = mock.Mock(side_effect=RuntimeError("a bug in a state function"))
    server = Server("127.0.0.1:0", state, max_connections=2, deadline=0.5)
    server.start()
    host, port = "127.0.0.1", int(server.address.rpartition(":")[2])

    def exchange(data: bytes, wait_close: bool = True) -> bytes:
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(data)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    try:
        with caplog.at_level(logging.ERROR, logger="shipper.server"):
            assert exchange(b"GET /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 500")
        assert "server: /healthz failed" in caplog.text
        assert exchange(b"GET /nope?x=1 HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
        assert exchange(b"POST /status HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
        assert exchange(b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400")
        head = exchange(b"HEAD /nope HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 404") and head.endswith(b"\r\n\r\n")  # no body
        assert exchange(b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000).startswith(b"HTTP/1.1 431")
        assert exchange(b"GET /healthz HTT").startswith(b"HTTP/1.1 408")  # the deadline, then closed
        # Two silent clients take both places: a third is told so at once, not queued.
        silent = [socket.create_connection((host, port), timeout=5) for _ in range(2)]
        time.sleep(0.1)
        try:
            assert exchange(b"").startswith(b"HTTP/1.1 503")  # answered and closed without a request
        finally:
            for sock in silent:
                sock.close()
        wait_for(lambda: exchange(b"GET /x HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404"), timeout=5,
                 message="served again once the places are free")
        assert server.thread.is_alive()
    finally:
        server.stop()
    assert not server.thread.is_alive()


def test_an_idle_server_does_not_wake_up():
    """No wake-up but the 10 s counter copy while no client is connected: select() without a timeout."""
    from shipper.server import Server

    server = Server("127.0.0.1:0", lambda: None)
    server.start()
    try:
        time.sleep(0.3)
        with open(f"/proc/self/task/{server.thread.native_id}/status") as handle:
            switches = next(int(line.split()[1]) for line in handle if line.startswith("voluntary_ctxt_switches"))
        time.sleep(1.0)
        with open(f"/proc/self/task/{server.thread.native_id}/status") as handle:
            later = next(int(line.split()[1]) for line in handle if line.startswith("voluntary_ctxt_switches"))
        assert later == switches
    finally:
        server.stop()


# ---------------------------------------------------------------- 17: who may connect

SERVER_CONFIG = """
[server]
{server}

[[inputs]]
type = "file"
paths = ["/var/log/app/*.log"]

[[outputs]]
type = "directory"
path = "/tmp/archive"
"""


def server_problems(server: str) -> list[str]:
    try:
        load_text(SERVER_CONFIG.format(server=server), "t.toml", {})
    except ConfigError as exc:
        return exc.problems
    return []


@pytest.mark.parametrize("listen", ["0.0.0.0:2020", "[::]:2020", "10.0.0.5:2020", "[fe80::1]:2020", "0:2020"])
def test_a_listen_address_other_machines_reach_is_refused_without_allow_remote(listen):
    problems = server_problems(f'listen = "{listen}"')
    assert len(problems) == 1 and problems[0].startswith("server.listen: ")
    assert "reachable from other machines" in problems[0] and "allow_remote = true" in problems[0]
    assert server_problems(f'listen = "{listen}"\nallow_remote = true') == []


@pytest.mark.parametrize("listen", ["127.0.0.1:2020", "127.0.0.2:2020", "[::1]:2020", "[::ffff:127.0.0.1]:2020",
                                    "localhost:2020", ""])
def test_loopback_addresses_are_accepted(listen):
    assert server_problems(f'listen = "{listen}"') == []


def test_a_host_name_counts_by_what_it_resolves_to():
    elsewhere = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 2020)),
                 (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.7", 2020))]
    with mock.patch("socket.getaddrinfo", return_value=elsewhere):
        problems = server_problems('listen = "status.example:2020"')
    assert len(problems) == 1 and "192.0.2.7" in problems[0] and problems[0].startswith("server.listen: ")
    with mock.patch("socket.getaddrinfo", side_effect=socket.gaierror(-2, "Name or service not known")):
        problems = server_problems('listen = "nowhere.invalid:2020"')
    assert len(problems) == 1 and "cannot resolve 'nowhere.invalid'" in problems[0]


def test_shipper_check_says_why_a_remote_listen_is_refused(tmp_path):
    path = tmp_path / "shipper.toml"
    path.write_text(SERVER_CONFIG.format(server='listen = "0.0.0.0:2020"'))
    result = subprocess.run([sys.executable, "-m", "shipper", "check", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "server.listen: '0.0.0.0:2020' is reachable from other machines" in result.stderr
    assert "allow_remote = true" in result.stderr
    path.write_text(SERVER_CONFIG.format(server='listen = "0.0.0.0:2020"\nallow_remote = true'))
    result = subprocess.run([sys.executable, "-m", "shipper", "check", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- 22: credentials in URLs

def test_endpoint_url_credentials_appear_in_neither_logs_nor_status(workdir, run_agent):
    password = "Pw-4f9c1e7d-unique"
    closed = free_port()  # nothing listens there: every upload fails with the URL in botocore's error
    port = free_port()
    output = f"""
[[outputs]]
type = "s3"
bucket = "secret-test"
endpoint_url = "http://shipper:{password}@127.0.0.1:{closed}"
region = "us-east-1"
upload_interval = "200ms"
"""
    config = agent_config(workdir / "logs", workdir / "data", output=output,
                          agent_extra='retry_initial_delay = "50ms"\nretry_max_delay = "200ms"',
                          server=f'listen = "127.0.0.1:{port}"\nunhealthy_after = "1s"')
    config = config.replace('shutdown_timeout = "10s"', 'shutdown_timeout = "1s"')
    env = {**CREDENTIALS, "AWS_EC2_METADATA_DISABLED": "true", **dict.fromkeys(PROXY_VARIABLES, "")}
    agent = run_agent(config, env=env)
    write(workdir, 0, 10)

    def failing():
        code, body = poll(f"http://127.0.0.1:{port}/status")
        document = orjson.loads(body) if code == 200 else {}
        output = (document.get("outputs") or [{}])[0]
        return output.get("problem") and "delivery failing" in output["problem"] and (body, output)

    body, output = wait_for(failing, timeout=30, message="the failing upload in /status")
    assert f"http://***@127.0.0.1:{closed}" in output["last_error"]
    assert password not in body.decode()
    assert password not in get(f"http://127.0.0.1:{port}/healthz")[1].decode()
    assert password not in get(f"http://127.0.0.1:{port}/metrics")[1].decode()
    agent.stop(timeout=30)
    log = agent.log()
    assert "***@127.0.0.1" in log and password not in log

    check = subprocess.run([sys.executable, "-m", "shipper", "check", "--probe", "-c", str(agent.config_path)],
                           capture_output=True, text=True, timeout=60, env={**agent.env})
    assert check.returncode == 1 and "probe failed" in check.stdout, check.stdout + check.stderr
    assert password not in check.stdout + check.stderr
    agent.config_path.write_text(config.replace("endpoint_url = \"http://", "endpoint_url = \"ftp://"))
    check = subprocess.run([sys.executable, "-m", "shipper", "check", "-c", str(agent.config_path)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 2 and "outputs[0].endpoint_url: 'ftp://***@127.0.0.1" in check.stderr
    assert password not in check.stdout + check.stderr


def test_redact_urls():
    from shipper.config import redact_urls

    assert redact_urls('Could not connect to "https://u:p@ss@h:1/b/k?x=a@b"') == 'Could not connect to "https://***@h:1/b/k?x=a@b"'
    assert redact_urls("http://h/path@x and mail a@b") == "http://h/path@x and mail a@b"
    assert redact_urls("no url") == "no url"
