"""What the network inputs (forward, syslog) share: events in, journal, batches out.

A connection's thread turns what a peer sent into journal frames (``NetworkInput.journal``); the
input's own thread reads the journal back and hands its batches to the pipeline (``run``), so the
pipeline sees a network input as it sees a file: batches with byte ranges, confirmed by the outputs,
a checkpoint that moves only then. The tag a peer names is kept to a safe alphabet and length, and
an input takes at most ``MAX_TAGS`` distinct tags (a peer inventing one per event would otherwise
grow every per-tag table of the agent): the others are folded into ``<prefix>other``, counted.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from typing import Callable

from shipper.errors import ConfigError
from shipper.heartbeat import Heartbeat
from shipper.inputs.journal import FrameTooLarge, Journal, JournalBusy, JournalFull, encode_frame
from shipper.inputs.listeners import (
    bind_inet, bind_unix, in_use_problem, remote_problem, server_tls_context, socket_problems, tls_problems,
)
from shipper.record import Batch

log = logging.getLogger(__name__)

MAX_TAG_CHARS = 128
MAX_TAGS = 1000
MAX_ROWS_PER_FRAME = 10_000
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9._\-]")


def safe_tag(tag: str) -> str:
    """A peer's tag as a record's tag: letters, digits, ``._-`` (others become ``_``), 128 at most."""
    cleaned = _TAG_UNSAFE.sub("_", tag[:MAX_TAG_CHARS])
    return cleaned.strip(".") or "_"


class NetworkInput:
    """Base of the forward and syslog inputs: the journal, the tag table, the reader loop."""

    kind = "network"

    def __init__(self, settings, context):
        self.settings = settings
        self.tag = settings.tag
        self.stats = context.stats
        self.wake = threading.Event()
        self.heartbeat = Heartbeat()
        self.stop = threading.Event()
        self.name = settings.get("id") or f"{settings.type}-{settings.tag}"
        self.tags: dict[str, str] = {}
        self.tags_lock = threading.Lock()
        self._full_reported = 0.0
        directory = os.path.join(context.data_dir, "journal", safe_tag(self.name))
        try:
            self.journal = Journal(directory, settings.journal_max_bytes, self.stats, self.tag,
                                   checkpoint_interval=context.checkpoint_interval)
        except JournalBusy as exc:
            raise ConfigError([f"{settings.where}: {exc}"]) from None
        try:
            self.servers: list = self.make_servers()
        except BaseException:  # the address is in use: nothing of this input stays open
            self.journal.release()
            raise

    def make_servers(self) -> list:
        """The subclass's listeners, bound (ConfigError naming the key when one cannot be)."""
        return []

    # ------------------------------------------------------------ tags

    def record_tag(self, tag: str) -> str:
        tag = tag[:MAX_TAG_CHARS]  # the table never keeps more of a peer's tag than a record does
        known = self.tags.get(tag)
        if known is not None:
            return known
        prefix = self.settings.get("tag_prefix") or ""
        with self.tags_lock:
            if len(self.tags) >= MAX_TAGS:
                self.stats.add("tags_folded", 1, input=self.tag)
                return prefix + "other"
            made = self.tags[tag] = prefix + safe_tag(tag)
        return made

    # ------------------------------------------------------------ into the journal

    def journal_rows(self, tag: str, messages: list, fields: list, wait: bool,
                     drop_oversized: bool = False) -> int | None:
        """Append rows to the journal (in frames of at most MAX_ROWS_PER_FRAME rows and the journal's
        frame limit); the sequence number to ``sync`` for, or None when refused (journal full and
        ``wait`` false, or stopping). A row alone over the frame limit raises FrameTooLarge (the rows
        from there on are not written), or with ``drop_oversized`` is dropped and counted."""
        now = time.time()
        seq = None
        first = 0
        limit = self.journal.frame_limit
        oversized = self._drop_oversized if drop_oversized else None
        for first, frame, items in frames_of(tag, now, self.kind, messages, fields, limit, oversized):
            while True:
                try:
                    seq = self.journal.append(frame, items)
                    break
                except JournalFull as exc:
                    self._say_full(exc)
                    if not wait or self.stop.is_set():
                        refused = len(messages) - first
                        self.stats.add("records_dropped", refused, input=self.tag, reason="journal_full")
                        return None
                    self.journal.wait_for_room(len(frame), 1.0)
                except OSError as exc:  # the disk refuses (full, read-only): the sender may resend
                    log.error("%s: cannot write to the journal: %s", self.tag, exc)
                    self.stats.add("journal_errors", 1, input=self.tag, reason="write")
                    if not wait or self.stop.wait(1.0):
                        self.stats.add("records_dropped", len(messages) - first, input=self.tag,
                                       reason="journal_error")
                        return None
        self.stats.add("records_received", len(messages), input=self.tag)
        return seq

    def _drop_oversized(self, exc: FrameTooLarge) -> None:
        log.error("%s: %s; dropped", self.tag, exc)
        self.stats.add("records_dropped", 1, input=self.tag, reason="too_large")

    def _say_full(self, exc: JournalFull) -> None:
        now = time.monotonic()
        if now - self._full_reported > 60:
            self._full_reported = now
            log.warning("%s: %s: senders that wait for acknowledgements wait, others' events are refused "
                        "(records_dropped{reason=\"journal_full\"})", self.tag, exc)
        self.stats.add("journal_full", 1, input=self.tag)

    # ------------------------------------------------------------ out of the journal

    def run(self, emit: Callable[[Batch], None], stop: threading.Event) -> None:
        self.start_listening()
        try:
            # Ends once listening stopped and everything durable was handed on: a stop delivers what
            # was acknowledged to senders now, not at a next start that an instance may never have.
            for batch in self.journal.batches(self.stop):
                if stop.is_set() and not self.stop.is_set():
                    self.stop_listening()
                self.heartbeat.beat(5.0)
                if batch is not None:
                    self.stats.add("records_in", batch.count, input=self.tag)
                    emit(batch)
        finally:
            self.stop_listening()

    def save_checkpoints(self) -> None:
        self.journal.save_checkpoint()

    def close(self) -> None:
        """The pipeline is done with this input (stopped, or never started): its sockets and journal
        are given up, so the next configuration's input can take them."""
        self.stop_listening()
        self.journal.release()

    # ------------------------------------------------------------ listening (the subclass's sockets)

    def start_listening(self) -> None:
        for server in self.servers:
            server.start()

    def stop_listening(self) -> None:
        self.stop.set()
        for server in self.servers:
            server.close()
        self.journal.close()


def frames_of(tag: str, now: float, kind: str, messages: list, fields: list, limit: int,
              oversized: Callable[[FrameTooLarge], None] | None = None):
    """(index of the first row, frame, its items) for rows, each frame at most MAX_ROWS_PER_FRAME rows
    and ``limit`` bytes: a frame over the limit is made again of half its rows. A row alone over it
    raises FrameTooLarge, or is left out after ``oversized`` was told."""
    first = 0
    total = len(messages)
    size = MAX_ROWS_PER_FRAME
    while first < total:
        items = [tag, now, kind, messages[first:first + size], fields[first:first + size]]
        frame = encode_frame(*items)
        if len(frame) > limit:
            if size == 1:
                error = FrameTooLarge(f"one event of {len(frame)} bytes is over the journal's frame limit "
                                      f"({limit} bytes: half of journal_max_bytes)")
                if oversized is None:
                    raise error
                oversized(error)
                first += 1
                size = MAX_ROWS_PER_FRAME
                continue
            size = max(1, min(size, total - first) // 2)
            continue
        yield first, frame, items
        first += len(items[3])


def stream_sockets(settings, where: str, tls: bool = True) -> list:
    """The listening stream sockets of an input's ``listen`` and ``socket`` (ConfigError when one
    cannot be made: an address in use, a path that is not a socket)."""
    sockets = []
    context = server_tls_context(settings, where) if tls else None
    try:
        if settings.listen:
            sockets.append((bind_inet(settings.listen, where=f"{where}.listen"), context))
        if settings.socket:
            sockets.append((bind_unix(settings.socket, socket.SOCK_STREAM, int(settings.socket_mode, 8),
                                      settings.socket_group, where=f"{where}.socket"), None))
    except ConfigError:
        for sock, _ in sockets:
            sock.close()
        raise
    return sockets


def listener_problems(settings, where: str) -> list[str]:
    """What the config alone tells of the listeners (also checked at every start and reload)."""
    problems = []
    if settings.get("listen"):
        problem = remote_problem(where, settings.listen, settings.allow_remote)
        if problem:
            problems.append(problem)
    problems.extend(tls_problems(where, settings))
    return problems


def check_listeners(settings, kinds: list[tuple[str, int]]) -> tuple[list[str], list[str]]:
    """``shipper check``: (problems, warnings) of the machine as it is now: the socket's directory,
    and whether each address is free (a running agent holds its own: a warning, not an error)."""
    problems: list[str] = []
    warnings: list[str] = []
    where = settings.where
    if settings.get("socket"):
        problems.extend(socket_problems(where, settings.socket, settings.socket_group))
    for listen, kind in kinds:
        problem = in_use_problem(where, listen, kind)
        if problem:
            warnings.append(problem)
    return problems, warnings


