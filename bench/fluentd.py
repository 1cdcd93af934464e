"""Fluentd benchmark: shipper forwarding a log file to a forward-protocol peer, throughput and latency.

    .venv/bin/python bench/fluentd.py [--lines N] [--latency-seconds S] [--latency-rate R] [--only ...]

The peer is the tests' ForwardPeer (tests/forward_peer.py, loaded by file path): a forward-protocol
server on loopback, in this process, that decodes every message, records every event and
acknowledges every chunk. One measurement after the other (never in parallel, the machine has
2 cores), each after waiting for a quiet machine, each with a fresh peer and a fresh agent:

- throughput  file -> fluentd output (require_ack, compression none) on the first N lines of the
              throughput benchmark's file (bench/loggen.py, same seed; cached in
              bench/work/fluentd-input.log): timed from process start until the checkpoint reaches
              the file size (checkpoints move only on acks); then SIGTERM, then the peer's events are
              checked against the input, line by line, in order (chunks received twice are counted
              as duplicates and skipped)
- throughput-lean  the same with a lean acker in place of the ForwardPeer (LeanAcker below: it
              frames each message with msgpack's C skip(), reads only the option map and acks;
              the events are decoded and checked after the run): the ForwardPeer decodes every
              event into Python objects on one thread and is the bottleneck of the first
              measurement, this one shows what the agent does when the peer keeps up
- latency     the agent with flush_interval 1s and the default input settings (poll_interval 500ms...)
              follows a file to which this script appends R lines/s (default 1,000) for S seconds
              (default 30), in batches every 10 ms, each line with a unique sequence number. A line's
              latency is the time the peer sent the ack of the first chunk that carried it minus the
              time its write() returned (both time.monotonic() of this process).

The peer runs in this process: its CPU is this process's CPU during the run (its connection
threads' CPU is reported too). Results: a table on stdout, bench/results/fluentd.json and
bench/results/fluentd.md, with the directory figure of bench/results/throughput.json for comparison.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import math
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import msgpack
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loggen  # noqa: E402
from measure import (Background, Result, add_common_arguments, add_py_spy_argument, cpu_seconds,  # noqa: E402
                     keep_pace, measure_all, minor_faults, own_cpu_seconds, peak_rss_mib, poll_until, py_spy_command,
                     read_chars, stop, wait_for_text, wait_quiet, warn_if_disturbed, write_results, format_table)
from throughput import AGENT_CONF, checkpoint_offset, directory_figure, machine, thread_cpu  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
WORK = os.path.join(BENCH, "work")
RESULTS = os.path.join(BENCH, "results")
INPUT = os.path.join(WORK, "fluentd-input.log")
SHIPPER = os.path.join(ROOT, ".venv", "bin", "shipper")
POLL = 0.05  # seconds between completion checks
MEASUREMENTS = ("throughput", "throughput-lean", "latency")
TAG = "bench"
LATENCY_TARGET = 2.0  # seconds, for p99
BATCH_PERIOD = 0.01   # the latency writer appends one batch of lines every 10 ms
SEQ_WIDTH = 9


def _load_peer():
    """tests/forward_peer.py, loaded by path (as bench/aws.py loads tests/aws.py): the tests are no package."""
    spec = importlib.util.spec_from_file_location("forward_peer_harness",
                                                  os.path.join(ROOT, "tests", "forward_peer.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


harness = _load_peer()


def log(message: str) -> None:
    print(message, flush=True)


FLUENTD_OUTPUT = """
[[outputs]]
type = "fluentd"
hosts = ["{address}"]
require_ack = true
compression = "none"
"""

# The latency run: agent and input defaults (flush_interval 1s spelled out, poll_interval 500ms,
# checkpoint_interval 1s...), only what must be set.
LATENCY_CONF = """\
[agent]
data_dir = "{data}"
flush_interval = "1s"

[cloud]
metadata = "off"

[[inputs]]
type = "file"
tag = "{tag}"
paths = ["{input}"]
{output}"""


# ---------------------------------------------------------------- helpers

class PeerThreads:
    """CPU seconds of the peer's connection threads (named forward-peer-conn-N), kept after they end."""

    def __init__(self):
        self.seconds: dict[int, float] = {}
        self.ticks = os.sysconf("SC_CLK_TCK")

    def sample(self) -> float:
        for thread in threading.enumerate():
            if not thread.name.startswith("forward-peer-") or thread.native_id is None:
                continue
            try:
                with open(f"/proc/self/task/{thread.native_id}/stat") as handle:
                    stat = handle.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            self.seconds[thread.native_id] = (int(fields[11]) + int(fields[12])) / self.ticks
        return sum(self.seconds.values())


def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    if not ordered:
        return math.nan
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


def distribution(values: list[float], scale: float = 1000.0) -> dict:
    """count, p50, p90, p99, max (and mean, min) of ``values`` times ``scale`` (seconds -> ms)."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}
    return {"count": len(ordered), "min": round(ordered[0] * scale, 1),
            "p50": round(percentile(ordered, 50) * scale, 1), "p90": round(percentile(ordered, 90) * scale, 1),
            "p99": round(percentile(ordered, 99) * scale, 1), "max": round(ordered[-1] * scale, 1),
            "mean": round(sum(ordered) / len(ordered) * scale, 1)}


def first_deliveries(peer) -> tuple[list, list, int, int]:
    """(messages, events) of the first delivery of each chunk, in the order received; and the
    duplicate chunks and events (chunks received again, after a resend)."""
    messages, events = peer.messages(), peer.events()  # events are appended with their message, in order
    seen: set = set()
    kept_messages, kept_events = [], []
    duplicate_chunks = duplicate_events = 0
    position = 0
    for message in messages:
        carried = events[position:position + message.entries]
        position += message.entries
        if message.chunk is not None and message.chunk in seen:
            duplicate_chunks += 1
            duplicate_events += message.entries
            continue
        seen.add(message.chunk)
        kept_messages.append(message)
        kept_events.append(carried)
    return kept_messages, kept_events, duplicate_chunks, duplicate_events


def first_acks(peer) -> dict:
    """chunk id -> monotonic time of its first ack."""
    acks: dict = {}
    for ack in peer.ack_log():
        acks.setdefault(ack.chunk, ack.monotonic)
    return acks


def write_config(workdir: str, text: str) -> str:
    conf = os.path.join(workdir, "shipper.toml")
    with open(conf, "w") as handle:
        handle.write(text)
    return conf


def start_agent(conf: str, workdir: str) -> tuple[subprocess.Popen, object]:
    errors = open(os.path.join(workdir, "shipper.stderr"), "wb")
    return subprocess.Popen([SHIPPER, "run", "-c", conf], stdout=errors, stderr=errors), errors


def attach_py_spy(py_spy: list[str] | None, pid: int) -> subprocess.Popen | None:
    if not py_spy:
        return None
    return subprocess.Popen([py_spy[0], "record", "--pid", str(pid), *py_spy[1:]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_profiler(profiler: subprocess.Popen | None) -> None:
    if profiler is None:
        return
    try:
        profiler.wait(60)
    except subprocess.TimeoutExpired:
        profiler.terminate()
        profiler.wait()


# ---------------------------------------------------------------- a lean acker, for comparison

LeanEvent = collections.namedtuple("LeanEvent", "record chunk")


def _event_time(code: int, data: bytes):
    if code == 0 and len(data) == 8:
        return harness.EventTime(*struct.unpack(">II", data))
    return msgpack.ExtType(code, data)


class LeanAcker:
    """A forward server that does as little as possible per chunk, to show what the agent can do
    when the peer is not the bottleneck.

    It finds each message's end with msgpack's C ``skip()``, reads only the option map (chunk id,
    size), answers the ack and keeps the message's bytes; the events are decoded after the run (by
    ``events()``, with the ForwardPeer's ``decode_message``). It offers the ForwardPeer calls this
    script uses: messages(), events(), ack_log(), acks(), errors(), connections, address, stop().
    """

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self._messages: list = []   # harness.MessageInfo, entries = the declared size
        self._raw: list[bytes] = []
        self._ack_log: list = []
        self._errors: list[str] = []
        self.connections = 0
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="forward-peer-lean-accept", daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                number = self.connections
                self._sockets.append(sock)
            threading.Thread(target=self._serve, args=(sock, number), name=f"forward-peer-lean-{number}",
                             daemon=True).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        unpacker = msgpack.Unpacker(max_buffer_size=1 << 30)
        buffer = bytearray()
        base = boundary = 0  # stream offsets: of buffer[0], and where the next message starts
        try:
            while True:
                data = sock.recv(1 << 20)
                if not data:
                    return
                unpacker.feed(data)
                buffer += data
                while True:
                    try:
                        unpacker.skip()
                    except msgpack.OutOfData:
                        break
                    end = unpacker.tell()
                    raw = bytes(buffer[boundary - base:end - base])
                    boundary = end
                    self._on_message(sock, number, raw)
                del buffer[:boundary - base]
                base = boundary
        except (OSError, ValueError, msgpack.UnpackException) as exc:
            with self.lock:
                self._errors.append(f"connection {number}: {exc!r}")
        finally:
            sock.close()

    def _on_message(self, sock: socket.socket, number: int, raw: bytes) -> None:
        received, received_monotonic = time.time(), time.monotonic()
        head = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(raw), 1024))
        head.feed(raw)
        length = head.read_array_header()
        tag = head.unpack()
        kind = raw[head.tell()] if head.tell() < len(raw) else 0  # the first byte of the entries
        head.skip()
        option = head.unpack() if length >= 3 else {}
        option = option if isinstance(option, dict) else {}
        chunk, size = option.get("chunk"), option.get("size")
        if 0x90 <= kind <= 0x9f or kind in (0xdc, 0xdd):  # an array: Forward mode
            mode = "Forward"
        else:  # bin or str
            mode = "CompressedPackedForward" if option.get("compressed") else "PackedForward"
        with self.lock:
            self._raw.append(raw)
            self._messages.append(harness.MessageInfo(tag, mode, chunk, option, size or 0, size,
                                                      option.get("compressed"), number, len(raw), received,
                                                      received_monotonic))
            if chunk is None:
                return
            self._ack_log.append(harness.AckInfo(chunk, time.time(), time.monotonic(), number))
        sock.sendall(msgpack.packb({"ack": chunk}))

    def messages(self) -> list:
        with self.lock:
            return list(self._messages)

    def ack_log(self) -> list:
        with self.lock:
            return list(self._ack_log)

    def acks(self) -> list:
        return [ack.chunk for ack in self.ack_log()]

    def errors(self) -> list[str]:
        with self.lock:
            return list(self._errors)

    def events(self) -> list[LeanEvent]:
        """Every event, decoded now (after the run), in the order received; a wrong size is an error."""
        with self.lock:
            raws, infos = list(self._raw), list(self._messages)
        out = []
        for raw, info in zip(raws, infos):
            message = msgpack.unpackb(raw, raw=False, strict_map_key=False, unicode_errors="surrogateescape",
                                      ext_hook=_event_time)
            _, _, entries, _, _, notes = harness.decode_message(message)
            if len(entries) != info.entries or notes:
                with self.lock:
                    self._errors.append(f"chunk {info.chunk}: {len(entries)} entries, declared {info.entries}; "
                                        f"{notes}")
            out.extend(LeanEvent(record, info.chunk) for _, _, record in entries[:info.entries])
            out.extend(LeanEvent({}, info.chunk) for _ in range(info.entries - len(entries)))
        return out

    def stop(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# ---------------------------------------------------------------- throughput

def bench_throughput(name: str, meta: dict, input_path: str, workdir: str, timeout: float,
                     py_spy: list[str] | None) -> Result:
    """``name``: "throughput" (the tests' ForwardPeer) or "throughput-lean" (the LeanAcker)."""
    peer = LeanAcker() if name == "throughput-lean" else harness.ForwardPeer()
    try:
        data = os.path.join(workdir, "data")
        checkpoint = os.path.join(data, "checkpoints", f"file-{TAG}.json")
        conf = write_config(workdir, AGENT_CONF.format(data=data, tag=TAG, input=input_path,
                                                       output=FLUENTD_OUTPUT.format(address=peer.address)))
        size = meta["bytes"]
        timeline = []
        peer_threads = PeerThreads()
        background = Background()
        own_before = own_cpu_seconds()
        read_done = None
        started = time.monotonic()
        proc, errors = start_agent(conf, workdir)
        profiler = attach_py_spy(py_spy, proc.pid)
        try:
            last_sample = 0.0

            def step(now):
                nonlocal last_sample, read_done
                offset = checkpoint_offset(checkpoint, input_path)
                if read_done is None and read_chars(proc.pid) >= size:
                    read_done = now - started
                done = offset == size
                if now - last_sample >= 0.5 or done:
                    last_sample = now
                    messages = peer.messages()
                    timeline.append({"t": round(now - started, 2), "checkpoint": offset,
                                     "peer_messages": len(messages),
                                     "peer_events": sum(m.entries for m in messages),
                                     "peer_acks": len(peer.acks()),
                                     "agent_cpu": round(cpu_seconds(proc.pid), 2),
                                     "own_cpu": round(own_cpu_seconds() - own_before, 2),
                                     "peer_threads_cpu": round(peer_threads.sample(), 2)})
                return done, f"checkpoint at {offset} of {size}; see {workdir}/shipper.stderr"

            elapsed = poll_until(proc, "shipper (fluentd)", started, timeout, POLL, step) - started
            cpu, rss, threads = cpu_seconds(proc.pid), peak_rss_mib(proc.pid), thread_cpu(proc.pid)
            faults = minor_faults(proc.pid)
            own_cpu = own_cpu_seconds() - own_before  # the peer's threads, and this process polling
            peer_cpu = peer_threads.sample()
            other, steal = background.other(cpu)
        finally:
            code, exit_seconds = stop(proc, timeout=60)
            errors.close()
            wait_profiler(profiler)
        extra = {"exit_code": code, "seconds_to_exit_after_sigterm": round(exit_seconds, 2),
                 "reader_done_seconds_approx": None if read_done is None else round(read_done, 2),
                 "minor_faults": faults, "own_cpu_seconds": round(own_cpu, 2),
                 "peer_threads_cpu_seconds": round(peer_cpu, 2), "other_cpu_seconds": other,
                 "steal_cpu_seconds": steal, "threads": threads, "timeline": timeline}
        extra.update(chunk_figures(peer, started))
        extra.update(verify_throughput(peer, meta, input_path))
    finally:
        peer.stop()
    return Result(name, elapsed, size, meta["lines"], cpu, rss, extra)


def chunk_figures(peer, started: float) -> dict:
    """Chunks (forward messages) as the peer received them: how many, their size, and their timing."""
    messages = peer.messages()
    kept, _, duplicate_chunks, duplicate_events = first_deliveries(peer)
    acks = first_acks(peer)
    entries = [m.entries for m in kept]
    sizes = [m.nbytes for m in kept]
    received = [m.received_monotonic - started for m in kept]
    gaps = [later - earlier for earlier, later in zip(received, received[1:])]
    # From the moment a chunk was decoded to the moment its ack went out: the peer's own share.
    peer_turnaround = [acks[m.chunk] - m.received_monotonic for m in kept if m.chunk in acks]
    return {
        "chunks": {"received": len(messages), "unique": len(kept), "duplicate_chunks": duplicate_chunks,
                   "duplicate_events": duplicate_events, "connections": peer.connections,
                   "modes": sorted({m.mode for m in messages}),
                   "events_mean": round(sum(entries) / max(1, len(entries)), 1),
                   "events_min": min(entries, default=0), "events_max": max(entries, default=0),
                   "bytes_mean": round(sum(sizes) / max(1, len(sizes))), "bytes_min": min(sizes, default=0),
                   "bytes_max": max(sizes, default=0), "bytes_total": sum(m.nbytes for m in messages),
                   "first_received_seconds": round(received[0], 3) if received else None,
                   "last_received_seconds": round(received[-1], 3) if received else None,
                   "gap_between_chunks_ms": distribution(gaps),
                   "peer_decoded_to_ack_ms": distribution(peer_turnaround)},
        "peer_errors": peer.errors()[:20],
    }


def verify_throughput(peer, meta: dict, input_path: str) -> dict:
    """The messages of the first delivery of every chunk, against the input lines, in order."""
    _, kept_events, duplicate_chunks, duplicate_events = first_deliveries(peer)
    received = [event.record.get("message") for carried in kept_events for event in carried]
    with open(input_path, encoding="utf-8") as source:
        expected = source.read().split("\n")[:-1]
    in_order = received == expected
    mismatch = None
    if not in_order:
        index = next((i for i, (a, b) in enumerate(zip(received, expected)) if a != b), min(len(received),
                                                                                            len(expected)))
        mismatch = {"index": index, "received": received[index] if index < len(received) else None,
                    "expected": expected[index] if index < len(expected) else None}
    ok = len(received) == meta["lines"] and in_order
    log(f"  verify: {len(received):,} events in first deliveries (expected {meta['lines']:,}), "
        f"{duplicate_events:,} duplicate events in {duplicate_chunks} chunks received again, messages "
        f"{'match the input in order' if in_order else f'DIFFER at {mismatch}'}; peer errors: {len(peer.errors())}")
    return {"events": len(received), "verified": ok, "in_order": in_order, "mismatch": mismatch}


# ---------------------------------------------------------------- latency

def latency_lines(input_path: str, count: int) -> list[bytes]:
    """Realistic line bodies (the throughput file's first lines) to put after the sequence numbers."""
    bodies = []
    with open(input_path, "rb") as source:
        for line in source:
            bodies.append(line)
            if len(bodies) >= count:
                break
    return bodies



def bench_latency(input_path: str, workdir: str, seconds: float, rate: int, timeout: float) -> Result:
    peer = harness.ForwardPeer()
    try:
        data = os.path.join(workdir, "data")
        followed = os.path.join(workdir, "app.log")
        open(followed, "wb").close()
        conf = write_config(workdir, LATENCY_CONF.format(data=data, tag=TAG, input=followed,
                                                         output=FLUENTD_OUTPUT.format(address=peer.address)))
        per_batch = max(1, round(rate * BATCH_PERIOD))
        batches = max(1, round(seconds / BATCH_PERIOD))
        total = per_batch * batches
        bodies = latency_lines(input_path, 1000)
        written = [0.0] * total  # monotonic time each line's write() returned
        started = time.monotonic()
        proc, errors = start_agent(conf, workdir)
        fd = None
        try:
            ready = wait_for_text(os.path.join(workdir, "shipper.stderr"), b"tailing " + followed.encode(), proc, 30)
            agent = psutil.Process(proc.pid)
            warmup = min(5.0, seconds / 6)  # steady-state CPU is measured after this much writing
            cpu_marks: dict[str, tuple[float, float]] = {}
            rss_samples = []
            peer_threads = PeerThreads()
            own_before = own_cpu_seconds()
            background = Background()
            fd = os.open(followed, os.O_WRONLY | os.O_APPEND)
            nbytes = 0
            late_batches = 0
            write_seconds_max = 0.0
            t0 = time.monotonic()
            for k in range(batches):
                late_batches += keep_pace(t0 + k * BATCH_PERIOD, BATCH_PERIOD)
                first = k * per_batch
                chunk = b"".join(b"seq=%0*d %s" % (SEQ_WIDTH, seq, bodies[seq % len(bodies)])
                                 for seq in range(first, first + per_batch))
                before = time.monotonic()
                os.write(fd, chunk)  # O_APPEND, unbuffered: visible to readers once write() returns
                after = time.monotonic()
                write_seconds_max = max(write_seconds_max, after - before)
                nbytes += len(chunk)
                for seq in range(first, first + per_batch):
                    written[seq] = after
                if "steady_start" not in cpu_marks and after - t0 >= warmup:
                    cpu_marks["steady_start"] = (after, cpu_seconds(proc.pid))
                if k % 100 == 99:  # every second
                    rss_samples.append(agent.memory_info().rss / 2**20)
            end_writing = time.monotonic()
            cpu_marks["steady_end"] = (end_writing, cpu_seconds(proc.pid))
            writing_seconds = end_writing - t0

            def all_acked():
                acks = first_acks(peer)
                kept, kept_events, _, _ = first_deliveries(peer)
                return sum(m.entries for m in kept if m.chunk in acks) >= total

            deadline = time.monotonic() + max(10.0, timeout - (time.monotonic() - started))
            while not all_acked() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
            drained = time.monotonic() - end_writing
            cpu, rss = cpu_seconds(proc.pid), peak_rss_mib(proc.pid)
            rss_now = agent.memory_info().rss / 2**20
            threads, faults = thread_cpu(proc.pid), minor_faults(proc.pid)
            own_cpu = own_cpu_seconds() - own_before
            peer_cpu = peer_threads.sample()
            other, steal = background.other(cpu)
        finally:
            if fd is not None:
                os.close(fd)
            code, exit_seconds = stop(proc, timeout=60)
            errors.close()

        (s0, c0), (s1, c1) = cpu_marks["steady_start"], cpu_marks["steady_end"]
        steady_cpu_percent = 100 * (c1 - c0) / (s1 - s0)
        extra = {"rate": rate, "lines_per_batch": per_batch, "batch_period_ms": BATCH_PERIOD * 1000,
                 "writing_seconds": round(writing_seconds, 2), "late_batches": late_batches,
                 "write_call_max_ms": round(write_seconds_max * 1000, 2),
                 "agent_ready_seconds": round(ready - started, 2),
                 "drained_seconds_after_writing": round(drained, 2),
                 "steady_state": {"from_seconds": round(s0 - t0, 2), "to_seconds": round(s1 - t0, 2),
                                  "agent_cpu_seconds": round(c1 - c0, 3),
                                  "agent_cpu_percent_of_a_core": round(steady_cpu_percent, 2)},
                 "agent_cpu_seconds_total": round(cpu, 2), "agent_rss_mib_end": round(rss_now, 1),
                 "agent_rss_mib_samples": [round(v, 1) for v in rss_samples],
                 "exit_code": code, "seconds_to_exit_after_sigterm": round(exit_seconds, 2),
                 "minor_faults": faults, "own_cpu_seconds": round(own_cpu, 2),
                 "peer_threads_cpu_seconds": round(peer_cpu, 2), "other_cpu_seconds": other,
                 "steal_cpu_seconds": steal, "threads": threads}
        extra.update(latency_figures(peer, written, t0))
        extra["chunk_stats"] = chunk_figures(peer, t0)["chunks"]
    finally:
        peer.stop()
    log(f"  latency p50 {extra['latency_ms']['p50']:.0f} ms, p90 {extra['latency_ms']['p90']:.0f}, "
        f"p99 {extra['latency_ms']['p99']:.0f}, max {extra['latency_ms']['max']:.0f} over "
        f"{extra['latency_ms']['count']:,} lines ({extra['lines_acked']:,} of {total:,} acknowledged); "
        f"agent {steady_cpu_percent:.1f} % of a core in the steady state, {rss_now:.1f} MiB RSS")
    return Result("latency", writing_seconds, nbytes, total, c1 - c0, rss, extra)


def latency_figures(peer, written: list[float], t0: float) -> dict:
    """Per line: ack of its first delivery - write; and the two parts (write -> peer decoded -> ack sent)."""
    acks = first_acks(peer)
    kept, kept_events, duplicate_chunks, duplicate_events = first_deliveries(peer)
    total = len(written)
    delivered: dict[int, tuple[float, float]] = {}  # seq -> (decoded at the peer, ack sent), first acked delivery
    unknown = 0
    for message, carried in zip(kept, kept_events):
        ack = acks.get(message.chunk)
        if ack is None:
            continue
        for event in carried:
            text = event.record.get("message", "")
            try:
                seq = int(text[4:4 + SEQ_WIDTH]) if text.startswith("seq=") else -1
            except ValueError:
                seq = -1
            if not 0 <= seq < total:
                unknown += 1
                continue
            if seq not in delivered or ack < delivered[seq][1]:
                delivered[seq] = (message.received_monotonic, ack)
    latencies, to_peer, in_peer = [], [], []
    per_second: dict[int, list[float]] = {}
    worst = (0.0, -1)
    for seq in sorted(delivered):
        decoded, ack = delivered[seq]
        latency = ack - written[seq]
        latencies.append(latency)
        to_peer.append(decoded - written[seq])
        in_peer.append(ack - decoded)
        per_second.setdefault(int(written[seq] - t0), []).append(latency)
        worst = max(worst, (latency, seq))
    overall = distribution(latencies)
    return {
        "latency_ms": overall,
        "p99_under_target": bool(latencies) and overall["p99"] < LATENCY_TARGET * 1000,
        "lines_acked": len(delivered), "lines_missing": total - len(delivered), "unknown_events": unknown,
        "duplicate_chunks": duplicate_chunks, "duplicate_events": duplicate_events,
        "write_to_peer_decoded_ms": distribution(to_peer),
        "peer_decoded_to_ack_ms": distribution(in_peer),
        "worst_line": {"seq": worst[1],
                       "written_seconds": round(written[worst[1]] - t0, 3) if worst[1] >= 0 else None,
                       "latency_ms": round(worst[0] * 1000, 1)},
        "per_second_ms": [{"second": second, **{k: v for k, v in distribution(values).items()
                                                if k in ("count", "p50", "p99", "max")}}
                          for second, values in sorted(per_second.items())],
        "peer_errors": peer.errors()[:20],
    }


# ---------------------------------------------------------------- report

THROUGHPUT_HEADER = ("destination", "lines", "MB", "seconds", "MB/s", "lines/s", "agent CPU s", "agent RSS MiB",
                     "peer CPU s", "chunks", "events/chunk", "bytes/chunk")
LATENCY_HEADER = ("latency", "lines", "lines/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "p99 < 2 s",
                  "agent CPU % of a core", "agent RSS MiB")


THROUGHPUT_LABELS = {"throughput": "fluentd (ForwardPeer)", "throughput-lean": "fluentd (lean acker)"}


def throughput_rows(results: list[Result], directory: dict | None) -> list[tuple[str, ...]]:
    out = []
    for r in results:
        if r.name not in THROUGHPUT_LABELS:
            continue
        c = r.extra["chunks"]
        out.append((THROUGHPUT_LABELS[r.name], f"{r.lines:,}", f"{r.bytes / 1e6:.1f}", f"{r.seconds:.2f}",
                    f"{r.mb_per_s:.1f}", f"{r.lines_per_s:,.0f}", f"{r.cpu_seconds:.2f}", f"{r.peak_rss_mib:.1f}",
                    f"{r.extra['own_cpu_seconds']:.2f}", f"{c['unique']:,}", f"{c['events_mean']:,.0f}",
                    f"{c['bytes_mean']:,}"))
    if directory and out:
        d = directory
        out.append(("directory*", f"{d['lines']:,}", f"{d['bytes'] / 1e6:.1f}", f"{d['seconds']:.2f}",
                    f"{d['mb_per_s']:.1f}", f"{d['lines_per_s']:,.0f}", f"{d['cpu_seconds']:.2f}",
                    f"{d['peak_rss_mib']:.1f}", "-", "-", "-", "-"))
    return out


def latency_rows(results: list[Result]) -> list[tuple[str, ...]]:
    out = []
    for r in results:
        if r.name != "latency":
            continue
        e = r.extra
        lat = e["latency_ms"]
        out.append((f"{e['rate']:,} lines/s, {e['writing_seconds']:.0f} s", f"{lat['count']:,}",
                    f"{r.lines_per_s:,.0f}", f"{lat['p50']:,.0f}", f"{lat['p90']:,.0f}", f"{lat['p99']:,.0f}",
                    f"{lat['max']:,.0f}", "yes" if e["p99_under_target"] else "NO",
                    f"{e['steady_state']['agent_cpu_percent_of_a_core']:.1f}", f"{e['agent_rss_mib_end']:.1f}"))
    return out



def md_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def ms(d: dict) -> str:
    return f"min {d['min']:,.0f}, p50 {d['p50']:,.0f}, p90 {d['p90']:,.0f}, p99 {d['p99']:,.0f}, max {d['max']:,.0f} ms"


def markdown(results: list[Result], meta: dict | None, info: dict, directory: dict | None) -> str:
    by_name = {r.name: r for r in results}
    out = [
        "# Fluentd benchmark",
        "",
        f"{info['date']} on {info['nproc']} cores ({info['cpu']}), {info['memory_gib']} GiB, "
        f"Linux {info['kernel']}, Python {info['python']}; {info['shipper']} (commit {info['commit']}), "
        f"msgpack {info['msgpack']}; the peer (tests/forward_peer.py's ForwardPeer, or the lean acker of "
        f"bench/fluentd.py) runs in the benchmark's process.",
        "",
    ]
    throughputs = [r for r in results if r.name in THROUGHPUT_LABELS]
    if throughputs and meta:
        out += [
            "## Throughput",
            "",
            f"Input: the throughput benchmark's generator (bench/loggen.py, seed {meta['seed']}, "
            f"{meta['exc_json_share']:.1%} exc_info share), the first {meta['lines']:,} lines "
            f"({meta['bytes'] / 1e6:.1f} MB), cached in bench/work/fluentd-input.log. Read from the page cache.",
            "",
            *md_table(THROUGHPUT_HEADER, throughput_rows(results, directory)),
            "",
        ]
        if directory:
            out += [f"\\* directory: the shipper row of bench/results/throughput.json ({directory['date']}, "
                    f"commit {directory['commit']}; file -> directory archive, gzip level 1, on its own "
                    f"{directory['lines']:,}-line input), not measured by this script.", ""]
        for r in throughputs:
            e, c = r.extra, r.extra["chunks"]
            out.append(f"- {THROUGHPUT_LABELS[r.name]}: verified: {e['verified']}: {e['events']:,} events in the "
                       f"first delivery of each chunk (expected {r.lines:,}), messages "
                       + ("equal to the input lines in order" if e["in_order"]
                          else f"NOT equal to the input lines: {e['mismatch']}")
                       + f"; {c['duplicate_events']:,} duplicate events in {c['duplicate_chunks']} chunk(s) "
                       f"received again; {c['connections']} connection(s); modes {', '.join(c['modes'])}; "
                       f"peer errors: {len(e['peer_errors'])}")
            out.append(f"  - chunks: {c['unique']:,} ({c['received']:,} received), {c['events_mean']:,} events a "
                       f"chunk (min {c['events_min']:,}, max {c['events_max']:,}), {c['bytes_mean']:,} bytes a "
                       f"chunk (min {c['bytes_min']:,}, max {c['bytes_max']:,}), {c['bytes_total'] / 1e6:.1f} MB of "
                       f"forward messages in all ({c['bytes_total'] / r.bytes:.2f}x the input)")
            out.append(f"  - timing: reader at the end of the file at ~{e['reader_done_seconds_approx']} s (rchar), "
                       f"first chunk decoded by the peer at {c['first_received_seconds']} s, last at "
                       f"{c['last_received_seconds']} s, checkpoint at the file size at {r.seconds:.2f} s; between "
                       f"two chunks: {ms(c['gap_between_chunks_ms'])}; from a chunk decoded to its ack sent: "
                       f"{ms(c['peer_decoded_to_ack_ms'])}")
            out.append(f"  - CPU (cores busy on average, of 2): agent {r.cpu_seconds / r.seconds:.2f}, peer "
                       f"{e['own_cpu_seconds'] / r.seconds:.2f} (this process: {e['own_cpu_seconds']:.2f} CPU s, of "
                       f"which the peer's connection thread(s) {e['peer_threads_cpu_seconds']:.2f}); agent exit after "
                       f"SIGTERM {e['seconds_to_exit_after_sigterm']:.2f} s, exit code {e['exit_code']}; CPU s used "
                       f"by other processes / stolen by the hypervisor (both should be ~0): "
                       f"{e['other_cpu_seconds']:.2f} / {e['steal_cpu_seconds']:.2f}")
            if "runs" in e:
                out.append(f"  - median of {len(e['runs'])} runs, which took "
                           + ", ".join(f"{run['seconds']:.2f}" for run in e["runs"]) + " s")
        measured = {r.name: r for r in throughputs}
        if len(measured) == 2:
            full, lean = measured["throughput"], measured["throughput-lean"]
            busy = full.extra["peer_threads_cpu_seconds"] / full.seconds
            out.append(f"- bottleneck: with the ForwardPeer, its connection thread was busy {busy:.0%} of the run "
                       f"(it decodes every event into Python objects under the GIL) while the agent used "
                       f"{full.cpu_seconds / full.seconds:.2f} of a core: that row measures the peer. With the "
                       f"lean acker the agent ran at {lean.cpu_seconds / lean.seconds:.2f} cores and shipped "
                       f"{lean.mb_per_s / full.mb_per_s:.1f}x faster, on {lean.cpu_seconds:.2f} CPU s instead of "
                       f"{full.cpu_seconds:.2f}")
        out.append("")
    if "latency" in by_name:
        r = by_name["latency"]
        e = r.extra
        s = e["steady_state"]
        c = e["chunk_stats"]
        out += [
            "## Latency",
            "",
            *md_table(LATENCY_HEADER, latency_rows(results)),
            "",
            f"- {e['lines_acked']:,} of {r.lines:,} lines acknowledged ({e['lines_missing']} missing), "
            f"{e['duplicate_events']} duplicate events in {e['duplicate_chunks']} chunk(s) received again; "
            f"p99 under the {LATENCY_TARGET:g} s target: {'yes' if e['p99_under_target'] else 'NO'}",
            f"- where the time goes: written -> chunk decoded by the peer {ms(e['write_to_peer_decoded_ms'])}; "
            f"decoded -> ack sent {ms(e['peer_decoded_to_ack_ms'])}; worst line: seq {e['worst_line']['seq']} "
            f"written at {e['worst_line']['written_seconds']} s, {e['worst_line']['latency_ms']:,.0f} ms",
            f"- chunks: {c['unique']:,}, {c['events_mean']:,} events a chunk (min {c['events_min']}, max "
            f"{c['events_max']}), {c['bytes_mean']:,} bytes a chunk; between two chunks: "
            f"{ms(c['gap_between_chunks_ms'])}",
            f"- per second of writing, worst p99 {max(p['p99'] for p in e['per_second_ms']):,.0f} ms and best p99 "
            f"{min(p['p99'] for p in e['per_second_ms']):,.0f} ms (all seconds in the JSON)",
            f"- agent: {s['agent_cpu_seconds']:.2f} CPU s from {s['from_seconds']} s to {s['to_seconds']} s of "
            f"writing = {s['agent_cpu_percent_of_a_core']:.1f} % of a core; {e['agent_cpu_seconds_total']:.2f} CPU s "
            f"in all (start-up included); RSS {e['agent_rss_mib_end']:.1f} MiB at the end of writing (peak "
            f"{r.peak_rss_mib:.1f}); exit after SIGTERM {e['seconds_to_exit_after_sigterm']:.2f} s, exit code "
            f"{e['exit_code']}",
            f"- writer: {e['lines_per_batch']} lines every {e['batch_period_ms']:.0f} ms for "
            f"{e['writing_seconds']:.2f} s ({r.bytes / 1e6:.1f} MB), {e['late_batches']} batch(es) over 10 ms late, "
            f"slowest write() {e['write_call_max_ms']} ms; agent ready (logged `tailing`) "
            f"{e['agent_ready_seconds']} s after its start; every line acknowledged "
            f"{e['drained_seconds_after_writing']} s after the last write; CPU s used by other processes / stolen "
            f"(both should be ~0): {e['other_cpu_seconds']:.2f} / {e['steal_cpu_seconds']:.2f}",
            "",
        ]
    out += [
        "## Method",
        "",
        "Each measurement starts a fresh ForwardPeer (tests/forward_peer.py: a TCP server on 127.0.0.1 with "
        "one thread per connection, which decodes every message into Python objects, records every event and "
        "answers `{\"ack\": chunk}` right after) and a fresh agent whose only output is `type = \"fluentd\"` "
        "with `hosts` the peer, `require_ack = true`, `compression = \"none\"`; the other output options are the "
        "defaults (max_in_flight 16, ack_timeout 30s). The peer runs in the benchmark's process: its CPU is "
        "this process's user+sys during the run (polling included); its connection threads' own CPU is given "
        "too. The lean acker (bench/fluentd.py LeanAcker) replaces the ForwardPeer in the second row: per "
        "message it only finds the message's end (msgpack skip(), in C), reads the option map and sends the "
        "ack; the events are decoded and checked against the input after the run. "
        "throughput: the agent of the throughput benchmark (checkpoint_interval 100ms, start_at "
        "beginning, parser none); timed from process start until the checkpoint equals the file size (it "
        "moves only once the peer acknowledged the chunks), then SIGTERM; chunk figures count the forward "
        "messages as the peer received them (bytes: the message's msgpack length on the wire). latency: agent "
        "and input defaults (flush_interval 1s, poll_interval 500ms, read_bytes 1 MiB, checkpoint_interval 1s), "
        "only data_dir, metadata off, the input's tag and path and the output set; the file exists (empty) "
        "before the agent starts and the writer starts once the agent logged that it tails it. The writer "
        "appends, every 10 ms on a fixed schedule, a batch of lines `seq=NNNNNNNNN <a line of the throughput "
        "file>` with one os.write() (O_APPEND, no user-space buffer); each line's write time is when that "
        "write() returned, its delivery time when the peer sent the ack of the first chunk that carried it "
        "(taken just before the ack is written to the socket), both with time.monotonic() in this process. "
        "Steady-state agent CPU is user+sys between the first 5 s of writing and its end; RSS is VmRSS (peak: "
        "VmHWM).",
        "",
    ]
    return "\n".join(out)


# ---------------------------------------------------------------- main

def measure(name: str, meta: dict, input_path: str, run_dir: str, args: argparse.Namespace,
            py_spy: list[str] | None) -> Result:
    workdir = tempfile.mkdtemp(prefix=f"{name}-", dir=run_dir)
    if args.quiet_wait > 0:
        wait_quiet(args.quiet_wait, log)
    if name in THROUGHPUT_LABELS:
        result = bench_throughput(name, meta, input_path, workdir, args.timeout,
                                  py_spy)
        e, c = result.extra, result.extra["chunks"]
        log(f"  {result.seconds:.2f}s, {result.mb_per_s:.1f} MB/s, {result.lines_per_s:,.0f} lines/s, agent "
            f"{result.cpu_seconds:.2f} CPU s, {result.peak_rss_mib:.1f} MiB peak RSS; peer (this process) "
            f"{e['own_cpu_seconds']:.2f} CPU s; {c['unique']:,} chunks of {c['events_mean']:,.0f} events, "
            f"{c['bytes_mean']:,} bytes")
    else:
        result = bench_latency(input_path, workdir, args.latency_seconds, args.latency_rate, args.timeout)
        e = result.extra
    if not args.keep:
        shutil.rmtree(workdir)
    warn_if_disturbed(result.seconds, e["other_cpu_seconds"], e["steal_cpu_seconds"], log)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000,
                        help="lines shipped in the throughput measurement (default 1,000,000)")
    parser.add_argument("--latency-seconds", type=float, default=30.0,
                        help="seconds of writing in the latency measurement (default 30)")
    parser.add_argument("--latency-rate", type=int, default=1000,
                        help="lines a second written in the latency measurement (default 1,000)")
    parser.add_argument("--only", nargs="+", choices=MEASUREMENTS, help="run only these measurements")
    add_common_arguments(parser, timeout=300, what="agent run")
    add_py_spy_argument(parser, "the agent of the throughput run(s) (with --only one of them)")
    args = parser.parse_args(argv)
    names = args.only or list(MEASUREMENTS)
    results_name = args.results or (None if args.only else "fluentd")
    py_spy = py_spy_command(args, os.path.join(ROOT, ".venv", "bin"))

    # The latency writer takes its line bodies from the same file: it is always needed.
    meta = loggen.ensure(INPUT, args.lines, args.seed, args.exc_json_share, log=log)
    subprocess.run(["cat", INPUT], stdout=subprocess.DEVNULL, check=True)  # into the page cache
    info = machine()
    for tool in ("rsyslog", "gzip"):
        info.pop(tool, None)
    import msgpack
    info["msgpack"] = ".".join(map(str, msgpack.version))
    log(f"{info['nproc']} cores, {info['cpu']}; {info['shipper']} (commit {info['commit']}); msgpack {info['msgpack']}")

    results = measure_all(
        list(MEASUREMENTS), names, args.repeat,
        lambda name, run_dir: measure(name, meta, INPUT, run_dir, args, py_spy),
        lambda r: {"seconds": round(r.seconds, 3), "cpu_seconds": round(r.cpu_seconds, 2),
                   **({"p99_ms": r.extra["latency_ms"]["p99"]} if r.name == "latency" else {})},
        WORK, args.keep, log)

    directory = directory_figure()
    print()
    if any(r.name in THROUGHPUT_LABELS for r in results):
        print(format_table(THROUGHPUT_HEADER, throughput_rows(results, directory)))
        if directory:
            print("* directory: the shipper row of bench/results/throughput.json, not measured here")
        print()
    if any(r.name == "latency" for r in results):
        print(format_table(LATENCY_HEADER, latency_rows(results)))
    if results_name:
        document = {"machine": info, "input": meta, "results": [r.as_dict() for r in results],
                    "directory_from_throughput_json": directory}
        write_results(RESULTS, results_name, document,
                      markdown(results, meta if set(names) & set(THROUGHPUT_LABELS) else None, info, directory), log)
    ok = all(r.extra["verified"] if r.name in THROUGHPUT_LABELS else r.extra["lines_missing"] == 0 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
