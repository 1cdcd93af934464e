"""TOML configuration -> validated settings.

Every problem is collected (not just the first) and names its exact key, e.g.
``outputs[0].path: required``. Each input and output module declares its own
options as a dict of :class:`Option`; this module knows only the mechanics.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable

from shipper.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/shipper/shipper.toml"

INPUT_MODULES = {
    "file": "shipper.inputs.file",
    "metrics": "shipper.inputs.metrics",
    "journald": "shipper.inputs.journald",
    "forward": "shipper.inputs.forward",
    "syslog": "shipper.inputs.syslog",
}
OUTPUT_MODULES = {
    "directory": "shipper.outputs.directory",
    "s3": "shipper.outputs.s3",
    "cloudwatch_logs": "shipper.outputs.cloudwatch_logs",
    "fluentd": "shipper.outputs.fluentd",
    "cloudwatch_metrics": "shipper.outputs.cloudwatch_metrics",
    "stdout": "shipper.outputs.stdout",
}

_REQUIRED = object()


# ---------------------------------------------------------------- value parsers

# One or more number+unit parts, largest first or not: "90s", "1h30m", "1m30.5s"; a bare number is seconds.
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_DURATION_COMPOUND = re.compile(r"^(?:\d+(?:\.\d+)?\s*(?:ms|s|m|h|d)\s*)+$")
_DURATION_NUMBER = re.compile(r"^\d+(?:\.\d+)?$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


# Upper bounds by kind, for options that declare none: far above any sensible setting, far below
# what overflows at run time (waits and sleeps raise OverflowError past ~292 years, reads and
# allocations past 2**63 bytes, C ints past 2**31). An Option's ``maximum`` overrides them.
MAX_DURATION = 366 * 86400.0   # a year
MAX_SIZE = 1024**4             # 1 TiB
MAX_INT = 2**31 - 1


def parse_duration(value: Any, maximum: float = MAX_DURATION) -> float:
    """'500ms', '10s', '5m', '1h', '1d', compounds like '1h30m', or a number of seconds -> seconds,
    at most ``maximum``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like \"10s\", got a boolean")
    if isinstance(value, float):
        seconds = value
    elif isinstance(value, int):
        seconds = float(value) if abs(value) < 1e300 else math.inf  # a huge int must not raise OverflowError
    elif isinstance(value, str):
        seconds = _duration_text(value)
    else:
        raise ValueError(f"expected a duration like \"500ms\", \"10s\", \"1h30m\", got {type(value).__name__}")
    if math.isnan(seconds):
        raise ValueError("expected a duration like \"10s\", got nan")
    if seconds < 0:
        raise ValueError(f"{_shown(value)}: must be positive (a duration cannot be negative)")
    if seconds > maximum:
        raise ValueError(f"{_shown(value)} is longer than the limit of {format_duration(maximum)}")
    return seconds


def _duration_text(value: str) -> float:
    text = value.strip()
    if text.startswith("-") and text[1:].strip() and (_DURATION_COMPOUND.match(text[1:].strip())
                                                      or _DURATION_NUMBER.match(text[1:].strip())):
        return -1.0  # told apart from a typo: "-5s" says "must be positive"
    if _DURATION_NUMBER.match(text):
        return float(text)
    if _DURATION_COMPOUND.match(text):
        return sum(float(number) * _DURATION_UNITS[unit] for number, unit in _DURATION_PART.findall(text))
    raise ValueError(f"expected a duration like \"500ms\", \"10s\", \"5m\", \"1h30m\", got {_shown(value)}")


def parse_size(value: Any, maximum: int = MAX_SIZE) -> int:
    """'64MiB', '256KiB', '10MB', '512B' or a number of bytes -> bytes, at most ``maximum``."""
    if isinstance(value, bool):
        raise ValueError("expected a size like \"64MiB\", got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        size: float = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        size = float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "B").lower()]  # inf for 400 digits: checked
    else:
        raise ValueError(f"expected a size like \"64MiB\", \"256KiB\", \"10MB\", got {value!r}")
    if size > maximum:
        raise ValueError(f"{_shown(value)} is more than the limit of {format_size(maximum)}")
    return int(size)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def format_duration(seconds: float) -> str:
    """3600 -> "1h", 90 -> "90s", 0.5 -> "500ms": the largest unit that shows it exactly."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def format_size(size: int) -> str:
    """1024**3 -> "1GiB": the largest binary unit that shows it exactly."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


# userinfo ("user:password@") after a scheme, up to the last "@" before the path: what urlsplit calls the
# user and password. Applied to text that is shown (log lines, /status, check), never per record.
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s\"'<>]*@")


def redact_urls(text: str) -> str:
    """Every URL's credentials in ``text`` replaced: "https://user:pw@host/x" -> "https://***@host/x"."""
    return _URL_USERINFO.sub(r"\1***@", text) if "@" in text else text


_ENV_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(text: str, environ: dict[str, str]) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}`` (default also when VAR is empty); ``$${`` is a literal ``${``."""

    def replace(match: re.Match) -> str:
        if match.group(0) == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        value = environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise ValueError(f"environment variable {name} is not set (use ${{{name}:-default}} for a default)")
            return default
        return value

    return _ENV_REF.sub(replace, text)


# ---------------------------------------------------------------- schema

@dataclass(frozen=True)
class Option:
    """One key of a section: its kind, default, and optional extra check.

    kind: str, int, float, bool, duration, size, strlist, strmap, choice, table, list (an array of
    anything, a lone value a list of one: ``check`` or the module's ``validate`` checks the items).
    ``check`` receives the converted value and returns an error text or None.
    ``maximum``: the largest value; None means the kind's bound (MAX_DURATION, MAX_SIZE, MAX_INT).
    """

    kind: str
    default: Any = _REQUIRED
    choices: tuple = ()
    check: Callable[[Any], str | None] | None = None
    minimum: float | None = None
    maximum: float | None = None

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


def regex_check(value: Any) -> str | None:
    try:
        re.compile(value)
    except re.error as exc:
        return f"invalid regular expression: {exc}"
    return None


class Settings:
    """A validated section: attribute access, plus ``where`` for messages ("inputs[0]")."""

    def __init__(self, where: str, values: dict[str, Any]):
        self.where = where
        self._values = values

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"{self.where} has no option {name!r}") from None

    def get(self, name: str, default: Any = None) -> Any:
        return self._values.get(name, default)

    def as_dict(self) -> dict[str, Any]:
        return {k: (v.as_dict() if isinstance(v, Settings) else v) for k, v in self._values.items()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Settings) and self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return f"Settings({self.where}, {self._values!r})"


def _convert(option: Option, value: Any) -> Any:
    kind = option.kind
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {type(value).__name__}")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {type(value).__name__}")
        maximum = MAX_INT if option.maximum is None else int(option.maximum)
        if value > maximum:
            raise ValueError(f"must be at most {maximum}")
        if value < -MAX_INT - 1:
            raise ValueError(f"must be at least {-MAX_INT - 1}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {type(value).__name__}")
        if isinstance(value, int) and abs(value) >= 1e300 or isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value!r}")
        value = float(value)
        if option.maximum is not None and value > option.maximum:
            raise ValueError(f"must be at most {option.maximum:g}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {type(value).__name__}")
    elif kind == "duration":
        value = parse_duration(value, MAX_DURATION if option.maximum is None else option.maximum)
    elif kind == "size":
        value = parse_size(value, MAX_SIZE if option.maximum is None else int(option.maximum))
    elif kind == "strlist":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("expected a list of strings")
    elif kind == "strmap":
        if not isinstance(value, dict) or not all(isinstance(v, (str, int, float, bool)) for v in value.values()):
            raise ValueError("expected a table of strings")
        value = {str(k): str(v) if not isinstance(v, str) else v for k, v in value.items()}
    elif kind == "choice":
        if value not in option.choices:
            raise ValueError(f"expected one of {', '.join(map(repr, option.choices))}, got {value!r}")
    elif kind == "table":
        if not isinstance(value, dict):
            raise ValueError(f"expected a table, got {type(value).__name__}")
    elif kind == "list":
        if not isinstance(value, list):
            value = [value]
    else:  # pragma: no cover - a schema bug, not a user error
        raise AssertionError(f"unknown option kind {kind}")
    if option.minimum is not None and value < option.minimum:
        raise ValueError(f"must be at least {option.minimum:g}")
    return value


def validate_section(where: str, raw: Any, schema: dict[str, Option], problems: list[str]) -> Settings:
    """Check one table against its schema; append every problem to ``problems``."""
    values: dict[str, Any] = {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a table, got {type(raw).__name__}")
        raw = {}
    for key in raw:
        if key not in schema:
            problems.append(f"{_join(where, key)}: unknown key{did_you_mean(key, schema)}")
    for key, option in schema.items():
        path = _join(where, key)
        if key not in raw:
            if option.required:
                problems.append(f"{path}: required")
            else:
                values[key] = option.default
            continue
        try:
            value = _convert(option, raw[key])
            error = option.check(value) if option.check else None
        except ValueError as exc:
            problems.append(f"{path}: {exc}")
            continue
        if error:
            problems.append(f"{path}: {error}")
            continue
        values[key] = value
    return Settings(where, values)


def did_you_mean(name: Any, known: Any) -> str:
    """"; did you mean flush_interval?" for a misspelt name, else the list of known names."""
    import difflib

    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.75)
    if close:
        return f"; did you mean {close[0]}?"
    return f" (known: {', '.join(sorted(known))})"


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


# ---------------------------------------------------------------- the sections

HOUR, DAY = 3600.0, 86400.0

AGENT_OPTIONS = {
    "data_dir": Option("str", "/var/lib/shipper"),
    "flush_interval": Option("duration", 1.0, minimum=0.01, maximum=HOUR),
    # The whole stop (and a reload's drain) keeps to it; under the unit's TimeoutStopSec (45 s).
    # The stop guard exits 3 s past it; the packaged unit's TimeoutStopSec is 45 s.
    "shutdown_timeout": Option("duration", 20.0, maximum=40.0),
    "checkpoint_interval": Option("duration", 1.0, minimum=0.01, maximum=HOUR),
    # Failed deliveries wait a random time up to initial * 2^(attempt-1), at most maximum.
    "retry_initial_delay": Option("duration", 0.5, minimum=0.001, maximum=HOUR),
    "retry_max_delay": Option("duration", 30.0, minimum=0.001, maximum=DAY),
    "log_level": Option("choice", "info", choices=("debug", "info", "warning", "error")),
    "labels": Option("strmap", {}),
}

CLOUD_OPTIONS = {
    "metadata": Option("choice", "auto", choices=("auto", "ec2", "off")),
    "imds_endpoint": Option("str", "http://169.254.169.254"),
    "imds_timeout": Option("duration", 1.0, maximum=60.0),  # start-up waits for it
    # On EC2: how often IMDS is asked for Spot and Auto Scaling termination notices (0: never).
    "termination_check_interval": Option("duration", 5.0, maximum=HOUR),
}

SERVER_OPTIONS = {
    "listen": Option("str", "127.0.0.1:2020", check=lambda v: _check_listen(v)),
    # /status and /metrics show identity, labels, paths and errors: only loopback unless this is set.
    "allow_remote": Option("bool", False),
    # An output that has had something to send and delivered nothing for this long is unhealthy.
    "unhealthy_after": Option("duration", 300.0, minimum=1.0, maximum=30 * DAY),
}


def _check_listen(value: str) -> str | None:
    from shipper.server import check_listen

    return check_listen(value)


def _server_problems(server: Settings) -> list[str]:
    """What one key alone cannot tell: a listen address other machines reach, without allow_remote."""
    from shipper.server import remote_listen_problem

    listen = server.get("listen")
    if listen is None or server.get("allow_remote") is None:  # already reported as invalid
        return []
    problem = remote_listen_problem(listen, server.allow_remote)
    return [f"{server.where}.listen: {problem}"] if problem else []

COMMON_INPUT_OPTIONS = {
    "type": Option("str"),
    "tag": Option("str", None),
}

COMMON_FILTER_OPTIONS = {
    "type": Option("str"),
    "match": Option("strlist", ["*"]),  # tag patterns, as outputs'
}

COMMON_OUTPUT_OPTIONS = {
    "type": Option("str"),
    "match": Option("strlist", ["*"]),
    # Records waiting in memory for this output; readers wait when it is full.
    "buffer_max_bytes": Option("size", 16 * 1024**2, minimum=1024, maximum=16 * 1024**3),  # memory
}


@dataclass
class Config:
    agent: Settings
    cloud: Settings
    server: Settings
    inputs: list[Settings] = field(default_factory=list)
    outputs: list[Settings] = field(default_factory=list)
    source: str = "<embedded default>"  # EMBEDDED_DEFAULT, or the path read
    filters: list[Settings] = field(default_factory=list)  # [[filters]], in file order

    def filter_chain(self, tag: str) -> list[Settings]:
        """The [[filters]] entries the records of ``tag`` go through, in order (as long as no filter
        sets another tag: later filters then match the new one)."""
        return [f for f in self.filters if tag_matches(tag, f.match)]

    def describe(self) -> str:
        """The resolved pipeline, as `shipper check` prints it."""
        lines = [f"config: {self.source}", f"data_dir: {self.agent.data_dir}"]
        for settings in self.inputs:
            lines.append(f"{settings.where}: {settings.type} tag={settings.tag} {source_of(settings)}".rstrip())
        for settings in self.filters:
            lines.append(f"{settings.where}: {settings.type} match={','.join(settings.match)} "
                         f"{filter_summary(settings)}".rstrip())
        for settings in self.outputs:
            target = target_of(settings)
            lines.append(f"{settings.where}: {settings.type} match={','.join(settings.match)} {target}".rstrip())
        for settings in self.inputs:
            routed = [o.where for o in self.outputs if tag_matches(settings.tag, o.match)]
            chain = " -> ".join(filter_name(f) for f in self.filter_chain(settings.tag))
            lines.append(f"route: {settings.tag} -> {chain + ' -> ' if chain else ''}"
                         f"{', '.join(routed) or 'nothing (no output matches)'}")
            for step in self.filter_chain(settings.tag):  # content-based routing: where the new tag goes
                new_tag = step.get("tag") if step.type == "modify" else None
                if new_tag and "{" not in new_tag:
                    routed = [o.where for o in self.outputs if tag_matches(new_tag, o.match)]
                    lines.append(f"route: {new_tag} (tag set by {filter_name(step)}) -> "
                                 f"{', '.join(routed) or 'nothing (no output matches)'}")
        return "\n".join(lines)

    def warnings(self) -> list[str]:
        """What is valid but surely not meant: an input whose records no output takes (read, counted as
        records_unrouted, never shipped). Easy to hit, as ``tag`` defaults to the input's type."""
        found = []
        for settings in self.inputs:
            if not any(tag_matches(settings.tag, o.match) for o in self.outputs):
                patterns = sorted({p for o in self.outputs for p in o.match})
                found.append(f"{settings.where}: its records (tag {settings.tag!r}) reach no output: no "
                             f"output's match ({', '.join(patterns)}) takes that tag; set the input's tag "
                             f"or add it to an output's match")
        tags = {settings.tag for settings in self.inputs}
        made = {f.tag for f in self.filters if f.type == "modify" and f.get("tag")}  # set by a modify
        for settings in self.filters:
            if any(tag_matches(tag, settings.match) for tag in tags | made) or any("{" in tag for tag in made):
                continue
            found.append(f"{settings.where}: its match ({', '.join(settings.match)}) takes no input's tag "
                         f"({', '.join(sorted(tags))}): this filter never applies")
        # A redact after a modify that retags: the retagged records skip it unless its match takes
        # the new tag too (filters match the tag a record has when it reaches them).
        for index, retag in enumerate(self.filters):
            new_tag = retag.get("tag") if retag.type == "modify" else None
            if not new_tag:
                continue
            for redact in self.filters[index + 1:]:
                if redact.type != "redact":
                    continue
                before = [tag for tag in tags if tag_matches(tag, retag.match) and tag_matches(tag, redact.match)]
                if before and ("{" in new_tag or not tag_matches(new_tag, redact.match)):
                    found.append(f"{redact.where}: records that {retag.where} retags to {new_tag!r} skip this "
                                 f"redact (its match {', '.join(redact.match)} does not take the new tag); put "
                                 f"the redact first or add the tag to its match")
        return found


def source_of(settings: Settings) -> str:
    """What an input reads, for people: globs, or a sampling interval."""
    if settings.get("paths"):
        return ", ".join(os.path.abspath(p) for p in settings.paths)
    if settings.get("interval"):
        return f"every {settings.interval:g}s: {', '.join(settings.get('groups', []))}"
    if settings.type in ("forward", "syslog"):
        places = [f"{key} {settings.get(key)}" for key in ("listen", "tcp", "udp", "socket") if settings.get(key)]
        return ", ".join(places)
    if settings.type == "journald":
        where = f"the journal in {settings.directory}" if settings.directory else "the system journal"
        return f"{where}" + (f", units {', '.join(settings.units)}" if settings.units else "")
    return ""


def target_of(settings: Settings) -> str:
    """Where an output writes, for people: a path, a bucket, a log group."""
    if settings.get("path"):
        return os.path.abspath(settings.path)
    if settings.get("bucket"):
        return f"s3://{settings.bucket}/{settings.get('prefix', '')}".rstrip("/")
    if settings.get("log_group"):
        return f"log group {settings.log_group}"
    if settings.get("hosts"):  # a host given as a table shows its address only (never its credentials)
        return ", ".join(str(h.get("host", "?")) if isinstance(h, dict) else h for h in settings.hosts)
    if settings.get("namespace"):
        return f"namespace {settings.namespace}"
    return ""


def filter_name(settings: Settings) -> str:
    """"grep.0": a filter's type and index in [[filters]], as counters and logs name it."""
    return f"{settings.type}.{settings.where[len('filters['):-1]}"


def filter_summary(settings: Settings) -> str:
    """What a filter does, in a few words, from its module's ``summary`` (if it has one)."""
    from shipper.filters import FILTER_MODULES

    summary = getattr(importlib.import_module(FILTER_MODULES[settings.type]).FILTER, "summary", None)
    return summary(settings) if summary is not None else ""


def tag_matches(tag: str, patterns: list[str]) -> bool:
    from fnmatch import fnmatchcase

    return any(fnmatchcase(tag, pattern) for pattern in patterns)


def _plugin_schema(kind: str, where: str, raw: Any, modules: dict[str, str], common: dict[str, Option],
                   problems: list[str]) -> dict[str, Option] | None:
    type_name = raw.get("type") if isinstance(raw, dict) else None
    if type_name is None:
        problems.append(f"{where}.type: required (one of {', '.join(sorted(modules))})")
        return None
    if type_name not in modules:
        problems.append(f"{where}.type: unknown {kind} type {type_name!r}{did_you_mean(type_name, modules)}")
        return None
    module = importlib.import_module(modules[type_name])
    return {**common, **module.OPTIONS}


def _filter_settings(where: str, raw: Any, labels: dict[str, str], problems: list[str]) -> Settings | None:
    """One [[filters]] table: ``type`` and ``match``, the type's own OPTIONS, then its cross-key checks."""
    from shipper.filters import FILTER_MODULES

    type_name = raw.get("type") if isinstance(raw, dict) else None
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a table, got {type(raw).__name__}")
        return None
    if type_name is None:
        problems.append(f"{where}.type: required (one of {', '.join(sorted(FILTER_MODULES))})")
        return None
    if not isinstance(type_name, str) or type_name not in FILTER_MODULES:
        problems.append(f"{where}.type: unknown filter type {type_name!r}{did_you_mean(type_name, FILTER_MODULES)}")
        return None
    try:
        kind = importlib.import_module(FILTER_MODULES[type_name]).FILTER
    except ImportError:  # a type listed but not built in this version
        problems.append(f"{where}.type: filter type {type_name!r} is not available in this build")
        return None
    settings = validate_section(where, raw, {**COMMON_FILTER_OPTIONS, **kind.OPTIONS}, problems)
    try:  # cross-key checks; a key they need that is invalid (already reported) is missing: AttributeError
        problems.extend(kind.problems(settings, where))
        if hasattr(kind, "agent_problems"):  # what needs the rest of the config: [agent.labels]
            problems.extend(kind.agent_problems(settings, where, labels))
    except AttributeError:
        pass
    return settings


def _shared_checkpoints(inputs: list[Settings]) -> list[str]:
    """File inputs keep checkpoints in a file named by their id (default: tag): two must not share one."""
    seen: dict[str, str] = {}
    problems = []
    for settings in inputs:
        if settings.type != "file":
            continue
        key = settings.id or settings.tag
        if key in seen:
            problems.append(f"{settings.where}.id: {key!r} is already the id of {seen[key]} (ids default to the "
                            f"tag); give each file input its own id so their checkpoints stay apart")
        seen.setdefault(key, settings.where)
    return problems


def _interpolate_tree(value: Any, where: str, environ: dict[str, str], problems: list[str],
                      unresolved: list[str]) -> Any:
    if isinstance(value, str):
        try:
            return interpolate(value, environ)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            unresolved.append(where)
            return value
    if isinstance(value, dict):
        return {k: _interpolate_tree(v, _join(where, k), environ, problems, unresolved) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate_tree(v, f"{where}[{i}]", environ, problems, unresolved) for i, v in enumerate(value)]
    return value


def one_cause_each(problems: list[str], unresolved: list[str]) -> list[str]:
    """Without the later problems of a key whose ``${VAR}`` could not be expanded: an unset variable is
    reported once, not again as, say, an invalid bucket name made of the text "${SHIPPER_BUCKET}"."""
    if not unresolved:
        return problems
    kept = problems[:len(unresolved)]  # the interpolation problems themselves come first
    for problem in problems[len(unresolved):]:
        key = problem.split(": ", 1)[0]
        if not any(key == path or key.startswith((path + ".", path + "[")) for path in unresolved):
            kept.append(problem)
    return kept


def load_text(text: str, source: str, environ: dict[str, str] | None = None) -> Config:
    """Parse and validate a TOML document; raise ConfigError listing every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: not valid TOML: {exc}"], source) from None
    problems: list[str] = []
    unresolved: list[str] = []
    raw = _interpolate_tree(raw, "", dict(os.environ) if environ is None else environ, problems, unresolved)
    known = {"agent", "cloud", "server", "inputs", "outputs", "filters"}
    for key in raw:
        if key not in known:
            problems.append(f"{key}: unknown section{did_you_mean(key, known)}")
    agent = validate_section("agent", raw.get("agent", {}), AGENT_OPTIONS, problems)
    cloud = validate_section("cloud", raw.get("cloud", {}), CLOUD_OPTIONS, problems)
    server = validate_section("server", raw.get("server", {}), SERVER_OPTIONS, problems)
    problems.extend(_server_problems(server))
    sections: dict[str, list[Settings]] = {"inputs": [], "outputs": []}
    for name, modules, common in (("inputs", INPUT_MODULES, COMMON_INPUT_OPTIONS),
                                  ("outputs", OUTPUT_MODULES, COMMON_OUTPUT_OPTIONS)):
        items = raw.get(name, [])
        if not isinstance(items, list):
            problems.append(f"{name}: expected an array of tables ([[{name}]])")
            continue
        if not items:
            problems.append(f"{name}: at least one [[{name}]] table is required")
        for index, item in enumerate(items):
            where = f"{name}[{index}]"
            schema = _plugin_schema(name[:-1], where, item, modules, common, problems)
            if schema is None:
                continue
            settings = validate_section(where, item, schema, problems)
            if name == "inputs" and settings.get("tag") is None and "tag" in schema:
                settings._values["tag"] = settings.type
            module = importlib.import_module(modules[settings.type])
            if hasattr(module, "validate"):
                problems.extend(module.validate(settings))
            sections[name].append(settings)
    problems.extend(_shared_checkpoints(sections["inputs"]))
    filters: list[Settings] = []
    items = raw.get("filters", [])
    if not isinstance(items, list):
        problems.append("filters: expected an array of tables ([[filters]])")
        items = []
    for index, item in enumerate(items):
        settings = _filter_settings(f"filters[{index}]", item, agent.get("labels") or {}, problems)
        if settings is not None:
            filters.append(settings)
    if problems:
        raise ConfigError(one_cause_each(problems, unresolved), source)
    return Config(agent, cloud, server, sections["inputs"], sections["outputs"], source, filters)


def embedded_default_text() -> str:
    return resources.files("shipper").joinpath("default.toml").read_text()


EMBEDDED_DEFAULT = "<embedded default>"


def config_path(path: str | None, embedded: bool = False) -> str | None:
    """The file ``shipper run|check`` reads: ``path`` if given; else /etc/shipper/shipper.toml when it
    exists, unless ``embedded`` (``--default``, what ``make run`` uses); None: the embedded default."""
    if path is not None or embedded:
        return path
    return DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None


def load(path: str | None, environ: dict[str, str] | None = None) -> Config:
    """Load the file ``path``; None loads the embedded default (see ``config_path`` for the search)."""
    if path is None:
        return load_text(embedded_default_text(), EMBEDDED_DEFAULT, environ)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"], path) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"], path) from None
    return load_text(text, path, environ)
