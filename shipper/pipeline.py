"""Wiring: inputs -> router -> one runner thread per output; start, drain, stop.

Threads: one per input (reads, frames and encodes: the Python-heavy part), one per
output (compression and I/O, which release the GIL), so the two overlap on two cores.
Each output has a bounded queue; a full queue makes the readers wait (backpressure),
so memory stays bounded whatever the destination does.
"""

from __future__ import annotations

import collections
import importlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from shipper.acks import Acknowledgement, OutputAck
from shipper.config import INPUT_MODULES, OUTPUT_MODULES, Config, filter_name, tag_matches
from shipper.durable import make_dirs
from shipper.errors import BufferFull, FatalError, RetryableError
from shipper.filters import FILTER_MODULES, Filter, FilterContext, derived
from shipper import heartbeat
from shipper.heartbeat import late_inputs
from shipper.identity import resolve_identity
from shipper.lifecycle import LifecycleRecords
from shipper.outputs.base import Output, OutputContext
from shipper.outputs.retry import Backoff
from shipper.quarantine import Quarantine
from shipper.record import Batch, Envelope
from shipper.server import OutputState
from shipper.stats import Stats

log = logging.getLogger(__name__)

# Queued bytes past which an output's runner is woken at once (see OutputRunner.wake_bytes): a file
# written faster than ~50 KB/s is handed on as it is read, a quieter one once per flush_interval.
WAKE_BYTES = 64 * 1024


# Per input thread: what its input does while a put waits for room (FileInput.while_waiting).
_reader = threading.local()


@dataclass
class InputContext:
    data_dir: str
    stats: Stats
    checkpoint_interval: float
    quarantined: list = field(default_factory=list)  # quarantine.Strike: ranges to move past once
    file_inputs: int = 1  # they share the descriptors (inputs/file.py default_max_open_files)


class OutputRunner(threading.Thread):
    """Feeds one output from its bounded queue and retries its deliveries."""

    def __init__(self, output: Output, match: list[str], max_bytes: int, flush_interval: float, stats: Stats,
                 failed: threading.Event, wake_bytes: int | None = None, quarantine: Quarantine | None = None):
        super().__init__(name=f"output-{output.context.name}", daemon=True)
        self.failed = failed
        self.quarantine = quarantine
        self.output = output
        self.name_ = output.context.name
        self.match = match
        self.max_bytes = max_bytes
        self.flush_interval = flush_interval
        # Queued batches wake the runner at once only past this many bytes; smaller ones wait for
        # the next flush tick (flush_interval is how long records may be held to go out together).
        # A quiet file then costs each output one wake-up per flush_interval, not one per poll.
        self.wake_bytes = min(max_bytes // 4, WAKE_BYTES) if wake_bytes is None else wake_bytes
        self.stats = stats
        self.queue: collections.deque[tuple[Batch, int]] = collections.deque()  # (batch, its cost)
        self.queued_bytes = 0
        self.cond = threading.Condition()
        self.stopping = False
        self.deadline: float | None = None
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self.woken = False
        self.urgent = False  # flush-now (the instance is going away): everything held is due every tick
        self.heartbeat = time.monotonic()  # the last time this thread made progress (systemd watchdog)
        self.deadline_reported = False  # "shutdown deadline reached" is said once
        # Batches this output was given and has not confirmed: their OutputAck -> (read time, source,
        # start, end, file identity): the oldest age for /metrics, what to strike if the output fails.
        self.unsent: dict[OutputAck, tuple] = {}
        self.unsent_lock = threading.Lock()
        output.context.wake = self.wake

    # ------------------------------------------------------------ producer side

    def put(self, batch: Batch) -> bool:
        """Queue a batch, waiting while the queue is full; False if the shutdown deadline passed first.

        The batch is this output's own view (``Batch.for_output``): its ``ack`` reports to this runner.
        """
        cost = _cost(batch)
        if isinstance(batch.ack, OutputAck):
            with self.unsent_lock:
                self.unsent[batch.ack] = (batch.read_time, batch.source, batch.start, batch.end, batch.origin)
        with self.cond:
            while self.queue and self.queued_bytes + cost > self.max_bytes:
                if self._past_deadline():
                    return False
                self.cond.notify_all()  # full: the runner takes what is queued now, not at its next tick
                self.cond.wait(0.5)
                hook = getattr(_reader, "while_waiting", None)
                if hook is not None:  # the input's own care while it cannot go on (e.g. deleted files)
                    self.cond.release()
                    try:
                        hook()
                    finally:
                        self.cond.acquire()
            self.queue.append((batch, cost))
            self.queued_bytes += cost
            if self.queued_bytes >= self.wake_bytes:
                self.cond.notify_all()
        return True

    def finish(self) -> None:
        """Deliver what is queued and accepted, then end (by ``deadline`` at the latest)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    # ------------------------------------------------------------ consumer side

    def run(self) -> None:
        try:
            self._feed()
        except Exception:  # a bug, not a delivery problem: stop cleanly so systemd restarts us
            log.exception("%s: output failed; stopping the agent", self.name_)
            if self.quarantine is not None:  # never in a loop on the same input (see quarantine.py)
                with self.cond:
                    queued = {batch.ack for batch, _ in self.queue}  # never handed to the output
                with self.unsent_lock:
                    held = [(source, start, end, origin) for ack, (_, source, start, end, origin)
                            in self.unsent.items() if source is not None and end > start and ack not in queued]
                self.quarantine.strike(held)
            self.failed.set()

    def wake(self) -> None:
        """Called by the output (from any thread) when a request of its finished: deliver again now."""
        with self.cond:
            self.woken = True
            self.cond.notify_all()

    def confirmed(self, ack: OutputAck) -> None:
        """Called (from any thread) when this output confirmed a batch."""
        with self.unsent_lock:
            self.unsent.pop(ack, None)

    def flush_now(self) -> None:
        with self.cond:
            self.urgent = True
            self.flush_interval = min(self.flush_interval, 1.0)
            self.woken = True
            self.cond.notify_all()

    def state(self) -> OutputState:
        """What the health server shows of this output (read from another thread)."""
        now = time.monotonic()
        with self.unsent_lock:
            oldest = next(iter(self.unsent.values()), (None,))[0]
        output = self.output
        since, error = output.failing()
        if since is None and self.failing_since is not None:
            since, error = self.failing_since, self.last_error
        hold = getattr(output.settings, "upload_interval", None) if output.settings is not None else None
        return OutputState(
            name=self.name_, buffered_bytes=self.queued_bytes + output.buffered_bytes(),
            pending=output.pending() + len(self.queue),
            oldest_unsent_age=None if oldest is None else max(0.0, time.time() - oldest),
            failing_for=None if since is None else now - since, last_error=error,
            hold_seconds=(hold or 0.0) + self.flush_interval)

    def _feed(self) -> None:
        next_flush = time.monotonic() + self.flush_interval
        flushing = False  # the flush tick came: take what is queued, batch by batch, without waiting
        forced = False    # delivered with force since stopping: now wait for in-flight work to wake us
        while True:
            due = self.output.next_due()
            with self.cond:
                idle = not self.woken and (not self.queue or (not flushing and self.queued_bytes < self.wake_bytes))
                if idle:
                    if not self.stopping:
                        wake_at = next_flush if due is None else min(next_flush, due)
                        self.cond.wait(max(0.0, wake_at - time.monotonic()))
                    elif forced and not self.queue:
                        self.cond.wait(0.05)
                batch, cost = self.queue.popleft() if self.queue else (None, 0)
                if batch is not None:
                    self.queued_bytes -= cost
                    self.cond.notify_all()  # room for a waiting producer
                flushing = flushing and bool(self.queue)
                draining = self.stopping and not self.queue
                woken, self.woken = self.woken, False
            if batch is not None:
                self._accept(batch)
            now = self.heartbeat = time.monotonic()
            tick = now >= next_flush
            if tick:
                next_flush = now + self.flush_interval
                flushing = True
            # One delivery per batch: an output that is full (BufferFull) holds the rest in the queue.
            if self.urgent and tick and not draining:
                self.output.hurry()  # close objects, send partial requests: never wait or force here
            if batch is not None or woken or tick or draining or (due is not None and now >= due):
                self._deliver(force=draining)
                forced = draining
            if draining and (self.output.pending() == 0 or self._past_deadline()):
                return

    def _accept(self, batch: Batch) -> None:
        """Hand a batch to the output. Should encoding it fail all the same (a bug, or content no
        check foresaw), the batch is retried record by record and only the records that still fail
        are dropped, counted and logged: one batch never stops the agent."""
        try:
            self.output.accept(batch)
            return
        except Exception:
            log.exception("%s: cannot take the batch of %s at offset %d; retrying it record by record",
                          self.name_, batch.source or batch.tag, batch.start)
        pieces = batch.pieces()
        countdown = Acknowledgement(len(pieces), batch.ack.confirm)
        failed = 0
        for piece in pieces:
            # Each piece confirms once (OutputAck), even if the output took its ack before it raised.
            piece.ack = OutputAck(countdown, _ignore)
            try:
                self.output.accept(piece)
                continue
            except Exception:
                pass
            raw = piece.as_raw()
            raw.ack = piece.ack
            try:
                self.output.accept(raw)  # the raw line with parse_error, as a parser failure ships
            except Exception:
                failed += 1
                piece.ack.confirm()
        if failed:
            self.stats.add("records_dropped", failed, output=self.name_, reason="unencodable")
            log.error("%s: dropped %d records of %s at offset %d that it cannot encode", self.name_, failed,
                      batch.source or batch.tag, batch.start)

    def _past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def _deliver(self, force: bool) -> None:
        attempt = 0
        while True:
            try:
                self.output.deliver(time.time(), force)
            except BufferFull:
                if self._past_deadline():
                    return
                self.heartbeat = time.monotonic()
                time.sleep(0.01)
                continue
            except RetryableError as exc:
                attempt += 1
                self.stats.add("retries", 1, output=self.name_)
                self.last_error = str(exc)
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                    log.warning("%s: delivery failed, retrying with backoff: %s", self.name_, exc)
                delay = self.output.context.backoff.delay(attempt)
                if self.deadline is not None:  # stopping: retry only until the deadline
                    delay = min(delay, self.deadline - time.monotonic())
                    if delay <= 0:
                        self._report_deadline(exc)
                        return
                self._sleep(delay)
                continue
            except FatalError as exc:
                self._drop(exc)
            if self.failing_since is not None:
                log.warning("%s: delivering again after %.1fs of failures", self.name_,
                            time.monotonic() - self.failing_since)
                self.failing_since = None
                self.last_error = None
            return

    def _report_deadline(self, exc: Exception) -> None:
        """Once per output (each batch still queued is tried once more, and fails alike): what is left."""
        if self.deadline_reported:
            return
        self.deadline_reported = True
        with self.cond:
            queued, queued_records = len(self.queue), sum(batch.count for batch, _ in self.queue)
        with self.unsent_lock:
            unconfirmed = len(self.unsent)
        log.error("%s: shutdown deadline reached with undelivered records: %d batches unconfirmed (%d records in "
                  "%d batches still queued here, %d pending in the output); the next start reads them again "
                  "(or sends them from the spool). Last error: %s", self.name_, unconfirmed, queued_records,
                  queued, self.output.pending(), exc)

    def _sleep(self, seconds: float) -> None:
        """Wait out a backoff, still beating: waiting on purpose is progress for the watchdog."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 1.0))
            self.heartbeat = time.monotonic()

    def _drop(self, exc: FatalError) -> None:
        records = sum(b.count for b in exc.batches)
        self.stats.add("records_dropped", records, output=self.name_, reason=exc.reason)
        log.error("%s: dropped %d records that can never be delivered (%s): %s", self.name_, records, exc.reason, exc)
        for batch in exc.batches:
            batch.ack.confirm()


def stalled(runners: list[OutputRunner], period: float) -> list[str]:
    """The outputs whose runner made no progress for ``period`` seconds (stuck in a call, deadlocked)."""
    now = time.monotonic()
    return [r.name_ for r in runners if now - r.heartbeat > period]


def _ignore(_ack: OutputAck) -> None:
    """The pieces of a retried batch: only their batch's own OutputAck tells the runner."""


def _cost(batch: Batch) -> int:
    return batch.size + (len(batch._ndjson) if batch._ndjson is not None else 0)


class Tripwire(threading.Event):
    """An Event that also sets ``also`` (the main thread's wake-up), so nobody polls for it."""

    def __init__(self, also=None):  # anything with set(): a threading.Event, service.Wakeup
        super().__init__()
        self.also = also

    def set(self) -> None:
        super().set()
        if self.also is not None:
            self.also.set()


class FilterStage:
    """The [[filters]] of a config, applied in order: each filter to the batches whose tag (maybe set
    by an earlier one) its match takes. Shared by the pipeline and ``shipper check --sample``."""

    def __init__(self, filters: list, stats: Stats, envelope: Envelope, stop: threading.Event):
        self.stats = stats
        self.filters: list[tuple[Filter, list[str]]] = []  # (filter, match), in [[filters]] order
        for settings in filters:
            kind = importlib.import_module(FILTER_MODULES[settings.type]).FILTER
            context = FilterContext(filter_name(settings), stats, envelope, stop)
            self.filters.append((kind(settings, context), settings.match))
        # Per tag: the positions in self.filters of the filters whose match takes it ((): none).
        self.chains: dict[str, tuple[int, ...]] = {}
        self._failures: set[str] = set()  # filters whose exception was logged (once each)

    def chain(self, tag: str) -> tuple[int, ...]:
        positions = self.chains.get(tag)
        if positions is None:
            positions = self.chains[tag] = tuple(i for i, (_, match) in enumerate(self.filters)
                                                 if tag_matches(tag, match))
        return positions

    def run(self, batch: Batch, first: int = 0) -> list[Batch]:
        """The batches ``batch`` becomes through the filters from position ``first`` on."""
        batches = [batch]
        for position in range(first, len(self.filters)):
            out: list[Batch] = []
            for item in batches:
                if position in self.chain(item.tag):
                    out.extend(self.apply(position, item))
                else:
                    out.append(item)
            batches = out
        return batches

    def apply(self, position: int, batch: Batch) -> list[Batch]:
        """One filter on one batch. A filter that raises does not lose the batch, nor stop the agent:
        a redact's records are dropped (never ship what it was to hide), any other's go on unfiltered."""
        filt = self.filters[position][0]
        try:
            return filt.apply(batch)
        except Exception:
            name = filt.context.name
            redact = name.startswith("redact.")
            if name not in self._failures:
                self._failures.add(name)
                log.exception("%s: failed on a batch of %s at offset %d; %s (logged once: see filter_errors and "
                              "records_dropped{reason=\"filter_error\"})", name, batch.source or batch.tag,
                              batch.start, "its records are dropped" if redact else "it goes on unfiltered")
            self.stats.add("filter_errors", 1, filter=name)
            if redact:
                self.stats.add("records_dropped", batch.count, input=batch.tag, reason="filter_error", filter=name)
                return [derived(batch, blob=b"")]
            return [batch]

    def flush(self, final: bool) -> list[tuple[Batch, int]]:
        """(batch, position of the next filter) of what the filters emit on their own (throttle summaries)."""
        now = time.time()
        out = []
        for position, (filt, _) in enumerate(self.filters):
            try:
                out.extend((batch, position + 1) for batch in filt.flush(now, final))
            except Exception:
                log.exception("%s: flush failed", filt.context.name)
                self.stats.add("filter_errors", 1, filter=filt.context.name)
        return out

    @property
    def flushes(self) -> bool:
        """Whether a filter emits on its own (its class overrides flush): only then a flush thread."""
        return any(type(filt).flush is not Filter.flush for filt, _ in self.filters)


class Pipeline:
    def __init__(self, config: Config, identity: dict[str, str] | None = None,
                 wakeup=None, stats: Stats | None = None):
        """``wakeup``: set when a part of the pipeline failed (the agent then stops).
        ``stats``: the counters to add to (kept across reloads)."""
        self.config = config
        agent = config.agent
        self.data_dir = os.path.abspath(agent.data_dir)
        make_dirs(self.data_dir)
        self.stats = Stats() if stats is None else stats
        if identity is None:
            cloud = config.cloud
            identity = resolve_identity(cloud.metadata, cloud.imds_endpoint, cloud.imds_timeout)
        self.envelope = Envelope(identity, dict(agent.labels))
        self.runners: list[OutputRunner] = []
        self.failed = Tripwire(wakeup)
        self.quarantine = Quarantine(self.data_dir)
        for index, settings in enumerate(config.outputs):
            module = importlib.import_module(OUTPUT_MODULES[settings.type])
            context = OutputContext(f"{settings.type}.{index}", self.data_dir, self.envelope, self.stats,
                                    Backoff(agent.retry_initial_delay, agent.retry_max_delay))
            output = module.OUTPUT(settings, context)
            self.runners.append(OutputRunner(output, settings.match, settings.buffer_max_bytes,
                                             agent.flush_interval, self.stats, self.failed,
                                             quarantine=self.quarantine))
        input_context = InputContext(self.data_dir, self.stats, agent.checkpoint_interval,
                                     self.quarantine.take(), sum(s.type == "file" for s in config.inputs))
        self.inputs = []
        self.lifecycle: LifecycleRecords | None = None
        try:
            for settings in config.inputs:
                self.inputs.append(importlib.import_module(INPUT_MODULES[settings.type]).INPUT(settings, input_context))
            self.lifecycle = LifecycleRecords(self.data_dir, self.stats, agent.checkpoint_interval)
            self.stop_inputs = threading.Event()
            self.stage = FilterStage(config.filters, self.stats, self.envelope, self.stop_inputs)
        except BaseException:  # e.g. an address in use: what the inputs before it hold is let go
            self.close_inputs()
            raise
        self.filters = self.stage.filters
        self._chains = self.stage.chains
        self._flusher: threading.Thread | None = None
        self._routes: dict[str, list[OutputRunner]] = {}
        self._unrouted_reported: set[str] = set()
        self._input_threads: list[threading.Thread] = []
        self._stopped: bool | None = None

    # ------------------------------------------------------------ routing

    def routes(self, tag: str) -> list[OutputRunner]:
        runners = self._routes.get(tag)
        if runners is None:
            runners = self._routes[tag] = [r for r in self.runners if tag_matches(tag, r.match)]
        return runners

    def emit(self, batch: Batch) -> None:
        """Filter (if a filter matches the tag: without one this costs a dict lookup) and route."""
        chain = self._chains.get(batch.tag)
        if chain is None:
            chain = self.chain(batch.tag)
        if chain:
            self._filter(batch, 0)
        else:
            self.route(batch)

    # ------------------------------------------------------------ filters

    def chain(self, tag: str) -> tuple[int, ...]:
        return self.stage.chain(tag)

    def _filter(self, batch: Batch, first: int) -> None:
        """Filter ``batch`` (from position ``first`` on), then route what comes out. The batch's on_done
        fires once: after every batch made from it is done, at once if none is left."""
        original = batch.on_done
        batches = self.stage.run(batch, first)
        if original is not None:
            carriers = [b for b in batches if b.on_done is original]
            if not carriers:  # everything dropped
                original()
            elif len(carriers) > 1:  # split: done when every part is
                countdown = Acknowledgement(len(carriers), original)
                for part in carriers:
                    part.on_done = countdown.confirm
        for item in batches:
            if item.count:
                self.route(item)
            elif item.on_done is not None:  # nothing left to ship: done now, so the checkpoint moves past it
                item.on_done()

    def _flush_filters(self, final: bool) -> None:
        for batch, after in self.stage.flush(final):
            self._filter(batch, after)

    def _run_flusher(self) -> None:
        while not self.stop_inputs.wait(1.0):
            self._flush_filters(final=False)

    # ------------------------------------------------------------ routing

    def route(self, batch: Batch) -> None:
        runners = self.routes(batch.tag)
        batch.ack = Acknowledgement(len(runners), batch.on_done)
        if not runners:
            self.stats.add("records_unrouted", batch.count, tag=batch.tag)
            if batch.tag not in self._unrouted_reported:
                self._unrouted_reported.add(batch.tag)
                log.warning("no output matches tag %r: its records are not shipped", batch.tag)
            return
        # Encoded here, in the reading thread, once for all. A batch with fields is encoded even
        # when no output wants NDJSON: that proves every record encodable (repairing those that are
        # not) before any output sees it, so no output can fail on what a file or a peer sent.
        wants_ndjson = any(r.output.encoding == "ndjson" for r in runners)
        if wants_ndjson or batch.fields is not None:
            batch.ndjson(self.envelope)
            if batch.dropped:
                self.stats.add("records_dropped", batch.dropped, input=batch.tag, reason="unencodable")
            if not wants_ndjson:
                batch._ndjson = None
        with heartbeat.waiting():
            for runner in runners:
                runner.put(batch.for_output(OutputAck(batch.ack, runner.confirmed)))

    # ------------------------------------------------------------ lifecycle

    # ------------------------------------------------------------ service

    def output_states(self) -> list[OutputState]:
        return [runner.state() for runner in self.runners]

    def stalled(self, period: float) -> list[str]:
        """Outputs and inputs stuck for longer than ``period`` (the watchdog's and /healthz's question)."""
        return stalled(self.runners, period) + late_inputs(self.inputs, period)

    def flush_now(self) -> None:
        """The instance is going away: every output delivers what it holds at each tick, now."""
        for runner in self.runners:
            runner.flush_now()

    def start(self) -> None:
        for runner in self.runners:
            runner.start()
        for index, source in enumerate(self._own_inputs()):
            thread = threading.Thread(target=self._run_input, args=(source,), name=f"input-{index}", daemon=True)
            thread.start()
            self._input_threads.append(thread)
        # Only filters that emit on their own (their class overrides flush) cost a thread waking every second.
        if self.stage.flushes:
            self._flusher = threading.Thread(target=self._run_flusher, name="filters-flush", daemon=True)
            self._flusher.start()

    def _run_input(self, source) -> None:
        _reader.while_waiting = getattr(source, "while_waiting", None)
        # Waiting for room in the outputs is not being stuck (route); a filter's work is the input's.
        heartbeat.bind(getattr(source, "heartbeat", None))
        try:
            source.run(self.emit, self.stop_inputs)
        except Exception:  # a bug, not bad input: stop cleanly so systemd restarts us
            log.exception("input %s failed; stopping the agent", getattr(source, "tag", source))
            self.failed.set()

    def record_lifecycle(self, batch: Batch) -> None:
        """A lifecycle record (a termination notice): journaled, then handed on by its reader; straight
        to the outputs when the journal cannot take it (stopping, or the disk refuses)."""
        if self.lifecycle is None or not self.lifecycle.record(batch):
            self.emit(batch)

    def _own_inputs(self) -> list:
        return self.inputs + ([self.lifecycle] if self.lifecycle is not None else [])

    def close_inputs(self) -> None:
        """Give up what inputs hold beyond their thread (a journaled input's producers and journal), so
        that a reload's next pipeline can take them; once stopped, or when this pipeline is never started."""
        for source in self._own_inputs():
            close = getattr(source, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("input %s: closing it failed", getattr(source, "tag", source))

    def wait_closed(self, timeout: float) -> None:
        """After stop(): wait for the outputs' background work (uploads) still running, at most ``timeout`` s."""
        deadline = time.monotonic() + timeout
        for runner in self.runners:
            runner.output.wait_closed(max(0.0, deadline - time.monotonic()))

    def stop(self) -> bool:
        """Stop reading, deliver what was read, save checkpoints. True when everything was delivered.
        A second call returns the first one's answer."""
        if self._stopped is not None:
            return self._stopped
        self._stopped = self._stop()
        return self._stopped

    def _stop(self) -> bool:
        timeout = self.config.agent.shutdown_timeout
        deadline = time.monotonic() + timeout
        for runner in self.runners:
            runner.deadline = deadline
        self.stop_inputs.set()
        for source in self._own_inputs():
            source.wake.set()
        for thread in self._input_threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._flusher is not None:
            self._flusher.join(max(0.0, deadline - time.monotonic()))
        if self.filters:
            self._flush_filters(final=True)  # the last summaries, before the outputs drain
        for runner in self.runners:
            runner.finish()
        for runner in self.runners:
            runner.join(max(0.0, deadline - time.monotonic()) + 1.0)
        for source in self._own_inputs():
            source.save_checkpoints()
        self.close_inputs()
        if not self.failed.is_set():
            self.quarantine.clear()  # a clean stop: later failures are not "in a row" with earlier ones
        complete = True
        for runner in self.runners:
            left = runner.output.pending() + len(runner.queue)
            if left:
                complete = False
                log.error("%s: %d batches or objects not delivered before shutdown_timeout (%.0fs); the next "
                          "start reads them again (or uploads them from the spool)", runner.name_, left, timeout)
            runner.output.close()
        return complete
