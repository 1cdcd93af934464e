"""Metrics samples as CloudWatch metric data: datums for PutMetricData, or Embedded Metric Format events.

Pure functions. A sample's metric ``group.name_unit`` becomes a CloudWatch metric of that
name with the unit its suffix names; a metric of several things (``{"/": 23.0}``) becomes one
datum per thing, with the thing as one more dimension (MountPath, Device, Interface, Core,
Process). The limits hold by construction: at most 30 dimensions a datum, no NaN or
infinity (counted, dropped), at most 1,000 datums and about 1 MB a PutMetricData call, at
most 100 metrics an EMF directive.
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase
from typing import Any, Iterator

MAX_DATUMS = 1000
MAX_REQUEST_BYTES = 1_000_000   # the service's 1 MB, with room for the request's own envelope
MAX_DIMENSIONS = 30
MAX_EMF_METRICS = 100

# Which dimension names the things of a group.
THING_DIMENSIONS = {"disk": "MountPath", "diskio": "Device", "network": "Interface", "cpu": "Core",
                    "process": "Process"}
# Unit by the end of the metric name; the first that matches wins.
UNITS = (("_bytes_per_second", "Bytes/Second"), ("_per_second", "Count/Second"), ("_percent", "Percent"),
         ("_bytes", "Bytes"), ("seconds", "Seconds"), ("", "Count"))
LOAD_UNIT = "None"
IDENTITY_DIMENSIONS = ("InstanceId", "ImageId", "InstanceType", "AutoScalingGroupName", "Host", "Region",
                       "AvailabilityZone")
DEFAULT_DIMENSIONS = ["InstanceId", "ImageId", "AutoScalingGroupName"]


def check_dimensions(names: list[str]) -> str | None:
    unknown = [n for n in names if n not in IDENTITY_DIMENSIONS]
    return f"unknown dimension {unknown[0]!r} (known: {', '.join(IDENTITY_DIMENSIONS)})" if unknown else None


def check_namespace(namespace: str) -> str | None:
    if not namespace or namespace.startswith("AWS/") or len(namespace) > 255:
        return "1-255 characters, not starting with \"AWS/\""
    return None


def unit_of(name: str) -> str:
    """The unit a metric's name ends with: "cpu.percent" and "cpu.user_percent" are both Percent."""
    if name.startswith("load."):
        return LOAD_UNIT
    ending = "_" + name.rpartition(".")[2]
    return next(unit for suffix, unit in UNITS if ending.endswith(suffix))


def selected(name: str, include: list[str], exclude: list[str]) -> bool:
    return (not include or any(fnmatchcase(name, p) for p in include)) and \
        not any(fnmatchcase(name, p) for p in exclude)


def flatten(metrics: dict[str, Any], include: list[str], exclude: list[str]) -> Iterator[tuple[str, dict, float]]:
    """(name, extra dimensions, value) for every selected number of a sample, maps unfolded."""
    for name, value in metrics.items():
        if not selected(name, include, exclude):
            continue
        if isinstance(value, dict):
            dimension = THING_DIMENSIONS.get(name.split(".", 1)[0], "Item")
            for thing, number in value.items():
                yield name, {dimension: str(thing)}, number
        else:
            yield name, {}, value


def usable(value: object) -> bool:
    """A finite number that JSON encoders take (an int beyond 64 bits is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):
        return -(2**63) <= value < 2**64
    return math.isfinite(value)


def base_dimensions(wanted: list[str], identity: dict[str, str], labels: dict[str, str],
                    with_labels: bool) -> dict[str, str]:
    """The dimensions every datum carries, in order, at most MAX_DIMENSIONS - 1 (one is kept for the thing)."""
    sources = {"InstanceId": identity.get("instance_id") or identity.get("host"), "ImageId": identity.get("image_id"),
               "InstanceType": identity.get("instance_type"), "AutoScalingGroupName": identity.get("autoscaling_group"),
               "Host": identity.get("host"), "Region": identity.get("region"),
               "AvailabilityZone": identity.get("availability_zone")}
    dimensions = {name: sources[name] for name in wanted if sources.get(name)}  # only those known
    if with_labels:
        for key, value in labels.items():
            dimensions.setdefault(key, value)
    return dict(list(dimensions.items())[:MAX_DIMENSIONS - 1])


def datums(metrics: dict[str, Any], timestamp: float, dimensions: dict[str, str], include: list[str],
           exclude: list[str], resolution: int) -> tuple[list[dict], int]:
    """PutMetricData datums of one sample, and how many values were dropped (NaN, infinity, not a number)."""
    out, dropped = [], 0
    for name, extra, value in flatten(metrics, include, exclude):
        if not usable(value):
            dropped += 1
            continue
        out.append({
            "MetricName": name,
            "Dimensions": [{"Name": k, "Value": v} for k, v in {**dimensions, **extra}.items()],
            "Timestamp": timestamp,
            "Value": float(value),
            "Unit": unit_of(name),
            "StorageResolution": resolution,
        })
    return out, dropped


def datum_size(datum: dict) -> int:
    """A generous estimate of a datum's share of the request body (field names, values, encoding)."""
    return 160 + len(datum["MetricName"]) + sum(len(d["Name"]) + len(d["Value"]) + 40 for d in datum["Dimensions"])


def requests(all_datums: list[dict]) -> Iterator[list[dict]]:
    """Cut datums into PutMetricData calls of at most MAX_DATUMS and MAX_REQUEST_BYTES."""
    current: list[dict] = []
    size = 0
    for datum in all_datums:
        cost = datum_size(datum)
        if current and (len(current) >= MAX_DATUMS or size + cost > MAX_REQUEST_BYTES):
            yield current
            current, size = [], 0
        current.append(datum)
        size += cost
    if current:
        yield current


def emf_events(metrics: dict[str, Any], timestamp_ms: int, namespace: str, dimensions: dict[str, str],
               include: list[str], exclude: list[str], resolution: int) -> tuple[list[dict], int]:
    """Embedded Metric Format events of one sample: one per set of dimensions, at most 100 metrics each.

    A metric of several things gives one event per thing, the thing a dimension of its own.
    """
    groups: dict[tuple, dict[str, float]] = {}
    dropped = 0
    for name, extra, value in flatten(metrics, include, exclude):
        if not usable(value):
            dropped += 1
            continue
        groups.setdefault(tuple(sorted(extra.items())), {})[name] = value
    events = []
    for extra, values in groups.items():
        names = list(values)
        for start in range(0, len(names), MAX_EMF_METRICS):
            chunk = names[start:start + MAX_EMF_METRICS]
            keys = {**dimensions, **dict(extra)}
            directive = {"Namespace": namespace, "Dimensions": [list(keys)],
                         "Metrics": [{"Name": n, "Unit": unit_of(n),
                                      **({"StorageResolution": 1} if resolution == 1 else {})} for n in chunk]}
            event = {"_aws": {"Timestamp": timestamp_ms, "CloudWatchMetrics": [directive]}, **keys}
            event.update({n: values[n] for n in chunk})
            events.append(event)
    return events, dropped
