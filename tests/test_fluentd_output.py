"""The fluentd output end to end: the agent subprocess -> a forward-protocol peer on loopback."""

from __future__ import annotations

import collections
import subprocess
import sys
import time
from pathlib import Path

from conftest import FAST_RETRIES, agent_config, checkpoint_offset, seq_lines, wait_for


def fluentd_output(*peers, extra: str = "") -> str:
    hosts = ", ".join(f'"{peer.address}"' for peer in peers)
    return f"""
[[outputs]]
type = "fluentd"
hosts = [{hosts}]
tag_prefix = "shipper."
{extra}
"""


def start(run_agent, workdir: Path, *peers, extra: str = "", shutdown_timeout: str = "10s", **options):
    config = agent_config(workdir / "logs", workdir / "data", output=fluentd_output(*peers, extra=extra),
                          agent_extra=FAST_RETRIES, **options)
    return run_agent(config.replace('shutdown_timeout = "10s"', f'shutdown_timeout = "{shutdown_timeout}"'))


def write(workdir: Path, start: int, count: int, name: str = "app.log") -> None:
    with open(workdir / "logs" / name, "a") as handle:
        handle.write(seq_lines(start, count))


def seq_counts(*peers) -> collections.Counter:
    return collections.Counter(int(e.record["message"][4:11]) for peer in peers for e in peer.events()
                               if e.record.get("message", "").startswith("seq="))


def all_arrived(count: int, *peers) -> bool:
    return set(seq_counts(*peers)) == set(range(count))


def test_lines_arrive_once_as_acknowledged_forward_chunks(run_agent, workdir, forward_peer):
    write(workdir, 0, 5000)
    agent = start(run_agent, workdir, forward_peer)
    wait_for(lambda: all_arrived(5000, forward_peer), message="5,000 events")
    assert agent.stop() == 0
    assert max(seq_counts(forward_peer).values()) == 1
    events = forward_peer.events()
    assert {e.tag for e in events} == {"shipper.app"}
    assert all(e.nanos is not None for e in events) and any(e.nanos for e in events)  # EventTime, ns
    record = events[0].record
    assert set(record) == {"host", "source", "message"} and record["source"].endswith("app.log")
    messages = forward_peer.messages()
    assert {m.mode for m in messages} == {"Forward"}
    assert all(m.chunk and m.size == m.entries for m in messages)
    assert len({m.chunk for m in messages}) == len(messages)
    assert len(forward_peer.acks()) == len(messages)


def test_an_outage_of_the_peer_delays_but_loses_nothing(run_agent, workdir, forward_peer):
    forward_peer.set_down(True)
    agent = start(run_agent, workdir, forward_peer)
    write(workdir, 0, 2000)
    wait_for(lambda: "no fluentd host reachable" in agent.log(), message="the outage logged")
    forward_peer.set_down(False)
    write(workdir, 2000, 1000)
    wait_for(lambda: all_arrived(3000, forward_peer), message="every line after the outage")
    assert max(seq_counts(forward_peer).values()) == 1
    assert "delivering to" in agent.log()
    assert agent.stop() == 0


def test_lost_acks_and_a_connection_closed_mid_batch_are_resent(run_agent, workdir, forward_peer):
    forward_peer.drop_acks(2)
    agent = start(run_agent, workdir, forward_peer, extra='ack_timeout = "1s"', read_bytes="64KiB")
    write(workdir, 0, 3000)
    wait_for(lambda: "no ack within ack_timeout" in agent.log(), message="the overdue acks noticed")
    # A resent chunk keeps its id: it is acknowledged this time.
    wait_for(lambda: all_arrived(3000, forward_peer) and set(forward_peer.dropped_acks()) <= set(forward_peer.acks()),
             message="every line despite lost acks, the resent chunks acknowledged")
    forward_peer.close_mid_batch(1)
    write(workdir, 3000, 1000)
    wait_for(lambda: all_arrived(4000, forward_peer), message="every line despite a cut connection")
    assert agent.stop() == 0
    counts = seq_counts(forward_peer)
    duplicates = sum(n - 1 for n in counts.values())
    assert 0 < duplicates <= 16 * 1300  # at most the chunks in flight (max_in_flight of 64 KiB reads) came twice


def test_kill_9_with_unacknowledged_chunks_then_restart(run_agent, workdir, forward_peer):
    forward_peer.drop_acks(None)  # the peer records everything but confirms nothing
    agent = start(run_agent, workdir, forward_peer)
    write(workdir, 0, 2000)
    wait_for(lambda: all_arrived(2000, forward_peer), message="events received but not acknowledged")
    agent.kill()
    forward_peer.drop_acks(0)
    write(workdir, 2000, 500)
    again = start(run_agent, workdir, forward_peer)
    expected = collections.Counter({n: 2 if n < 2000 else 1 for n in range(2500)})
    # Nothing was acknowledged, so the checkpoint stayed at 0: the first 2,000 come exactly twice.
    wait_for(lambda: seq_counts(forward_peer) == expected, message="every line after kill -9, bounded repeats")
    assert again.stop() == 0


def test_failover_to_the_second_host_and_back_to_the_first(run_agent, workdir, make_forward_peer):
    first, second = make_forward_peer(), make_forward_peer()
    first.set_down(True)
    agent = start(run_agent, workdir, first, second, extra='failback_interval = "1s"')
    write(workdir, 0, 500)
    wait_for(lambda: all_arrived(500, second), message="lines on the second host")
    assert "failover" in agent.log()
    first.set_down(False)
    time.sleep(1.5)  # past failback_interval: the next lines go to the first host again
    write(workdir, 500, 500)
    wait_for(lambda: all_arrived(1000, first, second), message="every line")
    assert set(seq_counts(first)) == set(range(500, 1000))
    assert agent.stop() == 0


def test_tls_with_a_certificate_made_in_the_test(run_agent, workdir, make_forward_peer, forward_tls):
    server_context, ca_path = forward_tls
    peer = make_forward_peer(tls=server_context)
    agent = start(run_agent, workdir, peer, extra=f'tls = true\ntls_ca = "{ca_path}"')
    write(workdir, 0, 300)
    wait_for(lambda: all_arrived(300, peer), message="lines over TLS")
    assert agent.stop() == 0
    assert peer.tls_handshakes >= 1


def test_tls_refuses_a_server_it_cannot_verify(run_agent, workdir, make_forward_peer, forward_tls):
    server_context, _ = forward_tls
    peer = make_forward_peer(tls=server_context)
    # The system's CAs do not know the test's CA.
    agent = start(run_agent, workdir, peer, extra="tls = true", shutdown_timeout="1s")
    write(workdir, 0, 10)
    wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in agent.log(), message="the verification failure logged")
    assert peer.events() == []
    assert agent.stop(timeout=30) == 1  # undelivered: read again on the next start


def test_shared_key_handshake_with_a_user(run_agent, workdir, make_forward_peer):
    peer = make_forward_peer(shared_key="s3cret", users={"alice": "pw"})
    agent = start(run_agent, workdir, peer, extra='shared_key = "s3cret"\nusername = "alice"\npassword = "pw"\n'
                                                  'compression = "gzip"')
    write(workdir, 0, 300)
    wait_for(lambda: all_arrived(300, peer), message="lines after the handshake")
    assert agent.stop() == 0
    assert peer.handshakes and all(h.ok for h in peer.handshakes)
    assert {m.mode for m in peer.messages()} == {"CompressedPackedForward"}


def test_a_wrong_shared_key_is_reported_and_nothing_is_sent(run_agent, workdir, make_forward_peer):
    peer = make_forward_peer(shared_key="s3cret")
    agent = start(run_agent, workdir, peer, extra='shared_key = "wrong"', shutdown_timeout="1s")
    write(workdir, 0, 10)
    wait_for(lambda: "shared_key mismatch" in agent.log(), message="the refusal logged")
    assert peer.events() == [] and not any(h.ok for h in peer.handshakes)
    assert agent.stop(timeout=30) == 1


def test_without_acks_chunks_carry_no_chunk_id(run_agent, workdir, forward_peer):
    agent = start(run_agent, workdir, forward_peer, extra="require_ack = false")
    write(workdir, 0, 200)
    wait_for(lambda: all_arrived(200, forward_peer), message="lines")
    assert agent.stop() == 0
    assert all(m.chunk is None for m in forward_peer.messages()) and forward_peer.acks() == []


def test_check_rejects_bad_hosts_offline(workdir, forward_peer):
    output = fluentd_output(forward_peer).replace(forward_peer.address, "host:99999") + 'username = "u"\n'
    path = workdir / "check.toml"
    path.write_text(agent_config(workdir / "logs", workdir / "data", output=output))
    result = subprocess.run([sys.executable, "-m", "shipper", "check", "-c", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "outputs[0].hosts: 'host:99999' has an invalid port" in result.stderr
    assert "outputs[0].username: the user login is part of the shared_key handshake" in result.stderr


def test_no_more_than_max_in_flight_chunks_wait_for_acks(run_agent, workdir, forward_peer):
    forward_peer.ack_delay(0.1)
    agent = start(run_agent, workdir, forward_peer, extra="max_in_flight = 2", read_bytes="16KiB")
    write(workdir, 0, 3000)
    most_unacked, deadline = 0, time.monotonic() + 30
    while not all_arrived(3000, forward_peer):
        assert time.monotonic() < deadline, "not every line arrived within 30 s"
        most_unacked = max(most_unacked, len(forward_peer.messages()) - len(forward_peer.acks()))
        time.sleep(0.01)
    assert agent.stop() == 0
    assert 1 <= most_unacked <= 2
    assert "delivery failed" not in agent.log()  # waiting for acks is not a failure


def test_checkpoints_follow_acks_while_a_slow_peer_holds_the_reader_back(run_agent, workdir, forward_peer):
    """The reader waits inside one long read of the file; acknowledged lines still reach the checkpoint."""
    forward_peer.ack_delay(0.15)
    write(workdir, 0, 3000)
    agent = start(run_agent, workdir, forward_peer, extra="max_in_flight = 1\nbuffer_max_bytes = \"1KiB\"",
                  read_bytes="16KiB")
    wait_for(lambda: checkpoint_offset(workdir) > 0, timeout=20, interval=0.01, message="a first checkpoint")
    assert len(seq_counts(forward_peer)) < 2000  # long before the file's end was read
    wait_for(lambda: all_arrived(3000, forward_peer), timeout=30, message="every line")
    assert agent.stop() == 0
