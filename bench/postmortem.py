"""Post-mortem benchmark: `shipper fetch` of one instance's hour from S3, `shipper report` of a day of metrics.

    .venv/bin/python bench/postmortem.py [--megabytes 200] [--keep]

- fetch    one instance-hour of about --megabytes of raw log (200 MB: 60 objects of one minute,
           NDJSON records of bench/loggen.py's lines, gzip level 1, as the agent writes them)
           uploaded to a real moto_server (tests/aws.py MotoServer) with the archive's key layout,
           next to a second instance's hour that must not be read; then
           `shipper fetch s3://BUCKET --instance i-bench --since H --until H+1h > /dev/null`:
           seconds, raw MB/s, objects listed and fetched, peak RSS of the fetch (ru_maxrss, as before,
           which counts the bench process it was forked from, and its own VmHWM, measured apart), and
           the peak Rss and Pss of its whole process tree (the fetch and its forked workers).
- huge     one small gzip object (about 0.3 MB) holding --huge-megabytes of records (default 100 MiB)
           in a directory archive, fetched whole (`--grep` of its last record): seconds and peak RSS,
           which must not follow the object's size (the fetch streams, with a fixed reorder budget).
- report   a directory archive with 24 h of metrics samples every 10 s (8,640 records: cpu, load,
           memory, disk per mount, network per interface) and a log line every 10 s, then
           `shipper report DIR --instance i-bench --since 24h -o report.html`: seconds, page size.

Results: a table on stdout, bench/results/postmortem.json and .md.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

import orjson

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loggen  # noqa: E402
from measure import TreePeak, format_table, wait_quiet, write_results  # noqa: E402

from shipper.record import format_time as stamp  # noqa: E402  the records' own time format

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPER = [sys.executable, "-m", "shipper"]


def harness():
    spec = importlib.util.spec_from_file_location("moto_harness", os.path.join(ROOT, "tests", "aws.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["moto_harness"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# `shipper ARGS` that tells its own peak RSS at the end. A child's ru_maxrss counts the memory of the
# process it was forked from (its copy, or the parent's own with vfork), which here is larger than
# the fetch; VmHWM is that of the process after exec.
# Its worker processes (fetch decodes objects in forked workers) are told apart: the largest one's
# peak (ru_maxrss of its children, after they ended) is written as "workers: KB".
MEASURED = ("import resource, sys\nfrom shipper.cli import main\ncode = main(sys.argv[1:])\n"
            "sys.stderr.write('\\nworkers: %d\\n' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
            "sys.stderr.write(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n"
            "sys.exit(code)\n")


def run_measured(argv: list[str], env, timeout: float, stdout) -> tuple[subprocess.CompletedProcess, tuple]:
    """`shipper ARGV` under MEASURED, with the peak (Rss, Pss) of its whole process tree (the fetch and
    its forked workers) sampled while it runs: the Pss sum counts the workers' shared pages once."""
    proc = subprocess.Popen([sys.executable, "-c", MEASURED, *argv], stdout=stdout, stderr=subprocess.PIPE, env=env)
    peak = TreePeak(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        tree = peak.stop()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), tree


def own_peak_mib(stderr: bytes) -> float:
    """The VmHWM line MEASURED writes last, in MiB."""
    return round(int(stderr.rsplit(b"VmHWM:", 1)[1].split()[0]) / 1024, 1)


def workers_peak_mib(stderr: bytes) -> float:
    """The largest worker's peak RSS MEASURED writes, in MiB (0: no worker)."""
    return round(int(stderr.rsplit(b"workers:", 1)[1].split()[0]) / 1024, 1)


def key_for(instance: str, tag: str, start: float, seq: int) -> str:
    moment = time.gmtime(start)
    return (f"dt={time.strftime('%Y-%m-%d', moment)}/hour={time.strftime('%H', moment)}/instance={instance}/"
            f"{tag}/{time.strftime('%Y%m%dT%H%M%SZ', moment)}-{seq:06d}.ndjson.gz")


def hour_objects(instance: str, hour: float, megabytes: float, bodies: list[bytes]):
    """60 objects (one a minute) of NDJSON records, about ``megabytes`` of raw message bytes in all."""
    per_minute = int(megabytes * 1e6 / 60 / (sum(map(len, bodies)) / len(bodies)))
    line = 0
    for minute in range(60):
        start = hour + minute * 60
        head = {"tag": "app", "host": "ip-10-0-0-1", "instance_id": instance, "image_id": "ami-bench",
                "source": "/var/log/app/app.log"}
        lines = []
        raw = 0
        for n in range(per_minute):
            body = bodies[line % len(bodies)].decode("utf-8", "replace").rstrip("\n")
            line += 1
            raw += len(body) + 1
            lines.append(orjson.dumps({"time": stamp(start + n * 60 / per_minute), **head, "message": body}))
        yield key_for(instance, "app", start, minute + 1), gzip.compress(b"\n".join(lines) + b"\n", 1), raw


def bench_fetch(args, work: str, log) -> dict:
    module = harness()
    moto = module.MotoServer(os.path.join(work, "moto_server.log"))
    try:
        s3 = moto.client("s3")
        s3.create_bucket(Bucket="bench")
        hour = (int(time.time() // 3600) - 2) * 3600
        source = os.path.join(ROOT, "bench", "work", "postmortem-lines.log")
        loggen.ensure(source, 20_000, args.seed, 0.005, log)
        with open(source, "rb") as handle:
            bodies = handle.read().splitlines(keepends=True)
        raw_total = stored = objects = 0
        for instance, megabytes in (("i-bench", args.megabytes), ("i-other", args.megabytes / 10)):
            for key, data, raw in hour_objects(instance, hour, megabytes, bodies):
                s3.put_object(Bucket="bench", Key=key, Body=data)
                if instance == "i-bench":
                    raw_total, stored, objects = raw_total + raw, stored + len(data), objects + 1
        log(f"  uploaded {objects} objects: {raw_total / 1e6:.0f} MB raw, {stored / 1e6:.0f} MB gzip")
        wait_quiet(args.quiet_wait, log)
        env = {**os.environ, **module.CREDENTIALS, "AWS_DEFAULT_REGION": module.REGION}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        with open(os.devnull, "wb") as sink:
            result = subprocess.run([*SHIPPER, "fetch", "s3://bench", "--instance", "i-bench", "--since", stamp(hour),
                                     "--until", stamp(hour + 3599.999), "--endpoint-url", moto.url],
                                    stdout=sink, stderr=subprocess.PIPE, env=env, timeout=args.timeout)
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if result.returncode != 0:
            raise RuntimeError(f"fetch failed: {result.stderr.decode()[-2000:]}")
        measured, tree = run_measured(["fetch", "s3://bench", "--instance", "i-bench", "--since", stamp(hour),
                                       "--until", stamp(hour + 3599.999), "--endpoint-url", moto.url],
                                      env, args.timeout, subprocess.DEVNULL)
        check = subprocess.run([*SHIPPER, "fetch", "s3://bench", "--instance", "i-bench", "--since", stamp(hour),
                                "--until", stamp(hour + 3599.999), "--endpoint-url", moto.url],
                               capture_output=True, env=env, timeout=args.timeout)
        lines = check.stdout.count(b"\n")
        return {"name": "fetch", "seconds": round(seconds, 2), "raw_mb": round(raw_total / 1e6, 1),
                "gzip_mb": round(stored / 1e6, 1), "objects": objects, "lines": lines,
                "mb_per_s": round(raw_total / 1e6 / seconds, 1),
                "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2),
                "peak_rss_mib": round(after.ru_maxrss / 1024, 1), "own_peak_mib": own_peak_mib(measured.stderr),
                "workers_peak_mib": workers_peak_mib(measured.stderr), "tree_rss_mib": tree[0],
                "tree_pss_mib": tree[1]}
    finally:
        moto.stop()


def bench_huge_object(args, work: str, log) -> dict:
    archive = os.path.join(work, "huge")
    start = (int(time.time() // 3600) - 1) * 3600.0
    path = os.path.join(archive, key_for("i-huge", "app", start, 1))
    os.makedirs(os.path.dirname(path))
    record = orjson.dumps({"time": stamp(start), "tag": "app", "instance_id": "i-huge", "message": "x" * 200}) + b"\n"
    count = int(args.huge_megabytes * 2**20 // len(record))
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    with open(path, "wb") as handle:
        for _ in range(count // 10_000):
            handle.write(packer.compress(record * 10_000))
        handle.write(packer.compress(orjson.dumps({"time": stamp(start + 1), "tag": "app", "message": "the end"})
                                     + b"\n") + packer.flush())
    wait_quiet(args.quiet_wait, log)
    started = time.perf_counter()
    result, tree = run_measured(["fetch", archive, "--grep", "^the end$"], None, args.timeout, subprocess.PIPE)
    seconds = time.perf_counter() - started
    if result.returncode != 0 or result.stdout != b"the end\n":
        raise RuntimeError(f"huge fetch failed: {result.stderr.decode()[-2000:]}")
    return {"name": "huge", "seconds": round(seconds, 2), "records": count + 1,
            "raw_mib": round(count * len(record) / 2**20, 1), "gzip_kb": round(os.path.getsize(path) / 1024, 1),
            "peak_rss_mib": own_peak_mib(result.stderr), "workers_peak_mib": workers_peak_mib(result.stderr),
            "tree_rss_mib": tree[0], "tree_pss_mib": tree[1]}


def bench_report(args, work: str, log) -> dict:
    archive = os.path.join(work, "archive")
    end = (int(time.time() // 600)) * 600
    start = end - 86_400
    samples = 0
    for block in range(144):  # one object per 10 minutes, as with upload_interval = "10m"
        block_start = start + block * 600
        metrics, logs = [], []
        for step in range(60):
            moment = block_start + step * 10
            head = {"time": stamp(moment), "host": "ip-10-0-0-1", "instance_id": "i-bench", "image_id": "ami-bench"}
            wave = (moment % 3600) / 36
            metrics.append(orjson.dumps({**head, "tag": "metrics", "metrics": {
                "cpu.percent": wave, "cpu.iowait_percent": wave / 10, "cpu.steal_percent": 0.0,
                "memory.used_percent": 40 + wave / 5, "swap.used_percent": 0.0, "load.1m": wave / 25,
                "load.5m": wave / 30, "load.15m": wave / 35, "disk.used_percent": {"/": 50.0, "/data": 70 + wave / 10},
                "network.received_bytes_per_second": {"eth0": wave * 1e4},
                "network.sent_bytes_per_second": {"eth0": wave * 2e4},
                "diskio.read_bytes_per_second": {"nvme0n1": wave * 1e3},
                "diskio.write_bytes_per_second": {"nvme0n1": wave * 5e3}}}))
            logs.append(orjson.dumps({**head, "tag": "app", "level": "error" if step == 0 else "info",
                                      "message": f"request {block * 60 + step} done"}))
            samples += 1
        for tag, lines, seq in (("metrics", metrics, 2 * block + 1), ("app", logs, 2 * block + 2)):
            path = os.path.join(archive, key_for("i-bench", tag, block_start, seq))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(gzip.compress(b"\n".join(lines) + b"\n", 1))
    page = os.path.join(work, "report.html")
    wait_quiet(args.quiet_wait, log)
    started = time.perf_counter()
    result = subprocess.run([*SHIPPER, "report", archive, "--instance", "i-bench", "--since", stamp(start),
                             "--until", stamp(end), "-o", page], capture_output=True, timeout=args.timeout)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"report failed: {result.stderr.decode()[-2000:]}")
    return {"name": "report", "seconds": round(seconds, 2), "samples": samples, "log_lines": samples,
            "page_kb": round(os.path.getsize(page) / 1024, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=200.0, help="raw log of the fetched hour (default 200)")
    parser.add_argument("--huge-megabytes", type=float, default=100.0,
                        help="records in the one small object of the huge measurement (default 100 MiB)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--quiet-wait", type=float, default=300)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    os.makedirs(os.path.join(ROOT, "bench", "work"), exist_ok=True)
    work = tempfile.mkdtemp(prefix="postmortem-", dir=os.path.join(ROOT, "bench", "work"))
    log = print
    try:
        log("fetch ...")
        fetch = bench_fetch(args, work, log)
        log(f"  {fetch['lines']:,} lines, {fetch['raw_mb']} MB raw in {fetch['seconds']} s = {fetch['mb_per_s']} MB/s "
            f"(CPU {fetch['cpu_s']} s, peak RSS {fetch['peak_rss_mib']} MiB, its own {fetch['own_peak_mib']} MiB, "
            f"tree Pss {fetch['tree_pss_mib']} MiB, Rss {fetch['tree_rss_mib']} MiB)")
        log("huge object ...")
        huge = bench_huge_object(args, work, log)
        log(f"  {huge['records']:,} records, {huge['raw_mib']} MiB in a {huge['gzip_kb']} KiB object in "
            f"{huge['seconds']} s, peak RSS {huge['peak_rss_mib']} MiB")
        log("report ...")
        report = bench_report(args, work, log)
        log(f"  {report['samples']:,} samples + {report['log_lines']:,} log lines in {report['seconds']} s, "
            f"page {report['page_kb']} KiB")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    table = format_table(
        ("measurement", "input", "seconds", "rate", "notes"),
        [("fetch 1 instance-hour from S3 (moto)", f"{fetch['raw_mb']} MB raw, {fetch['gzip_mb']} MB gzip, "
          f"{fetch['objects']} objects", f"{fetch['seconds']}", f"{fetch['mb_per_s']} MB/s",
          f"{fetch['lines']:,} lines; CPU {fetch['cpu_s']} s; peak RSS {fetch['peak_rss_mib']} MiB "
          f"(its own {fetch['own_peak_mib']} MiB, a worker {fetch['workers_peak_mib']} MiB; the whole tree "
          f"{fetch['tree_pss_mib']} MiB Pss, {fetch['tree_rss_mib']} MiB Rss)"),
         ("fetch 1 small object of huge content", f"{huge['raw_mib']} MiB of records in {huge['gzip_kb']} KiB gzip",
          f"{huge['seconds']}", "-", f"peak RSS {huge['peak_rss_mib']} MiB (tree {huge['tree_pss_mib']} MiB Pss)"),
         ("report of 24 h", f"{report['samples']:,} metrics samples (10 s) + as many log lines",
          f"{report['seconds']}", "-", f"page {report['page_kb']} KiB, no script")])
    print()
    print(table)
    write_results(os.path.join(ROOT, "bench", "results"), "postmortem",
                  {"fetch": fetch, "huge": huge, "report": report}, "# Post-mortem benchmark\n\n" + table + "\n", log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
