"""The output runner's contract with outputs: retries, permanent failures, backpressure, drain."""

import random
import threading
import time

from shipper.acks import Acknowledgement, OutputAck
from shipper.errors import FatalError, RetryableError
from shipper.outputs.base import Output, OutputContext
from shipper.outputs.retry import backoff_delay
from shipper.pipeline import OutputRunner
from shipper.quarantine import Quarantine, Strike
from shipper.record import PARSE_ERROR, PARSED, Batch, Envelope
from shipper.stats import Stats


class ScriptedOutput(Output):
    """An output whose deliveries fail as the test says: a list of exceptions to raise, in order."""

    def __init__(self, failures):
        super().__init__(None, OutputContext("scripted.0", "/nonexistent", Envelope(), Stats()))
        self.failures = list(failures)
        self.accepted: list[Batch] = []
        self.delivered: list[Batch] = []

    def accept(self, batch):
        self.accepted.append(batch)

    def deliver(self, now, force):
        if self.failures:
            failure = self.failures.pop(0)
            if isinstance(failure, FatalError):
                failure.batches = list(self.accepted)
                self.accepted.clear()
            raise failure
        for batch in self.accepted:
            batch.ack.confirm()
        self.delivered.extend(self.accepted)
        self.accepted.clear()

    def pending(self):
        return len(self.accepted)


def runner_for(output, max_bytes=1 << 20):
    return OutputRunner(output, ["*"], max_bytes, 0.05, output.context.stats, threading.Event())


def confirmed_batch(text: bytes, done: list):
    batch = Batch("app", "/f", 0.0, blob=text)
    batch.ack = Acknowledgement(1, lambda: done.append(text))
    return batch


def test_retryable_failures_are_retried_until_delivered():
    output = ScriptedOutput([RetryableError("down"), RetryableError("still down")])
    runner = runner_for(output)
    runner.start()
    done = []
    runner.put(confirmed_batch(b"a\n", done))
    deadline = time.monotonic() + 10
    while done != [b"a\n"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done == [b"a\n"]
    assert output.context.stats.get("retries", output="scripted.0") == 2
    runner.finish()
    runner.join(5)
    assert not runner.is_alive() and not runner.failed.is_set()


def test_a_permanent_failure_drops_with_its_reason_and_releases_the_checkpoint():
    output = ScriptedOutput([FatalError("too old for the destination", reason="too_old")])
    runner = runner_for(output)
    runner.start()
    done = []
    runner.put(confirmed_batch(b"a\nb\n", done))
    runner.finish()
    runner.join(5)
    assert done == [b"a\nb\n"]  # confirmed although dropped: it must not block the file forever
    assert output.context.stats.get("records_dropped", output="scripted.0", reason="too_old") == 2
    assert output.delivered == []


def test_a_full_queue_makes_the_producer_wait_until_the_deadline():
    runner = runner_for(ScriptedOutput([]), max_bytes=10)  # not started: nothing drains the queue
    done = []
    assert runner.put(confirmed_batch(b"0123456789abc\n", done))  # an empty queue takes any batch
    runner.deadline = time.monotonic() + 0.3
    started = time.monotonic()
    assert not runner.put(confirmed_batch(b"more\n", done))
    assert 0.25 <= time.monotonic() - started < 3


def test_a_batch_an_output_cannot_take_is_retried_record_by_record():
    class Picky(ScriptedOutput):
        def accept(self, batch):
            if any("poison" in m for m in batch.message_list()):
                raise ValueError("bug")
            super().accept(batch)

    output = Picky([])
    runner = runner_for(output)
    runner.start()
    done = []
    runner.put(confirmed_batch(b"a\npoison\nb\n", done))
    wait_until(lambda: done)
    assert done == [b"a\npoison\nb\n"]  # the whole batch is confirmed: the checkpoint moves on
    assert [b.message_list() for b in output.delivered] == [["a"], ["b"]]
    assert output.context.stats.get("records_dropped", reason="unencodable") == 1
    assert not runner.failed.is_set()


def test_a_record_an_output_cannot_take_parsed_is_shipped_raw():
    class NoParsedFields(ScriptedOutput):
        def accept(self, batch):
            if any(extra and PARSED in extra and "bad" in extra[PARSED] for extra in batch.fields or ()):
                raise TypeError("cannot encode")
            super().accept(batch)

    output = NoParsedFields([])
    runner = runner_for(output)
    runner.start()
    done = []
    batch = Batch("app", "/f", 0.0, messages=["x", "y"], fields=[{PARSED: {"ok": 1}}, {PARSED: {"bad": 1}}])
    batch.ack = Acknowledgement(1, lambda: done.append(True))
    runner.put(batch)
    wait_until(lambda: done)
    assert [(b.message_list(), b.fields) for b in output.delivered] == \
        [(["x"], [{PARSED: {"ok": 1}}]), (["y"], [{PARSE_ERROR: True}])]
    assert output.context.stats.get("records_dropped") == 0


def test_a_bug_in_delivery_stops_the_agent_and_strikes_what_it_held(tmp_path):
    class Broken(ScriptedOutput):
        def deliver(self, now, force):
            raise ValueError("bug")

    quarantine = Quarantine(str(tmp_path))
    output = Broken([])
    runner = OutputRunner(output, ["*"], 1 << 20, 0.05, output.context.stats, threading.Event(),
                          quarantine=quarantine)
    runner.start()
    batch = confirmed_batch(b"a\n", [])
    batch.start, batch.end = 100, 102
    batch.ack = OutputAck(batch.ack, runner.confirmed)
    runner.put(batch)
    runner.join(5)
    assert runner.failed.is_set()
    assert quarantine.load() == [Strike("/f", 100, 102, 1)]


def wait_until(predicate, timeout=10):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_backoff_is_capped_and_jittered():
    rng = random.Random(1)
    delays = [backoff_delay(n, base=0.5, cap=30, rand=rng) for n in range(1, 30)]
    assert all(0 < d <= 30 for d in delays)
    assert max(delays[:3]) <= 2.0 and max(delays[10:]) > 5
    assert len(set(delays)) == len(delays)


class BackgroundOutput(Output):
    """Delivers on a thread of its own, like the S3 and CloudWatch outputs, and wakes the runner when done."""

    def __init__(self):
        super().__init__(None, OutputContext("background.0", "/nonexistent", Envelope(), Stats()))
        self.accepted: list[Batch] = []
        self.finished: list[Batch] = []
        self.lock = threading.Lock()

    def accept(self, batch):
        self.accepted.append(batch)

    def deliver(self, now, force):
        with self.lock:
            for batch in self.finished:
                batch.ack.confirm()
            self.finished.clear()
        batches, self.accepted = self.accepted, []
        if batches:
            threading.Timer(0.05, self._done, args=(batches,)).start()

    def _done(self, batches):
        with self.lock:
            self.finished.extend(batches)
        self.context.wake()

    def pending(self):
        return len(self.accepted) + len(self.finished)


def test_an_output_finishing_work_in_the_background_is_served_at_once_not_at_the_next_flush():
    output = BackgroundOutput()
    # flush: 1 min; any queued batch wakes the runner (so the first delivery is at once too)
    runner = OutputRunner(output, ["*"], 1 << 20, 60.0, output.context.stats, threading.Event(), wake_bytes=1)
    runner.start()
    done = []
    started = time.monotonic()
    runner.put(confirmed_batch(b"a\n", done))
    while not done and time.monotonic() - started < 10:
        time.sleep(0.01)
    assert done == [b"a\n"] and time.monotonic() - started < 5  # the wake, not the 60 s flush
    runner.finish()
    runner.join(5)


def test_small_batches_wait_for_the_flush_tick_and_a_big_queue_wakes_the_runner_at_once():
    output = ScriptedOutput([])
    runner = OutputRunner(output, ["*"], 1 << 20, 60.0, output.context.stats, threading.Event())  # flush: 1 min
    assert runner.wake_bytes == 64 * 1024  # at most a quarter of the queue
    runner.start()
    done = []
    for n in range(3):
        runner.put(confirmed_batch(b"small %d\n" % n, done))
    time.sleep(0.3)
    assert done == [] and output.accepted == []  # held until the tick: one wake-up a flush_interval
    big = b"x" * (64 * 1024) + b"\n"
    runner.put(confirmed_batch(big, done))
    deadline = time.monotonic() + 10
    while len(done) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done == [b"small 0\n", b"small 1\n", b"small 2\n", big]  # all of the queue, in order, at once
    assert len(output.delivered) == 4
    runner.finish()
    runner.join(5)
    assert not runner.is_alive()


def test_finish_delivers_what_is_held_for_the_tick():
    output = ScriptedOutput([])
    runner = OutputRunner(output, ["*"], 1 << 20, 60.0, output.context.stats, threading.Event())
    runner.start()
    done = []
    runner.put(confirmed_batch(b"held\n", done))
    runner.finish()
    runner.join(5)
    assert done == [b"held\n"] and not runner.is_alive()


def test_the_runner_delivers_when_the_output_says_something_is_due_not_only_at_flush_ticks(tmp_path):
    from shipper.config import COMMON_OUTPUT_OPTIONS, validate_section
    from shipper.outputs import directory

    problems = []
    settings = validate_section("outputs[0]", {"type": "directory", "path": str(tmp_path), "upload_interval": "300ms"},
                                {**COMMON_OUTPUT_OPTIONS, **directory.OPTIONS}, problems)
    output = directory.DirectoryOutput(settings, OutputContext("directory.0", str(tmp_path), Envelope(), Stats()))
    # flush: 1 min; the first batch wakes the runner at once, the object is due 300 ms later
    runner = OutputRunner(output, ["*"], 1 << 20, 60.0, output.context.stats, threading.Event(), wake_bytes=1)
    runner.start()
    done = []
    started = time.monotonic()
    batch = Batch("app", "/f", time.time(), blob=b"a\n")  # read now: due in 300 ms
    batch.ack = Acknowledgement(1, lambda: done.append(b"a\n"))
    runner.put(batch)
    while not done and time.monotonic() - started < 20:
        time.sleep(0.01)
    assert done == [b"a\n"] and len(list(tmp_path.rglob("*.gz"))) == 1  # written at its due time, not at 60 s
    runner.finish()
    runner.join(5)
