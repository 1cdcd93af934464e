"""The Fluentd output: Forward protocol over TCP (or TLS), every chunk acknowledged.

Each batch becomes one chunk (a Forward mode message with a unique ``chunk`` id). Chunks are
sent in order over one connection, up to ``max_in_flight`` of them unacknowledged; a chunk
is confirmed only when ``{"ack": id}`` comes back (``require_ack``). A connection that
breaks, or a chunk not acknowledged within ``ack_timeout``, sends every unacknowledged chunk
again, on a new connection, possibly to the next host: duplicates are bounded by the chunks
in flight. Hosts are tried in order; while on a later one, the earlier ones are tried again
every ``failback_interval``.

All socket I/O happens in the output's runner thread (TLS objects are not for several
threads); a watcher thread only waits for the socket to become readable and wakes the runner.

The peer is not trusted: an answer that is not msgpack, not ``{"ack": id}``, too long, or a
HELO/PONG with wrong types closes the connection (counted as ``protocol_errors``, logged once
per host), the unacknowledged chunks go again, and the host waits out a backoff. Reading is
bounded per delivery and the handshake by ``connect_timeout`` as a whole.
"""

from __future__ import annotations

import collections
import logging
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

import msgpack

from shipper.config import Option
from shipper.errors import BufferFull, RetryableError
from shipper.outputs.base import Output
from shipper.outputs.forward_protocol import (
    AnswerReader, HandshakeError, HandshakeRefused, PeerError, acked_chunk, check_pong, encode_entries,
    forward_message, new_chunk_id, ping,
)
from shipper.record import Batch

log = logging.getLogger(__name__)

DEFAULT_PORT = 24224
# Bytes read from a peer per delivery at most: a peer that never stops talking cannot hold the runner.
READ_BUDGET = 1024 * 1024


def parse_host(text: str) -> tuple[str, int]:
    """"host", "host:port", "[v6]" or "[v6]:port" -> (host, port); the port defaults to 24224."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:  # a name, or a bare IPv6 address
        host, port = text, ""
    if not host:
        raise ValueError(f"{text!r} has no host")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{text!r} has an invalid port")
    return host, int(port or DEFAULT_PORT)


def check_hosts(hosts: list[str]) -> str | None:
    if not hosts:
        return "needs at least one \"host:port\""
    for text in hosts:
        try:
            parse_host(text)
        except ValueError as exc:
            return str(exc)
    return None


OPTIONS = {
    "hosts": Option("strlist", check=check_hosts),
    "tag_prefix": Option("str", ""),
    "require_ack": Option("bool", True),
    "ack_timeout": Option("duration", 30.0, minimum=0.05),
    "send_timeout": Option("duration", 10.0, minimum=0.05),
    "connect_timeout": Option("duration", 5.0, minimum=0.05),
    "failback_interval": Option("duration", 30.0, minimum=0.1),
    "max_in_flight": Option("int", 16, minimum=1),
    "compression": Option("choice", "none", choices=("none", "gzip")),
    "tls": Option("bool", False),
    "tls_ca": Option("str", ""),
    "tls_verify": Option("bool", True),
    "shared_key": Option("str", ""),
    "self_hostname": Option("str", ""),
    "username": Option("str", ""),
    "password": Option("str", ""),
}


def validate(settings) -> list[str]:
    problems = []
    if settings.get("tls_ca") and not settings.get("tls"):
        problems.append(f"{settings.where}.tls_ca: only used with tls = true")
    if settings.get("username") and not settings.get("shared_key"):
        problems.append(f"{settings.where}.username: the user login is part of the shared_key handshake; "
                        f"set shared_key too")
    return problems


@dataclass
class Chunk:
    chunk_id: str
    payload: bytes
    acks: list
    records: int
    sent_at: float = 0.0


@dataclass
class Host:
    name: str
    port: int
    failures: int = 0
    next_try: float = 0.0
    last_error: str = ""

    def __str__(self) -> str:
        return f"{self.name}:{self.port}"


@dataclass
class Connection:
    """One open connection: the socket, what was read of it, and a watcher that wakes the runner."""

    sock: socket.socket
    host: Host
    index: int
    opened: float = field(default_factory=time.monotonic)
    reader: AnswerReader = field(default_factory=AnswerReader)
    closed: bool = False
    readable: threading.Event = field(default_factory=threading.Event)

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
        try:
            self.sock.close()
        except OSError:
            pass


class FluentdOutput(Output):
    encoding = None  # entries are packed from the batch, in this output's thread

    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.hosts = [Host(*parse_host(text)) for text in settings.hosts]
        self.self_hostname = settings.self_hostname or context.envelope.identity.get("host") or socket.gethostname()
        self.tls = self._tls_context() if settings.tls else None
        self.queue: collections.deque[Chunk] = collections.deque()   # to send, in order
        self.in_flight: dict[str, Chunk] = {}                          # sent, waiting for the ack
        self.conn: Connection | None = None
        self.failing_since: float | None = None
        self.queued_bytes = 0  # payloads accepted and not yet sent
        self.misbehaving: set[str] = set()  # hosts whose protocol error was logged already

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.settings.tls_ca or None)
        if not self.settings.tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    # ------------------------------------------------------------ accepting

    def accept(self, batch: Batch) -> None:
        chunk_id = new_chunk_id() if self.settings.require_ack else None
        payload = forward_message(self.settings.tag_prefix + batch.tag, encode_entries(batch, self.context.envelope),
                                  batch.count, chunk_id, self.settings.compression)
        self.queue.append(Chunk(chunk_id or "", payload, [batch.ack], batch.count))
        self.queued_bytes += len(payload)

    # ------------------------------------------------------------ delivering

    def deliver(self, now: float, force: bool) -> None:
        if self.conn is not None:
            self._read_acks()
            self._check_ack_timeout()
        self._failback_when_due()
        if self.conn is None and (self.queue or self.in_flight):
            self._connect()
        self._send_queued()
        if force and self.in_flight:  # draining: wait a little for the acks rather than spin
            self._wait_readable(0.2)
            self._read_acks()
        elif self.queued_bytes >= self.settings.buffer_max_bytes and self.conn is not None:
            # The peer acknowledges slower than we read: wait for acks, then let the reader go on.
            self._wait_readable(1.0)
            self._read_acks()
            if self.conn is not None:
                self._send_queued()
            if self.queued_bytes >= self.settings.buffer_max_bytes:
                raise BufferFull(f"{self.context.name}: {self.queued_bytes} bytes wait for acknowledgements")

    def _send_queued(self) -> None:
        while self.queue and len(self.in_flight) < self.settings.max_in_flight:
            self._send(self.queue[0])
            self.queued_bytes -= len(self.queue.popleft().payload)

    def _send(self, chunk: Chunk) -> None:
        conn = self.conn
        try:
            conn.sock.settimeout(self.settings.send_timeout)
            conn.sock.sendall(chunk.payload)
        except OSError as exc:
            self._lost(f"sending failed: {exc}")
            raise RetryableError(f"{self.context.name}: sending to {conn.host} failed: {exc}") from exc
        self.context.stats.add("bytes_out", len(chunk.payload), output=self.context.name)
        if self.settings.require_ack:
            chunk.sent_at = time.monotonic()
            self.in_flight[chunk.chunk_id] = chunk
        else:
            self._delivered(chunk)

    def _read_acks(self) -> None:
        conn = self.conn
        budget = READ_BUDGET
        try:
            conn.sock.settimeout(0)
            while budget > 0:
                data = conn.sock.recv(65536)
                if not data:
                    self._lost("the server closed the connection")
                    return
                budget -= len(data)
                for message in conn.reader.feed(data):
                    chunk = self.in_flight.pop(acked_chunk(message), None)
                    if chunk is not None:  # an unknown id (acked twice, say) is no harm
                        self._delivered(chunk)
        except (BlockingIOError, ssl.SSLWantReadError, socket.timeout):
            pass
        except PeerError as exc:
            self._protocol_error(conn.host, str(exc))
            return
        except (OSError, ValueError) as exc:
            self._lost(f"reading failed: {exc}")
            return
        conn.readable.set()  # more may be waiting (budget spent): the watcher wakes us again

    def _protocol_error(self, host: Host, why: str) -> None:
        """The peer broke the protocol: drop the connection, send again, and let the host wait a backoff."""
        self.context.stats.add("protocol_errors", 1, output=self.context.name)
        if str(host) not in self.misbehaving:
            self.misbehaving.add(str(host))
            log.warning("%s: %s broke the forward protocol (%s); closing the connection and sending the "
                        "unacknowledged chunks again (later errors of this host are only counted, "
                        "as protocol_errors)", self.context.name, host, why)
        if self.conn is not None and self.conn.host is host:
            self._lost(f"protocol error: {why}")
        self._host_failed(host, f"protocol error: {why}")

    def _delivered(self, chunk: Chunk) -> None:
        for ack in chunk.acks:
            ack.confirm()
        if self.conn is not None:
            self.conn.host.failures = 0  # only a delivery proves a host works (a connect does not)
        self.context.stats.add("records_out", chunk.records, output=self.context.name)
        self.context.stats.add("chunks_out", 1, output=self.context.name)
        if self.failing_since is not None:
            log.warning("%s: delivering to %s again after %.1fs", self.context.name, self.conn.host if self.conn
                        else "fluentd", time.monotonic() - self.failing_since)
            self.failing_since = None

    def _check_ack_timeout(self) -> None:
        if not self.in_flight:
            return
        oldest = min(c.sent_at for c in self.in_flight.values())
        if time.monotonic() - oldest > self.settings.ack_timeout:
            host = self.conn.host
            self._lost(f"no ack within ack_timeout ({self.settings.ack_timeout:g}s)")
            self._host_failed(host, "acknowledgements stopped")

    def _lost(self, why: str) -> None:
        """The connection is unusable: close it; every unacknowledged chunk goes again, first."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        conn.close()
        resend = sorted(self.in_flight.values(), key=lambda c: c.sent_at)
        self.in_flight.clear()
        self.queue.extendleft(reversed(resend))
        self.queued_bytes += sum(len(c.payload) for c in resend)
        if resend:
            self.context.stats.add("chunks_resent", len(resend), output=self.context.name)
        self._note_failure(f"{conn.host}: {why}" + (f"; {len(resend)} chunks are sent again" if resend else ""))

    def _note_failure(self, text: str) -> None:
        self.context.stats.add("retries", 1, output=self.context.name)
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            log.warning("%s: %s", self.context.name, text)

    # ------------------------------------------------------------ connecting

    def _connect(self) -> None:
        """Connect to the first host that is not waiting out a backoff; raise RetryableError if none works."""
        monotonic = time.monotonic()
        errors = []
        for index, host in enumerate(self.hosts):
            if host.next_try > monotonic:
                errors.append(f"{host} (waiting: {host.last_error})")
                continue
            try:
                sock = self._open(host)
            except HandshakeRefused as exc:
                self._host_failed(host, str(exc))
                errors.append(f"{host}: {host.last_error}")
                continue
            except PeerError as exc:
                self._protocol_error(host, str(exc))
                errors.append(f"{host}: {host.last_error}")
                continue
            except (OSError, ValueError) as exc:
                self._host_failed(host, str(exc) or type(exc).__name__)
                errors.append(f"{host}: {host.last_error}")
                continue
            self.conn = Connection(sock, host, index)
            self.conn.watch(self.context.wake)
            if index > 0:
                log.warning("%s: connected to %s (failover: %s)", self.context.name, host, "; ".join(errors))
            return
        self._note_failure("no fluentd host reachable: " + "; ".join(errors))
        raise RetryableError(f"{self.context.name}: no fluentd host reachable: {'; '.join(errors)}")

    def _host_failed(self, host: Host, error: str) -> None:
        host.failures += 1
        host.last_error = error
        host.next_try = time.monotonic() + self.context.backoff.delay(host.failures)

    def _open(self, host: Host) -> socket.socket:
        timeout = self.settings.connect_timeout
        sock = socket.create_connection((host.name, host.port), timeout=timeout)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for option, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
                if hasattr(socket, option):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=host.name)
            if self.settings.shared_key:
                self._handshake(sock)
            return sock
        except BaseException:
            sock.close()
            raise

    def _handshake(self, sock: socket.socket) -> None:
        """HELO, PING, PONG: all within connect_timeout, however slowly the server drips its bytes."""
        reader, pending = AnswerReader(), collections.deque()
        deadline = time.monotonic() + self.settings.connect_timeout
        helo = _read_one(sock, reader, pending, deadline)
        message, salt, nonce = ping(helo, self.self_hostname, self.settings.shared_key,
                                    self.settings.username, self.settings.password)
        sock.sendall(msgpack.packb(message))
        check_pong(_read_one(sock, reader, pending, deadline), salt, nonce, self.settings.shared_key)

    def _failback_when_due(self) -> None:
        """On a later host, go back to the first ones from time to time (when nothing is in flight)."""
        conn = self.conn
        if conn is None or conn.index == 0 or self.in_flight:
            return
        if time.monotonic() - conn.opened >= self.settings.failback_interval:
            self.conn = None
            conn.close()
            for host in self.hosts[:conn.index]:
                host.next_try = 0.0

    def _wait_readable(self, timeout: float) -> None:
        if self.conn is not None:
            try:
                select.select([self.conn.sock], [], [], timeout)
            except (OSError, ValueError):
                pass

    def pending(self) -> int:
        return len(self.queue) + len(self.in_flight)

    def buffered_bytes(self) -> int:
        return self.queued_bytes + sum(len(c.payload) for c in list(self.in_flight.values()))

    def failing(self) -> tuple[float | None, str | None]:
        if self.failing_since is None:
            return None, None
        return self.failing_since, "; ".join(f"{h}: {h.last_error}" for h in self.hosts if h.last_error) or None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def _read_one(sock: socket.socket, reader: AnswerReader, pending: collections.deque, deadline: float) -> object:
    """The next whole msgpack object from the socket (during the handshake), by ``deadline``."""
    while not pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HandshakeError("the server did not complete the handshake within connect_timeout")
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except socket.timeout:
            raise HandshakeError("the server did not complete the handshake within connect_timeout") from None
        if not data:
            raise HandshakeError("the server closed the connection during the handshake")
        pending.extend(reader.feed(data))
    return pending.popleft()


OUTPUT = FluentdOutput
