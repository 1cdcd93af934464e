"""The stdout output: one JSON object per line, for debugging and for pipes."""

from __future__ import annotations

import sys

from shipper.errors import RetryableError
from shipper.outputs.base import Output
from shipper.record import Batch

OPTIONS: dict = {}


class StdoutOutput(Output):
    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.stream = sys.stdout.buffer
        self.waiting: list[Batch] = []

    def accept(self, batch: Batch) -> None:
        self.waiting.append(batch)

    def deliver(self, now: float, force: bool) -> None:
        while self.waiting:
            batch = self.waiting[0]
            try:
                self.stream.write(batch.ndjson(self.context.envelope))
                self.stream.flush()
            except OSError as exc:
                raise RetryableError(f"cannot write to stdout: {exc}") from exc
            self.waiting.pop(0)
            batch.ack.confirm()

    def pending(self) -> int:
        return len(self.waiting)


OUTPUT = StdoutOutput
