"""The S3 output's disk spool: object numbers unique across runs, leftovers found in order."""

from __future__ import annotations

import os

from shipper.outputs.spool import SEQ_BLOCK, Spool


def test_object_numbers_never_repeat_across_restarts(tmp_path):
    first = Spool(str(tmp_path))
    numbers = [first.next_seq() for _ in range(5)]
    assert numbers == [1, 2, 3, 4, 5]
    second = Spool(str(tmp_path))  # a restart (or a kill -9: .seq was written before 1 was used)
    assert second.next_seq() == 1 + SEQ_BLOCK
    many = [second.next_seq() for _ in range(SEQ_BLOCK + 5)]
    assert len(set(many)) == len(many) and Spool(str(tmp_path)).next_seq() > many[-1]


def test_a_damaged_seq_file_restarts_numbering_instead_of_failing(tmp_path, caplog):
    (tmp_path / ".seq").write_text("garbage")
    assert Spool(str(tmp_path)).next_seq() == 1
    assert "damaged" in caplog.text


def test_leftovers_are_finished_objects_oldest_first_and_removal_prunes_empty_dirs(tmp_path):
    spool = Spool(str(tmp_path))
    spool.next_seq()
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "s3.0-1-1.tmp").write_bytes(b"being built")
    newer = tmp_path / "p" / "dt=2026-11-29" / "b.ndjson.gz"
    older = tmp_path / "p" / "dt=2026-11-28" / "a.ndjson.gz"
    for path, mtime in ((newer, 2_000_000_000), (older, 1_000_000_000)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x" * 10)
        os.utime(path, (mtime, mtime))
    found = spool.leftovers()
    assert [o.key for o in found] == ["p/dt=2026-11-28/a.ndjson.gz", "p/dt=2026-11-29/b.ndjson.gz"]
    assert all(o.size == 10 for o in found)
    spool.remove(found[0])
    assert not older.parent.exists() and newer.exists() and (tmp_path / ".tmp").exists()
