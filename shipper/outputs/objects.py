"""Building archive objects: batches become one compressed NDJSON file per tag and hour.

Shared by the directory output (objects are built beside the archive) and the S3 output
(objects are built in its spool under data_dir, then uploaded). Each object is written to
``{root}/.tmp/`` while it grows, then fsynced and linked to its final key under ``root``
without ever replacing an existing file, and the temporary name removed: whoever looks at
``root`` sees whole objects or nothing. ``on_finished`` is told about each object once it
is durable there; until then its batches are not confirmed.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from shipper.durable import fsync_dir
from shipper.errors import RetryableError
from shipper.outputs.compression import GzipStream, PlainStream, ZstdStream
from shipper.outputs.keys import key_values, partition_of, render_key
from shipper.record import Batch, Envelope

log = logging.getLogger(__name__)

TMP_DIR = ".tmp"
# Batches being compressed at once per object: enough to keep every core busy, and a bound on memory.
IN_FLIGHT_BLOCKS = 4


@dataclass
class OpenObject:
    tag: str
    hour: int
    first_time: float
    tmp_path: str
    stream: GzipStream | ZstdStream | PlainStream
    fd: int | None = None  # opened at the first write, where a failure can be retried
    opened: float = field(default_factory=time.monotonic)
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


class ObjectBuilder:
    def __init__(self, name: str, root: str, layout: ObjectLayout, envelope: Envelope,
                 on_finished: Callable[[FinishedObject], None], next_seq: Callable[[], int] | None = None):
        self.name = name
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
        obj.stream.add(data)
        self._collect(obj, keep=IN_FLIGHT_BLOCKS)
        obj.acks.append(batch.ack)
        obj.records += batch.count

    def _open(self, tag: str, hour: int, first_time: float) -> OpenObject:
        tmp_path = os.path.join(self.tmp_dir, f"{self.name}-{os.getpid()}-{next(self.tmp_names)}.tmp")
        layout = self.layout
        if layout.compression == "gzip":
            stream = GzipStream(layout.compression_level, self.pool)
        elif layout.compression == "zstd":
            stream = ZstdStream(layout.compression_level)
        else:
            stream = PlainStream()
        return OpenObject(tag, hour, first_time, tmp_path, stream)

    def _collect(self, obj: OpenObject, keep: int | None) -> None:
        chunk = obj.stream.take(keep)
        obj.unwritten += chunk
        obj.size += len(chunk)

    # ------------------------------------------------------------ finishing

    def finish_due(self, force: bool) -> None:
        """Finish the objects that are due (``force``: all); write out the bytes of the others."""
        monotonic = time.monotonic()
        for key, obj in list(self.objects.items()):
            if force or obj.size >= self.layout.max_object_bytes or \
                    monotonic - obj.opened >= self.layout.upload_interval:
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

    def _write_out(self, obj: OpenObject) -> None:
        """Move compressed bytes to the file; on failure they stay in memory for the next try."""
        while obj.unwritten:
            try:
                if obj.fd is None:
                    os.makedirs(self.tmp_dir, exist_ok=True)
                    obj.fd = os.open(obj.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
                written = os.write(obj.fd, obj.unwritten)
            except OSError as exc:
                raise RetryableError(f"{self.name}: cannot write {obj.tmp_path}: {exc.strerror}") from exc
            del obj.unwritten[:written]

    def _finish(self, obj: OpenObject) -> None:
        self._write_out(obj)
        try:
            os.fsync(obj.fd)
            if obj.final is None:
                obj.final = self._link(obj)
            if os.path.exists(obj.tmp_path):
                os.unlink(obj.tmp_path)
            fsync_dir(os.path.dirname(obj.final))
            fsync_dir(self.tmp_dir)
        except OSError as exc:
            raise RetryableError(f"{self.name}: cannot finish object {obj.tmp_path}: {exc}") from exc
        os.close(obj.fd)
        obj.fd = None
        self.on_finished(FinishedObject(obj.final, os.path.relpath(obj.final, self.root),
                                        obj.records, obj.size, obj.acks))

    def _link(self, obj: OpenObject) -> str:
        """Give the object its final key without ever replacing an existing object."""
        layout = self.layout
        while True:
            values = key_values(obj.first_time, obj.tag, self.envelope.identity, self.next_seq(),
                                layout.compression, layout.prefix)
            final = os.path.join(self.root, render_key(layout.key, values, self.envelope.labels))
            os.makedirs(os.path.dirname(final), exist_ok=True)
            try:
                os.link(obj.tmp_path, final)
                return final
            except FileExistsError:
                continue

    def pending(self) -> int:
        """Batches accepted but not yet in a finished object."""
        return sum(len(o.acks) for o in list(self.objects.values()) + self.closing)

    def close(self) -> None:
        for obj in list(self.objects.values()) + self.closing:
            if obj.fd is not None:
                os.close(obj.fd)  # unfinished: removed on the next start, its records re-read then
        self.pool.shutdown(wait=False, cancel_futures=True)
