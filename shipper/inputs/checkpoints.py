"""File checkpoints: where each tailed file was confirmed up to, persisted crash-safely.

A file is known by (device, inode) plus a fingerprint of its first bytes, so that a new
file that happens to get a recycled inode is not mistaken for the old one.

On disk, per input, under ``data_dir/checkpoints`` (so that the cost of a save follows what changed,
not the number of files followed):

- ``file-ID.json``, the base: ``{"version": 2, "seq": N, "files": [{"path", "dev", "ino", "offset",
  "fp_len", "fp"}, ...]}``, always replaced whole (``write_atomically``); it holds every update up to
  sequence number N. Version 1 (no ``seq``) is read as N = 0.
- ``file-ID.journal``, appended to by each ``update()`` and fsynced once per call: one line per change,
  ``CRC32HEX JSON\\n`` where JSON is ``[seq, path, dev, ino, offset, fp_len, fp]`` (set),
  ``[seq, dev, ino]`` (removed) or ``[seq]`` (the update ``seq`` is complete). An update counts
  only once its ``[seq]`` line is read, so a crash mid-append (a torn or missing tail) loads as the
  update before; lines with ``seq <= N`` are already in the base and are skipped, which makes a crash
  between writing the base and emptying the journal harmless. When the journal has more lines than
  ``max(COMPACT_MIN_LINES, live entries)`` it is compacted: a new base, then a new empty journal.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import orjson

from shipper.durable import NEW_FILE, create_new, fsync_dir, make_dirs, write_atomically

log = logging.getLogger(__name__)

FINGERPRINT_BYTES = 1024
BASE_VERSION = 2
# The journal is compacted past max(this, live entries) lines: its size stays within about twice the
# base's, and a store of a few files is not rewritten every few seconds.
COMPACT_MIN_LINES = 4096
# A new journal, appended to: never an existing file, never through a symlink.
JOURNAL_FLAGS = NEW_FILE | os.O_APPEND


@dataclass
class Checkpoint:
    path: str
    dev: int
    ino: int
    offset: int
    fp_len: int = 0
    fp: int = 0

    @property
    def key(self) -> tuple[int, int]:
        return (self.dev, self.ino)


class Every:
    """Says "due" at most once per ``interval`` seconds: when an input writes its checkpoints. Never
    before ``interval`` has passed on the monotonic clock (an infinite one: never)."""

    def __init__(self, interval: float):
        self.interval = interval
        self._last = 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.interval:
            return False
        self._last = now
        return True


def fingerprint(fd: int, limit: int = FINGERPRINT_BYTES) -> tuple[int, int]:
    """(length, crc32) of the first ``limit`` bytes of an open file (fewer when it is shorter)."""
    head = os.pread(fd, limit, 0)
    return len(head), zlib.crc32(head)


def same_start(fd: int, other: int | None, length: int) -> bool:
    """Whether two open files begin with the same ``length`` bytes (False when ``other`` is not open,
    or either cannot be read now)."""
    if other is None:
        return False
    try:
        return os.pread(fd, length, 0) == os.pread(other, length, 0)
    except OSError:
        return False


def fingerprint_matches(fd: int, checkpoint: Checkpoint) -> bool:
    if checkpoint.fp_len == 0:
        return True
    head = os.pread(fd, checkpoint.fp_len, 0)
    return len(head) == checkpoint.fp_len and zlib.crc32(head) == checkpoint.fp


# ------------------------------------------------------------------ the format, as pure functions

class DamagedCheckpoints(ValueError):
    """A checkpoint file that cannot be used as written (the agent starts without that part)."""


def encode_base(seq: int, entries: Iterable[Checkpoint]) -> bytes:
    # orjson serializes dataclasses natively (fields only), far faster than asdict per entry.
    return orjson.dumps({"version": BASE_VERSION, "seq": seq, "files": list(entries)})


def decode_base(data: bytes) -> tuple[int, dict[tuple[int, int], Checkpoint]]:
    """(seq, entries) of a base file, version 1 or 2; DamagedCheckpoints if it is not one."""
    try:
        raw = orjson.loads(data)
        version = raw.get("version", 1)
        if version not in (1, BASE_VERSION):
            raise DamagedCheckpoints(f"version {version!r}, written by another shipper version")
        seq = raw.get("seq", 0) if version == BASE_VERSION else 0
        if type(seq) is not int or seq < 0:
            raise DamagedCheckpoints(f"bad seq {seq!r}")
        entries = {}
        for item in raw["files"]:
            entry = Checkpoint(**item)
            entries[(entry.dev, entry.ino)] = entry
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DamagedCheckpoints(str(exc)) from exc
    return seq, entries


def _line(payload: list) -> bytes:
    body = orjson.dumps(payload)
    return b"%08x %s\n" % (zlib.crc32(body), body)


def encode_update(seq: int, changed: Iterable[Checkpoint], removed: Iterable[tuple[int, int]]) -> bytes:
    """The journal lines of one update: its changes, then its ``[seq]`` completion line."""
    lines = [_line([seq, e.path, e.dev, e.ino, e.offset, e.fp_len, e.fp]) for e in changed]
    lines.extend(_line([seq, dev, ino]) for dev, ino in removed)
    lines.append(_line([seq]))
    return b"".join(lines)


def _parse_line(line: bytes) -> list | None:
    if len(line) < 10 or line[8:9] != b" ":
        return None
    body = line[9:]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        item = orjson.loads(body)
    except ValueError:
        return None
    if not isinstance(item, list) or len(item) not in (1, 3, 7) or type(item[0]) is not int:
        return None
    return item


_NEXT = -1  # a damaged line whose update is unknown: taint the next update seen


def replay_journal(data: bytes, base_seq: int, entries: dict[tuple[int, int], Checkpoint]) -> tuple[int, str | None]:
    """Apply to ``entries`` (in place) every complete update of ``data`` newer than ``base_seq``.

    Returns (the last update applied, or ``base_seq``; why some lines were not used, or None).
    An update is applied whole or not at all: a damaged line costs its update only, what follows is
    used. An unterminated last line is a write the crash interrupted (never a completed update: an
    update returns after its final newline is fsynced), so it is dropped without a word.
    """
    applied, damaged = base_seq, None
    last_commit: int | None = None
    pending: list[list] = []
    pending_seq: int | None = None
    tainted: int | None = None
    latest: dict[tuple[int, int], list] = {}
    lines = data.split(b"\n")
    lines.pop()  # b"" after a final newline; else the torn tail
    for number, line in enumerate(lines, 1):
        item = _parse_line(line)
        if item is None:
            damaged = damaged or f"line {number} is damaged"
            # Updates never share lines and their seqs follow each other: the damaged line belongs to
            # the update in progress, or else to the one after the last complete update.
            if pending_seq is not None:
                tainted = pending_seq
            else:
                tainted = last_commit + 1 if last_commit is not None else _NEXT
            pending, pending_seq = [], None
            continue
        seq = item[0]
        if tainted == _NEXT:
            tainted = seq
        if seq == tainted:
            if len(item) == 1:
                last_commit = seq
            continue
        if pending_seq is not None and seq != pending_seq:
            damaged = damaged or f"update {pending_seq} is incomplete (line {number})"
            pending = []
        pending_seq = seq
        if len(item) > 1:
            pending.append(item)
            continue
        last_commit = seq  # [seq]: the update is complete
        if seq > applied:
            for change in pending:
                latest[(change[-5], change[-4]) if len(change) == 7 else (change[1], change[2])] = change
            applied = seq
        pending, pending_seq = [], None
    # Only each key's last change becomes a Checkpoint (a busy file has one line per update).
    for key, change in latest.items():
        if len(change) == 7:
            entries[key] = Checkpoint(*change[1:])
        else:
            entries.pop(key, None)
    return applied, damaged


# ------------------------------------------------------------------ the store

class CheckpointStore:
    """One base file and one journal per input under ``data_dir/checkpoints``.

    The store keeps the current state in memory (key -> Checkpoint; it keeps the objects it is
    given, which must not be changed after). ``update()`` writes what changed; ``save()`` rewrites all.
    """

    def __init__(self, data_dir: str, input_id: str, compact_min_lines: int = COMPACT_MIN_LINES):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in input_id)
        self.directory = os.path.join(data_dir, "checkpoints")
        self.path = os.path.join(self.directory, f"file-{safe}.json")
        self.journal_path = os.path.join(self.directory, f"file-{safe}.journal")
        self.compact_min_lines = compact_min_lines
        self._state: dict[tuple[int, int], Checkpoint] | None = None  # None: not loaded yet
        self._seq = 0
        self._journal_fd: int | None = None
        self._journal_id: tuple[int, int] | None = None  # (dev, ino) of the journal we append to
        self._journal_lines = 0
        # A write failed: the journal may end in a part of an update, so the next write is a full one.
        self._broken = False
        self._lock = threading.Lock()

    @property
    def seq(self) -> int:
        """The sequence number of the last update written or loaded (the base's, after a full write)."""
        return self._seq

    # ------------------------------------------------------------ reading

    def load(self) -> dict[tuple[int, int], Checkpoint]:
        """The checkpoints on disk (a new dict); this store's next write is then a full one.

        Reads only, so another process may call it while the agent writes (tests do)."""
        with self._lock:
            return self._load()

    def _load(self) -> dict[tuple[int, int], Checkpoint]:
        self._close_journal()  # the next update starts a fresh base and journal
        # Hundreds of thousands of acyclic objects: the collector's passes over them would be a
        # quarter of the load time, and find nothing.
        paused = gc.isenabled()
        gc.disable()
        try:
            state = self._read()
        finally:
            if paused:
                gc.enable()
        self._state = dict(state)
        return state

    def _read(self) -> dict[tuple[int, int], Checkpoint]:
        # The journal first: if a compaction happens between the two reads, the newer base has
        # everything the journal read had (lines up to its seq are skipped), so no change is missed.
        try:
            with open(self.journal_path, "rb") as handle:
                journal = handle.read()
        except FileNotFoundError:
            journal = b""
        except OSError as exc:
            log.error("checkpoint journal %s is unreadable (%s); starting without it", self.journal_path, exc)
            journal = b""
        base_seq, entries = 0, {}
        try:
            with open(self.path, "rb") as handle:
                base_seq, entries = decode_base(handle.read())
        except FileNotFoundError:
            pass
        except (OSError, DamagedCheckpoints) as exc:
            # A damaged checkpoint must not stop the agent: start without it, and say so.
            log.error("checkpoint file %s is unreadable (%s); starting without those checkpoints", self.path, exc)
        self._seq, damaged = replay_journal(journal, base_seq, entries)
        if damaged:
            log.error("checkpoint journal %s: %s; starting without those updates", self.journal_path, damaged)
        return entries

    # ------------------------------------------------------------ writing

    def update(self, changed: Iterable[Checkpoint], removed: Iterable[tuple[int, int]] = ()) -> None:
        """Persist these changes (durable when it returns). Entries equal to the stored ones cost nothing.

        Raises OSError (e.g. data_dir full or read-only); the changes are kept in memory and the next
        call, even with nothing new, writes everything.
        """
        with self._lock:
            if self._state is None:
                self._load()
            state = self._state
            assert state is not None
            latest = {(e.dev, e.ino): e for e in changed}  # a key given twice: the last one counts
            sets = [e for key, e in latest.items() if state.get(key) != e]
            for e in sets:
                state[(e.dev, e.ino)] = e
            gone = [key for key in removed if state.pop(tuple(key), None) is not None]
            if self._broken or not self._journal_current():
                self._write_full()  # first write, after a failure, or the directory was removed
                return
            if not sets and not gone:
                return
            seq = self._seq + 1
            data = encode_update(seq, sets, gone)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._journal_fd, view):]
                os.fdatasync(self._journal_fd)
            except OSError:
                self._broken = True
                raise
            self._seq = seq
            self._journal_lines += len(sets) + len(gone) + 1
            if self._journal_lines > max(self.compact_min_lines, len(state)):
                self._write_full()

    def save(self, entries: Iterable[Checkpoint]) -> bool:
        """Replace all checkpoints with ``entries`` (a full rewrite; the journal is emptied).

        Returns False, writing nothing, when the store already holds exactly these and is up to date.
        """
        with self._lock:
            new = {(e.dev, e.ino): e for e in entries}
            if new == self._state and not self._broken and self._journal_current():
                return False
            self._state = new
            self._write_full()
            return True

    def close(self) -> None:
        with self._lock:
            self._close_journal()

    def _journal_current(self) -> bool:
        """The journal we append to is still the one at its name (data_dir may have been removed)."""
        if self._journal_fd is None:
            return False
        try:
            st = os.stat(self.journal_path, follow_symlinks=False)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._journal_id

    def _write_full(self) -> None:
        """A new base holding everything, then a new empty journal. A crash in between: the old
        journal's lines all have seq <= the base's and are skipped."""
        assert self._state is not None
        self._broken = True  # until both are done
        seq = self._seq + 1
        make_dirs(self.directory)  # 0750 whatever the umask; made again if data_dir was removed
        write_atomically(self.path, encode_base(seq, self._state.values()))
        self._seq = seq
        self._close_journal()
        # A new file rather than the old one truncated: whatever lies at the name (a torn tail of a
        # crash, a planted symlink) is removed, never opened.
        try:
            os.unlink(self.journal_path)
        except FileNotFoundError:
            pass
        fd = create_new(self.journal_path, JOURNAL_FLAGS)
        st = os.fstat(fd)
        self._journal_fd, self._journal_id = fd, (st.st_dev, st.st_ino)
        fsync_dir(self.directory)
        self._journal_lines = 0
        self._broken = False

    def _close_journal(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
        self._journal_fd, self._journal_id = None, None
