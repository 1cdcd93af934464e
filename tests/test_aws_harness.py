"""The AWS test harness itself: moto behind the fault proxy records faithfully and fails on demand."""

from __future__ import annotations

import http.client
import os
import time
from urllib.parse import urlsplit

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError

from aws import CREDENTIALS, REGION, s3_complete_multipart, s3_put, target

MiB = 1024 * 1024
BUCKET = "harness-bucket"


def via_proxy(aws, service: str):
    """A client through the proxy that makes a single attempt (Config max_attempts counts retries)."""
    return boto3.client(service, endpoint_url=aws.endpoint, region_name=REGION,
                        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                        config=Config(retries={"total_max_attempts": 1}, read_timeout=10))


def object_body(aws, key: str) -> bytes:
    return aws.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def object_exists(aws, key: str) -> bool:
    return aws.s3.list_objects_v2(Bucket=BUCKET, Prefix=key).get("KeyCount", 0) > 0


@pytest.fixture
def s3(aws):
    aws.s3.create_bucket(Bucket=BUCKET)
    return via_proxy(aws, "s3")


@pytest.fixture
def logs(aws):
    aws.logs.create_log_group(logGroupName="app")
    aws.logs.create_log_stream(logGroupName="app", logStreamName="host-1")
    return via_proxy(aws, "logs")


def put_events(logs, *messages: str):
    now = int(time.time() * 1000)
    return logs.put_log_events(logGroupName="app", logStreamName="host-1",
                               logEvents=[{"timestamp": now, "message": m} for m in messages])


def test_s3_put_and_get_are_recorded_with_their_bodies(aws, s3):
    s3.put_object(Bucket=BUCKET, Key="a/1.ndjson", Body=b'{"n": 1}\n')
    assert s3.get_object(Bucket=BUCKET, Key="a/1.ndjson")["Body"].read() == b'{"n": 1}\n'

    put, get = aws.proxy.requests()
    assert (put.method, put.path, put.service, put.status, put.fault) == ("PUT", f"/{BUCKET}/a/1.ndjson", "s3", 200, None)
    assert put.body == b'{"n": 1}\n'
    assert put.headers["Content-Length"] == put.headers["content-length"] == "9"
    assert (get.method, get.status, get.body) == ("GET", 200, b"")
    assert object_body(aws, "a/1.ndjson") == b'{"n": 1}\n'
    assert len(aws.proxy.requests()) == 2, "checks against moto directly are not recorded"


def test_put_log_events_are_recorded_as_json(aws, logs):
    put_events(logs, "first", "second")

    [call] = aws.proxy.requests(target_contains="PutLogEvents")
    assert (call.target, call.service, call.status) == ("Logs_20140328.PutLogEvents", "logs", 200)
    [body] = aws.proxy.json_bodies("PutLogEvents")
    assert [e["message"] for e in body["logEvents"]] == ["first", "second"]
    stored = aws.logs.get_log_events(logGroupName="app", logStreamName="host-1")["events"]
    assert [e["message"] for e in stored] == ["first", "second"]


@pytest.mark.parametrize("fault, status, code", [
    ("throttle", 400, "ThrottlingException"),
    ("unavailable", 503, "ServiceUnavailableException"),
])
def test_json_error_faults_raise_their_code_once(aws, logs, fault, status, code):
    aws.proxy.inject(fault, when=target("PutLogEvents"))

    with pytest.raises(ClientError) as raised:
        put_events(logs, "lost")
    assert raised.value.response["Error"]["Code"] == code
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    put_events(logs, "kept")

    assert [(r.fault, r.status) for r in aws.proxy.requests()] == [(fault, status), (None, 200)]
    stored = aws.logs.get_log_events(logGroupName="app", logStreamName="host-1")["events"]
    assert [e["message"] for e in stored] == ["kept"]


def test_unlimited_fault_lasts_until_cleared(aws, logs):
    aws.proxy.inject("unavailable", times=None, when=target("PutLogEvents"))
    for attempt in range(3):
        with pytest.raises(ClientError):
            put_events(logs, f"attempt {attempt}")

    aws.proxy.clear_faults()
    put_events(logs, "through")
    assert [b["logEvents"][0]["message"] for b in aws.proxy.json_bodies("PutLogEvents")] == [
        "attempt 0", "attempt 1", "attempt 2", "through"], "faulted calls are recorded too"
    aws.proxy.clear()
    assert aws.proxy.requests() == []


def test_slowdown_is_an_s3_xml_error(aws, s3):
    aws.proxy.inject("slowdown", when=s3_put())

    with pytest.raises(ClientError) as raised:
        s3.put_object(Bucket=BUCKET, Key="slow", Body=b"x")
    assert raised.value.response["Error"]["Code"] == "SlowDown"
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert not object_exists(aws, "slow")


def test_drop_closes_the_connection_before_moto_sees_the_request(aws, s3):
    aws.proxy.inject("drop", when=s3_put())

    with pytest.raises(ConnectionClosedError):
        s3.put_object(Bucket=BUCKET, Key="dropped", Body=b"x")
    [request] = aws.proxy.requests()
    assert (request.fault, request.status, request.body) == ("drop", None, b"x")
    assert not object_exists(aws, "dropped")


def test_drop_after_forward_loses_only_the_response(aws, s3):
    aws.proxy.inject("drop_after_forward", when=s3_put())

    with pytest.raises(ConnectionClosedError):
        s3.put_object(Bucket=BUCKET, Key="processed", Body=b"x")
    assert aws.proxy.requests()[0].status == 200
    assert object_body(aws, "processed") == b"x"


def test_delay_holds_the_request_back(aws, s3):
    aws.proxy.inject("delay:0.3")

    started = time.monotonic()
    s3.put_object(Bucket=BUCKET, Key="late", Body=b"x")
    assert time.monotonic() - started >= 0.3
    assert aws.proxy.requests()[0].fault == "delay:0.3"


def test_unknown_fault_is_refused(aws):
    with pytest.raises(ValueError):
        aws.proxy.inject("explode")


def test_down_refuses_connections_until_up_on_the_same_port(aws, s3):
    s3.put_object(Bucket=BUCKET, Key="before", Body=b"x")  # leaves a pooled keep-alive connection
    endpoint = aws.endpoint

    aws.proxy.set_down(True)
    with pytest.raises(EndpointConnectionError):
        s3.put_object(Bucket=BUCKET, Key="during", Body=b"x")
    with pytest.raises(ConnectionRefusedError):
        http.client.HTTPConnection(urlsplit(endpoint).hostname, urlsplit(endpoint).port, timeout=2).connect()

    aws.proxy.set_down(False)
    assert aws.endpoint == endpoint
    s3.put_object(Bucket=BUCKET, Key="after", Body=b"x")
    assert [object_exists(aws, k) for k in ("before", "during", "after")] == [True, False, True]


def test_chunked_request_bodies_are_forwarded_dechunked(aws, s3):
    endpoint = urlsplit(aws.endpoint)
    connection = http.client.HTTPConnection(endpoint.hostname, endpoint.port, timeout=10)
    connection.request("PUT", f"/{BUCKET}/chunked", body=iter([b"hello ", b"chunked ", b"world"]),
                       headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
    assert connection.getresponse().status == 200
    connection.close()

    assert aws.proxy.requests()[0].body == b"hello chunked world"
    assert object_body(aws, "chunked") == b"hello chunked world"


def test_multipart_upload_passes_large_bodies_intact(aws, s3, tmp_path):
    data = os.urandom(12 * MiB)
    (tmp_path / "big").write_bytes(data)

    s3.upload_file(str(tmp_path / "big"), BUCKET, "big", Config=TransferConfig(
        multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=2))

    assert object_body(aws, "big") == data
    parts = sorted(aws.proxy.requests(), key=lambda r: r.path)
    uploaded = [r for r in parts if s3_put()(r)]
    assert sorted(len(r.body) for r in uploaded) == [2 * MiB, 5 * MiB, 5 * MiB]
    assert len([r for r in parts if s3_complete_multipart()(r)]) == 1
    assert not s3_put()(aws.proxy.requests(method="POST")[0]), "CreateMultipartUpload is no put"


def test_moto_is_reset_between_tests_part_1(aws):
    aws.s3.create_bucket(Bucket="left-behind")


def test_moto_is_reset_between_tests_part_2(aws):
    assert aws.s3.list_buckets()["Buckets"] == []
