"""AWS outputs under test talk to a real moto server through a fault-injecting proxy.

The agent is configured with ``aws.endpoint`` (the proxy). The proxy records every request and can
throttle, fail, drop or delay chosen ones, or refuse connections altogether, so tests can prove
retry and at-least-once behaviour against the real wire protocol. Test assertions read moto
directly (``aws.s3``, ``aws.logs``) so they are neither recorded nor faulted.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest

REGION = "us-east-1"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")

# Headers that belong to one connection, not to the request (RFC 9110 7.6.1). The proxy frames
# bodies itself, so Content-Length is recomputed and Expect: 100-continue is answered, not passed on.
NOT_FORWARDED = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "content-length", "expect",
})

# fault name -> (HTTP status, error code, message), rendered in the protocol of the faulted request.
ERROR_FAULTS = {
    "throttle": (400, "ThrottlingException", "Rate exceeded"),
    "unavailable": (503, "ServiceUnavailableException", "Service is unavailable"),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "invalid_parameter": (400, "InvalidParameterException", "The log event is not valid."),
}
CONNECTION_FAULTS = frozenset({"drop", "drop_after_forward"})
DELAY_FAULT = re.compile(r"delay:(\d+(?:\.\d+)?)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Headers(dict):
    """Request headers with names folded to lower case, so lookups ignore case as HTTP does."""

    def __init__(self, items):
        super().__init__((name.lower(), value) for name, value in items)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())

    def get(self, name: str, default=None):
        return super().get(name.lower(), default)


@dataclass
class Recorded:
    """One request as the proxy received it.

    ``body`` is the payload exactly as sent, minus HTTP chunked framing. An ``aws-chunked``
    content encoding would be kept as is, but botocore only uses it over https, never towards
    this plain-http proxy. ``status`` is None while the request is in flight and for a "drop";
    for "drop_after_forward" it is moto's status, which the client never saw.
    """

    method: str
    path: str
    headers: Headers
    body: bytes = field(repr=False)
    status: int | None = None
    fault: str | None = None

    @property
    def target(self) -> str:
        """The JSON-protocol operation, e.g. "Logs_20140328.PutLogEvents"; "" for S3."""
        return self.headers.get("x-amz-target", "")

    @property
    def service(self) -> str:
        if self.target.startswith("Logs_"):
            return "logs"
        if self.target.startswith("GraniteServiceVersion"):
            return "monitoring"
        return "s3"

    def json(self):
        return json.loads(self.body)


Selector = Callable[[Recorded], bool]


def target(operation: str) -> Selector:
    """Selects JSON-protocol calls of one operation, e.g. ``target("PutLogEvents")``."""
    return lambda request: request.target.rpartition(".")[2] == operation


def s3_put(key_contains: str = "") -> Selector:
    """Selects S3 PutObject and UploadPart, optionally only for keys containing ``key_contains``."""
    def selects(request: Recorded) -> bool:
        url = urlsplit(request.path)
        key = url.path.lstrip("/").partition("/")[2]
        query = parse_qs(url.query, keep_blank_values=True)
        return (request.service == "s3" and request.method == "PUT" and bool(key)
                and key_contains in key and set(query) <= {"partNumber", "uploadId"})
    return selects


def s3_complete_multipart() -> Selector:
    """Selects CompleteMultipartUpload: the call that makes a multipart object exist."""
    return lambda request: (request.service == "s3" and request.method == "POST"
                            and "uploadId" in parse_qs(urlsplit(request.path).query))


@dataclass
class _Rule:
    fault: str
    remaining: int | None
    when: Selector | None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: "FaultProxy"

    def handle_error(self, request, client_address):
        """Clients vanishing is the point of several faults; anything else is still reported."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format, *args):
        pass

    def setup(self):
        super().setup()
        self.server.proxy._track(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.proxy._untrack(self.connection)

    def handle_request(self):
        proxy = self.server.proxy
        request = Recorded(self.command, self.path, Headers(self.headers.items()), self._read_body())
        fault = proxy._admit(request)
        if fault and (delay := DELAY_FAULT.fullmatch(fault)):
            # A delayed request still waiting when the proxy stops is never forwarded: it must not
            # reach moto after the test, into the next test's buckets.
            if proxy._stopped.wait(float(delay.group(1))):
                fault = "drop"
        if fault == "drop":
            self.close_connection = True
            return
        if fault in ERROR_FAULTS:
            status, headers, body = _error_response(request, *ERROR_FAULTS[fault])
            request.status = status
            self._reply(status, headers, body)
            return
        sends_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        status, headers, body = proxy._forward(request, self.headers.items(), sends_body)
        request.status = status
        if fault == "drop_after_forward":
            self.close_connection = True
            return
        self._reply(status, headers, body)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = handle_request

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _read_chunked(self) -> bytes:
        chunks = []
        while size := int(self.rfile.readline(65537).split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
            pass  # trailer fields: consumed, not forwarded
        return b"".join(chunks)

    def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response_only(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _error_response(request: Recorded, status: int, code: str, message: str):
    """An AWS error as botocore's parser for the request's protocol expects it (JSON or S3 XML)."""
    request_id = str(uuid.uuid4())
    if request.target:
        body = json.dumps({"__type": code, "message": message}).encode()
        headers = [("Content-Type", "application/x-amz-json-1.1"), ("x-amzn-ErrorType", code),
                   ("x-amzn-RequestId", request_id)]
    else:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{message}</Message><RequestId>{request_id}</RequestId></Error>").encode()
        headers = [("Content-Type", "application/xml"), ("x-amz-request-id", request_id)]
    return status, [*headers, ("Content-Length", str(len(body)))], body


class FaultProxy:
    """A recording HTTP/1.1 reverse proxy in front of moto that injects faults on demand.

    Faults (see ``inject``): "throttle", "unavailable", "slowdown" answer with that AWS error
    without forwarding; "drop" reads the request and closes the connection unanswered;
    "drop_after_forward" lets moto process the request but loses the response; "delay:<seconds>"
    forwards late. ``set_down(True)`` stops listening so connections are refused.
    """

    def __init__(self, upstream_url: str):
        upstream = urlsplit(upstream_url)
        self._upstream = (upstream.hostname, upstream.port)
        self._lock = threading.Lock()
        self._switch = threading.Lock()  # serialises going down, coming up and stopping
        self._records: list[Recorded] = []
        self._rules: list[_Rule] = []
        self._connections: set[socket.socket] = set()
        self._down = False
        self._stopped = threading.Event()
        self._port = 0
        self._listen()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def inject(self, fault: str, times: int | None = 1, when: Selector | None = None) -> None:
        """Apply ``fault`` to the next ``times`` requests (None: until ``clear_faults``) selected by ``when``.

        Rules are tried in the order they were added; each request gets at most one fault.
        """
        if fault not in ERROR_FAULTS and fault not in CONNECTION_FAULTS and not DELAY_FAULT.fullmatch(fault):
            raise ValueError(f"unknown fault {fault!r}")
        if times is not None and times < 1:
            raise ValueError(f"times must be at least 1 or None, not {times}")
        with self._lock:
            self._rules.append(_Rule(fault, times, when))

    def clear_faults(self) -> None:
        with self._lock:
            self._rules.clear()

    def set_down(self, down: bool) -> None:
        """Down: refuse connections and cut open ones. Up again: listen on the same port."""
        with self._switch:
            with self._lock:
                if down == self._down:
                    return
                self._down = down
            if down:
                self._close()
            else:
                self._listen()

    def requests(self, target_contains: str | None = None, method: str | None = None,
                 path_contains: str | None = None) -> list[Recorded]:
        with self._lock:
            records = list(self._records)
        return [r for r in records
                if (target_contains is None or target_contains in r.target)
                and (method is None or r.method == method)
                and (path_contains is None or path_contains in r.path)]

    def json_bodies(self, target_suffix: str) -> list[dict]:
        """Parsed bodies of every call whose X-Amz-Target ends with ``target_suffix``, faulted or not."""
        return [r.json() for r in self.requests() if r.target.endswith(target_suffix)]

    def clear(self) -> None:
        """Forget recorded requests (fault rules stay)."""
        with self._lock:
            self._records.clear()

    def stop(self) -> None:
        self._stopped.set()
        with self._switch:
            with self._lock:
                self._down = True
            self._close()

    def _listen(self) -> None:
        server = _Server(("127.0.0.1", self._port), _Handler)
        server.proxy = self
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fault-proxy-{self._port}", daemon=True)
        self._thread.start()

    def _close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = None
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            _cut(connection)

    def _track(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.add(connection)
            down = self._down
        if down:
            _cut(connection)

    def _untrack(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)

    def _admit(self, request: Recorded) -> str | None:
        """Record the request and pick the fault of the first matching rule, if any."""
        with self._lock:
            self._records.append(request)
            for rule in self._rules:
                if rule.when is None or rule.when(request):
                    request.fault = rule.fault
                    if rule.remaining is not None:
                        rule.remaining -= 1
                        if rule.remaining <= 0:
                            self._rules.remove(rule)
                    break
        return request.fault

    def _forward(self, request: Recorded, raw_headers: list[tuple[str, str]], sends_body: bool):
        """Send the request to moto as the client sent it (Host included) and read the whole response."""
        connection = http.client.HTTPConnection(*self._upstream, timeout=60)
        try:
            connection.putrequest(request.method, request.path, skip_host=True, skip_accept_encoding=True)
            connection_tokens = {t.strip() for t in request.headers.get("connection", "").lower().split(",")}
            for name, value in raw_headers:
                if name.lower() not in NOT_FORWARDED and name.lower() not in connection_tokens:
                    connection.putheader(name, value)
            if sends_body:
                connection.putheader("Content-Length", str(len(request.body)))
            connection.endheaders(request.body or None)
            response = connection.getresponse()
            body = response.read()
        except OSError as error:
            message = f"fault proxy: moto unreachable: {error}".encode()
            return 502, [("Content-Length", str(len(message)))], message
        finally:
            connection.close()
        headers = [(n, v) for n, v in response.getheaders() if n.lower() not in NOT_FORWARDED]
        if request.method == "HEAD":
            length = response.getheader("Content-Length")
            headers += [("Content-Length", length)] if length is not None else []
        elif response.status not in (204, 304):
            headers.append(("Content-Length", str(len(body))))
        return response.status, headers, body


def _cut(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by its handler


class MotoServer:
    """A real moto server process on a free local port."""

    def __init__(self, log_path: Path, startup_timeout: float = 30.0):
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self._clients: dict[str, object] = {}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_until_serving(startup_timeout)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        """Forget every bucket, log group and metric."""
        status = self._request("POST", "/moto-api/reset")
        if status != 200:
            raise RuntimeError(f"moto reset answered {status}")

    def client(self, service: str):
        """A boto3 client talking to moto directly (created once per service)."""
        if service not in self._clients:
            self._clients[service] = boto3.client(
                service, endpoint_url=self.url, region_name=REGION,
                aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        return self._clients[service]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()

    def _request(self, method: str, path: str) -> int:
        """Plain http.client, so proxy environment variables can never get in the way."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path)
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    def _wait_until_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"moto server exited with {self.process.returncode}:\n{self._log_text()}")
            try:
                if self._request("GET", "/moto-api/") == 200:
                    return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(f"moto server not serving after {timeout}s:\n{self._log_text()}")
            time.sleep(0.05)

    def _log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Aws:
    """What a test gets from the ``aws`` fixture."""

    proxy: FaultProxy
    moto: MotoServer

    @property
    def endpoint(self) -> str:
        """The endpoint to configure the agent with: the fault proxy."""
        return self.proxy.url

    @property
    def moto_url(self) -> str:
        return self.moto.url

    @property
    def env(self) -> dict[str, str]:
        """Variables to merge over os.environ for an agent subprocess.

        Proxy variables are blanked rather than removed because a merge cannot remove them;
        empty values are ignored by botocore's proxy lookup.
        """
        return {**CREDENTIALS, "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
                **dict.fromkeys(PROXY_VARIABLES, ""), "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost"}

    @property
    def s3(self):
        return self.moto.client("s3")

    @property
    def logs(self):
        return self.moto.client("logs")

    def client(self, service: str):
        """Any other service, also talking to moto directly (e.g. "cloudwatch")."""
        return self.moto.client(service)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto_server.log")
    yield server
    server.stop()


@pytest.fixture
def aws(moto_server):
    """An empty moto behind a fresh fault proxy."""
    moto_server.reset()
    proxy = FaultProxy(moto_server.url)
    yield Aws(proxy, moto_server)
    proxy.stop()


def s3_output(endpoint: str, bucket: str, prefix: str = "shipper", upload_interval: str = "300ms",
              extra: str = "") -> str:
    """An [[outputs]] table of the S3 output writing to ``bucket`` on the moto server at ``endpoint``."""
    return f"""
[[outputs]]
type = "s3"
bucket = "{bucket}"
prefix = "{prefix}"
endpoint_url = "{endpoint}"
region = "us-east-1"
upload_interval = "{upload_interval}"
{extra}
"""
