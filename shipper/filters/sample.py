"""``sample``: keep 1 record in ``rate``, like Vector's ``sample``.

```toml
[[filters]]
type = "sample"
match = ["access"]
rate = 10                # keep 1 in 10
key = "request_id"       # optional: all records with the same value are kept or dropped together
keep_level = "warn"      # never drop a record at or above this level
```

Without ``key``, every rate-th record is kept (a count that runs across batches). With ``key``, a record
is kept when crc32 of its key's value is a multiple of ``rate``: the same decision on every machine and
after every restart, so a request's records are kept or dropped together across the fleet. Records
without the key fall back to the count. Dropped records count as ``records_dropped{reason="sampled"}``.
"""

from __future__ import annotations

import threading
import zlib
from typing import Any

from shipper.config import Option, Settings
from shipper.filters import Filter, FilterContext, derived, field_value, keep_records, level_check, level_rank
from shipper.filters.level import record_level_or_rule
from shipper.record import Batch


def keyed_keep(value: Any, rate: int) -> bool:
    """Whether the records whose key is ``value`` are kept: crc32 of its text, a multiple of ``rate``."""
    text = value if isinstance(value, str) else str(value)
    return zlib.crc32(text.encode("utf-8", "surrogatepass")) % rate == 0


class SampleFilter(Filter):
    OPTIONS = {
        "rate": Option("int", minimum=1),
        "key": Option("str", None),
        "keep_level": Option("str", None, check=level_check),
    }

    @staticmethod
    def problems(settings: Settings, where: str) -> list[str]:
        if settings.key == "":
            return [f"{where}.key: a field name (request_id, source, ...) or leave it out"]
        return []

    @staticmethod
    def summary(settings: Settings) -> str:
        text = f"keep 1 in {settings.rate}"
        if settings.key:
            text += f" by {settings.key}"
        if settings.keep_level:
            text += f"; keeps level >= {settings.keep_level}"
        return text

    def __init__(self, settings: Settings, context: FilterContext):
        super().__init__(settings, context)
        self.rate = settings.rate
        self.key = settings.key
        self.keep_rank = level_rank(settings.keep_level) if settings.keep_level else None
        self._seen = 0  # records counted so far (inputs call apply from their own threads)
        self._lock = threading.Lock()

    def _phase(self, count: int) -> int:
        with self._lock:
            phase, self._seen = self._seen, (self._seen + count) % self.rate
        return phase

    def apply(self, batch: Batch) -> list[Batch]:
        if self.rate == 1 or not batch.count:
            return [batch]
        before = batch.count
        if (batch.blob is not None and batch.fields is None and self.keep_rank is None
                and (self.key is None or self.key in ("tag", "source"))):
            kept = self._sample_blob(batch)
        else:
            kept = keep_records(batch, self._decide(batch))
        self.context.dropped("sampled", before - kept.count, batch.tag)
        return [kept]

    def _sample_blob(self, batch: Batch) -> Batch:
        """Plain lines without fields: a slice with a step, or one decision for the batch (key tag/source)."""
        if self.key is not None:
            keep = keyed_keep(field_value(self.key, None, None, batch.tag, batch.source), self.rate)
            return batch if keep else derived(batch, blob=b"")
        lines = batch.blob.split(b"\n")
        lines.pop()  # the blob ends with a newline
        phase = self._phase(len(lines))
        kept = lines[(-phase) % self.rate::self.rate]
        return derived(batch, blob=b"\n".join(kept) + b"\n" if kept else b"")

    def _decide(self, batch: Batch) -> list[bool]:
        """Keep or not, per record: above keep_level always, by the key's hash, else by the count."""
        count = batch.count
        fields = batch.fields or [None] * count
        wants_messages = self.key == "message" or self.keep_rank is not None
        messages = batch.message_list() if wants_messages else [None] * count
        tag, source, rate, key, keep_rank = batch.tag, batch.source, self.rate, self.key, self.keep_rank
        decisions: list[bool | None] = []  # None: decided by the count
        unkeyed = 0
        for message, extra in zip(messages, fields):
            if keep_rank is not None:
                rank = level_rank(record_level_or_rule(message, extra))
                if rank is not None and rank >= keep_rank:
                    decisions.append(True)
                    continue
            value = field_value(key, message, extra, tag, source) if key is not None else None
            if value is None:
                decisions.append(None)
                unkeyed += 1
            else:
                decisions.append(keyed_keep(value, rate))
        phase = self._phase(unkeyed) if unkeyed else 0
        counted = 0
        for index, decision in enumerate(decisions):
            if decision is None:
                decisions[index] = (phase + counted) % rate == 0
                counted += 1
        return decisions


FILTER = SampleFilter
