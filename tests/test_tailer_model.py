"""Model-based test of the file tailer (hypothesis stateful), in the spirit of Vector's file-source model tests.

A ``FileInput`` is driven in-process, step by step (no threads): the rules write lines to
``app.log``; rotate it by rename (to app.log.1, outside the glob, or app.1.log, inside it) or
delete it, with or without a new app.log; copytruncate it (drained first; maybe refilled before
the tailer looks again); read; acknowledge batches in any order (or keep them in flight); save
checkpoints; crash the agent (in-flight batches are lost, only what ``save_checkpoints()``
persisted survives) and restart it, with files rotated while it is down. A small model tracks
every line written and decides, independently of the tailer, which lines must be delivered and
how many times each may be emitted. Checked:

- every emitted message was written, verbatim, with no truncated/encoding flags;
- within one run a file's lines are emitted in order, with no gap and no repeat, starting
  where the persisted checkpoint said (so a skipped line fails at once);
- a line is emitted again only after a crash that found it emitted but not covered by the
  persisted checkpoint (bound: 1 + such crashes);
- at the end (restart if down, acknowledge everything, read until quiet) every line is
  delivered (acknowledged) unless it is legitimately lost: its file left the glob (rotated or
  deleted) before the tailer ever opened it, was unlinked while the agent was down (or closed
  by the crash), was rotated while down without a checkpoint leading to it, or its content was
  copytruncated away while the agent was down / while its batches were in flight at a crash;
- then a checkpoint + crash + restart must not emit anything again.

The model keeps every unlinked inode open ("pinned") so that the file system cannot hand
its number to a new file: inode reuse is covered by its own test at the end of this file.
"""

from __future__ import annotations

import gzip
import os
import random
import shutil
import string
import sys
import tempfile
import threading

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from shipper.config import COMMON_INPUT_OPTIONS, validate_section
from shipper.inputs import file as file_input
from shipper.pipeline import InputContext
from shipper.record import Envelope
from shipper.stats import Stats

# The glob is *.log: app.log is followed, app.log.1 is not, app.1.log (a rotation that the
# glob still matches, like dateext names) is followed as the same file under a new name.
LIVE, ROTATED, ROTATED_IN_GLOB = "app.log", "app.log.1", "app.1.log"
COMPRESSED = "gz"  # rotate's target: app.log.N.gz, compressed, the file itself removed
# Printable padding, with multi-byte characters so that 4 KiB reads cut through them.
ALPHABET = string.ascii_letters + string.digits + string.punctuation + " " + "éß€😀"
NEVER = float("inf")


def make_input(logs: str, data_dir: str, checkpoint_interval: float) -> file_input.FileInput:
    problems: list[str] = []
    raw = {
        "type": "file", "tag": "app", "paths": [os.path.join(logs, "*.log")],
        "watch": False, "poll_interval": "10ms", "refresh_interval": "100ms",
        "rotate_wait": "0s", "partial_line_timeout": "1h", "read_bytes": 4096,
    }
    cfg = validate_section("inputs[0]", raw, {**COMMON_INPUT_OPTIONS, **file_input.OPTIONS}, problems)
    problems += file_input.validate(cfg)
    assert not problems, problems
    return file_input.FileInput(cfg, InputContext(data_dir, Stats(), checkpoint_interval))


def start_input(inp: file_input.FileInput, emit=lambda batch: None) -> None:
    """What ``FileInput.run`` does before its loop."""
    inp._saved = inp.store.load()
    inp._recover_truncated_while_down()
    inp.discover(at_startup=True)
    inp._recover_rotated(emit)


def kill_input(inp: file_input.FileInput) -> None:
    """The process dies: the kernel closes its descriptors; nothing else happens."""
    for tailed in list(inp.files.values()) + inp.releasing:
        tailed.close()


class Line:
    __slots__ = ("seq", "text", "file", "gen", "index", "emits", "allowed", "delivered", "excused", "acked_run")

    def __init__(self, seq: int, text: str, mfile: "MFile", index: int):
        self.seq, self.text, self.file, self.gen, self.index = seq, text, mfile, mfile.gen, index
        self.emits = 0           # times the tailer handed it on
        self.allowed = 1         # 1 + crashes that found it emitted but not checkpointed
        self.delivered = False   # acknowledged at least once
        self.excused = False     # legitimately lost (see the module docstring)
        self.acked_run = -1      # the run in which it was last acknowledged

    def __repr__(self) -> str:
        return f"seq={self.seq} ({self.file}, gen {self.gen}, index {self.index}, emitted {self.emits}x)"


class MFile:
    """One inode in the model. ``lines``: its current content; ``retired``: content copytruncated away."""

    def __init__(self, ident: int, where: str, is_copy: bool = False):
        self.id = ident
        st = os.stat(where)
        self.key = (st.st_dev, st.st_ino)  # as the tailer knows it
        self.where: str | None = where  # the path it is at, None once unlinked
        self.is_copy = is_copy          # the copy made by copytruncate (holds no line of its own)
        self.gen = 0
        self.lines: list[Line] = []
        self.retired: list[Line] = []
        self.known_run = -1             # the run in which the tailer opened it
        self.seen_empty = True          # empty when the tailer last fingerprinted it
        self.start = 0                  # index this generation was (re)started at, this run
        self.next_emit = 0              # index of the next line it must emit, this run
        self.compressed: str | None = None  # rotated and compressed: where its content is now

    def __repr__(self) -> str:
        where = os.path.basename(self.where) if self.where else "unlinked"
        return f"file#{self.id}({where}, gen {self.gen}, {len(self.lines)} lines)"


def line_text(seq: int, max_pad: int) -> str:
    rng = random.Random(seq)
    return f"seq={seq:06d} " + "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, max_pad)))


def seq_of(message: str) -> int | None:
    if message.startswith("seq=") and message[4:10].isdigit():
        return int(message[4:10])
    return None


# Acknowledge every batch at once, none, a random half, or all but the first (out of order).
ACK_MODES = ("now", "hold", "some", "later")


class TailerModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="tailer-model-")
        self.logs = os.path.join(self.tmp, "logs")
        self.data_dir = os.path.join(self.tmp, "data")
        os.mkdir(self.logs)
        self.live = os.path.join(self.logs, LIVE)
        self.rot = os.path.join(self.logs, ROTATED)
        self.rot_in = os.path.join(self.logs, ROTATED_IN_GLOB)
        self.globbed = (self.live, self.rot_in)
        self.at: dict[str, MFile | None] = {self.live: None, self.rot: None, self.rot_in: None}
        self.files: list[MFile] = []
        self.lines: dict[int, Line] = {}
        self.next_seq = 0
        self.pins: list[int] = []
        self.inp: file_input.FileInput | None = None
        self.run = 0
        self.pending: list[tuple[object, list[Line]]] = []
        # file id -> (generation, committed index, fingerprint empty), as the last save wrote it
        self.persisted: dict[int, tuple[int, int, bool]] = {}
        self.interval = NEVER
        self.ack_mode = "now"
        self.held_first = False
        self.rnd = random.Random(0)
        self.emitted_this_run = 0
        self.dirty = False  # read or acknowledged since the last checkpoint
        self.stop = threading.Event()
        self.compressions = 0

    # ------------------------------------------------------------ driving the tailer

    def _start(self) -> None:
        """(Re)start. The model decides, from its own bookkeeping, where each file must resume."""
        assert self.inp is None
        self.run += 1
        self.emitted_this_run = 0
        either: list[MFile] = []
        for f in self.files:
            if f.where is None and f.compressed is not None and not f.is_copy:
                entry = self.persisted.get(f.id)
                p = entry[1] if entry is not None and entry[0] == f.gen and not entry[2] else None
                if p is not None and p < len(f.lines):
                    self._opened(f, p)  # its unread rest is read from the compressed file
                else:
                    self._excuse(f.lines[p or 0:])  # no checkpoint with a fingerprint leads to it

                continue
            if f.is_copy or f.where is None:
                continue
            entry = self.persisted.get(f.id)
            p = entry[1] if entry is not None and entry[0] == f.gen else None
            if entry is not None and entry[2]:
                p = 0  # an empty fingerprint matches any content: the file is resumed from 0
            if f.where in self.globbed:
                self._opened(f, p or 0)
            elif entry is not None and entry[2] and f.lines:
                # Rotated while down, checkpointed while still empty: nothing tells it from another
                # file that got the same inode, so recovering it from 0 or not are both fine.
                either.append(f)
            elif p is not None and p < len(f.lines):
                self._opened(f, p)  # rotated while down: found again through its checkpoint
            else:
                self._excuse(f.lines[p or 0:])  # rotated while down, no checkpoint leads to it
        self.inp = make_input(self.logs, self.data_dir, self.interval)
        start_input(self.inp, self._on_batch)
        for f in either:
            if f.key in self.inp.files:
                self._opened(f, 0)
            else:
                self._excuse(f.lines)
        self.dirty = True

    def _opened(self, f: MFile, start: int) -> None:
        f.known_run = self.run
        f.start = f.next_emit = start
        f.seen_empty = not f.lines

    def _poll(self) -> bool:
        for path in self.globbed:
            occupant = self.at[path]
            if occupant is not None and occupant.known_run != self.run:
                self._opened(occupant, 0)
        self.inp.changed.set()  # what the directory watcher does on create/move/delete: discover now
        worked = self.inp.poll(self._on_batch, self.stop)
        self.dirty = True
        for f in self.files:
            if f.known_run == self.run:
                f.seen_empty = not f.lines  # every followed file is fingerprinted again at its end
        if self.interval == 0:
            self._snapshot()  # poll() saved the checkpoints
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
        assert batch.source in self.at, batch.source
        got: list[Line] = []
        for message, record in zip(messages, records):
            assert record["message"] == message and record["tag"] == "app"
            assert not {"truncated", "encoding_errors", "parse_error"} & record.keys(), record
            line = self.lines.get(seq_of(message))
            assert line is not None and line.text == message, f"emitted a message never written: {message!r}"
            line.emits += 1
            assert line.emits <= line.allowed, (
                f"{line} emitted {line.emits} times, allowed {line.allowed}: "
                f"a duplicate not explained by a crash before its checkpoint")
            f = line.file
            if line.gen != f.gen:
                # Content copytruncated away (it is in no file but the copy): read from the copy, where
                # the file was when it was truncated while the agent was down, or again after a crash
                # lost its batches (the copy took the file's checkpoint over). The bound on emits holds.
                assert batch.source != self.live, f"{line}: old content read from {batch.source}"
                got.append(line)
                continue
            assert f.known_run == self.run, f"{line} emitted, but the tailer cannot know {f}"
            assert line.gen == f.gen, f"{line}: content from before the truncation of {f} read again"
            assert line.index == f.next_emit, (
                f"{f}: emitted line {line.index} (seq={line.seq}) but line {f.next_emit} was next: "
                f"lines {'skipped' if line.index > f.next_emit else 'repeated'}")
            f.next_emit += 1
            got.append(line)
        self.emitted_this_run += len(messages)
        mode = self.ack_mode
        if mode == "now" or (mode == "some" and self.rnd.random() < 0.5) or (mode == "later" and self.held_first):
            self._ack(batch, got)
        else:
            self.pending.append((batch, got))
            self.held_first = True

    def _set_ack_mode(self, mode: str, rnd: random.Random | None = None) -> None:
        self.ack_mode, self.held_first = mode, False
        if rnd is not None:
            self.rnd = rnd

    def _ack(self, batch, lines: list[Line]) -> None:
        self.dirty = True
        batch.on_done()
        for line in lines:
            line.delivered = True
            line.acked_run = self.run

    # ------------------------------------------------------------ model bookkeeping

    def _committed(self, f: MFile) -> int:
        i = f.start
        while i < len(f.lines) and f.lines[i].acked_run == self.run:
            i += 1
        return i

    def _snapshot(self) -> None:
        """What save_checkpoints() must have written: the committed index of every file this run opened."""
        self.persisted = {f.id: (f.gen, self._committed(f), f.seen_empty) for f in self.files
                          if f.known_run == self.run and not f.is_copy}
        self.dirty = False

    def _unread(self) -> bool:
        """Is there a line the running tailer can still read? (Reading is pointless otherwise.)"""
        for f in self.files:
            if f.known_run == self.run and f.next_emit < len(f.lines):
                return True
        return any(f is not None and f.known_run != self.run and f.lines for f in map(self.at.get, self.globbed))

    def _at_risk(self, line: Line) -> bool:
        entry = self.persisted.get(line.file.id)
        return not (entry is not None and entry[0] == line.gen and line.index < entry[1])

    @staticmethod
    def _excuse(lines: list[Line]) -> None:
        for line in lines:
            if not line.delivered:
                line.excused = True

    def _pin(self, path: str) -> None:
        """Keep the inode at ``path`` alive, so that no new file gets its number."""
        if self.at[path] is not None:
            self.pins.append(os.open(path, os.O_RDONLY))

    def _unlinked(self, f: MFile | None, compressed: str | None = None) -> None:
        """``f`` lost its last name; ``compressed``: its content lives on in that compressed file."""
        if f is None:
            return
        f.where = None
        f.compressed = compressed
        if compressed is not None and (self.inp is None or self._dormant(f) and self._fingerprinted(f)):
            return  # read from the compressed file: at the next start (from the checkpoint), or when looked at
        if self.inp is None or f.known_run != self.run:
            self._excuse(f.lines)  # nobody holds it open: what was not delivered is gone
        elif self._dormant(f):
            self._excuse(f.lines[f.next_emit:])  # closed as idle: what came since it was closed is gone
        # else the tailer holds it open and must drain it

    def _fingerprinted(self, f: MFile) -> bool:
        """Closed as idle with some first bytes fingerprinted: only then can its compressed copy be told
        apart (a file closed while empty and compressed later is lost, like one unlinked)."""
        return self.inp.files[f.key].fp_len > 0

    def _dormant(self, f: MFile) -> bool:
        tailed = self.inp.files.get(f.key) if self.inp is not None else None
        return tailed is not None and tailed.dormant

    # ------------------------------------------------------------ rules

    @initialize(interval=st.sampled_from([0.0, NEVER]))
    def begin(self, interval: float) -> None:
        """interval 0: poll() saves checkpoints every time; NEVER: only the checkpoint rule does."""
        self.interval = interval
        self._start()

    @rule(count=st.integers(1, 40), max_pad=st.sampled_from([0, 100, 1000]))
    def write(self, count: int, max_pad: int) -> None:
        """``count`` complete lines, in one write (a 4 KiB read may end anywhere in them)."""
        self._append(count, max_pad)

    def _append(self, count: int, max_pad: int) -> None:
        f = self.at[self.live]
        if f is None:
            open(self.live, "x").close()
            f = MFile(len(self.files), self.live)
            self.files.append(f)
            self.at[self.live] = f
        chunk = []
        for _ in range(count):
            seq = self.next_seq
            self.next_seq += 1
            line = Line(seq, line_text(seq, max_pad), f, len(f.lines))
            f.lines.append(line)
            self.lines[seq] = line
            chunk.append(line.text + "\n")
        fd = os.open(self.live, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, "".join(chunk).encode())
        finally:
            os.close(fd)

    @precondition(lambda self: self.at[self.live] is not None)
    @rule(to=st.sampled_from([ROTATED, ROTATED_IN_GLOB, None, COMPRESSED]), create=st.booleans())
    def rotate(self, to: str | None, create: bool) -> None:
        """Rename app.log to app.log.1 or app.1.log (replacing what was there), delete it (to=None), or
        rotate and compress it to app.log.1.gz (logrotate's compress); then maybe create a new app.log."""
        f = self.at[self.live]
        if to == COMPRESSED:
            self.compressions += 1
            target = os.path.join(self.logs, f"app.log.{self.compressions}.gz")
            with open(self.live, "rb") as source, gzip.open(target, "wb") as packed:
                shutil.copyfileobj(source, packed)
            self._pin(self.live)
            os.unlink(self.live)
            self._unlinked(f, compressed=target)
        elif to is None:
            self._pin(self.live)
            os.unlink(self.live)
            self._unlinked(f)
        else:
            target = os.path.join(self.logs, to)
            self._pin(target)
            os.replace(self.live, target)
            self._unlinked(self.at[target])
            f.where = target
            self.at[target] = f
            if target not in self.globbed and self.inp is not None and f.known_run != self.run:
                self._excuse(f.lines)  # left the glob before the tailer ever saw it
        self.at[self.live] = None
        if create:
            open(self.live, "x").close()
            g = MFile(len(self.files), self.live)
            self.files.append(g)
            self.at[self.live] = g

    @precondition(lambda self: self.at[self.live] is not None)
    @rule(ack=st.sampled_from(ACK_MODES), refill=st.sampled_from([0, 0, 1, 20]))
    def copytruncate(self, ack: str, refill: int) -> None:
        """Rotation by copytruncate: copy app.log to app.log.1, truncate app.log, maybe write again at once."""
        f = self.at[self.live]
        if self.inp is not None:
            self._set_ack_mode(ack)
            self._drain()  # so that the truncate loses nothing unread
        tmp = os.path.join(self.logs, ".copy.tmp")
        shutil.copyfile(self.live, tmp)
        self._pin(self.rot)
        os.replace(tmp, self.rot)
        self._unlinked(self.at[self.rot])
        copy = MFile(len(self.files), self.rot, is_copy=True)
        self.files.append(copy)
        self.at[self.rot] = copy
        os.truncate(self.live, 0)
        if f.lines:  # (truncating an empty file changes nothing)
            f.retired.extend(f.lines)
            f.lines = []
            f.gen += 1
            f.start = f.next_emit = 0
        if refill:
            # Written before the tailer looks again, possibly past its old offset: it must tell
            # by the file's first bytes that this is new content, and read it from the start.
            self._append(refill, 1000)
        if self.inp is not None:
            # The tailer looks before the next rule: once it has noticed, acknowledgements of the
            # old content are void, which keeps the model of its checkpoints simple.
            self._poll()
        else:
            self._excuse(f.retired)  # now only in the copy, which the glob does not match

    @precondition(lambda self: self.inp is not None)
    @rule()
    def close_idle(self) -> None:
        """close_inactive passed: every file read to its end and holding nothing is closed; it is taken up
        again where it was when it changes (through rotation, truncation and compression while closed)."""
        for tailed in list(self.inp.files.values()):
            if tailed.closable and not tailed.builder.holds_event and tailed.released_since is None:
                self.inp._close_idle(tailed)

    @precondition(lambda self: self.inp is not None and self._unread())
    @rule(ack=st.sampled_from(ACK_MODES), rnd=st.randoms(use_true_random=False))
    def read(self, ack: str, rnd: random.Random) -> None:
        """One poll() pass."""
        self._set_ack_mode(ack, rnd)
        self._poll()

    @precondition(lambda self: self.inp is not None and self._unread())
    @rule(ack=st.sampled_from(ACK_MODES), rnd=st.randoms(use_true_random=False))
    def read_until_quiet(self, ack: str, rnd: random.Random) -> None:
        """poll() until a pass reads nothing (rotated files get released)."""
        self._set_ack_mode(ack, rnd)
        self._drain()

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def acknowledge(self, data) -> None:
        """Outputs confirm some in-flight batches, in any order."""
        order = data.draw(st.permutations(range(len(self.pending))), label="order")
        count = data.draw(st.integers(1, len(order)), label="count")
        for i in order[:count]:
            self._ack(*self.pending[i])
        done = set(order[:count])
        self.pending = [p for i, p in enumerate(self.pending) if i not in done]

    @precondition(lambda self: self.inp is not None and self.dirty)
    @rule()
    def checkpoint(self) -> None:
        self.inp.save_checkpoints()
        self._snapshot()

    @precondition(lambda self: self.inp is not None and (self.emitted_this_run or self.pending))
    @rule(restart=st.booleans())
    def crash(self, restart: bool) -> None:
        """The process dies: descriptors close, in-flight batches are lost, nothing more is saved."""
        kill_input(self.inp)
        self.inp = None
        self.pending = []
        for line in self.lines.values():
            if line.emits and self._at_risk(line):
                line.allowed += 1
        for f in self.files:
            self._excuse(f.retired)  # copytruncated away: its lost batches cannot be read again
            if f.where is None:
                self._excuse(f.lines)  # unlinked: its last descriptor just closed
        if restart:
            self._start()

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
        self._set_ack_mode("now")
        self._drain()
        lost = [line for line in self.lines.values() if not line.delivered and not line.excused]
        assert not lost, f"{len(lost)} lines never delivered: {lost[:5]}"
        assert self.inp.stats.get("records_in", input="app") == self.emitted_this_run
        # Everything is delivered: after a checkpoint, a crash and a restart nothing is read again.
        self.checkpoint()
        self.crash(restart=True)
        self._drain()
        assert self.emitted_this_run == 0, "lines read again after a checkpoint that covered them"

    def teardown(self) -> None:
        try:
            if sys.exc_info()[1] is None:  # not when a step already failed
                self._final_check()
        finally:
            if self.inp is not None:
                kill_input(self.inp)
                self.inp = None
            for fd in self.pins:
                os.close(fd)
            shutil.rmtree(self.tmp, ignore_errors=True)


TestTailerModel = TailerModel.TestCase
TestTailerModel.settings = settings(
    max_examples=int(os.environ.get("SHIPPER_MODEL_EXAMPLES", "100")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# ---------------------------------------------------------------- found by the model (inode reuse)

def test_recovery_does_not_ship_a_file_outside_the_globs(tmp_path):
    """An empty file's checkpoint (fp_len 0) matches any file that later gets its inode number.

    The agent checkpoints an empty app.log, stops; app.log is deleted and another file, which
    the glob does not match, gets the same inode (ext4 hands the freed number straight out).
    At restart _recover_rotated takes it for app.log rotated away and ships it.
    """
    logs, data = tmp_path / "logs", tmp_path / "data"
    logs.mkdir()
    live = logs / "app.log"
    live.touch()
    inp = make_input(str(logs), str(data), NEVER)
    start_input(inp)
    inp.poll(lambda batch: None, threading.Event())
    inp.save_checkpoints()
    kill_input(inp)
    ino = live.stat().st_ino
    live.unlink()
    for attempt in range(100):  # ext4 hands the freed number out again at once, unless another process took it
        other = logs / f"notes-{attempt}.txt"
        other.write_text(f"not a log line: {other.name} does not match *.log\n")
        if other.stat().st_ino == ino:
            break
    else:
        pytest.skip("this file system did not reuse the inode number")
    shipped: list[str] = []
    inp = make_input(str(logs), str(data), NEVER)
    start_input(inp)
    try:
        inp.poll(lambda batch: shipped.extend(batch.message_list()), threading.Event())
    finally:
        kill_input(inp)
    assert shipped == [], f"shipped {shipped} from {other.name}, which the globs do not match"


def test_a_copy_waits_for_its_files_next_poll_however_late(tmp_path):
    """copytruncate on a busy agent: the copy (app.1.log, which the globs take, holding app.log's first
    bytes) is found before app.log's truncation. When the agent polls nothing for longer than the
    suspect window (a loaded machine), the copy still is not read from its start as a file of its own
    (every line twice): it waits for app.log's next poll, which finds the truncation and reads the copy
    from where app.log was."""
    logs, data = tmp_path / "logs", tmp_path / "data"
    logs.mkdir()
    live, copy = logs / LIVE, logs / ROTATED_IN_GLOB
    live.write_text("".join(f"line {i}\n" for i in range(100)))
    shipped: list[str] = []

    def emit(batch):
        shipped.extend(batch.message_list())
        if batch.on_done is not None:
            batch.on_done()

    inp = make_input(str(logs), str(data), NEVER)
    start_input(inp)
    try:
        inp.poll(emit, threading.Event())
        assert len(shipped) == 100
        with live.open("a") as handle:  # written after the agent's read: only in the copy, soon
            handle.write("".join(f"line {i}\n" for i in range(100, 120)))
        shutil.copyfile(live, copy)
        inp.discover(at_startup=False)
        assert str(copy) in inp.suspects
        original, since, *rest = inp.suspects[str(copy)]
        inp.suspects[str(copy)] = (original, since - 3 * inp.settings.refresh_interval, *rest)  # the window passed
        inp.discover(at_startup=False)
        assert str(copy) in inp.suspects, "taken as a file of its own before app.log was looked at again"
        with live.open("r+") as handle:
            handle.truncate(0)
        inp.poll(emit, threading.Event())
        inp.poll(emit, threading.Event())
    finally:
        kill_input(inp)
    assert shipped == [f"line {i}" for i in range(120)]


def test_a_short_new_file_renamed_like_a_rotation_before_the_agent_saw_it_is_read():
    """Found by the model: app.log (one line of ~1,000 bytes, fingerprinted) is renamed app.log.1; a new
    app.log gets two short lines and is renamed app.1.log before the tailer looks. app.1.log is named
    like app.log's rotation and is shorter than its fingerprint, but its bytes are not app.log's: it
    is a file of its own, not a copytruncate copy still being written. Held as one, it waited
    for app.log's truncation, forever with no refresh interval."""
    state = TailerModel()
    try:
        state.begin(interval=NEVER)
        state.write(count=1, max_pad=1000)
        state.read(ack="now", rnd=random.Random(0))
        state.checkpoint()
        state.rotate(create=False, to=ROTATED)
        state.close_idle()
        state.write(count=2, max_pad=0)
        state.rotate(create=False, to=ROTATED_IN_GLOB)
    finally:
        state.teardown()  # the model's final check: every line delivered, none read again
