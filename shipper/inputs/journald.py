"""The journald input: the systemd journal through ``journalctl -o json --follow``.

Entries are read in chunks from journalctl's output and become batches of records with
``message``, ``unit``, ``priority``, ``pid``, ``identifier`` and the entry's own time. The
journal cursor of the last entry of every batch is kept; the cursor saved (atomically, in
``data_dir/checkpoints/journald-<id>.json``) is that of the longest run of batches every
output confirmed, so a restart resumes right after it (``--after-cursor``): at-least-once,
like files. If journalctl exits, it is started again from the saved position after a pause.

journalctl runs with ``--all``: without it, it prints a message over 4096 bytes as ``null``.
A message over ``max_message_bytes`` becomes several records, each flagged ``truncated``
(as the file input does with long lines); a message that is not UTF-8 is decoded with
replacement characters and flagged ``encoding_errors``. An entry whose JSON line exceeds
``max_entry_bytes`` is not held in memory: it is dropped and counted
(``records_dropped{reason="too_long"}``).
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import subprocess
import threading
import time
from typing import Callable

import orjson

from shipper.acks import OffsetTracker
from shipper.config import Option
from shipper.durable import make_dirs, write_atomically
from shipper.heartbeat import Heartbeat
from shipper.inputs.checkpoints import Every
from shipper.inputs.tail import split_part
from shipper.record import ENCODING_ERRORS, TIME, TRUNCATED, Batch, format_time

log = logging.getLogger(__name__)

PRIORITIES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
READ_BYTES = 1024 * 1024

OPTIONS = {
    "id": Option("str", None),                       # names the cursor file; default: the tag
    "units": Option("strlist", []),                  # only these units (journalctl -u); empty: all
    "priority": Option("choice", "debug", choices=PRIORITIES),  # this and more urgent
    "start_at": Option("choice", "boot", choices=("boot", "beginning", "end")),  # without a saved cursor
    "directory": Option("str", ""),                  # a journal directory instead of the system journal
    "journalctl": Option("str", "journalctl"),
    "poll_interval": Option("duration", 0.25, minimum=0.01),
    "restart_delay": Option("duration", 5.0, minimum=0.01),
    # A longer message is shipped as several records of at most this many bytes, flagged truncated.
    "max_message_bytes": Option("size", 256 * 1024, minimum=1024),
    # A longer JSON line from journalctl (the whole entry) is skipped, never held, and counted dropped.
    "max_entry_bytes": Option("size", 16 * 1024 * 1024, minimum=64 * 1024),
}


def journalctl_command(settings, cursor: str | None) -> list[str]:
    """The journalctl command line for the settings and the saved cursor (pure, tested directly)."""
    # --all: without it journalctl prints any field over 4096 bytes as null.
    command = [settings.journalctl, "--output=json", "--all", "--follow", "--no-pager", "--lines=all",
               f"--priority={settings.priority}"]
    if settings.directory:
        command.append(f"--directory={settings.directory}")
    for unit in settings.units:
        command.append(f"--unit={unit}")
    if cursor:
        command.append(f"--after-cursor={cursor}")
    elif settings.start_at == "boot":
        command.append("--boot")
    elif settings.start_at == "end":
        command[command.index("--lines=all")] = "--lines=0"
    return command


def message_of(value: object) -> tuple[str, bool]:
    """MESSAGE as journalctl's JSON shows it -> (text, whether it was not valid UTF-8).

    A string; a list of byte values (journalctl's form for anything not printable UTF-8: invalid
    UTF-8, but also valid text with control characters such as colour escapes); a list of such
    values (the field occurs more than once in the entry: joined by newlines); null (journalctl
    without --all hid it).
    """
    if isinstance(value, str):
        return value, False
    if value is None:
        return "", False
    if isinstance(value, list):
        try:
            return _decoded(bytes(value))
        except (TypeError, ValueError):
            pass
        texts, bad = [], False
        for item in value:
            if isinstance(item, str):
                texts.append(item)
                continue
            try:  # (only ever bytes() of a list: of an int it would make that many zero bytes)
                text, item_bad = _decoded(bytes(item)) if isinstance(item, list) else (orjson.dumps(item).decode(), True)
            except (TypeError, ValueError):
                text, item_bad = orjson.dumps(item).decode(), True
            texts.append(text)
            bad |= item_bad
        return "\n".join(texts), bad
    return orjson.dumps(value).decode(), False


def _decoded(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def entry_fields(entry: dict) -> tuple[str, dict, str | None]:
    """(message, record fields, cursor) of one journal entry as journalctl's JSON shows it."""
    fields: dict = {}
    message, bad = message_of(entry.get("MESSAGE"))
    if bad:
        fields[ENCODING_ERRORS] = True
    for key, name, convert in (("_SYSTEMD_UNIT", "unit", str), ("PRIORITY", "priority", int), ("_PID", "pid", int),
                               ("SYSLOG_IDENTIFIER", "identifier", str)):
        value = entry.get(key)
        if isinstance(value, str):
            try:
                fields[name] = convert(value)
            except ValueError:
                pass
    realtime = entry.get("__REALTIME_TIMESTAMP")
    if isinstance(realtime, str) and realtime.isascii() and realtime.isdigit() and len(realtime) <= 20:
        fields[TIME] = format_time(int(realtime) / 1e6)
    cursor = entry.get("__CURSOR")
    return message, fields, cursor if isinstance(cursor, str) else None


def message_parts(message: str, limit: int) -> list[str] | None:
    """Pieces of at most ``limit`` UTF-8 bytes, cut between characters; None when it fits already."""
    if len(message) * 4 <= limit:  # most messages: no encoding needed to know
        return None
    data = message.encode("utf-8", errors="surrogatepass")
    if len(data) <= limit:
        return None
    return [piece.decode("utf-8", errors="replace") for piece in split_part(data, limit)]


def cursor_in_head(head: bytes) -> str | None:
    """The cursor of an entry from the start of its JSON line (journalctl prints __CURSOR first)."""
    prefix = b'{"__CURSOR":"'
    if not head.startswith(prefix):
        return None
    end = head.find(b'"', len(prefix))
    return head[len(prefix):end].decode(errors="replace") if end != -1 else None


HEAD_BYTES = 4096  # what is kept of a line too long to hold: enough for its cursor


class TooLong(bytes):
    """In LineSplitter's output: the head of a line longer than its limit, in place of the line."""


class LineSplitter:
    """journalctl's output -> complete lines, without holding any line longer than ``limit``.

    Chunks of a line are kept in a list (re-joining them on every read would cost a long line
    its length squared); a line that grows past ``limit`` is skipped to its newline, and only
    its head (for the cursor) is handed on, as a TooLong.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._skipping: TooLong | None = None  # head of the too long line being skipped

    def feed(self, data: bytes) -> list[bytes]:
        """The lines ``data`` completes, in order (TooLong for those over the limit)."""
        first = data.find(b"\n")
        if first == -1:
            self._hold(data)
            return []
        lines: list[bytes] = []
        if self._skipping is not None:
            lines.append(self._skipping)
            self._skipping = None
        else:
            self._parts.append(data[:first])
            self._size += first
            lines.append(self._take())
        pieces = data[first + 1:].split(b"\n")
        rest = pieces.pop()
        limit = self.limit
        for piece in pieces:
            lines.append(piece if len(piece) <= limit else TooLong(piece[:HEAD_BYTES]))
        self._hold(rest)
        return lines

    def _take(self) -> bytes:
        parts, self._parts, size, self._size = self._parts, [], self._size, 0
        if size > self.limit:
            return TooLong(_head(parts))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _hold(self, data: bytes) -> None:
        if not data or self._skipping is not None:
            return
        self._parts.append(data)
        self._size += len(data)
        if self._size > self.limit:
            self._skipping = TooLong(_head(self._parts))
            self._parts, self._size = [], 0


def _head(parts: list[bytes]) -> bytes:
    head = b""
    for part in parts:
        head += part[:HEAD_BYTES - len(head)]
        if len(head) >= HEAD_BYTES:
            break
    return head


STDERR_KEPT = 4096  # the tail of journalctl's stderr kept for the log line when it exits


class JournaldInput:
    def __init__(self, settings, context):
        self.settings = settings
        self.tag = settings.tag
        self.stats = context.stats
        self.checkpoint_interval = context.checkpoint_interval
        self.path = os.path.join(context.data_dir, "checkpoints", f"journald-{settings.id or settings.tag}.json")
        self.wake = threading.Event()
        self.heartbeat = Heartbeat()
        self.tracker = OffsetTracker(0)
        self.cursors: dict[int, str] = {}  # batch number -> cursor of its last entry
        self.lock = threading.Lock()
        self.next_batch = 0
        self.saved_cursor = self._load()
        self.committed_cursor = self.saved_cursor
        self._checkpoints = Every(self.checkpoint_interval)
        self._reported_too_long = False

    # ------------------------------------------------------------ cursor

    def _load(self) -> str | None:
        try:
            with open(self.path, "rb") as handle:
                return orjson.loads(handle.read()).get("cursor")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as exc:
            log.error("journal cursor file %s is unreadable (%s); starting at %s", self.path, exc,
                      self.settings.start_at)
            return None

    def _confirmed(self, number: int) -> None:
        """A batch is done everywhere: move the committed cursor over the run of done batches."""
        with self.lock:
            if self.tracker.done(number, number + 1):
                last = self.tracker.committed - 1
                self.committed_cursor = self.cursors.get(last, self.committed_cursor)
                for old in [n for n in self.cursors if n <= last]:
                    del self.cursors[old]

    def save_checkpoints(self) -> None:
        cursor = self.committed_cursor
        if not cursor or cursor == self.saved_cursor:
            return
        try:
            make_dirs(os.path.dirname(self.path))
            write_atomically(self.path, orjson.dumps({"version": 1, "cursor": cursor}))
        except OSError as exc:
            self.stats.add("checkpoint_errors", 1, input=self.tag)
            log.error("cannot write the journal cursor to %s: %s", self.path, exc)
            return
        self.saved_cursor = cursor

    # ------------------------------------------------------------ reading

    def run(self, emit: Callable[[Batch], None], stop: threading.Event) -> None:
        if shutil.which(self.settings.journalctl) is None:
            log.error("%s not found: the journald input reads nothing", self.settings.journalctl)
            self.heartbeat.beat(float("inf"))  # nothing to read, ever: never late
            stop.wait()
            return
        while not stop.is_set():
            self._follow(emit, stop)
            if not stop.is_set():
                self.heartbeat.beat(self.settings.restart_delay)
                stop.wait(self.settings.restart_delay)
        self.save_checkpoints()

    def _follow(self, emit: Callable[[Batch], None], stop: threading.Event) -> None:
        command = journalctl_command(self.settings, self.committed_cursor)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        splitter = LineSplitter(self.settings.max_entry_bytes)
        stdout, stderr = process.stdout.fileno(), process.stderr.fileno()
        # journalctl's warnings (corrupt or rotated journal files) are read as they come, keeping
        # the last few KiB: a full stderr pipe would block it, and nothing more would arrive.
        errors = b""
        watched = [stdout, stderr]
        try:
            while not stop.is_set():
                self.heartbeat.beat(self.settings.poll_interval)
                ready, _, _ = select.select(watched, [], [], self.settings.poll_interval)
                if stderr in ready:
                    more = os.read(stderr, READ_BYTES)
                    if not more:
                        watched.remove(stderr)  # closed: never readable again (no busy loop)
                    errors = (errors + more)[-STDERR_KEPT:]
                if stdout in ready:
                    data = os.read(stdout, READ_BYTES)
                    if not data:
                        break  # journalctl ended
                    self._emit(splitter.feed(data), emit)
                self._checkpoint_when_due()
        finally:
            process.terminate()
            try:
                _, rest = process.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                _, rest = process.communicate()
            errors = (errors + (rest or b""))[-STDERR_KEPT:]
        if not stop.is_set():
            self.stats.add("journalctl_exits", 1, input=self.tag)
            log.error("journalctl exited with %s: %s; starting it again in %.0fs", process.returncode,
                      errors.decode(errors="replace").strip()[-300:] or "no message", self.settings.restart_delay)

    def _emit(self, lines: list[bytes], emit: Callable[[Batch], None]) -> None:
        messages, fields, cursor = [], [], None
        limit = self.settings.max_message_bytes
        for line in lines:
            if type(line) is TooLong:
                self._too_long(line)
                cursor = cursor_in_head(line) or cursor
                continue
            if not line.strip():
                continue
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                entry = None
            if not isinstance(entry, dict):
                self.stats.add("parse_errors", 1, input=self.tag)
                continue
            message, extra, entry_cursor = entry_fields(entry)
            parts = message_parts(message, limit)
            if parts is None:
                messages.append(message)
                fields.append(extra)
            else:  # every piece flagged, as the file input does with a line over max_line_bytes
                flagged = {**extra, TRUNCATED: True}
                messages.extend(parts)
                fields.extend(dict(flagged) for _ in parts)
            cursor = entry_cursor or cursor
        if not messages:
            return
        batch = Batch(self.tag, "journald", time.time(), messages=messages, fields=fields)
        with self.lock:
            number = self.next_batch
            self.next_batch += 1
            if cursor:
                self.cursors[number] = cursor
        batch.on_done = lambda: self._confirmed(number)
        self.stats.add("records_in", len(messages), input=self.tag)
        emit(batch)

    def _too_long(self, head: bytes) -> None:
        self.stats.add("records_dropped", 1, input=self.tag, reason="too_long")
        if not self._reported_too_long:
            self._reported_too_long = True
            log.error("journal entry %s is longer than max_entry_bytes (%d) as JSON: dropped (reported once; "
                      "counted in records_dropped{reason=\"too_long\"})", cursor_in_head(head) or "(no cursor)",
                      self.settings.max_entry_bytes)

    def _checkpoint_when_due(self) -> None:
        if self._checkpoints.due():
            self.save_checkpoints()


INPUT = JournaldInput
