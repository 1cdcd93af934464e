"""The local journal of what cannot be read again: events a peer sent (forward, syslog).

A log file can be read again after a crash; a network event cannot. So the network inputs append
what they receive here, fsynced, *before* they acknowledge it to the sender, and the pipeline
reads the journal back like a file: batches carry byte ranges of a segment, a checkpoint (segment,
offset) advances only once every output confirmed them, and a segment is deleted once it is wholly
confirmed. After a kill -9 the reader starts again at the checkpoint.

On disk: ``<data_dir>/journal/<name>/`` holds segments ``00000000000000000001.seg`` ... and a
``checkpoint``. A segment is a run of frames; a frame is one batch::

    b"SJ" | payload length (uint32 BE) | crc32 of the payload (uint32 BE) | payload

and the payload is msgpack ``[tag, read_time, source, messages, fields]``, exactly a Batch's rows,
so reading a frame back is one msgpack call. A writer never appends to a segment of an earlier
run: a torn frame (the crash came mid-write, before its fsync, so it was never acknowledged) can
only end a sealed segment, where the reader counts it and moves on.

Durability is a group commit: appenders write under a lock; ``sync(seq)`` fdatasyncs once for
everything written so far, so concurrent connections share one fsync. The reader sees only what
is durable. Bounded: a frame that would take the journal past ``max_bytes`` (or the file system
under ``MIN_FREE_BYTES`` free) raises :class:`JournalFull`, and the input decides: wait (a sender
that waits for acknowledgements) or refuse and count.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Iterator

import msgpack

from shipper.acks import OffsetTracker
from shipper.durable import create_new, fsync_dir, make_dirs, write_atomically
from shipper.record import Batch

log = logging.getLogger(__name__)

MAGIC = b"SJ"
HEADER = struct.Struct(">2sII")
MAX_FRAME_BYTES = 256 * 1024 * 1024   # a frame claiming more is corruption, not a batch
MIN_FREE_BYTES = 64 * 1024 * 1024     # the journal never takes the file system's last 64 MiB
READ_BYTES = 4 * 1024 * 1024          # what the reader takes from a segment at once
SUFFIX = ".seg"


class JournalFull(Exception):
    """The journal holds ``max_bytes`` (or the disk is nearly full): nothing more until outputs confirm."""


class JournalCorrupt(ValueError):
    """A frame that is not one (bad magic, length or checksum)."""


# ---------------------------------------------------------------- pure: frames

def encode_frame(tag: str, read_time: float, source: str | None, messages: list, fields: list) -> bytes:
    payload = msgpack.packb([tag, read_time, source, messages, fields], use_bin_type=True)
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode_frames(data: bytes | memoryview, base: int) -> tuple[list[tuple[int, int, list]], int]:
    """The whole frames at the start of ``data`` (which begins at segment offset ``base``):
    ([(start, end, payload items)], bytes consumed). A partial frame at the end is left for later;
    anything that is not a frame raises JournalCorrupt (with what came before it lost to nobody:
    the caller takes the frames returned first)."""
    view = memoryview(data)
    frames = []
    at = 0
    while len(view) - at >= HEADER.size:
        magic, length, crc = HEADER.unpack_from(view, at)
        if magic != MAGIC or length > MAX_FRAME_BYTES:
            raise JournalCorrupt(f"no frame at offset {base + at}", frames, at)
        end = at + HEADER.size + length
        if end > len(view):
            break
        payload = view[at + HEADER.size:end]
        if zlib.crc32(payload) != crc:
            raise JournalCorrupt(f"the frame at offset {base + at} fails its checksum", frames, at)
        try:
            items = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception as exc:  # a checksum that matches garbage: written by something else
            raise JournalCorrupt(f"the frame at offset {base + at} is not msgpack: {exc}", frames, at) from None
        if not (isinstance(items, list) and len(items) == 5 and isinstance(items[3], list)
                and isinstance(items[4], list) and len(items[3]) == len(items[4])):
            raise JournalCorrupt(f"the frame at offset {base + at} is not a batch", frames, at)
        frames.append((base + at, base + end, items))
        at = end
    return frames, at


def segment_name(number: int) -> str:
    return f"{number:020d}{SUFFIX}"


def segment_numbers(names: list[str]) -> list[int]:
    numbers = []
    for name in names:
        stem = name[:-len(SUFFIX)]
        if name.endswith(SUFFIX) and stem.isdigit() and len(stem) == 20:
            numbers.append(int(stem))
    return sorted(numbers)


def parse_checkpoint(text: str) -> tuple[int, int] | None:
    parts = text.split()
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return int(parts[0]), int(parts[1])
    return None


@dataclass
class Segment:
    number: int
    size: int
    tracker: OffsetTracker
    sealed: bool = False   # no more frames will come (an earlier run's, or rotated)
    read_to: int = 0       # where the reader is


# ---------------------------------------------------------------- the journal

class Journal:
    def __init__(self, directory: str, max_bytes: int, stats, name: str, segment_bytes: int | None = None,
                 checkpoint_interval: float = 1.0):
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or max(64 * 1024, min(64 * 1024**2, max_bytes // 8))
        self.stats = stats
        self.name = name
        self.checkpoint_interval = checkpoint_interval
        make_dirs(directory)
        self._lock = threading.RLock()       # appends, rotation, the segments
        self._sync_lock = threading.Lock()   # one fsync at a time (taken before _lock)
        self._changed = threading.Condition(self._lock)  # durable moved, or room was made
        self.segments: dict[int, Segment] = {}
        start = self._load_checkpoint()
        numbers = segment_numbers(os.listdir(directory))
        for number in numbers:
            path = os.path.join(directory, segment_name(number))
            if number < start[0]:  # confirmed before the crash: its removal was cut short
                self._unlink(path)
                continue
            committed = start[1] if number == start[0] else 0
            size = os.stat(path).st_size
            if size == 0:  # an earlier run's segment that never got a frame (each start opens one)
                self._unlink(path)
                continue
            self.segments[number] = Segment(number, size, OffsetTracker(min(committed, size)), sealed=True,
                                            read_to=min(committed, size))
        self.total_bytes = sum(s.size for s in self.segments.values())
        self.active = (numbers[-1] + 1) if numbers else max(1, start[0])
        self._fd = self._open_segment(self.active)
        self.written_seq = 0
        self.durable_seq = 0
        self.durable_offset = 0   # in the active segment
        self._written_offset = 0
        self._free_checked = 0.0
        self._disk_low = False
        self._checkpoint_saved = self.committed_position()
        self._checkpoint_at = 0.0

    # ------------------------------------------------------------ writer side

    def _open_segment(self, number: int) -> int:
        path = os.path.join(self.directory, segment_name(number))
        try:
            fd = create_new(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_APPEND)
        except FileExistsError:  # a leftover that is not a segment we know: never write through it
            os.unlink(path)
            fd = create_new(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_APPEND)
        fsync_dir(self.directory)
        self.segments[number] = Segment(number, 0, OffsetTracker(0))
        return fd

    def room_for(self, size: int) -> bool:
        return self.total_bytes + size <= self.max_bytes and not self._disk_is_low()

    def _disk_is_low(self) -> bool:
        now = time.monotonic()
        if now - self._free_checked >= 1.0:
            self._free_checked = now
            try:
                info = os.statvfs(self.directory)
                self._disk_low = info.f_bavail * info.f_frsize < MIN_FREE_BYTES
            except OSError:
                self._disk_low = False
        return self._disk_low

    def append(self, frame: bytes) -> int:
        """Write one frame (``encode_frame``); return its sequence number for ``sync``.
        JournalFull when it does not fit; OSError when the disk refuses (the caller counts it)."""
        with self._lock:
            if not self.room_for(len(frame)):
                raise JournalFull(f"the journal of {self.name} holds {self.total_bytes} bytes "
                                  f"(journal_max_bytes {self.max_bytes})"
                                  + ("; the disk has under 64 MiB free" if self._disk_low else ""))
            view = memoryview(frame)
            written = 0
            try:
                while written < len(view):
                    written += os.write(self._fd, view[written:])
            except OSError:
                if written:  # a partial frame would hide every later one: cut it off
                    os.ftruncate(self._fd, self._written_offset)
                raise
            self._written_offset += len(frame)
            self.total_bytes += len(frame)
            self.segments[self.active].size = self._written_offset
            self.written_seq += 1
            seq = self.written_seq
        if self._written_offset >= self.segment_bytes:
            self._rotate()
        return seq

    def sync(self, seq: int) -> None:
        """Make everything up to ``seq`` durable: one fdatasync serves every appender waiting."""
        if self.durable_seq >= seq:
            return
        with self._sync_lock:
            if self.durable_seq >= seq:
                return
            with self._lock:
                target, offset, fd = self.written_seq, self._written_offset, self._fd
            os.fdatasync(fd)
            with self._changed:
                self.durable_seq = max(self.durable_seq, target)
                self.durable_offset = max(self.durable_offset, offset)
                self._changed.notify_all()

    def _rotate(self) -> None:
        with self._sync_lock:
            with self._lock:
                if self._written_offset < self.segment_bytes:
                    return  # another thread rotated first
                os.fdatasync(self._fd)
                os.close(self._fd)
                old = self.segments[self.active]
                number = self.active + 1
                self._fd = self._open_segment(number)
                old.sealed = True
                self.durable_seq = self.written_seq
                self.active = number
                self.durable_offset = 0
                self._written_offset = 0
                self._changed.notify_all()

    def wait_for_room(self, size: int, timeout: float) -> bool:
        with self._changed:
            if not self.room_for(size):
                self._changed.wait(timeout)
        return self.room_for(size)

    def close(self) -> None:
        with self._sync_lock, self._lock:
            if self._fd >= 0:
                try:
                    os.fdatasync(self._fd)
                    self.durable_seq = self.written_seq
                    self.durable_offset = self._written_offset
                    self._changed.notify_all()
                finally:
                    os.close(self._fd)
                    self._fd = -1

    # ------------------------------------------------------------ reader side

    def batches(self, stop: threading.Event, wait: float = 0.5) -> Iterator[Batch]:
        """Batches of what is durable, in order, each with ``on_done`` moving the checkpoint; waits for
        more while ``stop`` is not set, and once it is set yields what is durable still, then ends."""
        while True:
            with self._lock:
                segment = self._reading()
            if segment is None:
                if stop.is_set():
                    return
                with self._changed:
                    if self._reading() is None:
                        self._changed.wait(wait)
                self.save_checkpoint(due_only=True)
                yield None  # a tick: the caller beats its heartbeat and checks stop
                continue
            yield from self._read_segment(segment)

    def _readable_end(self, segment: Segment) -> int:
        return self.durable_offset if segment.number == self.active else segment.size

    def _reading(self) -> Segment | None:
        """The first segment with durable bytes not read yet (under _lock)."""
        for number in sorted(self.segments):
            segment = self.segments[number]
            if segment.read_to < self._readable_end(segment):
                return segment
        return None

    def _read_segment(self, segment: Segment) -> Iterator[Batch]:
        path = os.path.join(self.directory, segment_name(segment.number))
        with self._lock:
            end = self._readable_end(segment)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            self._skip(segment, end, "unreadable", f"cannot open it: {exc}")
            return
        try:
            data = os.pread(fd, min(end - segment.read_to, READ_BYTES), segment.read_to)
            if len(data) >= HEADER.size:
                magic, length, _ = HEADER.unpack_from(data)
                whole = HEADER.size + length
                if magic == MAGIC and len(data) < whole <= min(end - segment.read_to, MAX_FRAME_BYTES + HEADER.size):
                    data = os.pread(fd, whole, segment.read_to)  # one frame larger than a read
        finally:
            os.close(fd)
        try:
            frames, _ = decode_frames(data, segment.read_to)
            broken = None
        except JournalCorrupt as exc:
            frames, broken = exc.args[1], exc.args[0]
        for start, stop, (tag, read_time, source, messages, fields) in frames:
            segment.read_to = stop
            batch = Batch(tag, source, read_time, messages=messages, fields=fields, start=start, end=stop)
            batch.on_done = self._confirmer(segment, start, stop)
            yield batch
        if broken is not None:
            self._skip(segment, end, "corrupt", broken)
        elif not frames and segment.sealed:
            # A frame cut short ends a sealed segment: the crash came before its fsync returned, so
            # it was never acknowledged to anyone.
            self._skip(segment, end, "torn", f"a frame cut short at offset {segment.read_to}")

    def _skip(self, segment: Segment, end: int, reason: str, text: str) -> None:
        """Nothing more can be read of ``segment`` up to ``end``: say so, count it, confirm the rest."""
        log.error("journal %s: segment %s: %s; the rest of it is skipped", self.name,
                  segment_name(segment.number), text)
        self.stats.add("journal_errors", 1, input=self.name, reason=reason)
        skipped_from, segment.read_to = segment.read_to, end
        if skipped_from < end:
            self._confirmer(segment, skipped_from, end)()

    def _confirmer(self, segment: Segment, start: int, end: int):
        tracker = segment.tracker

        def done() -> None:
            if tracker.done(start, end):
                self._advanced()
        return done

    # ------------------------------------------------------------ checkpoints and clean-up

    def committed_position(self) -> tuple[int, int]:
        """(segment, offset) before which every frame is confirmed."""
        with self._lock:
            return self._committed_position()

    def _committed_position(self) -> tuple[int, int]:
        for number in sorted(self.segments):
            segment = self.segments[number]
            if not (segment.sealed and segment.tracker.committed >= segment.size):
                return number, segment.tracker.committed
        return self.active, 0

    def _advanced(self) -> None:
        """A confirmation moved a segment's committed offset: delete the segments wholly confirmed."""
        with self._lock:
            number, _ = self._committed_position()
            removed = [self.segments.pop(old) for old in [n for n in self.segments if n < number]]
            for segment in removed:
                self.total_bytes -= segment.size
            if removed:
                self._changed.notify_all()
        for segment in removed:  # the checkpoint names a later segment once saved; before, a restart skips these
            self._unlink(os.path.join(self.directory, segment_name(segment.number)))
        self.save_checkpoint(due_only=True)

    def save_checkpoint(self, due_only: bool = False) -> None:
        position = self.committed_position()
        if position == self._checkpoint_saved:
            return
        now = time.monotonic()
        if due_only and now - self._checkpoint_at < self.checkpoint_interval:
            return
        self._checkpoint_at = now
        try:
            write_atomically(os.path.join(self.directory, "checkpoint"), b"%d %d\n" % position)
            self._checkpoint_saved = position
        except OSError as exc:
            log.warning("journal %s: cannot save its checkpoint (%s); retried later", self.name, exc)

    def _load_checkpoint(self) -> tuple[int, int]:
        path = os.path.join(self.directory, "checkpoint")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0, 0
        try:
            text = os.read(fd, 100).decode("ascii", "replace")
        finally:
            os.close(fd)
        position = parse_checkpoint(text)
        if position is None:
            log.error("journal %s: its checkpoint %r is damaged; reading every segment again", self.name, text)
            return 0, 0
        return position

    def _unlink(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
