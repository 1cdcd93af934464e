"""File checkpoints: where each tailed file was confirmed up to, persisted atomically.

A file is known by (device, inode) plus a fingerprint of its first bytes, so that a new
file that happens to get a recycled inode is not mistaken for the old one.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from dataclasses import asdict, dataclass

import orjson

from shipper.durable import make_dirs, write_atomically

log = logging.getLogger(__name__)

FINGERPRINT_BYTES = 1024


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
    """Says "due" at most once per ``interval`` seconds: when an input writes its checkpoints."""

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


def fingerprint_matches(fd: int, checkpoint: Checkpoint) -> bool:
    if checkpoint.fp_len == 0:
        return True
    head = os.pread(fd, checkpoint.fp_len, 0)
    return len(head) == checkpoint.fp_len and zlib.crc32(head) == checkpoint.fp


class CheckpointStore:
    """One JSON file per input under ``data_dir/checkpoints``."""

    def __init__(self, data_dir: str, input_id: str):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in input_id)
        self.directory = os.path.join(data_dir, "checkpoints")
        self.path = os.path.join(self.directory, f"file-{safe}.json")
        self._last_saved: bytes | None = None

    def load(self) -> dict[tuple[int, int], Checkpoint]:
        try:
            with open(self.path, "rb") as handle:
                raw = orjson.loads(handle.read())
            entries = [Checkpoint(**item) for item in raw["files"]]
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError) as exc:
            # A damaged checkpoint must not stop the agent: start as if new, and say so.
            log.error("checkpoint file %s is unreadable (%s); starting without checkpoints", self.path, exc)
            return {}
        return {entry.key: entry for entry in entries}

    def save(self, entries: list[Checkpoint]) -> bool:
        """Persist ``entries``; skips the write when nothing changed. Returns True when written."""
        data = orjson.dumps({"version": 1, "files": [asdict(e) for e in sorted(entries, key=lambda e: e.path)]},
                            option=orjson.OPT_INDENT_2)
        if data == self._last_saved:
            return False
        make_dirs(self.directory)  # 0750 whatever the umask; made again if data_dir was removed
        write_atomically(self.path, data)
        self._last_saved = data
        return True
