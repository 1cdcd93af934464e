import os

import pytest

from shipper.acks import Acknowledgement, OffsetTracker
from shipper.inputs.tail import (GONE, LINE, LINES, PART, REPLACED, SAME, TRUNCATED, TailedFile, classify,
                                 split_long_lines, utf8_cut)


def test_utf8_cut_never_splits_a_character():
    data = "aé€😀".encode()  # 1 + 2 + 3 + 4 bytes
    assert [utf8_cut(data, n) for n in range(1, 11)] == [1, 1, 3, 3, 3, 6, 6, 6, 6, 10]
    assert utf8_cut(b"\x80\x80\x80\x80\x80", 3) == 3  # not UTF-8 at all: cut where asked


def test_split_long_lines_keeps_short_lines_together():
    region = b"short\n" + b"L" * 25 + b"\n" + b"x" * 10 + b"\n" + b"y" * 11 + b"\n"
    blocks = split_long_lines(region, 10)
    assert blocks == [(LINES, b"short\n", 6), (PART, b"L" * 10, 10), (PART, b"L" * 10, 10), (PART, b"L" * 5, 6),
                      (LINES, b"x" * 10 + b"\n", 11), (PART, b"y" * 10, 10), (PART, b"y", 2)]
    assert sum(consumed for _, _, consumed in blocks) == len(region)


def test_split_long_lines_fast_path():
    region = b"abc\n" * 1000
    assert split_long_lines(region, 64) == [(LINES, region, len(region))]


@pytest.mark.parametrize("args,expected", [
    (((1, 2), 100, 100, True, (1, 2)), SAME),
    (((1, 2), 100, 50, True, (1, 2)), TRUNCATED),
    (((1, 2), 100, 200, False, (1, 2)), TRUNCATED),  # refilled after copytruncate: first bytes changed
    (((1, 2), 100, 100, True, None), GONE),
    (((1, 2), 100, 100, True, (1, 3)), REPLACED),
])
def test_classify(args, expected):
    assert classify(*args) == expected


def test_offset_tracker_advances_over_contiguous_acknowledged_ranges():
    tracker = OffsetTracker(0)
    assert not tracker.done(10, 20)
    assert not tracker.done(20, 30)
    assert tracker.committed == 0
    assert tracker.done(0, 10)
    assert tracker.committed == 30 and tracker.pending_ranges == 0
    generation = tracker.generation
    tracker.reset(0)
    assert not tracker.done(30, 40, generation)  # old content: ignored
    assert tracker.done(0, 5, tracker.generation) and tracker.committed == 5


def test_acknowledgement_needs_every_output():
    calls = []
    ack = Acknowledgement(2, lambda: calls.append(1))
    ack.confirm()
    assert calls == []
    ack.confirm()
    assert calls == [1]
    Acknowledgement(0, lambda: calls.append(2))
    assert calls == [1, 2]


def open_tailed(path, max_line=16):
    return TailedFile(str(path), os.open(path, os.O_RDONLY), 0, max_line)


def test_reads_cut_at_the_last_newline_and_wait_for_the_rest(tmp_path):
    path = tmp_path / "f.log"
    path.write_bytes(b"one\ntw")
    tailed = open_tailed(path)
    read = tailed.read(1 << 20)
    assert (read.start, read.end, read.blocks) == (0, 4, [(LINES, b"one\n", 4)])
    assert tailed.read(1 << 20) is None
    with open(path, "ab") as f:
        f.write(b"o\nthree")
    read = tailed.read(1 << 20)
    assert (read.start, read.end, read.blocks) == (4, 8, [(LINES, b"two\n", 4)])
    read = tailed.flush_carry()
    assert (read.start, read.end, read.blocks) == (8, 13, [(LINE, b"three", 5)])
    tailed.close()


def test_a_huge_line_arriving_in_pieces_is_split_and_every_part_flagged(tmp_path):
    path = tmp_path / "f.log"
    path.write_bytes(b"A" * 20)
    tailed = open_tailed(path, max_line=8)
    blocks = tailed.read(1 << 20).blocks
    assert blocks == [(PART, b"A" * 8, 8), (PART, b"A" * 8, 8)]
    with open(path, "ab") as f:
        f.write(b"B" * 3 + b"\nok\n")
    read = tailed.read(1 << 20)
    assert read.blocks == [(PART, b"AAAABBB", 8), (LINES, b"ok\n", 3)]
    assert read.end == 27
    tailed.close()
