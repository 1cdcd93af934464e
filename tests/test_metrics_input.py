"""The metrics input: pure rate and share arithmetic, real psutil samples, and records end to end."""

from __future__ import annotations

import os
import threading
import time


from conftest import read_archive, wait_for
from shipper.config import COMMON_INPUT_OPTIONS, validate_section
from shipper.inputs import metrics
from shipper.inputs.metrics import Sampler, cpu_percentages, next_tick, rate, rates
from shipper.stats import Stats


def make_input(**options) -> Sampler:
    problems: list[str] = []
    settings = validate_section("inputs[0]", {"type": "metrics", **options},
                                {**COMMON_INPUT_OPTIONS, **metrics.OPTIONS}, problems)
    assert problems == []
    settings._values["tag"] = "metrics"
    return Sampler(settings, Stats())


def test_ticks_are_aligned_to_the_wall_clock():
    assert next_tick(1000.0, 10) == 1010.0
    assert next_tick(1003.7, 10) == 1010.0
    assert next_tick(1009.999, 0.5) == 1010.0


def test_rates_never_go_negative_and_need_two_readings():
    assert rate(None, 100, 10) is None
    assert rate(100, 50, 10) is None  # a reset or a wrap
    assert rate(100, 150, 10) == 5.0
    before = {"eth0": {"bytes": 100}, "eth1": {"bytes": 900}}
    after = {"eth0": {"bytes": 300}, "eth1": {"bytes": 10}, "eth2": {"bytes": 5}}
    assert rates(before, after, 2.0, {"bytes": "network.bytes_per_second"}) == {
        "network.bytes_per_second": {"eth0": 100.0}}
    assert rates(None, after, 2.0, {"bytes": "x"}) == {}


def test_cpu_shares_come_from_time_deltas():
    before = {"user": 10.0, "nice": 0.0, "system": 5.0, "idle": 80.0, "iowait": 5.0, "steal": 0.0}
    after = {"user": 16.0, "nice": 0.0, "system": 7.0, "idle": 90.0, "iowait": 7.0, "steal": 0.0}
    shares = cpu_percentages(before, after)
    assert shares == {"cpu.percent": 40.0, "cpu.user_percent": 30.0, "cpu.system_percent": 10.0,
                      "cpu.iowait_percent": 10.0, "cpu.steal_percent": 0.0}
    assert cpu_percentages(None, after) == {}
    assert cpu_percentages(after, before) == {}  # counters went back: no share rather than a negative one


def test_a_real_sample_has_every_group_and_no_negative_rate():
    source = make_input(per_core=True)
    source.sample()
    with open(os.devnull, "wb") as sink:  # some CPU activity between the samples
        sink.write(os.urandom(1 << 20))
    time.sleep(0.2)  # a few clock ticks on every core
    sample = source.sample()
    for name in ("cpu.percent", "load.1m", "memory.used_bytes", "memory.used_percent", "swap.total_bytes",
                 "processes.count", "fds.open", "uptime.seconds"):
        assert isinstance(sample[name], (int, float)), name
    assert 0 <= sample["cpu.percent"] <= 100
    assert sample["disk.used_percent"] and all(0 <= v <= 100 for v in sample["disk.used_percent"].values())
    assert "/" in sample["disk.total_bytes"]
    assert set(sample["cpu.core_percent"]) == {str(i) for i in range(os.cpu_count())}
    per_thing = [v for k, v in sample.items() if k.startswith(("diskio.", "network."))]
    assert per_thing and all(value >= 0 for values in per_thing for value in values.values())
    assert "lo" not in sample.get("network.sent_bytes_per_second", {})
    assert sample["processes.count"] >= 1 and sample["processes.zombie"] >= 0


def test_groups_can_be_switched_off_and_processes_watched(tmp_path):
    pid_file = tmp_path / "me.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    source = make_input(groups=["memory", "load"], pid_files=[str(pid_file)], top_processes=1)
    source.sample()
    sample = source.sample()
    assert {name.split(".")[0] for name in sample} == {"memory", "load", "process"}
    mine = [key for key in sample["process.rss_bytes"] if key.endswith(f":{os.getpid()}")]
    assert mine and sample["process.rss_bytes"][mine[0]] > 0
    assert sample["process.open_files"][mine[0]] > 0
    assert len(sample["process.cpu_percent"]) <= 3  # top 1 by CPU, top 1 by RSS, and ours


def test_an_unknown_group_is_a_config_error():
    problems: list[str] = []
    validate_section("inputs[0]", {"type": "metrics", "groups": ["cpu", "gpu"]},
                     {**COMMON_INPUT_OPTIONS, **metrics.OPTIONS}, problems)
    assert problems == ["inputs[0].groups: unknown group 'gpu' (known: cpu, disk, diskio, fds, load, memory, "
                        "network, processes, swap, uptime)"]


def test_samples_are_records_in_the_archive(run_agent, workdir):
    data = workdir / "data"
    config = f"""
[agent]
data_dir = "{data}"
flush_interval = "100ms"
[cloud]
metadata = "off"
[[inputs]]
type = "metrics"
interval = "1s"
groups = ["cpu", "memory", "network"]
[[outputs]]
type = "directory"
path = "{data}/archive"
upload_interval = "200ms"
"""
    agent = run_agent(config)
    wait_for(lambda: len(read_archive(data / "archive")) >= 2, message="two samples")
    assert agent.stop() == 0
    records = read_archive(data / "archive")
    assert all(r["tag"] == "metrics" and "message" not in r for r in records)
    assert all(r["time"].endswith(".000000Z") for r in records)  # aligned to whole seconds
    assert all("cpu.percent" in r["metrics"] and "memory.used_bytes" in r["metrics"] for r in records)
    assert "reading every 1s: cpu, memory, network (metrics, tag metrics)" in agent.log()


def test_samples_taken_before_a_kill_9_are_delivered_after_it(run_agent, workdir, make_forward_peer):
    # The destination is down: samples pile up in the journal, then the agent dies without a stop.
    peer = make_forward_peer()
    peer.set_down(True)
    data = workdir / "data"
    config = f"""
[agent]
data_dir = "{data}"
flush_interval = "100ms"
checkpoint_interval = "100ms"
retry_initial_delay = "50ms"
retry_max_delay = "200ms"
[cloud]
metadata = "off"
[server]
listen = ""
[[inputs]]
type = "metrics"
interval = "200ms"
groups = ["memory"]
[[outputs]]
type = "fluentd"
hosts = ["127.0.0.1:{peer.port}"]
"""
    agent = run_agent(config)
    wait_for(lambda: "reading every" in agent.log(), message="the agent started")
    time.sleep(1.5)  # about seven samples, none deliverable
    agent.proc.kill()
    agent.proc.wait(10)
    killed_at = time.time()
    peer.set_down(False)
    agent = run_agent(config)
    wait_for(lambda: any(e.time < killed_at for e in peer.events()), timeout=30,
             message="a sample of the killed agent at the peer")
    assert agent.stop() == 0
    before = [e.record for e in peer.events() if e.time < killed_at]  # the event time is the sample's
    assert len(before) >= 3 and all("memory.used_bytes" in r["metrics"] for r in before)


def test_a_lifecycle_record_is_journaled_before_it_goes_on(tmp_path):
    from shipper.lifecycle import LifecycleRecords, lifecycle_batch

    stats = Stats()
    first = LifecycleRecords(str(tmp_path), stats, 0.1)
    assert first.record(lifecycle_batch("termination_notice", "termination notice (spot): terminate",
                                        source="spot", action="terminate", at=""))
    first.journal.release()  # a crash before any output confirmed it
    again = LifecycleRecords(str(tmp_path), stats, 0.1)
    batch = next(b for b in again.journal.batches(threading.Event(), wait=0.01) if b is not None)
    assert batch.tag == "lifecycle" and batch.messages == ["termination notice (spot): terminate"]
    assert batch.fields == [{"event": "termination_notice", "source": "spot", "action": "terminate", "at": ""}]
    again.stop.set()
    assert not again.record(lifecycle_batch("agent_stopping", "late"))  # stopping: the caller hands it on
