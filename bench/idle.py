"""Idle footprint: the agent following a quiet file (10 lines/s) for 60 s: its CPU, memory and threads.

    .venv/bin/python bench/idle.py [--only VARIANT ...] [--window 60] [--warmup 10] [--rate 10] [--repeat N]
                                   [--py-spy ARG ...]

Issue 5's targets for a server that logs little: under 0.5 % of one core and under 50 MiB peak
RSS. Each variant is its own agent, run one after the other (never in parallel, the machine has
2 cores), each after waiting for a quiet machine; the agent's settings are the defaults
(flush_interval 1s, CloudWatch Logs flush_interval 5s, poll_interval 500ms, checkpoint_interval 1s, upload_interval 60s, gzip level 1,
metrics every 10 s, ...): only data_dir, `[cloud] metadata = "off"`, the paths, the bucket, the
endpoint and region, the log group and the match patterns are set.

- directory          file input -> directory output
- directory-metrics  file input + metrics input -> directory output
- all                file input + metrics input -> directory, S3, CloudWatch Logs (match: the file's
                     tag) and CloudWatch Metrics (match: "metrics"): the target configuration
- all-flush5s        the same with `[agent] flush_interval = "5s"` (the CloudWatch agent's
                     force_flush_interval default)

S3 and CloudWatch go to a real moto_server on loopback (tests/aws.py MotoServer; the bucket is
made first; credentials "testing") behind the tests' recording proxy (FaultProxy, no faults),
which counts the requests the agent makes. The followed file, logs/app.log (the input's paths
are ["logs/*.log"]), exists empty before the agent starts; once the agent logged that it tails
it, this script appends one line every 1/rate s with its own write() (`seq=NNNNNNNNN ` + a line of
the throughput benchmark's generator, bench/loggen.py: JSON app logs, access logs, plain logs,
tracebacks). After `--warmup` s of writing (start-up and first calls excluded) the window of
`--window` s starts: the agent's user+sys CPU (/proc/PID/stat), per-thread CPU (schedstat: ns),
context switches and I/O system calls over the window; VmRSS every second; VmHWM over the window
(reset with /proc/PID/clear_refs at its start) and over the whole life of the process. After the
window, `py-spy dump` names the threads, the agent gets SIGTERM (it delivers what it holds) and
every line is looked for in each destination (the archive, the bucket, the log group).

Also measured once: the resident memory of a Python process that imports what the agent imports,
then boto3, then makes the three AWS clients (what each costs).

Results: a table on stdout, bench/results/idle.json and bench/results/idle.md.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import orjson
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loggen  # noqa: E402
from aws import Stack, cwl_kind, harness, s3_kind  # noqa: E402  (bench/aws.py: moto_server + recording proxy)
from measure import (Background, Result, add_common_arguments, add_py_spy_argument, cpu_seconds,  # noqa: E402
                     io_counters, keep_pace, measure_all, minor_faults, own_cpu_seconds, proc_status, py_spy_command,
                     reset_peak_rss, smaps_rss, stop, task_stat, task_stats, wait_for_text, wait_quiet,
                     warn_if_disturbed, write_results, format_table)
from throughput import aws_machine  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
WORK = os.path.join(BENCH, "work")
RESULTS = os.path.join(BENCH, "results")
VENV_BIN = os.path.join(ROOT, ".venv", "bin")
SHIPPER = os.path.join(VENV_BIN, "shipper")
PYTHON = os.path.join(VENV_BIN, "python")
INPUT = os.path.join(WORK, "idle-input.log")
INPUT_LINES = 1000  # line bodies, used in turn
VARIANTS = ("directory", "directory-metrics", "all", "all-flush5s")
LABELS = {"directory": "directory only", "directory-metrics": "directory + metrics input",
          "all": "all outputs (target)", "all-flush5s": "all outputs, flush_interval 5s"}
TARGET_CPU_PERCENT = 0.5
TARGET_RSS_MIB = 50.0
TAG = "app"
BUCKET = "shipper-idle"
LOG_GROUP = "/shipper/idle"
SEQ_WIDTH = 9


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------- configuration

AGENT_CONF = """\
[agent]
data_dir = "{data}"
{agent_extra}
[cloud]
metadata = "off"

[[inputs]]
type = "file"
tag = "{tag}"
paths = ["{logs}/*.log"]
"""

METRICS_INPUT = """
[[inputs]]
type = "metrics"
"""

DIRECTORY_OUTPUT = """
[[outputs]]
type = "directory"
path = "{archive}"
"""

S3_OUTPUT = """
[[outputs]]
type = "s3"
bucket = "{bucket}"
endpoint_url = "{endpoint}"
region = "us-east-1"
"""

CWL_OUTPUT = """
[[outputs]]
type = "cloudwatch_logs"
match = ["{tag}"]
log_group = "{group}"
endpoint_url = "{endpoint}"
region = "us-east-1"
"""

CWM_OUTPUT = """
[[outputs]]
type = "cloudwatch_metrics"
match = ["metrics"]
endpoint_url = "{endpoint}"
region = "us-east-1"
"""


def config_for(name: str, data: str, logs: str, archive: str, endpoint: str | None) -> str:
    agent_extra = 'flush_interval = "5s"\n' if name == "all-flush5s" else ""
    text = AGENT_CONF.format(data=data, agent_extra=agent_extra, tag=TAG, logs=logs)
    if name != "directory":
        text += METRICS_INPUT
    text += DIRECTORY_OUTPUT.format(archive=archive)
    if name.startswith("all"):
        text += S3_OUTPUT.format(bucket=BUCKET, endpoint=endpoint)
        text += CWL_OUTPUT.format(tag=TAG, group=LOG_GROUP, endpoint=endpoint)
        text += CWM_OUTPUT.format(endpoint=endpoint)
    return text


def flush_interval(name: str) -> float:
    return 5.0 if name == "all-flush5s" else 1.0


# ---------------------------------------------------------------- helpers


def seq_of(message: str | None) -> int | None:
    if not message or not message.startswith("seq="):
        return None
    try:
        return int(message[4:4 + SEQ_WIDTH])
    except ValueError:
        return None


def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    if not ordered:
        return math.nan
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


def distribution_ms(values: list[float]) -> dict:
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}
    return {"count": len(ordered), "min": round(ordered[0] * 1000), "p50": round(percentile(ordered, 50) * 1000),
            "p99": round(percentile(ordered, 99) * 1000), "max": round(ordered[-1] * 1000)}


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var


_THREAD_LINE = re.compile(r'^Thread (\d+|0x[0-9A-Fa-f]+) \((\w+)\): "(.*)"')


def thread_names(pid: int) -> dict[int, dict]:
    """tid -> {"name", "state", "where"} from `py-spy dump` (Python thread names; the kernel only knows
    "shipper"). ``where``: the run() method at the base of the thread's stack, or its innermost frame."""
    py_spy = shutil.which("py-spy", path=VENV_BIN) or shutil.which("py-spy")
    if not py_spy:
        return {}
    try:
        text = subprocess.run([py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    threads: dict[int, dict] = {}
    current = None
    for line in text.splitlines():
        match = _THREAD_LINE.match(line)
        if match:
            ident = match.group(1)
            tid = int(ident, 16) if ident.startswith("0x") else int(ident)
            current = threads[tid] = {"name": match.group(3), "state": match.group(2), "frames": []}
        elif current is not None and line.startswith("    "):
            current["frames"].append(line.strip())
    for info in threads.values():
        frames = info.pop("frames")
        runs = [f.split(" ")[0] for f in frames if re.match(r"^\w+\.run \(", f)]
        info["where"] = runs[-1] if runs else (frames[0].split(" (")[0] if frames else "")
        info["innermost"] = frames[0] if frames else ""
    return threads


def thread_label(name: str, where: str) -> str:
    """A readable name: Python's, with the watchdog's threads (Thread-N) told apart by their run()."""
    if re.fullmatch(r"Thread-\d+.*", name) and where:
        return f"{where.split('.')[0]} ({name.split(' ')[0]})"
    return name


def thread_group(label: str) -> str:
    """Pool threads grouped: "s3.1-upload_0" -> "s3.1-upload_*"."""
    return re.sub(r"_\d+$", "_*", label)


def snapshot(pid: int, stack: Stack | None) -> dict:
    times = psutil.Process(pid).cpu_times()
    return {"t": time.monotonic(), "cpu": times.user + times.system, "user": times.user, "sys": times.system,
            "status": proc_status(pid), "tasks": task_stats(pid), "smaps": smaps_rss(pid),
            "io": io_counters(pid), "minor_faults": minor_faults(pid),
            "moto_cpu": stack.moto_cpu() if stack else 0.0, "own_cpu": own_cpu_seconds()}


SHORT_LIVED = "threads started and ended in the window"


def thread_breakdown(a: dict, b: dict, names: dict[int, dict], seconds: float,
                     born: dict[int, dict]) -> tuple[list[dict], dict]:
    """Per thread: CPU and wake-ups over the window. Threads alive at its end are named; threads that
    started and ended within it count as of their last reading (taken every 1/rate s); and what is
    left of the process's CPU (threads that ended without a reading, tick rounding) is given too."""
    rows = []
    for tid, last in born.items():
        if tid in b["tasks"]:
            continue
        rows.append({"tid": tid, "name": f"{SHORT_LIVED} ({last['comm']})", "group": SHORT_LIVED,
                     "new_in_window": True, "ended_in_window": True, "cpu_s": round(last["user"] + last["sys"], 3),
                     "user_s": last["user"], "sys_s": last["sys"],
                     "run_ms": round(last["run_ns"] / 1e6, 2), "wakeups": last["voluntary"],
                     "preempted": last["involuntary"], "state_at_end": None, "innermost_frame_at_end": None})
    zero = {"user": 0.0, "sys": 0.0, "run_ns": 0, "voluntary": 0, "involuntary": 0}
    for tid, after in b["tasks"].items():
        before = a["tasks"].get(tid, zero)
        info = names.get(tid, {})
        label = thread_label(info.get("name", after["comm"]), info.get("where", ""))
        rows.append({"tid": tid, "name": label, "group": thread_group(label), "new_in_window": tid not in a["tasks"],
                     "cpu_s": round(after["user"] + after["sys"] - before["user"] - before["sys"], 3),
                     "user_s": round(after["user"] - before["user"], 2), "sys_s": round(after["sys"] - before["sys"], 2),
                     "run_ms": round((after["run_ns"] - before["run_ns"]) / 1e6, 2),
                     "wakeups": after["voluntary"] - before["voluntary"],
                     "preempted": after["involuntary"] - before["involuntary"],
                     "state_at_end": info.get("state"), "innermost_frame_at_end": info.get("innermost")})
    rows.sort(key=lambda r: -r["run_ms"])
    ended = [tid for tid in a["tasks"] if tid not in b["tasks"]]
    process_cpu = b["cpu"] - a["cpu"]
    seen_cpu = sum(r["run_ms"] for r in rows) / 1000  # exact; per-thread ticks are truncated to 10 ms each
    return rows, {"threads_ended_in_window": len(ended) + sum(1 for r in rows if r.get("ended_in_window")),
                  "threads_new_in_window": sum(r["new_in_window"] for r in rows),
                  "threads_started_and_ended_in_window": sum(1 for r in rows if r.get("ended_in_window")),
                  "cpu_s_not_in_threads_seen": round(process_cpu - seen_cpu, 3),
                  "wakeups_per_second": round(sum(r["wakeups"] for r in rows) / seconds, 1),
                  "preempted_per_second": round(sum(r["preempted"] for r in rows) / seconds, 2)}


def groups_of(rows: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for row in rows:
        group = out.setdefault(row["group"], {"threads": 0, "run_ms": 0.0, "wakeups": 0})
        group["threads"] += 1
        group["run_ms"] = round(group["run_ms"] + row["run_ms"], 2)
        group["wakeups"] += row["wakeups"]
    return dict(sorted(out.items(), key=lambda item: -item[1]["run_ms"]))


# ---------------------------------------------------------------- what reached the destinations

def kind_of(request) -> str:
    return s3_kind(request) if request.service == "s3" else cwl_kind(request)


def check_seqs(seqs: list[int], total: int) -> dict:
    """Every line 0..total-1 once? (missing, duplicates, unknown)."""
    counts = collections.Counter(seqs)
    missing = [s for s in range(total) if s not in counts]
    return {"lines": sum(1 for s in counts if 0 <= s < total), "expected": total, "missing": len(missing),
            "first_missing": missing[:10], "duplicates": sum(c - 1 for c in counts.values() if c > 1),
            "unknown": sum(c for s, c in counts.items() if not 0 <= s < total)}


def ndjson_objects(objects: list[tuple[str, bytes]], total: int) -> dict:
    """Records of gzip NDJSON objects: by tag; the app lines checked."""
    tags = collections.Counter()
    seqs = []
    for _, body in objects:
        for line in gzip.decompress(body).splitlines():
            record = orjson.loads(line)
            tags[record.get("tag")] += 1
            if record.get("tag") == TAG:
                seqs.append(seq_of(record.get("message")))
    return {"objects": len(objects), "bytes": sum(len(b) for _, b in objects), "records_by_tag": dict(tags),
            **check_seqs([s for s in seqs if s is not None], total)}


def verify_directory(archive: str, total: int) -> dict:
    objects = []
    for directory, subdirs, files in os.walk(archive):
        subdirs[:] = [d for d in subdirs if d != ".tmp"]
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                objects.append((name, handle.read()))
    return ndjson_objects(objects, total)


def verify_s3(stack: Stack, total: int) -> dict:
    s3 = stack.moto.client("s3")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]
    objects = [(key, s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()) for key in keys]
    return {**ndjson_objects(objects, total), "keys": keys}


def verify_cwl(stack: Stack, total: int) -> dict:
    logs = stack.moto.client("logs")
    try:
        streams = [s["logStreamName"] for page in logs.get_paginator("describe_log_streams").paginate(
            logGroupName=LOG_GROUP) for s in page["logStreams"]]
    except Exception as exc:  # the group was never made
        return {"streams": 0, "error": str(exc), **check_seqs([], total)}
    seqs = []
    for stream in streams:
        token = None
        while True:
            page = logs.get_log_events(logGroupName=LOG_GROUP, logStreamName=stream, startFromHead=True,
                                       **({"nextToken": token} if token else {}))
            seqs += [seq_of(e["message"]) for e in page["events"]]
            if not page["events"] or page["nextForwardToken"] == token:
                break
            token = page["nextForwardToken"]
    return {"streams": len(streams), "stream_names": streams, **check_seqs([s for s in seqs if s is not None], total)}


def verify_cwm(stack: Stack) -> dict:
    cloudwatch = stack.moto.client("cloudwatch")
    metrics = [m for page in cloudwatch.get_paginator("list_metrics").paginate(Namespace="Shipper")
               for m in page["Metrics"]]
    return {"metrics_in_moto": len(metrics), "metric_names": len({m["MetricName"] for m in metrics})}


def request_figures(stack: Stack, window: tuple[float, float]) -> dict:
    """Requests the agent made (as the proxy saw them): per kind, in the window and in all; PutLogEvents
    and PutMetricData contents."""
    in_window, overall = collections.Counter(), collections.Counter()
    window_bytes = collections.Counter()
    not_2xx = collections.Counter()
    put_events, datums = [], []
    for request in stack.proxy.requests():
        kind = kind_of(request)
        sent, _ = stack.times.get(id(request), (None, None))
        overall[kind] += 1
        if request.status is None or not 200 <= request.status < 300:
            not_2xx[kind] += 1
        if sent is not None and window[0] <= sent < window[1]:
            in_window[kind] += 1
            window_bytes[kind] += len(request.body)
            if kind == "PutLogEvents":
                put_events.append(len(request.json()["logEvents"]))
            elif kind == "PutMetricData":
                datums.append(len(request.json()["MetricData"]))
    return {"in_window": dict(in_window), "in_window_bytes": dict(window_bytes), "whole_run": dict(overall),
            "not_2xx": dict(not_2xx),
            "put_log_events_in_window": {"calls": len(put_events), "events_mean": round(sum(put_events) / max(1, len(put_events)), 1),
                                         "events_max": max(put_events, default=0)},
            "put_metric_data_in_window": {"calls": len(datums), "datums_mean": round(sum(datums) / max(1, len(datums)), 1),
                                          "datums_max": max(datums, default=0)}}


def cwl_latency(stack: Stack, written: list[float], started: float, window: tuple[float, float]) -> dict:
    """Per line written in the window: from its write() to the answer of the first accepted PutLogEvents
    that carried it (the proxy's time; monotonic, relative to the agent's start)."""
    delivered: dict[int, float] = {}
    for request in stack.proxy.requests(target_contains="PutLogEvents"):
        if request.status != 200:
            continue
        _, answered = stack.times.get(id(request), (None, None))
        if answered is None:
            continue
        for event in request.json()["logEvents"]:
            seq = seq_of(event["message"])
            if seq is not None and 0 <= seq < len(written) and (seq not in delivered or answered < delivered[seq]):
                delivered[seq] = answered
    lines = [s for s, w in enumerate(written) if w and window[0] <= w - started < window[1]]
    latencies = [delivered[s] - (written[s] - started) for s in lines if s in delivered]
    by_end = sum(1 for s in lines if s in delivered and delivered[s] <= window[1])
    return {"lines_in_window": len(lines), "delivered": len(latencies), "delivered_by_window_end": by_end,
            "write_to_accepted_ms": distribution_ms(latencies)}


# ---------------------------------------------------------------- one variant

def bench_variant(name: str, bodies: list[bytes], workdir: str, args: argparse.Namespace,
                  py_spy: list[str] | None) -> Result:
    uses_aws = name.startswith("all")
    stack = Stack(workdir) if uses_aws else None
    try:
        if stack:
            stack.moto.client("s3").create_bucket(Bucket=BUCKET)
        env = stack.env if stack else {**os.environ, **harness.CREDENTIALS}
        data, logs, archive = (os.path.join(workdir, d) for d in ("data", "logs", "archive"))
        os.makedirs(logs)
        followed = os.path.join(logs, "app.log")
        open(followed, "wb").close()
        conf = os.path.join(workdir, "shipper.toml")
        with open(conf, "w") as handle:
            handle.write(config_for(name, data, logs, archive, stack.proxy.url if stack else None))
        stderr_path = os.path.join(workdir, "shipper.stderr")
        rate, period = args.rate, 1.0 / args.rate
        warmup_lines = round(args.warmup * rate)
        total = warmup_lines + round(args.window * rate)
        written = [0.0] * total
        samples = []  # every second: (s since the agent started, VmRSS, RssAnon, Threads)
        errors = open(stderr_path, "wb")
        started = time.monotonic()
        if stack:
            stack.started = started
        proc = subprocess.Popen([SHIPPER, "run", "-c", conf], stdout=errors, stderr=errors, env=env)
        pid = proc.pid
        profiler = None
        fd = None
        try:
            ready = wait_for_text(stderr_path, b"tailing " + followed.encode(), proc, 60)
            at_ready = {"seconds": round(ready - started, 2), "cpu_s": round(cpu_seconds(pid), 2), **proc_status(pid)}
            fd = os.open(followed, os.O_WRONLY | os.O_APPEND)
            late = 0
            t0 = time.monotonic()
            a = b = None
            background = None
            peak_reset = False
            born: dict[int, dict] = {}  # threads started during the window: their last reading
            for k in range(total + 1):
                late += keep_pace(t0 + k * period, period)
                if k == warmup_lines:  # the window starts
                    a = snapshot(pid, stack)
                    peak_reset = reset_peak_rss(pid)
                    background = Background()
                    if py_spy:
                        profiler = subprocess.Popen([py_spy[0], "record", "--pid", str(pid), *py_spy[1:]],
                                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if k == total:
                    b = snapshot(pid, stack)
                    break
                if a is not None:  # threads that start (and may end) during the window, seen every tick
                    for tid in os.listdir(f"/proc/{pid}/task"):
                        if int(tid) not in a["tasks"]:
                            reading = task_stat(pid, tid)
                            if reading is not None:
                                born[int(tid)] = reading
                os.write(fd, b"seq=%0*d %s" % (SEQ_WIDTH, k, bodies[k % len(bodies)]))
                written[k] = time.monotonic()
                if k % rate == 0:
                    status = proc_status(pid)
                    samples.append((round(written[k] - started, 2), status["VmRSS"], status["RssAnon"],
                                    status["Threads"]))
                if proc.poll() is not None:
                    raise RuntimeError(f"shipper exited with {proc.returncode} during the run; see {stderr_path}")
            seconds = b["t"] - a["t"]
            cpu = b["cpu"] - a["cpu"]
            moto_cpu = b["moto_cpu"] - a["moto_cpu"]
            other, steal = background.other(cpu + moto_cpu)
            own = b["own_cpu"] - a["own_cpu"]
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)  # py-spy record writes its output and exits
                try:
                    profiler.wait(60)
                except subprocess.TimeoutExpired:
                    profiler.kill()
            names = thread_names(pid) if not args.no_thread_names else {}
            window = (a["t"] - started, b["t"] - started)
            latency = cwl_latency(stack, written, started, window) if stack else None
        finally:
            if fd is not None:
                os.close(fd)
            code, exit_seconds = stop(proc, timeout=args.timeout)
            errors.close()

        rows, totals = thread_breakdown(a, b, names, seconds, born)
        sa, sb = a["status"], b["status"]
        lifetime_peak = max(sa["VmHWM"], sb["VmHWM"])
        window_samples = [(t, rss) for t, rss, _, _ in samples if window[0] <= t <= window[1]]
        window_anon = [(t, anon) for t, _, anon, _ in samples if window[0] <= t <= window[1]]
        io = {k: b["io"].get(k, 0) - a["io"].get(k, 0) for k in ("syscr", "syscw", "rchar", "wchar", "write_bytes")}
        with open(stderr_path, errors="replace") as handle:
            agent_log = handle.read().splitlines()
        problems = [line for line in agent_log if " WARNING " in line or " ERROR " in line]
        extra = {
            "label": LABELS[name], "flush_interval": flush_interval(name),
            "cpu_percent_of_a_core": round(100 * cpu / seconds, 3),
            "user_s": round(b["user"] - a["user"], 2), "sys_s": round(b["sys"] - a["sys"], 2),
            "cpu_target_met": 100 * cpu / seconds < TARGET_CPU_PERCENT,
            "peak_rss_mib_lifetime": round(lifetime_peak, 1),
            "peak_rss_mib_window": round(sb["VmHWM"], 1) if peak_reset else None,
            "peak_rss_window_from": "VmHWM reset at the window's start" if peak_reset else "not measured",
            "rss_target_met": lifetime_peak < TARGET_RSS_MIB,
            "rss_mib_window_start": round(sa["VmRSS"], 1), "rss_mib_end": round(sb["VmRSS"], 1),
            "rss_anon_mib_end": round(sb["RssAnon"], 1), "rss_file_mib_end": round(sb["RssFile"], 1),
            "rss_by_mapping_window_start": a["smaps"], "rss_by_mapping_end": b["smaps"],
            "rss_by_mapping_growth": {k: round(b["smaps"][k] - a["smaps"][k], 2) for k in b["smaps"]},
            "rss_mib_min_max_in_window": [round(min(v for _, v in window_samples), 1),
                                          round(max(v for _, v in window_samples), 1)] if window_samples else None,
            "rss_slope_mib_per_minute": round(slope_per_minute(window_samples) or 0.0, 3),
            "rss_anon_slope_mib_per_minute": round(slope_per_minute(window_anon) or 0.0, 3),
            "threads_window_start": sa["Threads"], "threads_end": sb["Threads"],
            "threads_max_sampled": max((n for t, _, _, n in samples if window[0] <= t <= window[1]), default=None),
            "at_ready": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in at_ready.items()},
            "cpu_s_before_window": round(a["cpu"], 2),
            "rss_samples": samples,
            "threads": rows, "thread_groups": groups_of(rows), **totals,
            "io_in_window": io, "minor_faults_in_window": b["minor_faults"] - a["minor_faults"],
            "lines_written": total, "lines_in_window": total - warmup_lines, "rate": rate,
            "late_writes": late,
            "moto_cpu_seconds": round(moto_cpu, 2), "own_cpu_seconds": round(own, 2),
            "other_cpu_seconds": other, "steal_cpu_seconds": steal,
            "exit_code": code, "seconds_to_exit_after_sigterm": round(exit_seconds, 2),
            "agent_warnings_and_errors": problems[:20],
        }
        extra["delivery"] = {"directory": verify_directory(archive, total)}
        if stack:
            extra["requests"] = request_figures(stack, window)
            extra["cwl_latency"] = latency
            extra["delivery"]["s3"] = verify_s3(stack, total)
            extra["delivery"]["cloudwatch_logs"] = verify_cwl(stack, total)
            extra["delivery"]["cloudwatch_metrics"] = verify_cwm(stack)
        extra["verified"] = all(d.get("missing", 0) == 0 and d.get("duplicates", 0) == 0
                                for d in extra["delivery"].values())
        nbytes = sum(len(bodies[k % len(bodies)]) + SEQ_WIDTH + 5 for k in range(warmup_lines, total))
    finally:
        if stack:
            stack.close()
    return Result(name, seconds, nbytes, total - warmup_lines, cpu, lifetime_peak, extra)


# ---------------------------------------------------------------- memory baseline

BASELINE_SCRIPT = r"""
import gc, json, sys
from types import SimpleNamespace

def mark(stage):
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = round(int(value.split()[0]) / 1024, 1)
    print(json.dumps({"stage": stage, **values, "modules": len(sys.modules)}), flush=True)

mark("python (interpreter only)")
from shipper import memory
memory.tune_allocator()
import orjson, psutil, watchdog.observers
mark("+ orjson, psutil, watchdog (libraries every agent loads)")
import shipper.pipeline, shipper.config, shipper.inputs.file, shipper.inputs.metrics, shipper.outputs.directory
import shipper.outputs.s3, shipper.outputs.cloudwatch_logs, shipper.outputs.cloudwatch_metrics, shipper.service
import http.server
mark("+ the rest of shipper's modules (inputs, outputs, service, health server; no boto3): an agent without AWS outputs, off EC2")
import urllib.request
mark("+ urllib.request (ssl, http.client: the IMDS client's, on EC2; boto3 imports it too)")
import boto3
mark("+ import boto3")
from shipper.outputs import aws
settings = SimpleNamespace(region="us-east-1", endpoint_url="http://127.0.0.1:9", where="bench")
aws.make_client("logs", settings, {}, attempts=1, connections=5, validate=False)
mark("+ CloudWatch Logs client (the first client: session, loaders, endpoint rules)")
aws.make_client("cloudwatch", settings, {}, attempts=1, connections=2)
mark("+ CloudWatch client")
from boto3.s3.transfer import TransferConfig
mark("+ boto3.s3.transfer (s3transfer)")
aws.make_client("s3", settings, {}, attempts=3, connections=8)
mark("+ S3 client")
memory.trim_heap(collect=True)
mark("after gc.collect() + malloc_trim(0) (as the agent after start-up)")
"""


def memory_baseline(env: dict) -> list[dict]:
    out = subprocess.run([PYTHON, "-c", BASELINE_SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    if out.returncode != 0:
        log(f"  memory baseline failed: {out.stderr.strip()[-500:]}")
        return []
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


# ---------------------------------------------------------------- report

HEADER = ("variant", "agent CPU s", "CPU % of a core", "peak RSS MiB", "RSS at end MiB", "threads",
          "wake-ups/s", "AWS requests", "every line delivered", "CPU < 0.5 %", "peak RSS < 50 MiB")


def rows(results: list[Result]) -> list[tuple[str, ...]]:
    out = []
    for r in results:
        e = r.extra
        requests = sum(e["requests"]["in_window"].values()) if "requests" in e else 0
        out.append((e["label"], f"{r.cpu_seconds:.2f}", f"{e['cpu_percent_of_a_core']:.2f}",
                    f"{e['peak_rss_mib_lifetime']:.1f}", f"{e['rss_mib_end']:.1f}", f"{e['threads_end']}",
                    f"{e['wakeups_per_second']:.0f}", f"{requests}" if "requests" in e else "-",
                    "yes" if e["verified"] else "NO",
                    "pass" if e["cpu_target_met"] else "FAIL", "pass" if e["rss_target_met"] else "FAIL"))
    return out


def text_table(results: list[Result]) -> str:
    return format_table(HEADER, rows(results))


def md_table(header: tuple[str, ...], body: list[tuple[str, ...]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
            *("| " + " | ".join(row) + " |" for row in body)]


def thread_table(results: list[Result]) -> list[str]:
    """CPU ms and wake-ups per thread group over the window, variants side by side."""
    groups: list[str] = []
    for r in results:
        for group in r.extra["thread_groups"]:
            if group not in groups:
                groups.append(group)
    total = {g: sum(r.extra["thread_groups"].get(g, {}).get("run_ms", 0) for r in results) for g in groups}
    groups.sort(key=lambda g: -total[g])
    header = ("thread (Python name)", *(r.extra["label"] for r in results))
    body = []
    for group in groups:
        cells = []
        for r in results:
            g = r.extra["thread_groups"].get(group)
            cells.append("-" if g is None else f"{g['run_ms']:.0f} ms, {g['wakeups'] / r.seconds:.1f}/s"
                         + (f" ({g['threads']} threads)" if g["threads"] > 1 else ""))
        body.append((group, *cells))
    body.append(("rest: process user+sys - the threads' schedstat (ticks vs ns, threads unseen)", *(
        f"{r.extra['cpu_s_not_in_threads_seen'] * 1000:+.0f} ms" for r in results)))
    body.append(("process (user+sys, ticks)", *(f"{r.cpu_seconds * 1000:.0f} ms" for r in results)))
    return md_table(header, body)


def summary(results: list[Result], baseline: list[dict]) -> list[str]:
    """Data-driven sentences: what each step adds, and what the boto3 clients cost."""
    by_name = {r.name: r for r in results}
    out = []

    def cpu(name: str) -> float:
        return by_name[name].cpu_seconds

    def pct(name: str) -> float:
        return by_name[name].extra["cpu_percent_of_a_core"]

    if "directory" in by_name and "directory-metrics" in by_name:
        out.append(f"- the metrics input adds {cpu('directory-metrics') - cpu('directory'):+.2f} CPU s a minute "
                   f"({pct('directory-metrics') - pct('directory'):+.2f} % of a core)")
    if "directory-metrics" in by_name and "all" in by_name:
        e = by_name["all"].extra
        groups = e["thread_groups"]
        aws_threads = {g: v for g, v in groups.items()
                       if any(word in g for word in ("s3", "cloudwatch"))}
        calls = e["requests"]["in_window"]
        out.append(f"- the three AWS outputs add {cpu('all') - cpu('directory-metrics'):+.2f} CPU s a minute "
                   f"({pct('all') - pct('directory-metrics'):+.2f} % of a core) and "
                   f"{by_name['all'].extra['rss_mib_end'] - by_name['directory-metrics'].extra['rss_mib_end']:+.1f} "
                   f"MiB of RSS; their threads: " + ", ".join(f"{g} {v['run_ms']:.0f} ms" for g, v in aws_threads.items())
                   + f" (for {', '.join(f'{v} {k}' for k, v in calls.items())})")
    if "all" in by_name and "all-flush5s" in by_name:
        a, b = by_name["all"].extra, by_name["all-flush5s"].extra
        out.append(f"- flush_interval 5s instead of 1s: {cpu('all-flush5s') - cpu('all'):+.2f} CPU s a minute "
                   f"({pct('all-flush5s') - pct('all'):+.2f} % of a core); PutLogEvents "
                   f"{a['requests']['in_window'].get('PutLogEvents', 0)} -> {b['requests']['in_window'].get('PutLogEvents', 0)} "
                   f"a minute; p99 latency to CloudWatch Logs {a['cwl_latency']['write_to_accepted_ms'].get('p99', 0):,} -> "
                   f"{b['cwl_latency']['write_to_accepted_ms'].get('p99', 0):,} ms")
    plain = next((s for s in baseline if "no boto3" in s["stage"]), None)
    clients = next((s for s in baseline if s["stage"].startswith("+ S3 client")), None)
    trimmed = next((s for s in baseline if s["stage"].startswith("after gc")), None)
    if plain and clients and trimmed:
        out.append(f"- memory: Python with shipper's modules is {plain['VmRSS']:.1f} MiB resident; boto3 and the three "
                   f"clients bring it to {clients['VmRSS']:.1f} MiB ({clients['VmRSS'] - plain['VmRSS']:+.1f}), "
                   f"{trimmed['VmRSS']:.1f} MiB after the agent's gc + malloc_trim: the {TARGET_RSS_MIB:.0f} MiB "
                   f"target is out of reach with boto3's clients in the process (see Memory)")
    return out + [""] if out else []


def markdown(results: list[Result], info: dict, meta: dict, baseline: list[dict], args: argparse.Namespace) -> str:
    out = [
        "# Idle benchmark",
        "",
        f"{info['date']} on {info['nproc']} cores ({info['cpu']}), {info['memory_gib']} GiB, "
        f"Linux {info['kernel']}, Python {info['python']}; {info['shipper']} (commit {info['commit']}), "
        f"moto {info['moto']}, boto3 {info['boto3']}.",
        "",
        f"The agent follows one file to which {args.rate} lines/s are written (one write() each: `seq=NNNNNNNNN ` + "
        f"a line of bench/loggen.py's generator, seed {meta['seed']}, {meta['bytes'] / meta['lines']:.0f} bytes a "
        f"line on average), with default settings; measured over {args.window:g} s after {args.warmup:g} s of "
        f"writing. Targets (issue 5): CPU under {TARGET_CPU_PERCENT} % of one core, peak RSS under "
        f"{TARGET_RSS_MIB:.0f} MiB.",
        "",
        *md_table(HEADER, rows(results)),
        "",
        *summary(results, baseline),
        "peak RSS: VmHWM over the agent's whole life (start-up included); RSS at end: VmRSS at the window's end; "
        "threads: at the window's end; wake-ups/s: voluntary context switches of all threads; AWS requests: "
        "made during the window, as the recording proxy saw them.",
        "",
        "## Where the CPU goes (the window, per thread: time on a CPU from schedstat, voluntary wake-ups)",
        "",
        *thread_table(results),
        "",
    ]
    for r in results:
        e = r.extra
        line = (f"- {e['label']}: {r.cpu_seconds:.2f} CPU s ({e['user_s']:.2f} user, {e['sys_s']:.2f} system) in "
                f"{r.seconds:.1f} s = {e['cpu_percent_of_a_core']:.2f} % of a core; {e['io_in_window']['syscr'] + e['io_in_window']['syscw']:,} read/write system calls "
                f"({(e['io_in_window']['syscr'] + e['io_in_window']['syscw']) / r.seconds:.0f}/s), "
                f"{e['minor_faults_in_window']:,} minor page faults; start-up: ready (`tailing` logged) "
                f"{e['at_ready']['seconds']} s after exec with {e['at_ready']['cpu_s']} CPU s, "
                f"{e['cpu_s_before_window']} CPU s by the window's start")
        if "requests" in e:
            q = e["requests"]
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(q["in_window"].items(), key=lambda kv: -kv[1]))
            line += (f"; requests in the window: {kinds}; PutLogEvents carried {q['put_log_events_in_window']['events_mean']} "
                     f"events on average, PutMetricData {q['put_metric_data_in_window']['datums_mean']} values")
            lat = e["cwl_latency"]["write_to_accepted_ms"]
            if lat.get("count"):
                line += (f"; line written -> accepted by CloudWatch Logs: p50 {lat['p50']:,} ms, p99 {lat['p99']:,} ms, "
                         f"max {lat['max']:,} ms; moto used {e['moto_cpu_seconds']:.2f} CPU s")
        out.append(line)
    out += ["", "## Memory", ""]
    out.append("| variant | RSS when ready | at the window's start | min-max in the window | at the end | "
               "slope MiB/min | peak in the window | peak since start | RssAnon / RssFile at the end |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        e = r.extra
        span = e["rss_mib_min_max_in_window"]
        out.append(f"| {e['label']} | {e['at_ready']['VmRSS']:.1f} | {e['rss_mib_window_start']:.1f} | "
                   f"{span[0]:.1f}-{span[1]:.1f} | {e['rss_mib_end']:.1f} | {e['rss_slope_mib_per_minute']:+.2f} | "
                   f"{e['peak_rss_mib_window'] if e['peak_rss_mib_window'] is not None else '-'} | "
                   f"{e['peak_rss_mib_lifetime']:.1f} | {e['rss_anon_mib_end']:.1f} / {e['rss_file_mib_end']:.1f} |")
    out.append("")
    for r in results:
        e = r.extra
        out.append(f"- {e['label']}: resident MiB by mapping at the end (growth over the window): " + ", ".join(
            f"{kind} {e['rss_by_mapping_end'][kind]:.1f} ({e['rss_by_mapping_growth'][kind]:+.2f})"
            for kind in e["rss_by_mapping_end"]))
    out.append("")
    if baseline:
        out += ["What the agent's imports and clients cost in a plain Python process "
                "(`python -c \"import shipper...\"`, same allocator settings; MiB):", "",
                "| stage | VmRSS | RssAnon | RssFile | VmHWM | modules |", "|---|---:|---:|---:|---:|---:|"]
        out += [f"| {s['stage']} | {s['VmRSS']} | {s['RssAnon']} | {s['RssFile']} | {s['VmHWM']} | {s['modules']} |"
                for s in baseline]
        out.append("")
    out += ["## Deliveries", ""]
    for r in results:
        e = r.extra
        parts = []
        for dest, d in e["delivery"].items():
            if dest == "cloudwatch_metrics":
                parts.append(f"cloudwatch_metrics {d['metrics_in_moto']} metrics ({d['metric_names']} names) in moto")
                continue
            text = f"{dest} {d['lines']:,}/{d['expected']:,} lines"
            if d.get("missing") or d.get("duplicates"):
                text += f" ({d['missing']} missing, first {d['first_missing']}; {d['duplicates']} duplicates)"
            if "objects" in d:
                text += f" in {d['objects']} objects, records by tag {d['records_by_tag']}"
            if "streams" in d:
                text += f" in {d['streams']} stream(s)"
            parts.append(text)
        out.append(f"- {e['label']}: " + "; ".join(parts) + f" (after SIGTERM: exit {e['exit_code']} in "
                   f"{e['seconds_to_exit_after_sigterm']:.2f} s)")
        if e["agent_warnings_and_errors"]:
            out.append(f"  - the agent logged {len(e['agent_warnings_and_errors'])} warning(s)/error(s), first: "
                       f"`{e['agent_warnings_and_errors'][0]}`")
    out.append("- CPU s used by other processes / stolen by the hypervisor during each window (both should be ~0): "
               + ", ".join(f"{r.extra['label']} {r.extra['other_cpu_seconds']:.2f} / {r.extra['steal_cpu_seconds']:.2f}"
                           for r in results))
    for r in results:
        if "runs" in r.extra:
            out.append(f"- {r.extra['label']}: median (by CPU) of {len(r.extra['runs'])} runs: "
                       + ", ".join(f"{run['cpu_percent']:.2f} %" for run in r.extra["runs"]))
    out += [
        "",
        "## Method",
        "",
        "Each variant runs a fresh agent (and, with AWS outputs, a fresh `moto_server` with the bucket made first, "
        "behind the tests' recording proxy FaultProxy in this process, credentials `testing`; the AWS outputs' "
        "endpoint_url is the proxy). Configuration: the defaults except data_dir, `[cloud] metadata = \"off\"`, "
        f"the file input's tag `{TAG}` and paths `[\"<dir>/logs/*.log\"]`, the directory output's path, the S3 "
        f"bucket, endpoint_url and region of the AWS outputs, the log group `{LOG_GROUP}`, and match "
        f"`[\"{TAG}\"]` (CloudWatch Logs) / `[\"metrics\"]` (CloudWatch Metrics); directory and S3 match "
        "everything (the file's lines and the metrics samples). The file exists, empty, before the agent starts; "
        "the writer starts once the agent logged `tailing`, and appends one line per write() on a fixed "
        "schedule. The window starts after the warm-up: the agent's CPU is user+sys from /proc/PID/stat at its "
        "start and end (10 ms ticks); per thread, time on a CPU is schedstat's (ns) and wake-ups are voluntary "
        "context switches; threads are named by one `py-spy dump` after the window (not during it). VmHWM is "
        "reset at the window's start (`5 > /proc/PID/clear_refs`) to get the window's peak; the lifetime peak "
        "is the larger of VmHWM before the reset and after the window. After the window the agent gets "
        "SIGTERM (it finishes its objects, uploads them and flushes CloudWatch Logs), then every line is looked "
        "for in the directory archive, in the bucket and in the log group. Latency to CloudWatch Logs: from a "
        "line's write() to the proxy relaying moto's answer to the first PutLogEvents that carried it.",
        "",
    ]
    return "\n".join(out)


# ---------------------------------------------------------------- main

def measure(name: str, bodies: list[bytes], run_dir: str, args: argparse.Namespace,
            py_spy: list[str] | None) -> Result:
    workdir = tempfile.mkdtemp(prefix=f"{name}-", dir=run_dir)
    if args.quiet_wait > 0:
        wait_quiet(args.quiet_wait, log)
    result = bench_variant(name, bodies, workdir, args, py_spy)
    if not args.keep:
        shutil.rmtree(workdir)
    e = result.extra
    log(f"  {result.cpu_seconds:.2f} CPU s in {result.seconds:.1f} s = {e['cpu_percent_of_a_core']:.2f} % of a core; "
        f"peak RSS {e['peak_rss_mib_lifetime']:.1f} MiB (window {e['peak_rss_mib_window']}), RSS at end "
        f"{e['rss_mib_end']:.1f} MiB, {e['threads_end']} threads, {e['wakeups_per_second']:.0f} wake-ups/s; "
        f"delivered: {'every line' if e['verified'] else 'NOT every line'}")
    top = ", ".join(f"{g} {v['run_ms']:.0f} ms" for g, v in list(e["thread_groups"].items())[:6])
    log(f"  threads: {top}")
    warn_if_disturbed(result.seconds, e["other_cpu_seconds"], e["steal_cpu_seconds"], log)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=VARIANTS, help="run only these variants")
    parser.add_argument("--window", type=float, default=60.0, help="seconds measured (default 60)")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds of writing before the window (default 10; start-up is excluded too)")
    parser.add_argument("--rate", type=int, default=10, help="lines a second written to the file (default 10)")
    parser.add_argument("--no-thread-names", action="store_true",
                        help="do not run `py-spy dump` after the window to name the threads")
    add_common_arguments(parser, timeout=60, what="agent's exit after SIGTERM")
    add_py_spy_argument(parser, "the agent during the window (with --only one variant)")
    args = parser.parse_args(argv)
    names = args.only or list(VARIANTS)
    results_name = args.results or (None if args.only else "idle")
    py_spy = py_spy_command(args, VENV_BIN)

    meta = loggen.ensure(INPUT, INPUT_LINES, args.seed, args.exc_json_share, log=log)
    with open(INPUT, "rb") as source:
        bodies = source.read().splitlines(keepends=True)
    info = aws_machine(log)

    results = measure_all(
        list(VARIANTS), names, args.repeat, lambda name, run_dir: measure(name, bodies, run_dir, args, py_spy),
        lambda r: {"cpu_percent": r.extra["cpu_percent_of_a_core"], "cpu_seconds": round(r.cpu_seconds, 3),
                   "peak_rss_mib": round(r.peak_rss_mib, 1), "rss_mib_end": r.extra["rss_mib_end"]},
        WORK, args.keep, log, median_of=lambda r: r.cpu_seconds)

    log("memory baseline: python -c 'import shipper ...' ...")
    baseline = memory_baseline({**os.environ, **harness.CREDENTIALS, "AWS_EC2_METADATA_DISABLED": "true"})
    print()
    print(text_table(results))
    if baseline:
        print()
        for stage in baseline:
            print(f"  {stage['VmRSS']:6.1f} MiB RSS ({stage['RssAnon']:.1f} anon)  {stage['stage']}")
    if results_name:
        document = {"machine": info, "input": meta, "settings": {"window": args.window, "warmup": args.warmup,
                                                                "rate": args.rate},
                    "targets": {"cpu_percent_of_a_core": TARGET_CPU_PERCENT, "peak_rss_mib": TARGET_RSS_MIB},
                    "results": [r.as_dict() for r in results], "memory_baseline": baseline}
        write_results(RESULTS, results_name, document, markdown(results, info, meta, baseline, args), log)
    return 0 if all(r.extra["verified"] for r in results) else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
