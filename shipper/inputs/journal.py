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
that waits for acknowledgements) or refuse and count; a frame that could never fit (over half of
``max_bytes``) raises :class:`FrameTooLarge` at once, so nobody waits for room that never comes.

The frames last written are also kept in memory (``RECENT_BYTES`` of them): a reader that keeps up
takes its rows from there instead of reading and decoding them again, once they are durable. A
reader that lags reads the segment; nothing but the cost differs.

Failures of the disk are never a crash and never a wrong offset: a write cut short is cut off the
segment again (or, if even that fails, the segment is sealed where its last whole frame ends and
the next write opens a new one); a rotation that fails leaves the current segment in use and is
tried again; a segment that cannot be read for now (EIO, no descriptors) is tried again, never
skipped; one that is gone is counted. One Journal at a time owns a directory (``lock``, flock):
a second agent on the same data_dir, or a reload's input while the old one still runs, gets
:class:`JournalBusy` instead of writing through the other's segments.
"""

from __future__ import annotations

import collections
import errno
import fcntl
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
from shipper.errors import ShipperError
from shipper.record import Batch

log = logging.getLogger(__name__)

MAGIC = b"SJ"
HEADER = struct.Struct(">2sII")
MAX_FRAME_BYTES = 256 * 1024 * 1024   # a frame claiming more is corruption, not a batch
MIN_FREE_BYTES = 64 * 1024 * 1024     # the journal never takes the file system's last 64 MiB
READ_BYTES = 4 * 1024 * 1024          # what the reader takes from a segment at once
RECENT_BYTES = 512 * 1024            # frames kept in memory for a reader that keeps up (decoded: ~60x)
RETRY_SECONDS = 1.0                   # before a failed rotation or read is tried again
SUFFIX = ".seg"


class JournalFull(Exception):
    """The journal holds ``max_bytes`` (or the disk is nearly full): nothing more until outputs confirm."""


class JournalCorrupt(ValueError):
    """A frame that is not one (bad magic, length or checksum)."""


class FrameTooLarge(ValueError):
    """A frame the journal could never hold (over half its max_bytes, or MAX_FRAME_BYTES)."""


class JournalBusy(ShipperError):
    """Another Journal (another agent, or an input of a configuration still stopping) owns the directory."""


# ---------------------------------------------------------------- pure: frames

def _packable(value: object) -> object:
    """What a row holds that msgpack has no type for (only a bug puts one there): its text."""
    return str(value)


def encode_frame(tag: str, read_time: float, source: str | None, messages: list, fields: list) -> bytes:
    payload = msgpack.packb([tag, read_time, source, messages, fields], use_bin_type=True, default=_packable)
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
        self.frame_limit = min(MAX_FRAME_BYTES, max_bytes // 2)
        self.stats = stats
        self.name = name
        self.checkpoint_interval = checkpoint_interval
        make_dirs(directory)
        self._owner = _own(directory)
        self._lock = threading.RLock()       # appends, rotation, the segments
        self._sync_lock = threading.Lock()   # one fsync at a time (taken before _lock)
        self._changed = threading.Condition(self._lock)  # durable moved, or room was made
        self._checkpoint_lock = threading.Lock()
        self.segments: dict[int, Segment] = {}
        self._recent: collections.deque = collections.deque()   # (segment, start, end, items)
        self._recent_bytes = 0
        self._released = False
        try:
            self._open(self._load_checkpoint())
        except BaseException:
            os.close(self._owner)
            raise

    def _open(self, start: tuple[int, int]) -> None:
        numbers = segment_numbers(os.listdir(self.directory))
        for number in numbers:
            path = os.path.join(self.directory, segment_name(number))
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
        self._fd = self._new_segment(self.active)
        self.segments[self.active] = Segment(self.active, 0, OffsetTracker(0))
        self.written_seq = 0
        self.durable_seq = 0
        self.durable_offset = 0   # in the active segment
        self._written_offset = 0
        self._must_rotate = False  # a write cut short that could not be cut off: never append after it
        self._rotate_after = 0.0
        self._free_checked = 0.0
        self._disk_low = False
        self._checkpoint_saved = self.committed_position()
        self._checkpoint_at = 0.0
        self._error_said: dict[str, float] = {}

    # ------------------------------------------------------------ writer side

    def _new_segment(self, number: int) -> int:
        path = os.path.join(self.directory, segment_name(number))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_APPEND
        try:
            fd = create_new(path, flags)
        except FileExistsError:  # a leftover that is not a segment we know: never write through it
            os.unlink(path)
            fd = create_new(path, flags)
        try:
            fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            self._unlink(path)
            raise
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

    def append(self, frame: bytes, items: list | None = None) -> int:
        """Write one frame (``encode_frame``); return its sequence number for ``sync``. ``items``: the
        frame's payload as decoded (what the reader would read back), kept for a reader that keeps up.
        JournalFull when it does not fit now, FrameTooLarge when it never will; OSError when the disk
        refuses (the caller counts it and may try again: nothing of the frame stays written)."""
        if len(frame) > self.frame_limit:
            raise FrameTooLarge(f"a frame of {len(frame)} bytes is over the journal's limit of {self.frame_limit} "
                                f"(half of journal_max_bytes {self.max_bytes})")
        if self._must_rotate:
            self._rotate(must=True)
        elif self._rotation_due():
            self._rotate()  # a rotation that failed: tried again, or the active segment could fill the journal
        with self._lock:
            if self._fd < 0:
                raise OSError(errno.EBADF, f"the journal of {self.name} is closed")
            if not self.room_for(len(frame)):
                raise JournalFull(f"the journal of {self.name} holds {self.total_bytes} bytes "
                                  f"(journal_max_bytes {self.max_bytes})"
                                  + ("; the disk has under 64 MiB free" if self._disk_low else ""))
            if self._must_rotate:
                raise OSError(errno.EIO, "the journal's segment ends in a frame cut short")
            view = memoryview(frame)
            written = 0
            try:
                while written < len(view):
                    written += os.write(self._fd, view[written:])
            except OSError:
                if written:  # a partial frame would hide every later one: cut it off
                    try:
                        os.ftruncate(self._fd, self._written_offset)
                    except OSError:  # then this segment ends where its last whole frame does
                        self._must_rotate = True
                raise
            start = self._written_offset
            self._written_offset += len(frame)
            self.total_bytes += len(frame)
            self.segments[self.active].size = self._written_offset
            self.written_seq += 1
            seq = self.written_seq
            if items is not None:
                self._keep_recent(self.active, start, self._written_offset, items)
        if self._rotation_due():
            self._rotate()
        return seq

    def _rotation_due(self) -> bool:
        return self._written_offset >= self.segment_bytes and time.monotonic() >= self._rotate_after

    def _keep_recent(self, number: int, start: int, end: int, items: list) -> None:
        recent = self._recent
        recent.append((number, start, end, items))
        self._recent_bytes += end - start
        while self._recent_bytes > RECENT_BYTES and recent:
            _, old_start, old_end, _ = recent.popleft()
            self._recent_bytes -= old_end - old_start

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

    def _rotate(self, must: bool = False) -> None:
        """Seal the active segment and open the next. The new one is made first and the old one synced
        before anything changes, so a failure leaves the active segment as it was: tried again after
        RETRY_SECONDS, and raised when ``must`` (the active one may not be written again)."""
        with self._sync_lock:
            with self._lock:
                if self._fd < 0:
                    return  # closed (a straggler after release): the next Journal owns the names
                if not (self._must_rotate or self._written_offset >= self.segment_bytes):
                    return  # another thread rotated first
                number = self.active + 1
                try:
                    fd = self._new_segment(number)
                except OSError as exc:
                    self._rotation_failed(exc, must)
                    return
                try:
                    os.fdatasync(self._fd)
                except OSError as exc:
                    os.close(fd)
                    self._unlink(os.path.join(self.directory, segment_name(number)))
                    self._rotation_failed(exc, must)
                    return
                try:
                    os.close(self._fd)
                except OSError:
                    pass  # the descriptor is gone whatever close says; the data was synced
                self._fd = fd
                self.segments[self.active].sealed = True
                self.segments[number] = Segment(number, 0, OffsetTracker(0))
                self.durable_seq = self.written_seq
                self.active = number
                self.durable_offset = 0
                self._written_offset = 0
                self._must_rotate = False
                self._changed.notify_all()
        self._advanced()  # the segment sealed now may be wholly confirmed already: it goes

    def _rotation_failed(self, exc: OSError, must: bool) -> None:
        self._rotate_after = time.monotonic() + RETRY_SECONDS
        self._error("rotate", f"cannot start a new segment: {exc}; the current one stays in use")
        if must:
            raise exc

    def wait_for_room(self, size: int, timeout: float) -> bool:
        with self._changed:
            if not self.room_for(size):
                self._changed.wait(timeout)
        return self.room_for(size)

    def wake_reader(self) -> None:
        """The reader's wait ends now (the pipeline is stopping: it should look at its stop flag)."""
        with self._changed:
            self._changed.notify_all()

    def close(self) -> None:
        """No more writing (what was written is synced); the reader may go on reading and confirming."""
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

    def release(self) -> None:
        """Close, save the checkpoint and give the directory up: a later Journal may own it. What this
        one is told after (a late confirmation) changes nothing on disk."""
        if self._released:
            return
        try:
            self.close()
        except OSError as exc:
            self._error("fsync", f"cannot sync the last frames: {exc}")
        self.save_checkpoint()
        with self._checkpoint_lock:
            self._released = True
            os.close(self._owner)

    # ------------------------------------------------------------ reader side

    def batches(self, stop: threading.Event, wait: float = 2.0) -> Iterator[Batch | None]:
        """Batches of what is durable, in order, each with ``on_done`` moving the checkpoint; waits for
        more while ``stop`` is not set, and once it is set yields what is durable still, then ends.
        None is a tick (the caller beats its heartbeat and looks at its stop)."""
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
                yield None
                continue
            readable = yield from self._read_segment(segment)
            if not readable:  # for now: tried again after a pause, or at the next start when stopping
                if stop.is_set() or stop.wait(RETRY_SECONDS):
                    return
                yield None

    def _readable_end(self, segment: Segment) -> int:
        return self.durable_offset if segment.number == self.active else segment.size

    def _reading(self) -> Segment | None:
        """The first segment with durable bytes not read yet (under _lock)."""
        for number in sorted(self.segments):
            segment = self.segments[number]
            if segment.read_to < self._readable_end(segment):
                return segment
        return None

    def _from_memory(self, segment: Segment, end: int) -> list[tuple[int, int, list]]:
        """The frames of ``segment`` from ``read_to`` up to ``end`` still kept in memory (under _lock)."""
        recent = self._recent
        while recent and (recent[0][0], recent[0][1]) < (segment.number, segment.read_to):
            _, start, stop, _ = recent.popleft()  # read already (from disk, when the reader lagged)
            self._recent_bytes -= stop - start
        frames = []
        at = segment.read_to
        for number, start, stop, items in recent:
            if number != segment.number or start != at or stop > end:
                break
            frames.append((start, stop, items))
            at = stop
        return frames

    def _read_segment(self, segment: Segment):
        """Yield the batches of ``segment`` readable now; return False when it cannot be read for now."""
        with self._lock:
            end = self._readable_end(segment)
            frames = self._from_memory(segment, end)
        broken = None
        if not frames:
            try:
                data = self._pread(segment, end)
            except FileNotFoundError:
                self._skip(segment, end, "missing", "it was removed by something other than the agent")
                return True
            except OSError as exc:
                self._error("read", f"cannot read {segment_name(segment.number)}: {exc}; tried again")
                return False
            try:
                frames, _ = decode_frames(data, segment.read_to)
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
        return True

    def _pread(self, segment: Segment, end: int) -> bytes:
        fd = os.open(os.path.join(self.directory, segment_name(segment.number)),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            data = os.pread(fd, min(end - segment.read_to, READ_BYTES), segment.read_to)
            if len(data) >= HEADER.size:
                magic, length, _ = HEADER.unpack_from(data)
                whole = HEADER.size + length
                if magic == MAGIC and len(data) < whole <= min(end - segment.read_to, MAX_FRAME_BYTES + HEADER.size):
                    data = os.pread(fd, whole, segment.read_to)  # one frame larger than a read
            return data
        finally:
            os.close(fd)

    def _skip(self, segment: Segment, end: int, reason: str, text: str) -> None:
        """Nothing more can be read of ``segment`` up to ``end``: say so, count it, confirm the rest."""
        log.error("journal %s: segment %s: %s; the rest of it is skipped", self.name,
                  segment_name(segment.number), text)
        self.stats.add("journal_errors", 1, input=self.name, reason=reason)
        skipped_from, segment.read_to = segment.read_to, end
        if skipped_from < end:
            self._confirmer(segment, skipped_from, end)()

    def _error(self, reason: str, text: str) -> None:
        """A failure the journal outlives: counted each time, logged once a minute per kind."""
        self.stats.add("journal_errors", 1, input=self.name, reason=reason)
        now = time.monotonic()
        if now - self._error_said.get(reason, -1e9) >= 60:
            self._error_said[reason] = now
            log.error("journal %s: %s", self.name, text)

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
        if self._released:  # a later Journal owns the directory now
            return
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
        # One writer at a time: the input's thread (ticks) and the outputs' (confirmations) both save,
        # through one temporary file, and an older position must never overwrite a newer one.
        with self._checkpoint_lock:
            if self._released:
                return
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


def _own(directory: str) -> int:
    """Take the directory's lock (held as long as the descriptor is open), or JournalBusy."""
    fd = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise JournalBusy(f"the journal {directory} is in use: another agent runs with the same data_dir, "
                          "or an input of the previous configuration has not stopped yet") from None
    return fd
