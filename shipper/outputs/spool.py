"""The disk spool of an uploading output: finished objects wait here until they are uploaded.

``data_dir/spool/<output name>/`` holds objects being built (``.tmp/``, see ObjectBuilder),
finished objects under their final key, and ``.seq``, the object numbers handed out. A
finished object's batches are confirmed (their files' checkpoints move) once it is durable
here; it is removed only after the destination took it. An agent that is killed, or a
destination that is down, leaves objects here, and the next start uploads them first,
under the same key, so a repeated upload replaces rather than duplicates.
"""

from __future__ import annotations

import logging
import os
from stat import S_ISREG
from dataclasses import dataclass

from shipper.durable import make_dirs, write_atomically
from shipper.outputs.objects import TMP_DIR

log = logging.getLogger(__name__)

SEQ_FILE = ".seq"
# Object numbers are reserved this many at a time, so .seq is written once per thousand objects;
# a restart skips the rest of a block, which keeps numbers unique across runs.
SEQ_BLOCK = 1000


@dataclass
class SpooledObject:
    path: str
    key: str
    size: int
    records: int = 0      # unknown (0) for objects left over from an earlier run
    attempts: int = 0
    next_try: float = 0.0  # monotonic time before which it is not retried


class Spool:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        make_dirs(self.root)
        self._seq_path = os.path.join(self.root, SEQ_FILE)
        self._next = self._read_seq()
        self._reserved = self._next

    def _read_seq(self) -> int:
        try:
            with open(self._seq_path, "rb") as handle:
                return max(1, int(handle.read().strip() or b"1"))
        except FileNotFoundError:
            return 1
        except ValueError:  # damaged: numbers restart, and the no-clobber link skips taken keys
            log.warning("%s is damaged; object numbers start again at 1", self._seq_path)
            return 1

    def next_seq(self) -> int:
        if self._next >= self._reserved:
            data = str(self._next + SEQ_BLOCK).encode()
            try:
                write_atomically(self._seq_path, data)
            except FileNotFoundError:  # the spool was removed under us (rm -rf of data_dir): make it again
                make_dirs(self.root)
                write_atomically(self._seq_path, data)
            self._reserved = self._next + SEQ_BLOCK
        seq = self._next
        self._next += 1
        return seq

    def leftovers(self) -> list[SpooledObject]:
        """Finished objects an earlier run did not upload, oldest first."""
        found = []
        for directory, subdirs, files in os.walk(self.root):
            if directory == self.root:
                subdirs[:] = [d for d in subdirs if d != TMP_DIR]
            for name in files:
                path = os.path.join(directory, name)
                if directory == self.root and name.startswith(SEQ_FILE):
                    continue
                try:
                    stat = os.lstat(path)
                except FileNotFoundError:
                    continue
                if not S_ISREG(stat.st_mode):  # a symlink (planted?) or a special file: never uploaded
                    log.warning("%s in the spool is not a regular file; left alone, not uploaded", path)
                    continue
                found.append((stat.st_mtime, SpooledObject(path, os.path.relpath(path, self.root), stat.st_size)))
        return [obj for _, obj in sorted(found, key=lambda item: item[0])]

    def remove(self, obj: SpooledObject) -> None:
        """Delete an uploaded object, and the directories it leaves empty."""
        try:
            os.unlink(obj.path)
        except FileNotFoundError:
            pass
        directory = os.path.dirname(obj.path)
        while directory != self.root and directory.startswith(self.root):
            try:
                os.rmdir(directory)
            except OSError:  # not empty (or gone): stop climbing
                break
            directory = os.path.dirname(directory)
