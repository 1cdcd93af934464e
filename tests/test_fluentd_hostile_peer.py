"""A forward peer that answers garbage never stops the agent (issue 12, finding 10).

Malformed msgpack, non-maps, ``{"ack": <not a string>}``, answers too long to hold, HELOs with
wrong types, a handshake dripped a byte at a time: each closes that connection, is counted
(``protocol_errors``), logged once per host, and the chunks go again; once the peer behaves
every line arrives.
"""

from __future__ import annotations

import socket
import threading
import urllib.request
from pathlib import Path

import msgpack
import pytest
from aws import free_port
from conftest import FAST_RETRIES, agent_config, seq_lines, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from shipper.outputs import forward_protocol

# ------------------------------------------------------------------ pure: whatever comes, only PeerError

answers = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
shapes = st.one_of(
    answers,
    st.builds(lambda v: {"ack": v}, answers),
    st.builds(lambda v: ["HELO", v], answers),
    st.builds(lambda n, a: ["HELO", {"nonce": n, "auth": a}], answers, answers),
    st.builds(lambda *v: ["PONG", *v], answers, answers, answers, answers))


def only_peer_errors(call, *args):
    try:
        return call(*args)
    except forward_protocol.PeerError:
        return None


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300) | st.builds(lambda v: msgpack.packb(v), shapes))
def test_any_bytes_from_a_peer_decode_to_objects_or_a_peer_error(data):
    reader = forward_protocol.AnswerReader(max_bytes=256)
    for half in (data[:len(data) // 2], data[len(data) // 2:]):  # also split across reads
        messages = only_peer_errors(reader.feed, half)
        for message in messages or []:
            chunk = only_peer_errors(forward_protocol.acked_chunk, message)
            assert chunk is None or isinstance(chunk, str)
        if messages is None:
            break


@settings(max_examples=300, deadline=None)
@given(helo=shapes, pong=shapes)
def test_any_helo_or_pong_is_answered_or_refused_with_a_peer_error(helo, pong):
    answered = only_peer_errors(forward_protocol.ping, helo, "client", "key")
    assert answered is None or answered[0][0] == "PING"
    salt, nonce = (answered[1], answered[2]) if answered else (b"salt", b"nonce")
    # A random PONG never proves the shared key: refused, with a PeerError and nothing else.
    assert only_peer_errors(forward_protocol.check_pong, pong, salt, nonce, "key") is None


def test_an_answer_longer_than_the_bound_is_refused_before_it_is_held():
    reader = forward_protocol.AnswerReader(max_bytes=1024)
    reader.feed(b"\xdb\x7f\xff\xff\xff")  # a str32 of 2 GiB announced: waited for, but only so far
    with pytest.raises(forward_protocol.PeerError, match="longer than 1024 bytes"):
        for _ in range(11):
            reader.feed(b"x" * 100)
    endless = forward_protocol.AnswerReader(max_bytes=1024)
    with pytest.raises(forward_protocol.PeerError):
        for _ in range(100):
            endless.feed(b"\x91" * 100)  # arrays in arrays, never closed
    huge_field = forward_protocol.MAX_FIELD_BYTES + 1
    for helo in (["HELO", {"nonce": {"a": 1}}], ["HELO", {"nonce": 10**15}], ["HELO", {"auth": "x" * huge_field}]):
        with pytest.raises(forward_protocol.PeerError):
            forward_protocol.ping(helo, "client", "key")
    assert forward_protocol.acked_chunk({"ack": b"abc"}) == "abc"
    for bad in ({"ack": ["x"]}, {"ack": 1}, {"ack": None}, {"ack": "x" * huge_field}, [1], "ack", None, {}):
        with pytest.raises(forward_protocol.PeerError):
            forward_protocol.acked_chunk(bad)


# ------------------------------------------------------------------ the agent against a misbehaving peer

def fluentd_output(*addresses: str, extra: str = "") -> str:
    hosts = ", ".join(f'"{address}"' for address in addresses)
    return f'\n[[outputs]]\ntype = "fluentd"\nhosts = [{hosts}]\n{extra}\n'


def start(run_agent, workdir: Path, *addresses: str, extra: str = "", port: int | None = None):
    server = f'listen = "127.0.0.1:{port}"' if port else 'listen = ""'
    return run_agent(agent_config(workdir / "logs", workdir / "data", output=fluentd_output(*addresses, extra=extra),
                                  agent_extra=FAST_RETRIES, server=server))


def write(workdir: Path, start: int, count: int) -> None:
    with open(workdir / "logs" / "app.log", "a") as handle:
        handle.write(seq_lines(start, count))


def arrived(peer, count: int, agent) -> bool:
    if agent.proc.poll() is not None:
        raise AssertionError(f"the agent exited ({agent.proc.returncode}):\n{agent.log()[-3000:]}")
    got = {int(e.record["message"][4:11]) for e in peer.events() if e.record.get("message", "").startswith("seq=")}
    return got == set(range(count))


def counter(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == f"shipper_{name}_total")


GARBAGE_ACKS = [
    msgpack.packb({"ack": ["x"]}),               # unhashable: the TypeError that stopped the agent
    msgpack.packb({"ack": 12}),                  # a wrong type
    msgpack.packb(5),                            # not a map
    msgpack.packb([1, 2]),
    b"\xc1",                                     # a byte msgpack never uses
    msgpack.packb({"ack": "x" * 5000}),          # a chunk id no agent sent
    b"\xdb\x7f\xff\xff\xff" + b"x" * 200_000,    # a 2 GiB answer announced, and more than is held sent
]


def test_garbage_answers_close_the_connection_and_every_line_arrives(run_agent, workdir, forward_peer):
    forward_peer.answer_with(*GARBAGE_ACKS)
    port = free_port()
    # One chunk in flight at a time, so that each garbage answer is the answer the agent reads.
    agent = start(run_agent, workdir, forward_peer.address, extra="max_in_flight = 1", port=port)
    write(workdir, 0, 2000)
    wait_for(lambda: arrived(forward_peer, 2000, agent) and forward_peer.raw_sent == len(GARBAGE_ACKS),
             message="every line, after every garbage answer")
    write(workdir, 2000, 500)
    wait_for(lambda: arrived(forward_peer, 2500, agent), message="the lines written after the peer behaves")
    assert counter(port, "protocol_errors") == len(GARBAGE_ACKS)
    assert agent.log().count("broke the forward protocol") == 1  # once per host; later ones only counted
    assert agent.stop() == 0


def test_helos_with_wrong_types_are_refused_and_the_handshake_is_tried_again(run_agent, workdir, make_forward_peer):
    peer = make_forward_peer(shared_key="s3cret")
    peer.helo_with(msgpack.packb(["HELO", {"nonce": {"a": 1}}]), msgpack.packb(["HELO", {"nonce": 1.5}]),
                   msgpack.packb(["HELO", "nonce"]), b"\xc1\xc1")
    agent = start(run_agent, workdir, peer.address, extra='shared_key = "s3cret"')
    write(workdir, 0, 500)
    wait_for(lambda: arrived(peer, 500, agent), message="every line once the HELO is right")
    assert peer.raw_sent == 4 and peer.handshakes and all(h.ok for h in peer.handshakes)
    assert agent.log().count("broke the forward protocol") == 1
    assert agent.stop() == 0


class Dripper:
    """A server that starts a HELO and then sends one byte every 20 ms, for ever: a handshake never done."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.stopped = threading.Event()
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        try:
            conn.sendall(b"\x92\xa4HELO\xdb\x00\x10\x00\x00")  # ["HELO", <a str of 1 MiB, coming>]
            while not self.stopped.wait(0.02):
                conn.sendall(b"x")
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()


def test_a_handshake_dripped_byte_by_byte_gives_up_within_connect_timeout(run_agent, workdir, make_forward_peer):
    dripper, peer = Dripper(), make_forward_peer(shared_key="s3cret")
    try:
        agent = start(run_agent, workdir, dripper.address, peer.address,
                      extra='shared_key = "s3cret"\nconnect_timeout = "500ms"')
        write(workdir, 0, 300)
        # Failover to the second host works only if the first handshake ends.
        wait_for(lambda: arrived(peer, 300, agent), message="every line at the second host")
        assert dripper.connections >= 1 and "within connect_timeout" in agent.log()
        assert agent.stop() == 0
    finally:
        dripper.stop()
