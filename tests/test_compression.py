import gzip
import os
import random
import subprocess
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest

from backports.zstd import decompress as zstd_decompress

from shipper.outputs.compression import DEFLATE, GzipStream, PlainStream, ZstdStream, engine_level

ENGINES = sorted({zlib, DEFLATE}, key=lambda m: m.__name__)


@pytest.mark.parametrize("engine", ENGINES, ids=lambda m: m.__name__)
def test_parallel_blocks_make_one_ordinary_gzip_member(tmp_path, engine):
    rng = random.Random(7)
    pieces = [(" ".join(rng.choice(["GET", "POST", "/api", "200", "500", "ms"]) for _ in range(rng.randint(1, 9000)))
               + "\n").encode() for _ in range(30)]
    pieces.insert(3, os.urandom(100_000))  # incompressible, and larger than the 32 KiB window
    pieces.insert(5, b"")
    with ThreadPoolExecutor(2) as pool:
        stream = GzipStream(1, pool, engine)
        out = b""
        for piece in pieces:
            stream.add(piece)
            out += stream.take(keep=2)
        stream.finish()
        out += stream.take(keep=0)
    whole = b"".join(pieces)
    assert gzip.decompress(out) == whole
    decompressor = zlib.decompressobj(31)
    assert decompressor.decompress(out) == whole and decompressor.eof and decompressor.unused_data == b""
    path = tmp_path / "x.gz"
    path.write_bytes(out)
    assert subprocess.run(["gzip", "-t", str(path)]).returncode == 0
    single = zlib.compressobj(1, zlib.DEFLATED, 31)
    assert len(out) < 1.05 * len(single.compress(whole) + single.flush())  # the shared window keeps the ratio


def test_the_fast_engine_is_installed_and_levels_map_to_it():
    assert DEFLATE.__name__ == "isal.isal_zlib"  # a declared dependency: the hot path counts on it
    assert [engine_level(n, DEFLATE) for n in range(1, 10)] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert engine_level(6, zlib) == 6


@pytest.mark.parametrize("engine", ENGINES, ids=lambda m: m.__name__)
def test_empty_stream_is_valid_gzip(engine):
    with ThreadPoolExecutor(1) as pool:
        stream = GzipStream(6, pool, engine)
        stream.finish()
        assert gzip.decompress(stream.take(keep=0)) == b""


def test_plain_stream_passes_through():
    stream = PlainStream()
    stream.add(b"a")
    stream.add(b"b")
    stream.finish()
    assert stream.take() == b"ab" and stream.take() == b""


def test_zstd_stream_is_one_frame_of_every_piece_in_order():
    pieces = [f"line {i} ".encode() * (i % 50) + b"\n" for i in range(2000)]
    stream = ZstdStream(3)
    out = b""
    for piece in pieces:
        stream.add(piece)
        out += stream.take()
    stream.finish()
    out += stream.take()
    assert zstd_decompress(out) == b"".join(pieces)
    assert len(out) < len(b"".join(pieces)) // 10
