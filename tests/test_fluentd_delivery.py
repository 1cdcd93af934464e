"""The fluentd output against receiver settings that broke it (issue 13): deny_keepalive,
chunk_size_limit; balancing over several hosts; event times; what a stop past its deadline says.

End to end: the agent subprocess -> ForwardPeers on loopback behaving as Fluentd's in_forward
with those settings (tests/forward_peer.py).
"""

from __future__ import annotations

import collections
import time
import urllib.request
from pathlib import Path

from aws import free_port
from conftest import FAST_RETRIES, agent_config, checkpoint_offset, seq_lines, wait_for
from prometheus_client.parser import text_string_to_metric_families

from shipper.record import TIME, Batch, Envelope


def start(run_agent, workdir: Path, hosts: str, extra: str = "", port: int | None = None,
          shutdown_timeout: str = "10s", **input_options):
    output = f'\n[[outputs]]\ntype = "fluentd"\nhosts = {hosts}\n{extra}\n'
    server = f'listen = "127.0.0.1:{port}"' if port else 'listen = ""'
    config = agent_config(workdir / "logs", workdir / "data", output=output, agent_extra=FAST_RETRIES,
                          server=server, **input_options)
    return run_agent(config.replace('shutdown_timeout = "10s"', f'shutdown_timeout = "{shutdown_timeout}"'))


def addresses(*peers) -> str:
    return "[" + ", ".join(f'"{peer.address}"' for peer in peers) + "]"


def write(workdir: Path, start_at: int, count: int, pad: str = "x" * 40) -> None:
    with open(workdir / "logs" / "app.log", "a") as handle:
        handle.write(seq_lines(start_at, count, pad))


def seq_counts(*peers) -> collections.Counter:
    return collections.Counter(int(e.record["message"][4:11]) for peer in peers for e in peer.events())


def delivered(workdir: Path, count: int, agent, *peers) -> bool:
    """Every line arrived and the checkpoint reached the end of the file (it moves on acks only)."""
    if agent.proc.poll() is not None:
        raise AssertionError(f"the agent exited ({agent.proc.returncode}):\n{agent.log()[-3000:]}")
    return (set(seq_counts(*peers)) == set(range(count))
            and checkpoint_offset(workdir) == (workdir / "logs" / "app.log").stat().st_size)


def counter(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == f"shipper_{name}_total")


# ------------------------------------------------------------------ the peer's receiver settings

def test_the_peer_behaves_as_in_forward_with_deny_keepalive_and_chunk_size_limit(make_forward_peer):
    import socket

    import msgpack

    def chunk(chunk_id: str, pad: int) -> bytes:
        return msgpack.packb(["t", [[1, {"message": "x" * pad}]], {"chunk": chunk_id, "size": 1}])

    def answers(sock) -> list:
        sock.settimeout(5)
        unpacker, got = msgpack.Unpacker(), []
        while data := sock.recv(65536):
            unpacker.feed(data)
            got.extend(unpacker)
        return got

    # deny_keepalive: what one read completed is answered, then the connection is closed.
    peer = make_forward_peer(deny_keepalive=True)
    with socket.create_connection((peer.host, peer.port)) as sock:
        sock.sendall(chunk("a", 10) + chunk("b", 10))
        assert answers(sock) == [{"ack": "a"}, {"ack": "b"}]
    # chunk_size_limit: a bigger chunk is dropped unanswered, the connection kept for the next.
    peer = make_forward_peer(chunk_size_limit=1000)
    with socket.create_connection((peer.host, peer.port)) as sock:
        sock.sendall(chunk("big", 2000))
        peer.wait_for(lambda p: p.oversized() == ["big"], message="the big chunk dropped")
        sock.sendall(chunk("small", 10))
        sock.shutdown(socket.SHUT_WR)
        assert answers(sock) == [{"ack": "small"}]
    assert [m.chunk for m in peer.messages()] == ["small"]


# ------------------------------------------------------------------ item 2: deny_keepalive

def test_a_receiver_that_closes_after_each_chunk_gets_every_line_with_few_duplicates(run_agent, workdir,
                                                                                       make_forward_peer):
    """in_forward deny_keepalive: the agent pipelines chunks of ~1 MB, the receiver answers the first
    and closes while the agent still sends. The acks already on the socket are read before anything
    counts as lost; after two such connections the agent sends one chunk per connection. (Before:
    the first chunk went again on every connection, for ever: a storm of duplicates, no progress.)"""
    peer = make_forward_peer(deny_keepalive=True)
    port = free_port()
    write(workdir, 0, 20_000, pad="x" * 400)  # 8 MB
    agent = start(run_agent, workdir, addresses(peer), port=port)
    wait_for(lambda: delivered(workdir, 20_000, agent, peer), timeout=90, message="every line, checkpoint at the end")
    counts = seq_counts(peer)
    duplicates = sum(n - 1 for n in counts.values())
    per_chunk = max(m.entries for m in peer.messages())
    assert duplicates <= 3 * per_chunk, f"{duplicates} duplicate events ({per_chunk} per chunk)"
    assert "does not keep connections" in agent.log()
    assert counter(port, "chunks_resent") <= 2 * 16  # the chunks in flight on the first two connections
    assert agent.stop() == 0


def test_a_helo_that_says_keepalive_false_gets_one_chunk_per_connection_at_once(run_agent, workdir,
                                                                                 make_forward_peer):
    peer = make_forward_peer(deny_keepalive=True, shared_key="s3cret")
    port = free_port()
    write(workdir, 0, 5000)
    agent = start(run_agent, workdir, addresses(peer), extra='shared_key = "s3cret"', port=port, read_bytes="16KiB")
    wait_for(lambda: delivered(workdir, 5000, agent, peer), timeout=60, message="every line, checkpoint at the end")
    assert max(seq_counts(peer).values()) == 1
    assert counter(port, "chunks_resent") == 0
    assert "its HELO says keepalive: false" in agent.log()
    assert peer.connections == len(peer.messages())  # one chunk per connection
    assert agent.stop() == 0


# ------------------------------------------------------------------ item 3: chunk_size_limit

def test_chunks_fit_a_receivers_chunk_size_limit_of_1m(run_agent, workdir, make_forward_peer):
    """in_forward chunk_size_limit 1m drops bigger chunks unanswered. Batches of 1 MiB of lines
    (1.5 MB and more encoded) are cut to max_chunk_bytes (default under 1 MiB) and confirmed when
    every piece is acknowledged."""
    peer = make_forward_peer(chunk_size_limit=1024 * 1024)
    write(workdir, 0, 100_000)
    agent = start(run_agent, workdir, addresses(peer), extra='ack_timeout = "2s"')
    wait_for(lambda: delivered(workdir, 100_000, agent, peer), timeout=90, message="every line, checkpoint at the end")
    assert peer.oversized() == []
    assert max(seq_counts(peer).values()) == 1
    assert max(m.nbytes for m in peer.messages()) <= 1024 * 1024 - 64 * 1024
    assert agent.stop() == 0


def test_a_chunk_dropped_twice_is_split_before_it_goes_again(run_agent, workdir, make_forward_peer):
    """A receiver's limit below max_chunk_bytes: the chunks it drops unanswered go again in halves
    (said once in the log, counted as chunks_split) until they fit; nothing is lost."""
    peer = make_forward_peer(chunk_size_limit=100 * 1024)
    port = free_port()
    write(workdir, 0, 30_000)
    agent = start(run_agent, workdir, addresses(peer), extra='ack_timeout = "1s"', port=port)
    wait_for(lambda: delivered(workdir, 30_000, agent, peer), timeout=120, message="every line, checkpoint at the end")
    assert peer.oversized()
    assert agent.log().count("goes again in two halves") == 1
    assert counter(port, "chunks_split") >= 1 and counter(port, "chunks_resent") >= 1
    assert agent.stop() == 0


# ------------------------------------------------------------------ item 5: balancing

def test_round_robin_splits_by_weight_and_loses_nothing_when_a_host_dies(run_agent, workdir, make_forward_peer):
    light, heavy = make_forward_peer(), make_forward_peer()
    hosts = f'[{{host = "{light.address}", weight = 1}}, {{host = "{heavy.address}", weight = 2}}]'
    agent = start(run_agent, workdir, hosts, extra='balance = "round_robin"', read_bytes="8KiB")
    write(workdir, 0, 20_000)
    wait_for(lambda: delivered(workdir, 20_000, agent, light, heavy), timeout=60, message="every line")
    chunks = [len(light.messages()), len(heavy.messages())]
    assert 1.5 <= chunks[1] / chunks[0] <= 2.6, chunks  # weights 1:2, by chunks
    heavy.stop()  # killed mid-stream: its share goes to the other
    write(workdir, 20_000, 10_000)
    wait_for(lambda: delivered(workdir, 30_000, agent, light, heavy), timeout=60, message="every line after the kill")
    assert "is down" in agent.log()
    assert agent.stop() == 0


def test_a_standby_is_used_only_while_the_other_hosts_are_down_and_failback_is_logged(run_agent, workdir,
                                                                                     make_forward_peer):
    main, standby = make_forward_peer(), make_forward_peer()
    hosts = f'["{main.address}", {{host = "{standby.address}", standby = true}}]'
    agent = start(run_agent, workdir, hosts, extra='failback_interval = "500ms"')
    write(workdir, 0, 500)
    wait_for(lambda: delivered(workdir, 500, agent, main, standby), message="lines at the first host")
    assert standby.messages() == []
    main.set_down(True)
    write(workdir, 500, 500)
    wait_for(lambda: delivered(workdir, 1000, agent, main, standby), message="lines at the standby")
    assert set(seq_counts(standby)) >= set(range(500, 1000)) - set(seq_counts(main))
    main.set_down(False)
    time.sleep(1.0)  # past failback_interval
    write(workdir, 1000, 500)
    wait_for(lambda: set(range(1000, 1500)) <= set(seq_counts(main)), message="lines at the first host again")
    assert "failing back to " + main.address in agent.log()
    assert agent.stop() == 0


def test_check_refuses_a_bad_weight_and_hosts_that_are_all_standbys(workdir, forward_peer):
    import subprocess
    import sys

    for hosts, error in (
            (f'[{{host = "{forward_peer.address}", weight = 0}}]', "outputs[0].hosts[0].weight: expected an integer"),
            (f'[{{host = "{forward_peer.address}", standby = true}}]', "outputs[0].hosts: every host is a standby")):
        output = f'\n[[outputs]]\ntype = "fluentd"\nhosts = {hosts}\n'
        path = workdir / "check.toml"
        path.write_text(agent_config(workdir / "logs", workdir / "data", output=output))
        result = subprocess.run([sys.executable, "-m", "shipper", "check", "-c", str(path)], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2 and error in result.stderr, result.stderr


# ------------------------------------------------------------------ item 6: event times

def test_events_without_a_time_of_their_own_get_strictly_increasing_times_in_line_order():
    from forward_peer import _packed_entries

    from shipper.outputs.forward_protocol import encode_entries

    envelope = Envelope({"host": "h"}, {"app": "web"})
    lines = [f"line {i}" for i in range(2000)]
    read_time = 1_790_000_001 - 2**-20  # 999,999,046 ns into its second
    plain = Batch("app", "/var/log/a.log", read_time, blob=("\n".join(lines) + "\n").encode())
    entries = _packed_entries(encode_entries(plain, envelope))
    assert [record["message"] for _, record in entries] == lines
    times = [(t.seconds, t.nanoseconds) for t, _ in entries]
    assert times[0] == (1_790_000_000, 999_999_046) and times[-1] == (1_790_000_001, 1045)  # across a second
    assert all(a < b for a, b in zip(times, times[1:]))
    # Cut into runs that fit, the same bytes in the same order.
    from shipper.outputs.forward_protocol import entry_runs
    runs = entry_runs(plain, envelope, 4096)
    assert len(runs) > 1 and all(len(run) <= 4096 for run, _ in runs)
    assert b"".join(run for run, _ in runs) == encode_entries(plain, envelope)
    assert sum(count for _, count in runs) == 2000
    # A parsed time is the event's; the others: the read time and their place in the batch.
    general = Batch("app", None, 1000.0, messages=["a", "b", "c"],
                    fields=[None, {TIME: "2026-11-29T13:17:18.250000Z"}, {"k": 1}])
    times = [(t.seconds, t.nanoseconds) for t, _ in _packed_entries(encode_entries(general, envelope))]
    assert times == [(1000, 0), (1795958238, 250_000_000), (1000, 2)]


# ------------------------------------------------------------------ item 7: the stop past its deadline

def test_a_stop_past_the_deadline_says_so_once_with_counts(run_agent, workdir, forward_peer):
    forward_peer.set_down(True)
    agent = start(run_agent, workdir, addresses(forward_peer), shutdown_timeout="1s", read_bytes="4KiB")
    write(workdir, 0, 3000)  # ~40 batches
    wait_for(lambda: "no fluentd host reachable" in agent.log(), message="the outage noticed")
    assert agent.stop(timeout=30) == 1
    log = agent.log()
    assert log.count("shutdown deadline reached with undelivered records") == 1, log[-3000:]
    assert "batches unconfirmed" in log


class Bouncer:
    """A TCP listener that accepts and closes at once (a load balancer in front of dead receivers),
    or, with ``after_bytes``, reads that many bytes and then closes without an answer (Fluent Bit
    closing on a message over buffer_max_size)."""

    def __init__(self, after_bytes: int = 0):
        import socket
        import threading

        self.after_bytes = after_bytes
        self.accepted = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.settimeout(2)
                got = 0
                try:
                    while got < self.after_bytes:
                        data = conn.recv(65536)
                        if not data:
                            break
                        got += len(data)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


def test_a_host_that_takes_the_connection_and_closes_it_is_passed_over(run_agent, workdir, make_forward_peer):
    bouncer, good = Bouncer(), make_forward_peer()
    try:
        write(workdir, 0, 2000)
        started = time.monotonic()
        agent = start(run_agent, workdir, f'["{bouncer.address}", "{good.address}"]')
        wait_for(lambda: delivered(workdir, 2000, agent, good), 20, message="every line at the second host")
        # Passed over for its backoff (full jitter up to retry_max_delay, 500 ms here: ~4 tries a second
        # at most once the backoff is at its cap), not fed again at once (thousands a second).
        assert bouncer.accepted <= 5 + 6 * (time.monotonic() - started), bouncer.accepted
    finally:
        bouncer.close()


def test_a_receiver_that_closes_on_a_big_chunk_gets_it_split(run_agent, workdir):
    bouncer = Bouncer(after_bytes=1)  # closes on every first chunk, answered or not: nothing is acked
    try:
        write(workdir, 0, 3000)
        agent = start(run_agent, workdir, f'["{bouncer.address}"]', extra='max_chunk_bytes = "256KiB"')
        wait_for(lambda: "in two halves" in agent.log(), 20, message="the unanswered chunk split")
    finally:
        bouncer.close()
