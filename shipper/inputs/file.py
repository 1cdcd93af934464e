"""The file input: follow every file matching the globs, through rotation, truncation and restarts.

One thread runs :meth:`FileInput.run`. It reads each file in big chunks until it is
drained, then checks what happened to it (rotated, truncated, deleted), and sleeps until
the poll interval passes or a directory event wakes it. Checkpoints are written every
``checkpoint_interval`` and only ever hold offsets every matching output confirmed.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import threading
import time
import zlib
from functools import partial
from typing import Callable

from shipper.config import Option, Settings, regex_check, validate_section
from shipper.inputs.checkpoints import (
    Checkpoint, CheckpointStore, Every, fingerprint, fingerprint_matches, same_start,
)
from shipper.inputs.discovery import DirectoryWatcher, Skips, expand, fixed_root, is_excluded, path_matches
from shipper.inputs.framing import RecordBuilder
from shipper.inputs.rotation import compressed_chunks, find_compressed, find_copy, find_renamed, rotation_names
from shipper.inputs.tail import GONE, REPLACED, SAME, TRUNCATED, NotTailable, Read, TailedFile, classify, open_regular
from shipper.multiline import PRESETS, Joiner, make_rule
from shipper.parsers import PARSERS, LineParser
from shipper.heartbeat import Heartbeat
from shipper.quarantine import overlapping
from shipper.acks import OffsetTracker
from shipper.record import Batch

log = logging.getLogger(__name__)

MULTILINE_OPTIONS = {
    "start": Option("str", None, check=regex_check),
    "preset": Option("choice", None, choices=PRESETS),
    "timeout": Option("duration", 1.0),
    "max_lines": Option("int", 500, minimum=2),
}

OPTIONS = {
    "id": Option("str", None),  # names the checkpoint file; defaults to the tag
    "paths": Option("strlist"),
    "exclude": Option("strlist", []),
    "start_at": Option("choice", "beginning", choices=("beginning", "end")),
    "parser": Option("choice", "none", choices=PARSERS),
    "pattern": Option("str", None, check=regex_check),
    "time_key": Option("str", None),
    "time_format": Option("str", "auto"),
    "multiline": Option("table", None),
    "max_line_bytes": Option("size", 256 * 1024, minimum=1024, maximum=64 * 1024**2),
    "read_bytes": Option("size", 1024 * 1024, minimum=4096, maximum=64 * 1024**2),
    "poll_interval": Option("duration", 0.5, minimum=0.01),
    "refresh_interval": Option("duration", 10.0, minimum=0.1),
    "rotate_wait": Option("duration", 5.0),
    "partial_line_timeout": Option("duration", 5.0),
    "watch": Option("bool", True),
    # Like Filebeat: a symlink below a pattern's fixed directories is not followed (skipped, counted).
    "follow_symlinks": Option("bool", False),
    # Descriptors: at most this many files open at once (0: derived from RLIMIT_NOFILE); a file without
    # new data for close_inactive is closed and taken up again, where it was, when it changes.
    "max_open_files": Option("int", 0, minimum=0,
                             check=lambda v: None if v == 0 or v >= 2 else "must be 0 (from RLIMIT_NOFILE) or at least 2"),
    "close_inactive": Option("duration", 300.0, minimum=0.1),
    # Files found at start-up without a checkpoint and unmodified for this long are not read (only
    # what is written to them later); 0: off.
    "ignore_older": Option("duration", 0.0),
    # A deleted file stays open until read to its end, but not at the cost of the host's disk: it is
    # let go (its unread bytes counted) when its file system has less free than this percentage,
    # or once it has been deleted this long (0: never).
    "release_deleted_when_free_below": Option("float", 5.0, minimum=0.0, maximum=100.0),
    "release_deleted_after": Option("duration", 0.0),
}

# A file that had data this recently is visited every poll_interval; a quieter one only when inotify
# says it changed, or at the sweep every refresh_interval (the safety net for missed events).
BUSY_FOR = 5.0
# With inotify, the globs are scanned again every RESCAN_FACTOR refresh intervals (and on events).
RESCAN_FACTOR = 6
# Up to this many files every file is visited every poll_interval (as cheap as inotify's events for
# them); with more, a file is read when inotify says it was written (at the next poll), or when active.
EVENTS_FROM_FILES = 64
# Files named one by one in the log when they are taken up, a minute (the rest are counted).
NAMED_FILES_A_MINUTE = 100
# Descriptors left to the rest of the agent (objects, checkpoints, sockets, inotify, journalctl).
RESERVED_DESCRIPTORS = 256


class Allowance:
    """At most ``count`` times per ``period`` seconds (a fixed window), the first ones at once (unlike
    checkpoints.Every, which is never due before its interval has passed)."""

    def __init__(self, count: int, period: float):
        self.count, self.period = count, period
        self.window_start, self.used = -period, 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self.window_start >= self.period:
            self.window_start, self.used = now, 0
        if self.used >= self.count:
            return False
        self.used += 1
        return True


def default_max_open_files(soft_limit: int, file_inputs: int = 1) -> int:
    """The open files one input may hold: the soft RLIMIT_NOFILE less what the rest of the agent
    needs, shared by the file inputs; never below 16."""
    return max(16, (soft_limit - RESERVED_DESCRIPTORS) // max(1, file_inputs))


def _soft_nofile() -> int:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


# How much one file may read before the others get their turn.
FAIR_SHARE_BYTES = 16 * 1024 * 1024
# On stop, how much of what is still unread is read and shipped.
DRAIN_READ_BYTES = 64 * 1024 * 1024


def validate(settings: Settings) -> list[str]:
    problems: list[str] = []
    if settings.get("paths") == []:
        problems.append(f"{settings.where}.paths: needs at least one glob pattern")
    if settings.get("parser") == "regex" and not settings.get("pattern"):
        problems.append(f"{settings.where}.pattern: required with parser = \"regex\" (named groups (?P<name>...))")
    if settings.get("pattern") and "(?P<" not in settings.pattern:
        problems.append(f"{settings.where}.pattern: has no named group (?P<name>...)")
    multiline = settings.get("multiline")
    if multiline is not None:
        where = f"{settings.where}.multiline"
        parsed = validate_section(where, multiline, MULTILINE_OPTIONS, problems)
        if isinstance(multiline, dict) and "start" not in multiline and "preset" not in multiline:
            problems.append(f"{where}: needs start (a regex) or preset ({', '.join(PRESETS)})")
        settings._values["multiline"] = parsed
    return problems


class FileInput:
    def __init__(self, settings: Settings, context):
        self.settings = settings
        self.tag = settings.tag
        self.patterns = [os.path.abspath(p) for p in settings.paths]
        self.store = CheckpointStore(context.data_dir, settings.id or settings.tag)
        self.stats = context.stats
        self.checkpoint_interval = context.checkpoint_interval
        self.files: dict[tuple[int, int], TailedFile] = {}
        self.releasing: list[TailedFile] = []  # closed, waiting for their last acknowledgements
        self.unreadable: set[str] = set()      # reported once each
        self.skips = Skips(self.stats, self.tag)  # symlinks, FIFOs, devices: reported once each
        self.wake = threading.Event()
        self.changed = threading.Event()
        self.by_path: dict[str, TailedFile] = {}
        self.active: dict[tuple[int, int], TailedFile] = {}  # visited every poll (see BUSY_FOR)
        self.idle_open: dict[tuple[int, int], TailedFile] = {}  # open, not active: closed first for room
        # path -> (dormant file or None, at_startup), first come first served (popped from the front: O(1))
        self.waiting: collections.OrderedDict[str, tuple[TailedFile | None, bool]] = collections.OrderedDict()
        self.open_count = 0
        self.max_open = settings.max_open_files or default_max_open_files(
            _soft_nofile(), getattr(context, "file_inputs", 1))
        self._emfile_reported = False
        self._touched: set[str] = set()
        self._touched_lock = threading.Lock()
        self._last_sweep = 0.0
        self._last_active_visit = 0.0
        self._unfinished: list[TailedFile] = []  # had more than their fair share last pass: go on at once
        self._fresh: list[TailedFile] = []  # opened or taken up again: read at the next pass, event or not
        self._last_settle = 0.0
        # "tailing PATH" for the first files of each minute; past that, how many more (100,000 files
        # must not make 100,000 log lines).
        self._named = Allowance(NAMED_FILES_A_MINUTE, 60.0)
        self._unnamed = 0
        self._full_save = True  # the first save drops the loaded checkpoints no file took up
        self._dirty: set[TailedFile] = set()  # whose checkpoint changed since the last save
        self._dirty_lock = threading.Lock()
        # New files whose first bytes are those of a followed file: a copy, until that file is truncated
        # (then its copy, read from where the file was) or a while passes (then a file of its own):
        # path -> (the followed file it may be a copy of, since when, that file's polls then).
        self.suspects: dict[str, tuple[TailedFile, float, int]] = {}
        self._deleted_checked = 0.0
        self._reused: list[Checkpoint] = []  # at start-up: checkpoints whose inode now holds another file
        self.watcher = (DirectoryWatcher(self.patterns, self.changed, self.wake, self._touch)
                        if settings.watch else None)
        self._saved: dict[tuple[int, int], Checkpoint] = {}
        self._last_refresh = 0.0
        self._checkpoints = Every(self.checkpoint_interval)
        self._save_lock = threading.Lock()
        self._checkpoint_failing = False
        self.heartbeat = Heartbeat()
        # Ranges that made the agent fail twice: moved past once, on this start (quarantine.py).
        self.quarantined = list(getattr(context, "quarantined", ()))

    # ------------------------------------------------------------ lifecycle

    def run(self, emit: Callable[[Batch], None], stop: threading.Event) -> None:
        if self.watcher:
            self.watcher.start()
        self._saved = self.store.load()
        self._recover_truncated_while_down()  # before discovery: a copy in the globs is known, not new
        self.discover(at_startup=True)
        self._recover_rotated(emit)
        try:
            while not stop.is_set():
                self.heartbeat.beat(self.settings.poll_interval)
                self.wake.clear()  # before the pass: an event during it wakes the next one at once
                if not self.poll(emit, stop):  # nothing left unread: sleep until the next poll
                    self.wake.wait(self.settings.poll_interval)
            self._drain(emit)
        finally:
            if self.watcher:
                self.watcher.stop()

    def _touch(self, path: str) -> None:
        """From the watcher's thread: ``path`` was written, truncated, moved or deleted."""
        with self._touched_lock:
            self._touched.add(path)

    def _watch_writes(self, path: str) -> None:
        if self.watcher is not None:
            self.watcher.watch_file(path)

    @property
    def _events(self) -> bool:
        """Whether reads follow inotify: only with more than EVENTS_FROM_FILES files (fewer are polled,
        which is as cheap and needs no inotify watch)."""
        return self.watcher is not None and self.watcher.watching and self.watcher.content

    def poll(self, emit: Callable[[Batch], None], stop: threading.Event) -> bool:
        """One pass over the files that may have something to read; True when a file had more than
        its fair share (go on at once). Without inotify every file is visited, every poll."""
        now = time.monotonic()
        # With inotify a new file is found, and a file read, on its event; the globs are scanned again
        # and every file looked at (a stat) every RESCAN_FACTOR refresh intervals, for what events
        # miss (as Fluent Bit's Refresh_Interval, 60 s). Without inotify: every refresh_interval.
        rescan_every = self.settings.refresh_interval * (RESCAN_FACTOR if self._events else 1)
        if self.changed.is_set() or now - self._last_refresh >= rescan_every:
            self.changed.clear()
            self._last_refresh = now
            if self.watcher:
                self.watcher.refresh()
            self.discover(at_startup=False)
        with self._touched_lock:
            touched, self._touched = self._touched, set()
        written = self.watcher.written() if self._events else set()
        if written is None:  # the kernel's event queue overflowed: look at every file now
            log.warning("%s: inotify lost events (queue overflow); looking at every file", self.tag)
            self._last_sweep = now - rescan_every
        else:
            touched |= written
        sweep = False
        fresh, self._fresh = self._fresh, []
        if not self._events or now - self._last_sweep >= rescan_every:
            self._last_sweep = self._last_active_visit = now
            visit = list(self.files.values())
            sweep = self._events  # a look at every file, for events missed: a stat is enough for most
        else:
            # The files with more to read than their last share, those an event named, and every
            # poll_interval those holding something (a partial line, an event, a rotated file's rest:
            # their timeouts run without events). A write is always an event: quiet files cost nothing.
            visit = self._unfinished + fresh + [t for t in (self.by_path.get(p) for p in touched) if t is not None]
            if now - self._last_active_visit >= self.settings.poll_interval:
                self._last_active_visit = now
                visit += [t for t in self.active.values() if self._holds(t)]
                self._settle(now)
                unwatched = self.watcher.unwatched()
                if unwatched:  # no events from these directories (the inotify watch limit): polled
                    visit += [t for t in self.files.values() if os.path.dirname(t.path) in unwatched]
            visit = list({id(t): t for t in visit}.values())
        more = False
        self._unfinished = []
        for tailed in visit:
            if tailed.closed:
                continue
            try:
                if tailed.dormant:
                    self._wake_dormant(tailed, now, emit)
                    if tailed.dormant or tailed.closed:
                        continue
                elif sweep and tailed.identity not in self.active and self._looks_unchanged(tailed):
                    continue
                had_more = self._follow(tailed, emit, stop)
                more |= had_more
                if had_more:
                    self._unfinished.append(tailed)
                tailed.failing = False
                self._after_visit(tailed, had_more, now)
            except OSError as exc:  # an I/O error on one file (EIO, a vanished mount): retried next pass
                self._activate(tailed)
                if not tailed.failing:
                    tailed.failing = True
                    log.error("cannot read %s: %s (reported once while it lasts; retrying)", tailed.path, exc)
                    self._count("read_errors")
        self._serve_waiting(emit)
        if self._unnamed and (not self.waiting or self._named.allow()):
            log.info("tailing %d more files (not each named in the log; `shipper status` counts them)", self._unnamed)
            self._unnamed = 0
        self.while_waiting()
        self._checkpoint_when_due()
        # Files waiting for a descriptor, or just opened: their turn comes at once.
        return more or bool(self.waiting) or bool(self._fresh)

    def while_waiting(self) -> None:
        """At most once a second, let go of deleted files that hold a nearly full disk. After each pass,
        and called by the pipeline while emit waits for room in the outputs (an outage): the reading
        is held up then, but a deleted file must not hold the host's disk meanwhile."""
        now = time.monotonic()
        if now - self._deleted_checked >= 1.0:
            self._deleted_checked = now
            self._release_deleted(now)

    def _release_deleted(self, now: float) -> None:
        """Let go of open files that were deleted, when their file system is nearly full or they have
        been deleted for release_deleted_after: the bytes not read yet are counted as dropped."""
        threshold = self.settings.release_deleted_when_free_below
        after = self.settings.release_deleted_after
        for tailed in [t for t in self.active.values() if t.fd is not None]:
            try:
                st = os.fstat(tailed.fd)
                if st.st_nlink > 0:
                    continue  # not deleted (renamed at most): it holds no space the application freed
                fs = os.fstatvfs(tailed.fd)
            except OSError:
                continue
            if getattr(tailed, "deleted_since", None) is None:
                tailed.deleted_since = now
            free = 100.0 * fs.f_bavail / fs.f_blocks if fs.f_blocks else 100.0
            too_long = after and now - tailed.deleted_since >= after
            if free >= threshold and not too_long:
                continue
            unread = max(0, st.st_size - tailed.emit_offset)
            why = (f"its file system has {free:.1f} % free (release_deleted_when_free_below = {threshold:g})"
                   if free < threshold else f"it was deleted over {after:g} s ago (release_deleted_after)")
            log.error("%s: deleted and not read to its end, released because %s: %d bytes not shipped",
                      tailed.path, why, unread)
            if self.stats is not None:
                self.stats.add("bytes_dropped", unread, input=self.tag, reason="released_deleted")
            self._count("files_released_deleted")
            tailed.carry = b""  # part of what is dropped (counted above, from emit_offset)
            tailed.emit_offset = tailed.read_offset
            self._forget(tailed)

    def _forget(self, tailed: TailedFile) -> None:
        """Close a file and stop following it; its checkpoint stays until what was sent is confirmed."""
        if tailed.fd is not None:
            self.open_count -= 1
        tailed.close()
        self.files.pop(tailed.identity, None)
        self.active.pop(tailed.identity, None)
        self.idle_open.pop(tailed.identity, None)
        if self.by_path.get(tailed.path) is tailed:
            del self.by_path[tailed.path]
        self.releasing.append(tailed)
        self._full_save = True

    def _looks_unchanged(self, tailed: TailedFile) -> bool:
        """An open, quiet file at the sweep: one stat says nothing happened to it (same file at its path,
        the size it was read to, nothing held); else it is visited as usual."""
        try:
            st = os.stat(tailed.path)
        except OSError:
            return False
        return ((st.st_dev, st.st_ino) == tailed.identity and st.st_size == tailed.read_offset
                and not tailed.failing and not self._holds(tailed))

    @staticmethod
    def _holds(tailed: TailedFile) -> bool:
        """It has something still to ship or to watch: a partial line, a multi-line event, or it is
        being drained after its path stopped naming it."""
        return bool(tailed.carry) or tailed.builder.holds_event or tailed.released_since is not None

    def _after_visit(self, tailed: TailedFile, had_more: bool, now: float) -> None:
        """Keep a file among the active ones while it may have more soon; close it when idle, or when
        others wait for a descriptor (they take turns)."""
        if tailed.closed:
            self.active.pop(tailed.identity, None)
            return
        holds = self._holds(tailed)
        idle = now - tailed.last_data
        if (not holds and tailed.closable and (self.waiting or idle >= self.settings.close_inactive)
                and self._close_idle(tailed)):
            return
        if had_more or holds or idle < BUSY_FOR:
            self._activate(tailed)
            return
        self.idle_open[tailed.identity] = tailed
        self.active.pop(tailed.identity, None)

    def _settle(self, now: float) -> None:
        """With events, a quiet file is not visited: decide here what its visit would have (no I/O but
        for the files closed): active files quiet for BUSY_FOR become idle (the first closed for room),
        idle ones quiet for close_inactive are closed."""
        for tailed in [t for t in self.active.values() if now - t.last_data >= BUSY_FOR]:
            if not self._holds(tailed):
                self.idle_open[tailed.identity] = tailed
                del self.active[tailed.identity]
        if now - self._last_settle < 1.0:
            return
        self._last_settle = now
        for tailed in [t for t in self.idle_open.values() if now - t.last_data >= self.settings.close_inactive]:
            if tailed.closable and not self._holds(tailed) and not self._close_idle(tailed):
                self._activate(tailed)  # it grew (its event is on its way): visited until read
                self._fresh.append(tailed)

    def _activate(self, tailed: TailedFile) -> None:
        self.active[tailed.identity] = tailed
        self.idle_open.pop(tailed.identity, None)

    def _close_idle(self, tailed: TailedFile) -> bool:
        """Close a file read to its end; False (left open) when it grew since it was last read."""
        st = os.fstat(tailed.fd)
        if st.st_size != tailed.read_offset:
            return False
        tailed.seen = (st.st_size, st.st_mtime_ns)  # a change of either takes it up again
        tailed.close_idle()
        self.open_count -= 1
        self.active.pop(tailed.identity, None)
        self.idle_open.pop(tailed.identity, None)
        return True

    def _wake_dormant(self, tailed: TailedFile, now: float, emit: Callable[[Batch], None] | None = None) -> None:
        """A dormant file that may have changed: take it up again (a descriptor permitting), or, when its
        path holds another file now (rotated or deleted while closed), look for it next to its path."""
        try:
            st = os.stat(tailed.path)
            identity: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            st, identity = None, None
        if identity == tailed.identity:
            if (st.st_size, st.st_mtime_ns) == getattr(tailed, "seen", None):
                return  # unchanged
            self._take_up(tailed, tailed.path)
            return
        moved = find_renamed(tailed.path, tailed.identity)
        if moved is not None:
            self._take_up(tailed, moved[0])
            if not tailed.dormant:
                tailed.released_since = now  # drained, then released after rotate_wait
            self.changed.set()
            return
        # Deleted, compressed or moved out of sight while closed.
        self._forget(tailed)
        unread = Checkpoint(tailed.path, *tailed.identity, tailed.read_offset, tailed.fp_len, tailed.fp)
        if emit is not None and self._read_compressed_rest(unread, emit, tailed.tracker):
            self.releasing.remove(tailed)  # its rest, which took its tracker over, stands in for it
        self.changed.set()

    def _take_up(self, tailed: TailedFile, path: str) -> None:
        """Reopen a dormant file at ``path``; when no descriptor is free it waits its turn."""
        fd = self._open_descriptor(path)
        if fd is None:
            tailed.seen = None  # changed: taken up when its turn comes, not judged unchanged then
            self.waiting.setdefault(tailed.path, (tailed, False))
            return
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != tailed.identity:  # replaced between the stat and the open
            self._give_back(fd)
            return
        tailed.reopen(fd)
        if path != tailed.path:
            if self.by_path.get(tailed.path) is tailed:
                del self.by_path[tailed.path]
            tailed.path = path
            self.by_path.setdefault(path, tailed)
        self._activate(tailed)
        self._fresh.append(tailed)

    def _open_descriptor(self, path: str) -> int | None:
        """open_regular within max_open_files (closing an idle file to make room); None: no descriptor
        now (at the cap, or EMFILE/ENFILE: the cap is lowered to what the process could open)."""
        # One of the cap stays free for the short looks at other files' first bytes (copies, rotations).
        if self.open_count >= self.max_open - 1 and not self._make_room():
            return None
        try:
            fd = open_regular(path, self.settings.follow_symlinks, fixed_root(path, self.patterns))
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            self.max_open = max(2, self.open_count + 1)
            self._count("descriptors_exhausted")
            if not self._emfile_reported:
                self._emfile_reported = True
                log.warning("%s: out of descriptors (%s) with %d files open: at most %d open from now on; the "
                            "others take turns (raise LimitNOFILE, or set max_open_files)", self.tag,
                            exc.strerror, self.open_count, self.max_open)
            return None
        self.open_count += 1
        return fd

    def _give_back(self, fd: int) -> None:
        """Close a descriptor _open_descriptor gave and that no followed file keeps."""
        os.close(fd)
        self.open_count -= 1

    def _make_room(self) -> bool:
        """Close the open file idle the longest that holds nothing, to free a descriptor."""
        for tailed in list(self.idle_open.values()):
            if tailed.closable and not self._holds(tailed) and self._close_idle(tailed):
                return True
            self._activate(tailed)  # it holds something (or grew): visited until it does not
        return False

    def _serve_waiting(self, emit: Callable[[Batch], None]) -> None:
        """Give freed descriptors to the files waiting for one, first come first served."""
        while self.waiting and self.open_count < self.max_open - 1:
            path, (tailed, at_startup) = self.waiting.popitem(last=False)
            if tailed is None:
                self._open(path, at_startup)
            elif tailed.dormant:
                self._wake_dormant(tailed, time.monotonic(), emit)
            if path in self.waiting:  # could not be opened after all: try again on a later pass
                break

    def _checkpoint_when_due(self) -> None:
        if self._checkpoints.due():
            self.save_checkpoints()

    def _follow(self, tailed: TailedFile, emit: Callable[[Batch], None], stop: threading.Event) -> bool:
        """Read one file until it is drained or has had its fair share; True when it has more to read.

        What happened to the file is decided before reading, so that a file truncated and refilled
        past our offset is not read from the middle (the size alone cannot tell; its first bytes can).
        """
        tailed.polls += 1  # a suspect copy of it waits for this (see _suspect_copy)
        fingerprinted = tailed.fp_len
        state = self._state(tailed)
        if tailed.fp_len != fingerprinted:  # more of its first bytes fingerprinted: the checkpoint says so
            self._mark(tailed)
        if state == TRUNCATED:
            self._restart(tailed, emit)
        budget = FAIR_SHARE_BYTES
        while budget > 0 and not stop.is_set():
            if self.quarantined:
                self._skip_quarantined(tailed, emit)
            read = tailed.read(self._read_size(tailed))
            if read is None:
                self._at_end_of_file(tailed, emit, state)
                return False
            budget -= read.end - read.start
            self.heartbeat.beat(self.settings.poll_interval)
            self._emit(tailed, read, emit)
            if tailed.closed:  # released while emit waited for the outputs (a deleted file, disk nearly full)
                return False
            # emit waits while the outputs are full: the acknowledgements that free them must
            # reach the checkpoint file meanwhile, not only after the file's fair share.
            self._checkpoint_when_due()
        return True

    def _drain(self, emit: Callable[[Batch], None]) -> None:
        """Stopping: read what is already written (bounded), then ship partial lines and held events."""
        for tailed in list(self.files.values()):
            if tailed.dormant:  # read to its end when closed; what came since is read on the next start
                continue
            budget = DRAIN_READ_BYTES
            while budget > 0:
                if self.quarantined:
                    self._skip_quarantined(tailed, emit)
                read = tailed.read(self._read_size(tailed))
                if read is None:
                    break
                budget -= read.end - read.start
                self._emit(tailed, read, emit)
                if tailed.closed:
                    break
            if not tailed.closed:
                self._ship_held(tailed, emit)

    # ------------------------------------------------------------ discovery

    def discover(self, at_startup: bool) -> None:
        known = self.by_path if self._events and not at_startup else {}
        for path in expand(self.patterns, self.settings.exclude, self.settings.follow_symlinks, self.skips):
            if path not in known:  # a followed path: what happens to it comes as events, or at the sweep
                self._open(path, at_startup)
        if self.watcher is not None and len(self.files) + len(self.waiting) > EVENTS_FROM_FILES:
            self.watcher.watch_content(list(self.by_path) + list(self.waiting))

    def _open(self, path: str, at_startup: bool, rotated_away: bool = False) -> TailedFile | None:
        """Start tailing ``path`` (unless already tailed). ``rotated_away``: only resume a checkpointed file."""
        try:
            st = os.stat(path, follow_symlinks=self.settings.follow_symlinks)
        except OSError:
            return None
        known = self.files.get((st.st_dev, st.st_ino))
        if known is not None:
            if known.drain_only:  # a copy being drained that the globs match: followed from now on
                known.drain_only = False
                known.released_since = None
            if known.path != path:  # renamed to another name that the globs also match
                if self.by_path.get(known.path) is known:
                    del self.by_path[known.path]
                known.path = path
                known.released_since = None
                self.by_path[path] = known
                self._watch_writes(path)
                self._full_save = True
            return None
        if path in self.waiting:
            return None
        try:  # never blocks (a FIFO), never follows a symlink unless told to, regular files only
            fd = self._open_descriptor(path)
        except NotTailable as exc:
            self.skips.skip(path, exc.reason, exc.detail)
            return None
        except FileNotFoundError:
            return None
        except OSError as exc:
            if path not in self.unreadable:
                self.unreadable.add(path)
                log.error("cannot read %s: %s (reported once; the other files keep flowing)", path,
                          exc.strerror or errno.errorcode.get(exc.errno, exc))
                self._count("files_unreadable")
            return None
        if fd is None:  # no descriptor free: it waits its turn
            self.waiting[path] = (None, at_startup)
            return None
        self.unreadable.discard(path)
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key in self.files:  # replaced between stat and open by a file we already follow
            self._give_back(fd)
            return None
        for old in [t for t in self.releasing if t.identity == key]:
            self.releasing.remove(old)  # its inode was reused: the old file is gone for good
        saved = self._saved.pop(key, None)
        resumable = saved is not None and fingerprint_matches(fd, saved)
        if saved is not None and not resumable:
            self._reused.append(saved)  # its inode holds another file now: the old one may be compressed
        if saved is None and not at_startup and not rotated_away and self._suspect_copy(path, fd, st.st_size):
            self._give_back(fd)
            return None
        # An empty file's fingerprint matches anything: never take a file outside the globs on it alone.
        if rotated_away and not (resumable and saved.fp_len > 0):
            self._give_back(fd)
            return None
        ignored = False
        if resumable:
            offset = saved.offset if saved.offset <= st.st_size else 0
        elif saved is not None:  # known, but truncated or replaced while the agent was down: all of it
            offset = 0
        elif at_startup and self.settings.start_at == "end":
            offset = st.st_size
        elif at_startup and self.settings.ignore_older and time.time() - st.st_mtime > self.settings.ignore_older:
            offset, ignored = st.st_size, True
        else:
            offset = 0
        tailed = TailedFile(path, fd, offset, self.settings.max_line_bytes)
        tailed.builder = self._builder(path, offset)
        if rotated_away:
            tailed.released_since = time.monotonic()
        self.files[key] = tailed
        self.by_path[path] = tailed
        self._watch_writes(path)
        self._mark(tailed)  # a journal entry: a new file is no reason to rewrite every checkpoint
        if ignored:  # its checkpoint stands at its end: what is written to it later is read
            if not self._close_idle(tailed):
                self._activate(tailed)
            log.info("not reading %s: unmodified for longer than ignore_older; following it from its end", path)
            return tailed
        self._activate(tailed)
        self._fresh.append(tailed)
        if self._named.allow():
            log.info("tailing %s from offset %d%s", path, offset, " (rotated away, draining)" if rotated_away else "")
        else:
            self._unnamed += 1
        return tailed

    def _recover_rotated(self, emit: Callable[[Batch], None]) -> None:
        """A file rotated while the agent was down: find its old inode next to its old path and drain it,
        or, when it was compressed, its decompressed rest."""
        for saved in list(self._saved.values()):
            moved = find_renamed(saved.path, saved.key)
            if moved is not None:
                if moved[1].st_size > saved.offset:
                    self._open(moved[0], at_startup=True, rotated_away=True)
            elif saved.fp_len > 0:
                self._read_compressed_rest(saved, emit)
        for saved in self._reused:
            self._read_compressed_rest(saved, emit)
        self._saved.clear()
        self._reused.clear()

    def _builder(self, path: str, offset: int) -> RecordBuilder:
        settings = self.settings
        parser = LineParser(settings.parser, settings.pattern, settings.time_key, settings.time_format)
        joiner = None
        multiline = settings.multiline
        if multiline is not None:
            rule = make_rule(multiline.start, multiline.preset)
            joiner = Joiner(rule, multiline.max_lines, settings.max_line_bytes)
        return RecordBuilder(self.tag, path, parser, joiner, offset)

    # ------------------------------------------------------------ reading

    def _emit(self, tailed: TailedFile, read: Read | None, emit: Callable[[Batch], None]) -> None:
        if read is None:
            return
        builder = tailed.builder
        failures = builder.failures
        batch = builder.build(read, time.time())
        if builder.failures != failures:
            self._count("reads_shipped_raw")
        self._send(tailed, batch, emit)

    def _send(self, tailed: TailedFile, batch: Batch | None, emit: Callable[[Batch], None]) -> None:
        if batch is None:
            return
        batch.source = tailed.path
        batch.on_done = partial(self._confirmed, tailed.tracker, batch.start, batch.end, tailed.tracker.generation)
        self._count("records_in", batch.count)
        self._count("bytes_in", batch.end - batch.start)
        batch.origin = tailed.identity
        emit(batch)

    def _confirmed(self, tracker, start: int, end: int, generation: int) -> None:
        """From an output's thread: a batch is delivered; the checkpoint of the file that holds the tracker
        now (a copy may have taken it over) has something to write."""
        if tracker.done(start, end, generation):
            with self._dirty_lock:
                self._dirty.add(tracker.owner)

    def _mark(self, tailed: TailedFile) -> None:
        """Its checkpoint changed (offset, fingerprint): written at the next save, alone."""
        with self._dirty_lock:
            self._dirty.add(tailed)

    def _read_size(self, tailed: TailedFile) -> int:
        """One read's size; a read stops where a quarantined range starts (see _skip_quarantined)."""
        size = self.settings.read_bytes
        for strike in self.quarantined:
            if (strike.source == tailed.path and strike.identity == tailed.identity
                    and tailed.read_offset < strike.start):
                size = min(size, strike.start - tailed.read_offset)
        return size

    def _skip_quarantined(self, tailed: TailedFile, emit: Callable[[Batch], None]) -> None:
        """At a range that made the agent fail twice in a row: move past it without reading it,
        confirmed unshipped, counted and logged; what comes before and after it ships as usual."""
        offset = tailed.read_offset
        strike = overlapping(self.quarantined, tailed.path, offset, offset + 1, tailed.identity)
        if strike is None or tailed.carry:
            return
        self.quarantined.remove(strike)
        if os.fstat(tailed.fd).st_size < strike.end:  # not the content that was struck
            return
        self._send(tailed, tailed.builder.flush_pending(time.time()), emit)  # the event held before it
        records = os.pread(tailed.fd, strike.end - offset, offset).count(b"\n")
        tailed.skip_to(strike.end)
        tailed.builder.restart(strike.end)
        tailed.tracker.done(offset, strike.end, tailed.tracker.generation)
        self._mark(tailed)
        log.error("%s: skipping %d lines at offsets %d-%d: the agent failed twice in a row while they were "
                  "unconfirmed (quarantined)", tailed.path, records, offset, strike.end)
        if self.stats is not None:
            self.stats.add("records_dropped", records, input=self.tag, reason="quarantined")

    def _ship_held(self, tailed: TailedFile, emit: Callable[[Batch], None]) -> None:
        """Ship the line without newline and the held multi-line event."""
        self._emit(tailed, tailed.flush_carry(), emit)
        self._send(tailed, tailed.builder.flush_pending(time.time()), emit)

    def _at_end_of_file(self, tailed: TailedFile, emit: Callable[[Batch], None], state: str) -> None:
        now = time.monotonic()
        idle = now - tailed.last_data
        multiline = self.settings.multiline
        if tailed.carry and idle >= self.settings.partial_line_timeout:
            self._emit(tailed, tailed.flush_carry(), emit)
        if multiline is not None and idle >= multiline.timeout and tailed.builder.holds_event:
            self._send(tailed, tailed.builder.flush_pending(time.time()), emit)
        if state in (GONE, REPLACED) or tailed.drain_only:
            if tailed.released_since is None:
                tailed.released_since = now
                if state != SAME and self.by_path.get(tailed.path) is tailed:
                    del self.by_path[tailed.path]  # the path names another file now, or none
                self.changed.set()  # a new file may stand at the path now
                self.wake.set()
            elif now - max(tailed.released_since, tailed.last_data) >= self.settings.rotate_wait:
                self._release(tailed, emit)
        elif state == SAME:
            tailed.released_since = None

    def _state(self, tailed: TailedFile) -> str:
        """SAME, TRUNCATED, GONE or REPLACED: from the open descriptor and what its path holds now."""
        try:
            st = os.stat(tailed.path)
            path_identity: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            path_identity = None
        size = os.fstat(tailed.fd).st_size
        return classify(tailed.identity, tailed.read_offset, size, tailed.head_matches(), path_identity)

    def _restart(self, tailed: TailedFile, emit: Callable[[Batch], None]) -> None:
        """Truncated (copytruncate): what was written between our last read and the truncation is only in
        the copy. Its rest is read first, from where the file was, then the file from its start."""
        self._count("files_truncated")
        self._full_save = True
        copy = self._copy_of(tailed)
        if copy is None:
            log.info("%s was truncated (copytruncate?), no copy of it found next to it; reading it again "
                     "from the start", tailed.path)
            self._ship_held(tailed, emit)
            tailed.restart()
            tailed.builder.restart(0)
            return
        log.info("%s was truncated (copytruncate): reading the rest of its copy %s from offset %d, and it "
                 "again from the start", tailed.path, copy.path, copy.read_offset)
        self._count("copies_followed")
        # The copy takes over what the file held: its acknowledgements, the partial line, the held event.
        tailed.restart(OffsetTracker(0, owner=tailed))
        tailed.builder = self._builder(tailed.path, 0)

    def _copy_of(self, tailed: TailedFile) -> TailedFile | None:
        """Open the copy of a truncated file (a suspect, or a file next to it with its first bytes) at
        the file's position, with its acknowledgements and held data; None when there is none."""
        if tailed.emit_offset <= 0 or tailed.fp_len <= 0:
            return None
        path = next((p for p, (original, _, _) in self.suspects.items() if original is tailed), None)
        if path is not None:
            del self.suspects[path]
        else:
            path = find_copy(tailed.path, tailed.identity, tailed.fp_len, tailed.fp, tailed.emit_offset,
                             set(self.files))
        copy = self._open_copy(path, tailed.emit_offset, tailed.builder) if path is not None else None
        if copy is not None:
            copy.tracker = tailed.tracker
            copy.tracker.owner = copy
        return copy

    def _open_copy(self, path: str, offset: int, builder: RecordBuilder | None = None) -> TailedFile | None:
        """Follow the copy of a truncated file from ``offset`` (where the file was), with ``builder`` (the
        file's, holding its event) or a new one: drained and let go unless the globs take it too; None
        when it cannot be opened, or is not that long."""
        try:
            fd = self._open_descriptor(path)
        except (OSError, NotTailable):
            return None
        if fd is None:
            return None
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key in self.files or st.st_size < offset:
            self._give_back(fd)
            return None
        copy = TailedFile(path, fd, offset, self.settings.max_line_bytes)
        copy.builder = builder if builder is not None else self._builder(path, offset)
        copy.drain_only = not self._matches(path)
        self.files[key] = copy
        self.by_path[path] = copy
        self._watch_writes(path)
        self._activate(copy)
        self._fresh.append(copy)
        return copy

    def _matches(self, path: str) -> bool:
        """Whether the globs take ``path`` (a copy they take is followed on, not drained and let go)."""
        return any(path_matches(path, p) for p in self.patterns) and not is_excluded(path, self.settings.exclude)

    def _suspect_copy(self, path: str, fd: int, size: int) -> bool:
        """A new file whose first bytes are a followed file's, named like its rotation: kept aside as its
        copy until that file is truncated, or for two refresh intervals and until that file was polled
        again, at most ten (then it is a file of its own)."""
        if path in self.suspects:
            original, since, polls = self.suspects[path]
            waited, window = time.monotonic() - since, 2 * self.settings.refresh_interval
            # After the window, the file's next poll decides: truncated, it takes the suspect as its copy
            # (_copy_of); not, the suspect is read as a file of its own. An agent too busy to poll the
            # file within the window (or waiting for a descriptor to wake it) must not read the copy from
            # its start (every line twice): the suspect waits for that poll, up to 5 windows.
            settled = original.polls > polls or original.closed
            if waited < window or (not settled and waited < 5 * window):
                return True
            del self.suspects[path]
            return False
        directory, name = os.path.split(path)
        for candidate in rotation_names(name):
            original = self.by_path.get(os.path.join(directory, candidate))
            if original is None or original.closed or original.fp_len <= 0:
                continue
            # Shorter than the fingerprint and the start of the original's bytes: a copy still being
            # written (copytruncate copies, then truncates; a busy agent can see the copy in between).
            # It waits as a suspect too. A short file of other bytes (a new file renamed before the
            # agent saw it) is a file of its own.
            if (same_start(fd, original.fd, size) if size < original.fp_len
                    else fingerprint(fd, original.fp_len) == (original.fp_len, original.fp)):
                self.suspects[path] = (original, time.monotonic(), original.polls)
                return True
        return False

    def _recover_truncated_while_down(self) -> None:
        """A checkpointed file truncated while the agent was down: its copy, read from the checkpoint."""
        for saved in list(self._saved.values()):
            try:
                st = os.stat(saved.path)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) != saved.key or saved.fp_len <= 0 or saved.offset <= 0:
                continue
            if st.st_size >= saved.offset:
                try:
                    fd = os.open(saved.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    same = fingerprint_matches(fd, saved)
                finally:
                    os.close(fd)
                if same:
                    continue
            path = find_copy(saved.path, saved.key, saved.fp_len, saved.fp, saved.offset, set(self.files))
            if path is None:
                continue
            log.info("%s was truncated while the agent was down: reading the rest of its copy %s from offset %d",
                     saved.path, path, saved.offset)
            self._count("copies_followed")
            self._open_copy(path, saved.offset)

    def _read_compressed_rest(self, saved: Checkpoint, emit: Callable[[Batch], None],
                              tracker: OffsetTracker | None = None) -> bool:
        """A file rotated and compressed unread (logrotate ``compress``): its unread rest, decompressed.
        Its checkpoint stays until that rest is confirmed; after a crash it is read again from there."""
        path = find_compressed(saved.path, saved.fp_len, saved.fp)
        if path is None:
            return False
        log.info("%s was rotated and compressed unread: reading its rest from %s, from offset %d", saved.path,
                 path, saved.offset)
        self._count("compressed_read")
        rest = TailedFile.detached(saved.path, saved.key, saved.offset, self.settings.max_line_bytes,
                                   saved.fp_len, saved.fp)
        rest.builder = self._builder(path, saved.offset)
        if tracker is not None:  # a dormant file's: its acknowledgements still to come count too
            rest.tracker = tracker
            tracker.owner = rest
        try:
            for _, data in compressed_chunks(path, saved.offset, self.settings.read_bytes):
                self._emit(rest, rest.take(data), emit)
                self.heartbeat.beat(self.settings.poll_interval)
        except (OSError, EOFError, zlib.error) as exc:
            log.error("%s: the compressed data breaks after offset %d (%s): the rest of it cannot be read",
                      path, rest.read_offset, exc)
            self._count("read_errors")
        self._ship_held(rest, emit)
        self.releasing.append(rest)
        self._full_save = True
        return True

    def _release(self, tailed: TailedFile, emit: Callable[[Batch], None]) -> None:
        """The file was rotated or deleted and is drained: close it, keep its checkpoint until confirmed."""
        self._ship_held(tailed, emit)
        self._forget(tailed)
        log.info("released %s (rotated or deleted, read to its end)", tailed.path)

    def lag(self) -> dict[str, int]:
        """Per followed file: bytes known to be in it that not every output confirmed yet."""
        return {t.path: max(0, t.known_size - t.tracker.committed) for t in list(self.files.values())}

    # ------------------------------------------------------------ checkpoints

    def save_checkpoints(self) -> None:
        """Persist confirmed offsets: only the files whose checkpoint changed (a journal append), or all of
        them after a file was opened, released, renamed or truncated. Also called by the pipeline after
        the drain (hence the lock)."""
        with self._save_lock:
            with self._dirty_lock:
                dirty, self._dirty = self._dirty, set()
            full, self._full_save = self._full_save, False
            confirmed = [t for t in self.releasing if t.tracker.committed >= t.emit_offset]
            if not (dirty or full or confirmed):
                return
            if confirmed:
                self.releasing = [t for t in self.releasing if t.tracker.committed < t.emit_offset]
            try:
                if full:
                    self.store.save([t.checkpoint() for t in list(self.files.values()) + self.releasing])
                else:
                    kept = set(map(id, self.releasing))
                    changed = [t.checkpoint() for t in dirty
                               if self.files.get(t.identity) is t or id(t) in kept]
                    removed = [t.identity for t in confirmed if t.identity not in self.files]
                    self.store.update(changed, removed)
            except OSError as exc:  # e.g. data_dir full: delivery goes on, the next save may succeed
                self._full_save = True
                if not self._checkpoint_failing:
                    log.error("cannot write checkpoints to %s: %s (retrying every %.1fs)", self.store.path, exc,
                              self.checkpoint_interval)
                self._checkpoint_failing = True
                self._count("checkpoint_errors")
                return
            if self._checkpoint_failing:
                log.warning("checkpoints are written again to %s", self.store.path)
                self._checkpoint_failing = False

    def _count(self, name: str, value: int = 1) -> None:
        if self.stats is not None:
            self.stats.add(name, value, input=self.tag)


INPUT = FileInput
