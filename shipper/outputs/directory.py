"""The directory output: a local archive with the same key layout as the S3 output.

Objects are built by :class:`ObjectBuilder` right under the archive (``{path}/.tmp/``)
and linked to their keys once fsynced; their batches are confirmed only then, so the
checkpoints of the files they came from never run ahead of what is on disk.
"""

from __future__ import annotations

import logging

from shipper.config import Option
from shipper.outputs.base import Output
from shipper.outputs.keys import DEFAULT_KEY, check_template
from shipper.outputs.objects import FinishedObject, ObjectBuilder, ObjectLayout

log = logging.getLogger(__name__)

COMPRESSIONS = ("gzip", "zstd", "none")

OPTIONS = {
    "path": Option("str"),
    "key": Option("str", DEFAULT_KEY, check=check_template),
    "compression": Option("choice", "gzip", choices=COMPRESSIONS),
    "compression_level": Option("int", 1, minimum=1),
    "upload_interval": Option("duration", 60.0, minimum=0.01),
    "max_object_bytes": Option("size", 64 * 1024**2, minimum=1024),
}


def validate(settings) -> list[str]:
    return check_compression_level(settings)


def check_compression_level(settings) -> list[str]:
    highest = 22 if settings.get("compression") == "zstd" else 9
    if settings.get("compression_level", 1) > highest:
        return [f"{settings.where}.compression_level: must be between 1 and {highest} "
                f"for {settings.get('compression')}"]
    return []


def layout_of(settings, key: str | None = None, prefix: str = "") -> ObjectLayout:
    return ObjectLayout(key or settings.key, settings.compression, settings.compression_level,
                        settings.upload_interval, settings.max_object_bytes, prefix)


class DirectoryOutput(Output):
    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.builder = ObjectBuilder(context.name, settings.path, layout_of(settings), context.envelope,
                                     self._written, stats=context.stats)

    def accept(self, batch) -> None:
        self.builder.accept(batch)

    def deliver(self, now: float, force: bool) -> None:
        self.builder.finish_due(force)

    def _written(self, obj: FinishedObject) -> None:
        for ack in obj.acks:
            ack.confirm()
        stats, name = self.context.stats, self.context.name
        stats.add("objects_written", 1, output=name)
        stats.add("records_out", obj.records, output=name)
        stats.add("bytes_out", obj.size, output=name)
        log.debug("wrote %s (%d records, %d bytes)", obj.path, obj.records, obj.size)

    def pending(self) -> int:
        return self.builder.pending()

    def next_due(self) -> float | None:
        return self.builder.next_due()

    def hurry(self) -> None:
        self.builder.finish_due(force=True)

    def buffered_bytes(self) -> int:
        return sum(o.size for o in list(self.builder.objects.values()))

    def close(self) -> None:
        self.builder.close()


OUTPUT = DirectoryOutput
