"""The Fluentd output: Forward protocol over TCP (or TLS), every chunk acknowledged.

Each batch becomes one chunk (a Forward mode message with a unique ``chunk`` id), or several
of at most ``max_chunk_bytes``, confirmed together. Chunks are sent in order, up to
``max_in_flight`` of them unacknowledged per connection; a chunk is confirmed only when
``{"ack": id}`` comes back (``require_ack``). A connection that breaks, or a chunk not
acknowledged within ``ack_timeout``, sends every unacknowledged chunk again (the acks the
server sent before it closed are read first), each after a backoff of its own, possibly to
another host: duplicates are bounded by the chunks in flight, and a chunk cannot go again in
a loop. A chunk that goes unanswered twice is split in two (a receiver's chunk size limit); a
server that closes after each chunk (deny_keepalive) gets one chunk per connection.
``balance = "failover"``: hosts are tried in order (standbys last); while on a later one, the
earlier ones are tried again every ``failback_interval``. ``"round_robin"``: each chunk goes to
the next host by weight; the standbys only while the others are down.

All socket I/O happens in the output's runner thread (TLS objects are not for several
threads); a watcher thread only waits for the socket to become readable and wakes the runner.

The peer is not trusted: an answer that is not msgpack, not ``{"ack": id}``, too long, or a
HELO/PONG with wrong types closes the connection (counted as ``protocol_errors``, logged once
per host), the unacknowledged chunks go again, and the host waits out a backoff. Reading is
bounded per delivery and the handshake by ``connect_timeout`` as a whole.
"""

from __future__ import annotations

import collections
import functools
import logging
import random
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

import msgpack

from shipper.acks import Acknowledgement
from shipper.config import Option
from shipper.errors import BufferFull, RetryableError
from shipper.outputs.base import Output
from shipper.outputs.forward_hosts import (
    Host, balance_problems, check_hosts, host_problems, make_hosts, weighted_rotation,
)
from shipper.outputs.forward_tls import TLSSetupError, close_socket, tls_context
from shipper.outputs.forward_protocol import (
    AnswerReader, HandshakeError, HandshakeRefused, PeerError, acked_chunk, check_pong, entry_runs,
    forward_message, new_chunk_id, ping, split_entries,
)
from shipper.record import Batch

log = logging.getLogger(__name__)

# Bytes read from a peer per delivery at most: a peer that never stops talking cannot hold the runner.
READ_BUDGET = 1024 * 1024
# A chunk sent this many times and never acknowledged is split in two before it goes again (a receiver
# drops chunks over its size limit without an answer) ...
SPLIT_AFTER = 2
# ... unless it is this small already (no receiver limits chunks that far).
MIN_SPLIT_BYTES = 16 * 1024
# Chunks are never cut smaller than this for a receiver that drops bigger ones (see _lower_chunk_limit).
LOWEST_CHUNK_LIMIT = 64 * 1024
# A host that closed this many connections in a row right after acknowledging a chunk (with more in
# flight) gets one chunk per connection: it does not keep connections (deny_keepalive).
EARLY_CLOSES = 2
# What a send or read raises on a connection the server closed.
CLOSED_BY_PEER = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, ssl.SSLEOFError,
                  ssl.SSLZeroReturnError)
# The bytes of a forward message besides its tag and entries: array headers, the option map (chunk id, size, compressed).
MESSAGE_OVERHEAD = 128


OPTIONS = {
    "hosts": Option("list", check=check_hosts),
    "tag_prefix": Option("str", ""),
    "require_ack": Option("bool", True),
    "ack_timeout": Option("duration", 30.0, minimum=0.05),
    "send_timeout": Option("duration", 10.0, minimum=0.05),
    "connect_timeout": Option("duration", 5.0, minimum=0.05),
    "failback_interval": Option("duration", 30.0, minimum=0.1),
    "max_in_flight": Option("int", 16, minimum=1),
    # A chunk (one forward message) is at most this long: batches are cut to fit. Fluentd's in_forward
    # drops bigger ones unanswered when chunk_size_limit is set (no limit by default; it counts the
    # bytes of its 16 KiB reads, hence the margin under 1 MiB); Fluent Bit's closes the connection
    # past buffer_max_size (6,144,000 by default).
    "max_chunk_bytes": Option("size", 1024**2 - 64 * 1024, minimum=1024, maximum=256 * 1024**2),
    "balance": Option("choice", "failover", choices=("failover", "round_robin")),
    "compression": Option("choice", "none", choices=("none", "gzip")),
    "tls": Option("bool", False),
    "tls_ca": Option("str", ""),
    "tls_verify": Option("bool", True),              # the certificate chain (false: neither is checked)
    "tls_verify_hostname": Option("bool", True),     # the name in the certificate (apart from the chain)
    "tls_server_name": Option("str", ""),            # SNI and the name checked; "": the host's name
    "tls_cert": Option("str", ""),                   # client certificate (PEM) for mutual TLS
    "tls_key": Option("str", ""),                    # its private key (PEM); "": in tls_cert
    "time_as_integer": Option("bool", False),        # integer seconds, for receivers before Fluentd 0.14
    "shared_key": Option("str", ""),
    "self_hostname": Option("str", ""),
    "username": Option("str", ""),
    "password": Option("str", ""),
}


def validate(settings) -> list[str]:
    where = settings.where
    problems = []
    for key in ("tls_ca", "tls_cert", "tls_key", "tls_server_name"):
        if settings.get(key) and not settings.get("tls"):
            problems.append(f"{where}.{key}: only used with tls = true")
    if settings.get("tls_key") and not settings.get("tls_cert"):
        problems.append(f"{where}.tls_key: the key of a client certificate: set tls_cert too")
    hosts = settings.get("hosts")
    tables = host_problems(where, hosts) if hosts is not None else []
    problems.extend(tables)
    problems.extend(balance_problems(where, hosts) if hosts is not None and not tables else [])
    # A username without a shared key, per host (a host's own keys, or the output's).
    logins = [(None, None)] if hosts is None or tables else [(i, h) for i, h in enumerate(make_hosts(hosts))]
    for at in dict.fromkeys(_login_without_key(where, settings, index, host) for index, host in logins):
        if at:
            problems.append(f"{at}: the user login is part of the shared_key handshake; set shared_key too")
    if settings.get("tls") and not problems:
        try:
            tls_context(settings)
        except TLSSetupError as exc:
            problems.append(f"{where}.{exc.key}: {exc}")
    return problems


def _login_without_key(where: str, settings, index: int | None, host: Host | None) -> str | None:
    """The username key set for a host that has no shared key, or None."""
    key, username = settings.get("shared_key"), settings.get("username")
    if host is not None:
        key = key if host.shared_key is None else host.shared_key
        username = username if host.username is None else host.username
    if not username or key:
        return None
    return f"{where}.username" if host is None or host.username is None else f"{where}.hosts[{index}].username"


def _confirm_all(acks: list) -> None:
    for ack in acks:
        ack.confirm()


@dataclass
class Chunk:
    chunk_id: str
    payload: bytes
    acks: list                 # what to confirm once it is acknowledged (a batch's, or a countdown's)
    records: int
    tag: str = ""
    sent_at: float = 0.0
    seq: int = 0               # its place among the chunks sent on its connection
    misses: int = 0            # times it was sent and never acknowledged (whatever the reason)
    not_before: float = 0.0    # monotonic: after a miss, not sent again before (a bounded backoff)
    # Times the receiver had it and did not answer: no ack within ack_timeout, or refused (below).
    unanswered: int = 0
    # In its last flight, the receiver took a chunk sent after it on the same connection but not this
    # one, or closed a connection that carried only this chunk: it drops chunks like this one.
    refused: bool = False
    split_from: int = 0        # the bytes of the chunk it is half of, when that went unanswered


@dataclass(eq=False)  # compared by identity (the output keeps a list of them)
class Connection:
    """One open connection: the socket, what was read of it, and a watcher that wakes the runner."""

    sock: socket.socket
    host: Host
    index: int                          # the host's place in the failover order
    opened: float = field(default_factory=time.monotonic)
    reader: AnswerReader = field(default_factory=AnswerReader)
    closed: bool = False
    readable: threading.Event = field(default_factory=threading.Event)
    in_flight: dict = field(default_factory=dict)   # chunk id -> Chunk sent on it, not acknowledged yet
    sent: int = 0
    acked: int = 0

    def watch(self, wake) -> None:
        """Wake the runner when the socket has something to read (the runner reads, then re-arms)."""
        self.readable.set()

        def run() -> None:
            while not self.closed:
                if not self.readable.wait(0.5):
                    continue
                try:
                    ready, _, _ = select.select([self.sock], [], [], 0.5)
                except (OSError, ValueError):  # closed under us
                    return
                if ready:
                    self.readable.clear()
                    wake()

        threading.Thread(target=run, name=f"fluentd-watch-{self.host}", daemon=True).start()

    def close(self) -> None:
        self.closed = True
        self.readable.set()  # the watcher ends now, not half a second later (one chunk per connection: many)
        close_socket(self.sock)


class FluentdOutput(Output):
    encoding = None  # entries are packed from the batch, in this output's thread

    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.hosts = make_hosts(settings.hosts)
        self.self_hostname = settings.self_hostname or context.envelope.identity.get("host") or socket.gethostname()
        self.tls = self._tls_context() if settings.tls else None
        self.queue: collections.deque[Chunk] = collections.deque()   # to send, in order
        # Open connections, each with its chunks in flight: failover uses one at a time,
        # round_robin one per host in its turn.
        self.conns: list[Connection] = []
        self.failing_since: float | None = None
        self.queued_bytes = 0  # payloads accepted and not yet sent
        self.misbehaving: set[str] = set()  # hosts whose protocol error was logged already
        # Failover order: the hosts as listed, standbys last. Round robin: a cycle of the hosts that
        # are no standby, each as often as its weight, and one of the standbys.
        self.order = [h for h in self.hosts if not h.standby] + [h for h in self.hosts if h.standby]
        self.rotations = (weighted_rotation([h for h in self.hosts if not h.standby]),
                          weighted_rotation([h for h in self.hosts if h.standby]))
        self.turns = [0, 0]
        self.last_index: int | None = None  # failover: the place of the host last connected to
        self.chunk_limit = settings.max_chunk_bytes  # lowered when a receiver drops chunks of a size
        self.split_logged = False

    def _tls_context(self) -> ssl.SSLContext:
        return tls_context(self.settings)

    # ------------------------------------------------------------ accepting

    def accept(self, batch: Batch) -> None:
        """The batch as one chunk, or several that each fit max_chunk_bytes (confirmed when all are acknowledged)."""
        tag = self.settings.tag_prefix + batch.tag
        runs = entry_runs(batch, self.context.envelope, self._entries_budget(tag), self.settings.time_as_integer)
        runs = runs or [(b"", 0)]
        acks = [batch.ack] if len(runs) == 1 else [Acknowledgement(len(runs), batch.ack.confirm)]
        for entries, count in runs:
            chunk = self._chunk(tag, entries, count, acks)
            self.queue.append(chunk)
            self.queued_bytes += len(chunk.payload)

    def _entries_budget(self, tag: str) -> int:
        return max(1, self.chunk_limit - MESSAGE_OVERHEAD - len(tag.encode()))

    def _chunk(self, tag: str, entries: bytes, count: int, acks: list) -> Chunk:
        chunk_id = new_chunk_id() if self.settings.require_ack else None
        payload = forward_message(tag, entries, count, chunk_id, self.settings.compression)
        return Chunk(chunk_id or "", payload, acks, count, tag)

    def _split_first(self) -> None:
        """Replace the first chunk of the queue by two halves (its entries, in order); what it would have
        confirmed is confirmed when both are acknowledged."""
        chunk = self.queue.popleft()
        self.queued_bytes -= len(chunk.payload)
        countdown = Acknowledgement(2, functools.partial(_confirm_all, chunk.acks))
        halves = [self._chunk(chunk.tag, entries, count, [countdown]) for entries, count in split_entries(chunk.payload)]
        unanswered = chunk.unanswered >= SPLIT_AFTER
        for half in halves:
            # One more miss splits a half again; until then it goes like any chunk.
            half.misses, half.not_before = chunk.misses, chunk.not_before
            half.unanswered = min(chunk.unanswered, SPLIT_AFTER - 1)
            half.split_from = len(chunk.payload) if unanswered else 0
        self.queue.extendleft(reversed(halves))
        self.queued_bytes += sum(len(h.payload) for h in halves)
        self.context.stats.add("chunks_split", 1, output=self.context.name)
        if not unanswered:
            return  # cut to a lower chunk_limit
        if not self.split_logged:
            self.split_logged = True
            log.warning("%s: a chunk of %d bytes (%d records) went unanswered %d times; it goes again in two "
                        "halves (later splits are only counted, as chunks_split). A receiver's limit below "
                        "max_chunk_bytes (%d) drops chunks unanswered: Fluentd's chunk_size_limit, Fluent Bit's "
                        "buffer_max_size; set max_chunk_bytes under it", self.context.name, len(chunk.payload),
                        chunk.records, chunk.unanswered, self.settings.max_chunk_bytes)
        if chunk.refused:  # the receiver drops chunks this big: cut the next ones smaller
            self._lower_chunk_limit(max(len(h.payload) for h in halves), "it refused one twice that size")

    def _lower_chunk_limit(self, size: int, why: str) -> None:
        size = max(LOWEST_CHUNK_LIMIT, size)
        if size < self.chunk_limit:
            self.chunk_limit = size
            log.warning("%s: chunks are cut at %d bytes from now on (%s); set max_chunk_bytes to the receiver's "
                        "limit to send bigger ones", self.context.name, size, why)

    # ------------------------------------------------------------ delivering

    def deliver(self, now: float, force: bool) -> None:
        for conn in list(self.conns):
            self._read_acks(conn)
            self._check_ack_timeout(conn)
        self._failback_when_due()
        self._send_queued()
        if force and self._unacknowledged():  # draining: wait a little for the acks rather than spin
            self._wait_readable(0.2)
            self._read_all()
        elif self.queued_bytes >= self.settings.buffer_max_bytes:
            # The peer acknowledges slower than we read (or chunks wait out a backoff): wait for
            # acks, then let the reader go on.
            if self.conns:
                self._wait_readable(1.0)
                self._read_all()
                self._send_queued()
            elif self.queue:  # no connection: the head waits out its backoff; sleep, do not spin
                time.sleep(min(1.0, max(0.01, self.queue[0].not_before - time.monotonic())))
            if self.queued_bytes >= self.settings.buffer_max_bytes:
                raise BufferFull(f"{self.context.name}: {self.queued_bytes} bytes wait for acknowledgements")

    def _unacknowledged(self) -> int:
        return sum(len(conn.in_flight) for conn in self.conns)

    def _read_all(self) -> None:
        for conn in list(self.conns):
            self._read_acks(conn)

    def _send_queued(self) -> None:
        """Send the chunks that are due, in order, each on the connection its host's turn gives, while
        that connection has room (max_in_flight; one chunk for a host that closes after each)."""
        while self.queue:
            chunk = self.queue[0]
            if chunk.not_before > time.monotonic():
                return  # a chunk that went unacknowledged waits out its backoff (and those behind it)
            if chunk.records > 1 and len(chunk.payload) > MIN_SPLIT_BYTES and (
                    chunk.unanswered >= SPLIT_AFTER or len(chunk.payload) > self.chunk_limit):
                self._split_first()
                continue
            conn = self._connection()
            if conn is None:
                return  # its window is full: the acks make room
            self._send(conn, chunk)
            self.queue.popleft()
            self.queued_bytes -= len(chunk.payload)

    def _send(self, conn: Connection, chunk: Chunk) -> None:
        try:
            conn.sock.settimeout(self.settings.send_timeout)
            conn.sock.sendall(chunk.payload)
        except OSError as exc:
            # The chunk stays first in the queue: the server cannot have all of it.
            self._lost(conn, f"sending failed: {exc}", by_server=isinstance(exc, CLOSED_BY_PEER))
            raise RetryableError(f"{self.context.name}: sending to {conn.host} failed: {exc}") from exc
        conn.sent += 1
        self.context.stats.add("bytes_out", len(chunk.payload), output=self.context.name)
        if chunk.misses:
            self.context.stats.add("chunks_resent", 1, output=self.context.name)
        if self.settings.require_ack:
            chunk.sent_at, chunk.seq, chunk.refused = time.monotonic(), conn.sent, False
            conn.in_flight[chunk.chunk_id] = chunk
        else:
            self._delivered(conn, chunk)
            if conn.host.one_per_connection:
                self._drop(conn)  # the server closes it now; the next chunk goes on a new one

    def _read_acks(self, conn: Connection) -> None:
        """Take the answers waiting on ``conn`` (READ_BUDGET bytes at most), without waiting."""
        if conn.closed:
            return
        budget = READ_BUDGET
        try:
            conn.sock.settimeout(0)
            while budget > 0 and not conn.closed:
                data = conn.sock.recv(65536)
                if not data:
                    self._closed_by_server(conn)
                    return
                budget -= len(data)
                self._take_acks(conn, conn.reader.feed(data))
        except (BlockingIOError, ssl.SSLWantReadError, socket.timeout):
            pass
        except PeerError as exc:
            self._protocol_error(conn.host, str(exc))
            return
        except (OSError, ValueError) as exc:
            self._lost(conn, f"reading failed: {exc}", by_server=isinstance(exc, CLOSED_BY_PEER))
            return
        conn.readable.set()  # more may be waiting (budget spent): the watcher wakes us again

    def _take_acks(self, conn: Connection, answers: list, draining: bool = False) -> None:
        for message in answers:
            chunk = conn.in_flight.pop(acked_chunk(message), None)
            if chunk is None:  # an unknown id (acked twice, say) is no harm
                continue
            conn.acked += 1
            if conn.acked > self.settings.max_in_flight:
                conn.host.early_closes = 0  # it keeps connections open
            for earlier in conn.in_flight.values():
                if earlier.seq < chunk.seq:
                    earlier.refused = True  # receivers answer in order: that one was dropped
            self._delivered(conn, chunk)
        if conn.host.one_per_connection and conn.sent and not conn.in_flight and not draining:
            self._drop(conn)  # its one chunk is acknowledged: the next goes on a new connection

    def _closed_by_server(self, conn: Connection) -> None:
        if conn.in_flight:
            self._lost(conn, "the server closed the connection", by_server=True)
        else:
            self._drop(conn)  # nothing was waiting for it: no failure

    def _closed_early(self, conn: Connection) -> None:
        """The server closed ``conn`` after acknowledging a chunk while more were in flight: a server with
        deny_keepalive, or one that stopped. Twice in a row is no coincidence."""
        host = conn.host
        host.early_closes += 1
        if host.early_closes >= EARLY_CLOSES:
            self._one_per_connection(host, f"it closed {host.early_closes} connections in a row after "
                                           f"acknowledging a chunk (deny_keepalive?)")

    def _one_per_connection(self, host: Host, why: str) -> None:
        if not host.one_per_connection:
            host.one_per_connection = True
            log.warning("%s: %s does not keep connections (%s): sending one chunk per connection to it from now "
                        "on", self.context.name, host, why)

    def _protocol_error(self, host: Host, why: str) -> None:
        """The peer broke the protocol: drop the connection, send again, and let the host wait a backoff."""
        self.context.stats.add("protocol_errors", 1, output=self.context.name)
        if str(host) not in self.misbehaving:
            self.misbehaving.add(str(host))
            log.warning("%s: %s broke the forward protocol (%s); closing the connection and sending the "
                        "unacknowledged chunks again (later errors of this host are only counted, "
                        "as protocol_errors)", self.context.name, host, why)
        for conn in [c for c in self.conns if c.host is host]:
            self._lost(conn, f"protocol error: {why}", drain=False)
        self._host_failed(host, f"protocol error: {why}")

    def _delivered(self, conn: Connection, chunk: Chunk) -> None:
        for ack in chunk.acks:
            ack.confirm()
        if chunk.split_from:  # the half of a chunk that went unanswered got through: that size does
            self._lower_chunk_limit(len(chunk.payload), f"a receiver took half of a chunk of {chunk.split_from} "
                                                        f"bytes it left unanswered")
        host = conn.host
        host.failures = 0  # only a delivery proves a host works (a connect does not)
        if host.down_since is not None:
            if self.settings.balance == "round_robin":
                log.warning("%s: %s takes its share again after %.1fs", self.context.name, host,
                            time.monotonic() - host.down_since)
            host.down_since = None
        self.context.stats.add("records_out", chunk.records, output=self.context.name)
        self.context.stats.add("chunks_out", 1, output=self.context.name)
        if self.failing_since is not None:
            log.warning("%s: delivering to %s again after %.1fs", self.context.name, host,
                        time.monotonic() - self.failing_since)
            self.failing_since = None

    def _check_ack_timeout(self, conn: Connection) -> None:
        if conn.closed or not conn.in_flight:
            return
        oldest = min(c.sent_at for c in conn.in_flight.values())
        if time.monotonic() - oldest > self.settings.ack_timeout:
            self._lost(conn, f"no ack within ack_timeout ({self.settings.ack_timeout:g}s)", timed_out=True)
            self._host_failed(conn.host, "acknowledgements stopped")

    def _lost(self, conn: Connection, why: str, drain: bool = True, by_server: bool = False,
              timed_out: bool = False) -> None:
        """``conn`` is unusable: first take the acks the server sent before (a server that closes after a
        chunk has acknowledged it), then close it; every chunk still unacknowledged goes again, first in
        the queue, each after a backoff of its own (so a chunk can never be resent in a tight loop).
        ``by_server``: the server closed it (an end of file, a reset, a broken pipe); ``timed_out``: the
        oldest chunk on it waited ack_timeout."""
        if conn.closed:
            return
        if drain:
            self._drain(conn)
        if by_server and conn.acked and conn.in_flight:
            self._closed_early(conn)
        self._forget(conn)
        resend = sorted(conn.in_flight.values(), key=lambda c: c.seq)
        conn.in_flight.clear()
        if not conn.acked and (by_server or not timed_out):
            # It took the connection and acknowledged nothing on it (a proxy before a dead receiver,
            # or one that closes on what we sent): down like a refused connect, so failover and
            # round_robin pass it over for its backoff instead of feeding it again at once.
            self._host_failed(conn.host, why)
        now = time.monotonic()
        for index, chunk in enumerate(resend):
            chunk.misses += 1
            chunk.not_before = now + self._resend_delay(chunk.misses)
            if by_server and conn.host.one_per_connection and len(resend) == 1:
                chunk.refused = True  # the server closed on its one chunk, unanswered
            elif by_server and not conn.acked and index == 0:
                # Closed on the first chunk of a connection without answering (Fluent Bit closes on a
                # message over buffer_max_size): it counts as unanswered, so it is split in time.
                chunk.refused = True
            if chunk.refused or (timed_out and now - chunk.sent_at > self.settings.ack_timeout):
                chunk.unanswered += 1
        self.queue.extendleft(reversed(resend))
        self.queued_bytes += sum(len(c.payload) for c in resend)
        self._note_failure(f"{conn.host}: {why}" + (f"; {len(resend)} chunks are sent again" if resend else ""))

    def _drain(self, conn: Connection) -> None:
        """The answers already on a broken connection (bounded, never waiting); whatever goes wrong ends it."""
        budget = READ_BUDGET
        try:
            conn.sock.settimeout(0)
            while budget > 0 and conn.in_flight:
                data = conn.sock.recv(65536)
                if not data:
                    return
                budget -= len(data)
                self._take_acks(conn, conn.reader.feed(data), draining=True)
        except (OSError, ValueError, PeerError):  # also SSL errors, and nothing more to read
            return

    def _resend_delay(self, misses: int) -> float:
        """Seconds before a chunk missed ``misses`` times goes again: doubling from retry_initial_delay up
        to retry_max_delay, between half and all of it (jitter, but never close to nothing)."""
        backoff = self.context.backoff
        ceiling = min(backoff.maximum, backoff.initial * 2 ** min(misses - 1, 30))
        return ceiling * random.uniform(0.5, 1.0)

    def _drop(self, conn: Connection) -> None:
        """Close ``conn`` on purpose (not a failure); a chunk still on it goes again."""
        if conn.in_flight:
            self._lost(conn, "closed")
            return
        self._forget(conn)

    def _forget(self, conn: Connection) -> None:
        if conn in self.conns:
            self.conns.remove(conn)
        conn.close()

    def _note_failure(self, text: str) -> None:
        self.context.stats.add("retries", 1, output=self.context.name)
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            log.warning("%s: %s", self.context.name, text)

    # ------------------------------------------------------------ connecting

    def _connection(self) -> Connection | None:
        """The connection the next chunk goes on, opened if need be; None while its window is full.
        RetryableError when no host can be reached."""
        if self.settings.balance == "round_robin":
            return self._next_in_rotation()
        conn = self.conns[0] if self.conns else self._connect()
        return conn if self._has_room(conn) else None

    def _has_room(self, conn: Connection) -> bool:
        if conn.host.one_per_connection:
            return conn.sent == 0
        return len(conn.in_flight) < self.settings.max_in_flight

    def _connect(self) -> Connection:
        """failover: connect to the first host (in order, standbys last) that is not waiting out a backoff."""
        errors: list[str] = []
        for host in self.order:
            conn = self._open_connection(host, errors)
            if conn is not None:
                return conn
        self._unreachable(errors)

    def _next_in_rotation(self) -> Connection | None:
        """round_robin: the connection of the host whose turn it is. A host that is down is passed over;
        the standbys take turns only while no other host can be reached. None while the window of the
        host whose turn it is is full (a slow host is waited for, so the shares follow the weights)."""
        errors: list[str] = []
        for which, rotation in enumerate(self.rotations):
            for step in range(len(rotation)):
                place = (self.turns[which] + step) % len(rotation)
                host = rotation[place]
                conn = next((c for c in self.conns if c.host is host), None) or self._open_connection(host, errors)
                if conn is None:
                    continue
                if not self._has_room(conn):
                    return None
                self.turns[which] = place + 1
                if which == 0:
                    for idle in [c for c in self.conns if c.host.standby and not c.in_flight]:
                        self._drop(idle)  # the others are back: the standbys wait again
                return conn
        self._unreachable(errors)

    def _open_connection(self, host: Host, errors: list[str]) -> Connection | None:
        """A new connection to ``host``, or None (why appended to ``errors``) if it waits out a backoff or fails."""
        if host.next_try > time.monotonic():
            errors.append(f"{host} (waiting: {host.last_error})")
            return None
        try:
            sock = self._open(host)
        except HandshakeRefused as exc:
            self._host_failed(host, str(exc))
        except PeerError as exc:
            self._protocol_error(host, str(exc))
        except (OSError, ValueError) as exc:
            self._host_failed(host, str(exc) or type(exc).__name__)
        else:
            conn = Connection(sock, host, self.order.index(host))
            conn.watch(self.context.wake)
            self.conns.append(conn)
            self._connected(conn, errors)
            return conn
        errors.append(f"{host}: {host.last_error}")
        return None

    def _connected(self, conn: Connection, errors: list[str]) -> None:
        """Say when the host in use changes: failover to a later host, failback to an earlier one, a standby."""
        index, last = conn.index, self.last_index
        self.last_index = index
        if index == last or (last is None and index == 0):
            return
        if self.settings.balance == "round_robin":
            if conn.host.standby:
                log.warning("%s: no host that is not a standby can be reached (%s): sending to standby %s",
                            self.context.name, "; ".join(dict.fromkeys(errors)), conn.host)
        elif last is not None and index < last:
            log.warning("%s: failing back to %s (earlier in hosts than %s)", self.context.name, conn.host,
                        self.order[last])
        elif index > 0:
            log.warning("%s: connected to %s (failover: %s)", self.context.name, conn.host,
                        "; ".join(dict.fromkeys(errors)))

    def _unreachable(self, errors: list[str]):
        text = "; ".join(dict.fromkeys(errors))
        self._note_failure("no fluentd host reachable: " + text)
        raise RetryableError(f"{self.context.name}: no fluentd host reachable: {text}")

    def _host_failed(self, host: Host, error: str) -> None:
        host.failures += 1
        host.last_error = error
        host.next_try = time.monotonic() + self.context.backoff.delay(host.failures)
        if host.down_since is None:
            host.down_since = time.monotonic()
            if self.settings.balance == "round_robin" and len(self.hosts) > 1:
                log.warning("%s: %s is down (%s); the other hosts take its share until it is back",
                            self.context.name, host, error)

    def _open(self, host: Host) -> socket.socket:
        timeout = self.settings.connect_timeout
        sock = socket.create_connection((host.name, host.port), timeout=timeout)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for option, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
                if hasattr(socket, option):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
            if self.tls is not None:
                # SNI and the name the certificate must carry: tls_server_name (the host's, else the
                # output's), else the address itself.
                server_name = host.tls_server_name or self.settings.tls_server_name or host.name
                sock = self.tls.wrap_socket(sock, server_hostname=server_name)
            shared_key, username, password = self._credentials(host)
            if shared_key and not self._handshake(sock, shared_key, username, password):
                self._one_per_connection(host, "its HELO says keepalive: false")
            return sock
        except BaseException:
            close_socket(sock)
            raise

    def _credentials(self, host: Host) -> tuple[str, str, str]:
        """(shared_key, username, password) for ``host``: its own, else the output's."""
        settings = self.settings
        return tuple(getattr(settings, key) if getattr(host, key) is None else getattr(host, key)
                     for key in ("shared_key", "username", "password"))

    def _handshake(self, sock: socket.socket, shared_key: str, username: str, password: str) -> bool:
        """HELO, PING, PONG: all within connect_timeout, however slowly the server drips its bytes.

        Returns the HELO's ``keepalive`` (False: the server closes the connection after each chunk;
        Fluent Bit's HELO has no such key: True).
        """
        reader, pending = AnswerReader(), collections.deque()
        deadline = time.monotonic() + self.settings.connect_timeout
        helo = _read_one(sock, reader, pending, deadline, "no HELO: is a shared_key set on the server?",
                         HandshakeError("the server closed the connection during the handshake, before its HELO"))
        message, salt, nonce = ping(helo, self.self_hostname, shared_key, username, password)
        sock.sendall(msgpack.packb(message))
        # Fluent Bit answers a wrong shared key by closing the connection, with no PONG.
        pong = _read_one(sock, reader, pending, deadline, "no PONG",
                         HandshakeRefused("the server closed the connection during the handshake (wrong shared_key?)"))
        check_pong(pong, salt, nonce, shared_key)
        return helo[1].get("keepalive") is not False

    def _failback_when_due(self) -> None:
        """failover: on a later host, go back to the first ones from time to time (when nothing is in
        flight). round_robin needs none: a host that is down takes its turns again after its backoff."""
        if self.settings.balance != "failover" or not self.conns:
            return
        conn = self.conns[0]
        if conn.index == 0 or conn.in_flight:
            return
        if time.monotonic() - conn.opened >= self.settings.failback_interval:
            self._drop(conn)
            for host in self.order[:conn.index]:
                host.next_try = 0.0

    def _wait_readable(self, timeout: float) -> None:
        socks = [conn.sock for conn in self.conns]
        if socks:
            try:
                select.select(socks, [], [], timeout)
            except (OSError, ValueError):
                pass

    def pending(self) -> int:
        return len(self.queue) + sum(len(conn.in_flight) for conn in list(self.conns))

    def buffered_bytes(self) -> int:
        """(Read from another thread: copies, never a view that can change while it is summed.)"""
        try:
            in_flight = [chunk for conn in list(self.conns) for chunk in list(conn.in_flight.values())]
        except RuntimeError:  # changed while copied: the next read tells
            in_flight = []
        return self.queued_bytes + sum(len(c.payload) for c in in_flight)

    def failing(self) -> tuple[float | None, str | None]:
        if self.failing_since is None:
            return None, None
        return self.failing_since, "; ".join(f"{h}: {h.last_error}" for h in self.hosts if h.last_error) or None

    def close(self) -> None:
        """At stop: a TLS connection ends with close_notify (bounded), so the receiver logs no error."""
        for conn in self.conns:
            conn.close()


def _read_one(sock: socket.socket, reader: AnswerReader, pending: collections.deque, deadline: float,
              missing: str, closed: HandshakeError) -> object:
    """The next whole msgpack object from the socket (during the handshake), by ``deadline``.

    ``closed`` is raised if the server closes the connection first; ``missing`` says what did not
    come if the deadline passes.
    """
    while not pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HandshakeError(f"the server did not complete the handshake within connect_timeout ({missing})")
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except socket.timeout:
            raise HandshakeError(f"the server did not complete the handshake within connect_timeout "
                                 f"({missing})") from None
        except ConnectionResetError:
            data = b""  # closed with our data unread: a close all the same
        if not data:
            raise closed
        pending.extend(reader.feed(data))
    return pending.popleft()


OUTPUT = FluentdOutput
