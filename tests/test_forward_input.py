"""The forward and syslog inputs end to end: a real agent subprocess, real sockets, real senders
(fluent-logger, a msgpack client written here, the agent's own fluentd output), kill -9 (issue 20)."""

from __future__ import annotations

import gzip
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgpack
import pytest

from conftest import read_archive, wait_for

pytestmark = pytest.mark.timeout(180)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def config(data: Path, inputs: str, output: str | None = None, agent_extra: str = "") -> str:
    output = output or f'[[outputs]]\ntype = "directory"\npath = "{data}/archive"\nupload_interval = "200ms"\n'
    return f"""
[agent]
data_dir = "{data}"
flush_interval = "100ms"
checkpoint_interval = "100ms"
shutdown_timeout = "10s"
{agent_extra}
[cloud]
metadata = "off"
[server]
listen = ""
{inputs}
{output}"""


def forward_input(port: int, extra: str = "") -> str:
    return f'[[inputs]]\ntype = "forward"\nlisten = "127.0.0.1:{port}"\n{extra}\n'


def wait_listening(port: int, agent, timeout: float = 20.0) -> None:
    def up():
        assert agent.proc.poll() is None, agent.log()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False
    wait_for(up, timeout, message=f"the agent listening on {port}")


class Client:
    """A forward client written for these tests with msgpack: Forward chunks, waits for each ack."""

    def __init__(self, address, timeout: float = 10.0):
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.answers = msgpack.Unpacker(raw=False)

    def send(self, message: list) -> None:
        self.sock.sendall(msgpack.packb(message, use_bin_type=True))

    def chunk(self, tag: str, events: list, mode: str = "forward") -> str:
        chunk = uuid.uuid4().hex
        if mode == "forward":
            self.send([tag, [[t, r] for t, r in events], {"chunk": chunk}])
        elif mode == "packed":
            self.send([tag, b"".join(msgpack.packb([t, r]) for t, r in events), {"chunk": chunk, "size": len(events)}])
        elif mode == "compressed":
            entries = gzip.compress(b"".join(msgpack.packb([t, r]) for t, r in events))
            self.send([tag, entries, {"chunk": chunk, "compressed": "gzip", "size": len(events)}])
        else:  # Message, one event
            (t, r), = events
            self.send([tag, t, r, {"chunk": chunk}])
        return chunk

    def ack(self) -> str:
        while True:
            for answer in self.answers:
                return answer["ack"]
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed before the ack")
            self.answers.feed(data)

    def close(self) -> None:
        self.sock.close()


def event_time(seconds: int, nanos: int) -> msgpack.ExtType:
    return msgpack.ExtType(0, seconds.to_bytes(4, "big") + nanos.to_bytes(4, "big"))


def test_every_carrier_mode_and_docker_driver_messages_arrive_with_their_fields(run_agent, workdir):
    port = free_port()
    agent = run_agent(config(workdir / "data", forward_input(port, 'message_key = "log"')))
    wait_listening(port, agent)
    client = Client(("127.0.0.1", port))
    docker = {"container_id": "f" * 64, "container_name": "/web", "source": "stdout", "log": "GET / 200\n"}
    sent = [
        client.chunk("docker.web", [(event_time(1764669600, 123456000), docker)]),
        client.chunk("app", [(1764669601, {"n": 1, "time": "theirs", "labels": "x"})], mode="message"),
        client.chunk("app", [(1764669602.5, {"n": 2}), (1764669603, {"n": 3})], mode="packed"),
        client.chunk("app", [(1764669604, {"n": i}) for i in range(4, 104)], mode="compressed"),
    ]
    assert [client.ack() for _ in sent] == sent  # each acknowledged, in order
    client.close()
    records = wait_for(lambda: len(read_archive(workdir / "data" / "archive")) >= 104
                       and read_archive(workdir / "data" / "archive"), message="104 records")
    web = next(r for r in records if r["tag"] == "docker.web")
    assert web["message"] == "GET / 200" and web["container_id"] == "f" * 64 and web["container_name"] == "/web"
    assert web["fields"] == {"source": "stdout"}  # a sender's field never poses as the agent's
    assert web["time"] == "2025-12-02T10:00:00.123456Z" and web["source"] == "forward"
    first = next(r for r in records if r.get("n") == 1)
    assert first["fields"] == {"time": "theirs", "labels": "x"} and first["time"] == "2025-12-02T10:00:01.000000Z"
    assert sorted(r["n"] for r in records if r["tag"] == "app") == list(range(1, 104))
    assert agent.stop() == 0


def test_fluent_logger_sends_to_the_agent_over_tcp_and_the_unix_socket(run_agent, workdir):
    from fluent import sender

    port = free_port()
    path = workdir / "run" / "forward.sock"
    agent = run_agent(config(workdir / "data", forward_input(port, f'socket = "{path}"\nsocket_mode = "0620"')))
    wait_listening(port, agent)
    assert oct(path.stat().st_mode & 0o777) == "0o620"
    tcp = sender.FluentSender("py", host="127.0.0.1", port=port)
    unix = sender.FluentSender("py", host=f"unix://{path}")
    for i in range(50):
        assert tcp.emit("tcp", {"i": i, "msg": "ünïcode"}), tcp.last_error
        assert unix.emit("unix", {"i": i}), unix.last_error
    tcp.close()
    unix.close()
    records = wait_for(lambda: len(read_archive(workdir / "data" / "archive")) >= 100
                       and read_archive(workdir / "data" / "archive"), message="100 records")
    assert sorted(r["i"] for r in records if r["tag"] == "py.tcp") == list(range(50))
    assert sorted(r["i"] for r in records if r["tag"] == "py.unix") == list(range(50))
    assert {r["msg"] for r in records if r["tag"] == "py.tcp"} == {"ünïcode"}
    assert agent.stop() == 0


def test_malformed_and_oversized_messages_close_that_connection_only(run_agent, workdir):
    port = free_port()
    agent = run_agent(config(workdir / "data", forward_input(port, 'max_message_bytes = "4KiB"'),
                             agent_extra=""), )
    wait_listening(port, agent)
    for garbage in (msgpack.packb({"not": "a message"}), msgpack.packb(["tag", "x" * 10]),
                    msgpack.packb(["tag", [[1, "not a map"]]]), b"\xc1" * 10,
                    msgpack.packb(["big", [[1, {"x": "y" * 10_000}]], {"chunk": "c"}])):
        bad = Client(("127.0.0.1", port))
        bad.sock.sendall(garbage)
        with pytest.raises((ConnectionError, OSError)):
            bad.ack()
        bad.close()
    good = Client(("127.0.0.1", port))
    chunk = good.chunk("after", [(1764669600, {"ok": True})])
    assert good.ack() == chunk
    good.close()
    wait_for(lambda: any(r["tag"] == "after" for r in read_archive(workdir / "data" / "archive")),
             message="the good chunk after the bad ones")
    assert agent.proc.poll() is None
    assert agent.stop() == 0
    assert "closing the connection" in agent.log()


def test_kill_9_while_a_client_sends_with_acks_loses_nothing_acknowledged(run_agent, workdir):
    port = free_port()
    agent_config = config(workdir / "data", forward_input(port))
    agent = run_agent(agent_config)
    wait_listening(port, agent)
    acked: set[int] = set()
    client = Client(("127.0.0.1", port), timeout=5)
    n = 0
    deadline = time.monotonic() + 1.5
    try:
        while True:
            events = [(1764669600, {"n": n + i}) for i in range(200)]
            chunk = client.chunk("load", events)
            if time.monotonic() > deadline and agent.proc.poll() is None:
                agent.proc.send_signal(signal.SIGKILL)
            assert client.ack() == chunk
            acked.update(range(n, n + 200))
            n += 200
    except (ConnectionError, OSError):
        pass
    agent.proc.wait(10)
    assert len(acked) > 1000
    agent = run_agent(agent_config)
    wait_listening(port, agent)
    resent = Client(("127.0.0.1", port))  # the client sends again what was not acknowledged
    chunk = resent.chunk("load", [(1764669600, {"n": i}) for i in range(n, n + 200)])
    assert resent.ack() == chunk
    resent.close()
    wanted = acked | set(range(n, n + 200))
    wait_for(lambda: wanted <= {r["n"] for r in read_archive(workdir / "data" / "archive")},
             timeout=30, message="every acknowledged event after the restart")
    assert agent.stop() == 0


def test_a_full_journal_makes_the_sender_wait_and_loses_nothing(run_agent, workdir, make_forward_peer):
    port = free_port()
    peer = make_forward_peer()
    peer.set_down(True)  # the destination is down: nothing is confirmed, the journal fills
    output = f'[[outputs]]\ntype = "fluentd"\nhosts = ["127.0.0.1:{peer.port}"]\n'
    small = 'journal_max_bytes = "1MiB"\nmax_message_bytes = "256KiB"'
    agent = run_agent(config(workdir / "data", forward_input(port, small), output=output,
                             agent_extra='retry_initial_delay = "50ms"\nretry_max_delay = "200ms"'))
    wait_listening(port, agent)
    client = Client(("127.0.0.1", port), timeout=3)
    sent = 0
    with pytest.raises(TimeoutError):
        while True:  # until the journal is full: the ack does not come, the sender waits
            client.chunk("full", [(1764669600, {"n": sent + i, "pad": "p" * 200}) for i in range(100)])
            client.ack()
            sent += 100
            assert sent < 100_000
    journal = workdir / "data" / "journal" / "forward-forward"
    on_disk = sum(p.stat().st_size for p in journal.glob("*.seg"))
    assert 800_000 < on_disk <= 1024**2
    assert sent > 2000
    peer.set_down(False)  # the destination is back: the journal drains, the waiting chunk is acknowledged
    client.sock.settimeout(60)
    client.ack()
    sent += 100
    client.close()
    wait_for(lambda: len({r["n"] for r in peer.records()}) >= sent, timeout=60, message="everything at the peer")
    assert {r["n"] for r in peer.records()} == set(range(sent))
    assert agent.stop() == 0


def test_a_record_with_event_times_and_bytes_inside_is_acknowledged_and_kept(run_agent, workdir):
    # Fluent Bit nests EventTime in records it built; some senders pack bytes as msgpack bin.
    port = free_port()
    agent = run_agent(config(workdir / "data", forward_input(port)))
    wait_listening(port, agent)
    client = Client(("127.0.0.1", port))
    record = {"at": event_time(1764669600, 500_000_000), "raw": b"\xffbin\x00", "list": [event_time(1, 0)]}
    chunk = client.chunk("nested", [(event_time(1764669600, 0), record)])
    assert client.ack() == chunk  # the event is journaled: nothing in it stops the connection
    client.close()
    [kept] = wait_for(lambda: read_archive(workdir / "data" / "archive"), message="the record")
    assert kept["at"] == 1764669600.5 and kept["list"] == [1.0]
    assert kept["raw"] == "\ufffdbin\x00" and "parse_error" not in kept
    assert agent.stop() == 0


def test_a_slow_drip_an_event_larger_than_the_journal_and_a_huge_array_are_bounded(run_agent, workdir):
    port = free_port()
    extra = 'idle_timeout = "1s"\njournal_max_bytes = "2MiB"\nmax_message_bytes = "512KiB"'
    agent = run_agent(config(workdir / "data", forward_input(port, extra)))
    wait_listening(port, agent)
    # A sender streaming without pause, each read ending inside the next message, is not slow: the
    # clock of a message starts with its own first byte, not the first partial one of the stream.
    stream = Client(("127.0.0.1", port))
    pending = b""
    sent = 0
    began = time.monotonic()
    while time.monotonic() - began < 2.5:
        pending += msgpack.packb(["stream", 1764669600, {"i": sent}])
        sent += 1
        stream.sock.sendall(pending[:len(pending) - 3])  # always three bytes short of a boundary
        pending = pending[len(pending) - 3:]
        time.sleep(0.01)
    stream.sock.sendall(pending)
    chunk = stream.chunk("stream.end", [(1764669600, {"end": True})])
    assert stream.ack() == chunk  # the connection outlived idle_timeout more than twice
    stream.close()
    # A peer that drips a byte at a time never lets the idle clock run out, but a message must be
    # whole within idle_timeout of its first byte.
    drip = Client(("127.0.0.1", port))
    message = msgpack.packb(["drip", [[1764669600, {"x": "y" * 100}]], {"chunk": "d"}])
    started = time.monotonic()
    closed = False
    for byte in message[:-1]:
        try:
            drip.sock.sendall(bytes([byte]))
            time.sleep(0.2)
            if not drip.sock.recv(1, socket.MSG_DONTWAIT):
                closed = True
                break
        except BlockingIOError:
            continue
        except OSError:
            closed = True
            break
    assert closed and time.monotonic() - started < 5
    drip.close()
    # One event over half of journal_max_bytes could never be journaled (it came compressed: the
    # message itself was small): its connection is closed at once instead of waiting for room.
    big = Client(("127.0.0.1", port), timeout=5)
    big.chunk("big", [(1764669600, {"x": "y" * 1_200_000})], mode="compressed")
    with pytest.raises(ConnectionError):
        big.ack()
    big.close()
    # A Forward message of more events than a message may hold is refused by the decoder, and so is
    # a map with an array for a key (unhashable: no traceback, a count).
    for events in ([(1, {})] * 100_001, None):
        hostile = Client(("127.0.0.1", port), timeout=5)
        if events:
            hostile.chunk("many", events)
        else:
            hostile.sock.sendall(b"\x94\xa3tag\x01\x81\x91\x01\x01\x81\xa5chunk\xa1c")  # {[1]: 1} as the record
        with pytest.raises(ConnectionError):
            hostile.ack()
        hostile.close()
    good = Client(("127.0.0.1", port))
    chunk = good.chunk("after", [(1764669600, {"ok": True})])
    assert good.ack() == chunk
    good.close()
    wait_for(lambda: any(r["tag"] == "after" for r in read_archive(workdir / "data" / "archive")),
             message="the good chunk after the bounded ones")
    assert agent.stop() == 0
    log = agent.log()
    assert "not whole after idle_timeout" in log and "over the journal's frame limit" in log
    assert "unhashable" in log and "failed; the connection is closed" not in log  # counted, no traceback
    records = read_archive(workdir / "data" / "archive")
    assert not any(r["tag"] in ("drip", "big", "many", "tag") for r in records)
    assert sorted(r["i"] for r in records if r["tag"] == "stream") == list(range(sent))


def test_a_reload_whose_address_is_taken_goes_back_and_the_old_listener_still_serves(run_agent, workdir):
    port, taken = free_port(), socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    agent = run_agent(config(workdir / "data", forward_input(port)))
    wait_listening(port, agent)
    # The new configuration's first input binds (and journals) before the second finds its address
    # in use: what the first took must be let go, or the previous configuration cannot start again.
    agent.config_path.write_text(config(workdir / "data", forward_input(port, 'id = "first"')
                                        + forward_input(taken.getsockname()[1], 'id = "second"')))
    agent.send(signal.SIGHUP)
    wait_for(lambda: "going back to the previous configuration" in agent.log(), message="the reload refused")
    time.sleep(0.5)
    assert agent.proc.poll() is None, agent.log()
    wait_listening(port, agent)
    client = Client(("127.0.0.1", port))
    chunk = client.chunk("after.reload", [(1764669600, {"ok": 1})])
    assert client.ack() == chunk
    client.close()
    wait_for(lambda: any(r["tag"] == "after.reload" for r in read_archive(workdir / "data" / "archive")),
             message="served by the previous configuration again")
    assert agent.stop() == 0
    taken.close()


def _agent_pair(run_agent, workdir, tmp_path, sender_extra: str, receiver_extra: str):
    """Agent A tails a file and sends with its fluentd output to agent B's forward input."""
    port = free_port()
    receiver_dir = tmp_path / "receiver"
    receiver_dir.mkdir()
    from conftest import Agent
    receiver = Agent(receiver_dir, config(receiver_dir / "data", forward_input(port, receiver_extra))).start()
    wait_listening(port, receiver)
    (workdir / "logs" / "app.log").write_text("".join(f"line {i}\n" for i in range(100)))
    output = f'[[outputs]]\ntype = "fluentd"\nhosts = ["127.0.0.1:{port}"]\n{sender_extra}\n'
    sender_config = config(workdir / "data", f'[[inputs]]\ntype = "file"\ntag = "app"\npaths = ["{workdir}/logs/*.log"]\n'
                           'poll_interval = "50ms"\n', output=output,
                           agent_extra='retry_initial_delay = "50ms"\nretry_max_delay = "200ms"')
    return receiver, run_agent(sender_config), receiver_dir


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_the_agents_own_fluentd_output_with_shared_key_and_tls(run_agent, workdir, tmp_path, tls):
    receiver_extra, sender_extra = 'shared_key = "s3cret"', 'shared_key = "s3cret"'
    if tls:
        import trustme
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        receiver_extra += f'\ntls_cert = "{tmp_path}/server.pem"\ntls_key = "{tmp_path}/server.pem"'
        sender_extra += f'\ntls = true\ntls_ca = "{tmp_path}/ca.pem"'
    receiver, sender, receiver_dir = _agent_pair(run_agent, workdir, tmp_path, sender_extra, receiver_extra)
    try:
        records = wait_for(lambda: len(read_archive(receiver_dir / "data" / "archive")) >= 100
                           and read_archive(receiver_dir / "data" / "archive"), timeout=30, message="100 records")
        assert sorted(r["message"] for r in records) == sorted(f"line {i}" for i in range(100))
        assert sender.stop() == 0 and receiver.stop() == 0
    finally:
        receiver.ensure_stopped()


def test_a_wrong_shared_key_is_refused_and_nothing_arrives(run_agent, workdir, tmp_path):
    receiver, sender, receiver_dir = _agent_pair(run_agent, workdir, tmp_path, 'shared_key = "wrong"',
                                                 'shared_key = "right"')
    try:
        wait_for(lambda: "refused the handshake" in sender.log(), timeout=20, message="the refusal")
        assert read_archive(receiver_dir / "data" / "archive") == []
        assert "shared_key mismatch" in receiver.log()
        sender.kill()
        assert receiver.stop() == 0
    finally:
        receiver.ensure_stopped()


# ---------------------------------------------------------------- syslog

SAMPLES = [  # as rsyslog, syslog-ng, systemd's journal forwarding and glibc's syslog(3) send them
    b'<34>1 2026-12-02T10:00:00.123456+01:00 web-1 sshd 4242 AUTH [origin ip="10.0.0.9"][meta seq="7"] '
    b"Failed password for root",
    b"<86>Dec  2 10:00:01 web-1 sudo[991]: pam_unix(sudo:session): session opened for user root",
    b"<13>Dec  2 10:00:02 myapp: no host, as glibc writes to /dev/log",
    b"<165>1 2026-12-02T09:00:03Z - - - - - BOM-less message with nil fields",
    b"not syslog at all",
    b"<3>1 2003-14-11T22:14:15Z h a - - - an impossible month",
]


def test_syslog_over_udp_tcp_and_a_unix_datagram_socket(run_agent, workdir):
    port = free_port()
    path = workdir / "run" / "syslog.sock"
    agent = run_agent(config(workdir / "data", f'[[inputs]]\ntype = "syslog"\ntcp = "127.0.0.1:{port}"\n'
                                               f'udp = "127.0.0.1:{port}"\nsocket = "{path}"\n'))
    wait_listening(port, agent)
    tcp = socket.create_connection(("127.0.0.1", port))
    tcp.sendall(b"".join(b"%d %s" % (len(s), s) for s in SAMPLES[:2]) + b"\n".join(SAMPLES[2:]) + b"\n")
    tcp.close()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for sample in SAMPLES:
        udp.sendto(sample, ("127.0.0.1", port))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    unix.sendto(SAMPLES[1], str(path))
    subprocess.run(["logger", "-u", str(path), "-t", "logger-test", "from util-linux logger"], check=False)
    udp.sendto(SAMPLES[1], ("127.0.0.1", port))  # after the impossible date: the UDP reader still reads
    records = wait_for(lambda: len(read_archive(workdir / "data" / "archive")) >= 14
                       and read_archive(workdir / "data" / "archive"), message="14 syslog records")
    sshd = [r for r in records if r.get("app_name") == "sshd"]
    assert len(sshd) == 2
    assert sshd[0]["time"] == "2026-12-02T09:00:00.123456Z" and sshd[0]["severity"] == "crit"
    assert sshd[0]["facility"] == "auth" and sshd[0]["pid"] == 4242 and sshd[0]["msgid"] == "AUTH"
    assert sshd[0]["structured_data"] == {"origin": {"ip": "10.0.0.9"}, "meta": {"seq": "7"}}
    assert sshd[0]["fields"] == {"host": "web-1"} and sshd[0]["message"] == "Failed password for root"
    sudo = [r for r in records if r.get("app_name") == "sudo"]
    assert len(sudo) == 4 and sudo[0]["pid"] == 991 and sudo[0]["facility"] == "authpriv"
    assert sum(r.get("parse_error") is True and r["message"] == "not syslog at all" for r in records) == 2
    assert sum(r.get("parse_error") is True and "impossible month" in r["message"] for r in records) == 2
    if any(r.get("app_name") == "logger-test" for r in records):
        assert next(r for r in records if r.get("app_name") == "logger-test")["message"] == "from util-linux logger"
    assert agent.stop() == 0


# ---------------------------------------------------------------- shipper check

def check(workdir: Path, text: str) -> subprocess.CompletedProcess:
    path = workdir / "check.toml"
    path.write_text(text)
    return subprocess.run([sys.executable, "-m", "shipper", "check", "-c", str(path)], capture_output=True,
                          text=True, timeout=60)


def test_check_refuses_remote_listeners_bad_socket_directories_and_warns_of_addresses_in_use(workdir):
    data = workdir / "data"
    result = check(workdir, config(data, '[[inputs]]\ntype = "forward"\nlisten = "0.0.0.0:24224"\n'))
    assert result.returncode != 0 and "allow_remote = true" in result.stderr + result.stdout
    assert check(workdir, config(data, '[[inputs]]\ntype = "forward"\nlisten = "0.0.0.0:24224"\n'
                                       'allow_remote = true\n')).returncode == 0
    open_dir = workdir / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    result = check(workdir, config(data, f'[[inputs]]\ntype = "forward"\nlisten = ""\nsocket = "{open_dir}/f.sock"\n'))
    assert result.returncode != 0 and "writable by everyone" in result.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = check(workdir, config(data, forward_input(port)))
        assert result.returncode == 0 and "in use" in result.stderr
    result = check(workdir, config(data, forward_input(free_port(), 'tls_cert = "/x.pem"')))
    assert result.returncode != 0 and "tls_key: required" in result.stderr + result.stdout


def test_an_address_in_use_stops_the_start_with_its_key(run_agent, workdir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        agent = run_agent(config(workdir / "data", forward_input(busy.getsockname()[1])))
        assert agent.proc.wait(30) != 0
    assert "inputs[0].listen: cannot listen on" in agent.log() and "in use" in agent.log()
