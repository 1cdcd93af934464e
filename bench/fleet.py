"""Fleet benchmark: `shipper query` and `shipper compact` over a generated fleet hour.

    .venv/bin/python bench/fleet.py [--instances 50] [--lines 20000] [--keep]

A fleet hour: --instances instances x --lines lines (bench/loggen.py's realistic mix, about 2 % of
them errors) as NDJSON records in the archive's key layout, gzip level 1 as the agent writes them,
4 objects of 15 minutes per instance; once in a directory archive and once on a real moto_server
(tests/aws.py MotoServer). Each measurement is one `shipper` subprocess, timed from its start:

- query errors per instance for the hour (directory; S3, objects downloaded in parallel);
- the same with `--instance` of one instance: partition pruning reads 1/N of the objects;
- `shipper compact --hour` of the directory archive, and the size of Parquet against NDJSON.gz;
- the same errors query on the compacted copy.

Results: a table on stdout, bench/results/fleet.json and .md.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time

import orjson

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loggen  # noqa: E402
from measure import format_table, wait_quiet, write_results  # noqa: E402

from shipper.outputs.keys import DEFAULT_KEY, key_values, render_key  # noqa: E402
from shipper.record import format_time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPER = [sys.executable, "-m", "shipper"]
ERRORS_PER_INSTANCE = ("SELECT instance, count(*) AS errors FROM logs "
                       "WHERE level IN ('error', 'critical', 'fatal') OR regexp_matches(message, '\\b(ERROR|FATAL|CRITICAL)\\b') "
                       "GROUP BY instance ORDER BY errors DESC")
OBJECTS_PER_INSTANCE = 4


def harness():
    spec = importlib.util.spec_from_file_location("moto_harness", os.path.join(ROOT, "tests", "aws.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["moto_harness"] = module
    spec.loader.exec_module(module)
    return module


def generate(root: str, hour: float, instances: int, lines: int, bodies: list[bytes]) -> tuple[int, int, int]:
    """The fleet hour under ``root``; returns (objects, records, gzip bytes)."""
    objects = records = stored = 0
    position = 0
    for number in range(instances):
        instance = f"i-{number:017x}"
        image = "ami-0new" if number % 5 == 0 else "ami-0old"
        per_object = lines // OBJECTS_PER_INSTANCE
        for part in range(OBJECTS_PER_INSTANCE):
            start = hour + part * 900
            encoded = []
            for i in range(per_object):
                message = bodies[position % len(bodies)].decode("utf-8", "replace")
                position += 1
                encoded.append(orjson.dumps({
                    "time": format_time(start + i * 900 / per_object), "tag": "app", "host": f"ip-{number}",
                    "instance_id": instance, "image_id": image, "region": "eu-west-1",
                    "source": "/var/log/app/app.log", "message": message,
                    "labels": {"app": "web", "image_version": image[-3:]}}) + b"\n")
            key = render_key(DEFAULT_KEY, key_values(start, "app", {"instance_id": instance}, part + 1, "gzip"), {})
            path = os.path.join(root, key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            data = gzip.compress(b"".join(encoded), 1)
            with open(path, "wb") as handle:
                handle.write(data)
            objects, records, stored = objects + 1, records + per_object, stored + len(data)
    return objects, records, stored


def timed(args: list[str], env: dict, timeout: float) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run([*SHIPPER, *args], capture_output=True, text=True, env=env, timeout=timeout)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"shipper {' '.join(args[:2])} failed: {result.stderr[-2000:]}")
    return seconds, result


def objects_read(result: subprocess.CompletedProcess) -> int:
    line = [line for line in result.stderr.splitlines() if " objects (" in line][-1]
    return int(line.split("read ")[1].split(" objects")[0].replace(",", ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument("--lines", type=int, default=20_000, help="lines per instance (default 20,000)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--quiet-wait", type=float, default=300)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    os.makedirs(os.path.join(ROOT, "bench", "work"), exist_ok=True)
    work = tempfile.mkdtemp(prefix="fleet-", dir=os.path.join(ROOT, "bench", "work"))
    log = print
    module = harness()
    moto = module.MotoServer(os.path.join(work, "moto_server.log"))
    rows, document = [], {}
    try:
        source = os.path.join(ROOT, "bench", "work", "fleet-lines.log")
        loggen.ensure(source, 50_000, args.seed, 0.005, log)
        with open(source, "rb") as handle:
            bodies = handle.read().splitlines()
        hour = (int(time.time() // 3600) - 3) * 3600
        archive = os.path.join(work, "archive")
        objects, records, stored = generate(archive, hour, args.instances, args.lines, bodies)
        log(f"fleet hour: {args.instances} instances, {records:,} records in {objects} objects, "
            f"{stored / 1e6:.1f} MB gzip NDJSON")
        s3 = moto.client("s3")
        s3.create_bucket(Bucket="fleet")
        for directory, _, names in os.walk(archive):
            for name in names:
                path = os.path.join(directory, name)
                with open(path, "rb") as handle:
                    s3.put_object(Bucket="fleet", Key=f"prod/{os.path.relpath(path, archive)}", Body=handle.read())
        env = {**os.environ, **module.CREDENTIALS, "AWS_DEFAULT_REGION": module.REGION}
        window = ["--since", format_time(hour), "--until", format_time(hour + 3599.999999)]
        one = ["--instance", f"i-{args.instances // 2:017x}"]
        s3_args = ["s3://fleet/prod", "--endpoint-url", moto.url]
        compacted = os.path.join(work, "archive-parquet")
        measurements = [
            ("query errors per instance, directory", [archive]),
            ("  the same, --instance (pruned)", [archive, *one]),
            ("query errors per instance, S3 (moto)", s3_args),
            ("  the same, --instance (pruned)", [*s3_args, *one]),
        ]
        for name, where in measurements:
            wait_quiet(args.quiet_wait, log)
            seconds, result = timed(["query", where[0], ERRORS_PER_INSTANCE, "--format", "csv", *window, *where[1:]],
                                    env, args.timeout)
            groups = result.stdout.count("\n") - 1
            rows.append((name, f"{objects_read(result)} objects", f"{seconds:.2f}", f"{groups} instances"))
            document[name.strip()] = {"seconds": round(seconds, 2), "objects": objects_read(result), "instances": groups}
            log(f"  {name}: {seconds:.2f} s, {objects_read(result)} objects")
        wait_quiet(args.quiet_wait, log)
        seconds, result = timed(["compact", archive, "--hour", format_time(hour), "--to", compacted], env, args.timeout)
        parquet = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(compacted) for n in names)
        ratio = parquet / stored
        rows.append(("compact the hour to Parquet (directory)", f"{objects} objects", f"{seconds:.2f}",
                     f"{parquet / 1e6:.1f} MB = {ratio:.2f} of NDJSON.gz"))
        document["compact"] = {"seconds": round(seconds, 2), "parquet_mb": round(parquet / 1e6, 1),
                               "ndjson_gz_mb": round(stored / 1e6, 1), "ratio": round(ratio, 3)}
        log(f"  compact: {seconds:.2f} s, ratio {ratio:.2f}")
        for name, extra in (("query errors per instance, compacted", []), ("  the same, --instance (pruned)", one)):
            wait_quiet(args.quiet_wait, log)
            seconds, result = timed(["query", compacted, ERRORS_PER_INSTANCE, "--format", "csv", *window, *extra],
                                    env, args.timeout)
            rows.append((name, f"{objects_read(result)} objects", f"{seconds:.2f}",
                         f"{result.stdout.count(chr(10)) - 1} instances"))
            document[name.strip() + (" compacted" if extra else "")] = {"seconds": round(seconds, 2)}
            log(f"  {name}: {seconds:.2f} s")
        document["input"] = {"instances": args.instances, "records": records, "objects": objects,
                             "gzip_mb": round(stored / 1e6, 1)}
    finally:
        moto.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    table = format_table(("measurement", "read", "seconds", "result"), rows)
    print()
    print(table)
    header = (f"# Fleet benchmark\n\n{args.instances} instances x {args.lines:,} lines, one hour, "
              f"{document['input']['gzip_mb']} MB gzip NDJSON in {document['input']['objects']} objects\n\n")
    write_results(os.path.join(ROOT, "bench", "results"), "fleet", document, header + table + "\n", log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
