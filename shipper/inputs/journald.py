"""The journald input: the systemd journal through ``journalctl -o json --follow``.

Entries are read in chunks from journalctl's output and become batches of records with
``message``, ``unit``, ``priority``, ``pid``, ``identifier`` and the entry's own time. The
journal cursor of the last entry of every batch is kept; the cursor saved (atomically, in
``data_dir/checkpoints/journald-<id>.json``) is that of the longest run of batches every
output confirmed, so a restart resumes right after it (``--after-cursor``): at-least-once,
like files. If journalctl exits, it is started again from the saved position after a pause.
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
from shipper.durable import write_atomically
from shipper.inputs.checkpoints import Every
from shipper.record import ENCODING_ERRORS, TIME, Batch, format_time

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
}


def journalctl_command(settings, cursor: str | None) -> list[str]:
    """The journalctl command line for the settings and the saved cursor (pure, tested directly)."""
    command = [settings.journalctl, "--output=json", "--follow", "--no-pager", "--lines=all",
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


def entry_fields(entry: dict) -> tuple[str, dict, str | None]:
    """(message, record fields, cursor) of one journal entry as journalctl's JSON shows it."""
    fields: dict = {}
    message = entry.get("MESSAGE", "")
    if isinstance(message, list):  # not UTF-8: journalctl gives the bytes as numbers
        raw = bytes(message)
        message = raw.decode("utf-8", errors="replace")
        fields[ENCODING_ERRORS] = True
    elif message is None:
        message = ""
    for key, name, convert in (("_SYSTEMD_UNIT", "unit", str), ("PRIORITY", "priority", int), ("_PID", "pid", int),
                               ("SYSLOG_IDENTIFIER", "identifier", str)):
        value = entry.get(key)
        if isinstance(value, str):
            try:
                fields[name] = convert(value)
            except ValueError:
                pass
    realtime = entry.get("__REALTIME_TIMESTAMP")
    if isinstance(realtime, str) and realtime.isdigit():
        fields[TIME] = format_time(int(realtime) / 1e6)
    return message, fields, entry.get("__CURSOR")


class JournaldInput:
    def __init__(self, settings, context):
        self.settings = settings
        self.tag = settings.tag
        self.stats = context.stats
        self.checkpoint_interval = context.checkpoint_interval
        self.path = os.path.join(context.data_dir, "checkpoints", f"journald-{settings.id or settings.tag}.json")
        self.wake = threading.Event()
        self.tracker = OffsetTracker(0)
        self.cursors: dict[int, str] = {}  # batch number -> cursor of its last entry
        self.lock = threading.Lock()
        self.next_batch = 0
        self.saved_cursor = self._load()
        self.committed_cursor = self.saved_cursor
        self._checkpoints = Every(self.checkpoint_interval)

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
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
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
            stop.wait()
            return
        while not stop.is_set():
            self._follow(emit, stop)
            if not stop.is_set():
                stop.wait(self.settings.restart_delay)
        self.save_checkpoints()

    def _follow(self, emit: Callable[[Batch], None], stop: threading.Event) -> None:
        command = journalctl_command(self.settings, self.committed_cursor)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        carry = b""
        try:
            while not stop.is_set():
                ready, _, _ = select.select([process.stdout], [], [], self.settings.poll_interval)
                if ready:
                    data = os.read(process.stdout.fileno(), READ_BYTES)
                    if not data:
                        break  # journalctl ended
                    lines = (carry + data).split(b"\n")
                    carry = lines.pop()
                    self._emit(lines, emit)
                self._checkpoint_when_due()
        finally:
            process.terminate()
            try:
                _, errors = process.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                _, errors = process.communicate()
        if not stop.is_set():
            self.stats.add("journalctl_exits", 1, input=self.tag)
            log.error("journalctl exited with %s: %s; starting it again in %.0fs", process.returncode,
                      errors.decode(errors="replace").strip()[-300:] or "no message", self.settings.restart_delay)

    def _emit(self, lines: list[bytes], emit: Callable[[Batch], None]) -> None:
        messages, fields, cursor = [], [], None
        for line in lines:
            if not line.strip():
                continue
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                self.stats.add("parse_errors", 1, input=self.tag)
                continue
            message, extra, entry_cursor = entry_fields(entry)
            messages.append(message)
            fields.append(extra)
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

    def _checkpoint_when_due(self) -> None:
        if self._checkpoints.due():
            self.save_checkpoints()


INPUT = JournaldInput
