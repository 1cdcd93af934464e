import gzip

import orjson

from shipper.acks import Acknowledgement
from shipper.config import COMMON_OUTPUT_OPTIONS, validate_section
from shipper.outputs import directory
from shipper.outputs.base import OutputContext
from shipper.outputs.keys import DEFAULT_KEY, key_values, render_key
from shipper.record import Batch, Envelope
from shipper.stats import Stats


def make_output(path, **options):
    problems = []
    settings = validate_section("outputs[0]", {"type": "directory", "path": str(path), **options},
                                {**COMMON_OUTPUT_OPTIONS, **directory.OPTIONS}, problems)
    assert problems == []
    context = OutputContext("directory.0", str(path), Envelope({"host": "web-1"}, {"app": "web"}), Stats())
    return directory.DirectoryOutput(settings, context)


def batch(text: bytes, at: float, confirmed: list):
    b = Batch("app", "/var/log/app.log", at, blob=text)
    b.ack = Acknowledgement(1, lambda: confirmed.append(b))
    return b


def test_key_layout():
    values = key_values(1764422238.5, "app", {"host": "web-1"}, 7, "gzip")
    assert render_key(DEFAULT_KEY, values, {}) == \
        "dt=2025-11-29/hour=13/instance=web-1/app/20251129T131718Z-000007.ndjson.gz"
    values = key_values(0, "a/b c", {"host": "h", "instance_id": "i-1"}, 1, "none", prefix="/logs//x/")
    assert render_key("{prefix}/{labels.team}/{instance_id}/{tag}-{seq}", values, {"team": "x/y"}) == \
        "logs/x/x_y/i-1/a_b_c-000001"


def test_objects_are_confirmed_only_once_on_disk_and_split_by_hour(tmp_path):
    output = make_output(tmp_path, upload_interval="1h")
    confirmed = []
    hour = 1764421200.0  # 13:00:00 UTC
    output.accept(batch(b"a\nb\n", hour + 10, confirmed))
    output.accept(batch(b"c\n", hour + 3600 + 5, confirmed))  # the next hour: another object
    output.deliver(0, force=False)
    assert confirmed == [] and list(tmp_path.rglob("*.gz")) == []
    assert len(list((tmp_path / ".tmp").iterdir())) == 2
    output.deliver(0, force=True)
    assert len(confirmed) == 2 and output.pending() == 0
    objects = sorted(tmp_path.rglob("*.gz"))
    assert [o.parent.parent.parent.parent.name for o in objects] == ["dt=2025-11-29", "dt=2025-11-29"]
    assert [o.parent.parent.parent.name for o in objects] == ["hour=13", "hour=14"]
    lines = [orjson.loads(line) for line in gzip.decompress(objects[0].read_bytes()).splitlines()]
    assert [r["message"] for r in lines] == ["a", "b"] and lines[0]["labels"] == {"app": "web"}
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_an_existing_object_is_never_replaced(tmp_path):
    first = make_output(tmp_path)
    confirmed = []
    first.accept(batch(b"one\n", 1764421200.0, confirmed))
    first.deliver(0, force=True)
    second = make_output(tmp_path)  # a restarted agent counts seq from 0 again
    second.accept(batch(b"two\n", 1764421200.0, confirmed))
    second.deliver(0, force=True)
    contents = sorted(gzip.decompress(p.read_bytes()) for p in tmp_path.rglob("*.gz"))
    assert len(contents) == 2 and b'"one"' in contents[0] + contents[1] and b'"two"' in contents[0] + contents[1]


def test_unfinished_objects_of_an_earlier_run_are_removed(tmp_path):
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "directory.0-123-1.tmp").write_bytes(b"half an object")
    (tmp_path / ".tmp" / "directory.1-123-1.tmp").write_bytes(b"another output's")
    make_output(tmp_path)
    assert [p.name for p in (tmp_path / ".tmp").iterdir()] == ["directory.1-123-1.tmp"]


def test_size_limit_closes_an_object(tmp_path):
    output = make_output(tmp_path, upload_interval="1h", max_object_bytes="1KiB", compression="none")
    confirmed = []
    for i in range(3):
        output.accept(batch(b"x" * 600 + b"\n", 1764421200.0 + i, confirmed))
        output.deliver(0, force=False)
    assert len(list(tmp_path.rglob("*.ndjson"))) == 1 and len(confirmed) == 2


def test_an_object_is_due_upload_interval_after_its_oldest_record_was_read(tmp_path):
    """Not after the record reached the output: the wait for the flush tick is part of the interval."""
    import time

    output = make_output(tmp_path, upload_interval="10s")
    confirmed = []
    assert output.next_due() is None
    before = time.monotonic()
    output.accept(batch(b"waited\n", time.time() - 4, confirmed))  # read 4 s ago
    due = output.next_due()
    assert before + 5.5 < due < time.monotonic() + 6.5
    output.accept(batch(b"newer\n", time.time(), confirmed))  # a later record does not postpone it
    assert output.next_due() == due
    output.deliver(0, force=False)
    assert confirmed == []


def test_a_clock_that_jumped_credits_a_record_a_few_seconds_at_most(tmp_path):
    import time

    from shipper.outputs.objects import WAIT_CREDIT

    output = make_output(tmp_path, upload_interval="1h")
    output.accept(batch(b"old\n", time.time() - 86400, []))  # a day ago by the wall clock
    assert output.next_due() > time.monotonic() + 3600 - WAIT_CREDIT - 1
