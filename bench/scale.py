"""Fleet scale: one file input following 100 to 100,000 files, most of them idle.

    .venv/bin/python bench/scale.py [--files N ...] [--load random active] [--layout flat subdirs]
                                    [--warmup 15] [--window 30] [--nofile 1024] [--merge]
                                    [--report-only]

Issue 15's targets, with the directory output and default settings: 10,000 files under 1 % of
one core and under 50 MiB RSS, descriptors never above `max_open_files`, line-to-archive p99
under 2 s; 100,000 files running, with start-up under 30 s. The default runs 100, 1,000 and
10,000 files; 100,000 only when named (`--files 100000`: creating and following them is heavy).

Each run is its own agent, run one after the other (never in parallel, the machine has 2 cores),
after waiting for a quiet machine:

1. N files are made, each holding one short line (`id=pNNNNNNNNN t=NS f=NNNNNN`, a few bytes): all in
   DIR/ (layout `flat`, paths = ["DIR/*.log"]) or spread over 100 directories (layout `subdirs`,
   paths = ["DIR/*/*.log"]).
2. The agent is started as the packaged unit would: a real subprocess `python -m shipper run -c CONFIG`
   (the code of the checkout this script is in: PYTHONPATH is its root) under a soft RLIMIT_NOFILE of
   `--nofile` (default 1024, systemd's default LimitNOFILE; the hard limit unchanged). The config is the
   embedded default's: one file input, one directory output, `[cloud] metadata = "off"`,
   `[server] listen = ""`, every other setting at its default (flush_interval 1s, poll_interval 500ms,
   checkpoint_interval 1s, ...) except the directory output's upload_interval = "1s" (default 60s) so
   that the latency measures the agent, not a minute of batching.
3. Start-up: from the fork (the monotonic clock just before Popen) until the agent has taken every
   pre-existing file: its log named (`tailing PATH`) or counted (`tailing N more files`) each one, or
   the files under data_dir/checkpoints name each one, whichever comes first (looked at every 0.1 s / 0.5 s). The run goes on when it
   never gets there (no progress for `--stall` s, or `--startup-timeout`): what was not taken shows
   as lines missing from the archive.
4. Load, one write() per line, each carrying a unique id and its write time (time.time_ns() just
   before the write): `id=wNNNNNNNNN t=NS f=NNNNNN`; the file is opened with O_APPEND for each line.
   - `random`: `--rate` lines/s in total (default 10), each to a file picked at random.
   - `active`: `--active-share` of the files (default 1 %, at least one) at `--active-rate` line/s
     each (default 1), round robin over them.
   `--warmup` s of writing (default 15), then the measured window (`--window`, default 30 s), then
   `--settle` s without writing (default 5) so that the last lines reach the archive on their own,
   then SIGTERM.
5. Figures: CPU % of one core of the agent over the window (utime+stime of /proc/PID/stat); peak RSS
   (VmHWM of /proc/PID/status at the end of the settle, i.e. the whole life, start-up included);
   open descriptors (entries of /proc/PID/fd, counted every second by a sampling thread: the max
   over the whole run and over the window); start-up (above); line-to-archive latency of the lines
   written in the window: the mtime of the object file that holds the line minus the line's write
   time. Objects are written under .tmp/, fsynced, then linked under the archive: the mtime is the
   object's last write, a few ms before it is visible. The latency therefore includes the agent's
   poll_interval (or a watch event), flush_interval (1 s) and the directory output's upload_interval
   (1 s). Delivery: every line (the pre-existing ones and the written ones) looked for by id in the
   archive (gzip NDJSON objects; .tmp/ ignored): missing, duplicates, unknown, counted separately.
6. An agent that dies (or stops answering SIGTERM) is the result of its run: exit code, when, and its
   last log lines; the bench goes on with the next run.

Results: a table on stdout, bench/results/scale.json and bench/results/scale.md (`--merge` keeps the
runs of the existing files that this invocation did not measure again).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import dataclasses
import gzip
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import orjson
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from idle import distribution_ms, md_table  # noqa: E402
from measure import (Background, Result, add_common_arguments, cpu_seconds, keep_pace, measure_all,  # noqa: E402
                     proc_status, stop, wait_quiet, warn_if_disturbed, write_results, format_table)
from throughput import machine  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
WORK = os.path.join(BENCH, "work")
RESULTS = os.path.join(BENCH, "results")
FILE_COUNTS = (100, 1000, 10000)  # 100000 only when named: --files 100000
LOADS = ("random", "active")
LAYOUTS = ("flat", "subdirs")
SUBDIRS = 100
NOFILE = 1024  # systemd's default soft LimitNOFILE
TAG = "app"
TARGETS = {"files": 10000, "cpu_percent_of_a_core": 1.0, "peak_rss_mib": 50.0, "latency_p99_ms": 2000,
           "startup_s_at_100000": 30.0}
LAST_LOG_LINES = 15
# The lines this bench writes: "id=p000000042 t=1764000000000000000 f=000042" (p: made before the
# agent started, w: written during the run).
LINE = re.compile(rb"^id=([pw]\d{9}) t=(\d+) f=(\d+)$")
TAILING = re.compile(rb"tailing (\S+) from offset")
TAILING_MORE = re.compile(rb"tailing (\d+) more files")  # past the first files of a minute, a count
UNREADABLE = re.compile(rb"cannot read \S+: ")  # one file it could not open (reported once per file)


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------- set-up

AGENT_CONF = """\
# bench/scale.py: the embedded default's shape, metadata and server off, objects every second.
[agent]
data_dir = "{data}"

[cloud]
metadata = "off"

[server]
listen = ""

[[inputs]]
type = "file"
tag = "{tag}"
paths = ["{pattern}"]

[[outputs]]
type = "directory"
path = "{archive}"
upload_interval = "{upload_interval}"
"""


def line(kind: bytes, seq: int, file_index: int, ns: int) -> bytes:
    return b"id=%s%09d t=%d f=%06d\n" % (kind, seq, ns, file_index)


def make_files(logs: str, n: int, layout: str) -> tuple[list[str], str]:
    """N files holding one line each; (their paths, the input's glob)."""
    if layout == "flat":
        directories = [logs]
        pattern = os.path.join(logs, "*.log")
    else:
        directories = [os.path.join(logs, f"d{d:03d}") for d in range(SUBDIRS)]
        pattern = os.path.join(logs, "*", "*.log")
    for directory in directories:
        os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(n):
        path = os.path.join(directories[i % len(directories)], f"f{i:06d}.log")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, line(b"p", i, i, time.time_ns()))
        finally:
            os.close(fd)
        paths.append(path)
    return paths, pattern


def limit_descriptors(soft: int):
    """preexec_fn: the soft RLIMIT_NOFILE the unit would give, the hard limit unchanged."""
    def apply() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
    return apply


def reading(read):
    """``read()``, or None when the agent is gone (or a zombie) meanwhile."""
    try:
        return read()
    except (OSError, KeyError, psutil.Error):
        return None


def descriptor_limit(pid: int) -> str | None:
    """'soft/hard' of "Max open files" in /proc/PID/limits: proof of the limit the agent ran under."""
    try:
        with open(f"/proc/{pid}/limits") as handle:
            for text in handle:
                if text.startswith("Max open files"):
                    soft, hard = text.split()[3:5]
                    return f"{soft}/{hard}"
    except OSError:
        pass
    return None


# ---------------------------------------------------------------- watching the agent

class Sampler(threading.Thread):
    """Every second: the agent's open descriptors (/proc/PID/fd), VmRSS and threads, as (s since fork, ...)."""

    def __init__(self, pid: int, started: float, interval: float = 1.0):
        super().__init__(name="sampler", daemon=True)
        self.pid, self.started, self.interval = pid, started, interval
        self.samples: list[tuple[float, int, float, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            t = time.monotonic() - self.started
            try:
                fds = len(os.listdir(f"/proc/{self.pid}/fd"))
                status = proc_status(self.pid)
            except (OSError, ValueError):  # it exited (or is a zombie)
                return
            if status.get("VmRSS") is None:  # a zombie has no memory left: not a sample
                return
            self.samples.append((round(t, 2), fds, round(status["VmRSS"], 1), status.get("Threads", 0)))
            self.halt.wait(self.interval)

    def max_fds(self, start: float = 0.0, end: float = float("inf")) -> int | None:
        values = [fds for t, fds, _, _ in self.samples if start <= t <= end]
        return max(values) if values else None


class LogFollower:
    """Reads the agent's stderr as it grows: the paths it said it tails; its last lines."""

    def __init__(self, path: str):
        self.path = path
        self.offset = 0
        self.rest = b""
        self.tailed: set[bytes] = set()
        self.more = 0  # files the log counted without naming them
        self.last: collections.deque[bytes] = collections.deque(maxlen=LAST_LOG_LINES)
        self.errors = 0
        self.first_errors: list[str] = []
        self.emfile = 0
        self.unreadable = 0

    def update(self) -> None:
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        self.offset += len(data)
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        for text in lines:
            self.last.append(text)
            match = TAILING.search(text)
            if match:
                self.tailed.add(match.group(1))
            more = TAILING_MORE.search(text)
            if more:
                self.more += int(more.group(1))
            if any(level in text for level in (b" WARNING ", b" ERROR ", b" CRITICAL ", b"Traceback")):
                self.errors += 1
                # The first few that are not one more file it cannot open (there may be thousands of those).
                if len(self.first_errors) < 4 and not UNREADABLE.search(text):
                    self.first_errors.append(text.decode(errors="replace")[:400])
            if b"Too many open files" in text:
                self.emfile += 1
                self.unreadable += bool(UNREADABLE.search(text))

    def last_lines(self) -> list[str]:
        return [t.decode(errors="replace")[:400] for t in [*self.last, self.rest] if t]


def checkpointed_paths(data: str, prefix: bytes) -> set[bytes]:
    """The paths under ``prefix`` that the agent's checkpoint files name, whatever their format
    (any file under data_dir/checkpoints; a path is a run of bytes up to a quote, blank or comma)."""
    names: set[bytes] = set()
    pattern = re.compile(re.escape(prefix) + rb"[^\"'\s,]+")
    for directory, _, files in os.walk(os.path.join(data, "checkpoints")):
        for name in files:
            try:
                with open(os.path.join(directory, name), "rb") as handle:
                    names.update(pattern.findall(handle.read()))
            except OSError:
                continue
    return names


def wait_for_startup(proc: subprocess.Popen, follower: LogFollower, paths: set[bytes], data: str, prefix: bytes,
                     started: float, args: argparse.Namespace) -> dict:
    """Until the agent took every pre-existing file (see the module's docstring), it died, or it stalled."""
    progress_at, best = started, 0
    last_checkpoint_look = 0.0
    checkpointed: set[bytes] = set()
    while True:
        now = time.monotonic()
        follower.update()
        logged = min(len(paths), len(follower.tailed & paths) + follower.more)
        if now - last_checkpoint_look >= 0.5:
            last_checkpoint_look = now
            checkpointed = checkpointed_paths(data, prefix) & paths
        taken = max(logged, len(checkpointed))
        if taken > best:
            best, progress_at = taken, now
        outcome = {"files_logged": logged, "files_checkpointed": len(checkpointed), "seconds": round(now - started, 2)}
        if logged == len(paths) or len(checkpointed) == len(paths):
            return {"complete": True, "by": "log" if logged == len(paths) else "checkpoints", **outcome}
        if proc.poll() is not None:
            return {"complete": False, "by": f"the agent exited ({proc.returncode})", **outcome}
        if now - progress_at > args.stall:
            return {"complete": False, "by": f"no progress for {args.stall:g} s", **outcome}
        if now - started > args.startup_timeout:
            return {"complete": False, "by": f"--startup-timeout {args.startup_timeout:g} s", **outcome}
        time.sleep(0.1)


# ---------------------------------------------------------------- load

def schedule(n: int, load: str, args: argparse.Namespace, rng: random.Random) -> tuple[float, callable, int]:
    """(lines a second, a function from the line's number to the file's index, active files)."""
    if load == "random":
        return float(args.rate), lambda k: rng.randrange(n), n
    active = sorted(rng.sample(range(n), max(1, round(n * args.active_share))))
    return len(active) * args.active_rate, lambda k: active[k % len(active)], len(active)


def write_load(proc: subprocess.Popen, paths: list[str], pick, rate: float, seconds: float, first_seq: int,
               written: list[tuple[int, int]], on_window, args: argparse.Namespace) -> dict:
    """Write ``rate`` lines a second for ``seconds``; ``on_window()`` is called when the warm-up ends.
    Appends (write time ns, seq) to ``written``; stops early when the agent dies."""
    period = 1.0 / rate
    warmup_lines = round(args.warmup * rate)
    total = round(seconds * rate)
    late = 0
    t0 = time.monotonic()
    for k in range(total + 1):
        late += keep_pace(t0 + k * period, period)
        if k == warmup_lines:
            on_window()
        if k == total:
            break
        if k % max(1, int(rate // 10)) == 0 and proc.poll() is not None:
            return {"died": True, "lines": k, "late_writes": late}
        index = pick(k)
        fd = os.open(paths[index], os.O_WRONLY | os.O_APPEND)
        try:
            ns = time.time_ns()
            os.write(fd, line(b"w", first_seq + k, index, ns))
        finally:
            os.close(fd)
        written.append((ns, first_seq + k))
    return {"died": False, "lines": total, "late_writes": late}


# ---------------------------------------------------------------- the archive

def read_time_ns(text) -> int | None:
    """A record's ``time`` (its read time: the bench's lines have no parser) as epoch nanoseconds."""
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        return None
    return int(moment.timestamp() * 1e9)


def read_archive(archive: str) -> dict:
    """Every bench line in the archive: id -> [(archive time, read time) ns]: the mtime of each object
    holding it, and the record's time (when the agent read it)."""
    seen: dict[bytes, list[int]] = collections.defaultdict(list)
    objects = bad = records = foreign = 0
    for directory, subdirs, files in os.walk(archive):
        subdirs[:] = [d for d in subdirs if d != ".tmp"]  # objects being built: not in the archive yet
        for name in files:
            path = os.path.join(directory, name)
            try:
                mtime = os.stat(path).st_mtime_ns
                with open(path, "rb") as handle:
                    body = handle.read()
                if name.endswith(".gz"):
                    body = gzip.decompress(body)
            except (OSError, EOFError, gzip.BadGzipFile):
                bad += 1
                continue
            objects += 1
            for text in body.splitlines():
                records += 1
                try:
                    record = orjson.loads(text)
                    message = record.get("message", "")
                except (orjson.JSONDecodeError, AttributeError):
                    foreign += 1
                    continue
                match = LINE.match(message.encode() if isinstance(message, str) else b"")
                if match is None:
                    foreign += 1
                    continue
                seen[match.group(1)].append((mtime, read_time_ns(record.get("time"))))
    return {"seen": seen, "objects": objects, "unreadable_objects": bad, "records": records,
            "records_not_from_the_bench": foreign}


def check_lines(seen: dict[bytes, list[int]], expected: list[bytes]) -> dict:
    """Each expected id exactly once?"""
    missing = [e for e in expected if e not in seen]
    duplicates = sum(len(seen[e]) - 1 for e in expected if len(seen.get(e, ())) > 1)
    return {"expected": len(expected), "arrived": len(expected) - len(missing), "missing": len(missing),
            "first_missing": [m.decode() for m in missing[:5]], "duplicates": duplicates}


# ---------------------------------------------------------------- one run

def bench_run(name: str, workdir: str, args: argparse.Namespace) -> Result:
    n_text, load, layout = name.split("-")
    n = int(n_text)
    rng = random.Random(f"{args.seed}-{name}")
    data, logs, archive = (os.path.join(workdir, d) for d in ("data", "logs", "archive"))
    t = time.monotonic()
    paths, pattern = make_files(logs, n, layout)
    made_s = time.monotonic() - t
    conf = os.path.join(workdir, "shipper.toml")
    with open(conf, "w") as handle:
        handle.write(AGENT_CONF.format(data=data, tag=TAG, pattern=pattern, archive=archive,
                                       upload_interval=args.upload_interval))
    rate, pick, active = schedule(n, load, args, rng)
    log(f"  {n:,} files made in {made_s:.1f} s ({layout}); load {load}: {rate:g} lines/s over {active:,} file(s)")
    if args.quiet_wait > 0:
        wait_quiet(args.quiet_wait, log)

    stderr_path = os.path.join(workdir, "shipper.stderr")
    errors = open(stderr_path, "wb")
    env = {**os.environ, "PYTHONPATH": ROOT}
    started_ns = time.time_ns()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "shipper", "run", "-c", conf], stdout=errors, stderr=errors,
                            env=env, cwd=workdir, preexec_fn=limit_descriptors(args.nofile))
    pid = proc.pid
    sampler = Sampler(pid, started)
    sampler.start()
    follower = LogFollower(stderr_path)
    extra: dict = {"files": n, "load": load, "layout": f"{layout}, objects {args.upload_interval}", "pattern": os.path.relpath(pattern, workdir),
                   "rate_lines_per_s": rate, "active_files": active, "files_made_s": round(made_s, 2)}
    written: list[tuple[int, int]] = []
    window: dict = {}
    status_end: dict = {}
    phase = ["start-up"]  # where the run is: the phase the agent died in, if it did
    try:
        time.sleep(0.2)
        extra["descriptor_limit"] = descriptor_limit(pid)
        startup = wait_for_startup(proc, follower, {p.encode() for p in paths}, data,
                                   (logs + os.sep).encode(), started, args)
        cpu_now, status_now = reading(lambda: cpu_seconds(pid)), reading(lambda: proc_status(pid)["VmRSS"])
        if cpu_now is not None and status_now is not None:
            startup["cpu_s"], startup["rss_mib"] = round(cpu_now, 2), round(status_now, 1)
        extra["startup"] = startup
        log(f"  start-up: {'every file taken' if startup['complete'] else 'INCOMPLETE (' + startup['by'] + ')'} "
            f"after {startup['seconds']} s (logged {startup['files_logged']:,}, checkpointed "
            f"{startup['files_checkpointed']:,} of {n:,})")

        def window_starts() -> None:
            phase[0] = "window"
            cpu_at = reading(lambda: cpu_seconds(pid))
            if cpu_at is not None:
                window.update(t=time.monotonic(), cpu=cpu_at, background=Background())

        writing = {"died": True, "lines": 0, "late_writes": 0}
        if proc.poll() is None:
            phase[0] = "warm-up"
            writing = write_load(proc, paths, pick, rate, args.warmup + args.window, 0, written, window_starts, args)
            end, cpu_end, status = time.monotonic(), reading(lambda: cpu_seconds(pid)), reading(lambda: proc_status(pid))
            if "t" in window and cpu_end is not None and status is not None and "VmRSS" in status:
                window.update(end=end, cpu_end=cpu_end, status=status)
                phase[0] = "settle"
                time.sleep(args.settle)
        extra["writing"] = writing
        status_end = reading(lambda: proc_status(pid)) or {}
    finally:
        sampler.halt.set()
        died = proc.poll() is not None
        if not died:
            phase[0] = "after SIGTERM"
        sigterm_ns = time.time_ns()
        code, exit_s = stop(proc, timeout=args.timeout)
        sampler.join(5)
        errors.close()
    follower.update()
    ended = time.monotonic()

    extra["agent"] = {"died": died, "phase": phase[0], "exit_code": code,
                      "seconds_alive": round(ended - started - (0 if died else exit_s), 1),
                      "seconds_to_exit_after_sigterm": None if died else round(exit_s, 2),
                      "warning_or_error_log_lines": follower.errors, "first_errors": follower.first_errors,
                      "emfile_log_lines": follower.emfile, "files_not_opened_emfile": follower.unreadable,
                      "last_log_lines": follower.last_lines()}
    measured = "end" in window
    seconds = window["end"] - window["t"] if measured else 0.0
    cpu = window["cpu_end"] - window["cpu"] if measured else 0.0
    if measured:
        other, steal = window["background"].other(cpu)
        extra.update(cpu_percent_of_a_core=round(100 * cpu / seconds, 3), other_cpu_seconds=other,
                     steal_cpu_seconds=steal, rss_mib_window_end=round(window["status"]["VmRSS"], 1))
        warn_if_disturbed(seconds, other, steal, log)
    window_span = (window["t"] - started, window["end"] - started) if measured else None
    extra["descriptors"] = {"max": sampler.max_fds(), "max_in_window": sampler.max_fds(*window_span) if measured else None,
                            "samples": len(sampler.samples)}
    extra["samples"] = sampler.samples  # (s since fork, descriptors, VmRSS MiB, threads)
    peak = status_end.get("VmHWM") or (window.get("status") or {}).get("VmHWM")
    extra["peak_rss_mib"] = round(peak, 1) if peak else None

    found = read_archive(archive)
    seen = found.pop("seen")
    extra["archive"] = found
    pre_ids = [b"p%09d" % i for i in range(n)]
    load_ids = [b"w%09d" % seq for _, seq in written]
    extra["delivery"] = {"pre_existing": check_lines(seen, pre_ids), "written": check_lines(seen, load_ids),
                         "unknown_ids": len(set(seen) - set(pre_ids) - set(load_ids))}
    pre_times = [min(seen[i])[0] for i in pre_ids if i in seen]
    extra["pre_existing_archived_s"] = round((max(pre_times) - started_ns) / 1e9, 2) if pre_times else None
    if measured:
        t0_ns = started_ns + int((window["t"] - started) * 1e9)
        t1_ns = started_ns + int((window["end"] - started) * 1e9)
        in_window = [(ns, seq) for ns, seq in written if t0_ns <= ns < t1_ns]
        archived = [(min(seen[b"w%09d" % seq]), ns) for ns, seq in in_window if b"w%09d" % seq in seen]
        extra["latency_ms"] = {"lines_in_window": len(in_window),
                               "archived_after_sigterm": sum(1 for (at, _), _ in archived if at >= sigterm_ns),
                               **distribution_ms([(at - ns) / 1e9 for (at, _), ns in archived])}
        # The input's own part: from the write to the agent's read of the line (the record's time).
        extra["read_latency_ms"] = distribution_ms([(read - ns) / 1e9 for (_, read), ns in archived
                                                    if read is not None])
    extra["verified"] = (not died and extra["delivery"]["pre_existing"]["missing"] == 0
                         and extra["delivery"]["written"]["missing"] == 0
                         and extra["delivery"]["pre_existing"]["duplicates"] == 0
                         and extra["delivery"]["written"]["duplicates"] == 0)
    if args.keep:
        log(f"  kept {workdir}")
    return Result(name, seconds, 0, len(load_ids), cpu, extra["peak_rss_mib"] or 0.0, extra)


def measure(name: str, run_dir: str, args: argparse.Namespace) -> Result:
    workdir = tempfile.mkdtemp(prefix=f"{name}-", dir=run_dir)
    try:
        result = bench_run(name, workdir, args)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result.extra["measured"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    log("  " + summary_line(dataclasses.asdict(result)))
    return result


# ---------------------------------------------------------------- report

def agent_cell(e: dict) -> str:
    agent = e["agent"]
    if agent["died"]:
        return f"DIED in the {agent.get('phase', '?')} (exit {agent['exit_code']}, {agent['seconds_alive']} s after start)"
    text = f"exit {agent['exit_code']}"
    if agent["files_not_opened_emfile"]:
        text += f"; {agent['files_not_opened_emfile']:,} files not opened (EMFILE)"
    if agent["emfile_log_lines"] > agent["files_not_opened_emfile"]:
        text += f"; {agent['emfile_log_lines'] - agent['files_not_opened_emfile']:,} other EMFILE errors"
    elif agent["warning_or_error_log_lines"] and not agent["emfile_log_lines"]:
        text += f"; {agent['warning_or_error_log_lines']:,} warnings/errors logged"
    return text


def startup_cell(e: dict) -> str:
    s = e.get("startup")
    if not s:
        return "-"
    if s["complete"]:
        return f"{s['seconds']:.2f}"
    return f"never ({max(s['files_logged'], s['files_checkpointed']):,} of {e['files']:,} by {s['seconds']:.0f} s)"


def latency_cell(lat: dict) -> str:
    if not lat.get("count"):
        return f"none archived (0 of {lat['lines_in_window']:,})" if lat.get("lines_in_window") else "-"
    text = f"{lat['p50']:,} / {lat['p99']:,} / {lat['max']:,}"
    notes = []
    if lat["count"] < lat["lines_in_window"]:
        notes.append(f"of the {lat['count']:,} of {lat['lines_in_window']:,} lines archived")
    if lat.get("archived_after_sigterm"):
        notes.append(f"{lat['archived_after_sigterm']:,} only after SIGTERM")
    return text + (f" ({'; '.join(notes)})" if notes else "")


def read_latency_cell(lat: dict) -> str:
    return f"{lat['p50']:,} / {lat['p99']:,}" if lat.get("count") else "-"


def summary_line(r: dict) -> str:
    e = r["extra"]
    lat = e.get("latency_ms") or {}
    d = e["delivery"]
    cpu = f"{e['cpu_percent_of_a_core']:.2f} % of a core" if "cpu_percent_of_a_core" in e else "CPU not measured"
    return (f"{r['name']}: {cpu}, peak RSS {e['peak_rss_mib'] or '-'} MiB, max {e['descriptors']['max']} fds, "
            f"start-up {startup_cell(e)} s, latency p50/p99/max {latency_cell(lat)} ms, read p50/p99 "
            f"{read_latency_cell(e.get('read_latency_ms') or {})} ms; "
            f"missing {d['pre_existing']['missing'] + d['written']['missing']:,}, duplicates "
            f"{d['pre_existing']['duplicates'] + d['written']['duplicates']:,}; agent {agent_cell(e)}")


HEADER = ("files", "layout", "load", "lines/s", "start-up s", "CPU % of a core", "peak RSS MiB", "max fds",
          "fds at limit", "latency p50 / p99 / max ms", "read latency p50 / p99 ms", "pre-existing lines missing / dup", "written lines missing / dup",
          "agent")


def rows(results: list[dict]) -> list[tuple[str, ...]]:
    out = []
    for r in results:
        e = r["extra"]
        lat = e.get("latency_ms") or {}
        pre, wrote = e["delivery"]["pre_existing"], e["delivery"]["written"]
        out.append((f"{e['files']:,}", e["layout"], e["load"], f"{e['rate_lines_per_s']:g}", startup_cell(e),
                    f"{e['cpu_percent_of_a_core']:.2f}" if "cpu_percent_of_a_core" in e else "-",
                    f"{e['peak_rss_mib']:.1f}" if e["peak_rss_mib"] else "-",
                    f"{e['descriptors']['max']:,}" if e["descriptors"]["max"] is not None else "-",
                    e.get("descriptor_limit") or "?",
                    latency_cell(lat),
                    read_latency_cell(e.get("read_latency_ms") or {}),
                    f"{pre['missing']:,} / {pre['duplicates']:,}", f"{wrote['missing']:,} / {wrote['duplicates']:,}",
                    agent_cell(e)))
    return out


def markdown(results: list[dict], info: dict, settings: dict) -> str:
    out = [
        "# Scale benchmark",
        "",
        f"{info['date']} on {info['nproc']} cores ({info['cpu']}), {info['memory_gib']} GiB, Linux {info['kernel']}, "
        f"Python {info['python']}; {info['shipper']} (commit {info['commit']}).",
        "",
        f"One file input on N files (`logs/*.log`, or `logs/*/*.log` over {SUBDIRS} directories), each holding "
        "one line before the agent starts; directory output; default settings but the upload_interval the layout "
        "column says (1s: line-to-archive latency measures the agent; 60s is the default); the agent "
        f"under a soft RLIMIT_NOFILE of {settings['nofile']} (as the systemd unit). Load `random`: "
        f"{settings['rate']:g} lines/s in total to random files; `active`: {100 * settings['active_share']:g} % of the "
        f"files at {settings['active_rate']:g} line/s each. Measured over {settings['window']:g} s after the start-up "
        f"and {settings['warmup']:g} s of writing. Targets (issue 15) at 10,000 files: CPU under "
        f"{TARGETS['cpu_percent_of_a_core']:g} % of a core, peak RSS under {TARGETS['peak_rss_mib']:g} MiB, "
        f"descriptors never above max_open_files, p99 latency under {TARGETS['latency_p99_ms']:,} ms; at 100,000 "
        f"files: running, start-up under {TARGETS['startup_s_at_100000']:g} s. The machine may be shared: the CPU "
        "other processes used during each window is given per run (above 10 % of the window, the run's CPU figure "
        "is disturbed).",
        "",
        *md_table(HEADER, rows(results)),
        "",
        "start-up: from the fork until the agent's log named or counted every pre-existing file (`tailing PATH`, `tailing N more files`) or its "
        "checkpoint files did, whichever came first; never: it did not (the run went on). peak RSS: VmHWM over "
        "the whole life; max fds: /proc/PID/fd counted every second over the whole run; fds at limit: the soft/hard "
        "\"Max open files\" of /proc/PID/limits; latency: line write() (time.time_ns in the line) to the mtime of the "
        "archive object holding it, lines written in the window, including flush_interval 1 s and upload_interval 1 s "
        "(\"only after SIGTERM\": lines that reached the archive only in the agent's drain, after the settle); "
        "missing / dup: looked for by id in the whole archive after SIGTERM.",
        "",
        "## Per run",
        "",
    ]
    for r in results:
        e = r["extra"]
        s = e.get("startup") or {}
        text = (f"- {r['name']} (measured {e.get('measured', '?')}): load over {e['active_files']:,} file(s), "
                f"{e['writing']['lines']:,} lines, {e['writing']['late_writes']} late writes; start-up "
                f"{'complete by ' + s['by'] if s.get('complete') else 'incomplete: ' + s.get('by', '?')} "
                f"at {s.get('seconds', '-')} s with {s.get('cpu_s', '-')} CPU s, {s.get('rss_mib', '-')} MiB RSS; "
                + (f"the pre-existing lines all archived {e['pre_existing_archived_s']} s after the fork; "
                   if not e["delivery"]["pre_existing"]["missing"] else
                   f"the last of the {e['delivery']['pre_existing']['arrived']:,} pre-existing lines that arrived was "
                   f"archived {e['pre_existing_archived_s']} s after the fork; ")
                + f"max fds in the "
                f"window {e['descriptors']['max_in_window'] or '-'}; {e['archive']['objects']} objects "
                f"({e['archive']['unreadable_objects']} unreadable); other processes used "
                f"{e.get('other_cpu_seconds', '-')} CPU s in the window, the hypervisor stole {e.get('steal_cpu_seconds', '-')}")
        out.append(text)
        agent = e["agent"]
        if agent["died"] or agent["warning_or_error_log_lines"]:
            out.append(f"  - the agent {'died: exit ' + str(agent['exit_code']) if agent['died'] else 'lived'}; "
                       f"{agent['warning_or_error_log_lines']:,} warning/error lines ({agent['emfile_log_lines']:,} "
                       f"with EMFILE, {agent['files_not_opened_emfile']:,} of them a file it could not open)"
                       + ("; the first others: " + "; ".join(f"`{t}`" for t in agent["first_errors"][:3])
                          if agent["first_errors"] else ""))
            if agent["died"]:
                out.append("  - its last log lines: " + " / ".join(f"`{t}`" for t in agent["last_log_lines"][-5:]))
    method = __doc__.split("Each run is its own agent", 1)[1].split("\nResults:", 1)[0]
    out += ["", "## Method", "", "Each run is its own agent" + method.rstrip(), ""]
    return "\n".join(out)


# ---------------------------------------------------------------- main

def run_names(args: argparse.Namespace) -> list[str]:
    return [f"{n}-{load}-{layout}" for n in args.files for layout in args.layout for load in args.load]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="+", type=int, default=list(FILE_COUNTS),
                        help="numbers of files matched (default 100 1000 10000; 100000 only when named)")
    parser.add_argument("--load", nargs="+", choices=LOADS, default=list(LOADS), help="load cases (default both)")
    parser.add_argument("--layout", nargs="+", choices=LAYOUTS, default=["flat"],
                        help=f"flat: DIR/*.log; subdirs: DIR/*/*.log over {SUBDIRS} directories (default flat)")
    parser.add_argument("--rate", type=float, default=10, help="random: lines a second in total (default 10)")
    parser.add_argument("--active-share", type=float, default=0.01, help="active: share of files written to (0.01)")
    parser.add_argument("--active-rate", type=float, default=1.0, help="active: lines a second per file (default 1)")
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds of writing before the window (15)")
    parser.add_argument("--window", type=float, default=30.0, help="seconds measured (default 30)")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds without writing after the window, before SIGTERM (default 5)")
    parser.add_argument("--upload-interval", default="1s",
                        help="the directory output's upload_interval (default 1s, so that the line-to-archive "
                             "latency measures the agent; 60s is the default setting: an object a minute)")
    parser.add_argument("--nofile", type=int, default=NOFILE, help="the agent's soft RLIMIT_NOFILE (default 1024)")
    parser.add_argument("--startup-timeout", type=float, default=300.0,
                        help="seconds allowed for the agent to take every file (default 300)")
    parser.add_argument("--stall", type=float, default=20.0,
                        help="start-up gives up after this many seconds without a newly taken file (default 20)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the runs of the existing results that this invocation does not measure")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: write the .md again from the existing .json")
    add_common_arguments(parser, timeout=60, what="agent's exit after SIGTERM")  # --exc-json-share: unused here
    args = parser.parse_args(argv)
    results_name = args.results or "scale"
    path = os.path.join(RESULTS, f"{results_name}.json")
    if args.report_only:
        with open(path) as handle:
            document = json.load(handle)
        write_results(RESULTS, results_name, document, markdown(document["results"], document["machine"],
                                                                document["settings"]), log)
        return 0

    info = machine()
    info.pop("rsyslog", None)
    info.pop("gzip", None)
    info["shipper"] = subprocess.run([sys.executable, "-m", "shipper", "version"], capture_output=True, text=True,
                                     env={**os.environ, "PYTHONPATH": ROOT}).stdout.strip() or "unknown"
    log(f"{info['nproc']} cores, {info['cpu']}; {info['shipper']} from {ROOT} (commit {info['commit']})")
    names = run_names(args)
    measured = measure_all(names, names, args.repeat, lambda name, run_dir: measure(name, run_dir, args),
                           lambda r: {"cpu_percent": r.extra.get("cpu_percent_of_a_core"),
                                      "peak_rss_mib": r.extra["peak_rss_mib"]},
                           WORK, args.keep, log, median_of=lambda r: r.cpu_seconds)
    results = [dataclasses.asdict(r) for r in measured]  # not Result.as_dict: no throughput, and a dead run has no window
    settings = {k: getattr(args, k) for k in ("warmup", "window", "settle", "rate", "active_share", "active_rate",
                                              "nofile", "stall", "startup_timeout", "seed")}
    if args.merge and os.path.exists(path):
        with open(path) as handle:
            old = json.load(handle)
        fresh = {r["name"] for r in results}
        results = [r for r in old.get("results", []) if r["name"] not in fresh] + results
        order = {f"{n}-{load}-{layout}": (n, LAYOUTS.index(layout), LOADS.index(load))
                 for n in {r["extra"]["files"] for r in results} for layout in LAYOUTS for load in LOADS}
        results.sort(key=lambda r: order.get(r["name"], (0, 0, 0)))
    print()
    print(format_table(HEADER, rows(results)))
    document = {"machine": info, "settings": settings, "targets": TARGETS, "results": results}
    write_results(RESULTS, results_name, document, markdown(results, info, settings), log)
    return 0 if all(r["extra"]["verified"] for r in results) else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
