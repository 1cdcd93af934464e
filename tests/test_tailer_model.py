"""Model-based test of the file tailer (hypothesis stateful), in the spirit of Vector's file-source model tests.

A ``FileInput`` is driven in-process, step by step (no threads): the rules write lines to
``app.log``, rotate it (rename, copytruncate), delete files, read, acknowledge batches in any
order, save checkpoints, crash the agent (in-flight batches are lost, only what
``save_checkpoints()`` persisted survives) and restart it. A small model tracks every line
written and decides, independently of the tailer, which lines must be delivered and how
many times each may be emitted. Checked:

- every emitted message was written, verbatim, with no truncated/encoding flags;
- within one run a file's lines are emitted in order, with no gap and no repeat, starting
  where the persisted checkpoint said (so a skipped line fails at once);
- a line is emitted again only after a crash that found it emitted but not covered by the
  persisted checkpoint (bound: 1 + such crashes);
- at the end (restart if down, acknowledge everything, read until quiet) every line is
  delivered (acknowledged) unless it is legitimately lost: its file left the glob (rotated or
  deleted) before the tailer ever opened it, was unlinked while the agent was down, was
  rotated while down without a checkpoint leading to it, or its content was copytruncated
  away while the agent was down / while its batches were in flight at a crash;
- then a checkpoint + crash + restart must not emit anything again.
"""

from __future__ import annotations

import os
import random
import shutil
import string
import sys
import tempfile
import threading

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from shipper.config import COMMON_INPUT_OPTIONS, validate_section
from shipper.inputs import file as file_input
from shipper.pipeline import InputContext
from shipper.record import Envelope
from shipper.stats import Stats

LIVE, ROTATED = "app.log", "app.log.1"
# Printable padding, with multi-byte characters so that reads cut through them.
ALPHABET = string.ascii_letters + string.digits + string.punctuation + " " + "éß€😀"
NEVER = float("inf")


class Line:
    __slots__ = ("seq", "text", "file", "gen", "index", "emits", "allowed", "delivered", "excused", "acked_run")

    def __init__(self, seq: int, text: str, mfile: "MFile", index: int):
        self.seq, self.text, self.file, self.gen, self.index = seq, text, mfile, mfile.gen, index
        self.emits = 0           # times the tailer handed it on
        self.allowed = 1         # 1 + crashes that found it emitted but not checkpointed
        self.delivered = False   # acknowledged at least once
        self.excused = False     # legitimately lost (see the module docstring)
        self.acked_run = -1      # the run in which it was last acknowledged


class MFile:
    """One inode in the model. ``lines``: its current content; ``retired``: content copytruncated away."""

    def __init__(self, ident: int, where: str, is_copy: bool = False):
        self.id = ident
        self.where: str | None = where  # LIVE, ROTATED, or None once unlinked
        self.is_copy = is_copy          # the copy made by copytruncate (holds no line of its own)
        self.gen = 0
        self.lines: list[Line] = []
        self.retired: list[Line] = []
        self.known_run = -1             # the run in which the tailer opened it
        self.start = 0                  # index the tailer (re)started this generation at, this run
        self.next_emit = 0              # index of the next line it must emit, this run

    def __repr__(self) -> str:
        return f"file#{self.id}({self.where}, gen={self.gen}, lines={len(self.lines)})"


def line_text(seq: int, pad: int) -> str:
    rng = random.Random(seq)
    return f"seq={seq:06d} " + "".join(rng.choice(ALPHABET) for _ in range(pad))


def seq_of(message: str) -> int | None:
    if message.startswith("seq=") and message[4:10].isdigit():
        return int(message[4:10])
    return None


class TailerModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        # Logs on the disk file system (ext4 reuses inodes, as in production); checkpoints
        # on tmpfs when there is one, because they are fsynced on every save.
        self.tmp = tempfile.mkdtemp(prefix="tailer-model-")
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.data_dir = tempfile.mkdtemp(prefix="tailer-model-data-", dir=shm)
        self.logs = os.path.join(self.tmp, "logs")
        os.mkdir(self.logs)
        self.live = os.path.join(self.logs, LIVE)
        self.rot = os.path.join(self.logs, ROTATED)
        self.at: dict[str, MFile | None] = {self.live: None, self.rot: None}
        self.files: list[MFile] = []
        self.lines: dict[int, Line] = {}
        self.next_seq = 0
        self.inp: file_input.FileInput | None = None
        self.run = 0
        self.pending: list[tuple[object, list[Line]]] = []
        self.persisted: dict[int, tuple[int, int]] = {}  # file id -> (generation, committed index)
        self.interval = NEVER
        self.ack_now = True
        self.emitted_this_run = 0
        self.stop = threading.Event()

    # ------------------------------------------------------------ the tailer

    def _settings(self):
        problems: list[str] = []
        raw = {
            "type": "file", "tag": "app", "paths": [os.path.join(self.logs, "*.log")],
            "watch": False, "poll_interval": "10ms", "refresh_interval": "100ms",
            "rotate_wait": "0s", "partial_line_timeout": "1h", "read_bytes": 4096,
        }
        schema = {**COMMON_INPUT_OPTIONS, **file_input.OPTIONS}
        cfg = validate_section("inputs[0]", raw, schema, problems)
        problems += file_input.validate(cfg)
        assert not problems, problems
        return cfg

    def _start(self) -> None:
        """(Re)start: what ``FileInput.run`` does before its loop. The model decides what it resumes."""
        assert self.inp is None
        self.run += 1
        self.emitted_this_run = 0
        for f in self.files:
            if f.is_copy or f.where is None:
                continue
            entry = self.persisted.get(f.id)
            p = entry[1] if entry is not None and entry[0] == f.gen else None
            if f.where == self.live:
                self._open(f, p or 0)
            elif p is not None and p < len(f.lines):
                self._open(f, p)  # rotated while down: found again through its checkpoint
            else:
                self._excuse(f.lines[p or 0:])  # rotated while down, no checkpoint leads to it
        self.inp = file_input.FileInput(self._settings(), InputContext(self.data_dir, Stats(), self.interval))
        self.inp._saved = self.inp.store.load()
        self.inp.discover(at_startup=True)
        self.inp._recover_rotated()

    def _open(self, f: MFile, start: int) -> None:
        f.known_run = self.run
        f.start = f.next_emit = start

    def _poll(self) -> bool:
        occupant = self.at[self.live]
        if occupant is not None and occupant.known_run != self.run:
            self._open(occupant, 0)  # the (simulated) directory watcher reports every new file
        self.inp.changed.set()
        worked = self.inp.poll(self._on_batch, self.stop)
        if self.interval == 0:
            self._snapshot()  # poll() saved checkpoints
        return worked

    def _drain(self) -> None:
        for _ in range(50):
            if not self._poll():
                return
        raise AssertionError("the tailer never went quiet")

    def _on_batch(self, batch) -> None:
        messages = batch.message_list()
        records = list(batch.records(Envelope()))
        assert batch.count == len(messages) == len(records) > 0
        assert batch.source in (self.live, self.rot), batch.source
        got: list[Line] = []
        for message, record in zip(messages, records):
            assert record["message"] == message and record["tag"] == "app"
            assert not {"truncated", "encoding_errors", "parse_error"} & record.keys(), record
            line = self.lines.get(seq_of(message))
            assert line is not None and line.text == message, f"emitted a message never written: {message!r}"
            line.emits += 1
            assert line.emits <= line.allowed, (
                f"seq={line.seq} ({line.file}, index {line.index}) emitted {line.emits} times, "
                f"allowed {line.allowed} (duplicate not explained by a crash before its checkpoint)")
            f = line.file
            if f.known_run == self.run:
                assert line.gen == f.gen, f"seq={line.seq}: content of {f} from before its truncation read again"
                assert line.index == f.next_emit, (
                    f"{f}: emitted line {line.index} (seq={line.seq}) but line {f.next_emit} was next "
                    f"(seq={f.lines[f.next_emit].seq if f.next_emit < len(f.lines) else None}): "
                    f"lines {'skipped' if line.index > f.next_emit else 'repeated'}")
                f.next_emit += 1
            got.append(line)
        self.emitted_this_run += len(messages)
        if self.ack_now:
            self._ack(batch, got)
        else:
            self.pending.append((batch, got))

    def _ack(self, batch, lines: list[Line]) -> None:
        batch.on_done()
        for line in lines:
            line.delivered = True
            line.acked_run = self.run

    def _committed(self, f: MFile) -> int:
        i = f.start
        while i < len(f.lines) and f.lines[i].acked_run == self.run:
            i += 1
        return i

    def _snapshot(self) -> None:
        """What save_checkpoints() wrote: the committed offset of every file this run opened."""
        self.persisted = {f.id: (f.gen, self._committed(f)) for f in self.files
                          if f.known_run == self.run and not f.is_copy}

    def _at_risk(self, line: Line) -> bool:
        entry = self.persisted.get(line.file.id)
        return not (entry is not None and entry[0] == line.gen and line.index < entry[1])

    @staticmethod
    def _excuse(lines: list[Line]) -> None:
        for line in lines:
            if not line.delivered:
                line.excused = True

    def _unlinked(self, f: MFile | None) -> None:
        if f is None:
            return
        f.where = None
        if self.inp is None or f.known_run != self.run:
            self._excuse(f.lines)  # nobody holds it open: what was not delivered is gone
        # else the tailer holds it open and must drain it

    # ------------------------------------------------------------ rules

    @initialize(interval=st.sampled_from([0.0, NEVER]))
    def begin(self, interval: float) -> None:
        """interval 0: poll() saves checkpoints every time; NEVER: only the checkpoint rule does."""
        self.interval = interval
        self._start()

    @rule(pads=st.lists(st.integers(0, 300), min_size=1, max_size=30))
    def write(self, pads: list[int]) -> None:
        f = self.at[self.live]
        if f is None:
            f = MFile(len(self.files), self.live)
            self.files.append(f)
            self.at[self.live] = f
        data = []
        for pad in pads:
            seq = self.next_seq
            self.next_seq += 1
            line = Line(seq, line_text(seq, pad), f, len(f.lines))
            f.lines.append(line)
            self.lines[seq] = line
            data.append(line.text + "\n")
        fd = os.open(self.live, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, "".join(data).encode())
        finally:
            os.close(fd)

    @precondition(lambda self: self.at[self.live] is not None)
    @rule(create=st.booleans())
    def rotate_rename(self, create: bool) -> None:
        f = self.at[self.live]
        os.replace(self.live, self.rot)
        self._unlinked(self.at[self.rot])
        f.where = self.rot
        self.at[self.rot], self.at[self.live] = f, None
        if self.inp is not None and f.known_run != self.run:
            self._excuse(f.lines)  # left the glob before the tailer ever saw it
        if create:
            open(self.live, "x").close()
            g = MFile(len(self.files), self.live)
            self.files.append(g)
            self.at[self.live] = g

    @precondition(lambda self: self.at[self.live] is not None)
    @rule(ack_now=st.booleans())
    def rotate_copytruncate(self, ack_now: bool) -> None:
        f = self.at[self.live]
        if self.inp is not None:
            self.ack_now = ack_now
            self._drain()  # nothing unread may be lost by the truncate
        tmp = os.path.join(self.logs, ".copy.tmp")
        shutil.copyfile(self.live, tmp)
        os.replace(tmp, self.rot)
        self._unlinked(self.at[self.rot])
        copy = MFile(len(self.files), self.rot, is_copy=True)
        self.files.append(copy)
        self.at[self.rot] = copy
        os.truncate(self.live, 0)
        f.retired.extend(f.lines)
        f.lines = []
        f.gen += 1
        f.start = f.next_emit = 0
        if self.inp is not None:
            self._poll()  # the tailer notices the truncation before anything is written again
        else:
            self._excuse(f.retired)  # only in the copy, which the glob does not match

    @precondition(lambda self: self.at[self.live] is not None)
    @rule()
    def delete_live(self) -> None:
        os.unlink(self.live)
        self._unlinked(self.at[self.live])
        self.at[self.live] = None

    @precondition(lambda self: self.at[self.rot] is not None)
    @rule()
    def delete_rotated(self) -> None:
        os.unlink(self.rot)
        self._unlinked(self.at[self.rot])
        self.at[self.rot] = None

    @precondition(lambda self: self.inp is not None)
    @rule(ack_now=st.booleans(), until_quiet=st.booleans())
    def read(self, ack_now: bool, until_quiet: bool) -> None:
        self.ack_now = ack_now
        if until_quiet:
            self._drain()
        else:
            self._poll()

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def acknowledge(self, data) -> None:
        """Outputs confirm some in-flight batches, in any order."""
        order = data.draw(st.permutations(range(len(self.pending))), label="order")
        count = data.draw(st.integers(1, len(order)), label="count")
        chosen = sorted(order[:count])
        for i in order[:count]:
            self._ack(*self.pending[i])
        self.pending = [p for i, p in enumerate(self.pending) if i not in chosen]

    @precondition(lambda self: self.inp is not None)
    @rule()
    def checkpoint(self) -> None:
        self.inp.save_checkpoints()
        self._snapshot()

    @precondition(lambda self: self.inp is not None)
    @rule()
    def crash(self) -> None:
        """The process dies: its descriptors close, in-flight batches are lost, nothing more is saved."""
        for tailed in list(self.inp.files.values()) + self.inp.releasing:
            tailed.close()
        self.inp = None
        self.pending = []
        for line in self.lines.values():
            if line.emits and self._at_risk(line):
                line.allowed += 1
        for f in self.files:
            self._excuse(f.retired)  # copytruncated away: its lost batches cannot be read again
            if f.where is None:
                self._excuse(f.lines)  # unlinked: its last descriptor just closed

    @precondition(lambda self: self.inp is None)
    @rule()
    def restart(self) -> None:
        self._start()

    # ------------------------------------------------------------ the end

    def _final_check(self) -> None:
        if self.inp is None:
            self._start()
        for batch, lines in self.pending:
            self._ack(batch, lines)
        self.pending = []
        self.ack_now = True
        self._drain()
        self._drain()  # rotated files are released on the pass after they are drained
        lost = [line for line in self.lines.values() if not line.delivered and not line.excused]
        assert not lost, "lines never delivered: " + ", ".join(
            f"seq={line.seq} ({line.file}, gen {line.gen}, index {line.index}, emitted {line.emits}x)"
            for line in lost[:10])
        assert self.inp.stats.get("records_in", input="app") == self.emitted_this_run
        # Everything is delivered: after a checkpoint, a crash and a restart nothing is read again.
        self.checkpoint()
        self.crash()
        self._start()
        self._drain()
        again = [line.seq for line in self.lines.values() if line.acked_run == self.run]
        assert self.emitted_this_run == 0, f"read again after a clean checkpoint: seq {again[:10]}"

    def teardown(self) -> None:
        try:
            if sys.exc_info()[1] is None:  # not when a step already failed
                self._final_check()
        finally:
            if self.inp is not None:
                for tailed in list(self.inp.files.values()) + self.inp.releasing:
                    tailed.close()
                self.inp = None
            shutil.rmtree(self.tmp, ignore_errors=True)
            shutil.rmtree(self.data_dir, ignore_errors=True)


TestTailerModel = TailerModel.TestCase
TestTailerModel.settings = settings(
    max_examples=75,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
