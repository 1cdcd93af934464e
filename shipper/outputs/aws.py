"""What the AWS outputs share: clients made lazily, and errors told apart and described.

boto3 is imported here, inside functions, and only by outputs that are configured: an
agent without AWS outputs never loads it (it costs ~40 MiB and a second of start-up).
Credentials come from boto3's default chain and never appear in what we log or raise:
only error codes and messages the service returned do.
"""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Any
from urllib.parse import urlsplit

from shipper import __version__
from shipper.config import Option, redact_urls
from shipper.errors import ConfigError
from shipper.memory import trim_heap

# Codes worth retrying: the service is busy or briefly unable. Anything else that is not a
# per-request rejection is a setup problem (permissions, missing bucket) an operator fixes.
THROTTLING_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled", "RequestThrottledException",
    "TooManyRequestsException", "SlowDown", "RequestLimitExceeded", "LimitExceededException",
})
UNAVAILABLE_CODES = frozenset({
    "ServiceUnavailable", "ServiceUnavailableException", "InternalError", "InternalFailure",
    "InternalServerError", "RequestTimeout", "RequestTimeoutException", "OperationAbortedException",
})



def check_region(region: str) -> str | None:
    if region and not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d+", region):
        return f"{region!r} is not a region name like \"eu-west-1\""
    return None


def check_endpoint_url(url: str) -> str | None:
    """Credentials in the URL ("https://user:pw@host") are allowed but never shown: see redact_urls."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return f"{redact_urls(url)!r} is not a valid URL"
    if url and (parts.scheme not in ("http", "https") or not parts.hostname):
        return f"{redact_urls(url)!r} is not an http:// or https:// URL"
    return None


# The options every AWS output has.
AWS_OPTIONS = {
    "region": Option("str", "", check=check_region),
    "endpoint_url": Option("str", "", check=check_endpoint_url),
}


_shared_session = None
_session_lock = threading.Lock()


def _session():
    """One boto3 session for every AWS output: its loader parses endpoints and models once (a session
    per client cost ~15 MiB of resident memory more with three clients). Clients are made one after
    another at start-up; each client is thread-safe afterwards."""
    global _shared_session
    import boto3
    import botocore.session

    with _session_lock:
        if _shared_session is None:
            core = botocore.session.get_session()
            _lighten(core.get_component("data_loader"))
            _shared_session = boto3.session.Session(botocore_session=core)
        return _shared_session


# The services whose endpoint entries are kept from botocore's endpoints.json (see _lighten):
# those of the outputs (CloudWatch is "monitoring") and of the credential providers.
ENDPOINT_SERVICES = frozenset({"s3", "logs", "monitoring", "sts", "portal.sso", "oidc"})


def _lighten(loader) -> None:
    """Make botocore's loader keep less of what it loads; the agent sits in every server's memory.

    - Service models lose their API documentation: about 80 % of a model (S3: 1.27 MB of JSON,
      0.23 MB without), kept by every client for docstrings the agent never shows.
    - endpoints.json (legacy endpoint data for every service, held by the session's resolver:
      6.7 MiB of Python objects) keeps only ENDPOINT_SERVICES. Any other service would resolve
      to its partition's regional default, as botocore does for services it does not list.

    - Every JSON object is parsed into a plain dict (botocore asks for OrderedDict, twice the
      size; dicts keep their order) with its documentation emptied as it is parsed, so the
      documentation never piles up during start-up (-1.6 MiB at the peak).

    Together -10 MiB resident with the three clients (bench/idle.py). The first two wrap the
    loader's cached methods and edit what they return in place, so the cache holds the lean copy.
    """
    from botocore.loaders import JSONFileLoader

    class LeanJSONFileLoader(JSONFileLoader):
        def _load_file(self, full_path, open_method):  # botocore's, with another object hook
            if not os.path.isfile(full_path):
                return None
            with open_method(full_path, "rb") as handle:
                return json.loads(handle.read(), object_pairs_hook=_lean_object)

    loader.file_loader = LeanJSONFileLoader()
    load_service_model = loader.load_service_model
    load_data_with_path = loader.load_data_with_path

    def lean_service_model(service_name, type_name, api_version=None):
        model = load_service_model(service_name, type_name, api_version)
        if type_name == "service-2":
            drop_documentation(model)
            trim_heap()  # the parse's temporaries go back before the next model's come
        return model

    def lean_data_with_path(name):
        data, path = load_data_with_path(name)
        if name == "endpoints":
            keep_endpoint_services(data, ENDPOINT_SERVICES)
            trim_heap()
        return data, path

    loader.load_service_model = lean_service_model
    loader.load_data_with_path = lean_data_with_path


def _lean_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return {key: "" if key in _DOCUMENTATION_KEYS else value for key, value in pairs}


_DOCUMENTATION_KEYS = frozenset({"documentation", "documentationUrl"})


def keep_endpoint_services(endpoints: dict, services: frozenset[str]) -> None:
    """Drop the entries of other services from endpoints.json data, in place (idempotent)."""
    for partition in endpoints.get("partitions", []):
        known = partition.get("services", {})
        for name in [name for name in known if name not in services]:
            del known[name]


def drop_documentation(node: Any) -> None:
    """Empty every "documentation" entry of a service model, in place (idempotent). The keys stay:
    botocore reads some of them (s3transfer's uploads fail with KeyError without them)."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key in ("documentation", "documentationUrl"):
                if key in item:
                    item[key] = ""
            stack.extend(value for value in item.values() if isinstance(value, (dict, list)))
        elif isinstance(item, list):
            stack.extend(value for value in item if isinstance(value, (dict, list)))


def make_client(service: str, settings: Any, identity: dict[str, str], *, attempts: int, connections: int,
                validate: bool = True):
    """A boto3 client for one output. ``attempts``: botocore's own tries per call (1: we retry).
    ``validate``: False skips botocore's walk over every parameter (requests we build are well-formed)."""
    from botocore.config import Config
    from botocore.exceptions import NoRegionError

    options: dict[str, Any] = {
        "region_name": settings.region or identity.get("region") or None,
        "retries": {"mode": "standard", "total_max_attempts": attempts},
        "connect_timeout": 5,
        "read_timeout": 30,
        "max_pool_connections": connections,
        "user_agent_extra": f"shipper/{__version__}",
        "parameter_validation": validate,
    }
    if service == "s3" and settings.endpoint_url:
        options["s3"] = {"addressing_style": "path"}  # S3-compatible stores rarely have bucket DNS names
    try:
        return _session().client(service, endpoint_url=settings.endpoint_url or None, config=Config(**options))
    except NoRegionError:
        raise ConfigError([f"{settings.where}.region: no region configured (set it, or AWS_REGION, "
                           f"or run on EC2 with [cloud] metadata enabled)"]) from None


def error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code") or None
    return None


def http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def describe(exc: BaseException) -> str:
    """A one-line description without anything secret: the service's code and message, or the error type.
    botocore puts the endpoint URL in its connection errors: its credentials are redacted."""
    code = error_code(exc)
    if code:
        message = getattr(exc, "response", {}).get("Error", {}).get("Message") or ""
        return redact_urls(f"{code}: {message}".rstrip(": "))
    name = type(exc).__name__
    if name == "NoCredentialsError":
        return "no AWS credentials found (environment, shared credentials file, or instance profile)"
    return redact_urls(f"{name}: {exc}")


def is_transient(exc: BaseException) -> bool:
    """Throttled, unavailable, 5xx, a timeout or a broken connection: the same request may work later."""
    code = error_code(exc)
    if code is not None:
        status = http_status(exc) or 0
        return code in THROTTLING_CODES or code in UNAVAILABLE_CODES or status >= 500 or status == 429
    return True  # no answer from the service at all (connection, timeout, credentials fetch)
