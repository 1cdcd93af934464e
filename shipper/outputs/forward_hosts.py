"""The hosts of the fluentd output: the ``hosts`` option (strings or tables), checked key by key,
as Host objects, and the smooth weighted rotation of ``balance = "round_robin"``."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from shipper.config import did_you_mean

DEFAULT_PORT = 24224


def parse_host(text: str) -> tuple[str, int]:
    """"host", "host:port", "[v6]" or "[v6]:port" -> (host, port); the port defaults to 24224."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:  # a name, or a bare IPv6 address
        host, port = text, ""
    if not host:
        raise ValueError(f"{text!r} has no host")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{text!r} has an invalid port")
    return host, int(port or DEFAULT_PORT)


def check_hosts(hosts: list) -> str | None:
    """The list's shape and its "host:port" strings; a host given as a table is checked by validate()."""
    if not hosts:
        return "needs at least one \"host:port\""
    for item in hosts:
        if isinstance(item, dict):
            continue
        if not isinstance(item, str):
            # the type only: the item may hold a password
            return f"expected \"host:port\" strings or tables like {{host = \"host:port\"}}, got {type(item).__name__}"
        if error := _address(item):
            return error
    return None


def _shown(value: object) -> str:
    return repr(value)[:80]


def _string(value: object) -> str | None:
    return None if isinstance(value, str) else f"expected a string, got {type(value).__name__}"


def _address(value: object) -> str | None:
    if not isinstance(value, str):
        return f"expected \"host:port\", got {type(value).__name__}"
    try:
        parse_host(value)
    except ValueError as exc:
        return str(exc)
    return None


MAX_WEIGHT = 1000


def _weight(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WEIGHT:
        return f"expected an integer from 1 to {MAX_WEIGHT}, got {_shown(value)}"
    return None


def _boolean(value: object) -> str | None:
    return None if isinstance(value, bool) else f"expected true or false, got {_shown(value)}"


# The keys of a host given as a table in ``hosts`` (a plain string "host:port" is {host = "host:port"}),
# each with its check. Host has a field of each name but "host"; an absent key (None) means the
# output's own setting of that name.
HOST_KEYS = {
    "host": _address,             # required
    "shared_key": _string,        # "" : no handshake with this host
    "username": _string,
    "password": _string,
    "tls_server_name": _string,
    "weight": _weight,            # balance = "round_robin": its share of the chunks
    "standby": _boolean,          # used only while every other host is down
}


def balance_problems(where: str, hosts: list) -> list[str]:
    """A hosts list whose every host is a standby has none to use first."""
    if hosts and all(isinstance(item, dict) and item.get("standby") is True for item in hosts):
        return [f"{where}.hosts: every host is a standby; at least one must not be"]
    return []


def host_problems(where: str, hosts: list) -> list[str]:
    """Every problem of the hosts given as tables, each naming its key: ``outputs[0].hosts[1].weight``."""
    problems = []
    for index, item in enumerate(hosts):
        if not isinstance(item, dict):
            continue
        path = f"{where}.hosts[{index}]"
        problems.extend(f"{path}.{key}: unknown key{did_you_mean(key, HOST_KEYS)}"
                        for key in item if key not in HOST_KEYS)
        if "host" not in item:
            problems.append(f"{path}.host: required")
        problems.extend(f"{path}.{key}: {error}" for key, check in HOST_KEYS.items()
                        if key in item and (error := check(item[key])))
    return problems


def make_hosts(hosts: list) -> list[Host]:
    """The validated ``hosts`` option as Host objects, in order."""
    made = []
    for item in hosts:
        entry = {"host": item} if isinstance(item, str) else dict(item)
        made.append(Host(*parse_host(entry.pop("host")), **entry))
    return made


@dataclass
class Host:
    name: str
    port: int
    failures: int = 0
    next_try: float = 0.0
    last_error: str = ""
    # From a host given as a table (HOST_KEYS); None: the output's setting of the same name.
    shared_key: str | None = field(default=None, repr=False)  # secrets: never in a repr
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_server_name: str | None = None
    weight: int = 1                     # balance = "round_robin": its share of the chunks
    standby: bool = False               # used only while every host that is not a standby is down
    one_per_connection: bool = False    # it closes the connection after a chunk (deny_keepalive)
    early_closes: int = 0               # connections it closed in a row after acknowledging a chunk
    down_since: float | None = None     # monotonic, since its first failure after a delivery

    def __str__(self) -> str:
        return f"{self.name}:{self.port}"


def weighted_rotation(hosts: list) -> list:
    """One cycle of smooth weighted round robin (nginx's): each host ``weight`` times (weights divided
    by their greatest common divisor), spread out: weights 1 and 2 give b, a, b."""
    if not hosts:
        return []
    divisor = functools.reduce(math.gcd, (host.weight for host in hosts))
    weights = [host.weight // divisor for host in hosts]
    total, current, cycle = sum(weights), [0] * len(hosts), []
    for _ in range(total):
        for index, weight in enumerate(weights):
            current[index] += weight
        best = max(range(len(hosts)), key=current.__getitem__)
        current[best] -= total
        cycle.append(hosts[best])
    return cycle
