"""Who produced a record: the host name and, on EC2, the instance identity from IMDSv2.

IMDSv2 is a session token fetched by PUT, then GETs carrying it. Each call has a short
timeout (1 s by default) and the result is cached for the life of the process. In
``auto`` mode IMDS is asked only when the machine itself says it is EC2 (DMI vendor or
hypervisor uuid), so an agent off EC2 never waits on, or sends to, the metadata address.
"""

from __future__ import annotations

import logging
import socket
import time

log = logging.getLogger(__name__)

TOKEN_TTL_SECONDS = 21600
IDENTITY_PATHS = {
    "instance_id": "meta-data/instance-id",
    "image_id": "meta-data/ami-id",
    "region": "meta-data/placement/region",
    "availability_zone": "meta-data/placement/availability-zone",
    "instance_type": "meta-data/instance-type",
    # Only when the instance allows tags in its metadata (and it is in an Auto Scaling group):
    # a dimension for CloudWatch Metrics, not a record field.
    "autoscaling_group": "meta-data/tags/instance/aws:autoscaling:groupName",
}
EC2_HINT_FILES = (
    ("/sys/devices/virtual/dmi/id/sys_vendor", "Amazon EC2"),
    ("/sys/devices/virtual/dmi/id/board_asset_tag", "i-"),
    ("/sys/hypervisor/uuid", "ec2"),
    ("/sys/devices/virtual/dmi/id/product_uuid", "EC2"),
)


def looks_like_ec2(hint_files=EC2_HINT_FILES) -> bool:
    for path, marker in hint_files:
        try:
            with open(path, encoding="ascii", errors="replace") as handle:
                if handle.read(64).strip().upper().startswith(marker.upper()):
                    return True
        except OSError:
            continue
    return False


class ImdsClient:
    """A small IMDSv2 client; the token is reused until shortly before it expires."""

    def __init__(self, endpoint: str, timeout: float):
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout
        self._token: str | None = None
        self._token_expires = 0.0

    def _request(self, method: str, path: str, headers: dict[str, str]) -> str:
        import urllib.request  # here: ~6 MiB of modules an agent off EC2 and without AWS outputs never needs

        request = urllib.request.Request(f"{self.endpoint}/latest/{path}", method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return response.read().decode("utf-8", "replace").strip()

    def token(self) -> str:
        if self._token is None or time.monotonic() >= self._token_expires:
            self._token = self._request("PUT", "api/token",
                                        {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_SECONDS)})
            self._token_expires = time.monotonic() + TOKEN_TTL_SECONDS - 60
        return self._token

    def get(self, path: str) -> str | None:
        """The value at ``latest/<path>``; None when IMDS says there is none (404)."""
        import urllib.error

        try:
            return self._request("GET", path, {"X-aws-ec2-metadata-token": self.token()})
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            if exc.code == 401:  # token expired or revoked: fetch a new one once
                self._token = None
                return self._request("GET", path, {"X-aws-ec2-metadata-token": self.token()})
            raise


def resolve_identity(metadata: str, endpoint: str, timeout: float) -> dict[str, str]:
    """host always; instance_id, image_id, region, availability_zone, instance_type on EC2."""
    identity = {"host": socket.gethostname()}
    if metadata == "off" or (metadata == "auto" and not looks_like_ec2()):
        return identity
    import urllib.error

    client = ImdsClient(endpoint, timeout)
    try:
        for key, path in IDENTITY_PATHS.items():
            value = client.get(path)
            if value:
                identity[key] = value
    except (OSError, urllib.error.URLError) as exc:
        level = logging.WARNING if metadata == "ec2" else logging.INFO
        log.log(level, "EC2 instance metadata unavailable at %s (%s); records carry the host name only",
                endpoint, getattr(exc, "reason", exc))
        return {"host": identity["host"]}
    return identity
