"""The Fluentd Forward Protocol v1, as pure functions: events, messages, the shared-key handshake.

A batch becomes one Forward mode message ``[tag, [[time, record], ...], {"chunk": id, "size": n}]``
(or CompressedPackedForward: the entries gzip-compressed in a bin), or several, each at most
so long (entry_runs). The entries are packed once per batch; plain lines are never decoded:
each entry is one struct-packed lead (its time and str header; the rest is the same bytes for
the whole batch) and a slice of the batch's bytes. Times are EventTime (msgpack ext type 0:
seconds and nanoseconds), fluent-logger's type: a record's own time, else the batch's read
time plus the record's place in the batch in nanoseconds (strictly increasing in line order).

Whatever the peer sends is checked here before anything else looks at it (AnswerReader,
acked_chunk, ping, check_pong): a malformed, oversized or unexpected answer raises PeerError,
never anything else, and the output drops that connection.
"""

from __future__ import annotations

import base64
import bisect
import gzip
import hashlib
import itertools
import os
import struct

import msgpack
from fluent.sender import EventTime

from shipper.outputs.compression import gzip_bytes
from shipper.record import TIME, Batch, Envelope, epoch_of

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
        # surrogateescape: Fluent Bit packs the HELO's random nonce and auth salt as msgpack *str*
        # holding raw bytes (not UTF-8); they decode to str and _as_bytes gives back the exact bytes.
        self._unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape", strict_map_key=True,
                                          max_buffer_size=max_bytes)

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


def event_seconds(epoch: float) -> int:
    """The event time as integer seconds (``time_as_integer``: receivers older than Fluentd 0.14)."""
    return int(epoch)


def encode_entries(batch: Batch, envelope: Envelope, time_as_integer: bool = False) -> bytes:
    """The batch's events as concatenated msgpack ``[time, record]`` arrays (times: EventTime, or
    integer seconds with ``time_as_integer``); see entry_runs."""
    return b"".join([entries for entries, _ in entry_runs(batch, envelope, None, time_as_integer)])


def entry_runs(batch: Batch, envelope: Envelope, max_bytes: int | None = None,
               time_as_integer: bool = False) -> list[tuple[bytes, int]]:
    """The batch's events as msgpack ``[time, record]`` arrays, cut into runs of at most ``max_bytes``
    (None: one run): ``[(entries, count), ...]`` in order. An event longer than ``max_bytes`` is a run alone.

    Event times: a record's own time (parsed from the line, or the journal's) when it has one; else
    the batch's read time plus i nanoseconds for its i-th record, so that times increase strictly
    within a batch, in the order of the lines (with ``time_as_integer``: the read time's second).
    """
    packer = msgpack.Packer()
    if batch.blob is not None and batch.fields is None:  # per-line fields (a filter's) take the general path
        return _plain_runs(batch, envelope, packer, max_bytes, time_as_integer)
    pieces = []
    fields = batch.fields
    read_seconds, read_nanos = _read_nanos(batch.read_time)
    for index, record in enumerate(batch.records(envelope)):
        stamp = record.pop("time")
        del record["tag"]
        extra = fields[index] if fields is not None else None
        seconds = epoch_of(stamp) if extra and TIME in extra else None
        if seconds is not None:
            when = event_seconds(seconds) if time_as_integer else event_time(seconds)
        elif time_as_integer:
            when = read_seconds
        else:
            when = EventTime.from_unix_nano(read_seconds * 1_000_000_000 + read_nanos + index)
        pieces.append(packer.pack([when, record]))
    if not pieces:
        return []
    ends = list(itertools.accumulate(map(len, pieces)))
    return [(b"".join(pieces[a:b]), b - a) for a, b in _cuts(ends, max_bytes)]


def _read_nanos(epoch: float) -> tuple[int, int]:
    seconds = int(epoch)
    return seconds, min(999_999_999, max(0, int(round((epoch - seconds) * 1e9))))


# An entry up to its time's seconds: fixarray of 2, then EventTime as fixext 8 of type 0.
_ENTRY_START = b"\x92\xd7\x00"


def _plain_runs(batch: Batch, envelope: Envelope, packer: msgpack.Packer, max_bytes: int | None,
                time_as_integer: bool) -> list[tuple[bytes, int]]:
    """The fast path, from the blob's bytes (valid UTF-8: the input checked them), never decoded:
    every entry is ``lead + line + suffix``, where the lead (entry start, time, the record's head and
    the line's msgpack str header) is packed by struct, in C, and the line is a slice of the blob.

    ``parts``: [lead_0, line_0, lead_1, line_1, ...]; each lead begins with the suffix of the entry
    before it (a run's first lead goes without it). The str header is str16, or str32 when a line is
    64 KiB or longer: a byte or two more than msgpack's shortest, for one fixed-size lead per batch.
    """
    head = envelope.head("", batch.tag, batch.source)
    for key in CARRIED_OUTSIDE:
        del head[key]
    fields = len(head) + 1 + (1 if envelope.labels else 0)
    record_head = b"".join([
        packer.pack_map_header(fields),
        *(packer.pack(key) + packer.pack(value) for key, value in head.items()), packer.pack("message"),
    ])
    suffix = packer.pack("labels") + packer.pack(envelope.labels) if envelope.labels else b""
    lines = batch.blob.split(b"\n")
    lines.pop()  # the blob ends with a newline
    count = len(lines)
    if not count:
        return []
    sizes = list(map(len, lines))
    code, size_format = (0xDA, "H") if max(sizes) < 65536 else (0xDB, "I")
    if time_as_integer:  # one time for the whole batch
        start = suffix + packer.pack_array_header(2) + packer.pack(event_seconds(batch.read_time)) + record_head
        lead = struct.Struct(f">{len(start)}sB{size_format}")
        leads = map(lead.pack, itertools.repeat(start, count), itertools.repeat(code, count), sizes)
    else:
        seconds, nanos = _read_nanos(batch.read_time)
        start = suffix + _ENTRY_START
        lead = struct.Struct(f">{len(start)}sII{len(record_head)}sB{size_format}")

        def some(first: int, number: int, second: int, first_nanos: int):  # lines first.. in one second
            return map(lead.pack, itertools.repeat(start, number), itertools.repeat(second, number),
                       range(first_nanos, first_nanos + number), itertools.repeat(record_head, number),
                       itertools.repeat(code, number), itertools.islice(sizes, first, None))

        this_second = min(count, 1_000_000_000 - nanos)
        leads = some(0, this_second, seconds, nanos)
        if this_second < count:  # the nanoseconds pass into the next second
            leads = itertools.chain(leads, some(this_second, count - this_second, seconds + 1, 0))
    parts: list = [None] * (2 * count)
    parts[0::2] = leads
    parts[1::2] = lines
    fixed, cut = lead.size, len(suffix)

    def run(a: int, b: int) -> bytes:
        if a == 0 and b == count:  # the whole batch: no copy of the list
            parts[0] = parts[0][cut:]
            parts.append(suffix)
            return b"".join(parts)
        return b"".join((parts[2 * a][cut:], *parts[2 * a + 1:2 * b], suffix))

    if max_bytes is None or len(batch.blob) - count + count * fixed <= max_bytes:
        return [(run(0, count), count)]
    ends = list(itertools.accumulate(sizes))
    return [(run(a, b), b - a) for a, b in _cuts(ends, max_bytes, fixed)]


def _cuts(ends: list[int], max_bytes: int | None, fixed: int = 0) -> list[tuple[int, int]]:
    """Consecutive ranges ``(a, b)`` of entries whose bytes fit ``max_bytes`` (at least one entry each);
    entry i ends at byte ``ends[i] + (i + 1) * fixed`` (each entry: a ``fixed`` part and its own)."""
    count = len(ends)
    if max_bytes is None:
        return [(0, count)]
    cuts, a = [], 0
    while a < count:
        before = (ends[a - 1] if a else 0) + a * fixed
        b = bisect.bisect_right(range(count), before + max_bytes, lo=a, key=lambda i: ends[i] + (i + 1) * fixed)
        b = max(b, a + 1)
        cuts.append((a, b))
        a = b
    return cuts


def forward_message(tag: str, entries: bytes, count: int, chunk_id: str | None, compression: str = "none",
                    level: int = 1) -> bytes:
    """One Forward (or CompressedPackedForward) mode message around already packed entries."""
    packer = msgpack.Packer()
    option: dict = {"size": count}
    if chunk_id is not None:
        option["chunk"] = chunk_id
    if compression == "gzip":
        option["compressed"] = "gzip"
        head, body = b"", packer.pack(gzip_bytes(entries, level))  # bytes pack as msgpack bin
    else:
        head, body = packer.pack_array_header(count), entries
    return b"".join((packer.pack_array_header(3), packer.pack(tag), head, body, packer.pack(option)))


def split_entries(message: bytes) -> list[tuple[bytes, int]]:
    """The entries of a message forward_message made, in two halves of about equal bytes:
    ``[(entries, count), (entries, count)]`` (a message of one entry: one run)."""
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(message), 1024))
    unpacker.feed(message)
    unpacker.read_array_header()
    unpacker.skip()  # the tag
    if message[unpacker.tell()] in (0xC4, 0xC5, 0xC6):  # a bin: CompressedPackedForward, gzip
        data = gzip.decompress(unpacker.unpack())
        unpacker = msgpack.Unpacker(max_buffer_size=max(len(data), 1024))
        unpacker.feed(data)
        count = None
    else:  # Forward: an array of entries, then the option map
        data, count = message, unpacker.read_array_header()
    ends, first = [], unpacker.tell()
    while (count is None or len(ends) < count) and unpacker.tell() < len(data):
        unpacker.skip()
        ends.append(unpacker.tell())
    if len(ends) < 2:
        return [(data[first:ends[-1] if ends else first], len(ends))]
    half = (first + ends[-1]) // 2
    cut = min(max(1, bisect.bisect_left(ends, half)), len(ends) - 1)
    return [(data[first:ends[cut - 1]], cut), (data[ends[cut - 1]:ends[-1]], len(ends) - cut)]


# ---------------------------------------------------------------- the shared-key handshake

def _sha512_hex(*parts: bytes) -> str:
    digest = hashlib.sha512()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def ping(helo: object, self_hostname: str, shared_key: str, username: str = "",
         password: str = "") -> tuple[list, bytes, bytes]:
    """Answer the server's HELO: the PING message, our salt and the server's nonce (to check its PONG).

    Both receivers hash the bytes of what they received: Fluentd's in_forward and Fluent Bit's
    in_forward compute sha512_hex(salt + hostname + nonce + shared_key) and sha512_hex(auth salt +
    username + password). So the nonce and auth salt are taken as the exact bytes sent (bin from
    Fluentd, str holding random bytes from Fluent Bit), and every field of the PING is a msgpack
    str: Fluent Bit refuses anything else ("Invalid shared_key_salt type message"). The salt is
    32 hex digits, as Fluentd's out_forward makes it (SecureRandom.hex(16)).
    """
    if not (isinstance(helo, list) and len(helo) == 2 and helo[0] == "HELO" and isinstance(helo[1], dict)):
        raise HandshakeError(f"expected HELO from the server, got {_shown(helo)}")
    nonce = _as_bytes(helo[1].get("nonce", b""), "the HELO's nonce")
    auth_salt = _as_bytes(helo[1].get("auth", b""), "the HELO's auth salt")
    salt = os.urandom(16).hex()
    # As fluentd's out_forward: a password digest whenever the server sent an auth salt (with
    # whatever username is configured, maybe none), else "".
    password_digest = _sha512_hex(auth_salt, username.encode(), password.encode()) if auth_salt else ""
    digest = _sha512_hex(salt.encode(), self_hostname.encode(), nonce, shared_key.encode())
    return ["PING", self_hostname, salt, digest, username, password_digest], salt.encode(), nonce


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


# The server's side (the forward input), the same digests: one implementation, tested against both.

def helo(nonce: bytes) -> list:
    """The server's first message: its nonce; no user authentication (an empty auth salt)."""
    return ["HELO", {"nonce": nonce, "auth": b"", "keepalive": True}]


def check_ping(message: object, nonce: bytes, shared_key: str) -> tuple[bytes, bytes]:
    """Verify a client's PING against our nonce; return (its host name, its salt). HandshakeRefused
    when it does not prove the shared key, HandshakeError when it is not a PING at all."""
    if not (isinstance(message, list) and len(message) == 6 and message[0] == "PING"):
        raise HandshakeError(f"expected PING from the client, got {_shown(message)}")
    hostname = _as_bytes(message[1], "the PING's host name")
    salt = _as_bytes(message[2], "the PING's salt")
    digest = _as_bytes(message[3], "the PING's digest")
    if digest != _sha512_hex(salt, hostname, nonce, shared_key.encode()).encode():
        raise HandshakeRefused("shared_key mismatch")
    return hostname, salt


def pong(accepted: bool, reason: str, self_hostname: str, salt: bytes, nonce: bytes, shared_key: str) -> list:
    """The server's answer to a PING; when accepted, its own proof of the shared key."""
    digest = _sha512_hex(salt, self_hostname.encode(), nonce, shared_key.encode()) if accepted else ""
    return ["PONG", accepted, reason, self_hostname, digest]


def _as_bytes(value: object, what: str) -> bytes:
    """A str or bin field of the peer's as bytes; HandshakeError for another type or an absurd length."""
    if isinstance(value, str):
        try:  # the bytes the peer sent (AnswerReader decodes what is not UTF-8 with surrogateescape)
            value = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate no decoding makes: not from the wire
            value = value.encode("utf-8", "surrogatepass")
    if not isinstance(value, bytes):
        raise HandshakeError(f"{what} is not a string: {_shown(value)}")
    if len(value) > MAX_FIELD_BYTES:
        raise HandshakeError(f"{what} is {len(value)} bytes long (at most {MAX_FIELD_BYTES})")
    return value
