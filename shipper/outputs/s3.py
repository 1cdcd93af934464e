"""The S3 output: the archive's objects, built in a disk spool and uploaded from there.

Objects are built exactly as the directory output builds them (ObjectBuilder), but in
``data_dir/spool/<output>/``. A finished object is durable in the spool, so its batches
are confirmed then and the files they came from may move on; it is uploaded by a small
pool of threads (PutObject, or a multipart upload past ``multipart_threshold``, through
boto3's managed transfer) and removed from the spool once S3 took it. Failed uploads wait
with capped exponential backoff; while they fail the spool fills, and once it holds
``spool_max_bytes`` the output stops accepting, so readers wait instead of anything being
dropped. SIGTERM finishes and uploads everything before the deadline; what is left stays
in the spool and goes first on the next start, under the same key.
"""

from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from shipper.config import Option
from shipper.errors import BufferFull, RetryableError
from shipper.outputs import aws
from shipper.outputs.base import Output
from shipper.outputs.directory import COMPRESSIONS, check_compression_level, layout_of
from shipper.outputs.keys import DEFAULT_KEY, check_prefix, check_template
from shipper.outputs.objects import FinishedObject, ObjectBuilder
from shipper.outputs.spool import Spool, SpooledObject

log = logging.getLogger(__name__)

STORAGE_CLASSES = ("STANDARD", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR", "GLACIER",
                   "DEEP_ARCHIVE", "REDUCED_REDUNDANCY")
CANNED_ACLS = ("", "private", "bucket-owner-full-control", "bucket-owner-read", "authenticated-read",
               "public-read", "aws-exec-read")
CONTENT_ENCODINGS = {"gzip": "gzip", "zstd": "zstd", "none": None}

_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP_ADDRESS = re.compile(r"^\d+\.\d+\.\d+\.\d+$")


def check_bucket_name(name: str) -> str | None:
    """S3's bucket naming rules (general purpose buckets), checked offline."""
    if not _BUCKET_NAME.match(name):
        return (f"{name!r} is not a valid bucket name (3-63 characters: lowercase letters, digits, '.' and '-', "
                f"starting and ending with a letter or digit)")
    if ".." in name or _IP_ADDRESS.match(name) or name.startswith("xn--") or name.endswith("-s3alias"):
        return f"{name!r} is not a valid bucket name"
    return None


OPTIONS = {
    "bucket": Option("str", check=check_bucket_name),
    "prefix": Option("str", "", check=check_prefix),
    "key": Option("str", "{prefix}/" + DEFAULT_KEY, check=check_template),
    **aws.AWS_OPTIONS,
    "compression": Option("choice", "gzip", choices=COMPRESSIONS),
    "compression_level": Option("int", 1, minimum=1),
    "upload_interval": Option("duration", 60.0, minimum=0.01),
    "max_object_bytes": Option("size", 64 * 1024**2, minimum=1024),
    "storage_class": Option("choice", "STANDARD", choices=STORAGE_CLASSES),
    "sse": Option("choice", "", choices=("", "AES256", "aws:kms")),
    "kms_key_id": Option("str", ""),
    "acl": Option("choice", "", choices=CANNED_ACLS),
    # Finished objects waiting for upload on disk; past it, reading waits for S3.
    "spool_max_bytes": Option("size", 1024**3, minimum=1024**2),
    "upload_concurrency": Option("int", 4, minimum=1),
    "multipart_threshold": Option("size", 16 * 1024**2, minimum=5 * 1024**2),
}


def validate(settings) -> list[str]:
    problems = check_compression_level(settings)
    if settings.get("kms_key_id") and settings.get("sse") != "aws:kms":
        problems.append(f"{settings.where}.kms_key_id: only used with sse = \"aws:kms\"")
    return problems


def probe(settings, identity: dict[str, str]) -> list[str]:
    """Try the credentials and the bucket (HeadBucket); each problem as a sentence."""
    client = aws.make_client("s3", settings, identity, attempts=1, connections=1)
    try:
        client.head_bucket(Bucket=settings.bucket)
    except Exception as exc:  # every failure is an answer here
        status = aws.http_status(exc)
        if status == 404:
            return [f"{settings.where}: bucket {settings.bucket!r} does not exist"]
        if status == 403:
            return [f"{settings.where}: access to bucket {settings.bucket!r} denied (the credentials need "
                    f"s3:ListBucket to check and s3:PutObject to ship)"]
        return [f"{settings.where}: cannot reach bucket {settings.bucket!r}: {aws.describe(exc)}"]
    return []


class S3Output(Output):
    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.spool = Spool(os.path.join(context.data_dir, "spool", context.name))
        self.builder = ObjectBuilder(context.name, self.spool.root, layout_of(settings, prefix=settings.prefix),
                                     context.envelope, self._spooled, next_seq=self.spool.next_seq,
                                     stats=context.stats)
        self.client = aws.make_client("s3", settings, context.envelope.identity, attempts=3,
                                      connections=settings.upload_concurrency * 2)
        from boto3.s3.transfer import TransferConfig

        self.transfer = TransferConfig(multipart_threshold=settings.multipart_threshold,
                                       multipart_chunksize=max(8 * 1024**2, settings.multipart_threshold // 2),
                                       max_concurrency=2)
        self.extra_args = self._extra_args()
        self.pool = ThreadPoolExecutor(max_workers=settings.upload_concurrency,
                                       thread_name_prefix=f"{context.name}-upload")
        self.waiting: list[SpooledObject] = self.spool.leftovers()
        self.spooled_bytes = sum(o.size for o in self.waiting)
        self.in_flight: dict[Future, SpooledObject] = {}
        self.failing_since: float | None = None
        self.last_error = ""
        if self.waiting:
            log.info("%s: %d objects (%d bytes) left in the spool by an earlier run are uploaded first",
                     context.name, len(self.waiting), self.spooled_bytes)

    def _extra_args(self) -> dict[str, str]:
        settings = self.settings
        extra = {"ContentType": "application/x-ndjson"}
        if CONTENT_ENCODINGS[settings.compression]:
            extra["ContentEncoding"] = CONTENT_ENCODINGS[settings.compression]
        if settings.storage_class != "STANDARD":
            extra["StorageClass"] = settings.storage_class
        if settings.sse:
            extra["ServerSideEncryption"] = settings.sse
        if settings.kms_key_id:
            extra["SSEKMSKeyId"] = settings.kms_key_id
        if settings.acl:
            extra["ACL"] = settings.acl
        return extra

    # ------------------------------------------------------------ building

    def accept(self, batch) -> None:
        self.builder.accept(batch)

    def _spooled(self, obj: FinishedObject) -> None:
        for ack in obj.acks:
            ack.confirm()
        self.waiting.append(SpooledObject(obj.path, obj.key, obj.size, obj.records))
        self.spooled_bytes += obj.size
        self.context.stats.add("objects_spooled", 1, output=self.context.name)

    # ------------------------------------------------------------ uploading

    def deliver(self, now: float, force: bool) -> None:
        self._reap(block=False)
        self.builder.finish_due(force)  # never blocked by a full spool: the bytes are on disk already
        self._start_uploads(force)
        if force:
            self._reap(block=True)
            if self.waiting:
                raise RetryableError(f"{self.context.name}: {len(self.waiting)} objects not uploaded yet: "
                                     f"{self.last_error}")
            return
        if self._spool_full() and self.failing_since is None and self.in_flight:
            self._reap(block=True)  # healthy but behind: wait for an upload, then go on
            self._start_uploads(force)
        if self._spool_full():
            # Accept nothing more until uploads make room: readers wait, the files keep the lines.
            error = BufferFull if self.failing_since is None else RetryableError
            raise error(f"{self.context.name}: spool full ({self.spooled_bytes} bytes in {self.spool.root}"
                        f"{'; uploads fail: ' + self.last_error if self.failing_since else ''}); reading waits")

    def _spool_full(self) -> bool:
        building = sum(o.size for o in self.builder.objects.values())
        return self.spooled_bytes + building >= self.settings.spool_max_bytes

    def _start_uploads(self, force: bool) -> None:
        monotonic = time.monotonic()
        keep = []
        for obj in self.waiting:
            if len(self.in_flight) < self.settings.upload_concurrency and (force or obj.next_try <= monotonic):
                future = self.pool.submit(self._upload, obj)
                future.add_done_callback(self._wake)
                self.in_flight[future] = obj
            else:
                keep.append(obj)
        self.waiting = keep

    def _upload(self, obj: SpooledObject) -> None:
        self.client.upload_file(obj.path, self.settings.bucket, obj.key, ExtraArgs=self.extra_args,
                                Config=self.transfer)

    def _reap(self, block: bool) -> None:
        """Take the results of finished uploads (``block``: wait until none is running)."""
        while self.in_flight:
            if block:
                wait(list(self.in_flight), timeout=5.0, return_when=FIRST_COMPLETED)
            done = [f for f in self.in_flight if f.done()]
            if not done:
                return
            for future in done:
                obj = self.in_flight.pop(future)
                error = future.exception()
                if error is None:
                    self._uploaded(obj)
                elif isinstance(error, FileNotFoundError) and not os.path.exists(obj.path):
                    self._vanished(obj)
                else:
                    self._failed(obj, error)
            if not block:
                return

    def _vanished(self, obj: SpooledObject) -> None:
        """A spooled object is gone before its upload: retrying cannot bring it back."""
        self.spooled_bytes -= obj.size
        name = self.context.name
        if not obj.records:
            # A leftover of an earlier run (records unknown): uploaded and removed by the pipeline
            # this process ran before a reload, most likely.
            log.info("%s: %s is no longer in the spool; not uploading it again", name, obj.key)
            return
        # Built by this pipeline and confirmed when spooled: someone removed the spool (rm -rf of data_dir).
        self.context.stats.add("records_dropped", obj.records, output=name, reason="spool_vanished")
        self.context.stats.add("objects_lost", 1, output=name)
        log.error("%s: spooled object %s vanished before its upload (was %s removed?); its %d records are lost",
                  name, obj.key, self.spool.root, obj.records)

    def _uploaded(self, obj: SpooledObject) -> None:
        self.spool.remove(obj)
        self.spooled_bytes -= obj.size
        stats, name = self.context.stats, self.context.name
        stats.add("objects_uploaded", 1, output=name)
        stats.add("records_out", obj.records, output=name)
        stats.add("bytes_out", obj.size, output=name)
        if self.failing_since is not None:
            log.warning("%s: uploading again after %.1fs of failures", name, time.monotonic() - self.failing_since)
            self.failing_since = None

    def _failed(self, obj: SpooledObject, error: BaseException) -> None:
        obj.attempts += 1
        obj.next_try = time.monotonic() + self.context.backoff.delay(obj.attempts)
        self.waiting.append(obj)
        self.last_error = aws.describe(error)
        self.context.stats.add("retries", 1, output=self.context.name)
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            log.warning("%s: upload of %s to bucket %s failed, retrying with backoff (objects wait in %s): %s",
                        self.context.name, obj.key, self.settings.bucket, self.spool.root, self.last_error)

    def _wake(self, future: Future) -> None:
        self.context.wake()

    def pending(self) -> int:
        return self.builder.pending() + len(self.waiting) + len(self.in_flight)

    def next_due(self) -> float | None:
        return self.builder.next_due()

    def hurry(self) -> None:
        self.builder.finish_due(force=True)
        for obj in self.waiting:  # no backoff wait: the instance will not be there for it
            obj.next_try = 0.0
        self._start_uploads(force=False)

    def buffered_bytes(self) -> int:
        return self.spooled_bytes + sum(o.size for o in list(self.builder.objects.values()))

    def failing(self) -> tuple[float | None, str | None]:
        return (self.failing_since, self.last_error) if self.failing_since is not None else (None, None)

    def close(self) -> None:
        self.builder.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def wait_closed(self, timeout: float) -> None:
        wait(list(self.in_flight), timeout=timeout)


OUTPUT = S3Output
