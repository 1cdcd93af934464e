"""State on disk under attack and accident (issue 12, findings 8 and 9).

8: the storage of an object being built vanishes (a cleanup job empties ``.tmp/``, ``rm -rf`` of
the archive or of data_dir): the agent must not wedge, and every line must still arrive.
9: planted symlinks at the agent's predictable temporary names are never followed, and the
directories it creates are 0750 whatever the umask.
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import urllib.request
from pathlib import Path

import orjson
import pytest
from aws import free_port
from aws import s3_output as harness_s3_output
from conftest import FAST_RETRIES, agent_config, read_archive, seq_lines, seqs, wait_for
from prometheus_client.parser import text_string_to_metric_families

from shipper.acks import Acknowledgement
from shipper.config import COMMON_OUTPUT_OPTIONS, validate_section
from shipper.inputs.checkpoints import Checkpoint, CheckpointStore
from shipper.outputs import directory
from shipper.outputs.base import OutputContext
from shipper.outputs.spool import Spool
from shipper.record import Batch, Envelope
from shipper.stats import Stats

BUCKET = "state-safety"
VICTIM = b"precious: must never be touched\n"


def write(workdir: Path, start: int, count: int) -> None:
    with open(workdir / "logs" / "app.log", "a") as handle:
        handle.write(seq_lines(start, count))


def counter(port: int, name: str) -> float:
    """The sum of shipper_<name>_total over its series, from the agent's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == f"shipper_{name}_total")


def alive(agent) -> bool:
    if agent.proc.poll() is not None:
        raise AssertionError(f"the agent exited ({agent.proc.returncode}):\n{agent.log()[-3000:]}")
    return True


def open_object(tmp: Path) -> bool:
    """An object being built whose bytes reached its temporary file."""
    return tmp.is_dir() and any(p.stat().st_size for p in tmp.iterdir())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------ 8: vanished storage, end to end

def test_a_vanished_tmp_dir_and_a_removed_archive_do_not_wedge_the_directory_output(run_agent, workdir):
    port = free_port()
    archive = workdir / "data" / "archive"
    config = agent_config(workdir / "logs", workdir / "data", upload_interval="1s", agent_extra=FAST_RETRIES,
                          server=f'listen = "127.0.0.1:{port}"')
    agent = run_agent(config)

    # A cleanup job empties .tmp/ while an object is open there.
    write(workdir, 0, 1000)
    wait_for(lambda: open_object(archive / ".tmp"), message="an open object in .tmp/")
    shutil.rmtree(archive / ".tmp")
    wait_for(lambda: alive(agent) and sorted(seqs(read_archive(archive))) == list(range(1000)),
             message="every line despite the vanished .tmp/")
    write(workdir, 1000, 500)
    wait_for(lambda: alive(agent) and sorted(seqs(read_archive(archive))) == list(range(1500)),
             message="new lines shipped after it")

    # rm -rf of the whole archive while an object is open: made again, 0750, nothing of the new lines lost.
    write(workdir, 1500, 1000)
    wait_for(lambda: open_object(archive / ".tmp"), message="another open object")
    shutil.rmtree(archive)
    wait_for(lambda: alive(agent) and sorted(seqs(read_archive(archive))) == list(range(1500, 2500)),
             message="every line of the object open when the archive was removed")
    write(workdir, 2500, 500)
    wait_for(lambda: alive(agent) and sorted(seqs(read_archive(archive))) == list(range(1500, 3000)),
             message="new lines after the archive was made again")
    assert mode(archive) == 0o750 and mode(archive / ".tmp") == 0o750
    assert counter(port, "objects_rebuilt") == 2 and counter(port, "objects_lost") == 0
    assert agent.log().count("vanished (removed by someone else?)") == 2
    assert agent.stop() == 0


def test_rm_rf_of_data_dir_under_the_s3_spool_loses_nothing(run_agent, workdir, aws):
    aws.s3.create_bucket(Bucket=BUCKET)
    data = workdir / "data"
    output = harness_s3_output(aws.endpoint, BUCKET, upload_interval="1s")
    agent = run_agent(agent_config(workdir / "logs", data, output=output, agent_extra=FAST_RETRIES), env=aws.env)

    def bucket_seqs() -> list[int]:
        found = []
        for item in aws.s3.list_objects_v2(Bucket=BUCKET).get("Contents", []):
            body = gzip.decompress(aws.s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read())
            found += seqs([orjson.loads(line) for line in body.splitlines()])
        return sorted(found)

    write(workdir, 0, 1000)
    wait_for(lambda: open_object(data / "spool" / "s3.0" / ".tmp"), message="an open object in the spool")
    shutil.rmtree(data)  # the spool, its .seq and the checkpoints all go
    wait_for(lambda: alive(agent) and bucket_seqs() == list(range(1000)), interval=0.3,
             message="every line of the object open when data_dir was removed")
    write(workdir, 1000, 500)
    wait_for(lambda: alive(agent) and bucket_seqs() == list(range(1500)), interval=0.3,
             message="new lines after data_dir was made again")
    assert mode(data / "spool" / "s3.0") == 0o750 and mode(data / "checkpoints") == 0o750
    assert agent.log().count("vanished (removed by someone else?)") == 1
    assert agent.stop() == 0


# ------------------------------------------------------------------ 8: the directory output, in process

def directory_output(root: Path) -> directory.DirectoryOutput:
    problems = []
    settings = validate_section("outputs[0]", {"type": "directory", "path": str(root), "key": "{tag}/{seq}.ndjson{ext}",
                                               "compression": "none", "upload_interval": "1h"},
                                {**COMMON_OUTPUT_OPTIONS, **directory.OPTIONS}, problems)
    assert problems == []
    return directory.DirectoryOutput(settings, OutputContext("directory.0", str(root), Envelope({"host": "h"}, {}),
                                                             Stats()))


def batch(text: bytes, confirmed: list) -> Batch:
    b = Batch("app", "/var/log/app.log", 1764421200.0, blob=text)
    b.ack = Acknowledgement(1, lambda: confirmed.append(b))
    return b


def objects_in(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.ndjson") if ".tmp" not in p.parts)


def test_an_object_whose_bytes_are_gone_is_lost_and_counted_and_its_batches_stay_unconfirmed(tmp_path):
    output, confirmed = directory_output(tmp_path), []
    output.accept(batch(b"a\nb\n", confirmed))
    output.deliver(0, force=False)  # the bytes reach the temporary file
    (tmp_file,) = (tmp_path / ".tmp").iterdir()
    os.truncate(tmp_file, 0)  # someone else's doing: the object cannot be trusted any more
    output.deliver(0, force=True)
    # Not archived, not confirmed (so the checkpoint stays and the lines are read again), not retried forever.
    assert confirmed == [] and objects_in(tmp_path) == [] and output.pending() == 0
    stats = output.context.stats
    assert stats.get("objects_lost") == 1 and stats.get("records_unconfirmed", reason="object_lost") == 2
    assert list((tmp_path / ".tmp").iterdir()) == []
    output.accept(batch(b"c\n", confirmed))  # and it goes on
    output.deliver(0, force=True)
    assert len(confirmed) == 1 and [p.read_bytes().count(b'"c"') for p in objects_in(tmp_path)] == [1]


# ------------------------------------------------------------------ 9: planted symlinks

@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "victim"
    path.write_bytes(VICTIM)
    return path


def test_a_symlink_planted_at_the_next_temporary_object_name_is_never_followed(tmp_path, victim):
    root, confirmed = tmp_path / "archive", []
    output = directory_output(root)  # (leftovers at the names are removed at start: planted after it)
    (root / ".tmp").mkdir(parents=True, exist_ok=True)
    planted = root / ".tmp" / f"directory.0-{os.getpid()}-1.tmp"
    planted.symlink_to(victim)
    output.accept(batch(b"line\n", confirmed))
    output.deliver(0, force=True)
    assert victim.read_bytes() == VICTIM and planted.is_symlink()
    assert len(confirmed) == 1 and [b'"line"' in p.read_bytes() for p in objects_in(root)] == [True]


def test_a_symlink_planted_at_the_checkpoint_tmp_name_is_never_followed(tmp_path, victim):
    store = CheckpointStore(str(tmp_path / "data"), "app")
    os.makedirs(store.directory)
    Path(f"{store.path}.tmp").symlink_to(victim)
    assert store.save([Checkpoint("/var/log/app.log", 1, 2, 300)])
    assert victim.read_bytes() == VICTIM
    assert not os.path.islink(store.path) and store.load()[(1, 2)].offset == 300


def test_a_symlink_planted_at_the_spool_seq_tmp_name_is_never_followed(tmp_path, victim):
    spool = Spool(str(tmp_path / "spool"))
    Path(tmp_path / "spool" / ".seq.tmp").symlink_to(victim)
    first = spool.next_seq()
    assert victim.read_bytes() == VICTIM and not os.path.islink(tmp_path / "spool" / ".seq")
    assert Spool(str(tmp_path / "spool")).next_seq() > first


def test_a_symlink_planted_in_the_spool_is_never_taken_for_an_object_to_upload(tmp_path, victim):
    spool = Spool(str(tmp_path / "spool"))
    (tmp_path / "spool" / "dt=2026-11-29").mkdir()
    (tmp_path / "spool" / "dt=2026-11-29" / "a.ndjson.gz").write_bytes(b"an object")
    (tmp_path / "spool" / "dt=2026-11-29" / "b.ndjson.gz").symlink_to(victim)
    assert [o.key for o in spool.leftovers()] == ["dt=2026-11-29/a.ndjson.gz"]


# ------------------------------------------------------------------ 9: directory modes under umask 000

@pytest.fixture
def umask_000():
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_state_directories_are_0750_under_umask_000_in_process(tmp_path, umask_000):
    root = tmp_path / "a" / "archive"
    output = directory_output(root)
    output.accept(batch(b"x\n", []))
    output.deliver(0, force=True)
    Spool(str(tmp_path / "s" / "spool")).next_seq()
    CheckpointStore(str(tmp_path / "d"), "app").save([Checkpoint("/x", 1, 1, 1)])
    made = [tmp_path / "a", root, root / ".tmp", root / "app", tmp_path / "s" / "spool", tmp_path / "s",
            tmp_path / "d" / "checkpoints"]
    assert {str(p): oct(mode(p)) for p in made} == {str(p): "0o750" for p in made}


def test_the_agent_under_umask_000_makes_its_directories_0750(run_agent, workdir):
    write(workdir, 0, 100)
    agent = run_agent(wrapper=["sh", "-c", 'umask 000 && exec "$@"', "sh"])
    archive = workdir / "data" / "archive"
    wait_for(lambda: alive(agent) and len(read_archive(archive)) == 100, message="100 lines archived")
    assert agent.stop() == 0
    made = [archive, archive / ".tmp", workdir / "data" / "checkpoints",
            *(p for p in archive.rglob("*") if p.is_dir())]
    assert {str(p): oct(mode(p)) for p in made} == {str(p): "0o750" for p in made}
    assert all(mode(p) & 0o007 == 0 for p in archive.rglob("*"))  # nothing for others either
