"""The forward-protocol test peer, exercised with minimal clients: raw sockets + msgpack, and
fluent-logger's FluentSender for Message mode."""

from __future__ import annotations

import gzip
import hashlib
import socket
import ssl
import struct
import time

import msgpack
import pytest
from fluent.sender import EventTime as SenderEventTime
from fluent.sender import FluentSender

from forward_peer import ForwardPeer, Handshake, password_digest, ping_digest

pytestmark = pytest.mark.timeout(30)


def event_time(seconds: int, nanos: int) -> msgpack.ExtType:
    return msgpack.ExtType(0, struct.pack(">II", seconds, nanos))


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


class Client:
    """A raw forward client: one TCP (optionally TLS) connection, msgpack both ways."""

    def __init__(self, peer: ForwardPeer, context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None):
        raw = socket.create_connection(("127.0.0.1", peer.port), timeout=5)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = context.wrap_socket(raw, server_hostname=server_hostname) if context else raw
        self.unpacker = msgpack.Unpacker(raw=False)

    def send(self, obj) -> None:
        self.sock.sendall(obj if isinstance(obj, bytes) else pack(obj))

    def receive(self, timeout: float = 5.0):
        """The next msgpack object from the peer; raise TimeoutError, EOFError at end of stream."""
        self.sock.settimeout(timeout)
        while True:
            for obj in self.unpacker:
                return obj
            try:
                data = self.sock.recv(65536)
            except socket.timeout as exc:
                raise TimeoutError from exc
            except ConnectionResetError as exc:
                raise EOFError("reset") from exc
            if not data:
                raise EOFError("closed")
            self.unpacker.feed(data)

    def assert_closed(self, timeout: float = 5.0) -> None:
        with pytest.raises(EOFError):
            self.receive(timeout)

    def assert_silent(self, timeout: float = 0.3) -> None:
        with pytest.raises(TimeoutError):
            self.receive(timeout)

    def handshake(self, shared_key: str, hostname: str = "client", username: str = "",
                  password: str = "") -> list:
        helo = self.receive()
        assert helo[0] == "HELO"
        options = helo[1]
        salt = b"0123456789abcdef"
        digest = hashlib.sha512(salt + hostname.encode() + options["nonce"] + shared_key.encode()).hexdigest()
        auth = options["auth"]
        passwd = hashlib.sha512(auth + username.encode() + password.encode()).hexdigest() if auth else ""
        self.send(["PING", hostname, salt, digest, username if auth else "", passwd])
        pong = self.receive()
        self.salt, self.nonce = salt, options["nonce"]
        return pong

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def clients():
    opened: list[Client] = []

    def connect(peer, *args, **kwargs) -> Client:
        client = Client(peer, *args, **kwargs)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


# --- the four modes -------------------------------------------------------------------------

def test_message_mode_from_fluent_logger_event_time_and_int_time(forward_peer):
    nanos_sender = FluentSender("app", "127.0.0.1", forward_peer.port, nanosecond_precision=True)
    int_sender = FluentSender("app", "127.0.0.1", forward_peer.port)
    try:
        assert nanos_sender.emit_with_time("web", SenderEventTime(1_700_000_000, 123_456_789), {"msg": "é"})
        assert int_sender.emit_with_time("db", 1_700_000_001, {"n": 1, "nested": {"a": [1, 2]}})
        events = forward_peer.wait_events(2)
    finally:
        nanos_sender.close()
        int_sender.close()
    by_tag = {event.tag: event for event in events}
    web, db = by_tag["app.web"], by_tag["app.db"]
    assert (web.mode, web.nanos, web.record, web.chunk) == ("Message", 123_456_789, {"msg": "é"}, None)
    assert web.time == pytest.approx(1_700_000_000.123456789)
    assert (db.mode, db.time, db.nanos, db.record) == ("Message", 1_700_000_001.0, None, {"n": 1, "nested": {"a": [1, 2]}})
    assert forward_peer.connections == 2
    assert {m.mode for m in forward_peer.messages()} == {"Message"}
    assert forward_peer.errors() == []


def test_message_mode_with_chunk_is_acknowledged(forward_peer, clients):
    client = clients(forward_peer)
    client.send(["tag.a", event_time(10, 999_999_999), {"k": "v"}, {"chunk": "c1"}])
    assert client.receive() == {"ack": "c1"}
    [event] = forward_peer.events()
    assert (event.tag, event.nanos, event.chunk, event.mode) == ("tag.a", 999_999_999, "c1", "Message")
    assert forward_peer.acks() == ["c1"]


def test_forward_mode(forward_peer, clients):
    client = clients(forward_peer)
    client.send(["fwd", [[1, {"a": 1}], [event_time(2, 5), {"a": 2}]], {"chunk": "QUJD", "size": 2}])
    assert client.receive() == {"ack": "QUJD"}
    first, second = forward_peer.events()
    assert (first.time, first.nanos, first.record) == (1.0, None, {"a": 1})
    assert (second.time, second.nanos, second.record) == (pytest.approx(2.000000005), 5, {"a": 2})
    [message] = forward_peer.messages()
    assert (message.mode, message.entries, message.size, message.chunk, message.compressed) == (
        "Forward", 2, 2, "QUJD", None)
    assert forward_peer.errors() == []


def test_packed_forward_as_bin_and_as_str(forward_peer, clients):
    entries = b"".join(pack([event_time(100 + i, i), {"i": i}]) for i in range(3))
    client = clients(forward_peer)
    client.send(["packed", entries, {"chunk": "p1", "size": 3}])
    assert client.receive() == {"ack": "p1"}
    # older clients send the entries as a msgpack str (str 32 header, raw bytes)
    str_message = b"\x93" + pack("packed.str") + b"\xdb" + struct.pack(">I", len(entries)) + entries + pack({})
    client.send(str_message)
    events = forward_peer.wait_events(6)
    assert [(e.tag, e.mode, e.nanos, e.record) for e in events] == [
        ("packed", "PackedForward", i, {"i": i}) for i in range(3)
    ] + [("packed.str", "PackedForward", i, {"i": i}) for i in range(3)]
    assert [m.nbytes for m in forward_peer.messages()][1] == len(str_message)
    assert forward_peer.errors() == []


def test_compressed_packed_forward_with_several_gzip_members(forward_peer, clients):
    first = b"".join(pack([event_time(1, 1), {"part": 1, "i": i}]) for i in range(2))
    second = pack([7, {"part": 2}])
    client = clients(forward_peer)
    client.send(["gz", gzip.compress(first) + gzip.compress(second),
                 {"chunk": "z1", "size": 3, "compressed": "gzip"}])
    assert client.receive() == {"ack": "z1"}
    events = forward_peer.events()
    assert [(e.mode, e.nanos, e.record) for e in events] == [
        ("CompressedPackedForward", 1, {"part": 1, "i": 0}),
        ("CompressedPackedForward", 1, {"part": 1, "i": 1}),
        ("CompressedPackedForward", None, {"part": 2}),
    ]
    [message] = forward_peer.messages()
    assert (message.compressed, message.size, message.entries, message.option["compressed"]) == (
        "gzip", 3, 3, "gzip")


def test_size_mismatch_and_broken_messages_are_reported(forward_peer, clients):
    client = clients(forward_peer)
    client.send(["t", [[1, {"a": 1}]], {"size": 2, "chunk": "s"}])
    assert client.receive() == {"ack": "s"}
    assert any("size 2" in error for error in forward_peer.errors())
    client.send(["t", b"\x92\x01", {"chunk": "broken"}])  # truncated packed entry
    client.assert_closed()
    assert [m.chunk for m in forward_peer.messages()] == ["s"]
    assert any("truncated" in error for error in forward_peer.errors())


# --- stream framing -------------------------------------------------------------------------

def test_message_split_byte_by_byte_and_several_per_segment(forward_peer, clients):
    client = clients(forward_peer)
    data = pack(["split", [[event_time(3, 3), {"x": "y" * 50}]], {"chunk": "b1"}])
    for byte in data:
        client.sock.send(bytes([byte]))
    assert client.receive() == {"ack": "b1"}
    client.send(b"".join(pack(["many", i, {"i": i}, {"chunk": f"m{i}"}]) for i in range(5)))
    assert [client.receive() for _ in range(5)] == [{"ack": f"m{i}"} for i in range(5)]
    events = forward_peer.events()
    assert events[0].record == {"x": "y" * 50} and events[0].nanos == 3
    assert [e.record["i"] for e in events[1:]] == list(range(5))
    assert forward_peer.messages()[0].nbytes == len(data)


# --- acknowledgements and faults ------------------------------------------------------------

def test_drop_acks_counts_chunks_and_still_records(forward_peer, clients):
    client = clients(forward_peer)
    forward_peer.drop_acks(1)
    client.send(["t", 1, {"n": 1}, {"chunk": "c1"}])
    client.assert_silent()
    client.send(["t", 1, {"n": 1}, {"chunk": "c1"}])  # the resend
    assert client.receive() == {"ack": "c1"}
    assert [e.record for e in forward_peer.events()] == [{"n": 1}, {"n": 1}]
    assert forward_peer.dropped_acks() == ["c1"] and forward_peer.acks() == ["c1"]

    forward_peer.drop_acks(None)
    for chunk in ("c2", "c3"):
        client.send(["t", 1, {"n": 2}, {"chunk": chunk}])
    client.assert_silent()
    forward_peer.drop_acks(0)
    client.send(["t", 1, {"n": 3}, {"chunk": "c4"}])
    assert client.receive() == {"ack": "c4"}
    assert forward_peer.dropped_acks() == ["c1", "c2", "c3"]
    # no chunk option, no ack
    client.send(["t", 1, {"n": 4}])
    client.assert_silent(0.2)
    assert len(forward_peer.events()) == 6


def test_ack_delay(forward_peer, clients):
    client = clients(forward_peer)
    forward_peer.ack_delay(0.3)
    started = time.monotonic()
    client.send(["t", 1, {}, {"chunk": "slow"}])
    forward_peer.wait_events(1)
    assert forward_peer.acks() == []  # recorded at once, acknowledged later
    assert client.receive() == {"ack": "slow"}
    assert time.monotonic() - started >= 0.3
    forward_peer.ack_delay(0)
    started = time.monotonic()
    client.send(["t", 1, {}, {"chunk": "fast"}])
    assert client.receive() == {"ack": "fast"}
    assert time.monotonic() - started < 0.3


def test_set_down_refuses_and_recovers_on_the_same_port(forward_peer, clients):
    port = forward_peer.port
    connected = clients(forward_peer)
    connected.send(["t", 1, {"before": True}, {"chunk": "a"}])
    assert connected.receive() == {"ack": "a"}

    forward_peer.set_down(True)
    connected.assert_closed()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    assert forward_peer.open_connections == 0

    forward_peer.set_down(False)
    assert forward_peer.port == port
    client = clients(forward_peer)
    client.send(["t", 1, {"after": True}, {"chunk": "b"}])
    assert client.receive() == {"ack": "b"}
    assert [e.record for e in forward_peer.events()] == [{"before": True}, {"after": True}]
    assert forward_peer.connections == 2


def test_close_mid_batch_closes_and_records_nothing(forward_peer, clients):
    forward_peer.close_mid_batch(1)
    client = clients(forward_peer)
    entries = b"".join(pack([i, {"i": i, "pad": "p" * 100}]) for i in range(200))
    data = pack(["t", entries, {"chunk": "big"}])
    try:
        client.send(data[: len(data) // 2])  # part of the message
    except OSError:
        pass
    client.assert_closed()
    assert forward_peer.events() == [] and forward_peer.messages() == []
    assert forward_peer.mid_batch_closes == 1

    retry = clients(forward_peer)  # disarmed after one message
    retry.send(data)
    assert retry.receive() == {"ack": "big"}
    assert len(forward_peer.events()) == 200


# --- shared-key handshake -------------------------------------------------------------------

def test_handshake_ok_then_data(make_forward_peer, clients):
    peer = make_forward_peer(shared_key="s3cret", server_hostname="aggregator")
    client = clients(peer)
    pong = client.handshake("s3cret", hostname="agent-host")
    expected = hashlib.sha512(client.salt + b"aggregator" + client.nonce + b"s3cret").hexdigest()
    assert pong == ["PONG", True, "", "aggregator", expected]
    client.send(["t", 1, {"ok": 1}, {"chunk": "h"}])
    assert client.receive() == {"ack": "h"}
    assert peer.handshakes == [("agent-host", "", True, "")]
    assert [e.record for e in peer.events()] == [{"ok": 1}]


def test_helo_shape(make_forward_peer, clients):
    client = clients(make_forward_peer(shared_key="k"))
    tag, options = client.receive()
    assert tag == "HELO"
    assert set(options) == {"nonce", "auth", "keepalive"}
    assert isinstance(options["nonce"], bytes) and len(options["nonce"]) == 16
    # in_forward sends an auth salt whenever <security> is set, with users or not
    assert isinstance(options["auth"], bytes) and len(options["auth"]) == 16 and options["keepalive"] is True


def test_handshake_wrong_key(make_forward_peer, clients):
    peer = make_forward_peer(shared_key="right")
    client = clients(peer)
    assert client.handshake("wrong", hostname="h") == ["PONG", False, "shared_key mismatch", "", ""]
    client.assert_closed()
    assert peer.handshakes == [Handshake("h", "", False, "shared_key mismatch")]


def test_data_before_handshake_is_rejected(make_forward_peer, clients):
    peer = make_forward_peer(shared_key="k")
    client = clients(peer)
    assert client.receive()[0] == "HELO"
    client.send(["t", 1, {"sneaky": True}, {"chunk": "x"}])
    assert client.receive() == ["PONG", False, "invalid ping message", "", ""]
    client.assert_closed()
    assert peer.events() == []
    assert [h.ok for h in peer.handshakes] == [False]


def test_handshake_with_users(make_forward_peer, clients):
    peer = make_forward_peer(shared_key="k", users={"alice": "pw1", "bob": "pw2"})
    good = clients(peer)
    pong = good.handshake("k", hostname="h1", username="bob", password="pw2")
    assert pong[:4] == ["PONG", True, "", "peer"]
    good.send(["t", 1, {}, {"chunk": "u"}])
    assert good.receive() == {"ack": "u"}

    for username, password in (("alice", "pw2"), ("mallory", "pw1")):
        bad = clients(peer)
        assert bad.handshake("k", hostname="h2", username=username, password=password) == [
            "PONG", False, "username/password mismatch", "", ""]
        bad.assert_closed()
    # the shared key is checked before the password
    bad = clients(peer)
    assert bad.handshake("nope", hostname="h3", username="bob", password="pw2")[2] == "shared_key mismatch"
    assert peer.handshakes == [
        ("h1", "bob", True, ""),
        ("h2", "alice", False, "username/password mismatch"),
        ("h2", "mallory", False, "username/password mismatch"),
        ("h3", "bob", False, "shared_key mismatch"),
    ]


def test_digest_helpers_match_hashlib():
    salt, nonce = b"\x00salt\xff", bytes(range(16))
    assert ping_digest(salt, "host", nonce, "key") == hashlib.sha512(salt + b"host" + nonce + b"key").hexdigest()
    assert ping_digest("hexsalt", b"host", nonce, b"key") == ping_digest(b"hexsalt", "host", nonce, "key")
    assert password_digest(nonce, "user", "pw") == hashlib.sha512(nonce + b"userpw").hexdigest()


# --- TLS ------------------------------------------------------------------------------------

@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
def test_tls_with_trustme_ca(make_forward_peer, clients, forward_tls, server_hostname):
    server_context, ca_path = forward_tls
    peer = make_forward_peer(tls=server_context, shared_key="k")
    client_context = ssl.create_default_context(cafile=str(ca_path))
    client = clients(peer, client_context, server_hostname=server_hostname)
    assert client.handshake("k")[1] is True
    client.send(["tls", [[event_time(5, 6), {"secure": True}]], {"chunk": "t"}])
    assert client.receive() == {"ack": "t"}
    assert [(e.tag, e.nanos, e.record) for e in peer.events()] == [("tls", 6, {"secure": True})]
    assert peer.tls_handshakes == 1


def test_tls_rejects_an_untrusting_client(make_forward_peer, forward_tls):
    peer = make_forward_peer(tls=forward_tls[0])
    with socket.create_connection(("127.0.0.1", peer.port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ssl.create_default_context().wrap_socket(raw, server_hostname="localhost")
    peer.wait_for(lambda p: p.errors(), message="the TLS failure to be noted")
    assert peer.tls_handshakes == 0 and peer.events() == []


def test_stop_closes_connections_and_is_idempotent(make_forward_peer, clients):
    peer = make_forward_peer()
    client = clients(peer)
    client.send(["t", 1, {}, {"chunk": "c"}])
    assert client.receive() == {"ack": "c"}
    peer.stop()
    client.assert_closed()
    peer.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", peer.port), timeout=2)


def test_concurrent_clients(forward_peer):
    import threading

    def send(worker: int) -> None:
        sender = FluentSender("w", "127.0.0.1", forward_peer.port, nanosecond_precision=True)
        try:
            for i in range(50):
                assert sender.emit(str(worker), {"i": i})
        finally:
            sender.close()

    threads = [threading.Thread(target=send, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    events = forward_peer.wait_events(200)
    for worker in range(4):
        assert [e.record["i"] for e in events if e.tag == f"w.{worker}"] == list(range(50))
    assert all(e.nanos is not None for e in events)
    assert forward_peer.connections == 4


def test_compressed_packed_forward_zstd(forward_peer, clients):
    try:
        from compression import zstd
    except ImportError:
        zstd = pytest.importorskip("backports.zstd")
    entries = pack([event_time(9, 9), {"z": 1}])
    client = clients(forward_peer)
    client.send(["zs", zstd.compress(entries), {"chunk": "zs", "compressed": "zstd"}])
    assert client.receive() == {"ack": "zs"}
    [event] = forward_peer.events()
    assert (event.mode, event.nanos, event.record) == ("CompressedPackedForward", 9, {"z": 1})
