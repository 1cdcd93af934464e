"""The journal of the network inputs: durable before it is read, read back with checkpoints, bounded,
segments removed once confirmed, torn and corrupt frames counted (issue 20)."""

from __future__ import annotations

import os
import resource
import threading
import time

import pytest

from shipper.inputs import journal as journal_module
from shipper.inputs.journal import (
    HEADER, FrameTooLarge, Journal, JournalBusy, JournalCorrupt, JournalFull, decode_frames, encode_frame,
    segment_name,
)
from shipper.stats import Stats


def rows(n: int, start: int = 0) -> tuple[list, list]:
    return [f"event {i}" for i in range(start, start + n)], [{"n": i} for i in range(start, start + n)]


def append(journal: Journal, n: int, start: int = 0, tag: str = "t") -> int:
    messages, fields = rows(n, start)
    seq = journal.append(encode_frame(tag, 1.5, "test", messages, fields))
    journal.sync(seq)
    return seq


def drain(journal: Journal, confirm: bool = True) -> list:
    """Every batch readable now (batches() yields None once caught up)."""
    stop = threading.Event()
    out = []
    for batch in journal.batches(stop, wait=0.01):
        if batch is None:
            break
        out.append(batch)
        if confirm:
            batch.on_done()
    return out


def test_frames_round_trip_and_a_partial_frame_waits():
    frame = encode_frame("app", 2.0, "forward", ["a", None], [{"x": 1}, {"\x00time": "t"}])
    frames, used = decode_frames(frame + frame[:7], 100)
    assert used == len(frame)
    assert frames == [(100, 100 + len(frame), ["app", 2.0, "forward", ["a", None], [{"x": 1}, {"\x00time": "t"}]])]
    broken = bytearray(frame)
    broken[-1] ^= 0xFF
    with pytest.raises(JournalCorrupt):
        decode_frames(bytes(broken), 0)
    with pytest.raises(JournalCorrupt):
        decode_frames(b"XX" + frame[2:], 0)


def test_only_durable_frames_are_read_and_a_restart_reads_the_unconfirmed_again(tmp_path):
    stats = Stats()
    journal = Journal(str(tmp_path), 1024**3, stats, "t")
    journal.append(encode_frame("t", 1.0, None, *rows(3)))
    assert drain(journal) == []  # written, not fsynced: not to be handed on yet
    append(journal, 2, 3)
    batches = drain(journal, confirm=False)
    assert [b.messages for b in batches] == [rows(3)[0], rows(2, 3)[0]]
    assert batches[0].fields[0] == {"n": 0} and batches[0].tag == "t" and batches[0].read_time == 1.0
    batches[0].on_done()
    journal.save_checkpoint()
    journal.release()

    again = Journal(str(tmp_path), 1024**3, stats, "t")
    assert [b.messages for b in drain(again)] == [rows(2, 3)[0]]  # the confirmed one is not read again
    again.save_checkpoint()
    again.release()
    third = Journal(str(tmp_path), 1024**3, stats, "t")
    assert drain(third) == []


def test_segments_are_removed_once_confirmed_and_the_bound_holds(tmp_path):
    stats = Stats()
    journal = Journal(str(tmp_path), 2 * 1024**2, stats, "t", segment_bytes=64 * 1024)
    frame_size = len(encode_frame("t", 1.5, "test", *rows(100, 100_000)))
    appended = 0
    with pytest.raises(JournalFull):
        while True:
            append(journal, 100, appended)
            appended += 100
            on_disk = sum(e.stat().st_size for e in os.scandir(tmp_path) if e.name.endswith(".seg"))
            assert on_disk <= 2 * 1024**2
    assert journal.total_bytes > 2 * 1024**2 - 2 * frame_size  # it took what the bound allows
    assert not journal.wait_for_room(frame_size, 0.05)
    read = drain(journal)
    assert sum(b.count for b in read) == appended
    assert journal.wait_for_room(frame_size, 0.05)
    segments = [e.name for e in os.scandir(tmp_path) if e.name.endswith(".seg")]
    assert len(segments) <= 2, segments  # the confirmed sealed ones are gone
    append(journal, 100, appended)  # room again
    assert sum(b.count for b in drain(journal)) == 100


def test_a_torn_last_frame_and_a_corrupt_one_are_counted_and_skipped(tmp_path):
    stats = Stats()
    journal = Journal(str(tmp_path), 1024**3, stats, "t")
    append(journal, 2)
    append(journal, 2, 2)
    journal.release()
    path = tmp_path / segment_name(1)
    data = path.read_bytes()
    path.write_bytes(data[:-5])  # the crash came mid-write of the second frame

    again = Journal(str(tmp_path), 1024**3, stats, "t")
    assert [b.messages for b in drain(again)] == [rows(2)[0]]
    assert stats.get("journal_errors", reason="torn") == 1
    append(again, 1, 10)
    again.release()
    segment = tmp_path / segment_name(2)
    damaged = bytearray(segment.read_bytes())
    damaged[HEADER.size + 3] ^= 0x55
    segment.write_bytes(bytes(damaged))
    third = Journal(str(tmp_path), 1024**3, stats, "t")
    assert drain(third) == []
    assert stats.get("journal_errors", reason="corrupt") == 1
    third.save_checkpoint()
    assert (tmp_path / "checkpoint").read_text().split()[0] == "3"  # past both: nothing holds it back


def test_a_damaged_checkpoint_reads_everything_again(tmp_path):
    journal = Journal(str(tmp_path), 1024**3, Stats(), "t")
    append(journal, 3)
    drain(journal)
    journal.save_checkpoint()
    journal.release()
    (tmp_path / "checkpoint").write_text("garbage")
    assert sum(b.count for b in drain(Journal(str(tmp_path), 1024**3, Stats(), "t"))) == 3


def test_concurrent_appenders_share_fsyncs_and_lose_nothing(tmp_path):
    journal = Journal(str(tmp_path), 1024**3, Stats(), "t", segment_bytes=256 * 1024)

    def writer(base: int) -> None:
        for i in range(50):
            append(journal, 10, base + i * 10)

    threads = [threading.Thread(target=writer, args=(k * 1000,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    numbers = sorted(f["n"] for b in drain(journal) for f in b.fields)
    assert numbers == sorted(k * 1000 + i for k in range(4) for i in range(500))


# ---------------------------------------------------------------- what the disk and the operator do to it

def test_a_frame_that_could_never_fit_is_refused_at_once(tmp_path):
    journal = Journal(str(tmp_path), 1024**2, Stats(), "t")
    huge = encode_frame("t", 1.0, None, ["x" * 600_000], [None])
    with pytest.raises(FrameTooLarge, match="half of journal_max_bytes"):
        journal.append(huge)  # not JournalFull: no confirmation would ever make room for it
    append(journal, 1)
    assert [b.count for b in drain(journal)] == [1]


def test_a_second_journal_on_the_same_directory_is_refused_until_the_first_lets_go(tmp_path):
    journal = Journal(str(tmp_path), 1024**2, Stats(), "t")
    with pytest.raises(JournalBusy, match="in use"):
        Journal(str(tmp_path), 1024**2, Stats(), "t")
    append(journal, 2)
    journal.release()
    again = Journal(str(tmp_path), 1024**2, Stats(), "t")
    assert sum(b.count for b in drain(again)) == 2


def test_a_failed_rotation_keeps_the_segment_in_use_and_is_tried_again(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "RETRY_SECONDS", 0.05)
    stats = Stats()
    journal = Journal(str(tmp_path), 64 * 1024**2, stats, "t", segment_bytes=64 * 1024)
    blocker = tmp_path / segment_name(2)
    blocker.mkdir()  # something the journal cannot unlink sits where the next segment goes
    (blocker / "x").write_text("x")
    for i in range(100):  # about twice segment_bytes
        append(journal, 50, i * 50)
    assert stats.get("journal_errors", reason="rotate") >= 1
    assert journal.active == 1 and not (tmp_path / segment_name(3)).exists()
    (blocker / "x").unlink()
    blocker.rmdir()
    time.sleep(0.1)
    for i in range(100, 120):
        append(journal, 50, i * 50)
    assert journal.active > 1  # rotated once the way was clear
    numbers = sorted(f["n"] for b in drain(journal) for f in b.fields)
    assert numbers == list(range(6000))


def test_a_segment_that_cannot_be_read_for_now_is_tried_again_not_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "RETRY_SECONDS", 0.05)
    stats = Stats()
    journal = Journal(str(tmp_path), 1024**2, stats, "t")
    append(journal, 3)
    journal.release()
    segment = tmp_path / segment_name(1)
    segment.rename(tmp_path / "aside")
    segment.mkdir()  # open succeeds, pread fails (EISDIR): an error of the moment, like EIO
    again = Journal(str(tmp_path), 1024**2, stats, "t")
    stop = threading.Event()
    reader = again.batches(stop, wait=0.01)
    assert next(reader) is None  # a tick: nothing read, nothing confirmed
    assert stats.get("journal_errors", reason="read") == 1
    assert again.committed_position() == (1, 0)
    segment.rmdir()
    (tmp_path / "aside").rename(segment)
    batch = next(b for b in reader if b is not None)
    assert batch.messages == rows(3)[0]


def test_a_segment_removed_by_someone_else_is_counted_and_passed(tmp_path):
    stats = Stats()
    journal = Journal(str(tmp_path), 1024**2, stats, "t")
    append(journal, 3)
    journal.release()
    again = Journal(str(tmp_path), 1024**2, stats, "t")
    (tmp_path / segment_name(1)).unlink()
    append(again, 2, 10)
    assert [b.messages for b in drain(again)] == [rows(2, 10)[0]]
    assert stats.get("journal_errors", reason="missing") == 1


def test_a_write_cut_short_is_cut_off_and_later_frames_stay_readable(tmp_path):
    journal = Journal(str(tmp_path), 64 * 1024**2, Stats(), "t")
    append(journal, 10)
    size = (tmp_path / segment_name(1)).stat().st_size
    frame = encode_frame("t", 1.5, "test", *rows(100, 10))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + len(frame) // 2, hard))  # the disk fills mid-frame
    try:
        with pytest.raises(OSError):
            journal.append(frame)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert (tmp_path / segment_name(1)).stat().st_size == size  # no half frame left to hide the next
    append(journal, 5, 200)
    numbers = [f["n"] for b in drain(journal) for f in b.fields]
    assert numbers == list(range(10)) + list(range(200, 205))


def test_a_reader_that_keeps_up_gets_from_memory_what_a_lagging_one_reads_from_disk(tmp_path):
    journal = Journal(str(tmp_path), 64 * 1024**2, Stats(), "t", segment_bytes=256 * 1024)
    made = []
    for i in range(60):
        messages, fields = rows(100, i * 100)
        items = ["t", 1.5, "test", messages, fields]
        journal.sync(journal.append(encode_frame(*items), items))
        made.append(items)
    memory = drain(journal, confirm=False)  # the last RECENT_BYTES of frames never touch the disk
    journal.release()
    disk = drain(Journal(str(tmp_path), 64 * 1024**2, Stats(), "t"))
    assert len(memory) == len(disk) == 60
    for a, b in zip(memory, disk):
        assert (a.tag, a.read_time, a.source, a.messages, a.fields, a.start, a.end) == \
               (b.tag, b.read_time, b.source, b.messages, b.fields, b.start, b.end)


def test_a_rotation_that_failed_until_the_journal_filled_is_tried_again_once_there_is_room(tmp_path, monkeypatch):
    # The active segment cannot be deleted (it is not sealed): were rotation only tried after a
    # write that fits, a journal full of one segment would stay full for good.
    monkeypatch.setattr(journal_module, "RETRY_SECONDS", 0.05)
    journal = Journal(str(tmp_path), 1024**2, Stats(), "t", segment_bytes=64 * 1024)
    blocker = tmp_path / segment_name(2)
    blocker.mkdir()
    (blocker / "x").write_text("x")
    written = 0
    with pytest.raises(JournalFull):
        while True:
            append(journal, 50, written)
            written += 50
    assert journal.active == 1
    assert sum(b.count for b in drain(journal)) == written  # everything confirmed: only segment 1 holds it
    (blocker / "x").unlink()
    blocker.rmdir()
    time.sleep(0.1)
    append(journal, 50, written)  # rotates first, the confirmed segment goes, the frame fits
    assert journal.active == 2 and journal.total_bytes < 64 * 1024
    assert [f["n"] for b in drain(journal) for f in b.fields] == list(range(written, written + 50))
