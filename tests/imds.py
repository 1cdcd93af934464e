"""A local HTTP server playing EC2's instance metadata service (IMDSv2), for tests."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = "test-token-123"
DEFAULT_METADATA = {
    "meta-data/instance-id": "i-0abc1234def567890",
    "meta-data/ami-id": "ami-0def1234abc567890",
    "meta-data/placement/region": "eu-west-1",
    "meta-data/placement/availability-zone": "eu-west-1b",
    "meta-data/instance-type": "t3.micro",
}


class FakeImds:
    def __init__(self, metadata: dict[str, str] | None = None):
        self.metadata = dict(DEFAULT_METADATA if metadata is None else metadata)
        self.requests: list[tuple[str, str, str | None]] = []
        imds = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_PUT(self):
                imds.requests.append(("PUT", self.path, self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")))
                if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    self.send_error(400)
                    return
                self._reply(200, TOKEN)

            def do_GET(self):
                token = self.headers.get("X-aws-ec2-metadata-token")
                imds.requests.append(("GET", self.path, token))
                if token != TOKEN:
                    self.send_error(401)
                    return
                value = imds.metadata.get(self.path.removeprefix("/latest/"))
                if value is None:
                    self.send_error(404)
                    return
                self._reply(200, value)

            def _reply(self, code: int, body: str):
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeImds":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
