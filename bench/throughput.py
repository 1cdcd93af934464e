"""Throughput benchmark: shipper against cat, gzip -1 and rsyslog on one realistic log file.

    .venv/bin/python bench/throughput.py [--lines N]

Generates (or reuses) bench/work/throughput-input.log, warms the page cache with one
`cat`, then measures one after the other (never in parallel, the machine has 2 cores):

- cat FILE > /dev/null            the physical read limit
- gzip -1 -c FILE > /dev/null     the compression limit
- rsyslogd: imfile -> omfile      raw lines to a file; done when the output has N lines
- shipper: file -> directory      gzip objects; SIGTERM once the agent has read the whole
                                  file; done when the checkpoint reaches the file size (the
                                  drain fsynced and linked the last object) and the agent
                                  exited; then the archive is verified

Results: a table on stdout, bench/results/throughput.json and bench/results/throughput.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import platform
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
from measure import (Background, LineCounter, Result, add_common_arguments, add_py_spy_argument,  # noqa: E402
                     cpu_seconds, measure_all, minor_faults, peak_rss_mib, poll_until, py_spy_command, read_chars,
                     run_to_devnull, stop, wait_quiet, warn_if_disturbed, write_results)

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
WORK = os.path.join(BENCH, "work")
RESULTS = os.path.join(BENCH, "results")
INPUT = os.path.join(WORK, "throughput-input.log")
# The agent of this tree (a worktree has no .venv of its own): python -m shipper with ROOT first on the path.
SHIPPER_ARGV = [sys.executable, "-m", "shipper"]
AGENT_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
RSYSLOGD = "/usr/sbin/rsyslogd"
POLL = 0.05  # seconds between completion checks
# The filter stage (issue 16), each alone on the same file and output as "shipper": (a) is "shipper".
FILTERS = {
    "shipper+grep": ('[[filters]]\ntype = "grep"\nrules = [{ exclude = \' /healthz\' }]\n', "health checks excluded"),
    # Every built-in secret rule (the default set); "all" adds the opt-in email, ipv4 and ipv6 rules,
    # which in an access log redact every client address: measured on its own, without a target.
    "shipper+redact": ('[[filters]]\ntype = "redact"\n', "every built-in secret rule (the default set)"),
    "shipper+throttle": ('[[filters]]\ntype = "throttle"\nlines_per_second = 100000000\n'
                         'bytes_per_second = "100GiB"\n', "a rate far above the input's: no drops"),
    "shipper+level": ('[[filters]]\ntype = "level"\n', "level detection on every line"),
    "shipper+redact-all": ('[[filters]]\ntype = "redact"\npatterns = ["all"]\n',
                           "every built-in rule, the opt-in email, ipv4 and ipv6 too"),
}
HEALTH_CHECK = " /healthz"  # what shipper+grep drops: the verification drops the same lines
TOOLS = ("cat", "gzip", "rsyslog", "shipper", *FILTERS)
OPTIONAL_TOOLS = ("shipper+redact-all",)  # minutes on this input: only with --only


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------- per-thread CPU

def thread_cpu(pid: int) -> list[dict]:
    """CPU seconds of each thread of ``pid`` (with its kernel name), busiest first."""
    ticks = os.sysconf("SC_CLK_TCK")
    threads = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as handle:
                stat = handle.read()
            with open(f"/proc/{pid}/task/{tid}/comm") as handle:
                comm = handle.read().strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        user, system = int(fields[11]) / ticks, int(fields[12]) / ticks
        threads.append({"tid": int(tid), "comm": comm, "user": round(user, 2), "sys": round(system, 2)})
    return sorted(threads, key=lambda t: -(t["user"] + t["sys"]))


# ---------------------------------------------------------------- cat, gzip

def bench_cat(meta: dict) -> Result:
    return run_to_devnull("cat", ["cat", INPUT], meta["bytes"], meta["lines"])


def bench_gzip(meta: dict) -> Result:
    return run_to_devnull("gzip -1", ["gzip", "-1", "-c", INPUT], meta["bytes"], meta["lines"])


# ---------------------------------------------------------------- rsyslog

RSYSLOG_CONF = """\
# imfile -> omfile, nothing else: no imuxsock/imklog (no system socket), own work directory.
global(workDirectory="{spool}" maxMessageSize="64k")
module(load="imfile" mode="inotify")
template(name="raw" type="string" string="%rawmsg%\\n")
ruleset(name="bench") {{
  action(type="omfile" file="{out}" template="raw")
}}
input(type="imfile" file="{input}" tag="bench" ruleset="bench")
"""


def bench_rsyslog(meta: dict, workdir: str, timeout: float, background: Background) -> Result:
    spool = os.path.join(workdir, "spool")
    os.makedirs(spool)
    out = os.path.join(workdir, "out.log")
    conf = os.path.join(workdir, "rsyslog.conf")
    pidfile = os.path.join(workdir, "rsyslogd.pid")
    with open(conf, "w") as handle:
        handle.write(RSYSLOG_CONF.format(spool=spool, out=out, input=INPUT))
    subprocess.run([RSYSLOGD, "-N1", "-f", conf], check=True, capture_output=True)
    counter = LineCounter(out)
    with open(os.path.join(workdir, "rsyslogd.stderr"), "wb") as errors:
        started = time.monotonic()
        proc = subprocess.Popen([RSYSLOGD, "-n", "-f", conf, "-i", pidfile], stdout=errors, stderr=errors)
        try:
            def step(now):
                lines = counter.update()
                return lines >= meta["lines"], f"{lines} of {meta['lines']} lines; see {workdir}/rsyslogd.stderr"

            elapsed = poll_until(proc, "rsyslogd", started, timeout, POLL, step) - started
            cpu, rss, threads = cpu_seconds(proc.pid), peak_rss_mib(proc.pid), thread_cpu(proc.pid)
            faults = minor_faults(proc.pid)
            other, steal = background.other(cpu)
        finally:
            code, _ = stop(proc, timeout=10)
    time.sleep(0.2)
    lines = counter.update()
    counter.close()
    extra = {"output_lines": lines, "output_bytes": counter.bytes, "exit_code": code, "minor_faults": faults,
             "other_cpu_seconds": other, "steal_cpu_seconds": steal, "threads": threads}
    if lines != meta["lines"]:
        log(f"  WARNING: rsyslog wrote {lines} lines, expected {meta['lines']}")
    return Result("rsyslog", elapsed, meta["bytes"], meta["lines"], cpu, rss, extra)


# ---------------------------------------------------------------- shipper

# The agent reading one file from its start, parser none; {output} is the [[outputs]] table.
AGENT_CONF = """\
[agent]
data_dir = "{data}"
checkpoint_interval = "100ms"

[cloud]
metadata = "off"

[[inputs]]
type = "file"
tag = "{tag}"
paths = ["{input}"]
parser = "none"
start_at = "beginning"
{output}"""

DIRECTORY_OUTPUT = """
[[outputs]]
type = "directory"
path = "{archive}"
compression = "gzip"
upload_interval = "2s"
"""


def checkpoint_offset(path: str, input_path: str = INPUT) -> int:
    """The checkpointed offset of ``input_path`` in a file input's checkpoints (``path`` names its base
    file, data_dir/checkpoints/file-ID.json; its journal is read too); -1 while there is none."""
    from shipper.inputs.checkpoints import CheckpointStore

    data_dir = os.path.dirname(os.path.dirname(path))
    input_id = os.path.basename(path)[len("file-"):-len(".json")]
    for entry in CheckpointStore(data_dir, input_id).load().values():
        if entry.path == input_path:
            return entry.offset
    return -1


def bench_shipper(meta: dict, workdir: str, timeout: float, py_spy: list[str] | None,
                  background: Background, name: str = "shipper") -> Result:
    data = os.path.join(workdir, "data")
    archive = os.path.join(workdir, "archive")
    conf = os.path.join(workdir, "shipper.toml")
    filters = FILTERS[name][0] if name in FILTERS else ""
    with open(conf, "w") as handle:
        handle.write(AGENT_CONF.format(data=data, tag="bench", input=INPUT,
                                        output=DIRECTORY_OUTPUT.format(archive=archive)) + filters)
    checkpoint = os.path.join(data, "checkpoints", "file-bench.json")
    size = meta["bytes"]
    timeline = []
    read_done = None
    profiler = None
    with open(os.path.join(workdir, "shipper.stderr"), "wb") as errors:
        started = time.monotonic()
        proc = subprocess.Popen([*SHIPPER_ARGV, "run", "-c", conf], stdout=errors, stderr=errors, env=AGENT_ENV)
        if py_spy:
            profiler = subprocess.Popen([py_spy[0], "record", "--pid", str(proc.pid), *py_spy[1:]],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            last_sample = 0.0
            exited = None  # the agent's rusage once it exited (after the SIGTERM at the end of the file)
            threads: list = []
            peak = 0.0  # VmHWM while it runs: the rusage of a child counts the pages it had before exec

            def reap() -> None:
                """If the agent has exited: its rusage in ``exited`` (and its code in proc, for stop())."""
                nonlocal exited
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    exited, proc.returncode = usage, os.waitstatus_to_exitcode(status)

            def step(now):
                nonlocal read_done, last_sample, threads, peak
                if exited is None:
                    reap()
                offset = checkpoint_offset(checkpoint)
                if exited is None:
                    rchar = read_chars(proc.pid)
                    if read_done is None and rchar >= size:
                        # Everything is read: stop the agent, which ships what it read and exits (its
                        # drain); waiting for the last object's upload_interval instead would round
                        # every time up to the next 2 s boundary of the objects.
                        read_done = now - started
                        proc.send_signal(signal.SIGTERM)
                    try:  # the agent may be exiting: keep the last full sample
                        threads = thread_cpu(proc.pid) or threads
                        peak = max(peak, peak_rss_mib(proc.pid))
                        if now - last_sample >= 0.5 or offset == size:
                            timeline.append((round(now - started, 2), offset, rchar, round(cpu_seconds(proc.pid), 2)))
                            last_sample = now
                    except (OSError, RuntimeError, psutil.Error):  # RuntimeError: no VmHWM in a zombie
                        pass
                return offset == size, f"checkpoint at {offset} of {size}; see {workdir}/shipper.stderr"

            now = poll_until(proc, "shipper", started, timeout, POLL, step)
            elapsed = now - started
            deadline = time.monotonic() + 60
            while exited is None:  # the checkpoint reached the end first: the agent is exiting (SIGTERM sent)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"shipper did not exit within 60 s of its SIGTERM; see {workdir}/shipper.stderr")
                time.sleep(0.01)
                reap()
            cpu, rss, faults = exited.ru_utime + exited.ru_stime, peak, exited.ru_minflt
            other, steal = background.other(cpu)
        finally:
            code, exit_seconds = stop(proc, timeout=60)
            if profiler is not None:
                try:
                    profiler.wait(60)
                except subprocess.TimeoutExpired:
                    profiler.terminate()
                    profiler.wait()
    extra = {"exit_code": code, "seconds_to_exit_after_sigterm": round(exit_seconds, 2),
             "reader_done_seconds": None if read_done is None else round(read_done, 2),
             "minor_faults": faults, "other_cpu_seconds": other, "steal_cpu_seconds": steal,
             "threads": threads, "timeline": timeline}
    if name == "shipper+grep":
        extra.update(verify_archive(archive, meta, keep=lambda line: HEALTH_CHECK not in line))
    else:  # redact changes messages: only their count is checked
        extra.update(verify_archive(archive, meta, messages=not name.startswith("shipper+redact")))
    return Result(name, elapsed, size, meta["lines"], cpu, rss, extra)


def filter_available(name: str) -> str | None:
    """Why a filter variant cannot run in this tree (its module missing, its config refused), or None."""
    from shipper.config import load_text
    from shipper.errors import ConfigError

    text = AGENT_CONF.format(data="/nonexistent", tag="bench", input=INPUT, output=DIRECTORY_OUTPUT.format(
        archive="/nonexistent")) + FILTERS[name][0]
    try:
        load_text(text, name)
    except ConfigError as exc:
        return "; ".join(exc.problems)
    return None


def verify_archive(archive: str, meta: dict, keep=None, messages: bool = True) -> dict:
    """Count the archived records and check their messages against the input, in order: the input's lines
    for which ``keep`` is true (all by default); ``messages`` False checks the count only."""
    objects = []
    for directory, subdirs, files in os.walk(archive):
        subdirs[:] = [d for d in subdirs if d != ".tmp"]
        objects += [os.path.join(directory, f) for f in files if f.endswith(".ndjson.gz")]

    def seq(path: str) -> int:
        match = re.search(r"-(\d+)\.ndjson\.gz$", path)
        return int(match.group(1)) if match else 0

    objects.sort(key=seq)
    records = ndjson_bytes = compressed = 0
    mismatch = None
    expected_records = meta["lines"]

    def expected_lines(source):
        for line in source:
            text = line[:-1].decode("utf-8")
            if keep is None or keep(text):
                yield text

    if keep is not None:
        with open(INPUT, "rb") as source:
            expected_records = sum(1 for _ in expected_lines(source))
    with open(INPUT, "rb") as source:
        wanted = expected_lines(source)
        for path in objects:
            compressed += os.path.getsize(path)
            with gzip.open(path, "rb") as handle:
                carry = b""
                while True:
                    chunk = handle.read(16 << 20)
                    if not chunk:
                        break
                    ndjson_bytes += len(chunk)
                    lines = (carry + chunk).split(b"\n")
                    carry = lines.pop()
                    for line in lines:
                        records += 1
                        expected = next(wanted, None)
                        if messages and mismatch is None and orjson.loads(line).get("message") != expected:
                            mismatch = {"record": records, "object": path}
                if carry:
                    mismatch = mismatch or {"record": records, "object": path, "error": "no final newline"}
    ok = records == expected_records and mismatch is None
    log(f"  verify: {len(objects)} objects, {records:,} records (expected {expected_records:,}), "
        f"{ndjson_bytes / 1e6:.1f} MB NDJSON -> {compressed / 1e6:.1f} MB gzip, "
        f"messages {('match the input' if messages else 'not compared') if mismatch is None else f'DIFFER at {mismatch}'}")
    return {"objects": len(objects), "records": records, "expected_records": expected_records,
            "verified": ok, "mismatch": mismatch,
            "ndjson_bytes": ndjson_bytes, "archive_bytes": compressed}


# ---------------------------------------------------------------- report

def machine() -> dict:
    model = "unknown"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(argv: list[str]) -> str:
        try:
            first = subprocess.run(argv, capture_output=True, text=True, env=AGENT_ENV).stdout.splitlines()[0]
            return " ".join(first.replace("compiled with:", "").split())
        except (OSError, IndexError):
            return "unknown"

    shipper_version = version([*SHIPPER_ARGV, "version"])
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or "unknown"
        if subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "shipper"], capture_output=True,
                          text=True).stdout.strip():
            commit += " + uncommitted changes in shipper/"
    except OSError:
        commit = "unknown"
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "shipper": shipper_version,
        "commit": commit,
        "rsyslog": version([RSYSLOGD, "-v"]),
        "gzip": version(["gzip", "--version"]),
    }


def aws_machine(log) -> dict:
    """machine() for the benchmarks against moto: moto's and boto3's versions instead of rsyslog's and
    gzip's; says what it is on one line."""
    import boto3
    import moto

    info = machine()
    for tool in ("rsyslog", "gzip"):
        info.pop(tool, None)
    info.update(moto=moto.__version__, boto3=boto3.__version__)
    log(f"{info['nproc']} cores, {info['cpu']}; {info['shipper']} (commit {info['commit']}); "
        f"moto {info['moto']}, boto3 {info['boto3']}")
    return info


HEADER = ("tool", "seconds", "MB/s", "lines/s", "CPU s", "peak RSS MiB")


def rows(results: list[Result]) -> list[tuple[str, ...]]:
    return [(r.name, f"{r.seconds:.2f}", f"{r.mb_per_s:.1f}", f"{r.lines_per_s:,.0f}", f"{r.cpu_seconds:.2f}",
             f"{r.peak_rss_mib:.1f}") for r in results]


def ratios(results: list[Result]) -> dict[str, float]:
    by_name = {r.name: r for r in results}
    out = {}
    if "shipper" in by_name:
        for other in ("rsyslog", "gzip -1", "cat"):
            if other in by_name:
                out[f"shipper/{other}"] = round(by_name["shipper"].mb_per_s / by_name[other].mb_per_s, 3)
        for variant in FILTERS:  # input MB/s with the filter over input MB/s without
            if variant in by_name:
                out[f"{variant}/shipper"] = round(by_name[variant].mb_per_s / by_name["shipper"].mb_per_s, 3)
    return out


def text_table(results: list[Result]) -> str:
    table = [HEADER, *rows(results)]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(results: list[Result], meta: dict, info: dict) -> str:
    out = [
        "# Throughput benchmark",
        "",
        f"{info['date']} on {info['nproc']} cores ({info['cpu']}), {info['memory_gib']} GiB, "
        f"Linux {info['kernel']}, Python {info['python']}; {info['shipper']} (commit {info['commit']}), "
        f"{info['rsyslog']}, {info['gzip']}.",
        "",
        f"Input: {meta['lines']:,} lines, {meta['bytes'] / 1e6:.1f} MB ({meta['bytes'] / meta['lines']:.1f} bytes/line), "
        f"seed {meta['seed']}: JSON app logs, access logs, plain app logs, Python tracebacks; "
        f"{meta['exc_json_share']:.1%} of JSON lines carry an exc_info with escaped newlines. Read from the page cache.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|",
        *("| " + " | ".join(row) + " |" for row in rows(results)),
        "",
    ]
    for name, value in ratios(results).items():
        out.append(f"- throughput {name}: {value:.2f}")
    for r in results:
        if "runs" in r.extra:
            out.append(f"- {r.name}: median of {len(r.extra['runs'])} runs, which took "
                       + ", ".join(f"{run['seconds']:.2f}" for run in r.extra["runs"]) + " s")
    out.append("- CPU s used by other processes / stolen by the hypervisor during each measurement "
               "(both should be ~0): " + ", ".join(f"{r.name} {r.extra.get('other_cpu_seconds', 0):.2f} / "
                                                  f"{r.extra.get('steal_cpu_seconds', 0):.2f}" for r in results))
    out.append("- minor page faults: " + ", ".join(f"{r.name} {r.extra['minor_faults']:,}"
                                                   for r in results if "minor_faults" in r.extra))
    by_name = {r.name: r for r in results}
    if "shipper" in by_name:
        extra = by_name["shipper"].extra
        out.append(f"- shipper: {extra['records']:,} records in {extra['objects']} objects, "
                   f"verified: {extra['verified']}; {extra['ndjson_bytes'] / 1e6:.1f} MB NDJSON -> "
                   f"{extra['archive_bytes'] / 1e6:.1f} MB gzip; reader reached end of file at "
                   f"~{extra['reader_done_seconds']} s")
    for variant, (_, what) in FILTERS.items():
        if variant in by_name:
            extra = by_name[variant].extra
            out.append(f"- {variant} ({what}): {extra['records']:,} records (expected {extra['expected_records']:,}), "
                       f"verified: {extra['verified']}; {by_name[variant].mb_per_s / by_name['shipper'].mb_per_s:.2f} "
                       f"of shipper's MB/s" if "shipper" in by_name else "")
    out += [
        "",
        "rsyslog: imfile (inotify) -> omfile with template `%rawmsg%\\n`, defaults otherwise; timed from "
        "process start until the output file has N lines. shipper: file input (parser none) -> directory "
        "output (gzip level 1, upload_interval 2s), sent SIGTERM as soon as it has read the whole file (its "
        "rchar); timed from process start until the checkpoint equals the file size, i.e. its drain fsynced and "
        "linked the last object (without the SIGTERM, the last object waits for its upload_interval, which rounds "
        "every time up to the next 2 s boundary of the objects); shipper+NAME: the same with one [[filters]] entry of that "
        "type (MB/s of the input read, so a filter that drops lines is not credited for writing less). cat and gzip write to /dev/null. CPU is "
        "user+sys of the process; peak RSS is VmHWM (ru_maxrss for cat and gzip).",
        "",
    ]
    return "\n".join(out)


# ---------------------------------------------------------------- main

def measure(tool: str, meta: dict, run_dir: str, args: argparse.Namespace, py_spy: list[str] | None) -> Result:
    if args.quiet_wait > 0:
        wait_quiet(args.quiet_wait, log)
    background = Background()
    if tool == "cat":
        result = bench_cat(meta)
    elif tool == "gzip":
        result = bench_gzip(meta)
    else:
        workdir = tempfile.mkdtemp(prefix=f"{tool}-", dir=run_dir)
        if tool == "rsyslog":
            result = bench_rsyslog(meta, workdir, args.timeout, background)
        else:
            result = bench_shipper(meta, workdir, args.timeout, py_spy, background, tool)
        if not args.keep:
            shutil.rmtree(workdir)
    if "other_cpu_seconds" not in result.extra:
        result.extra["other_cpu_seconds"], result.extra["steal_cpu_seconds"] = background.other(result.cpu_seconds)
    other, steal = result.extra["other_cpu_seconds"], result.extra["steal_cpu_seconds"]
    log(f"  {result.seconds:.2f}s, {result.mb_per_s:.1f} MB/s, {result.cpu_seconds:.2f} CPU s, "
        f"{result.peak_rss_mib:.1f} MiB peak RSS")
    warn_if_disturbed(result.seconds, other, steal, log)
    return result


def directory_figure() -> dict | None:
    """The shipper row of bench/results/throughput.json (file -> directory), for comparison."""
    try:
        with open(os.path.join(RESULTS, "throughput.json")) as handle:
            document = json.load(handle)
    except (OSError, ValueError):
        return None
    row = next((r for r in document["results"] if r["name"] == "shipper"), None)
    if row is None:
        return None
    return {**row, "date": document["machine"]["date"], "commit": document["machine"]["commit"]}



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=2_000_000, help="lines in the generated file")
    parser.add_argument("--only", nargs="+", choices=TOOLS, help="run only these measurements")
    add_common_arguments(parser, timeout=900, what="tool")
    add_py_spy_argument(parser, "shipper")
    args = parser.parse_args(argv)
    tools = args.only or [t for t in TOOLS if t not in OPTIONAL_TOOLS]
    for variant in FILTERS:
        why = filter_available(variant) if variant in tools else None
        if why:
            log(f"skipping {variant}: {why}")
            tools.remove(variant)
    if "rsyslog" in tools and not os.path.exists(RSYSLOGD):  # a comparison, not the agent: skipped, said
        log(f"skipping rsyslog: {RSYSLOGD} is not installed (apt-get install rsyslog to compare with it)")
        tools.remove("rsyslog")
    results_name = args.results or (None if args.only else "throughput")
    py_spy = py_spy_command(args, os.path.join(ROOT, ".venv", "bin"))

    meta = loggen.ensure(INPUT, args.lines, args.seed, args.exc_json_share, log=log)
    info = machine()
    log(f"{info['nproc']} cores, {info['cpu']}; {info['shipper']} (commit {info['commit']}); {info['rsyslog']}")
    log("warm-up: cat (page cache)")
    run_to_devnull("warm-up", ["cat", INPUT], meta["bytes"], meta["lines"])

    results = measure_all(
        list(TOOLS), tools, args.repeat, lambda tool, run_dir: measure(tool, meta, run_dir, args, py_spy),
        lambda r: {"seconds": round(r.seconds, 3), "cpu_seconds": round(r.cpu_seconds, 2),
                   "peak_rss_mib": round(r.peak_rss_mib, 1)},
        WORK, args.keep, log)

    print()
    print(text_table(results))
    for name, value in ratios(results).items():
        print(f"throughput {name}: {value:.2f}")
    if results_name:
        document = {"machine": info, "input": meta, "results": [r.as_dict() for r in results],
                    "ratios": ratios(results)}
        write_results(RESULTS, results_name, document, markdown(results, meta, info), log)
    shippers = [r for r in results if r.name == "shipper" or r.name in FILTERS]
    return 0 if all(r.extra["verified"] for r in shippers) else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
