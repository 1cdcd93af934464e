"""The Fluentd Forward Protocol v1, as pure functions: events, messages, the shared-key handshake.

A batch becomes one Forward mode message ``[tag, [[time, record], ...], {"chunk": id, "size": n}]``
(or CompressedPackedForward: the entries gzip-compressed in a bin). The entries are packed
once per batch; for plain lines only the message string is packed per line, the rest of
each entry is the same bytes for the whole batch. Times are EventTime (msgpack ext type 0:
seconds and nanoseconds), fluent-logger's type.

Whatever the peer sends is checked here before anything else looks at it (AnswerReader,
acked_chunk, ping, check_pong): a malformed, oversized or unexpected answer raises PeerError,
never anything else, and the output drops that connection.
"""

from __future__ import annotations

import base64
import hashlib
import os

import msgpack
from fluent.sender import EventTime

from shipper.outputs.compression import gzip_bytes
from shipper.record import Batch, Envelope, epoch_of

# The record travels without these: the forward message carries the tag and the event time.
CARRIED_OUTSIDE = ("time", "tag")


# Bytes of answers buffered at most: an ack is ~30 bytes, a HELO or PONG ~200.
MAX_ANSWER_BYTES = 64 * 1024
# Longest chunk id, nonce, salt, host name or digest taken from a peer.
MAX_FIELD_BYTES = 1024


class PeerError(Exception):
    """The peer sent something the Forward protocol does not allow: that connection is dropped."""


class HandshakeError(PeerError):
    """The shared-key handshake cannot go on: a malformed HELO or PONG, or see HandshakeRefused."""


class HandshakeRefused(HandshakeError):
    """The server refused us, or could not prove it knows the shared key: the configuration, not the protocol."""


def _shown(value: object) -> str:
    return repr(value)[:80]


class AnswerReader:
    """Decodes what a peer sends, bounded: whole msgpack objects, never more than ``max_bytes`` held."""

    def __init__(self, max_bytes: int = MAX_ANSWER_BYTES):
        self.max_bytes = max_bytes
        # raw=False, strict_map_key: map keys are str or bytes, so every answer is hashable and printable.
        self._unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=max_bytes)

    def feed(self, data: bytes) -> list[object]:
        """The objects completed by ``data``; PeerError for bytes that are no msgpack or too much of it."""
        try:
            self._unpacker.feed(data)
            return list(self._unpacker)
        except msgpack.BufferFull:
            raise PeerError(f"an answer longer than {self.max_bytes} bytes") from None
        except Exception as exc:  # the decoder's verdict on hostile bytes, whatever its type
            detail = str(exc)[:80]
            raise PeerError(f"undecodable answer ({type(exc).__name__}{': ' + detail if detail else ''})") from None


def acked_chunk(message: object) -> str:
    """The chunk id of an answer to a chunk (``{"ack": id}``); PeerError for anything else."""
    if isinstance(message, list) and message[:1] == ["HELO"]:
        raise HandshakeRefused("the server asks for the shared-key handshake: set shared_key")
    if not isinstance(message, dict) or "ack" not in message:
        raise PeerError(f"expected {{\"ack\": chunk id}}, got {_shown(message)}")
    chunk = message["ack"]
    if isinstance(chunk, bytes) and len(chunk) <= MAX_FIELD_BYTES:
        return chunk.decode("ascii", "replace")  # a peer may send the id as bin
    if not isinstance(chunk, str) or len(chunk) > MAX_FIELD_BYTES:
        raise PeerError(f"an ack whose chunk id is not a short string: {_shown(chunk)}")
    return chunk


def new_chunk_id() -> str:
    """A unique chunk id, as fluentd makes them: 16 random bytes in base64."""
    return base64.b64encode(os.urandom(16)).decode()


def event_time(epoch: float) -> EventTime:
    seconds = int(epoch)
    return EventTime(seconds, int(round((epoch - seconds) * 1e9)) % 1_000_000_000)


def encode_entries(batch: Batch, envelope: Envelope) -> bytes:
    """The batch's events as concatenated msgpack ``[time, record]`` arrays."""
    packer = msgpack.Packer()
    if batch.blob is not None:
        return _plain_entries(batch, envelope, packer)
    out = []
    for record in batch.records(envelope):
        seconds = epoch_of(record.pop("time"))
        if seconds is None:
            seconds = batch.read_time
        del record["tag"]
        out.append(packer.pack([event_time(seconds), record]))
    return b"".join(out)


def _plain_entries(batch: Batch, envelope: Envelope, packer: msgpack.Packer) -> bytes:
    """The fast path: every entry is ``prefix + message + suffix`` with one prefix and suffix per batch."""
    head = envelope.head("", batch.tag, batch.source)
    for key in CARRIED_OUTSIDE:
        del head[key]
    fields = len(head) + 1 + (1 if envelope.labels else 0)
    prefix = b"".join([
        packer.pack_array_header(2), packer.pack(event_time(batch.read_time)), packer.pack_map_header(fields),
        *(packer.pack(key) + packer.pack(value) for key, value in head.items()), packer.pack("message"),
    ])
    suffix = packer.pack("labels") + packer.pack(envelope.labels) if envelope.labels else b""
    packed = list(map(packer.pack, batch.message_list()))
    if not packed:
        return b""
    return b"".join((prefix, (suffix + prefix).join(packed), suffix))


def forward_message(tag: str, entries: bytes, count: int, chunk_id: str | None, compression: str = "none",
                    level: int = 1) -> bytes:
    """One Forward (or CompressedPackedForward) mode message around already packed entries."""
    packer = msgpack.Packer()
    option: dict = {"size": count}
    if chunk_id is not None:
        option["chunk"] = chunk_id
    if compression == "gzip":
        option["compressed"] = "gzip"
        body = packer.pack(gzip_bytes(entries, level))  # bytes pack as msgpack bin
    else:
        body = packer.pack_array_header(count) + entries
    return b"".join((packer.pack_array_header(3), packer.pack(tag), body, packer.pack(option)))


# ---------------------------------------------------------------- the shared-key handshake

def _sha512_hex(*parts: bytes) -> str:
    digest = hashlib.sha512()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def ping(helo: object, self_hostname: str, shared_key: str, username: str = "",
         password: str = "") -> tuple[list, bytes, bytes]:
    """Answer the server's HELO: the PING message, our salt and the server's nonce (to check its PONG)."""
    if not (isinstance(helo, list) and len(helo) == 2 and helo[0] == "HELO" and isinstance(helo[1], dict)):
        raise HandshakeError(f"expected HELO from the server, got {_shown(helo)}")
    nonce = _as_bytes(helo[1].get("nonce", b""), "the HELO's nonce")
    auth_salt = _as_bytes(helo[1].get("auth", b""), "the HELO's auth salt")
    salt = os.urandom(16)
    # As fluentd's out_forward: a password digest whenever the server sent an auth salt (with
    # whatever username is configured, maybe none), else "".
    password_digest = _sha512_hex(auth_salt, username.encode(), password.encode()) if auth_salt else ""
    digest = _sha512_hex(salt, self_hostname.encode(), nonce, shared_key.encode())
    return ["PING", self_hostname, salt, digest, username, password_digest], salt, nonce


def check_pong(pong: object, salt: bytes, nonce: bytes, shared_key: str) -> str:
    """Verify the server's PONG; return the server's host name."""
    if not (isinstance(pong, list) and len(pong) == 5 and pong[0] == "PONG"):
        raise HandshakeError(f"expected PONG from the server, got {_shown(pong)}")
    _, accepted, reason, server_hostname, digest = pong
    if accepted is not True:
        # repr: the peer's text reaches our log, so its control characters are shown escaped
        shown = repr(reason)[1:-1] if isinstance(reason, str) else _shown(reason)
        raise HandshakeRefused(f"the server refused the handshake: {shown[:200]}")
    hostname = _as_bytes(server_hostname, "the PONG's host name")
    if _as_bytes(digest, "the PONG's digest") != _sha512_hex(salt, hostname, nonce, shared_key.encode()).encode():
        raise HandshakeRefused("the server's PONG does not prove it knows the shared key")
    return hostname.decode("utf-8", "replace")


def _as_bytes(value: object, what: str) -> bytes:
    """A str or bin field of the peer's as bytes; HandshakeError for another type or an absurd length."""
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogatepass")
    if not isinstance(value, bytes):
        raise HandshakeError(f"{what} is not a string: {_shown(value)}")
    if len(value) > MAX_FIELD_BYTES:
        raise HandshakeError(f"{what} is {len(value)} bytes long (at most {MAX_FIELD_BYTES})")
    return value
