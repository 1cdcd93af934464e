"""Where a dead server's records are read back from: a directory archive, an S3 archive, CloudWatch Logs.

An archive (directory or S3) lists the objects under partition prefixes and opens one object as a
stream; decoding is shared (:class:`ObjectLines`). CloudWatch Logs gives records directly.
"""

from __future__ import annotations

import errno
import os
import stat
import zlib
from typing import Any, Iterator
from urllib.parse import urlsplit

import orjson

from shipper.nofollow import kind_of, open_below, open_directory_below
from shipper.outputs.log_events import RECORD_MARK
from shipper.postmortem.selection import ObjectRef, parse_key
from shipper.record import format_time


class SourceError(Exception):
    """The source cannot be read at all (no such bucket, no access): the message says which."""


class CorruptObject(Exception):
    """One object cannot be read at all (not a regular file, gone, no access); it is reported and skipped."""


READ_BYTES = 256 * 1024          # compressed bytes read at a time
PIECE_BYTES = 1024 * 1024        # decompressed bytes at a time: a small object of huge content never expands at once
MAX_LINE_BYTES = 8 * 1024 * 1024  # a longer line (no record is: messages are cut at max_line_bytes) is skipped


class ObjectLines:
    """One object's lines, decompressed as a stream (gzip and zstd, any number of members or frames).

    ``chunks()`` yields lists of complete lines (without their newline) of at most about
    PIECE_BYTES; memory does not depend on the object's size. Where the data breaks off (a
    truncated or corrupt object, a failed read), the lines before the break have been handed
    out and ``problem`` says where it broke, as zcat would.
    """

    def __init__(self, key: str, raw):
        self.key = key
        self.raw = raw            # has read(n) and close()
        self.position = 0         # compressed bytes read
        self.lines = 0            # complete lines handed out
        self.long_lines = 0       # lines over MAX_LINE_BYTES, skipped
        self.problem: str | None = None

    def chunks(self) -> Iterator[list[bytes]]:
        try:
            yield from self._split(self._pieces())
        finally:
            self.raw.close()

    def _split(self, pieces: Iterator[bytes]) -> Iterator[list[bytes]]:
        rest = b""
        skipping = False  # inside a line that was too long, up to its newline
        for piece in pieces:
            if skipping:
                newline = piece.find(b"\n")
                if newline < 0:
                    continue
                piece, skipping = piece[newline + 1:], False
            data = rest + piece if rest else piece
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
            else:
                lines = data[:cut].split(b"\n")
                rest = data[cut + 1:]
                self.lines += len(lines)
                yield lines
            if len(rest) > MAX_LINE_BYTES:
                self.long_lines += 1
                rest, skipping = b"", True
        if self.problem is None:
            if rest:  # a last line without its newline
                self.lines += 1
                yield [rest]
            return
        self.problem += f"; the {self.lines:,} lines before the break were read"
        if rest or skipping:
            self.problem += ", the partial line at the break is left out"

    def _pieces(self) -> Iterator[bytes]:
        if self.key.endswith(".gz"):
            return self._decompressed(lambda: zlib.decompressobj(31), "gzip member")
        if self.key.endswith(".zst"):
            return self._decompressed(_zstd_decompressor, "zstd frame")
        return self._reads()

    def _reads(self) -> Iterator[bytes]:
        while True:
            try:
                data = self.raw.read(READ_BYTES)
            except Exception as exc:  # file or network: either way the rest cannot be had
                self.problem = f"cannot read past byte {self.position:,} ({type(exc).__name__}: {exc})"
                return
            if not data:
                return
            self.position += len(data)
            yield data

    def _decompressed(self, make, unit: str) -> Iterator[bytes]:
        """Decompress member after member (frame after frame), PIECE_BYTES of output at a time."""
        reads = self._reads()
        decompressor, data, start = None, b"", 0
        while True:
            if not data and _needs_input(decompressor):
                data = next(reads, None)
                if data is None:
                    break
                start = self.position - len(data)
            if decompressor is None or decompressor.eof:
                if not data:
                    continue
                decompressor = make()  # the next member or frame starts here
            try:
                piece = decompressor.decompress(data or getattr(decompressor, "unconsumed_tail", b""), PIECE_BYTES)
            except Exception as exc:  # zlib.error, ZstdError: no common base class
                self.problem = (f"corrupt data in compressed bytes {start:,}-{self.position:,} "
                                f"({type(exc).__name__}: {exc})")
                return
            data = decompressor.unused_data if decompressor.eof else b""
            if piece:
                yield piece
        if self.problem is not None or decompressor is None or decompressor.eof:
            return
        while not decompressor.eof:  # zlib may hold output back until asked
            piece = decompressor.decompress(getattr(decompressor, "unconsumed_tail", b""), PIECE_BYTES)
            if not piece:
                break
            yield piece
        if not decompressor.eof:
            self.problem = f"truncated: the data ends at byte {self.position:,} inside a {unit}"


def _needs_input(decompressor) -> bool:
    if decompressor is None or decompressor.eof:
        return True
    needs = getattr(decompressor, "needs_input", None)
    if needs is not None:  # zstd
        return needs
    return not decompressor.unconsumed_tail  # zlib


def _zstd_decompressor():
    try:
        from compression.zstd import ZstdDecompressor
    except ImportError:
        from backports.zstd import ZstdDecompressor
    return ZstdDecompressor()


# Directories are opened one component at a time without following links, so nothing outside the
# archive is listed or read; objects must be regular files (a FIFO would hang the read, a link to
# /dev/zero would never end).
_FILE = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC


class DirectoryArchive:
    prefetch = False  # local files are read as the merge reaches them

    def __init__(self, path: str):
        self.root = os.path.abspath(path)
        if not os.path.isdir(self.root):
            raise SourceError(f"{path}: no such directory (a directory archive is the directory output's path)")
        self.name = self.root
        self.problems: list[str] = []  # partitions not listed, said by the caller

    def _open_directory(self, parts: list[str]) -> int:
        return open_directory_below(self.root, parts)

    def list(self, prefix: str) -> Iterator[ObjectRef]:
        for key, size in self.files(prefix, regular_only=False):  # open() says what is wrong with the others
            ref = parse_key(key, size)
            if ref is not None:
                yield ref

    def files(self, prefix: str, regular_only: bool = True) -> Iterator[tuple[str, int]]:
        """(key, size) of the files under ``prefix`` (a partition), links not followed; a FIFO, device or
        socket is left out (and said in ``problems``) unless ``regular_only`` is false."""
        parts = [p for p in prefix.split("/") if p]
        try:
            top = self._open_directory(parts)
        except FileNotFoundError:
            return
        except OSError as exc:  # ELOOP, ENOTDIR: a link or a file where a partition directory should be
            self.problems.append(f"{prefix}: not listed, not a directory of the archive ({os.strerror(exc.errno)}; "
                                 f"links are not followed)")
            return
        try:
            for directory, subdirectories, names, fd in os.fwalk(".", dir_fd=top):
                for name in subdirectories:  # fwalk lists links to directories there, never enters them
                    if name != ".tmp" and stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                        self.problems.append(f"{os.path.normpath(os.path.join(prefix, directory, name))}/: "
                                             f"not listed: a symbolic link, not followed")
                subdirectories[:] = [d for d in subdirectories if d != ".tmp"]  # objects being written
                for name in names:
                    try:
                        info = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    except OSError:  # gone since the listing
                        continue
                    key = os.path.normpath(os.path.join(prefix, directory, name))
                    if stat.S_ISREG(info.st_mode) or not regular_only:
                        yield key, info.st_size
                    elif not stat.S_ISLNK(info.st_mode) or parse_key(key) is not None:
                        self.problems.append(f"{key}: not read: a {kind_of(info.st_mode)}, not a regular file")
        finally:
            os.close(top)

    def path(self, key: str) -> str:
        """Where an object listed by ``files`` is on disk (for an engine that opens files by name)."""
        return os.path.join(self.root, key)

    def open(self, ref: ObjectRef):
        """The object as an unbuffered binary file, or CorruptObject when it is not a regular file."""
        *parts, name = ref.key.split("/")
        try:
            fd = open_below(self.root, [*parts, name], _FILE)
        except OSError as exc:
            why = "a symbolic link on its path, not followed" if exc.errno in (errno.ELOOP, errno.ENOTDIR) \
                else os.strerror(exc.errno)
            raise CorruptObject(f"{ref.key}: not read: {why}") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise CorruptObject(f"{ref.key}: not read: a {kind_of(mode)}, not a regular file")
        return os.fdopen(fd, "rb", buffering=0)


class S3Archive:
    # Small objects are downloaded whole, several at once, ahead of the merge; larger ones are read
    # as a stream when the merge reaches them.
    prefetch = True
    PREFETCH_OBJECT_BYTES = 8 * 1024 * 1024

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
        self.problems: list[str] = []

    def list(self, prefix: str) -> Iterator[ObjectRef]:
        for key, size in self.files(prefix):
            ref = parse_key(key, size)
            if ref is not None:
                yield ref

    def files(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, size) of every object under ``prefix`` (below the archive's own prefix)."""
        from botocore.exceptions import BotoCoreError, ClientError

        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for item in page.get("Contents", []):
                    yield item["Key"], item["Size"]
        except (BotoCoreError, ClientError) as exc:
            from shipper.outputs.aws import describe

            raise SourceError(f"cannot list s3://{self.bucket}/{full}: {describe(exc)}") from None

    def read(self, ref: ObjectRef) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=ref.key)["Body"].read()

    def open(self, ref: ObjectRef):
        return self.client.get_object(Bucket=self.bucket, Key=ref.key)["Body"]


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

    def records(self, stream: str, since: float, until: float, limit: int = 10_000) -> Iterator[dict[str, Any]]:
        """One stream's events in time order, as records, ``limit`` events a page (many streams merged at
        once each hold one page: their pages are smaller)."""
        from botocore.exceptions import BotoCoreError, ClientError

        instance, _, rest = stream.partition("/")
        tag = rest.split("/", 1)[0] if rest else ""
        token = None
        while True:
            kwargs: dict[str, Any] = {"logGroupName": self.group, "logStreamName": stream, "startFromHead": True,
                                      "startTime": int(since * 1000), "endTime": int(until * 1000) + 1,
                                      "limit": limit}
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


_MARKED = "{" + RECORD_MARK


def event_record(event: dict[str, Any], instance: str, tag: str, stream: str) -> dict[str, Any]:
    """A CloudWatch event as a record: the record itself when the agent sent it as one (format json,
    marked with RECORD_MARK), else the raw line with what the stream name tells. A raw line that is
    JSON, even with time and tag, stays a message: it cannot pass for a record (a lifecycle event)."""
    message = event.get("message", "")
    if message.startswith(_MARKED):
        try:
            record = orjson.loads("{" + message[len(_MARKED):])
        except orjson.JSONDecodeError:  # a record over 256 KiB arrives in parts: shown as they are
            record = None
        if isinstance(record, dict):
            return record
    return {"time": format_time(event.get("timestamp", 0) / 1000), "tag": tag, "instance_id": instance,
            "source": stream, "message": message}


def open_source(text: str, endpoint_url: str | None = None, region: str | None = None):
    if text.startswith("s3://"):
        return S3Archive(text, endpoint_url, region)
    if text.startswith("cwl://"):
        return CloudWatchLogsSource(text, endpoint_url, region)
    if "://" in text:
        raise SourceError(f"{text}: a source is s3://BUCKET/PREFIX, cwl://LOG_GROUP or a directory")
    return DirectoryArchive(text)
