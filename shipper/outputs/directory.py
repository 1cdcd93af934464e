"""The directory output: a local archive with the same key layout as the S3 output.

Each object is built in ``{path}/.tmp/``, compressed as one stream, fsynced, then linked
to its final key (never replacing an existing one) and the temporary name removed: a
reader sees whole objects or nothing. Its batches are confirmed only then, so the
checkpoints of the files they came from never run ahead of what is on disk.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from shipper.config import Option
from shipper.errors import RetryableError
from shipper.outputs.base import Output
from shipper.outputs.compression import GzipStream, PlainStream
from shipper.outputs.keys import DEFAULT_KEY, check_template, key_values, partition_of, render_key
from shipper.record import Batch

log = logging.getLogger(__name__)

OPTIONS = {
    "path": Option("str"),
    "key": Option("str", DEFAULT_KEY, check=check_template),
    "compression": Option("choice", "gzip", choices=("gzip", "none")),
    "compression_level": Option("int", 1, minimum=1),
    "upload_interval": Option("duration", 60.0, minimum=0.01),
    "max_object_bytes": Option("size", 64 * 1024**2, minimum=1024),
}

TMP_DIR = ".tmp"
# Batches being compressed at once per object: enough to keep every core busy, and a bound on memory.
IN_FLIGHT_BLOCKS = 4


def validate(settings) -> list[str]:
    if settings.get("compression_level", 1) > 9:
        return [f"{settings.where}.compression_level: must be between 1 and 9"]
    return []


@dataclass
class OpenObject:
    tag: str
    hour: int
    first_time: float
    tmp_path: str
    stream: GzipStream | PlainStream
    fd: int | None = None  # opened at the first write, where a failure can be retried
    opened: float = field(default_factory=time.monotonic)
    unwritten: bytearray = field(default_factory=bytearray)  # compressed, not yet in the file
    size: int = 0            # compressed bytes finished so far
    acks: list = field(default_factory=list)  # only the acknowledgements: the data is in the file
    records: int = 0
    final: str | None = None  # set once linked, so a retried finish never links twice


class DirectoryOutput(Output):
    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.root = os.path.abspath(settings.path)
        self.tmp_dir = os.path.join(self.root, TMP_DIR)
        self.objects: dict[tuple[str, int], OpenObject] = {}
        self.closing: list[OpenObject] = []  # due, but closing failed (disk full): retried
        self.seq = 0
        self.pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 2),
                                       thread_name_prefix=f"{context.name}-gzip")
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Objects an earlier run did not finish were never confirmed: their records will be read again."""
        prefix = f"{self.context.name}-"
        try:
            names = os.listdir(self.tmp_dir)
        except FileNotFoundError:
            return
        except OSError as exc:  # not fatal here: writing will fail, be retried and be reported
            log.warning("%s: cannot look into %s: %s", self.context.name, self.tmp_dir, exc)
            return
        for name in names:
            if name.startswith(prefix) and name.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(self.tmp_dir, name))
                except OSError as exc:
                    log.warning("%s: cannot remove unfinished object %s: %s", self.context.name, name, exc)
                    continue
                log.info("removed unfinished object %s from an earlier run (its records are re-read)", name)

    # ------------------------------------------------------------ accepting

    def accept(self, batch: Batch) -> None:
        data = batch.ndjson(self.context.envelope)
        key = (batch.tag, partition_of(batch.read_time))
        obj = self.objects.get(key)
        if obj is None:
            obj = self.objects[key] = self._open(batch.tag, key[1], batch.read_time)
        obj.stream.add(data)
        self._collect(obj, keep=IN_FLIGHT_BLOCKS)
        obj.acks.append(batch.ack)
        obj.records += batch.count

    def _open(self, tag: str, hour: int, first_time: float) -> OpenObject:
        self.seq += 1
        tmp_path = os.path.join(self.tmp_dir, f"{self.context.name}-{os.getpid()}-{self.seq}.tmp")
        if self.settings.compression == "gzip":
            stream = GzipStream(self.settings.compression_level, self.pool)
        else:
            stream = PlainStream()
        return OpenObject(tag, hour, first_time, tmp_path, stream)

    def _collect(self, obj: OpenObject, keep: int | None) -> None:
        chunk = obj.stream.take(keep)
        obj.unwritten += chunk
        obj.size += len(chunk)

    # ------------------------------------------------------------ delivering

    def deliver(self, now: float, force: bool) -> None:
        monotonic = time.monotonic()
        for key, obj in list(self.objects.items()):
            if force or obj.size >= self.settings.max_object_bytes or \
                    monotonic - obj.opened >= self.settings.upload_interval:
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
                raise RetryableError(f"{self.context.name}: cannot write {obj.tmp_path}: {exc.strerror}") from exc
            del obj.unwritten[:written]

    def _finish(self, obj: OpenObject) -> None:
        self._write_out(obj)
        try:
            os.fsync(obj.fd)
            if obj.final is None:
                obj.final = self._link(obj)
            if os.path.exists(obj.tmp_path):
                os.unlink(obj.tmp_path)
            _fsync_dir(os.path.dirname(obj.final))
            _fsync_dir(self.tmp_dir)
        except OSError as exc:
            raise RetryableError(f"{self.context.name}: cannot finish object {obj.tmp_path}: {exc}") from exc
        os.close(obj.fd)
        obj.fd = None
        for ack in obj.acks:
            ack.confirm()
        self.context.stats.add("objects_written", 1, output=self.context.name)
        self.context.stats.add("records_out", obj.records, output=self.context.name)
        self.context.stats.add("bytes_out", obj.size, output=self.context.name)
        log.debug("wrote %s (%d records, %d bytes)", obj.final, obj.records, obj.size)

    def _link(self, obj: OpenObject) -> str:
        """Give the object its final key without ever replacing an existing object."""
        envelope = self.context.envelope
        while True:
            self.seq += 1
            values = key_values(obj.first_time, obj.tag, envelope.identity, self.seq, self.settings.compression)
            final = os.path.join(self.root, render_key(self.settings.key, values, envelope.labels))
            os.makedirs(os.path.dirname(final), exist_ok=True)
            try:
                os.link(obj.tmp_path, final)
                return final
            except FileExistsError:
                continue

    def pending(self) -> int:
        return sum(len(o.acks) for o in list(self.objects.values()) + self.closing)

    def close(self) -> None:
        for obj in list(self.objects.values()) + self.closing:
            if obj.fd is not None:
                os.close(obj.fd)  # unfinished: removed on the next start, its records re-read then
        self.pool.shutdown(wait=False, cancel_futures=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


OUTPUT = DirectoryOutput
