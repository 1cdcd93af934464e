"""Building archive objects: batches become one compressed NDJSON file per tag and hour.

Shared by the directory output (objects are built beside the archive) and the S3 output
(objects are built in its spool under data_dir, then uploaded). Each object is written to
``{root}/.tmp/`` while it grows, then fsynced and linked to its final key under ``root``
without ever replacing an existing file, and the temporary name removed: whoever looks at
``root`` sees whole objects or nothing. ``on_finished`` is told about each object once it
is durable there; until then its batches are not confirmed.

The storage may be taken away under us (a cleanup job empties ``.tmp/``, someone runs
``rm -rf`` on the data dir). The object's descriptor still holds its bytes, so an object
whose temporary name vanished (or now names another file) is copied from the descriptor to a
new temporary file, in directories made again, and finished as usual: nothing is lost and
nothing is retried forever. Only an object whose bytes are gone too (the file was truncated)
is lost: it is dropped and counted, and its batches stay unconfirmed, so the checkpoints of
their files stay before them and the records are read again at the next start.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from shipper.durable import FILE_MODE, create_new, fsync_dir, make_dirs
from shipper.errors import RetryableError
from shipper.outputs.compression import GzipStream, PlainStream, ZstdStream
from shipper.outputs.keys import key_values, partition_of, render_key
from shipper.record import Batch, Envelope
from shipper.stats import Stats

log = logging.getLogger(__name__)

TMP_DIR = ".tmp"
# Batches being compressed at once per object: enough to keep every core busy, and a bound on memory.
IN_FLIGHT_BLOCKS = 4
# Read and write (never through a symlink, never an existing file): read so that an object whose
# name vanished can be copied back from its descriptor.
TMP_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Names tried before giving up when every candidate is taken (planted files, leftovers).
TMP_NAME_TRIES = 100
COPY_BLOCK = 1 << 20


# The most time a record is credited for having waited before it reached the builder (see accept).
WAIT_CREDIT = 5.0


@dataclass
class OpenObject:
    tag: str
    hour: int
    first_time: float
    tmp_path: str  # named at the first write (a new name if the old one vanished)
    stream: GzipStream | ZstdStream | PlainStream
    fd: int | None = None  # opened at the first write, where a failure can be retried
    due: float = float("inf")  # monotonic: when it is finished (see ObjectBuilder.accept)
    unwritten: bytearray = field(default_factory=bytearray)  # compressed, not yet in the file
    size: int = 0            # compressed bytes finished so far
    acks: list = field(default_factory=list)  # only the acknowledgements: the data is in the file
    records: int = 0
    final: str | None = None  # set once linked, so a retried finish never links twice


@dataclass
class FinishedObject:
    path: str      # where the object lies now
    key: str       # its key relative to the root: the S3 key, the archive path
    records: int
    size: int
    acks: list


@dataclass
class ObjectLayout:
    """What an object's name and bytes look like: the output's settings."""

    key: str
    compression: str
    compression_level: int
    upload_interval: float
    max_object_bytes: int
    prefix: str = ""


class ObjectLost(Exception):
    """The object's bytes are gone (its file was truncated or damaged by someone else)."""


class ObjectBuilder:
    def __init__(self, name: str, root: str, layout: ObjectLayout, envelope: Envelope,
                 on_finished: Callable[[FinishedObject], None], next_seq: Callable[[], int] | None = None,
                 stats: Stats | None = None):
        self.name = name
        self.stats = stats if stats is not None else Stats()
        self.root = os.path.abspath(root)
        self.tmp_dir = os.path.join(self.root, TMP_DIR)
        self.layout = layout
        self.envelope = envelope
        self.on_finished = on_finished
        self.next_seq = next_seq or itertools.count(1).__next__
        self.objects: dict[tuple[str, int], OpenObject] = {}
        self.closing: list[OpenObject] = []  # due, but finishing failed (disk full): retried
        self.tmp_names = itertools.count(1)
        self.pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 2),
                                       thread_name_prefix=f"{name}-compress")
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Objects an earlier run did not finish were never confirmed: their records will be read again."""
        prefix = f"{self.name}-"
        try:
            names = os.listdir(self.tmp_dir)
        except FileNotFoundError:
            return
        except OSError as exc:  # not fatal here: writing will fail, be retried and be reported
            log.warning("%s: cannot look into %s: %s", self.name, self.tmp_dir, exc)
            return
        for name in names:
            if name.startswith(prefix) and name.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(self.tmp_dir, name))
                except OSError as exc:
                    log.warning("%s: cannot remove unfinished object %s: %s", self.name, name, exc)
                    continue
                log.info("removed unfinished object %s from an earlier run (its records are re-read)", name)

    # ------------------------------------------------------------ accepting

    def accept(self, batch: Batch) -> None:
        data = batch.ndjson(self.envelope)
        key = (batch.tag, partition_of(batch.read_time))
        obj = self.objects.get(key)
        if obj is None:
            obj = self.objects[key] = self._open(batch.tag, key[1], batch.read_time)
        # Due upload_interval after its oldest record was read, not after it reached this output: the
        # wait for the runner's flush tick is part of the interval, not added to it. Credited up to
        # WAIT_CREDIT s only: a record's read_time is a wall clock, and clocks jump.
        waited = min(max(0.0, time.time() - batch.read_time), WAIT_CREDIT, self.layout.upload_interval)
        obj.due = min(obj.due, time.monotonic() + self.layout.upload_interval - waited)
        obj.stream.add(data)
        self._collect(obj, keep=IN_FLIGHT_BLOCKS)
        obj.acks.append(batch.ack)
        obj.records += batch.count

    def _open(self, tag: str, hour: int, first_time: float) -> OpenObject:
        layout = self.layout
        if layout.compression == "gzip":
            stream = GzipStream(layout.compression_level, self.pool)
        elif layout.compression == "zstd":
            stream = ZstdStream(layout.compression_level)
        else:
            stream = PlainStream()
        return OpenObject(tag, hour, first_time, "", stream)

    def _create_tmp(self) -> tuple[str, int]:
        """A new temporary file under ``.tmp/`` (made again if it was removed): (path, descriptor)."""
        make_dirs(self.tmp_dir)
        for _ in range(TMP_NAME_TRIES):
            path = os.path.join(self.tmp_dir, f"{self.name}-{os.getpid()}-{next(self.tmp_names)}.tmp")
            try:
                return path, create_new(path, TMP_FLAGS, FILE_MODE)
            except FileExistsError:
                continue  # taken (planted, or left by a process that had our pid): the next number
        raise FileExistsError(f"{TMP_NAME_TRIES} temporary names in a row are taken in {self.tmp_dir}")

    def _collect(self, obj: OpenObject, keep: int | None) -> None:
        chunk = obj.stream.take(keep)
        obj.unwritten += chunk
        obj.size += len(chunk)

    # ------------------------------------------------------------ finishing

    def finish_due(self, force: bool) -> None:
        """Finish the objects that are due (``force``: all); write out the bytes of the others."""
        monotonic = time.monotonic()
        for key, obj in list(self.objects.items()):
            if force or obj.size >= self.layout.max_object_bytes or monotonic >= obj.due:
                del self.objects[key]
                obj.stream.finish()
                self._collect(obj, keep=0)
                self.closing.append(obj)
            else:
                self._collect(obj, keep=None)
                self._write_out(obj)
        while self.closing:
            self._finish(self.closing[0])
            self.closing.pop(0)

    def next_due(self) -> float | None:
        """When the first open object is due (monotonic), None when none is open."""
        return min((obj.due for obj in self.objects.values()), default=None)

    def _write_out(self, obj: OpenObject) -> None:
        """Move compressed bytes to the file; on failure they stay in memory for the next try."""
        try:
            if obj.fd is None:
                obj.tmp_path, obj.fd = self._create_tmp()
            while obj.unwritten:
                del obj.unwritten[:os.write(obj.fd, obj.unwritten)]
        except OSError as exc:
            raise RetryableError(f"{self.name}: cannot write {obj.tmp_path or self.tmp_dir}: "
                                 f"{exc.strerror or exc}") from exc

    def _finish(self, obj: OpenObject) -> None:
        try:
            # Checked before writing the rest: a write past a truncation would hide it behind a hole.
            if obj.fd is not None and (size := os.fstat(obj.fd).st_size) != obj.size - len(obj.unwritten):
                raise ObjectLost(f"its file holds {size} bytes instead of {obj.size - len(obj.unwritten)}")
        except ObjectLost as exc:
            self._lose(obj, str(exc))
            return
        self._write_out(obj)
        try:
            os.fsync(obj.fd)
            if obj.final is None or not _holds(obj.final, obj.fd):
                if not _holds(obj.tmp_path, obj.fd):
                    self._rebuild(obj)
                obj.final = self._link(obj)
            if _holds(obj.tmp_path, obj.fd):
                os.unlink(obj.tmp_path)
            fsync_dir(os.path.dirname(obj.final))
            try:
                fsync_dir(self.tmp_dir)  # makes the unlink durable; nothing to do if .tmp/ is gone
            except FileNotFoundError:
                pass
        except ObjectLost as exc:
            self._lose(obj, str(exc))
            return
        except OSError as exc:
            raise RetryableError(f"{self.name}: cannot finish object {obj.tmp_path}: {exc}") from exc
        os.close(obj.fd)
        obj.fd = None
        self.on_finished(FinishedObject(obj.final, os.path.relpath(obj.final, self.root),
                                        obj.records, obj.size, obj.acks))

    def _rebuild(self, obj: OpenObject) -> None:
        """The temporary name vanished (or names another file now): copy the object from its descriptor."""
        path, fd = self._create_tmp()
        try:
            copied = 0
            while block := os.pread(obj.fd, COPY_BLOCK, copied):
                view = memoryview(block)
                while view:
                    view = view[os.write(fd, view):]
                copied += len(block)
            if copied != obj.size:
                raise ObjectLost(f"only {copied} of its {obj.size} bytes could be read back")
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass  # removed at the next start, as any unfinished object
            raise
        log.warning("%s: the temporary object %s vanished (removed by someone else?); written again from "
                    "what the agent still held as %s", self.name, obj.tmp_path, path)
        self.stats.add("objects_rebuilt", 1, output=self.name)
        os.close(obj.fd)
        obj.tmp_path, obj.fd, obj.final = path, fd, None

    def _lose(self, obj: OpenObject, why: str) -> None:
        """Give up an object whose bytes are gone: its batches stay unconfirmed (read again at the next start)."""
        log.error("%s: object %s is lost (%s); its %d records are not confirmed, so their files' checkpoints "
                  "stay before them and they are read again when the agent restarts", self.name, obj.tmp_path,
                  why, obj.records)
        self.stats.add("objects_lost", 1, output=self.name)
        self.stats.add("records_unconfirmed", obj.records, output=self.name, reason="object_lost")
        try:
            if _holds(obj.tmp_path, obj.fd):
                os.unlink(obj.tmp_path)
        except OSError:
            pass  # removed at the next start, as any unfinished object
        os.close(obj.fd)
        obj.fd = None

    def _link(self, obj: OpenObject) -> str:
        """Give the object its final key without ever replacing an existing object."""
        layout = self.layout
        while True:
            values = key_values(obj.first_time, obj.tag, self.envelope.identity, self.next_seq(),
                                layout.compression, layout.prefix)
            final = os.path.join(self.root, render_key(layout.key, values, self.envelope.labels))
            make_dirs(os.path.dirname(final))
            try:
                os.link(obj.tmp_path, final)
            except FileExistsError:
                continue
            if not _holds(final, obj.fd):  # the name was swapped between the check and the link
                os.unlink(final)
                raise OSError(f"{obj.tmp_path} was replaced by another file; the object is written again")
            return final

    def pending(self) -> int:
        """Batches accepted but not yet in a finished object."""
        return sum(len(o.acks) for o in list(self.objects.values()) + self.closing)

    def close(self) -> None:
        for obj in list(self.objects.values()) + self.closing:
            if obj.fd is not None:
                os.close(obj.fd)  # unfinished: removed on the next start, its records re-read then
        self.pool.shutdown(wait=False, cancel_futures=True)


def _holds(path: str, fd: int) -> bool:
    """Whether ``path`` is the very file open as ``fd`` (not gone, not replaced, not a symlink)."""
    if not path:
        return False
    try:
        there = os.lstat(path)
    except FileNotFoundError:
        return False
    ours = os.fstat(fd)
    return (there.st_dev, there.st_ino) == (ours.st_dev, ours.st_ino)
