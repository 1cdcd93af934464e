"""AWS benchmark: shipper shipping one log file to S3 and to CloudWatch Logs through a real moto_server.

    .venv/bin/python bench/aws.py [--s3-lines N] [--cwl-lines N] [--only s3 cwl] [--repeat N]

Each measurement gets a fresh moto_server on loopback with the recording proxy of the
tests (tests/aws.py: MotoServer, FaultProxy, no faults injected) in front of it; the agent
is configured with the proxy as its endpoint. One after the other (never in parallel, the
machine has 2 cores), after waiting for a quiet machine:

- s3   file -> s3 output (gzip level 1, upload_interval 2s, default object size): done when
       the checkpoint reaches the file size (every object is durable in the spool) and the
       spool holds no finished object (every object was uploaded); then SIGTERM, then the
       objects are read back from moto and checked record by record against the input
- cwl  file -> cloudwatch_logs output (format raw): done when the checkpoint reaches the
       file size (checkpoints move only once PutLogEvents accepted the events); then
       SIGTERM, then the events are read back from moto (get_log_events) and checked

moto is a Python process on the same 2 cores, and so is the proxy (inside this process):
their CPU seconds are reported next to the agent's, to show who the bottleneck was.
The inputs come from the generator of the throughput benchmark (bench/loggen.py, same
seed: the first N lines of its file), cached in bench/work/aws-{s3,cwl}-input.log.

Results: a table on stdout, bench/results/aws.json and bench/results/aws.md, with the
directory figure of bench/results/throughput.json for comparison.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import orjson
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loggen  # noqa: E402
from measure import (Background, Result, add_common_arguments, cpu_seconds, measure_all,  # noqa: E402
                     minor_faults, own_cpu_seconds, peak_rss_mib, poll_until, read_chars, stop, wait_quiet,
                     warn_if_disturbed, write_results, format_table)
from throughput import AGENT_CONF, aws_machine, checkpoint_offset, directory_figure, thread_cpu  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
WORK = os.path.join(BENCH, "work")
RESULTS = os.path.join(BENCH, "results")
SHIPPER = os.path.join(ROOT, ".venv", "bin", "shipper")
POLL = 0.05  # seconds between completion checks
DESTINATIONS = ("s3", "cwl")
BUCKET = "shipper-bench"
TAG = "bench"


def _load_harness():
    """tests/aws.py, loaded by path: on sys.path it would be shadowed by this file (also aws.py)."""
    spec = importlib.util.spec_from_file_location("moto_harness", os.path.join(ROOT, "tests", "aws.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


harness = _load_harness()


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------- moto + proxy

class Stack:
    """A fresh moto_server and the recording proxy in front of it, for one measurement."""

    def __init__(self, workdir: str):
        self.moto = harness.MotoServer(Path(workdir) / "moto_server.log")
        self.proxy = harness.FaultProxy(self.moto.url)
        self.env = {**os.environ, **harness.Aws(self.proxy, self.moto).env}
        self.process = psutil.Process(self.moto.process.pid)
        self.started = 0.0  # the agent's start (monotonic): request times are relative to it
        self.times: dict[int, tuple[float, float]] = {}  # id(recorded request) -> (sent to moto, answered)
        forward = self.proxy._forward

        def timed_forward(request, *args):
            """The proxy's forwarding, timed: when each request went to moto and when moto answered."""
            sent = time.monotonic()
            answer = forward(request, *args)
            self.times[id(request)] = (sent - self.started, time.monotonic() - self.started)
            return answer

        self.proxy._forward = timed_forward

    def moto_cpu(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def moto_peak_rss_mib(self) -> float:
        return peak_rss_mib(self.process.pid)

    def close(self) -> None:
        self.proxy.stop()
        self.moto.stop()


S3_OUTPUT = """
[[outputs]]
type = "s3"
bucket = "{bucket}"
prefix = "bench"
endpoint_url = "{endpoint}"
region = "us-east-1"
compression = "gzip"
compression_level = 1
upload_interval = "2s"
"""

CWL_OUTPUT = """
[[outputs]]
type = "cloudwatch_logs"
log_group = "/bench/{{tag}}"
endpoint_url = "{endpoint}"
region = "us-east-1"
format = "raw"
flush_interval = "1s"
"""


def spooled_objects(spool: str) -> int:
    """Finished objects in the S3 spool: everything but .seq and the objects being built in .tmp/."""
    count = 0
    for directory, subdirs, files in os.walk(spool):
        if directory == spool:
            subdirs[:] = [d for d in subdirs if d != ".tmp"]
            files = [f for f in files if not f.startswith(".seq")]
        count += len(files)
    return count


def run_agent(name: str, config: str, workdir: str, stack: Stack, size: int, timeout: float, step,
              background: Background) -> dict:
    """Run the agent until ``step(now, started, sample)`` says done; then SIGTERM it.

    ``step`` returns (done, progress) like measure.poll_until's; ``sample`` is True every
    0.5 s, when it should add a point to the timeline it keeps. Returns what was measured.
    """
    conf = os.path.join(workdir, "shipper.toml")
    with open(conf, "w") as handle:
        handle.write(config)
    moto_before, own_before = stack.moto_cpu(), own_cpu_seconds()
    with open(os.path.join(workdir, "shipper.stderr"), "wb") as errors:
        started = stack.started = time.monotonic()
        proc = subprocess.Popen([SHIPPER, "run", "-c", conf], stdout=errors, stderr=errors, env=stack.env)
        try:
            last_sample = 0.0
            read_done = None

            def poll(now):
                nonlocal last_sample, read_done
                # rchar counts every read of the process: ~9 MB of them are start-up (boto3's modules and
                # service models), so this is when most of the file was read, not all of it.
                if read_done is None and read_chars(proc.pid) >= size:
                    read_done = now - started
                sample = now - last_sample >= 0.5
                if sample:
                    last_sample = now
                return step(now, started, proc, sample)

            elapsed = poll_until(proc, name, started, timeout, POLL, poll) - started
            cpu, rss, threads = cpu_seconds(proc.pid), peak_rss_mib(proc.pid), thread_cpu(proc.pid)
            faults = minor_faults(proc.pid)
            moto_cpu = stack.moto_cpu() - moto_before
            proxy_cpu = own_cpu_seconds() - own_before  # the proxy's threads, and this process polling
            other, steal = background.other(cpu + moto_cpu)
        finally:
            code, exit_seconds = stop(proc, timeout=60)
    return {"seconds": elapsed, "cpu": cpu, "rss": rss, "exit_code": code,
            "seconds_to_exit_after_sigterm": round(exit_seconds, 2), "minor_faults": faults,
            "reader_done_seconds_approx": None if read_done is None else round(read_done, 2),
            "moto_cpu_seconds": round(moto_cpu, 2), "moto_peak_rss_mib": round(stack.moto_peak_rss_mib(), 1),
            "proxy_cpu_seconds": round(proxy_cpu, 2), "other_cpu_seconds": other, "steal_cpu_seconds": steal,
            "threads": threads}


def request_log(stack: Stack, kind_of) -> list[list]:
    """[kind, sent to moto, answered (s since the agent started), HTTP status, body bytes] of every request."""
    out = []
    for request in stack.proxy.requests():
        sent, answered = stack.times.get(id(request), (None, None))
        out.append([kind_of(request), sent and round(sent, 3), answered and round(answered, 3), request.status,
                    len(request.body)])
    return out


def body_stats(sizes: list[int]) -> dict:
    if not sizes:
        return {"count": 0}
    return {"count": len(sizes), "bytes_total": sum(sizes), "bytes_mean": round(sum(sizes) / len(sizes)),
            "bytes_min": min(sizes), "bytes_max": max(sizes)}


def request_kinds(requests: list, kind_of) -> dict:
    """Per kind of request: how many, how many did not get a 2xx, and their body sizes."""
    kinds = collections.defaultdict(list)
    failed = collections.Counter()
    for request in requests:
        kind = kind_of(request)
        kinds[kind].append(len(request.body))
        if request.status is None or not 200 <= request.status < 300:
            failed[kind] += 1
    return {kind: {**body_stats(sizes), "not_2xx": failed[kind]} for kind, sizes in kinds.items()}


# ---------------------------------------------------------------- S3

def s3_kind(request) -> str:
    url = urlsplit(request.path)
    query = parse_qs(url.query, keep_blank_values=True)
    has_key = bool(url.path.lstrip("/").partition("/")[2])
    if request.method == "PUT" and "partNumber" in query:
        return "UploadPart"
    if request.method == "PUT" and has_key:
        return "PutObject"
    if request.method == "POST" and "uploads" in query:
        return "CreateMultipartUpload"
    if request.method == "POST" and "uploadId" in query:
        return "CompleteMultipartUpload"
    if request.method == "DELETE" and "uploadId" in query:
        return "AbortMultipartUpload"
    return f"{request.method} {url.path}"


def bench_s3(meta: dict, input_path: str, workdir: str, timeout: float) -> Result:
    stack = Stack(workdir)
    try:
        stack.moto.client("s3").create_bucket(Bucket=BUCKET)
        data = os.path.join(workdir, "data")
        checkpoint = os.path.join(data, "checkpoints", f"file-{TAG}.json")
        spool = os.path.join(data, "spool", "s3.0")
        config = AGENT_CONF.format(data=data, tag=TAG, input=input_path,
                                   output=S3_OUTPUT.format(bucket=BUCKET, endpoint=stack.proxy.url))
        size = meta["bytes"]
        spooled_at = None
        timeline = []

        def step(now, started, proc, sample):
            nonlocal spooled_at
            offset = checkpoint_offset(checkpoint, input_path)
            if spooled_at is None and offset == size:
                spooled_at = now - started
            waiting = spooled_objects(spool) if os.path.isdir(spool) else -1
            done = spooled_at is not None and waiting == 0
            if sample or done:
                uploaded = sum(len(r.body) for r in stack.proxy.requests(method="PUT") if r.status == 200)
                timeline.append({"t": round(now - started, 2), "checkpoint": offset, "spooled_objects": waiting,
                                 "uploaded_bytes": uploaded, "agent_cpu": round(cpu_seconds(proc.pid), 2),
                                 "moto_cpu": round(stack.moto_cpu(), 2)})
            return done, f"checkpoint at {offset} of {size}, {waiting} objects in the spool; see {workdir}"

        background = Background()
        run = run_agent("shipper (s3)", config, workdir, stack, size, timeout, step, background)
        requests = request_kinds(stack.proxy.requests(), s3_kind)
        bodies = [r for r in stack.proxy.requests(method="PUT") if s3_kind(r) in ("PutObject", "UploadPart")]
        extra = {**{k: v for k, v in run.items() if k not in ("seconds", "cpu", "rss")},
                 "spooled_seconds": None if spooled_at is None else round(spooled_at, 2),
                 "requests": requests,
                 "put_bodies": body_stats([len(r.body) for r in bodies]),
                 "compressed_bytes": sum(len(r.body) for r in bodies if r.status == 200),
                 "request_log": request_log(stack, s3_kind), "timeline": timeline}
        data_calls = [e for e in extra["request_log"] if e[0] in ("PutObject", "UploadPart", "CompleteMultipartUpload")]
        extra["first_upload_sent_seconds"] = min((e[1] for e in data_calls if e[1] is not None), default=None)
        extra["last_upload_answered_seconds"] = max((e[2] for e in data_calls if e[2] is not None), default=None)
        extra.update(verify_s3(stack, meta, input_path))
    finally:
        stack.close()
    return Result("s3", run["seconds"], size, meta["lines"], run["cpu"], run["rss"], extra)


def verify_s3(stack: Stack, meta: dict, input_path: str) -> dict:
    """Download every object from moto directly and check the records' messages against the input, in order."""
    s3 = stack.moto.client("s3")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]

    def seq(key: str) -> int:
        match = re.search(r"-(\d+)\.ndjson\.gz$", key)
        return int(match.group(1)) if match else 0

    keys.sort(key=seq)
    records = ndjson_bytes = compressed = 0
    mismatch = None
    with open(input_path, "rb") as source:
        for key in keys:
            body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            compressed += len(body)
            data = gzip.decompress(body)
            ndjson_bytes += len(data)
            for line in data.splitlines():
                records += 1
                expected = source.readline()[:-1].decode("utf-8")
                if mismatch is None and orjson.loads(line).get("message") != expected:
                    mismatch = {"record": records, "key": key}
    ok = records == meta["lines"] and mismatch is None
    log(f"  verify: {len(keys)} objects in moto, {records:,} records (expected {meta['lines']:,}), "
        f"{ndjson_bytes / 1e6:.1f} MB NDJSON -> {compressed / 1e6:.1f} MB gzip, "
        f"messages {'match the input' if mismatch is None else f'DIFFER at {mismatch}'}")
    return {"objects": len(keys), "records": records, "verified": ok, "mismatch": mismatch,
            "ndjson_bytes": ndjson_bytes, "stored_bytes": compressed}


# ---------------------------------------------------------------- CloudWatch Logs

def cwl_kind(request) -> str:
    return request.target.rpartition(".")[2] or f"{request.method} {urlsplit(request.path).path}"


def bench_cwl(meta: dict, input_path: str, workdir: str, timeout: float) -> Result:
    stack = Stack(workdir)
    try:
        data = os.path.join(workdir, "data")
        checkpoint = os.path.join(data, "checkpoints", f"file-{TAG}.json")
        config = AGENT_CONF.format(data=data, tag=TAG, input=input_path,
                                   output=CWL_OUTPUT.format(endpoint=stack.proxy.url))
        size = meta["bytes"]
        timeline = []

        def step(now, started, proc, sample):
            offset = checkpoint_offset(checkpoint, input_path)
            done = offset == size
            if sample or done:
                puts = stack.proxy.requests(target_contains="PutLogEvents")
                timeline.append({"t": round(now - started, 2), "checkpoint": offset,
                                 "put_log_events": len(puts), "agent_cpu": round(cpu_seconds(proc.pid), 2),
                                 "moto_cpu": round(stack.moto_cpu(), 2)})
            return done, f"checkpoint at {offset} of {size}; see {workdir}"

        background = Background()
        run = run_agent("shipper (cwl)", config, workdir, stack, size, timeout, step, background)
        requests = request_kinds(stack.proxy.requests(), cwl_kind)
        calls = []  # (events, bytes as CloudWatch counts them, sent, answered) of each accepted PutLogEvents
        for request in stack.proxy.requests(target_contains="PutLogEvents"):
            if request.status == 200:
                events = request.json()["logEvents"]
                calls.append((len(events), sum(len(e["message"].encode()) + 26 for e in events),
                              *stack.times[id(request)]))
        counts, sizes = [c[0] for c in calls], [c[1] for c in calls]
        in_moto = [answered - sent for _, _, sent, answered in calls]
        # Between one accepted call's answer and the next call: time the stream had nothing in flight.
        idle = [later[2] - earlier[3] for earlier, later in zip(calls, calls[1:])]
        extra = {**{k: v for k, v in run.items() if k not in ("seconds", "cpu", "rss")},
                 "requests": requests,
                 "put_log_events": {"calls": len(calls), "events_total": sum(counts),
                                    "events_mean": round(sum(counts) / max(1, len(calls)), 1),
                                    "events_max": max(counts, default=0),
                                    "bytes_mean": round(sum(sizes) / max(1, len(calls))),
                                    "bytes_max": max(sizes, default=0),
                                    "first_sent_seconds": round(calls[0][2], 2) if calls else None,
                                    "last_answered_seconds": round(calls[-1][3], 2) if calls else None,
                                    "moto_seconds_mean": round(sum(in_moto) / max(1, len(in_moto)), 3),
                                    "moto_seconds_max": round(max(in_moto, default=0), 3),
                                    "idle_between_calls_mean": round(sum(idle) / max(1, len(idle)), 3),
                                    "idle_between_calls_max": round(max(idle, default=0), 3),
                                    "calls_after_idle_over_half_second": sum(1 for gap in idle if gap > 0.5)},
                 "request_log": request_log(stack, cwl_kind), "timeline": timeline}
        # moto answers the first call ResourceNotFoundException: the agent creates the group and stream then.
        first = extra["request_log"][:2]
        extra["first_call_created_the_stream"] = [e[0] for e in first] == ["PutLogEvents", "CreateLogGroup"] \
            and first[0][3] == 400
        extra.update(verify_cwl(stack, meta, input_path, sum(counts)))
    finally:
        stack.close()
    return Result("cwl", run["seconds"], size, meta["lines"], run["cpu"], run["rss"], extra)


def verify_cwl(stack: Stack, meta: dict, input_path: str, recorded_events: int) -> dict:
    """Read every event back from moto (get_log_events from the head) and check them against the input."""
    logs = stack.moto.client("logs")
    group = f"/bench/{TAG}"
    started = time.monotonic()
    messages = []
    streams = [s["logStreamName"] for page in logs.get_paginator("describe_log_streams").paginate(logGroupName=group)
               for s in page["logStreams"]]
    for stream in streams:
        token = None
        while True:
            page = logs.get_log_events(logGroupName=group, logStreamName=stream, startFromHead=True,
                                       **({"nextToken": token} if token else {}))
            messages += [e["message"] for e in page["events"]]
            if not page["events"] or page["nextForwardToken"] == token:
                break
            token = page["nextForwardToken"]
    read_seconds = time.monotonic() - started
    with open(input_path, encoding="utf-8") as source:
        expected = source.read().split("\n")[:-1]
    in_order = messages == expected
    same_set = in_order or collections.Counter(messages) == collections.Counter(expected)
    ok = len(messages) == meta["lines"] and same_set
    log(f"  verify: {len(streams)} stream(s) in moto, {len(messages):,} events read back in {read_seconds:.1f}s "
        f"(expected {meta['lines']:,}; the proxy saw {recorded_events:,} accepted), messages "
        f"{'match the input in order' if in_order else 'match the input out of order' if same_set else 'DIFFER'}")
    return {"streams": len(streams), "events": len(messages), "recorded_events": recorded_events,
            "in_order": in_order, "verified": ok, "read_back_seconds": round(read_seconds, 1)}


# ---------------------------------------------------------------- report

HEADER = ("destination", "lines", "MB", "seconds", "MB/s", "lines/s", "agent CPU s", "agent RSS MiB",
          "moto CPU s", "proxy CPU s", "requests", "bytes/request")


def requests_made(r: Result) -> tuple[int, float]:
    """(data-carrying requests, mean body bytes): PutObject + UploadPart, or PutLogEvents."""
    if r.name == "s3":
        bodies = r.extra["put_bodies"]
        return bodies["count"], bodies.get("bytes_mean", 0)
    calls = r.extra["put_log_events"]
    return calls["calls"], calls["bytes_mean"]


def rows(results: list[Result], directory: dict | None) -> list[tuple[str, ...]]:
    out = []
    for r in results:
        count, mean = requests_made(r)
        out.append((r.name, f"{r.lines:,}", f"{r.bytes / 1e6:.1f}", f"{r.seconds:.2f}", f"{r.mb_per_s:.1f}",
                    f"{r.lines_per_s:,.0f}", f"{r.cpu_seconds:.2f}", f"{r.peak_rss_mib:.1f}",
                    f"{r.extra['moto_cpu_seconds']:.2f}", f"{r.extra['proxy_cpu_seconds']:.2f}", f"{count:,}",
                    f"{mean:,.0f}"))
    if directory:
        d = directory
        out.append(("directory*", f"{d['lines']:,}", f"{d['bytes'] / 1e6:.1f}", f"{d['seconds']:.2f}",
                    f"{d['mb_per_s']:.1f}", f"{d['lines_per_s']:,.0f}", f"{d['cpu_seconds']:.2f}",
                    f"{d['peak_rss_mib']:.1f}", "-", "-", "-", "-"))
    return out


def text_table(results: list[Result], directory: dict | None) -> str:
    return format_table(HEADER, rows(results, directory))


def request_lines(r: Result) -> list[str]:
    """One bullet per kind of request: count and body sizes (as sent over HTTP)."""
    out = []
    for kind, stats in r.extra["requests"].items():
        text = f"{kind} x{stats['count']:,}"
        if stats["count"] == 1 or stats["bytes_min"] == stats["bytes_max"]:
            text += f", body {stats['bytes_max']:,} bytes" + (" each" if stats["count"] > 1 else "")
        else:
            text += (f", body {stats['bytes_mean']:,} bytes mean (min {stats['bytes_min']:,}, "
                     f"max {stats['bytes_max']:,}), {stats['bytes_total'] / 1e6:.1f} MB in all")
        if stats["not_2xx"]:
            text += f", {stats['not_2xx']} without a 2xx answer"
            if kind == "PutLogEvents" and r.extra.get("first_call_created_the_stream") and stats["not_2xx"] == 1:
                text += (" (the first: ResourceNotFoundException, after which the agent created the group "
                         "and stream and sent it again)")
        out.append(text)
    return out


def markdown(results: list[Result], inputs: dict, info: dict, directory: dict | None) -> str:
    meta = next(iter(inputs.values()))
    out = [
        "# AWS benchmark",
        "",
        f"{info['date']} on {info['nproc']} cores ({info['cpu']}), {info['memory_gib']} GiB, "
        f"Linux {info['kernel']}, Python {info['python']}; {info['shipper']} (commit {info['commit']}), "
        f"moto {info['moto']}, boto3 {info['boto3']}.",
        "",
        f"Input: the throughput benchmark's generator (bench/loggen.py, seed {meta['seed']}, "
        f"{meta['exc_json_share']:.1%} exc_info share), the first "
        + " and ".join(f"{m['lines']:,} lines ({m['bytes'] / 1e6:.1f} MB) for {name}" for name, m in inputs.items())
        + ". Read from the page cache.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|",
        *("| " + " | ".join(row) + " |" for row in rows(results, directory)),
        "",
    ]
    if directory:
        out.append(f"\\* directory: the shipper row of bench/results/throughput.json ({directory['date']}, "
                   f"commit {directory['commit']}; file -> directory archive, gzip level 1, on its own "
                   f"{directory['lines']:,}-line input), not measured by this script.")
        out.append("")
    by_name = {r.name: r for r in results}
    if "s3" in by_name:
        e = by_name["s3"].extra
        out.append(f"- s3: reader at the end of the file at ~{e['reader_done_seconds_approx']} s (rchar), every "
                   f"object durable "
                   f"in the spool (checkpoint at the file size) at {e['spooled_seconds']} s, every object "
                   f"uploaded at {by_name['s3'].seconds:.2f} s; "
                   f"{e['records']:,} records in {e['objects']} object(s) read back from moto, verified: "
                   f"{e['verified']}; {e['ndjson_bytes'] / 1e6:.1f} MB NDJSON -> {e['compressed_bytes'] / 1e6:.1f} MB "
                   f"gzip uploaded")
        out.append(f"  - timing: uploads from {e['first_upload_sent_seconds']:.2f} s (first data request sent) "
                   f"to {e['last_upload_answered_seconds']:.2f} s (last one answered); the spool was seen empty at "
                   f"{by_name['s3'].seconds:.2f} s, when the output next looked at its finished uploads")
        out += [f"  - {line}" for line in request_lines(by_name["s3"])]
    if "cwl" in by_name:
        e = by_name["cwl"].extra
        calls = e["put_log_events"]
        out.append(f"- cwl: {calls['calls']:,} PutLogEvents calls, {calls['events_mean']:,} events a call "
                   f"(max {calls['events_max']:,}), {calls['bytes_mean']:,} bytes a call (max "
                   f"{calls['bytes_max']:,}; message bytes + 26 per event, from the recorded bodies); "
                   f"{e['events']:,} events read back from moto with get_log_events (startFromHead, "
                   f"{e['read_back_seconds']} s), {'in input order' if e['in_order'] else 'NOT in input order'}, "
                   f"verified: {e['verified']}")
        out.append(f"  - timing: first accepted call sent at {calls['first_sent_seconds']} s, last answered at "
                   f"{calls['last_answered_seconds']} s; a call spent {calls['moto_seconds_mean'] * 1000:.0f} ms "
                   f"in moto on average (max {calls['moto_seconds_max'] * 1000:.0f}); between one call's answer "
                   f"and the next call the stream was idle {calls['idle_between_calls_mean'] * 1000:.0f} ms on "
                   f"average (max {calls['idle_between_calls_max'] * 1000:.0f}), "
                   f"{calls['calls_after_idle_over_half_second']} calls came over 0.5 s after the previous answer"
                   + (": the stream waited on the agent there, not on moto (before commit c483a66 such calls "
                      "came once per flush_interval, 1 s)" if calls["calls_after_idle_over_half_second"] else ""))
        out += [f"  - {line}" for line in request_lines(by_name["cwl"])]
    for r in results:
        if "runs" in r.extra:
            out.append(f"- {r.name}: median of {len(r.extra['runs'])} runs, which took "
                       + ", ".join(f"{run['seconds']:.2f}" for run in r.extra["runs"]) + " s")
    out.append("- CPU use over each run (cores busy on average, of 2): " + ", ".join(
        f"{r.name} agent {r.cpu_seconds / r.seconds:.2f}, moto {r.extra['moto_cpu_seconds'] / r.seconds:.2f}, "
        f"proxy {r.extra['proxy_cpu_seconds'] / r.seconds:.2f}" for r in results))
    out.append("- moto peak RSS MiB: " + ", ".join(f"{r.name} {r.extra['moto_peak_rss_mib']:.1f}" for r in results))
    out.append("- agent exit after SIGTERM (s, exit code): " + ", ".join(
        f"{r.name} {r.extra['seconds_to_exit_after_sigterm']:.2f}, {r.extra['exit_code']}" for r in results))
    out.append("- CPU s used by other processes / stolen by the hypervisor during each measurement "
               "(both should be ~0): " + ", ".join(f"{r.name} {r.extra['other_cpu_seconds']:.2f} / "
                                                  f"{r.extra['steal_cpu_seconds']:.2f}" for r in results))
    out += [
        "",
        "Each measurement starts a fresh `moto_server` (Python, threaded werkzeug) on loopback and the "
        "recording proxy of the tests (tests/aws.py FaultProxy, no faults; it runs in the benchmark's "
        "process and opens one connection to moto per request) in front of it; the agent's endpoint_url "
        "is the proxy, credentials `testing`. The agent reads the file from the start (parser none). "
        "s3: gzip level 1, upload_interval 2s, default max_object_bytes (64 MiB) and multipart_threshold "
        "(16 MiB); timed from process start until the checkpoint equals the file size and the spool "
        "(data_dir/spool/s3.0) holds no finished object. cwl: format raw, default stream name; timed from "
        "process start until the checkpoint equals the file size (it moves once PutLogEvents accepted the "
        "events). MB/s and lines/s are of the input. CPU is user+sys of the agent; moto and proxy CPU is "
        "what those processes used during the same interval (proxy: this whole process, polling included); "
        "RSS is VmHWM. requests and bytes/request count the data-carrying calls (PutObject + UploadPart, or "
        "PutLogEvents) as the proxy recorded their bodies.",
        "",
    ]
    return "\n".join(out)


# ---------------------------------------------------------------- main

def measure(name: str, meta: dict, input_path: str, run_dir: str, args: argparse.Namespace) -> Result:
    workdir = tempfile.mkdtemp(prefix=f"{name}-", dir=run_dir)
    if args.quiet_wait > 0:
        wait_quiet(args.quiet_wait, log)
    bench = bench_s3 if name == "s3" else bench_cwl
    result = bench(meta, input_path, workdir, args.timeout)
    if not args.keep:
        shutil.rmtree(workdir)
    e = result.extra
    count, mean = requests_made(result)
    log(f"  {result.seconds:.2f}s, {result.mb_per_s:.1f} MB/s, {result.lines_per_s:,.0f} lines/s, agent "
        f"{result.cpu_seconds:.2f} CPU s, {result.peak_rss_mib:.1f} MiB peak RSS; moto {e['moto_cpu_seconds']:.2f} "
        f"CPU s, proxy {e['proxy_cpu_seconds']:.2f} CPU s; {count:,} requests of {mean:,.0f} bytes on average")
    warn_if_disturbed(result.seconds, e["other_cpu_seconds"], e["steal_cpu_seconds"], log)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--s3-lines", type=int, default=1_000_000,
                        help="lines shipped to S3 (default 1,000,000; moto keeps every object in memory)")
    parser.add_argument("--cwl-lines", type=int, default=200_000,
                        help="lines shipped to CloudWatch Logs (default 200,000; moto's CloudWatch Logs is slow)")
    parser.add_argument("--only", nargs="+", choices=DESTINATIONS, help="run only these measurements")
    add_common_arguments(parser, timeout=600, what="agent run")
    args = parser.parse_args(argv)
    names = args.only or list(DESTINATIONS)
    results_name = args.results or (None if args.only else "aws")

    inputs, paths = {}, {}
    for name in names:
        paths[name] = os.path.join(WORK, f"aws-{name}-input.log")
        lines = args.s3_lines if name == "s3" else args.cwl_lines
        inputs[name] = loggen.ensure(paths[name], lines, args.seed, args.exc_json_share, log=log)
        subprocess.run(["cat", paths[name]], stdout=subprocess.DEVNULL, check=True)  # into the page cache
    info = aws_machine(log)

    results = measure_all(
        list(DESTINATIONS), names, args.repeat,
        lambda name, run_dir: measure(name, inputs[name], paths[name], run_dir, args),
        lambda r: {"seconds": round(r.seconds, 3), "cpu_seconds": round(r.cpu_seconds, 2),
                   "moto_cpu_seconds": r.extra["moto_cpu_seconds"]},
        WORK, args.keep, log)

    directory = directory_figure()
    print()
    print(text_table(results, directory))
    if directory:
        print("* directory: the shipper row of bench/results/throughput.json, not measured here")
    if results_name:
        document = {"machine": info, "inputs": inputs, "results": [r.as_dict() for r in results],
                    "directory_from_throughput_json": directory}
        write_results(RESULTS, results_name, document, markdown(results, inputs, info, directory), log)
    return 0 if all(r.extra["verified"] for r in results) else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
