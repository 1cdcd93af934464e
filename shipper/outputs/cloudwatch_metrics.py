"""The CloudWatch Metrics output: metrics samples as PutMetricData calls.

Each sample of the metrics input becomes datums (see metric_data); calls are cut at 1,000
datums and about 1 MB, and sent one after another (a few a minute). A batch is confirmed
once all its datums were accepted. Throttling, 5xx and connection errors are retried; a
call the service refuses for its content is dropped with the reason, once, so it cannot
block the metrics behind it. Records that are not metrics samples are not for this output:
they are counted and confirmed.
"""

from __future__ import annotations

import logging
from collections import deque

from shipper.config import Option
from shipper.errors import RetryableError
from shipper.outputs import aws
from shipper.outputs.base import Output
from shipper.outputs.log_events import Tally, timestamp_ms
from shipper.outputs.metric_data import (
    DEFAULT_DIMENSIONS, MAX_DATUMS, base_dimensions, check_dimensions, check_namespace, datums, requests,
)
from shipper.record import METRICS, TIME, Batch

log = logging.getLogger(__name__)

def check_resolution(value: int) -> str | None:
    return None if value in (1, 60) else "must be 1 (high resolution) or 60"


OPTIONS = {
    "namespace": Option("str", "Shipper", check=check_namespace),
    "dimensions": Option("strlist", DEFAULT_DIMENSIONS, check=check_dimensions),
    "label_dimensions": Option("bool", True),   # every agent label is a dimension too
    "include": Option("strlist", []),           # metric name patterns (fnmatch); empty: all
    "exclude": Option("strlist", []),
    "storage_resolution": Option("int", 60, check=check_resolution),
    **aws.AWS_OPTIONS,
}


def probe(settings, identity: dict[str, str]) -> list[str]:
    client = aws.make_client("cloudwatch", settings, identity, attempts=1, connections=1)
    try:
        client.list_metrics(Namespace=settings.namespace)
    except Exception as exc:  # every failure is an answer here
        return [f"{settings.where}: cannot use CloudWatch Metrics: {aws.describe(exc)}"]
    return []


class CloudWatchMetricsOutput(Output):
    encoding = None

    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.client = aws.make_client("cloudwatch", settings, context.envelope.identity, attempts=1, connections=2,
                                      validate=False)
        self.dimensions = base_dimensions(settings.dimensions, context.envelope.identity, context.envelope.labels,
                                          settings.label_dimensions)
        self.pending_datums: deque[tuple[dict, Tally]] = deque()
        self.open_batches = 0

    def accept(self, batch: Batch) -> None:
        tally = Tally(batch.ack, 0)
        self.open_batches += 1
        read_ms = int(batch.read_time * 1000)
        for extra in batch.fields or ():
            sample = (extra or {}).get(METRICS)
            if sample is None:
                self.context.stats.add("records_not_metrics", 1, output=self.context.name)
                continue
            when = timestamp_ms(extra.get(TIME), read_ms) / 1000.0
            made, dropped = datums(sample, when, self.dimensions, self.settings.include, self.settings.exclude,
                                   self.settings.storage_resolution)
            if dropped:
                self.context.stats.add("values_dropped", dropped, output=self.context.name, reason="not_finite")
            self.pending_datums.extend((datum, tally) for datum in made)
            tally.remaining += len(made)
        if tally.remaining == 0:
            self._settle(tally, 0)

    def deliver(self, now: float, force: bool) -> None:
        while self.pending_datums:
            count = min(MAX_DATUMS, len(self.pending_datums))
            call = next(requests([d for d, _ in list(self.pending_datums)[:count]]))
            try:
                self.client.put_metric_data(Namespace=self.settings.namespace, MetricData=call)
            except Exception as exc:
                if aws.is_transient(exc) or aws.error_code(exc) in ("AccessDenied", "AccessDeniedException"):
                    raise RetryableError(f"{self.context.name}: PutMetricData failed: {aws.describe(exc)}") from exc
                log.error("%s: CloudWatch refused %d metric values; dropped: %s", self.context.name, len(call),
                          aws.describe(exc))
                self.context.stats.add("values_dropped", len(call), output=self.context.name, reason="refused")
            else:
                self.context.stats.add("requests", 1, output=self.context.name)
                self.context.stats.add("values_out", len(call), output=self.context.name)
            for _ in call:
                _, tally = self.pending_datums.popleft()
                self._settle(tally, 1)

    def _settle(self, tally: Tally, count: int) -> None:
        tally.remaining -= count
        if tally.remaining <= 0:
            self.open_batches -= 1
            tally.ack.confirm()

    def pending(self) -> int:
        return self.open_batches


OUTPUT = CloudWatchMetricsOutput
