"""Inputs whose records cannot be read again (forward, syslog, metrics, lifecycle records): journaled
before they go on.

Producers (a connection's thread, the sampler, the service announcing a termination notice) turn
what they have into journal frames (``JournaledInput.journal_rows``) and fsync them; the input's
own thread reads the journal back and hands its batches to the pipeline (``run``). So the
pipeline sees such an input as it sees a file: batches with byte ranges, confirmed by the
outputs, a checkpoint that moves only then, and after a kill -9 what was journaled is read again.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from shipper.errors import ConfigError
from shipper.heartbeat import Heartbeat
from shipper.inputs.journal import FrameTooLarge, Journal, JournalBusy, JournalFull, encode_frame
from shipper.record import Batch

log = logging.getLogger(__name__)

MAX_ROWS_PER_FRAME = 10_000
TICK_SECONDS = 2.0   # the reader's wait when nothing comes: an append, a sync or a stop wakes it at once


class _Wake:
    """What the pipeline sets to hurry an input's stop: ends the journal reader's wait too."""

    def __init__(self, source: "JournaledInput"):
        self.source = source

    def set(self) -> None:
        journal = getattr(self.source, "journal", None)
        if journal is not None:
            journal.wake_reader()


class JournaledInput:
    """The journal, the producers (things with start() and close(), made by ``make_producers``) and
    the reader loop. ``source``: what the records' ``source`` says (None: nothing)."""

    source: str | None = None

    def __init__(self, tag: str, name: str, directory: str, max_bytes: int, stats, checkpoint_interval: float,
                 where: str):
        self.tag = tag
        self.name = name
        self.stats = stats
        self.wake = _Wake(self)
        self.heartbeat = Heartbeat()
        self.stop = threading.Event()
        self._full_reported = 0.0
        try:
            self.journal = Journal(directory, max_bytes, stats, tag, checkpoint_interval=checkpoint_interval)
        except JournalBusy as exc:
            raise ConfigError([f"{where}: {exc}"]) from None
        try:
            self.producers: list = self.make_producers()
        except BaseException:  # e.g. an address in use: nothing of this input stays open
            self.journal.release()
            raise

    def make_producers(self) -> list:
        """The subclass's producers, ready to start (ConfigError naming the key when one cannot be made)."""
        return []

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
        for first, frame, items in frames_of(tag, now, self.source, messages, fields, limit, oversized):
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

    def journal_now(self, tag: str, messages: list, fields: list) -> bool:
        """Rows nobody waits an acknowledgement for, journaled and fsynced; False when refused (counted)."""
        seq = self.journal_rows(tag, messages, fields, wait=False, drop_oversized=True)
        if seq is None:
            return False
        try:
            self.journal.sync(seq)
        except OSError as exc:
            log.error("%s: cannot fsync the journal: %s", self.tag, exc)
            self.stats.add("journal_errors", 1, input=self.tag, reason="fsync")
        return True

    def _drop_oversized(self, exc: FrameTooLarge) -> None:
        log.error("%s: %s; dropped", self.tag, exc)
        self.stats.add("records_dropped", 1, input=self.tag, reason="too_large")

    def _say_full(self, exc: JournalFull) -> None:
        now = time.monotonic()
        if now - self._full_reported > 60:
            self._full_reported = now
            log.warning("%s: %s: senders that wait for acknowledgements wait, others' records are refused "
                        "(records_dropped{reason=\"journal_full\"})", self.tag, exc)
        self.stats.add("journal_full", 1, input=self.tag)

    # ------------------------------------------------------------ out of the journal

    def run(self, emit: Callable[[Batch], None], stop: threading.Event) -> None:
        self.start_producing()
        try:
            # Ends once producing stopped and everything durable was handed on: a stop delivers what
            # was acknowledged to senders now, not at a next start that an instance may never have.
            for batch in self.journal.batches(self.stop, wait=TICK_SECONDS):
                if stop.is_set() and not self.stop.is_set():
                    self.stop_producing()
                self.beat()
                if batch is not None:
                    self.stats.add("records_in", batch.count, input=self.tag)
                    emit(batch)
        finally:
            self.stop_producing()

    def beat(self) -> None:
        """The reader loop is alive (its ticks come every TICK_SECONDS at the latest)."""
        self.heartbeat.beat(TICK_SECONDS + 5.0)

    def save_checkpoints(self) -> None:
        self.journal.save_checkpoint()

    def close(self) -> None:
        """The pipeline is done with this input (stopped, or never started): its producers and journal
        are given up, so the next configuration's input can take them."""
        self.stop_producing()
        self.journal.release()

    def start_producing(self) -> None:
        for producer in self.producers:
            producer.start()

    def stop_producing(self) -> None:
        self.stop.set()
        for producer in self.producers:
            producer.close()
        self.journal.close()


def frames_of(tag: str, now: float, source: str | None, messages: list, fields: list, limit: int,
              oversized: Callable[[FrameTooLarge], None] | None = None):
    """(index of the first row, frame, its items) for rows, each frame at most MAX_ROWS_PER_FRAME rows
    and ``limit`` bytes: a frame over the limit is made again of half its rows. A row alone over it
    raises FrameTooLarge, or is left out after ``oversized`` was told."""
    first = 0
    total = len(messages)
    size = MAX_ROWS_PER_FRAME
    while first < total:
        items = [tag, now, source, messages[first:first + size], fields[first:first + size]]
        frame = encode_frame(*items)
        if len(frame) > limit:
            if size == 1:
                error = FrameTooLarge(f"one record of {len(frame)} bytes is over the journal's frame limit "
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
