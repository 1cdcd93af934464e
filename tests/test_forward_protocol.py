"""The Forward protocol encoding and handshake, checked by decoding with msgpack independently."""

from __future__ import annotations

import gzip
import hashlib
import struct

import msgpack
import pytest

from shipper.outputs.forward_protocol import (
    HandshakeError, check_pong, encode_entries, event_time, forward_message, new_chunk_id, ping,
)
from shipper.record import PARSED, TIME, TRUNCATED, Batch, Envelope

ENVELOPE = Envelope({"host": "web-1", "instance_id": "i-0abc"}, {"app": "web"})


def decode(message: bytes) -> tuple[str, list, dict]:
    tag, body, option = msgpack.unpackb(message, raw=False, strict_map_key=False)
    if option.get("compressed") == "gzip":
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(gzip.decompress(body))
        body = list(unpacker)
    return tag, body, option


def seconds_nanos(ext: msgpack.ExtType) -> tuple[int, int]:
    assert ext.code == 0
    return struct.unpack(">II", ext.data)


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_plain_lines_become_one_forward_message_with_event_times(compression):
    batch = Batch("app", "/var/log/app.log", 1764422238.123456789, blob="first\nsécond \"quoted\"\n\n".encode())
    message = forward_message("shipper.app", encode_entries(batch, ENVELOPE), batch.count, "id-1", compression)
    tag, entries, option = decode(message)
    assert tag == "shipper.app"
    assert option == {"size": 3, "chunk": "id-1", **({"compressed": "gzip"} if compression == "gzip" else {})}
    assert [record["message"] for _, record in entries] == ["first", 'sécond "quoted"', ""]
    assert entries[0][1] == {"host": "web-1", "instance_id": "i-0abc", "source": "/var/log/app.log",
                             "message": "first", "labels": {"app": "web"}}
    seconds, nanos = seconds_nanos(entries[0][0])
    assert seconds == 1764422238 and abs(nanos - 123456789) < 1000


def test_parsed_records_carry_their_own_event_time_and_fields():
    batch = Batch("app", None, 1000.0, messages=['{"level":"error"}', "raw"],
                  fields=[{"level": "error", TIME: "2026-11-29T13:17:18.250000Z"}, {TRUNCATED: True}])
    tag, entries, option = decode(forward_message("app", encode_entries(batch, Envelope()), 2, None))
    assert option == {"size": 2}
    (time_a, record_a), (time_b, record_b) = entries
    assert seconds_nanos(time_a) == (1795958238, 250_000_000)
    assert seconds_nanos(time_b) == (1000, 1)  # no time of its own: the read time + its place in the batch (ns)
    assert record_a == {"message": '{"level":"error"}', "level": "error"}
    assert record_b == {"message": "raw", "truncated": True}


def test_plain_lines_with_per_line_fields_keep_them():
    """A filter (level, modify) may give a plain blob per-line fields: Fluentd gets them too."""
    error, info = {PARSED: {"level": "error"}}, {PARSED: {"level": "info"}}
    batch = Batch("app", "/var/log/app.log", 1000.0, blob=b"ERROR one\nINFO two\nERROR three\n",
                  fields=[error, info, error])
    _, entries, _ = decode(forward_message("app", encode_entries(batch, Envelope()), batch.count, None))
    assert [(record["message"], record["level"]) for _, record in entries] == \
        [("ERROR one", "error"), ("INFO two", "info"), ("ERROR three", "error")]
    assert [seconds_nanos(when) for when, _ in entries] == [(1000, 0), (1000, 1), (1000, 2)]


def test_event_time_keeps_nanoseconds_and_chunk_ids_are_unique():
    assert seconds_nanos(event_time(1.5)) == (1, 500_000_000)
    ids = {new_chunk_id() for _ in range(1000)}
    assert len(ids) == 1000


def sha512_hex(*parts: bytes) -> str:
    return hashlib.sha512(b"".join(parts)).hexdigest()


def test_handshake_answers_helo_and_checks_the_servers_proof():
    nonce, auth = b"n" * 16, b"a" * 16
    message, salt, got_nonce = ping(["HELO", {"nonce": nonce, "auth": auth, "keepalive": True}],
                                    "client-1", "secret", "alice", "pw")
    assert got_nonce == nonce
    assert message == ["PING", "client-1", salt.decode(), sha512_hex(salt, b"client-1", nonce, b"secret"), "alice",
                       sha512_hex(auth, b"alice", b"pw")]
    pong = ["PONG", True, "", "server-1", sha512_hex(salt, b"server-1", nonce, b"secret")]
    assert check_pong(pong, salt, nonce, "secret") == "server-1"
    with pytest.raises(HandshakeError, match="does not prove"):
        check_pong(["PONG", True, "", "server-1", sha512_hex(salt, b"server-1", nonce, b"other")], salt, nonce,
                   "secret")
    with pytest.raises(HandshakeError, match="refused the handshake: shared_key mismatch"):
        check_pong(["PONG", False, "shared_key mismatch", "", ""], salt, nonce, "secret")
    without_user, _, _ = ping(["HELO", {"nonce": nonce, "auth": auth}], "client-1", "secret")
    assert without_user[4:] == ["", sha512_hex(auth, b"", b"")]  # what fluentd's out_forward sends too
    no_auth, _, _ = ping(["HELO", {"nonce": nonce.decode(), "auth": ""}], "client-1", "secret")
    assert no_auth[5] == ""
    with pytest.raises(HandshakeError, match="expected HELO"):
        ping({"ack": "x"}, "client-1", "secret")
