"""Reading one file: big chunks, cut at the last newline, long lines split, rotation decided.

Everything here works on bytes; nothing makes a Python object per line. A read returns
*blocks*: ``LINES`` (many complete lines, each ending in a newline), ``LINE`` (one line
that never got its newline, shipped after a timeout) and ``PART`` (a piece of a line
longer than ``max_line_bytes``; every piece of such a line is flagged truncated).
"""

from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass, field

from shipper.acks import OffsetTracker
from shipper.nofollow import kind_of, open_below
from shipper.inputs.checkpoints import FINGERPRINT_BYTES, Checkpoint, fingerprint

LINES, LINE, PART = "lines", "line", "part"


@dataclass
class Read:
    start: int            # file offset of the first byte these blocks consumed
    end: int              # file offset just after the last byte they consumed
    blocks: list[tuple[str, bytes, int]] = field(default_factory=list)  # (kind, data, bytes consumed)


def utf8_cut(data: bytes, limit: int) -> int:
    """The largest cut point <= limit that does not split a UTF-8 character."""
    if limit >= len(data):
        return len(data)
    cut = limit
    while cut > 0 and limit - cut < 3 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut if cut > 0 and (data[cut] & 0xC0) != 0x80 else limit


def split_part(data: bytes, limit: int) -> list[bytes]:
    """Pieces of at most ``limit`` bytes, cut on character boundaries."""
    pieces = []
    while len(data) > limit:
        cut = utf8_cut(data, limit)
        pieces.append(data[:cut])
        data = data[cut:]
    pieces.append(data)
    return pieces


def part_blocks(line: bytes, limit: int) -> list[tuple[str, bytes, int]]:
    """PART blocks for a complete over-long line; the last piece also consumed its newline."""
    pieces = split_part(line, limit)
    blocks = [(PART, piece, len(piece)) for piece in pieces]
    blocks[-1] = (PART, pieces[-1], len(pieces[-1]) + 1)
    return blocks


def split_long_lines(region: bytes, limit: int) -> list[tuple[str, bytes, int]]:
    """Blocks for a run of complete lines, with any line over ``limit`` bytes cut into parts.

    Scans in windows of ``limit`` bytes, so a chunk of short lines costs a few ``rfind`` calls.
    """
    n = len(region)
    if n <= limit + 1:
        return [(LINES, region, n)]
    blocks: list[tuple[str, bytes, int]] = []
    block_start = pos = 0
    while pos < n:
        window_end = pos + limit + 1  # a line of exactly ``limit`` bytes has its newline at pos+limit
        if window_end >= n:
            break
        newline = region.rfind(b"\n", pos, window_end)
        if newline != -1:
            pos = newline + 1
            continue
        if pos > block_start:
            blocks.append((LINES, region[block_start:pos], pos - block_start))
        line_end = region.find(b"\n", pos)
        blocks.extend(part_blocks(region[pos:line_end], limit))
        pos = block_start = line_end + 1
    if block_start < n:
        blocks.append((LINES, region[block_start:], n - block_start))
    return blocks


# ---------------------------------------------------------------- opening

class NotTailable(Exception):
    """The path is not a regular file reached without symlinks: ``reason`` is "symlink" or "not_regular"."""

    def __init__(self, path: str, reason: str, detail: str):
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.reason = reason
        self.detail = detail


_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC


def open_regular(path: str, follow_symlinks: bool = False, root: str | None = None) -> int:
    """A descriptor to read the regular file at ``path``; raises NotTailable for anything else.

    O_NONBLOCK: opening a FIFO to read would wait for a writer, forever (a FIFO renamed over a
    file between the directory scan and this open did that); on a regular file it changes
    nothing. Unless ``follow_symlinks``, no symlink is followed below ``root`` (the pattern's
    fixed directory): each directory under it is opened in turn with O_NOFOLLOW, so a directory
    swapped for a symlink after the scan cannot lead elsewhere either.
    """
    try:
        if follow_symlinks:
            fd = os.open(path, _OPEN_FLAGS)
        else:
            fd = _open_below(path, root)
    except OSError as exc:
        if not follow_symlinks and exc.errno in (errno.ELOOP, errno.ENOTDIR) and _symlink_on_the_way(path, root):
            raise NotTailable(path, "symlink", "it is or goes through a symlink (follow_symlinks = false)") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotTailable(path, "not_regular", f"it is not a regular file but a {kind_of(mode)}")
    return fd


def _below(path: str, root: str | None) -> list[str] | None:
    """The names from ``root`` down to ``path``; None when path is not below root."""
    if not root:
        return None
    prefix = root if root.endswith(os.sep) else root + os.sep
    if not path.startswith(prefix):
        return None
    return [name for name in path[len(prefix):].split(os.sep) if name]


def _open_below(path: str, root: str | None) -> int:
    names = _below(path, root)
    if not names:
        return os.open(path, _OPEN_FLAGS | os.O_NOFOLLOW)
    return open_below(root, names, _OPEN_FLAGS)


def _symlink_on_the_way(path: str, root: str | None) -> bool:
    """After ELOOP or ENOTDIR: is a symlink what stopped the open (not, say, a file turned directory)?"""
    names = _below(path, root)
    base = root
    if not names:
        base, names = os.path.dirname(path), [os.path.basename(path)]
    for name in names:
        base = os.path.join(base, name)
        if os.path.islink(base):
            return True
    return False


# ---------------------------------------------------------------- rotation decisions

SAME, TRUNCATED, REPLACED, GONE = "same", "truncated", "replaced", "gone"


def classify(identity: tuple[int, int], read_offset: int, size: int, head_matches: bool,
             path_identity: tuple[int, int] | None) -> str:
    """What happened to a tailed file, from its open descriptor and what its path now holds.

    - GONE: nothing at the path any more (deleted, or renamed away): drain the descriptor.
    - REPLACED: the path holds another file (rename + create): drain, then follow the new one.
    - TRUNCATED: same file, but smaller than what we read or its first bytes changed
      (copytruncate): start again at 0.
    """
    if size < read_offset or not head_matches:
        return TRUNCATED
    if path_identity is None:
        return GONE
    if path_identity != identity:
        return REPLACED
    return SAME


class TailedFile:
    """One open file being followed, with its read position and confirmed (committed) offset."""

    def __init__(self, path: str, fd: int, offset: int, max_line_bytes: int):
        # self.fd is None while the file is dormant (see close_idle)
        st = os.fstat(fd)
        self.path = path
        self.fd = fd
        self.identity = (st.st_dev, st.st_ino)
        self.read_offset = offset   # next byte to read
        self.emit_offset = offset   # first byte not yet handed on (start of the carry)
        self.carry = b""            # bytes after the last newline
        self.in_long_line = False   # the carry continues a line already cut into parts
        self.max_line_bytes = max_line_bytes
        self.tracker = OffsetTracker(offset, owner=self)
        self.polls = 0              # times the file input looked at it (a suspect copy waits for one)
        self.fp_len, self.fp = fingerprint(fd)
        self.known_size = st.st_size  # the file's size when last looked at (reads stop there)
        self.last_data = time.monotonic()
        self.released_since: float | None = None  # when the path stopped pointing here
        self.failing = False  # the last read failed (reported once)
        self.closed = False
        # Only its unread rest is wanted (the copy of a truncated file, outside the globs): released
        # like a rotated file once drained.
        self.drain_only = False

    @classmethod
    def detached(cls, path: str, identity: tuple[int, int], offset: int, max_line_bytes: int,
                 fp_len: int, fp: int) -> "TailedFile":
        """A file known by its checkpoint only, whose bytes come from elsewhere (``take``): the
        decompressed rest of a file that was rotated and compressed unread."""
        tailed = cls.__new__(cls)
        tailed.path, tailed.fd, tailed.identity = path, None, identity
        tailed.read_offset = tailed.emit_offset = tailed.known_size = offset
        tailed.carry, tailed.in_long_line, tailed.max_line_bytes = b"", False, max_line_bytes
        tailed.tracker = OffsetTracker(offset, owner=tailed)
        tailed.fp_len, tailed.fp = fp_len, fp
        tailed.last_data, tailed.released_since = time.monotonic(), None
        tailed.failing, tailed.closed, tailed.drain_only = False, True, False
        return tailed

    def skip_to(self, offset: int) -> None:
        """Move past [read_offset, offset) without reading it (a quarantined range)."""
        self.read_offset = self.emit_offset = offset
        self.carry = b""
        self.in_long_line = False

    def read(self, chunk_size: int) -> Read | None:
        """Read up to ``chunk_size`` new bytes; None at end of file.

        Reads only what the file holds: a quiet file then costs an fstat, not a ``chunk_size``
        buffer that the allocator hands out, shrinks to the few new bytes and leaves fragmented
        (the heap grew ~0.3 MiB a minute at 10 lines/s that way).
        """
        if self.known_size <= self.read_offset:
            self.known_size = os.fstat(self.fd).st_size
            if self.known_size <= self.read_offset:
                return None
        data = os.pread(self.fd, min(chunk_size, self.known_size - self.read_offset), self.read_offset)
        if not data:  # truncated since the fstat: the rotation check finds out
            self.known_size = self.read_offset
            return None
        return self.take(data)

    def take(self, data: bytes) -> Read:
        """Frame ``data``, the file's bytes at read_offset (read here, or decompressed elsewhere)."""
        self.read_offset += len(data)
        self.last_data = time.monotonic()
        buf = self.carry + data if self.carry else data
        start = self.emit_offset
        blocks: list[tuple[str, bytes, int]] = []
        pos = 0
        if self.in_long_line:
            newline = buf.find(b"\n")
            if newline != -1:
                blocks.extend(part_blocks(buf[:newline], self.max_line_bytes))
                pos = newline + 1
                self.in_long_line = False
        if not self.in_long_line:
            last_newline = buf.rfind(b"\n", pos)
            if last_newline != -1:
                region = buf[pos:last_newline + 1] if pos or last_newline + 1 < len(buf) else buf
                blocks.extend(split_long_lines(region, self.max_line_bytes))
                pos = last_newline + 1
        carry = buf[pos:] if pos else buf
        while len(carry) > self.max_line_bytes:
            cut = utf8_cut(carry, self.max_line_bytes)
            blocks.append((PART, carry[:cut], cut))
            carry = carry[cut:]
            self.in_long_line = True
        self.carry = carry
        self.emit_offset = self.read_offset - len(carry)
        return Read(start, self.emit_offset, blocks)

    def flush_carry(self) -> Read | None:
        """Hand on the bytes after the last newline (the line never got its newline)."""
        if not self.carry:
            return None
        kind = PART if self.in_long_line else LINE
        read = Read(self.emit_offset, self.read_offset, [(kind, self.carry, len(self.carry))])
        self.carry = b""
        self.in_long_line = False
        self.emit_offset = self.read_offset
        return read

    def restart(self, tracker: OffsetTracker | None = None) -> None:
        """The file was truncated (copytruncate): read it again from the start. ``tracker``: a new one
        (the old one went with the copy that holds the old content), else the old one is reset."""
        self.read_offset = self.emit_offset = 0
        self.known_size = 0
        self.carry = b""
        self.in_long_line = False
        if tracker is None:
            self.tracker.reset(0)
        else:
            self.tracker = tracker
        self.fp_len, self.fp = fingerprint(self.fd)

    def head_matches(self) -> bool:
        """Are the first bytes still the ones we fingerprinted? (Not when copytruncate refilled it.)"""
        current_len, current = fingerprint(self.fd, self.fp_len)
        if current_len != self.fp_len or current != self.fp:
            return False
        if self.fp_len < FINGERPRINT_BYTES:
            self.fp_len, self.fp = fingerprint(self.fd)  # it grew: fingerprint more of it
        return True

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.path, self.identity[0], self.identity[1], self.tracker.committed,
                          self.fp_len, self.fp)

    # A file idle for close_inactive, or closed to make room under max_open_files, is *dormant*: its
    # descriptor is closed, everything else (offsets, fingerprint, acknowledgements) stays.

    @property
    def dormant(self) -> bool:
        return self.fd is None and not self.closed

    @property
    def closable(self) -> bool:
        """Nothing of it is held: read to the size last seen, no partial line. (The caller checks the
        multi-line event its builder may hold.)"""
        return self.fd is not None and not self.carry and self.read_offset >= self.known_size

    def close_idle(self) -> None:
        """Close the descriptor; ``reopen`` takes the file up again where it was."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def reopen(self, fd: int) -> None:
        self.fd = fd
        self.known_size = self.read_offset  # the next read asks fstat

    def close(self) -> None:
        if not self.closed:
            if self.fd is not None:
                os.close(self.fd)
            self.closed = True
