"""Metrics to CloudWatch: datums and EMF events (pure), then PutMetricData and EMF end to end on moto."""

from __future__ import annotations

import json
import math
from pathlib import Path

from aws import target
from conftest import FAST_RETRIES, wait_for

from shipper.outputs.metric_data import (
    MAX_DATUMS, MAX_DIMENSIONS, MAX_EMF_METRICS, base_dimensions, datums, emf_events, requests, unit_of,
)

SAMPLE = {"cpu.percent": 12.5, "load.1m": 0.3, "memory.used_bytes": 1024, "uptime.seconds": 99.0,
          "disk.used_percent": {"/": 23.0, "/data": 4.0}, "network.sent_bytes_per_second": {"eth0": 10.0},
          "diskio.read_ops_per_second": {"vda": 1.0}, "processes.count": 60, "cpu.steal_percent": math.nan}


def test_units_follow_the_name():
    assert [unit_of(n) for n in ("cpu.percent", "memory.used_bytes", "network.sent_bytes_per_second",
                                 "diskio.read_ops_per_second", "uptime.seconds", "processes.count", "load.1m")] == \
        ["Percent", "Bytes", "Bytes/Second", "Count/Second", "Seconds", "Count", "None"]


def test_datums_unfold_things_into_a_dimension_and_drop_what_is_not_a_number():
    made, dropped = datums(SAMPLE, 1000.0, {"InstanceId": "i-1"}, [], [], 60)
    assert dropped == 1  # the NaN
    disk = [d for d in made if d["MetricName"] == "disk.used_percent"]
    assert sorted((d["Dimensions"][-1]["Value"], d["Value"]) for d in disk) == [("/", 23.0), ("/data", 4.0)]
    assert all(d["Dimensions"][0] == {"Name": "InstanceId", "Value": "i-1"} for d in made)
    assert {d["Dimensions"][-1]["Name"] for d in made if len(d["Dimensions"]) == 2} == {
        "MountPath", "Interface", "Device"}
    only, _ = datums(SAMPLE, 1000.0, {}, ["cpu.*", "disk.*"], ["disk.*"], 1)
    assert [d["MetricName"] for d in only] == ["cpu.percent"] and only[0]["StorageResolution"] == 1


def test_dimensions_never_exceed_thirty_and_unknown_identity_is_left_out():
    labels = {f"label{i}": "x" for i in range(40)}
    dimensions = base_dimensions(["InstanceId", "ImageId", "AutoScalingGroupName"], {"host": "h"}, labels, True)
    assert list(dimensions)[0] == "InstanceId" and "ImageId" not in dimensions
    made, _ = datums({"disk.used_percent": {"/": 1.0}}, 0.0, dimensions, [], [], 60)
    assert len(made[0]["Dimensions"]) == MAX_DIMENSIONS


def test_identity_dimensions_in_the_order_asked_when_known():
    identity = {"host": "h", "instance_id": "i-1", "image_id": "ami-1", "autoscaling_group": "web-asg"}
    assert base_dimensions(["InstanceId", "ImageId", "AutoScalingGroupName"], identity, {"app": "web"}, True) == {
        "InstanceId": "i-1", "ImageId": "ami-1", "AutoScalingGroupName": "web-asg", "app": "web"}
    assert base_dimensions(["Host"], identity, {"app": "web"}, False) == {"Host": "h"}


def test_calls_hold_at_most_a_thousand_datums_and_about_a_megabyte():
    many, _ = datums({f"m.metric{i}": float(i) for i in range(2500)}, 0.0, {"InstanceId": "i-1"}, [], [], 60)
    calls = list(requests(many))
    assert [len(c) for c in calls] == [1000, 1000, 500]
    wide, _ = datums({f"m.{'x' * 250}{i}": 1.0 for i in range(900)},
                     0.0, {f"D{i}": "v" * 200 for i in range(29)}, [], [], 60)
    assert len(list(requests(wide))) > 1 and all(len(c) <= MAX_DATUMS for c in requests(wide))


def test_emf_events_follow_the_specification():
    many = {**SAMPLE, **{f"m.metric{i}": 1.0 for i in range(150)}}
    events, dropped = emf_events(many, 1795958238000, "Shipper", {"InstanceId": "i-1"}, [], [], 1)
    assert dropped == 1
    for event in events:
        directive = event["_aws"]
        assert directive["Timestamp"] == 1795958238000
        (metric_set,) = directive["CloudWatchMetrics"]
        assert metric_set["Namespace"] == "Shipper"
        assert len(metric_set["Metrics"]) <= MAX_EMF_METRICS
        for dimension_set in metric_set["Dimensions"]:
            assert len(dimension_set) <= 30 and all(isinstance(event[name], str) for name in dimension_set)
        for metric in metric_set["Metrics"]:
            assert isinstance(event[metric["Name"]], float | int) and metric["StorageResolution"] == 1
    per_mount = [e for e in events if "MountPath" in e]
    assert sorted((e["MountPath"], e["disk.used_percent"]) for e in per_mount) == [("/", 23.0), ("/data", 4.0)]
    values = sum(len(v) if isinstance(v, dict) else 1 for v in many.values()) - 1  # things unfolded, NaN out
    assert sum(len(e["_aws"]["CloudWatchMetrics"][0]["Metrics"]) for e in events) == values


def metrics_config(data: Path, output: str) -> str:
    return f"""
[agent]
data_dir = "{data}"
flush_interval = "100ms"
{FAST_RETRIES}
[agent.labels]
app = "web"
[cloud]
metadata = "off"
[[inputs]]
type = "metrics"
interval = "500ms"
groups = ["cpu", "memory", "disk", "network"]
{output}"""


def test_samples_reach_cloudwatch_metrics_through_throttling(run_agent, workdir, aws):
    aws.proxy.inject("throttle", times=2, when=target("PutMetricData"))
    output = f"""
[[outputs]]
type = "cloudwatch_metrics"
namespace = "Shipper/Test"
exclude = ["network.*"]
endpoint_url = "{aws.endpoint}"
region = "us-east-1"
"""
    agent = run_agent(metrics_config(workdir / "data", output), env=aws.env)
    calls = lambda: [r for r in aws.proxy.requests(target_contains="PutMetricData") if r.status == 200]  # noqa: E731
    wait_for(lambda: len(calls()) >= 2, timeout=20, message="two accepted PutMetricData calls")
    assert agent.stop() == 0
    for call in calls():
        body = call.json()
        assert body["Namespace"] == "Shipper/Test" and 1 <= len(body["MetricData"]) <= MAX_DATUMS
        assert not any(d["MetricName"].startswith("network.") for d in body["MetricData"])
    stored = aws.client("cloudwatch").list_metrics(Namespace="Shipper/Test")["Metrics"]
    names = {m["MetricName"] for m in stored}
    assert {"cpu.percent", "memory.used_bytes", "disk.used_percent"} <= names
    disk = next(m for m in stored if m["MetricName"] == "disk.used_percent")
    assert {d["Name"]: d["Value"] for d in disk["Dimensions"]}["MountPath"] == "/"
    assert {"InstanceId", "app"} <= {d["Name"] for d in disk["Dimensions"]}
    assert sum(1 for r in aws.proxy.requests(target_contains="PutMetricData") if r.fault == "throttle") == 2


def test_emf_format_sends_metrics_as_log_events(run_agent, workdir, aws):
    output = f"""
[[outputs]]
type = "cloudwatch_logs"
log_group = "/shipper/metrics"
format = "emf"
emf_namespace = "Shipper/EMF"
endpoint_url = "{aws.endpoint}"
region = "us-east-1"
flush_interval = "100ms"
"""
    agent = run_agent(metrics_config(workdir / "data", output), env=aws.env)
    sent = lambda: [e for r in aws.proxy.requests(target_contains="PutLogEvents") if r.status == 200  # noqa: E731
                    for e in r.json()["logEvents"]]
    wait_for(lambda: len(sent()) >= 4, timeout=20, message="EMF events")
    assert agent.stop() == 0
    events = [json.loads(e["message"]) for e in sent()]
    assert all(e["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "Shipper/EMF" for e in events)
    assert any("cpu.percent" in e and e["InstanceId"] and e["app"] == "web" for e in events)
    assert any(e.get("MountPath") == "/" and "disk.used_percent" in e for e in events)
