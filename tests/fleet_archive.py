"""A fleet's archive for the query, compact and athena tests: objects in the S3 and directory outputs'
key layout (shipper.outputs.keys), gzip NDJSON records as the agent writes them."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import orjson

from shipper.outputs.keys import DEFAULT_KEY, key_values, render_key
from shipper.record import format_time

HOUR = 1_795_957_200.0  # 2026-11-29T13:00:00Z
INSTANCES = ("i-0aaa", "i-0bbb", "i-0ccc")


def record(instance: str, tag: str, epoch: float, n: int) -> dict:
    level = "error" if n % 10 == 0 else "info"
    return {"time": format_time(epoch), "tag": tag, "host": f"ip-{instance[-3:]}", "instance_id": instance,
            "image_id": "ami-0new" if instance == "i-0ccc" else "ami-0old", "source": f"/var/log/{tag}.log",
            "message": f"{level.upper()} n={n} {instance}", "labels": {"app": "web", "image_version": "1"},
            **({"level": level} if n % 2 == 0 else {})}


def object_key(instance: str, tag: str, epoch: float, seq: int) -> str:
    values = key_values(epoch, tag, {"instance_id": instance, "host": "h"}, seq, "gzip")
    return render_key(DEFAULT_KEY, values, {})


def write_fleet(root: Path, hours: int = 2, per_object: int = 20, tags: tuple[str, ...] = ("app", "web"),
                instances: tuple[str, ...] = INSTANCES) -> dict[str, list[dict]]:
    """Two objects per (instance, tag, hour), ``per_object`` records each; returns the records by key."""
    written: dict[str, list[dict]] = {}
    seq = 0
    for hour in range(hours):
        for instance in instances:
            for tag in tags:
                for part in range(2):
                    start = HOUR + hour * 3600 + part * 600
                    seq += 1
                    records = [record(instance, tag, start + i, seq * 1000 + i) for i in range(per_object)]
                    key = object_key(instance, tag, start, seq)
                    path = root / key
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in records), 6))
                    written[key] = records
    return written


def upload(client, bucket: str, prefix: str, root: Path) -> None:
    client.create_bucket(Bucket=bucket)
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(root)}", Body=path.read_bytes())


def shipper(*args: str, env: dict | None = None, timeout: float = 120, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "shipper", *args], capture_output=True, text=True, timeout=timeout,
                          input=stdin, env=None if env is None else {**os.environ, **env})


RANGE = ["--since", "2026-11-29T00:00:00Z", "--until", "2026-11-30T00:00:00Z"]
