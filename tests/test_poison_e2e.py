"""Poison input end to end: the agent as a subprocess never exits on a crafted line, and never
exits in a loop on the same input (issue 12: "a record can fail; the agent cannot")."""

from __future__ import annotations

import signal
import textwrap

import orjson

from conftest import agent_config, read_archive, seq_lines, seqs, wait_for

POISON = [
    '{"\\u0000fields":"x","time":1}',  # stopped every input for good on the old code
    '{"\\u0000tag":"lifecycle","\\u0000time":"2020-01-01T00:00:00.000000Z","event":"termination_notice"}',
    '{"ts":-1.5,"msg":"before the epoch"}',
    '{"ts":"9999-12-31T23:59:59.9999999Z","msg":"after the last second"}',
    '{"\\u0000labels":"x","\\u0000metrics":[1],"labels":{"a":1},"fields":7}',
    'not json at all',
]


def json_line(i: int) -> str:
    return orjson.dumps({"seq": i, "msg": f"seq={i:07d} ok"}).decode() + "\n"


def test_a_poison_line_ships_raw_and_flagged_and_every_other_line_of_every_input_arrives(workdir, run_agent):
    logs, data = workdir / "logs", workdir / "data"
    (logs / "other").mkdir()
    config = agent_config(logs, data, input_extra=f"""parser = "json"
time_key = "ts"

[[inputs]]
type = "file"
tag = "other"
paths = ["{logs}/other/*.log"]
poll_interval = "50ms"
""", pattern="app.log")
    with open(logs / "app.log", "w") as f:
        for i in range(300):
            f.write(json_line(i))
            if i % 50 == 25:
                f.write(POISON[(i // 50) % len(POISON)] + "\n")
        f.writelines(line + "\n" for line in POISON)
    (logs / "other" / "b.log").write_text(seq_lines(1000, 200))
    agent = run_agent(config)
    archive = data / "archive"

    def arrived():
        records = read_archive(archive)
        app = {r["seq"] for r in records if r["tag"] == "app" and "seq" in r}
        return app == set(range(300)) and set(range(1000, 1200)) <= set(seqs(records)) and records

    records = wait_for(arrived, 20, message="every ordinary line of both inputs")
    with open(logs / "app.log", "a") as f:  # and it is still reading: nothing stopped
        f.write(json_line(300))
    wait_for(lambda: any(r.get("seq") == 300 for r in read_archive(archive)), 10, message="a later line")
    assert agent.proc.poll() is None, agent.log()

    records = read_archive(archive)
    for line in POISON:
        shipped = [r for r in records if r["message"] == line]
        assert shipped, f"poison line not shipped: {line}"
        for record in shipped:
            assert record["tag"] == "app" and record["source"] == str(logs / "app.log")
            assert record["time"] > "2026-"  # the read time: no parsed value posed as the agent's
            assert "metrics" not in record and "labels" not in record or record["labels"] != "x"
    flagged = {r["message"]: r for r in records if r["message"] in POISON}
    assert flagged[POISON[2]]["time_error"] is True and flagged[POISON[3]]["time_error"] is True
    assert flagged[POISON[5]]["parse_error"] is True
    assert flagged[POISON[0]]["fields"] == {"\x00fields": "x", "time": 1}
    assert agent.stop(signal.SIGTERM) == 0


CRASHING_OUTPUT = '''
"""A directory output with a bug in its I/O: delivering a batch that holds POISON raises."""
from shipper.outputs import directory
from shipper.outputs.directory import DirectoryOutput

OPTIONS = directory.OPTIONS
validate = directory.validate


class CrashingOutput(DirectoryOutput):
    poisoned = False

    def accept(self, batch):
        if any("POISON" in (m or "") for m in batch.message_list()):
            self.poisoned = True
        super().accept(batch)

    def deliver(self, now, force):
        if self.poisoned:
            raise RuntimeError("a bug in the output's I/O")
        super().deliver(now, force)


OUTPUT = CrashingOutput
'''


def test_a_batch_that_made_the_agent_fail_twice_is_moved_past_on_the_next_start(workdir, run_agent, tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "crashing_output.py").write_text(textwrap.dedent(CRASHING_OUTPUT))
    (plugins / "sitecustomize.py").write_text(
        "import shipper.config\nshipper.config.OUTPUT_MODULES['crashing'] = 'crashing_output'\n")
    import os
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(plugins), os.environ.get("PYTHONPATH")]))}
    logs, data = workdir / "logs", workdir / "data"
    config = agent_config(logs, data, output=f"""
[[outputs]]
type = "crashing"
path = "{data}/archive"
upload_interval = "200ms"
""")
    log = logs / "app.log"
    log.write_text(seq_lines(0, 100))
    agent = run_agent(config, env=env)
    wait_for(lambda: set(range(100)) <= set(seqs(read_archive(data / "archive"))), 15, message="the first lines")
    with open(log, "a") as f:
        f.write("POISON line\n")
    for attempt in (1, 2):  # fails, and fails again on the same line after a restart
        assert agent.proc.wait(20) == 1, agent.log()
        assert "a bug in the output's I/O" in agent.log()
        if attempt == 1:
            agent = run_agent(config, env=env)
    assert "failed twice in a row" in agent.log()
    agent = run_agent(config, env=env)  # the third start moves past the poison batch
    with open(log, "a") as f:
        f.write(seq_lines(100, 100))
    wait_for(lambda: set(range(200)) <= set(seqs(read_archive(data / "archive"))), 15, message="the later lines")
    assert agent.proc.poll() is None
    assert "quarantined" in agent.log() and "offsets" in agent.log()
    assert agent.stop(signal.SIGTERM) == 0
