"""The forward input: what fluent-logger, Docker's fluentd log driver, Fluent Bit and Fluentd send.

Listens on ``listen`` (127.0.0.1:24224) and/or a Unix socket. Every carrier mode and EventTime are
decoded (``forward_messages``); a message's events go into the journal, and a sender that asked for an
acknowledgement (option ``chunk``) gets ``{"ack": chunk}`` only once they are fsynced there. A
connection with ``shared_key`` set starts with the HELO/PING/PONG handshake (the digests of the
fluentd output's, ``forward_protocol``); with ``tls_cert`` TCP is TLS.

Each event's record becomes the record's parsed fields (under their own names unless they are the
agent's, then under ``fields``), its time the record's time; ``message_key`` (e.g. ``"log"`` for
Docker) moves one string field into ``message``. Bounded: a message over ``max_message_bytes``, or
anything that is not the protocol, closes that connection and is counted (``connection_errors``).
"""

from __future__ import annotations

import logging
import os
import socket
import time

import msgpack

from shipper.config import Option
from shipper.server import check_listen
from shipper.inputs import forward_messages
from shipper.inputs.forward_messages import ForwardMessageError
from shipper.inputs.journal import FrameTooLarge
from shipper.inputs.listeners import LISTENER_OPTIONS, StreamServer, recv_some, send_all
from shipper.inputs.journaled import MAX_ROWS_PER_FRAME
from shipper.inputs.network import (
    NetworkInput, check_listeners, listener_problems, message_size_problems, stream_sockets,
)
from shipper.outputs.forward_protocol import HandshakeError, HandshakeRefused, check_ping, helo, pong
from shipper.record import PARSED, TIME, format_time, second_text

log = logging.getLogger(__name__)

HANDSHAKE_SECONDS = 30.0   # for the PING, all of it

OPTIONS = {
    "id": Option("str", ""),                       # names its journal (default: forward-<tag>)
    "listen": Option("str", "127.0.0.1:24224", check=check_listen),   # "" for none
    "socket": Option("str", ""),                   # e.g. /run/shipper/forward.sock
    "tag_prefix": Option("str", ""),               # prepended to every sender's tag
    "message_key": Option("str", "message"),       # a record's string field that becomes the message ("log": Docker)
    "max_message_bytes": Option("size", 16 * 1024**2, minimum=1024, maximum=256 * 1024**2),
    "shared_key": Option("str", ""),
    "self_hostname": Option("str", ""),            # what the PONG names (default: the host name)
    **LISTENER_OPTIONS,
}


def validate(settings) -> list[str]:
    problems = []
    if not settings.get("listen") and not settings.get("socket"):
        problems.append(f"{settings.where}.listen: required, or socket (where senders connect)")
    problems.extend(message_size_problems(settings))
    return problems + listener_problems(settings, settings.where)


def check(settings) -> tuple[list[str], list[str]]:
    return check_listeners(settings, [(settings.listen, socket.SOCK_STREAM)])


class TimeText:
    """A connection's last second and its text (record.second_text): the events of a
    chunk mostly share their second, so ``event_rows`` formats it once."""

    __slots__ = ("second", "text")

    def __init__(self) -> None:
        self.second = -1
        self.text = ""


_LAST_SECOND = 253402300799.0   # NaN, infinities, before 1970, after 9999: format_time clamps them


def event_rows(events: list, message_key: str, time_text: TimeText) -> tuple[list, list]:
    """A message's events -> (messages, fields) rows of the journal. The records were just decoded:
    they are ours to change. Runs for every event: the time text is made here in line."""
    fields: list = []
    messages: list = []
    add_field, add_message = fields.append, messages.append
    second_known, text = time_text.second, time_text.text
    for epoch, record in events:
        if message_key:
            message = record.pop(message_key, None)
            if type(message) is str:
                if message[-1:] == "\n":  # Docker's lines end with theirs
                    message = message[:-1]
            elif message is not None:  # not text: it stays a field
                record[message_key] = message
                message = None
            add_message(message)
        if 0.0 <= epoch < _LAST_SECOND:
            second = int(epoch)
            micros = int((epoch - second) * 1_000_000 + 0.5)
            if micros < 1_000_000:
                if second != second_known:
                    second_known, text = second, second_text(second)
                add_field({PARSED: record, TIME: f"{text}.{micros:06d}Z"})
                continue
        add_field({PARSED: record, TIME: format_time(epoch)})
    time_text.second, time_text.text = second_known, text
    return (messages if message_key else [None] * len(events)), fields


class ForwardInput(NetworkInput):
    source = "forward"

    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.hostname = settings.self_hostname or socket.gethostname()

    def make_producers(self) -> list:
        settings = self.settings
        return [StreamServer(self.tag, stream_sockets(settings, settings.where), self.serve,
                             settings.max_connections, self.stats, self.stop)]

    def serve(self, sock, peer: str) -> None:
        settings = self.settings
        if settings.shared_key and not self._handshake(sock, peer):
            return
        reader = forward_messages.unpacker(settings.max_message_bytes)
        time_text = TimeText()  # a connection's own: it keeps state
        received = 0      # bytes fed to the reader
        whole = 0         # of which whole messages
        started = None    # when the message under way began: it must be whole within idle_timeout
        while True:
            deadline = None if started is None else started + settings.idle_timeout
            data = recv_some(sock, self.stop, settings.idle_timeout, deadline=deadline)
            if not data:
                if data is None and started is not None and not self.stop.is_set():
                    self._refuse(peer, "slow", f"a message not whole after idle_timeout ({settings.idle_timeout:g} s)")
                return
            try:
                reader.feed(data)
            except msgpack.BufferFull:
                self._refuse(peer, "oversized", f"a message over max_message_bytes ({settings.max_message_bytes})")
                return
            received += len(data)
            acks: list[bytes] = []
            last = 0
            error = None
            whole_before = whole
            try:
                for item in reader:
                    whole = reader.tell()
                    message = forward_messages.decode(item, settings.max_message_bytes * 4)
                    seq = self._journal_message(message, time_text)
                    if seq is None:  # stopping: no ack, the sender sends it again elsewhere or later
                        break
                    last = max(last, seq)
                    if message.chunk:
                        acks.append(forward_messages.ack(message.chunk))
            except (ForwardMessageError, ValueError, TypeError, msgpack.UnpackException) as exc:
                # TypeError: a map or an array as a map's key (unhashable)
                error = ("oversized" if isinstance(exc, FrameTooLarge) else "malformed", str(exc))
            if received == whole:
                started = None
            elif started is None or whole > whole_before:  # the partial message began in this read
                started = time.monotonic()
            if last:
                try:
                    self.journal.sync(last)
                except OSError as exc:  # not durable: no acknowledgement; the sender resends
                    log.error("%s: cannot fsync the journal: %s", self.tag, exc)
                    self.stats.add("journal_errors", 1, input=self.tag, reason="fsync")
                    return
            if acks and not send_all(sock, b"".join(acks), self.stop):
                return
            if error is not None:
                self._refuse(peer, *error)
                return
            if self.stop.is_set():
                return

    def _journal_message(self, message, time_text: TimeText) -> int | None:
        """A message's events into the journal, a slice at a time; the sequence number to sync for
        (0: nothing to write), None when refused (stopping, or a full journal for a sender without acks)."""
        wait = message.chunk is not None
        tag = None
        last = 0
        for events in message.slices(MAX_ROWS_PER_FRAME):
            tag = tag or self.record_tag(message.tag)
            messages, fields = event_rows(events, self.settings.message_key, time_text)
            seq = self.journal_rows(tag, messages, fields, wait=wait)
            if seq is None:
                return None if wait else last
            last = seq
        return last

    def _refuse(self, peer: str, reason: str, text: str) -> None:
        self.stats.add("connection_errors", 1, input=self.tag, reason=reason)
        log.warning("%s: closing the connection of %s: %s", self.tag, peer, text[:200])

    def _handshake(self, sock, peer: str) -> bool:
        nonce = os.urandom(16)
        if not send_all(sock, msgpack.packb(helo(nonce)), self.stop):
            return False
        reader = forward_messages.unpacker(64 * 1024)
        ping = None
        deadline = time.monotonic() + HANDSHAKE_SECONDS  # however slowly the PING drips in
        while ping is None:
            data = recv_some(sock, self.stop, HANDSHAKE_SECONDS, deadline=deadline)
            if not data:
                return False
            try:
                reader.feed(data)
                ping = next(reader, None)
            except (msgpack.BufferFull, ValueError, msgpack.UnpackException) as exc:
                self._refuse(peer, "handshake", f"not a PING: {exc}")
                return False
        try:
            _hostname, salt = check_ping(ping, nonce, self.settings.shared_key)
        except HandshakeRefused as exc:
            self._refuse(peer, "handshake", str(exc))
            send_all(sock, msgpack.packb(pong(False, str(exc), self.hostname, b"", nonce, "")), self.stop, 2.0)
            return False
        except HandshakeError as exc:
            self._refuse(peer, "handshake", str(exc))
            return False
        return send_all(sock, msgpack.packb(pong(True, "", self.hostname, salt, nonce, self.settings.shared_key)),
                        self.stop)


INPUT = ForwardInput
