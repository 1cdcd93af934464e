"""Benchmark of the network inputs (issue 20): events sent to a real agent subprocess on loopback,
journaled, read back and archived by the directory output (gzip NDJSON).

1. forward, flat out: ``--events`` (1,000,000) in Forward chunks of ``--chunk`` events, each with a
   chunk id, ``--connections`` clients each waiting for its ack before the next chunk (as Fluent Bit
   and fluent-logger with acks do): events/s, MB/s of msgpack, the agent's CPU seconds, ack latency.
   The chunks are packed before the clock starts, so the client's own work does not take the core
   the agent would use.
2. forward at a paced 10,000 events/s (chunks of 100 every 10 ms): the ack latency p50/p99.
3. fluent-logger (Python), one event per emit, as an application logs: events/s.
4. syslog over TCP (newline framing), flat out: events/s.

Every run ends when the archive holds every event; the figures are printed as a table and JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import msgpack

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import cpu_seconds  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_agent(work: Path, inputs: str) -> subprocess.Popen:
    config = work / "shipper.toml"
    config.write_text(f"""
[agent]
data_dir = "{work}/data"
flush_interval = "1s"
shutdown_timeout = "30s"
[cloud]
metadata = "off"
[server]
listen = ""
{inputs}
[[outputs]]
type = "directory"
path = "{work}/archive"
upload_interval = "2s"
""")
    return subprocess.Popen([sys.executable, "-m", "shipper", "run", "-c", str(config)], cwd=ROOT,
                            stderr=open(work / "agent.stderr", "wb"))


def wait_port(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the agent exited: " + Path(proc.args[-1]).with_name("agent.stderr").read_text()[-2000:])
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"the agent is not listening on {port}")


def archived(work: Path) -> int:
    count = 0
    for path in (work / "archive").rglob("*.ndjson.gz"):
        if ".tmp" in path.parts:
            continue
        try:
            count += gzip.decompress(path.read_bytes()).count(b"\n")
        except (OSError, EOFError):
            pass
    return count


def wait_archived(work: Path, want: int, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if archived(work) >= want:
            return time.monotonic()
        time.sleep(0.2)
    raise SystemExit(f"only {archived(work)} of {want} events archived")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0


RECORD = {"log": "GET /api/orders/12345 HTTP/1.1 200 512 0.003 \"curl/8.0\"", "container_id": "c" * 64,
          "container_name": "/web", "source": "stdout"}


def forward_chunks(chunks: int, chunk_size: int, start: int) -> list[tuple[str, bytes]]:
    """(chunk id, Forward message) for a sender, made before the clock starts: the client's work is
    not the agent's, and both share this machine's two cores."""
    made = []
    for k in range(chunks):
        now = time.time()
        entries = [[now, {**RECORD, "n": start + k * chunk_size + i}] for i in range(chunk_size)]
        chunk = uuid.uuid4().hex
        made.append((chunk, msgpack.packb(["docker.web", entries, {"chunk": chunk}])))
    return made


def forward_sender(port: int, payloads: list[tuple[str, bytes]], latencies: list, sent_bytes: list,
                   pace: float | None = None) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    answers = msgpack.Unpacker(raw=False)
    total = 0
    due = time.monotonic()
    for chunk, payload in payloads:
        total += len(payload)
        if pace:
            due += pace
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        sent = time.perf_counter()
        sock.sendall(payload)
        while True:
            answer = next(answers, None)
            if answer is not None:
                break
            data = sock.recv(65536)
            if not data:
                raise SystemExit("the agent closed the connection")
            answers.feed(data)
        latencies.append(time.perf_counter() - sent)
        assert answer == {"ack": chunk}, answer
    sock.close()
    sent_bytes.append(total)


def run_forward(events: int, chunk: int, connections: int, pace: float | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="shipper-forward-bench-") as tmp:
        work = Path(tmp)
        port = free_port()
        proc = start_agent(work, f'[[inputs]]\ntype = "forward"\nlisten = "127.0.0.1:{port}"\nmessage_key = "log"\n')
        try:
            wait_port(port, proc)
            cpu_before = cpu_seconds(proc.pid)
            latencies: list[float] = []
            sent_bytes: list[int] = []
            per = events // connections // chunk
            payloads = [forward_chunks(per, chunk, c * per * chunk) for c in range(connections)]
            started = time.monotonic()
            threads = [threading.Thread(target=forward_sender, args=(port, payloads[c], latencies, sent_bytes, pace))
                       for c in range(connections)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            acked = time.monotonic()
            total = per * chunk * connections
            done = wait_archived(work, total)
            cpu = cpu_seconds(proc.pid) - cpu_before
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        seconds = acked - started
        return {"events": total, "acked_seconds": round(seconds, 2), "events_per_second": round(total / seconds),
                "mb_per_second": round(sum(sent_bytes) / seconds / 1e6, 1),
                "archived_seconds": round(done - started, 2), "agent_cpu_seconds": round(cpu, 2),
                "ack_p50_ms": round(percentile(latencies, 50) * 1000, 2),
                "ack_p99_ms": round(percentile(latencies, 99) * 1000, 2)}


def run_fluent_logger(events: int) -> dict:
    from fluent import sender

    with tempfile.TemporaryDirectory(prefix="shipper-forward-bench-") as tmp:
        work = Path(tmp)
        port = free_port()
        proc = start_agent(work, f'[[inputs]]\ntype = "forward"\nlisten = "127.0.0.1:{port}"\n')
        try:
            wait_port(port, proc)
            logger = sender.FluentSender("app", host="127.0.0.1", port=port)
            started = time.monotonic()
            for i in range(events):
                if not logger.emit("web", {"message": "user 42 logged in", "n": i}):
                    raise SystemExit(f"fluent-logger: {logger.last_error}")
            logger.close()
            sent = time.monotonic()
            wait_archived(work, events)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        return {"events": events, "events_per_second": round(events / (sent - started))}


def run_syslog(events: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="shipper-syslog-bench-") as tmp:
        work = Path(tmp)
        port = free_port()
        proc = start_agent(work, f'[[inputs]]\ntype = "syslog"\ntcp = "127.0.0.1:{port}"\nudp = ""\n')
        try:
            wait_port(port, proc)
            cpu_before = cpu_seconds(proc.pid)
            line = b"<86>1 2026-12-02T10:00:00.123456Z web-1 sshd 4242 AUTH - Accepted publickey for deploy port 51234\n"
            sock = socket.create_connection(("127.0.0.1", port))
            started = time.monotonic()
            block = line * 1000
            for _ in range(events // 1000):
                sock.sendall(block)
            sock.close()
            sent = time.monotonic()
            done = wait_archived(work, events // 1000 * 1000)
            cpu = cpu_seconds(proc.pid) - cpu_before
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        return {"events": events, "sent_seconds": round(sent - started, 2),
                "events_per_second": round(events / (done - started)),
                "mb_per_second": round(len(line) * events / (done - started) / 1e6, 1), "agent_cpu_seconds": round(cpu, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--paced-seconds", type=float, default=10.0)
    parser.add_argument("--fluent-logger-events", type=int, default=50_000)
    parser.add_argument("--syslog-events", type=int, default=300_000)
    args = parser.parse_args()
    results = {
        "forward_flat_out": run_forward(args.events, args.chunk, args.connections),
        "forward_10k_per_second": run_forward(int(10_000 * args.paced_seconds), 100, 1, pace=0.01),
        "fluent_logger": run_fluent_logger(args.fluent_logger_events),
        "syslog_tcp": run_syslog(args.syslog_events),
    }
    for name, figures in results.items():
        print(f"{name:24s} " + "  ".join(f"{k}={v}" for k, v in figures.items()))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
