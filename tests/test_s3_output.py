"""The S3 output end to end: the agent subprocess -> fault proxy -> a real moto server."""

from __future__ import annotations

import gzip
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import orjson
from aws import s3_complete_multipart, s3_put
from aws import s3_output as harness_s3_output
from backports.zstd import decompress as zstd_decompress
from conftest import FAST_RETRIES, agent_config, checkpoint_offset, seq_lines, seqs, wait_for

BUCKET = "fleet-logs"
KEY = re.compile(r"^shipper/dt=\d{4}-\d\d-\d\d/hour=\d\d/instance=[^/]+/app/\d{8}T\d{6}Z-\d{6}\.ndjson(\.gz|\.zst)?$")


def s3_output(aws, extra: str = "", upload_interval: str = "300ms") -> str:
    return harness_s3_output(aws.endpoint, BUCKET, upload_interval=upload_interval, extra=extra)


def start(run_agent, workdir: Path, aws, extra: str = "", upload_interval: str = "300ms", **options):
    config = agent_config(workdir / "logs", workdir / "data", output=s3_output(aws, extra, upload_interval),
                          agent_extra=FAST_RETRIES, **options)
    return run_agent(config, env=aws.env)


def bucket_objects(aws) -> dict[str, bytes]:
    listing = aws.s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    return {o["Key"]: aws.s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listing}


def decode(key: str, body: bytes) -> list[dict]:
    if key.endswith(".gz"):
        body = gzip.decompress(body)
    elif key.endswith(".zst"):
        body = zstd_decompress(body)
    return [orjson.loads(line) for line in body.splitlines()]


def bucket_seqs(aws) -> list[int]:
    return sorted(seqs([r for key, body in bucket_objects(aws).items() for r in decode(key, body)]))


def spooled(workdir: Path) -> list[Path]:
    """Finished objects waiting in the spool (not the ones being built, not the .seq file)."""
    root = workdir / "data" / "spool" / "s3.0"
    return [p for p in root.rglob("*") if p.is_file() and ".tmp" not in p.relative_to(root).parts
            and not p.name.startswith(".seq")]


def write(workdir: Path, start: int, count: int, name: str = "app.log") -> None:
    with open(workdir / "logs" / name, "a") as handle:
        handle.write(seq_lines(start, count))


def test_a_burst_arrives_as_hive_partitioned_gzip_objects_and_sigterm_exits_clean(run_agent, workdir, aws):
    aws.s3.create_bucket(Bucket=BUCKET)
    write(workdir, 0, 20_000)
    agent = start(run_agent, workdir, aws)
    wait_for(lambda: bucket_seqs(aws) == list(range(20_000)), interval=0.3, message="20,000 lines in the bucket")
    objects = bucket_objects(aws)
    assert all(KEY.match(key) for key in objects), list(objects)
    head = aws.s3.head_object(Bucket=BUCKET, Key=next(iter(objects)))
    assert head["ContentEncoding"] == "gzip" and head["ContentType"] == "application/x-ndjson"
    record = decode(*next(iter(objects.items())))[0]
    assert record["tag"] == "app" and record["source"].endswith("app.log") and record["host"]
    assert agent.stop() == 0
    assert spooled(workdir) == []
    puts = aws.proxy.requests(method="PUT")
    assert puts and all(r.status == 200 for r in puts)


def test_sigterm_uploads_the_object_still_open(run_agent, workdir, aws):
    """An hour-long upload_interval: only the drain on SIGTERM can ship these lines."""
    aws.s3.create_bucket(Bucket=BUCKET)
    agent = start(run_agent, workdir, aws, upload_interval="1h")
    write(workdir, 0, 500)
    tmp = workdir / "data" / "spool" / "s3.0" / ".tmp"
    wait_for(lambda: tmp.exists() and any(p.stat().st_size for p in tmp.iterdir()), message="an open object")
    assert bucket_objects(aws) == {}
    assert agent.stop() == 0
    assert bucket_seqs(aws) == list(range(500))


def test_outage_fills_the_spool_then_everything_arrives_once(run_agent, workdir, aws):
    aws.s3.create_bucket(Bucket=BUCKET)
    aws.proxy.set_down(True)
    agent = start(run_agent, workdir, aws)
    write(workdir, 0, 3000)
    wait_for(lambda: "retrying with backoff" in agent.log(), message="a failed upload")
    assert spooled(workdir) and bucket_objects(aws) == {}
    aws.proxy.set_down(False)
    wait_for(lambda: bucket_seqs(aws) == list(range(3000)), timeout=30, message="every line after the outage")
    wait_for(lambda: not spooled(workdir), message="an empty spool")
    assert agent.stop() == 0
    assert "uploading again after" in agent.log()


def test_slowdown_and_dropped_connections_are_retried(run_agent, workdir, aws):
    aws.s3.create_bucket(Bucket=BUCKET)
    aws.proxy.inject("slowdown", times=4, when=s3_put())  # more than botocore's own 3 attempts
    aws.proxy.inject("drop", times=3, when=s3_put())
    agent = start(run_agent, workdir, aws)
    write(workdir, 0, 2000)
    wait_for(lambda: bucket_seqs(aws) == list(range(2000)), timeout=30, message="every line despite the faults")
    assert agent.stop() == 0
    faults = [r.fault for r in aws.proxy.requests() if r.fault]
    assert faults.count("slowdown") == 4 and faults.count("drop") == 3


def test_a_lost_response_repeats_the_same_key_instead_of_a_duplicate(run_agent, workdir, aws):
    """S3 stored the object but the answer was lost: the retry replaces it under the same key."""
    aws.s3.create_bucket(Bucket=BUCKET)
    aws.proxy.inject("drop_after_forward", times=3, when=s3_put())
    agent = start(run_agent, workdir, aws)
    write(workdir, 0, 1000)
    wait_for(lambda: bucket_seqs(aws) == list(range(1000)), timeout=30, message="every line once")
    assert agent.stop() == 0
    puts = [r for r in aws.proxy.requests(method="PUT") if s3_put()(r)]
    keys = [r.path for r in puts]
    assert len(keys) > len(set(keys))  # the same key was written twice ...
    assert bucket_seqs(aws) == list(range(1000))  # ... and no line is there twice


def test_kill_9_during_an_upload_then_restart_uploads_the_spool_first(run_agent, workdir, aws):
    aws.s3.create_bucket(Bucket=BUCKET)
    aws.proxy.inject("delay:30", times=None, when=s3_put())
    agent = start(run_agent, workdir, aws)
    write(workdir, 0, 4000)
    wait_for(lambda: aws.proxy.requests(method="PUT"), message="an upload in flight")
    # The object is durable in the spool, so the file's checkpoint moves past its lines.
    size = (workdir / "logs" / "app.log").stat().st_size
    wait_for(lambda: checkpoint_offset(workdir) == size, message="the checkpoint at the end of the file")
    agent.kill()
    assert spooled(workdir), "the object being uploaded must still be in the spool"
    aws.proxy.clear_faults()
    write(workdir, 4000, 1000)
    again = start(run_agent, workdir, aws)
    wait_for(lambda: bucket_seqs(aws) == list(range(5000)), timeout=30, message="every line, once, after kill -9")
    assert "left in the spool by an earlier run are uploaded first" in again.log()
    assert again.stop() == 0


def test_a_large_object_goes_up_by_multipart_upload(run_agent, workdir, aws):
    aws.s3.create_bucket(Bucket=BUCKET)
    write(workdir, 0, 60_000)  # ~12 MB of NDJSON in one object without compression
    agent = start(run_agent, workdir, aws, upload_interval="3s",
                  extra='compression = "none"\nmultipart_threshold = "5MiB"')
    wait_for(lambda: bucket_seqs(aws) == list(range(60_000)), timeout=60, interval=0.5, message="60,000 lines")
    assert agent.stop() == 0
    assert aws.proxy.requests(method="POST", path_contains="uploadId="), "no multipart upload was completed"
    assert [r for r in aws.proxy.requests() if s3_complete_multipart()(r)]


def test_zstd_objects_and_a_storage_class(run_agent, workdir, aws):
    aws.s3.create_bucket(Bucket=BUCKET)
    write(workdir, 0, 300)
    agent = start(run_agent, workdir, aws, extra='compression = "zstd"\nstorage_class = "STANDARD_IA"')
    wait_for(lambda: bucket_seqs(aws) == list(range(300)), message="zstd objects")
    assert agent.stop() == 0
    key = next(iter(bucket_objects(aws)))
    assert key.endswith(".ndjson.zst")
    head = aws.s3.head_object(Bucket=BUCKET, Key=key)
    assert head["ContentEncoding"] == "zstd" and head["StorageClass"] == "STANDARD_IA"


def test_credentials_never_appear_in_the_log(run_agent, workdir, aws):
    secret = "s3cr3t-never-logged-0123456789"
    aws.proxy.set_down(True)
    config = agent_config(workdir / "logs", workdir / "data", output=s3_output(aws))
    config = config.replace('shutdown_timeout = "10s"', 'shutdown_timeout = "1s"')
    agent = run_agent(config, env={**aws.env, "AWS_SECRET_ACCESS_KEY": secret})
    write(workdir, 0, 100)
    wait_for(lambda: "retrying with backoff" in agent.log(), message="a logged failure")
    assert agent.stop(timeout=30) == 1
    assert secret not in agent.log()


def check(workdir: Path, aws, config: str, *args: str) -> subprocess.CompletedProcess:
    path = workdir / "check.toml"
    path.write_text(config)
    return subprocess.run([sys.executable, "-m", "shipper", "check", "-c", str(path), *args],
                          env={**os.environ, **aws.env}, capture_output=True, text=True, timeout=60)


def test_check_probe_says_what_is_wrong_with_the_bucket(workdir, aws):
    config = agent_config(workdir / "logs", workdir / "data", output=s3_output(aws))
    missing = check(workdir, aws, config, "--probe")
    assert missing.returncode == 1
    assert f"bucket '{BUCKET}' does not exist" in missing.stdout
    aws.s3.create_bucket(Bucket=BUCKET)
    assert check(workdir, aws, config).returncode == 0  # offline: no request at all
    ok = check(workdir, aws, config, "--probe")
    assert ok.returncode == 0 and "probe OK: outputs[0]" in ok.stdout
    aws.proxy.set_down(True)
    unreachable = check(workdir, aws, config, "--probe")
    assert unreachable.returncode == 1 and "cannot reach bucket" in unreachable.stdout


def test_check_rejects_bad_s3_settings_offline(workdir, aws):
    config = agent_config(workdir / "logs", workdir / "data", output=s3_output(
        aws, 'kms_key_id = "k"\nkey = "{tag}/{nope}"').replace(BUCKET, "Bad_Bucket")
        .replace('region = "us-east-1"', 'region = "Frankfurt"').replace(aws.endpoint, "localhost:9000"))
    result = check(workdir, aws, config)
    assert result.returncode == 2
    for expected in ("outputs[0].bucket: 'Bad_Bucket' is not a valid bucket name",
                     "outputs[0].key: unknown placeholder {nope}",
                     'outputs[0].kms_key_id: only used with sse = "aws:kms"',
                     "outputs[0].region: 'Frankfurt' is not a region name",
                     "outputs[0].endpoint_url: 'localhost:9000' is not an http:// or https:// URL"):
        assert expected in result.stderr
    assert aws.proxy.requests() == []


def test_boto3_is_not_loaded_without_an_aws_output(workdir):
    script = ("import sys; from shipper.config import load; from shipper.pipeline import Pipeline; "
              "Pipeline(load(None), identity={'host': 'h'}); print('boto3' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], cwd=workdir, capture_output=True, text=True,
                            env={**os.environ, "SHIPPER_DATA_DIR": str(workdir / "data")}, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_sigterm_with_the_bucket_missing_keeps_the_spool_and_exits_1(run_agent, workdir, aws):
    """The agent gives up at shutdown_timeout, keeps the spool for the next start, and says so by its exit code."""
    config = agent_config(workdir / "logs", workdir / "data", output=s3_output(aws))
    agent = run_agent(config.replace('shutdown_timeout = "10s"', 'shutdown_timeout = "2s"'), env=aws.env)
    write(workdir, 0, 200)
    wait_for(lambda: spooled(workdir), message="an object in the spool")
    assert agent.stop(signal.SIGTERM, timeout=15) == 1
    assert spooled(workdir)
    aws.s3.create_bucket(Bucket=BUCKET)
    again = start(run_agent, workdir, aws)
    wait_for(lambda: bucket_seqs(aws) == list(range(200)), message="the spool uploaded on the next start")
    assert again.stop() == 0


def test_a_full_spool_makes_reading_wait_instead_of_dropping(run_agent, workdir, aws):
    aws.s3.create_bucket(Bucket=BUCKET)
    aws.proxy.set_down(True)
    write(workdir, 0, 20_000)  # ~4 MB of NDJSON, four times the spool
    agent = start(run_agent, workdir, aws, extra='compression = "none"\nspool_max_bytes = "1MiB"\n'
                                               'max_object_bytes = "256KiB"', read_bytes="64KiB")
    wait_for(lambda: "spool full" in agent.log() and "uploads fail" in agent.log(), timeout=20,
             message="the spool reported full")
    size = (workdir / "logs" / "app.log").stat().st_size
    # The limit is checked between batches: it is passed by at most an object and a batch.
    assert sum(p.stat().st_size for p in spooled(workdir)) <= 1024**2 + 2 * 256 * 1024
    assert checkpoint_offset(workdir) < size  # the rest waits in the file, not in memory
    aws.proxy.set_down(False)
    wait_for(lambda: bucket_seqs(aws) == list(range(20_000)), timeout=30, interval=0.3, message="every line")
    assert agent.stop() == 0
