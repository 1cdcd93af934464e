"""Where a dead server's records are read back from: a directory archive, an S3 archive, CloudWatch Logs.

An archive (directory or S3) lists the objects under partition prefixes and reads one object's
bytes; decoding is shared (:func:`decode_object`). CloudWatch Logs gives records directly.
"""

from __future__ import annotations

import gzip
import os
import zlib
from typing import Any, Iterator
from urllib.parse import urlsplit

import orjson

from shipper.postmortem.selection import ObjectRef, parse_key
from shipper.record import format_time


class SourceError(Exception):
    """The source cannot be read at all (no such bucket, no access): the message says which."""


class CorruptObject(Exception):
    """One object cannot be decoded; it is reported and skipped."""


def decode_object(key: str, data: bytes) -> tuple[list[dict[str, Any]], int]:
    """An object's records (and how many lines were not JSON records), or CorruptObject."""
    try:
        if key.endswith(".gz"):
            data = gzip.decompress(data)
        elif key.endswith(".zst"):
            data = _zstd_decompress(data)
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise CorruptObject(f"{key}: cannot decompress ({type(exc).__name__}: {exc})") from None
    records, bad = [], 0
    for line in data.splitlines():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


def _zstd_decompress(data: bytes) -> bytes:
    try:
        from compression.zstd import decompress
    except ImportError:
        from backports.zstd import decompress
    try:
        return decompress(data)
    except Exception as exc:  # its ZstdError is not a common base class
        raise ValueError(str(exc)) from None


class DirectoryArchive:
    def __init__(self, path: str):
        self.root = os.path.abspath(path)
        if not os.path.isdir(self.root):
            raise SourceError(f"{path}: no such directory (a directory archive is the directory output's path)")
        self.name = self.root

    def list(self, prefix: str) -> Iterator[ObjectRef]:
        top = os.path.join(self.root, prefix)
        for directory, _, names in os.walk(top):
            if ".tmp" in os.path.relpath(directory, self.root).split(os.sep):
                continue
            for name in names:
                path = os.path.join(directory, name)
                ref = parse_key(os.path.relpath(path, self.root), os.path.getsize(path))
                if ref is not None:
                    yield ref

    def read(self, ref: ObjectRef) -> bytes:
        with open(os.path.join(self.root, ref.key), "rb") as handle:
            return handle.read()


class S3Archive:
    def __init__(self, url: str, endpoint_url: str | None = None, region: str | None = None):
        parts = urlsplit(url)
        self.bucket, self.prefix = parts.netloc, parts.path.strip("/")
        if not self.bucket:
            raise SourceError(f"{url}: expected s3://BUCKET[/PREFIX]")
        import boto3
        from botocore.config import Config

        self.client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region,
            config=Config(retries={"mode": "standard", "max_attempts": 5}, max_pool_connections=16,
                          s3={"addressing_style": "path"} if endpoint_url else None))
        self.name = url

    def list(self, prefix: str) -> Iterator[ObjectRef]:
        from botocore.exceptions import BotoCoreError, ClientError

        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for item in page.get("Contents", []):
                    ref = parse_key(item["Key"], item["Size"])
                    if ref is not None:
                        yield ref
        except (BotoCoreError, ClientError) as exc:
            from shipper.outputs.aws import describe

            raise SourceError(f"cannot list s3://{self.bucket}/{full}: {describe(exc)}") from None

    def read(self, ref: ObjectRef) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=ref.key)["Body"].read()


class CloudWatchLogsSource:
    """cwl://LOG_GROUP: the streams of one instance (named "{instance_id}/{tag}/{source}" by default)."""

    def __init__(self, url: str, endpoint_url: str | None = None, region: str | None = None):
        parts = urlsplit(url)
        self.group = (parts.netloc + parts.path).rstrip("/")
        if not self.group:
            raise SourceError(f"{url}: expected cwl://LOG_GROUP")
        import boto3

        self.client = boto3.session.Session().client("logs", endpoint_url=endpoint_url, region_name=region)
        self.name = url

    def streams(self, prefix: str | None) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        names: list[str] = []
        kwargs: dict[str, Any] = {"logGroupName": self.group}
        if prefix:
            kwargs["logStreamNamePrefix"] = prefix
        try:
            for page in self.client.get_paginator("describe_log_streams").paginate(**kwargs):
                names.extend(s["logStreamName"] for s in page.get("logStreams", []))
        except (BotoCoreError, ClientError) as exc:
            from shipper.outputs.aws import describe

            raise SourceError(f"cannot list the streams of log group {self.group}: {describe(exc)}") from None
        return names

    def records(self, stream: str, since: float, until: float) -> Iterator[dict[str, Any]]:
        """One stream's events in time order, as records."""
        from botocore.exceptions import BotoCoreError, ClientError

        instance, _, rest = stream.partition("/")
        tag = rest.split("/", 1)[0] if rest else ""
        token = None
        while True:
            kwargs: dict[str, Any] = {"logGroupName": self.group, "logStreamName": stream, "startFromHead": True,
                                      "startTime": int(since * 1000), "endTime": int(until * 1000) + 1}
            if token:
                kwargs["nextToken"] = token
            try:
                page = self.client.get_log_events(**kwargs)
            except (BotoCoreError, ClientError) as exc:
                from shipper.outputs.aws import describe

                raise SourceError(f"cannot read stream {stream} of {self.group}: {describe(exc)}") from None
            for event in page.get("events", []):
                yield event_record(event, instance, tag, stream)
            # An empty page is not the end: the end is a forward token that does not move.
            following = page.get("nextForwardToken")
            if not following or following == token:
                return
            token = following


def event_record(event: dict[str, Any], instance: str, tag: str, stream: str) -> dict[str, Any]:
    """A CloudWatch event as a record: the record itself when it was sent as JSON (format json),
    else the raw line with what the stream name tells."""
    message = event.get("message", "")
    if message.startswith("{"):
        try:
            record = orjson.loads(message)
        except orjson.JSONDecodeError:
            record = None
        if isinstance(record, dict) and "time" in record and "tag" in record:
            return record
    return {"time": format_time(event["timestamp"] / 1000), "tag": tag, "instance_id": instance,
            "source": stream, "message": message}


def open_source(text: str, endpoint_url: str | None = None, region: str | None = None):
    if text.startswith("s3://"):
        return S3Archive(text, endpoint_url, region)
    if text.startswith("cwl://"):
        return CloudWatchLogsSource(text, endpoint_url, region)
    if "://" in text:
        raise SourceError(f"{text}: a source is s3://BUCKET/PREFIX, cwl://LOG_GROUP or a directory")
    return DirectoryArchive(text)
