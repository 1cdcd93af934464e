"""The CloudWatch Logs output end to end: the agent subprocess -> fault proxy -> a real moto server.

moto enforces none of the PutLogEvents limits, so the limits are checked on what the agent
actually sent, as the proxy recorded it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from aws import target
from conftest import FAST_RETRIES, agent_config, seq_lines, wait_for

from shipper.outputs.log_events import EVENT_OVERHEAD, MAX_EVENT_BYTES, MAX_EVENTS, MAX_REQUEST_BYTES, MAX_SPAN_MS

GROUP = "/shipper/app"


def cwl_output(aws, extra: str = "") -> str:
    return f"""
[[outputs]]
type = "cloudwatch_logs"
log_group = "/shipper/{{tag}}"
log_stream = "{{host}}/{{source}}"
endpoint_url = "{aws.endpoint}"
region = "us-east-1"
flush_interval = "100ms"
{extra}
"""


def start(run_agent, workdir: Path, aws, extra: str = "", **options):
    config = agent_config(workdir / "logs", workdir / "data", output=cwl_output(aws, extra),
                          agent_extra=FAST_RETRIES, **options)
    return run_agent(config, env=aws.env)


def write(workdir: Path, start: int, count: int, name: str = "app.log") -> None:
    with open(workdir / "logs" / name, "a") as handle:
        handle.write(seq_lines(start, count))


def stream_events(aws, group: str = GROUP) -> dict[str, list[dict]]:
    """Every event of every stream in ``group``, read from moto page by page."""
    try:
        streams = aws.logs.describe_log_streams(logGroupName=group)["logStreams"]
    except aws.logs.exceptions.ResourceNotFoundException:
        return {}
    found = {}
    for stream in streams:
        events, token = [], None
        while True:
            page = aws.logs.get_log_events(logGroupName=group, logStreamName=stream["logStreamName"],
                                           startFromHead=True, **({"nextToken": token} if token else {}))
            events.extend(page["events"])
            if page["nextForwardToken"] == token or not page["events"]:
                break
            token = page["nextForwardToken"]
        found[stream["logStreamName"]] = events
    return found


def seq_numbers(events: list[dict]) -> list[int]:
    return sorted(int(e["message"][4:11]) for e in events if e["message"].startswith("seq="))


def all_seqs(aws) -> list[int]:
    return sorted(n for events in stream_events(aws).values() for n in seq_numbers(events))


def sent_requests(aws) -> list[dict]:
    return [r.json() for r in aws.proxy.requests(target_contains="PutLogEvents") if r.status == 200]


def check_limits(request: dict) -> None:
    events = request["logEvents"]
    assert 1 <= len(events) <= MAX_EVENTS
    assert sum(len(e["message"].encode()) + EVENT_OVERHEAD for e in events) <= MAX_REQUEST_BYTES
    times = [e["timestamp"] for e in events]
    assert times == sorted(times)
    assert times[-1] - times[0] < MAX_SPAN_MS
    assert all(len(e["message"].encode()) + EVENT_OVERHEAD <= MAX_EVENT_BYTES for e in events)


def test_a_burst_of_20000_lines_goes_out_in_requests_within_the_limits(run_agent, workdir, aws):
    write(workdir, 0, 20_000)
    agent = start(run_agent, workdir, aws, extra="retention_days = 7")
    wait_for(lambda: all_seqs(aws) == list(range(20_000)), interval=0.3, message="20,000 events")
    assert agent.stop() == 0
    requests = sent_requests(aws)
    assert len(requests) >= 2
    for request in requests:
        check_limits(request)
    group = aws.logs.describe_log_groups(logGroupNamePrefix=GROUP)["logGroups"][0]
    assert group["retentionInDays"] == 7
    (stream,) = stream_events(aws)
    assert stream.endswith("/app.log")
    assert all(r.fault is None for r in aws.proxy.requests())


def test_throttling_unavailability_and_dropped_connections_lose_nothing(run_agent, workdir, aws):
    aws.proxy.inject("throttle", times=3, when=target("PutLogEvents"))
    aws.proxy.inject("unavailable", times=2, when=target("PutLogEvents"))
    aws.proxy.inject("drop", times=2, when=target("PutLogEvents"))
    aws.proxy.inject("drop_after_forward", times=1, when=target("PutLogEvents"))
    agent = start(run_agent, workdir, aws)
    write(workdir, 0, 3000)
    wait_for(lambda: set(all_seqs(aws)) == set(range(3000)), timeout=30, interval=0.2, message="every line")
    assert agent.stop() == 0
    faults = [r.fault for r in aws.proxy.requests(target_contains="PutLogEvents") if r.fault]
    assert sorted(faults) == sorted(["throttle"] * 3 + ["unavailable"] * 2 + ["drop"] * 2 + ["drop_after_forward"])
    # At least once: the lost response makes its events arrive twice at most.
    assert len(all_seqs(aws)) <= 3000 + MAX_EVENTS


def test_too_old_and_too_new_events_are_dropped_with_a_reason_and_do_not_block(run_agent, workdir, aws):
    now = time.time()
    lines = [json.dumps({"t": now - 30 * 86400, "msg": "too old"}),
             json.dumps({"t": now, "msg": "fine"}),
             json.dumps({"t": now + 86400, "msg": "too new"})]
    (workdir / "logs" / "app.log").write_text("\n".join(lines) + "\n")
    agent = start(run_agent, workdir, aws, extra='format = "raw"', parser="json", time_key="t")
    wait_for(lambda: len(sent_requests(aws)) >= 1, message="a request")
    wait_for(lambda: "as too new" in agent.log() and "as too old" in agent.log(), message="both refusals logged")
    (stream,) = stream_events(aws).values()
    assert [json.loads(e["message"])["msg"] for e in stream] == ["fine"]
    write(workdir, 0, 10)  # the stream is not blocked by what was refused
    wait_for(lambda: all_seqs(aws) == list(range(10)), message="later lines")
    assert agent.stop() == 0


def test_a_one_mib_line_is_split_into_events_under_256_kib(run_agent, workdir, aws):
    line = "".join(chr(0x41 + i % 26) for i in range(1024 * 1024))
    (workdir / "logs" / "app.log").write_text(line + "\n")
    agent = start(run_agent, workdir, aws, max_line_bytes="2MiB")
    wait_for(lambda: sum(len(e["message"]) for s in stream_events(aws).values() for e in s) == len(line),
             message="the whole line in parts")
    assert agent.stop() == 0
    (events,) = stream_events(aws).values()
    assert len(events) == 5 and "".join(e["message"] for e in events) == line
    for request in sent_requests(aws):
        check_limits(request)


def test_empty_lines_are_not_sent_as_events(run_agent, workdir, aws):
    """PutLogEvents refuses an empty message (moto does not check): an empty line must never reach it."""
    (workdir / "logs" / "app.log").write_text(seq_lines(0, 3) + "\n\n" + seq_lines(3, 3))
    agent = start(run_agent, workdir, aws)
    wait_for(lambda: all_seqs(aws) == list(range(6)), message="the non-empty lines")
    assert agent.stop() == 0
    assert all(e["message"] for request in sent_requests(aws) for e in request["logEvents"])


def test_a_single_invalid_event_is_dropped_and_the_rest_delivered(run_agent, workdir, aws):
    poison = lambda request: b"POISON" in request.body  # noqa: E731 - a selector
    aws.proxy.inject("invalid_parameter", times=None, when=poison)
    lines = seq_lines(0, 100) + "POISON line\n" + seq_lines(100, 100)
    (workdir / "logs" / "app.log").write_text(lines)
    agent = start(run_agent, workdir, aws)
    wait_for(lambda: all_seqs(aws) == list(range(200)), timeout=20, message="every good line")
    wait_for(lambda: "refused an event" in agent.log(), message="the dropped event logged")
    assert agent.stop() == 0
    refused = [r for r in aws.proxy.requests(target_contains="PutLogEvents") if r.fault]
    assert len(refused[-1].json()["logEvents"]) == 1  # halved down to the one bad event


def test_one_throttled_stream_does_not_hold_back_another(run_agent, workdir, aws):
    slow = lambda request: b"slow.log" in request.body  # noqa: E731 - a selector
    aws.proxy.inject("throttle", times=None, when=slow)
    agent = start(run_agent, workdir, aws)
    write(workdir, 0, 500, name="slow.log")
    write(workdir, 1000, 500, name="fast.log")
    wait_for(lambda: seq_numbers(stream_events(aws).get(_stream_name(aws, "fast.log"), [])) ==
             list(range(1000, 1500)), message="the healthy stream delivered")
    assert not any(r.fault is None for r in aws.proxy.requests(target_contains="PutLogEvents") if slow(r))
    aws.proxy.clear_faults()
    wait_for(lambda: all_seqs(aws) == list(range(500)) + list(range(1000, 1500)), timeout=30,
             message="the throttled stream catches up")
    assert agent.stop() == 0


def _stream_name(aws, file_name: str) -> str:
    return next((name for name in stream_events(aws) if name.endswith(file_name)), "")


def test_outage_and_kill_9_then_restart_deliver_every_line(run_agent, workdir, aws):
    aws.proxy.set_down(True)
    agent = start(run_agent, workdir, aws)
    write(workdir, 0, 2000)
    wait_for(lambda: "retrying with backoff" in agent.log(), message="a failed request")
    agent.kill()  # nothing was confirmed: the checkpoint stays at 0
    aws.proxy.set_down(False)
    write(workdir, 2000, 1000)
    again = start(run_agent, workdir, aws)
    wait_for(lambda: all_seqs(aws) == list(range(3000)), timeout=30, interval=0.2, message="every line, once")
    assert again.stop() == 0


def test_a_missing_group_is_retried_not_dropped_when_create_missing_is_off(run_agent, workdir, aws):
    agent = start(run_agent, workdir, aws, extra="create_missing = false")
    write(workdir, 0, 50)
    wait_for(lambda: "check the permissions and that the group exists" in agent.log(), message="a clear warning")
    aws.logs.create_log_group(logGroupName=GROUP)
    aws.logs.create_log_stream(logGroupName=GROUP, logStreamName=_host_stream(workdir))
    wait_for(lambda: all_seqs(aws) == list(range(50)), timeout=30, message="delivery once the group exists")
    assert agent.stop() == 0


def _host_stream(workdir: Path) -> str:
    import socket

    return f"{socket.gethostname()}/app.log"


def test_format_json_sends_whole_records_with_labels(run_agent, workdir, aws):
    config = agent_config(workdir / "logs", workdir / "data", output=cwl_output(aws, 'format = "json"'),
                          agent_extra=FAST_RETRIES + '\n[agent.labels]\nteam = "payments"')
    agent = run_agent(config, env=aws.env)
    write(workdir, 0, 5)
    wait_for(lambda: sum(map(len, stream_events(aws).values())) == 5, message="5 JSON events")
    assert agent.stop() == 0
    (events,) = stream_events(aws).values()
    records = [json.loads(e["message"]) for e in events]
    assert seq_numbers([{"message": r["message"]} for r in records]) == list(range(5))
    assert all(r["labels"] == {"team": "payments"} and r["tag"] == "app" for r in records)


def test_check_rejects_bad_names_and_retention_offline(workdir, aws):
    import subprocess
    import sys

    output = cwl_output(aws, "retention_days = 8").replace('"/shipper/{tag}"', '"/shipper:{tag}/{nope}"')
    path = workdir / "check.toml"
    path.write_text(agent_config(workdir / "logs", workdir / "data", output=output))
    result = subprocess.run([sys.executable, "-m", "shipper", "check", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "outputs[0].log_group: unknown placeholder {nope}" in result.stderr
    assert "outputs[0].retention_days: must be one of 1, 3, 5, 7, 14" in result.stderr
    path.write_text(agent_config(workdir / "logs", workdir / "data",
                                 output=cwl_output(aws).replace('"/shipper/{tag}"', '"/shipper:x"')))
    result = subprocess.run([sys.executable, "-m", "shipper", "check", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert "outputs[0].log_group: not a valid name: 1-512 letters, digits and . _ - / #" in result.stderr
    assert aws.proxy.requests() == []
