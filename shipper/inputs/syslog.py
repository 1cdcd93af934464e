"""The syslog input: RFC 3164 and RFC 5424 over UDP, TCP (octet counting or newline framing) and a
Unix datagram socket (what ``logger -u`` and a relaying rsyslog/syslog-ng write to).

Each message becomes a record: the message text, the event time from the message, and facility,
severity, app_name, pid, msgid, structured_data and the sender's host (``fields.host``: the record's
own ``host`` is this instance) as fields. Messages are journaled before they go on, like the forward
input's. Syslog has no acknowledgement: over TCP a full journal refuses (and counts) what arrives
while it is full; over UDP and the datagram socket whatever the kernel dropped before the agent read
it is lost unseen (the socket's receive buffer is raised to ``receive_buffer_bytes``), so the README
says to prefer TCP, and ``records_received`` counts what did arrive.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from shipper.config import Option
from shipper.server import check_listen
from shipper.inputs.listeners import LISTENER_OPTIONS, POLL, StreamServer, bind_inet, bind_unix, recv_some
from shipper.inputs.network import (
    NetworkInput, check_listeners, listener_problems, message_size_problems, stream_sockets,
)
from shipper.inputs.syslog_format import FramingError, OctetOrLineFramer, SyslogMessage, parse
from shipper.record import ENCODING_ERRORS, PARSE_ERROR, TIME, TRUNCATED, format_time

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65_535
BATCH_WAIT = 0.05   # a datagram socket's reader gathers what arrives for this long into one frame

OPTIONS = {
    "id": Option("str", ""),
    "tcp": Option("str", "127.0.0.1:5514", check=check_listen),    # "" for none
    "udp": Option("str", "127.0.0.1:5514", check=check_listen),    # "" for none
    "socket": Option("str", ""),                                    # a Unix datagram socket
    "max_message_bytes": Option("size", 64 * 1024, minimum=480, maximum=16 * 1024**2),
    "receive_buffer_bytes": Option("size", 4 * 1024**2, minimum=64 * 1024, maximum=256 * 1024**2),
    **LISTENER_OPTIONS,
}


class _Listen:
    """The settings as listener_problems and stream_sockets read them, for one of tcp and udp."""

    def __init__(self, settings, listen: str, socket_path: str = ""):
        self._settings = settings
        self.listen = listen
        self.socket = socket_path

    def __getattr__(self, name):
        return getattr(self._settings, name)

    def get(self, name, default=None):
        return getattr(self, name, default)


def validate(settings) -> list[str]:
    if not (settings.get("tcp") or settings.get("udp") or settings.get("socket")):
        return [f"{settings.where}.tcp: required, or udp or socket (where daemons send)"]
    problems = []
    for key in ("tcp", "udp"):
        value = settings.get(key)
        if value:
            problems.extend(p.replace(".listen:", f".{key}:") for p in
                            listener_problems(_Listen(settings, value), settings.where))
    problems.extend(message_size_problems(settings))
    return list(dict.fromkeys(problems))


def check(settings) -> tuple[list[str], list[str]]:
    problems, warnings = check_listeners(_Listen(settings, "", settings.socket), [])
    for key, kind in (("tcp", socket.SOCK_STREAM), ("udp", socket.SOCK_DGRAM)):
        if settings.get(key):
            _, found = check_listeners(_Listen(settings, "", ""), [(settings.get(key), kind)])
            warnings.extend(w.replace(".listen:", f".{key}:") for w in found)
    return problems, warnings


def message_row(raw: bytes, received: float, cut: bool = False) -> tuple[str, dict]:
    """One syslog message as it arrived -> (message, fields) of a journal row."""
    try:
        text = raw.decode("utf-8")
        bad = False
    except UnicodeDecodeError:
        text = raw.decode("utf-8", "replace")
        bad = True
    text = text.rstrip("\r\n\x00")
    try:
        parsed = parse(text, received)
    except Exception:  # an impossible date, or content no check foresaw: kept whole, flagged
        parsed = SyslogMessage(text, malformed=True)
    fields = parsed.fields
    if parsed.time is not None:
        fields[TIME] = format_time(parsed.time)
    if parsed.malformed:
        fields[PARSE_ERROR] = True
    if bad:
        fields[ENCODING_ERRORS] = True
    if cut:
        fields[TRUNCATED] = True
    return parsed.message, fields


class SyslogInput(NetworkInput):
    source = "syslog"

    def make_producers(self) -> list:
        settings = self.settings
        where = settings.where
        self.datagram_sockets: list[socket.socket] = []
        self._datagram_threads: list[threading.Thread] = []
        stream = stream_sockets(_Listen(settings, settings.tcp), where) if settings.tcp else []
        try:
            if settings.udp:
                self.datagram_sockets.append(bind_inet(settings.udp, socket.SOCK_DGRAM, where=f"{where}.udp"))
            if settings.socket:
                self.datagram_sockets.append(bind_unix(settings.socket, socket.SOCK_DGRAM,
                                                       int(settings.socket_mode, 8), settings.socket_group,
                                                       where=f"{where}.socket"))
        except Exception:
            for sock, _ in stream:
                sock.close()
            for sock in self.datagram_sockets:
                sock.close()
            raise
        for sock in self.datagram_sockets:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, settings.receive_buffer_bytes)
            except OSError:
                pass
        return [StreamServer(self.tag, stream, self.serve, settings.max_connections, self.stats,
                             self.stop)] if stream else []

    def start_producing(self) -> None:
        super().start_producing()
        for sock in self.datagram_sockets:
            thread = threading.Thread(target=self._receive, args=(sock,), name=f"{self.tag}-datagrams", daemon=True)
            thread.start()
            self._datagram_threads.append(thread)

    def stop_producing(self) -> None:
        self.stop.set()
        for thread in self._datagram_threads:
            if thread is not threading.current_thread():
                thread.join(POLL * 2)  # what it gathered goes into the journal before it is closed
        super().stop_producing()
        for sock in self.datagram_sockets:
            try:
                sock.close()
            except OSError:
                pass

    # ------------------------------------------------------------ TCP

    def serve(self, sock, peer: str) -> None:
        framer = OctetOrLineFramer(self.settings.max_message_bytes)
        tag = self.tag
        while True:
            data = recv_some(sock, self.stop, self.settings.idle_timeout)
            if not data:
                return
            try:
                frames = framer.feed(data)
                error = None
            except FramingError as exc:
                frames, error = [], str(exc)
            if frames:
                received = time.time()
                messages, fields = [], []
                for raw, cut in frames:
                    message, extra = message_row(raw, received, cut)
                    messages.append(message)
                    fields.append(extra)
                self._journal_datagrams(messages, fields)  # nobody waits for an ack: journaled, fsynced
            if error is not None:
                self.stats.add("connection_errors", 1, input=tag, reason="malformed")
                log.warning("%s: closing the connection of %s: %s", tag, peer, error[:200])
                return

    # ------------------------------------------------------------ UDP and the datagram socket

    def _receive(self, sock: socket.socket) -> None:
        messages: list = []
        fields: list = []
        gathered_since = 0.0
        while not self.stop.is_set() or messages:
            if self.stop.is_set() or (messages and time.monotonic() - gathered_since >= BATCH_WAIT):
                self._journal_datagrams(messages, fields)
                messages, fields = [], []
                if self.stop.is_set():
                    return
            try:
                sock.settimeout(BATCH_WAIT if messages else POLL)
                data = sock.recv(MAX_DATAGRAM)
            except TimeoutError:
                continue
            except OSError:
                if self.stop.is_set():
                    continue
                time.sleep(POLL)
                continue
            if not messages:
                gathered_since = time.monotonic()
            cut = len(data) > self.settings.max_message_bytes
            message, extra = message_row(data[:self.settings.max_message_bytes], time.time(), cut)
            messages.append(message)
            fields.append(extra)
            if len(messages) >= 10_000:
                gathered_since = 0.0

    def _journal_datagrams(self, messages: list, fields: list) -> None:
        if messages:  # a message of invalid bytes grows by its replacement characters: one over the
            self.journal_now(self.tag, messages, fields)  # frame limit is dropped and counted


INPUT = SyslogInput
