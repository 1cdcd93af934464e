"""What every output is: it accepts batches and delivers them, confirming each when it is safe.

The contract, which the runner (shipper.pipeline) relies on:

- ``accept(batch)`` takes ownership of a batch. It only buffers (in memory, or in a file
  under data_dir) and does not raise for delivery problems.
- ``deliver(now, force)`` does the I/O that is due (``force``: everything, now). When a batch
  has reached its destination or durable storage, the output calls ``batch.ack.confirm()``.
  It raises :class:`RetryableError` to be called again after a backoff (nothing accepted is
  lost), or :class:`FatalError` naming the batches that can never be delivered (counted as
  dropped with the reason, and confirmed so they do not hold the checkpoint back).
- ``pending()`` says how many accepted batches still wait for confirmation;
  ``buffered_bytes()`` and ``failing()`` tell the health server what the output holds and
  whether its background deliveries fail (both are read from another thread).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from shipper.outputs.retry import Backoff
from shipper.record import Batch, Envelope
from shipper.stats import Stats


@dataclass
class OutputContext:
    name: str            # e.g. "directory.0": used in logs and counters
    data_dir: str
    envelope: Envelope
    stats: Stats
    backoff: Backoff = Backoff()
    # Set by the runner: an output calls it when background work (an upload) finished.
    wake: Callable[[], None] = lambda: None


class Output:
    # The batch encoding the router prepares in the reading thread ("ndjson"), or None.
    encoding: str | None = "ndjson"

    def __init__(self, settings: Any, context: OutputContext):
        self.settings = settings
        self.context = context

    def accept(self, batch: Batch) -> None:
        raise NotImplementedError

    def deliver(self, now: float, force: bool) -> None:
        raise NotImplementedError

    def pending(self) -> int:
        return 0

    def next_due(self) -> float | None:
        """When (monotonic) something held becomes due between flush ticks, e.g. an object whose
        upload_interval ends: the runner delivers then. None: at the flush ticks."""
        return None

    def hurry(self) -> None:
        """The instance is going away: make what is held due now (close objects, send partial
        requests), without waiting for it; the following deliver() does the rest."""

    def buffered_bytes(self) -> int:
        """Bytes held for delivery (memory, spool): shown by /metrics."""
        return 0

    def failing(self) -> tuple[float | None, str | None]:
        """(monotonic time since when, error) while background deliveries fail; (None, None) otherwise."""
        return None, None

    def close(self) -> None:
        """Release resources; called after the last deliver(force=True)."""

    def wait_closed(self, timeout: float) -> None:
        """After close(): wait (at most ``timeout`` s) for background work still running (a reload
        must not leave an old upload racing the new pipeline's)."""
