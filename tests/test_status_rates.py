"""`shipper status` rates: the agent keeps copies of its counters every 10 s and /status gives each
input's and output's records per second over the last minute (since the start while younger), so an
input that samples every 10 s shows its 0.1/s, not the 0/s or 1/s of a one-second difference.
The window logic as pure functions, the server's own thread, then a real agent and the real CLI."""

from __future__ import annotations

import subprocess
import sys
import time

import orjson

from aws import free_port
from conftest import agent_config, http_get, read_archive, wait_for
from shipper.server import AgentState, Baseline, CounterHistory, InputState, OutputState, Server, per_second, \
    status_document
from shipper.stats import Stats
from shipper.status import per_second as shown_rate, render_status


def key(name: str, **labels: str):
    return name, tuple(sorted(labels.items()))


# ---------------------------------------------------------------- the window (pure)

def test_a_ten_second_sampler_shows_a_steady_rate_over_the_last_minute_from_a_bounded_ring():
    history = CounterHistory(0.0, {}, window=60.0, every=10.0)
    samples = 0
    rates = []
    for tick in range(1, 1001):  # a second at a time for 1000 s; a sample every 10 s
        now = float(tick)
        if tick % 10 == 0:
            samples += 1
        counters = {key("records_in", input="metrics"): float(samples)}
        if history.due(now):
            history.add(now, counters)
        baseline = history.baseline(now)
        rates.append((now, baseline, per_second(counters, baseline, "records_in", input="metrics")))
        assert len(history.snapshots) <= 8  # 60 s of copies 10 s apart, and the one measured from
    young = [(now, b, r) for now, b, r in rates if now < 70]  # the window reaches back to the start
    assert all(b.since_start and b.seconds == now for now, b, r in young)
    assert rates[24][2] == round(2 / 25, 6)  # at 25 s: 2 samples since the start
    mature = [(b, r) for now, b, r in rates if now >= 70]
    assert all(not b.since_start and 60 <= b.seconds < 70 for b, r in mature)
    # Never the 0/s or 1/s of one second: 6 or 7 samples over 60..70 s.
    assert min(r for b, r in mature) >= 6 / 70 and max(r for b, r in mature) <= 7 / 60
    assert rates[119][2] == 0.1  # asked on a copy: exactly 6 samples in 60 s


def test_after_a_stall_the_rate_covers_the_real_time_and_copies_do_not_burst():
    history = CounterHistory(0.0, {}, window=60.0, every=10.0)
    for now in range(10, 101, 10):
        history.add(float(now), {key("records_out", output="s3.0"): float(now)})  # 1 record a second
    # The thread was held for 300 s: the next copy comes 10 s after it woke, and the window says 300+ s.
    assert history.due(400.0)
    history.add(400.0, {key("records_out", output="s3.0"): 400.0})
    assert history.next_at == 410.0
    baseline = history.baseline(400.0)
    assert baseline.seconds == 300.0 and not baseline.since_start  # from the last copy before the stall
    assert per_second({key("records_out", output="s3.0"): 400.0}, baseline, "records_out", output="s3.0") == 1.0


def test_rates_sum_the_series_of_their_labels_and_never_go_negative_or_divide_by_nothing():
    then = {key("records_in", input="app"): 100.0, key("records_out", output="s3.0"): 50.0}
    now = {key("records_in", input="app"): 160.0, key("records_in", input="web"): 30.0,
           key("records_out", output="s3.0"): 40.0}
    baseline = Baseline(60.0, then, False)
    assert per_second(now, baseline, "records_in", input="app") == 1.0
    assert per_second(now, baseline, "records_in") == 1.5  # every input
    assert per_second(now, baseline, "records_out", output="s3.0") == 0.0  # went down: still, not negative
    assert per_second(now, Baseline(0.0, then, True), "records_in") == 0.0


def state(counters: dict, lag: dict | None = None) -> AgentState:
    output = OutputState("s3.0", 0, 0, None, None, None, 60.0)
    return AgentState(time.time() - 7200, {"host": "web-1"}, {}, counters, [output],
                      [InputState("app", "file", lag or {}), InputState("metrics", "metrics")], 300.0)


def test_the_status_document_carries_per_input_and_output_rates_and_their_window():
    counters = {key("records_in", input="app"): 4200.0, key("records_in", input="metrics"): 727.0,
                key("records_out", output="s3.0"): 4900.0}
    then = {key("records_in", input="app"): 1800.0, key("records_in", input="metrics"): 720.0,
            key("records_out", output="s3.0"): 2500.0}
    document = orjson.loads(orjson.dumps(status_document(state(counters), Baseline(70.0, then, False))))
    assert document["rates"] == {"window_seconds": 70.0, "since_start": False}
    assert [(i["name"], i["records_per_second"]) for i in document["inputs"]] == [("app", round(2400 / 70, 6)),
                                                                                ("metrics", 0.1)]
    assert document["outputs"][0]["records_per_second"] == round(2400 / 70, 6)
    assert status_document(state(counters))["rates"] is None  # no baseline: no rates claimed


def test_the_table_shows_the_agents_rates_with_their_window_and_says_1_file():
    counters = {key("records_in", input="app"): 60.0, key("records_in", input="metrics"): 6.0,
                key("records_out", output="s3.0"): 66.0}
    document = status_document(state(counters, {"/var/log/app/web.log": 0}), Baseline(60.0, {}, False))
    lines = render_status(orjson.loads(orjson.dumps(document))).splitlines()
    assert lines[0] == "shipper 0.1.0 on web-1: healthy, up 2.0h; rates over the last 60s"
    assert lines[2:5] == ["INPUT    TYPE     RECORDS  TOTAL  FILES",
                          "app      file     1.0/s    60     1 file, lag 0 B",
                          "metrics  metrics  0.1/s    6"]
    assert lines[6:8] == ["OUTPUT  HEALTH  RECORDS  TOTAL  DROPPED  RETRIES  BUFFER  OLDEST UNSENT",
                          "s3.0    ok      1.1/s    66     0        0        0 B     -"]
    two = state(counters, {"/a.log": 10, "/b.log": 2048})
    young = render_status(orjson.loads(orjson.dumps(status_document(two, Baseline(23.0, {}, True)))))
    assert "; rates over the 23s since the start" in young and "2 files, lag 2.0 KiB" in young
    # --interval: measured between two documents, as before.
    earlier = orjson.loads(orjson.dumps(status_document(state({key("records_in", input="app"): 40.0}))))
    later = orjson.loads(orjson.dumps(status_document(state(counters))))
    between = render_status(later, earlier, 2.0)
    assert between.splitlines()[0].endswith("; rates over 2s") and "app      file     10/s" in between
    assert "rates unknown (this agent keeps none" in render_status(later)  # an agent of before: no invented rate
    assert [shown_rate(v) for v in (0.0, 0.1, 0.107, 1 / 60, 0.0001, 4.25, 41.4, 4100.0, None)] == \
        ["0/s", "0.1/s", "0.11/s", "0.017/s", "<0.001/s", "4.2/s", "41/s", "4100/s", "-"]


# ---------------------------------------------------------------- the server's thread

def test_the_server_thread_copies_the_counters_on_its_own_and_keeps_only_the_window():
    stats = Stats()
    server = Server("127.0.0.1:0", lambda: state(stats.snapshot()), stats, rate_window=0.3, snapshot_every=0.1)
    stats.add("records_in", 5, input="app")
    server.start()
    url = f"http://{server.address}/status"
    try:
        first = orjson.loads(http_get(url)[1])
        assert first["rates"]["since_start"] and first["inputs"][0]["records_per_second"] > 0
        # Once the window has moved past the 5 records, nothing came in over it: 0/s.
        later = wait_for(lambda: (d := orjson.loads(http_get(url)[1]))["inputs"][0]["records_per_second"] == 0
                         and d, timeout=10, message="the window moved past the records")
        assert not later["rates"]["since_start"] and later["rates"]["window_seconds"] >= 0.3
        assert len(server.history.snapshots) <= 0.3 / 0.1 + 2
    finally:
        server.stop()


# ---------------------------------------------------------------- a real agent, the real CLI

def test_a_file_written_slowly_shows_a_non_zero_rate_and_1_file(workdir, run_agent):
    port = free_port()
    agent = run_agent(agent_config(workdir / "logs", workdir / "data", server=f'listen = "127.0.0.1:{port}"'))
    url = f"http://127.0.0.1:{port}"

    def serving() -> bool:
        try:
            return http_get(f"{url}/healthz")[0] == 200
        except OSError:  # not listening yet
            return False

    wait_for(serving, message="the server")  # then the line: read after the server's first copy
    (workdir / "logs" / "app.log").write_text("one line, then nothing for a while\n")
    wait_for(lambda: len(read_archive(workdir / "data" / "archive")) == 1, message="the line archived")
    document = wait_for(lambda: (d := orjson.loads(http_get(f"{url}/status")[1]))["outputs"][0]["records_per_second"]
                        and d, message="the output's rate")
    app = document["inputs"][0]
    assert document["rates"]["since_start"]
    assert round(app["records_per_second"] * document["rates"]["window_seconds"]) == 1  # the one line
    status = subprocess.run([sys.executable, "-m", "shipper", "status", "--url", url],
                            capture_output=True, text=True, timeout=30)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert "; rates over the " in lines[0] and lines[0].endswith(" since the start")
    app_row = next(line for line in lines if line.startswith("app "))
    rate = app_row.split()[2]
    assert rate.endswith("/s") and float(rate.removesuffix("/s").lstrip("<")) > 0, app_row
    assert app_row.endswith("1 file, lag 0 B"), app_row
    out_row = next(line.split() for line in lines if line.startswith("directory.0"))
    assert out_row[2] != "0/s" and out_row[3] == "1"
    assert agent.stop() == 0
