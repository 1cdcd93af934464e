"""A Fluentd forward-protocol peer for tests: a real TCP (optionally TLS) server on loopback.

It speaks the Forward Protocol Specification v1 the way fluentd's ``in_forward`` does:

* every incoming message is decoded in all four modes -- Message ``[tag, time, record, option?]``,
  Forward ``[tag, [[time, record], ...], option?]``, PackedForward ``[tag, bin_or_str, option?]``
  and CompressedPackedForward (PackedForward with option ``{"compressed": "gzip"}``; ``"zstd"``
  is accepted too when a zstd module is importable). ``time`` is an integer or an EventTime
  (msgpack ext type 0: uint32 BE seconds + uint32 BE nanoseconds);
* when the option map carries ``chunk``, ``{"ack": chunk}`` is answered once the message has been
  decoded and recorded;
* with ``shared_key`` set, the HELO/PING/PONG handshake runs first (optionally with user
  authentication), exactly as ``in_forward``'s ``generate_helo``/``check_ping``/``generate_pong``.
  ``flavor="fluentbit"`` does it as Fluent Bit's ``in_forward`` (plugins/in_forward/fw_prot.c) does
  instead: the HELO's nonce and auth salt are msgpack *str* holding 16 random bytes (no
  ``keepalive``), the PING must come whole in one read and have only str fields (a bin salt is
  refused: "Invalid shared_key_salt type message"), a wrong shared key closes the connection with no
  PONG, a wrong user or password gets ``["PONG", false, "username/password mismatch", "", ""]``;
* over TLS, how each client ended its connection: with close_notify (``close_notifies``) or without
  (``unclean_tls_closes``, what makes Fluentd and Fluent Bit log an SSL error), and for each TLS
  handshake the server name the client asked for (SNI) and its certificate's subject (``tls_clients()``).

Receiver settings of fluentd's ``in_forward``, given to the constructor:

* ``deny_keepalive=True``: after answering a chunk the connection is closed. As in_forward, every
  message completed by the read that completed the first one is processed and answered, then the
  connection is closed (what the client sent after it stays unread: the kernel answers it with a
  reset); the HELO says ``keepalive: false``;
* ``chunk_size_limit=n``: a message for which more than ``n`` bytes were read is dropped without an
  answer, the connection kept ("Input chunk size is larger than 'chunk_size_limit', dropped"). As
  in_forward counts it: the bytes of the reads since the previous message was complete, reads of
  16 KiB (cool.io's), so the start of the next message read along counts too. ``oversized()`` lists
  the chunk ids dropped.

Faults can be switched on and off at any time, from any thread, while the agent is connected:
``drop_acks``, ``set_down``, ``close_mid_batch``, ``ack_delay``; and a misbehaving peer's
answers: ``answer_with`` (raw bytes instead of acks), ``helo_with`` (raw bytes instead of the HELO).

For timing (bench/fluentd.py): every ``MessageInfo`` says when it was received, and ``ack_log()``
when each ack was sent.

Anything the peer finds wrong with what it received (a broken message, a ``size`` option that does
not match the entries, an event without time, a failed TLS handshake...) is appended to
``errors()``; a message that cannot be decoded is neither recorded nor acknowledged, and its
connection is closed.

Loaded as a pytest plugin by ``tests/conftest.py``: fixtures ``forward_peer``,
``make_forward_peer`` and ``forward_tls``.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import weakref
import selectors
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import msgpack
import pytest

MODES = ("Message", "Forward", "PackedForward", "CompressedPackedForward")
FLAVORS = ("fluentd", "fluentbit")  # whose in_forward the handshake imitates
_UNPACK_OPTIONS = {"raw": False, "strict_map_key": False, "unicode_errors": "surrogateescape"}
_RECV_SIZE = 65536
_FLUENTD_READ = 16384  # cool.io's read size, by which in_forward counts a chunk's size


# ---------------------------------------------------------------------------------------------
# Digests (Digest::SHA512 chains of fluentd's in_forward / out_forward)
# ---------------------------------------------------------------------------------------------

def _as_bytes(value: str | bytes | bytearray | memoryview) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"expected str or bytes, got {type(value).__name__}")


def _as_text(value):
    """A str as is, bytes decoded (a Ruby peer may send either), anything else repr()'d; None stays."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "surrogateescape")
    return repr(value)


def ping_digest(salt: str | bytes, hostname: str | bytes, nonce: str | bytes,
                shared_key: str | bytes) -> str:
    """sha512_hex(salt + hostname + nonce + shared_key).

    The PING's digest (salt = the client's shared_key_salt, hostname = the client's hostname) and
    the PONG's digest (same salt and nonce, hostname = the server's hostname).
    """
    digest = hashlib.sha512()
    for part in (salt, hostname, nonce, shared_key):
        digest.update(_as_bytes(part))
    return digest.hexdigest()


def password_digest(auth_salt: str | bytes, username: str | bytes, password: str | bytes) -> str:
    """sha512_hex(auth_salt + username + password), the PING's password digest."""
    digest = hashlib.sha512()
    for part in (auth_salt, username, password):
        digest.update(_as_bytes(part))
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# What the peer records
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EventTime:
    """A decoded msgpack ext type 0 (fluentd EventTime); not a tuple, so never taken for an array."""

    seconds: int
    nanoseconds: int

    def to_float(self) -> float:
        return self.seconds + self.nanoseconds / 1e9


@dataclass(frozen=True, eq=True)
class Event:
    """One event as received. ``nanos`` is the EventTime nanoseconds, None for an integer time."""

    tag: str
    time: float
    nanos: int | None
    record: dict
    mode: str
    chunk: str | bytes | None
    connection: int


@dataclass(frozen=True, eq=True)
class MessageInfo:
    """One forward-protocol message as received (``entries``: events it carried)."""

    tag: str
    mode: str
    chunk: str | bytes | None
    option: dict
    entries: int
    size: int | None          # the declared ``size`` option, None when absent
    compressed: str | None    # the ``compressed`` option ("gzip"), None when not compressed
    connection: int
    nbytes: int               # the message's encoded length on the wire
    # When the whole message had been received and decoded (time.time(), time.monotonic());
    # not part of equality.
    received: float = field(default=0.0, compare=False)
    received_monotonic: float = field(default=0.0, compare=False)


class AckInfo(NamedTuple):
    """One acknowledgement sent: the chunk id and when (taken just before it is written to the socket)."""

    chunk: str | bytes
    wall: float        # time.time()
    monotonic: float   # time.monotonic()
    connection: int


class Handshake(NamedTuple):
    """One shared-key handshake outcome; compares equal to ``(hostname, username, ok, reason)``."""

    hostname: str | None
    username: str | None
    ok: bool
    reason: str


class TLSClient(NamedTuple):
    """One TLS handshake: the name the client asked for (SNI, None without) and its certificate's
    commonName or first subjectAltName (None: no client certificate)."""

    server_name: str | None
    client_cert: str | None


class ProtocolError(Exception):
    """Something the peer refuses; the message is not recorded and the connection is closed."""


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

def _ext_hook(code: int, data: bytes):
    if code == 0 and len(data) == 8:
        seconds, nanoseconds = struct.unpack(">II", data)
        return EventTime(seconds, nanoseconds)
    return msgpack.ExtType(code, data)


def _unpacker(**extra) -> msgpack.Unpacker:
    return msgpack.Unpacker(ext_hook=_ext_hook, **_UNPACK_OPTIONS, **extra)


def _decode_time(value, notes: list[str]) -> tuple[float, int | None]:
    if isinstance(value, EventTime):
        if value.nanoseconds >= 1_000_000_000:
            notes.append(f"EventTime nanoseconds out of range: {value.nanoseconds}")
        return value.to_float(), value.nanoseconds
    if isinstance(value, bool):
        raise ProtocolError(f"invalid event time {value!r}")
    if isinstance(value, int):
        return float(value), None
    if isinstance(value, float):
        notes.append(f"float event time {value!r} (the spec allows integer or EventTime)")
        return value, None
    if value is None:
        # in_forward replaces a missing time by the current time
        notes.append("event without time (replaced by the current time)")
        return time.time(), None
    raise ProtocolError(f"invalid event time {value!r}")


def _decompress(data: bytes, method: str) -> bytes:
    if method == "gzip":
        return gzip.decompress(data)  # every concatenated member
    if method == "zstd":
        try:
            from compression import zstd  # Python 3.14
        except ImportError:
            try:
                from backports import zstd  # type: ignore[no-redef]
            except ImportError as exc:
                raise ProtocolError("zstd compression but no zstd module") from exc
        return zstd.decompress(data)
    raise ProtocolError(f"unknown compression {method!r}")


def _packed_entries(data: bytes) -> list:
    unpacker = _unpacker(max_buffer_size=max(len(data), 1024))
    unpacker.feed(data)
    entries, end = [], 0
    for entry in unpacker:
        entries.append(entry)
        end = unpacker.tell()  # tell() also advances into a partial object: read it per entry
    if end != len(data):
        raise ProtocolError(f"packed entries truncated: {len(data) - end} trailing bytes")
    return entries


def decode_message(message) -> tuple[str, str, list[tuple], dict, str | None, list[str]]:
    """(tag, mode, [(time, nanos, record)], option, compressed, notes) of one forward message."""
    if not isinstance(message, (list, tuple)):
        raise ProtocolError(f"message is not an array: {message!r:.200}")
    if len(message) < 2:
        raise ProtocolError(f"message too short: {message!r:.200}")
    tag = message[0]
    if not isinstance(tag, str):
        raise ProtocolError(f"tag is not a string: {tag!r:.100}")
    notes: list[str] = []
    second = message[1]
    compressed = None
    if isinstance(second, (list, tuple)):
        mode = "Forward"
        if len(message) > 3:
            raise ProtocolError(f"Forward message with {len(message)} elements")
        raw_entries = second
        option = message[2] if len(message) == 3 else None
    elif isinstance(second, (bytes, str)):
        if len(message) > 3:
            raise ProtocolError(f"PackedForward message with {len(message)} elements")
        option = message[2] if len(message) == 3 else None
        data = _as_bytes(second)
        if isinstance(option, dict) and option.get("compressed") is not None:
            compressed = option["compressed"]
            mode = "CompressedPackedForward"
            try:
                data = _decompress(data, compressed)
            except (OSError, EOFError, ValueError) as exc:
                raise ProtocolError(f"cannot decompress {compressed} entries: {exc}") from exc
        else:
            mode = "PackedForward"
        try:
            raw_entries = _packed_entries(data)
        except (ValueError, msgpack.UnpackException) as exc:
            raise ProtocolError(f"cannot unpack {mode} entries: {exc}") from exc
    else:
        mode = "Message"
        if len(message) not in (3, 4):
            raise ProtocolError(f"Message with {len(message)} elements")
        raw_entries = [[second, message[2]]]
        option = message[3] if len(message) == 4 else None
    if option is None:
        option = {}
    if not isinstance(option, dict):
        raise ProtocolError(f"option is not a map: {option!r:.200}")
    entries = []
    for entry in raw_entries:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ProtocolError(f"{mode} entry is not [time, record]: {entry!r:.200}")
        when, record = entry
        if not isinstance(record, dict):
            raise ProtocolError(f"{mode} record is not a map: {record!r:.200}")
        seconds, nanos = _decode_time(when, notes)
        entries.append((seconds, nanos, record))
    size = option.get("size")
    if size is not None and size != len(entries):
        notes.append(f"{mode} message declares size {size!r} but carries {len(entries)} entries")
    return tag, mode, entries, option, compressed, notes


# ---------------------------------------------------------------------------------------------
# The peer
# ---------------------------------------------------------------------------------------------

class _Connection:
    def __init__(self, number: int, sock: socket.socket, address):
        self.number = number
        self.sock = sock
        self.address = address
        self.closing = threading.Event()
        self.thread: threading.Thread | None = None

    def shutdown(self) -> None:
        """Wake the connection's thread (called under the peer lock while registered)."""
        self.closing.set()
        try:
            # the plain socket's shutdown, also for an SSLSocket: never touch its SSL state here
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass


class ForwardPeer:
    """A forward-protocol server on 127.0.0.1:<free port>, one thread per connection."""

    def __init__(self, tls: ssl.SSLContext | None = None, shared_key: str | None = None,
                 users: dict[str, str] | None = None, server_hostname: str = "peer", flavor: str = "fluentd",
                 deny_keepalive: bool = False, chunk_size_limit: int | None = None):
        self.deny_keepalive = deny_keepalive
        self.chunk_size_limit = chunk_size_limit
        if users and shared_key is None:
            raise ValueError("user authentication needs a shared_key (as in fluentd's <security>)")
        if flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {FLAVORS}, got {flavor!r}")
        self.flavor = flavor
        self.tls = tls
        if tls is not None and tls.sni_callback is None:
            tls.sni_callback = _note_server_name
        self.shared_key = shared_key
        self.users = dict(users or {})
        self.server_hostname = server_hostname

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._events: list[Event] = []
        self._messages: list[MessageInfo] = []
        self._handshakes: list[Handshake] = []
        self._errors: list[str] = []
        self._acks: list = []
        self._ack_log: list[AckInfo] = []
        self._dropped_acks: list = []
        self._connections_accepted = 0
        self._tls_handshakes = 0
        self._mid_batch_closes = 0
        self._close_notifies = 0
        self._unclean_tls_closes = 0
        self._tls_clients: list[TLSClient] = []
        self._next_connection = 0
        self._open: dict[int, _Connection] = {}

        self._drop_acks: int | None = 0     # None: every ack
        self._close_mid_batch = 0
        self._ack_delay = 0.0
        self._raw_answers: list[bytes] = []   # sent instead of the next acks, one per chunk
        self._raw_helos: list[bytes] = []     # sent instead of the HELO of the next connections
        self._raw_sent = 0
        self._oversized: list = []            # chunk ids dropped over chunk_size_limit

        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._down = False
        self._stopped = False
        self._state_lock = threading.Lock()  # serialises set_down / stop
        self.port = 0
        self._listen()

    # -- addresses ----------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __repr__(self) -> str:
        return f"<ForwardPeer {self.address}{' down' if self._down else ''}>"

    def __enter__(self) -> ForwardPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- recorded data ------------------------------------------------------------------------

    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def records(self) -> list[dict]:
        with self._lock:
            return [event.record for event in self._events]

    def messages(self) -> list[MessageInfo]:
        with self._lock:
            return list(self._messages)

    def errors(self) -> list[str]:
        with self._lock:
            return list(self._errors)

    def acks(self) -> list:
        """Chunk ids acknowledged (each noted just before its ack is written), in order."""
        with self._lock:
            return list(self._acks)

    def ack_log(self) -> list[AckInfo]:
        """Every ack sent, with when it was sent (``acks()`` with times and connections), in order."""
        with self._lock:
            return list(self._ack_log)

    def dropped_acks(self) -> list:
        """Chunk ids whose ack was withheld by ``drop_acks``."""
        with self._lock:
            return list(self._dropped_acks)

    def oversized(self) -> list:
        """Chunk ids (None for a message without one) dropped unanswered over ``chunk_size_limit``."""
        with self._lock:
            return list(self._oversized)

    @property
    def handshakes(self) -> list[Handshake]:
        with self._lock:
            return list(self._handshakes)

    @property
    def connections(self) -> int:
        """Connections accepted (since creation or the last ``clear()``)."""
        with self._lock:
            return self._connections_accepted

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    @property
    def tls_handshakes(self) -> int:
        with self._lock:
            return self._tls_handshakes

    @property
    def mid_batch_closes(self) -> int:
        with self._lock:
            return self._mid_batch_closes

    @property
    def close_notifies(self) -> int:
        """TLS connections the client ended with close_notify."""
        with self._lock:
            return self._close_notifies

    @property
    def unclean_tls_closes(self) -> int:
        """TLS connections the client ended without close_notify (Fluentd and Fluent Bit log an SSL error)."""
        with self._lock:
            return self._unclean_tls_closes

    def tls_clients(self) -> list[TLSClient]:
        """Every TLS handshake: the server name the client sent (SNI) and its certificate, in order."""
        with self._lock:
            return list(self._tls_clients)

    def clear(self) -> None:
        """Forget everything recorded (events, messages, handshakes, errors, acks, counters)."""
        with self._lock:
            self._events.clear()
            self._messages.clear()
            self._handshakes.clear()
            self._errors.clear()
            self._acks.clear()
            self._ack_log.clear()
            self._dropped_acks.clear()
            self._oversized.clear()
            self._connections_accepted = 0
            self._tls_handshakes = 0
            self._mid_batch_closes = 0
            self._close_notifies = self._unclean_tls_closes = 0
            self._tls_clients.clear()

    def wait_events(self, count: int, timeout: float = 10.0) -> list[Event]:
        """Block until at least ``count`` events were recorded; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._events) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out after {timeout}s waiting for {count} events "
                        f"(got {len(self._events)}; errors: {self._errors})")
                self._changed.wait(remaining)
            return list(self._events)

    def wait_for(self, predicate, timeout: float = 10.0, message: str = "condition"):
        """Block until ``predicate(peer)`` is truthy (re-checked whenever something is recorded)."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self)
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {message}")
            with self._changed:
                self._changed.wait(min(remaining, 0.05))

    # -- fault controls -----------------------------------------------------------------------

    def drop_acks(self, n: int | None) -> None:
        """Withhold the ack of the next ``n`` chunks (None: every chunk until ``drop_acks(0)``).

        The events are still recorded: the agent must resend, and duplicates appear.
        """
        if n is not None and n < 0:
            raise ValueError("n must be >= 0 or None")
        with self._lock:
            self._drop_acks = n

    def close_mid_batch(self, n: int = 1) -> None:
        """For the next ``n`` messages, close the connection on their first bytes, recording nothing.

        The peer closes as soon as it reads the first bytes of a new message (after any
        handshake); whatever came in that read is discarded unprocessed.
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._close_mid_batch = n

    def ack_delay(self, seconds: float) -> None:
        """Wait ``seconds`` after recording a chunk before acknowledging it."""
        with self._lock:
            self._ack_delay = max(0.0, float(seconds))

    def answer_with(self, *answers: bytes) -> None:
        """Answer the next ``len(answers)`` chunks with these raw bytes instead of their ack.

        The events are still recorded, the connection stays open: the agent must notice, drop the
        connection and resend. ``raw_sent`` counts the answers sent so far.
        """
        with self._lock:
            self._raw_answers.extend(answers)

    def helo_with(self, *helos: bytes) -> None:
        """Greet the next ``len(helos)`` connections with these raw bytes instead of the HELO (shared_key only)."""
        with self._lock:
            self._raw_helos.extend(helos)

    @property
    def raw_sent(self) -> int:
        with self._lock:
            return self._raw_sent

    def _take_raw(self, queue: list[bytes]) -> bytes | None:
        with self._lock:
            if not queue:
                return None
            self._raw_sent += 1
            self._changed.notify_all()
            return queue.pop(0)

    def set_down(self, down: bool) -> None:
        """Down: stop listening (connections are refused) and close every open connection.

        Up again: listen on the same port. Both return once the change is in effect.
        """
        with self._state_lock:
            if self._stopped:
                raise RuntimeError("peer stopped")
            if down == self._down:
                return
            if down:
                self._down = True
                self._stop_listening()
                self._close_connections()
            else:
                self._listen()
                self._down = False

    @property
    def down(self) -> bool:
        return self._down

    def stop(self) -> None:
        with self._state_lock:
            if self._stopped:
                return
            self._stopped = True
            self._stop_listening()
            self._close_connections()

    # -- listening ----------------------------------------------------------------------------

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 5.0
        while True:
            try:
                listener.bind(("127.0.0.1", self.port))
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or not self.port or time.monotonic() > deadline:
                    listener.close()
                    raise
                time.sleep(0.02)
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(listener, self._wake_r),
            name=f"forward-peer-accept-{self.port}", daemon=True)
        self._accept_thread.start()

    def _stop_listening(self) -> None:
        if self._accept_thread is None:
            return
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._accept_thread.join(10)
        # the accept thread closed the listener; the wake pair is ours
        self._wake_w.close()
        self._wake_r.close()
        self._accept_thread = self._listener = self._wake_r = self._wake_w = None

    def _accept_loop(self, listener: socket.socket, wake: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ, "listener")
        selector.register(wake, selectors.EVENT_READ, "wake")
        try:
            while True:
                ready = [key.data for key, _ in selector.select()]
                if "wake" in ready:
                    return
                try:
                    raw, address = listener.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                except OSError as exc:  # EMFILE and the like: note it, keep listening
                    self._error(f"accept failed: {exc}")
                    time.sleep(0.05)
                    continue
                self._start_connection(raw, address)
        finally:
            selector.close()
            listener.close()

    def _start_connection(self, raw: socket.socket, address) -> None:
        raw.setblocking(True)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = raw
        if self.tls is not None:
            try:
                # suppress_ragged_eofs=False: a close without close_notify raises SSLEOFError
                sock = self.tls.wrap_socket(raw, server_side=True, do_handshake_on_connect=False,
                                            suppress_ragged_eofs=False)
            except (OSError, ValueError) as exc:
                raw.close()
                self._error(f"cannot wrap connection in TLS: {exc}")
                return
        with self._lock:
            self._next_connection += 1
            self._connections_accepted += 1
            conn = _Connection(self._next_connection, sock, address)
            self._open[conn.number] = conn
            self._changed.notify_all()
        conn.thread = threading.Thread(target=self._serve, args=(conn,),
                                       name=f"forward-peer-conn-{conn.number}", daemon=True)
        conn.thread.start()

    def _close_connections(self) -> None:
        with self._lock:
            connections = list(self._open.values())
            for conn in connections:
                conn.shutdown()
        current = threading.current_thread()
        for conn in connections:
            if conn.thread is not None and conn.thread is not current:
                conn.thread.join(10)

    # -- one connection -----------------------------------------------------------------------

    def _error(self, text: str) -> None:
        with self._lock:
            self._errors.append(text)
            self._changed.notify_all()

    def _serve(self, conn: _Connection) -> None:
        sock = conn.sock
        try:
            if self.tls is not None:
                try:
                    sock.do_handshake()
                except (OSError, ValueError) as exc:
                    if not conn.closing.is_set():
                        self._error(f"connection {conn.number}: TLS handshake failed: {exc}")
                    return
                with self._lock:
                    self._tls_handshakes += 1
                    self._tls_clients.append(TLSClient(_SERVER_NAMES.pop(sock, None), _cert_name(sock)))
            self._converse(conn)
        except (ssl.SSLEOFError, ConnectionResetError):
            if self.tls is not None and not conn.closing.is_set():
                self._client_closed(conn, clean=False)
        except (OSError, ValueError):
            pass  # the client went away, or set_down/stop closed us
        finally:
            with self._lock:
                self._open.pop(conn.number, None)
                self._changed.notify_all()
            try:
                sock.close()
            except OSError:
                pass

    def _converse(self, conn: _Connection) -> None:
        sock = conn.sock
        established = self.shared_key is None
        nonce = auth_salt = b""
        if not established:
            # Both send a random auth salt whenever the handshake runs, users or not.
            nonce, auth_salt = os.urandom(16), os.urandom(16)
            raw = self._take_raw(self._raw_helos)
            sock.sendall(raw if raw is not None else self._helo(nonce, auth_salt))
            if self.flavor == "fluentbit":
                if not self._fluentbit_ping(conn, nonce, auth_salt):
                    return
                established = True
        unpacker = _unpacker()
        # Unpacker.tell() also advances inside a partly received object, so the position where
        # the last complete message ended is kept here: the next message starts there.
        fed = boundary = 0
        # in_forward's chunk_size: the bytes of the reads since the last message was complete
        read_size, unaccounted = (_FLUENTD_READ if self.chunk_size_limit is not None else _RECV_SIZE), 0
        while not conn.closing.is_set():
            data = sock.recv(read_size)
            if not data:
                self._client_closed(conn, clean=True)
                return
            if established and fed == boundary and self._take_mid_batch_close():
                return  # the first bytes of a new message: close without processing
            unpacker.feed(data)
            fed += len(data)
            unaccounted += len(data)
            processed = False
            while True:
                try:
                    message = unpacker.unpack()
                except msgpack.OutOfData:
                    break
                except (ValueError, msgpack.UnpackException) as exc:
                    self._error(f"connection {conn.number}: undecodable msgpack: {exc!r}")
                    return
                end = unpacker.tell()
                nbytes, boundary = end - boundary, end
                chunk_size, unaccounted = unaccounted, 0
                if not established:
                    established = self._check_ping(sock, message, nonce, auth_salt)
                    if not established:
                        return
                    continue
                if message is None:
                    continue  # in_forward: reserved for a future TCP heartbeat
                processed = True
                if self.chunk_size_limit is not None and chunk_size > self.chunk_size_limit:
                    self._drop_oversized(message)
                    continue
                if not self._on_message(conn, message, nbytes):
                    return
                if conn.closing.is_set():
                    return
            if processed and self.deny_keepalive:
                return  # in_forward deny_keepalive: closed once the answers are written

    def _drop_oversized(self, message) -> None:
        """in_forward on_message over chunk_size_limit: dropped, not recorded, not answered."""
        option = message[-1] if isinstance(message, (list, tuple)) and message else None
        with self._lock:
            self._oversized.append(option.get("chunk") if isinstance(option, dict) else None)
            self._changed.notify_all()

    def _take_mid_batch_close(self) -> bool:
        with self._lock:
            if self._close_mid_batch <= 0:
                return False
            self._close_mid_batch -= 1
            self._mid_batch_closes += 1
            self._changed.notify_all()
            return True

    @staticmethod
    def _send(sock: socket.socket, obj) -> None:
        sock.sendall(msgpack.packb(obj, use_bin_type=True))

    def _client_closed(self, conn: _Connection, clean: bool) -> None:
        """The client ended a TLS connection: count whether it sent close_notify (and answer one)."""
        if self.tls is None or conn.closing.is_set():
            return
        with self._lock:
            if clean:
                self._close_notifies += 1
            else:
                self._unclean_tls_closes += 1
            self._changed.notify_all()
        if clean:
            try:
                conn.sock.settimeout(1.0)
                conn.sock.unwrap()
            except (OSError, ValueError):
                pass

    def _helo(self, nonce: bytes, auth_salt: bytes) -> bytes:
        if self.flavor == "fluentbit":
            # fw_prot.c send_helo: {nonce, auth} as str of raw bytes (use_bin_type=False), no keepalive
            return msgpack.packb(["HELO", {"nonce": nonce, "auth": auth_salt}], use_bin_type=False)
        # in_forward generate_helo: ['HELO', {'nonce', 'auth', 'keepalive'}], Ruby binary strings as bin
        return msgpack.packb(["HELO", {"nonce": nonce, "auth": auth_salt, "keepalive": not self.deny_keepalive}],
                             use_bin_type=True)

    def _fluentbit_ping(self, conn: _Connection, nonce: bytes, auth_salt: bytes) -> bool:
        """fw_prot.c check_ping + send_pong; True when the client is authenticated.

        The PING must come whole in one read (secure_forward_read: at most 1023 bytes, whatever
        else that read brought is lost), every field a str; a wrong shared key closes with no PONG.
        """
        data = conn.sock.recv(1023)
        if not data:
            self._client_closed(conn, clean=True)
            return False
        unpacker = _unpacker()
        unpacker.feed(data)
        try:
            message = unpacker.unpack()
        except (ValueError, msgpack.UnpackException, msgpack.OutOfData):
            self._record_handshake(None, None, False, "handshake error expecting PING")
            return False
        hostname = username = None
        if not isinstance(message, (list, tuple)) or len(message) != 6:
            reason = "Invalid PING message"
        elif not isinstance(message[0], str):
            reason = "Invalid PING type message"
        elif message[0] != "PING":
            reason = "handshake error checking PING"
        else:
            fields = dict(zip(("hostname", "shared_key_salt", "shared_key_digest", "username", "password_digest"),
                              message[1:]))
            hostname, username = _as_text(fields["hostname"]), _as_text(fields["username"])
            wrong = [name for name, value in fields.items() if not isinstance(value, str)]
            reason = f"Invalid {wrong[0]} type message" if wrong else ""
        if reason:
            self._record_handshake(hostname, username, False, reason)
            return False
        salt = fields["shared_key_salt"]
        if fields["shared_key_digest"] != ping_digest(salt, fields["hostname"], nonce, self.shared_key):
            self._record_handshake(hostname, username, False, "shared_key mismatch")
            return False  # no PONG: the connection is closed
        if self.users and not (username in self.users and fields["password_digest"]
                               == password_digest(auth_salt, username, self.users[username])):
            self._record_handshake(hostname, username, False, "username/password mismatch")
            self._send(conn.sock, ["PONG", False, "username/password mismatch", "", ""])
            return False
        self._record_handshake(hostname, username, True, "")
        self._send(conn.sock, ["PONG", True, "", self.server_hostname,
                               ping_digest(salt, self.server_hostname, nonce, self.shared_key)])
        return True

    def _check_ping(self, sock: socket.socket, message, nonce: bytes, auth_salt: bytes) -> bool:
        """in_forward check_ping + generate_pong; True when the client is authenticated."""
        hostname = username = None
        try:
            if not (isinstance(message, (list, tuple)) and len(message) == 6 and message[0] == "PING"):
                raise ProtocolError("invalid ping message")
            _, raw_hostname, shared_key_salt, shared_key_hexdigest, username, passwd_digest = message
            hostname = _as_text(raw_hostname)
            username = _as_text(username)
            if not isinstance(raw_hostname, (str, bytes)) or not isinstance(shared_key_salt, (str, bytes)):
                raise ProtocolError("invalid ping message")
            expected = ping_digest(shared_key_salt, raw_hostname, nonce, self.shared_key)
            if _as_text(shared_key_hexdigest) != expected:
                raise ProtocolError("shared_key mismatch")
            if self.users:
                if not (username in self.users and _as_text(passwd_digest)
                        == password_digest(auth_salt, username, self.users[username])):
                    raise ProtocolError("username/password mismatch")
        except ProtocolError as exc:
            reason = str(exc)
            self._record_handshake(hostname, username, False, reason)
            self._send(sock, ["PONG", False, reason, "", ""])
            return False
        self._record_handshake(hostname, username, True, "")
        self._send(sock, ["PONG", True, "", self.server_hostname,
                          ping_digest(shared_key_salt, self.server_hostname, nonce, self.shared_key)])
        return True

    def _record_handshake(self, hostname, username, ok: bool, reason: str) -> None:
        with self._lock:
            self._handshakes.append(Handshake(hostname, username, ok, reason))
            self._changed.notify_all()

    def _on_message(self, conn: _Connection, message, nbytes: int) -> bool:
        """Decode, record and acknowledge one message; False closes the connection."""
        try:
            tag, mode, entries, option, compressed, notes = decode_message(message)
        except ProtocolError as exc:
            self._error(f"connection {conn.number}: {exc}")
            return False
        chunk = option.get("chunk")
        size = option.get("size")
        received, received_monotonic = time.time(), time.monotonic()
        with self._lock:
            self._errors.extend(f"connection {conn.number}: {note}" for note in notes)
            self._messages.append(MessageInfo(
                tag, mode, chunk, option, len(entries), size if isinstance(size, int) else None,
                compressed, conn.number, nbytes, received, received_monotonic))
            self._events.extend(Event(tag, seconds, nanos, record, mode, chunk, conn.number)
                                for seconds, nanos, record in entries)
            self._changed.notify_all()
            if chunk is None:
                return True
            delay = self._ack_delay
        if delay and conn.closing.wait(delay):
            return False
        raw = self._take_raw(self._raw_answers)
        if raw is not None:
            conn.sock.sendall(raw)
            return True
        with self._lock:
            if self._drop_acks is None or self._drop_acks > 0:
                if self._drop_acks is not None:
                    self._drop_acks -= 1
                self._dropped_acks.append(chunk)
                self._changed.notify_all()
                return True
            # noted before it is written, so whoever reads the ack finds it in acks()
            self._acks.append(chunk)
            self._ack_log.append(AckInfo(chunk, time.time(), time.monotonic(), conn.number))
            self._changed.notify_all()
        self._send(conn.sock, {"ack": chunk})
        return True


# ---------------------------------------------------------------------------------------------
# TLS material and pytest fixtures
# ---------------------------------------------------------------------------------------------

# The server name (SNI) each TLS connection asked for, noted by the context's sni_callback.
_SERVER_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _note_server_name(sock, name, context) -> None:
    if name is not None:
        _SERVER_NAMES[sock] = name


def _cert_name(sock: ssl.SSLSocket) -> str | None:
    """The client certificate's commonName, else its first subjectAltName; None without one."""
    cert = sock.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    names = cert.get("subjectAltName", ())
    return names[0][1] if names else ""


def tls_certificates(directory: Path | str) -> tuple[ssl.SSLContext, Path]:
    """(server SSLContext, CA PEM path) for a certificate valid for 127.0.0.1 and localhost."""
    import trustme

    ca = trustme.CA()
    certificate = ca.issue_cert("127.0.0.1", "localhost")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate.configure_cert(context)
    path = Path(directory) / "forward-peer-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return context, path


@pytest.fixture
def forward_peer():
    """A plain forward peer (no TLS, no handshake), stopped at teardown."""
    peer = ForwardPeer()
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def make_forward_peer():
    """Factory ``make_forward_peer(**kwargs)`` of ForwardPeers, all stopped at teardown."""
    peers: list[ForwardPeer] = []

    def make(**kwargs) -> ForwardPeer:
        peer = ForwardPeer(**kwargs)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.stop()


@pytest.fixture
def forward_tls(tmp_path):
    """(server SSLContext, CA PEM path) from ``tls_certificates``."""
    return tls_certificates(tmp_path)
