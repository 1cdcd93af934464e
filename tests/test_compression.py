import gzip
import os
import random
import subprocess
import zlib
from concurrent.futures import ThreadPoolExecutor

from shipper.outputs.compression import GzipStream, PlainStream


def test_parallel_blocks_make_one_ordinary_gzip_member(tmp_path):
    rng = random.Random(7)
    pieces = [(" ".join(rng.choice(["GET", "POST", "/api", "200", "500", "ms"]) for _ in range(rng.randint(1, 9000)))
               + "\n").encode() for _ in range(30)]
    pieces.insert(3, os.urandom(100_000))  # incompressible, and larger than the 32 KiB window
    pieces.insert(5, b"")
    with ThreadPoolExecutor(2) as pool:
        stream = GzipStream(1, pool)
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


def test_empty_stream_is_valid_gzip():
    with ThreadPoolExecutor(1) as pool:
        stream = GzipStream(6, pool)
        stream.finish()
        assert gzip.decompress(stream.take(keep=0)) == b""


def test_plain_stream_passes_through():
    stream = PlainStream()
    stream.add(b"a")
    stream.add(b"b")
    stream.finish()
    assert stream.take() == b"ab" and stream.take() == b""
