"""The filter stage in the pipeline: chains per tag, one on_done per read, failures contained, flush;
and end to end with the agent as a subprocess: checkpoints move past dropped lines, /metrics counts
them, a rewritten tag reaches the output that matches it."""

import logging
import threading
from pathlib import Path

import pytest
from aws import free_port
from conftest import agent_config, checkpoint_offset, read_archive, seq_lines, seqs, wait_for
from prometheus_client.parser import text_string_to_metric_families

from shipper.config import load_text
from shipper.filters import Filter, FilterContext
from shipper.pipeline import Pipeline
from shipper.record import Batch


def config_text(tmp: Path, filters: str, outputs: str | None = None) -> str:
    outputs = outputs or f"""
[[outputs]]
type = "directory"
path = "{tmp}/archive"
upload_interval = "100ms"
"""
    return f"""
[agent]
data_dir = "{tmp}/data"
flush_interval = "50ms"
shutdown_timeout = "10s"
[cloud]
metadata = "off"
[server]
listen = ""
[[inputs]]
type = "file"
tag = "app"
paths = ["{tmp}/logs/*.log"]
{filters}
{outputs}"""


class Done:
    """An on_done that records how often it fired (it must fire exactly once per read)."""

    def __init__(self):
        self.calls = 0
        self.event = threading.Event()

    def __call__(self):
        self.calls += 1
        self.event.set()


def read(lines, tag="app", done=None):
    batch = Batch(tag, "/var/log/app.log", 0.0, blob="".join(f"{line}\n" for line in lines).encode(), start=0, end=9)
    batch.on_done = done
    return batch


@pytest.fixture
def pipeline_for(tmp_path):
    made = []

    def make(filters: str, outputs: str | None = None, extra=()):
        (tmp_path / "logs").mkdir(exist_ok=True)
        pipeline = Pipeline(load_text(config_text(tmp_path, filters, outputs), "test.toml"), identity={})
        for filt in extra:
            pipeline.filters.append((filt, ["*"]))
        made.append(pipeline)
        return pipeline

    yield make
    for pipeline in made:
        pipeline.stop()


def test_no_filter_for_a_tag_is_one_dict_lookup(pipeline_for, tmp_path):
    pipeline = pipeline_for('[[filters]]\ntype = "grep"\nmatch = ["other"]\nrules = [{ exclude = "x" }]')
    pipeline.start()
    done = Done()
    pipeline.emit(read(["x1", "y"], done=done))
    assert pipeline._chains == {"app": ()}
    assert pipeline.stop() and done.calls == 1
    assert [r["message"] for r in read_archive(tmp_path / "archive")] == ["x1", "y"]  # not filtered


def test_everything_dropped_is_confirmed_at_once_and_counted(pipeline_for, tmp_path):
    pipeline = pipeline_for('[[filters]]\ntype = "grep"\nrules = [{ exclude = "health" }]')
    pipeline.start()
    done = Done()
    pipeline.emit(read(["GET /health", "GET /healthz"], done=done))
    assert done.calls == 1  # nothing to wait for: the checkpoint may move past these lines now
    assert pipeline.stats.get("records_dropped", reason="filtered", filter="grep.0", input="app") == 2
    empty = Done()
    pipeline.emit(read([], done=empty))  # a read of zero records is confirmed too
    assert empty.calls == 1
    assert pipeline.stop()
    assert read_archive(tmp_path / "archive") == []


def test_a_split_read_is_done_once_after_both_outputs_confirmed_each_part(pipeline_for, tmp_path):
    outputs = f"""
[[outputs]]
type = "directory"
match = ["*"]
path = "{tmp_path}/all"
upload_interval = "100ms"
[[outputs]]
type = "directory"
match = ["app.errors"]
path = "{tmp_path}/errors"
upload_interval = "100ms"
"""
    filters = """
[[filters]]
type = "modify"
tag_regex = '\\bERROR\\b'
tag = "app.errors"
[[filters]]
type = "grep"
match = ["app.errors"]
rules = [{ exclude = "ignorable" }]
"""
    pipeline = pipeline_for(filters, outputs)
    pipeline.start()
    done = Done()
    pipeline.emit(read(["ok 1", "ERROR db", "ok 2", "ERROR ignorable"], done=done))
    assert done.event.wait(10)
    assert pipeline.stop() and done.calls == 1
    every = read_archive(tmp_path / "all")
    assert sorted((r["tag"], r["message"]) for r in every) == [("app", "ok 1"), ("app", "ok 2"),
                                                               ("app.errors", "ERROR db")]
    assert [(r["tag"], r["message"]) for r in read_archive(tmp_path / "errors")] == [("app.errors", "ERROR db")]
    # the grep matched only the re-tagged records, by their new tag
    assert pipeline.stats.get("records_dropped", filter="grep.1", input="app.errors") == 1


class Raising(Filter):
    def __init__(self, name, stats):
        super().__init__(None, FilterContext(name, stats))
        self.calls = 0

    def apply(self, batch):
        self.calls += 1
        batch.blob = b"half changed\n"  # what a filter did before it failed must not matter ...
        raise RuntimeError("a bug in a filter")


def test_a_filter_that_raises_ships_the_batch_unfiltered_and_logs_once(pipeline_for, tmp_path, caplog):
    pipeline = pipeline_for("")
    broken = Raising("grep.0", pipeline.stats)
    pipeline.filters.append((broken, ["*"]))
    pipeline.start()
    first, second = Done(), Done()
    with caplog.at_level(logging.ERROR, logger="shipper.pipeline"):
        pipeline.emit(read(["a"], done=first))
        pipeline.emit(read(["b"], done=second))
    assert pipeline.stop() and (first.calls, second.calls) == (1, 1)
    assert broken.calls == 2
    assert pipeline.stats.get("filter_errors", filter="grep.0") == 2
    assert [r.getMessage().split(":")[0] for r in caplog.records].count("grep.0") == 1
    # ... unfiltered is as the filter got it, in place changes included: that is all the pipeline has
    assert [r["message"] for r in read_archive(tmp_path / "archive")] == ["half changed", "half changed"]


def test_a_redact_that_raises_drops_the_records_never_ships_them(pipeline_for, tmp_path):
    pipeline = pipeline_for("")
    broken = Raising("redact.0", pipeline.stats)
    broken.apply = lambda batch: (_ for _ in ()).throw(RuntimeError("bug"))  # raises before touching it
    pipeline.filters.append((broken, ["*"]))
    pipeline.start()
    done = Done()
    pipeline.emit(read(["password=hunter2", "token=abc"], done=done))
    assert done.calls == 1  # dropped on purpose: the checkpoint moves past it
    assert pipeline.stop()
    assert read_archive(tmp_path / "archive") == []
    assert pipeline.stats.get("records_dropped", reason="filter_error", filter="redact.0", input="app") == 2


class Summaries(Filter):
    """Emits one record of its own at each flush; the final one at stop."""

    def __init__(self, stats):
        super().__init__(None, FilterContext("throttle.9", stats))
        self.finals = 0

    def flush(self, now, final):
        if final:
            self.finals += 1
            return [Batch("app", None, now, messages=["final summary"])]
        return []


def test_flush_at_stop_is_routed_through_the_filters_after_it(pipeline_for, tmp_path):
    pipeline = pipeline_for("")
    summaries = Summaries(pipeline.stats)
    pipeline.filters.append((summaries, ["*"]))
    later = Raising("grep.1", pipeline.stats)  # after it: must see the summary (and fails: shipped as is)
    later.apply = lambda batch: [batch] if batch.message_list() != ["final summary"] else \
        [Batch("app", None, 0.0, messages=["seen by the next filter"])]
    pipeline.filters.append((later, ["*"]))
    pipeline.start()
    assert pipeline._flusher is not None  # a filter with flush gets the flush thread
    assert pipeline.stop()
    assert summaries.finals == 1
    assert [r["message"] for r in read_archive(tmp_path / "archive")] == ["seen by the next filter"]


def test_without_a_flushing_filter_there_is_no_flush_thread(pipeline_for):
    pipeline = pipeline_for('[[filters]]\ntype = "grep"\nrules = [{ exclude = "x" }]')
    pipeline.start()
    assert pipeline._flusher is None


# ---------------------------------------------------------------- the agent as a subprocess

def metrics(port: int) -> dict:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.timeout(60)
def test_dropped_lines_move_the_checkpoint_and_show_in_metrics(workdir, run_agent):
    logs, data = workdir / "logs", workdir / "data"
    lines = "".join(f"GET /healthz 200 {i}\n" if i % 3 == 0 else f"seq={i:07d} work\n" for i in range(300))
    (logs / "app.log").write_text(lines)
    port = free_port()
    config = agent_config(logs, data, server=f'listen = "127.0.0.1:{port}"') + """
[[filters]]
type = "grep"
match = ["app"]
rules = [{ exclude = '^GET /healthz ' }]
"""
    agent = run_agent(config)
    wait_for(lambda: checkpoint_offset(workdir) == len(lines), message="checkpoint at the end of app.log")
    key = ("shipper_records_dropped_total", (("filter", "grep.0"), ("input", "app"), ("reason", "filtered")))
    assert wait_for(lambda: metrics(port).get(key) == 100, message="records_dropped in /metrics")
    # the last line is a health check: the checkpoint reached the end through a dropped line
    (logs / "app.log").open("a").write("GET /healthz 200 last\n")
    wait_for(lambda: checkpoint_offset(workdir) == len(lines) + len("GET /healthz 200 last\n"),
             message="checkpoint past a read that was all dropped")
    assert agent.stop() == 0
    assert seqs(read_archive(data / "archive")) == [i for i in range(300) if i % 3]


@pytest.mark.timeout(60)
def test_a_rewritten_tag_routes_to_the_matching_output(workdir, run_agent):
    logs, data = workdir / "logs", workdir / "data"
    output = f"""
[[outputs]]
type = "directory"
match = ["*"]
path = "{data}/everything"
upload_interval = "200ms"

[[outputs]]
type = "directory"
match = ["app.errors"]
path = "{data}/errors"
upload_interval = "200ms"

[[filters]]
type = "modify"
match = ["app"]
tag_regex = '\\b(ERROR|FATAL)\\b'
tag = "app.errors"
"""
    text = seq_lines(0, 50) + "ERROR payment failed\n" + seq_lines(50, 50) + "FATAL out of memory\n"
    (logs / "app.log").write_text(text)
    agent = run_agent(agent_config(logs, data, output=output))
    wait_for(lambda: checkpoint_offset(workdir) == len(text), message="checkpoint at the end")
    assert agent.stop() == 0
    errors = read_archive(data / "errors")
    assert [(r["tag"], r["message"]) for r in errors] == [("app.errors", "ERROR payment failed"),
                                                          ("app.errors", "FATAL out of memory")]
    everything = read_archive(data / "everything")
    assert sorted(seqs(everything)) == list(range(100)) and {r["tag"] for r in everything} == {"app", "app.errors"}
    assert len(everything) == 102


def test_a_filter_runs_under_the_input_heartbeat_only_the_wait_for_the_outputs_is_paused(pipeline_for):
    """A regex that hangs in a filter is the input being stuck (the watchdog and /healthz must see it);
    waiting for room in the outputs is not."""
    import time

    from shipper import heartbeat

    beat = heartbeat.Heartbeat()
    beat.beat(0.0)
    seen = []

    class Probe(Filter):
        def __init__(self):
            self.context = FilterContext("probe.9", None, None, threading.Event())

        def apply(self, batch):
            seen.append(beat.late_by(time.monotonic() + 100))
            return [batch]

    class Source:  # an input as the pipeline runs it: run(emit, stop) in its own thread, with a heartbeat
        heartbeat = beat
        tag = "app"

        def run(self, emit, stop):
            emit(read(["one"], done=Done()))
            with heartbeat.waiting():
                seen.append(beat.late_by(time.monotonic() + 100))

    pipeline = pipeline_for('[[filters]]\ntype = "grep"\nrules = [{ exclude = "never" }]', extra=[Probe()])
    pipeline.start()
    thread = threading.Thread(target=pipeline._run_input, args=(Source(),))
    thread.start()
    thread.join(10)
    assert len(seen) == 2
    assert seen[0] > 99  # not paused while the filter ran: a hanging regex makes the input late
    assert seen[1] == 0.0  # a wait on purpose is not
