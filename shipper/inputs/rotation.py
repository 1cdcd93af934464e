"""Finding what a rotation left behind: the copy of a truncated file (copytruncate), a file renamed and
compressed (logrotate's ``compress``), recognised by the fingerprint of their first bytes.

Only the directory of the followed file is searched, names that look like its rotations first
(``NAME.1``, ``NAME-20261201``, ``NAME.1.gz``). Nothing here follows a symlink or opens anything but
a regular file, and a compressed file is read as a stream (never whole into memory).
"""

from __future__ import annotations

import gzip
import os
import stat
import zlib
from typing import Iterator

from shipper.inputs.checkpoints import fingerprint
from shipper.nofollow import open_below

# A directory with more entries than this is searched among the names that look like rotations only.
MAX_CANDIDATES = 2000
COMPRESSED_SUFFIXES = (".gz",)
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC


def rotation_names(name: str) -> tuple[str, ...]:
    """The names a followed file ``name`` may have come from, for a new file called ``name``: "app.log"
    for "app.log.1", "app.log-20261201", "app-20261201.log", "app.log.1.gz". Pure."""
    stem, dot, extension = name.rpartition(".")
    candidates = []
    for index, char in enumerate(name):
        if char in ".-_" and index > 0:
            candidates.append(name[:index])
            if dot and extension and index < len(stem):
                candidates.append(name[:index] + "." + extension)
    return tuple(dict.fromkeys(c for c in candidates if c != name))


def looks_rotated_from(candidate: str, name: str) -> bool:
    """Whether ``candidate`` is named like a rotation of ``name`` (searched first)."""
    return candidate != name and name in rotation_names(candidate)


def _open_regular_in(directory: str, name: str) -> int | None:
    try:
        fd = open_below(directory, [name], _OPEN_FLAGS)
    except OSError:
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _candidates(directory: str, name: str) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as scan:
            entries = [e for e in scan if e.name != name and e.is_file(follow_symlinks=False)]
    except OSError:
        return []
    named = [e for e in entries if looks_rotated_from(e.name, name)]
    others = [e for e in entries if not looks_rotated_from(e.name, name)] if len(entries) <= MAX_CANDIDATES else []
    return sorted(named, key=lambda e: e.name) + others


def find_copy(path: str, identity: tuple[int, int], fp_len: int, fp: int, min_size: int,
              exclude: set[tuple[int, int]] = frozenset()) -> str | None:
    """A regular file next to ``path`` (not ``identity``, nor one in ``exclude``) whose first ``fp_len``
    bytes have the CRC ``fp`` and that holds at least ``min_size`` bytes: the copy copytruncate made."""
    if fp_len <= 0:
        return None
    directory, name = os.path.split(path)
    for entry in _candidates(directory, name):
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key == identity or key in exclude or st.st_size < max(min_size, fp_len):
            continue
        fd = _open_regular_in(directory, entry.name)
        if fd is None:
            continue
        try:
            if fingerprint(fd, fp_len) == (fp_len, fp):
                return entry.path
        except OSError:
            pass
        finally:
            os.close(fd)
    return None


def find_renamed(path: str, identity: tuple[int, int]) -> tuple[str, os.stat_result] | None:
    """The file ``identity`` under another name next to ``path`` (renamed by a rotation), with its stat;
    None when it is not there. Inode numbers come with the directory listing: one stat per match."""
    try:
        with os.scandir(os.path.dirname(path)) as entries:
            for entry in entries:
                if entry.inode() != identity[1] or not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:  # gone since the listing
                    continue
                if (st.st_dev, st.st_ino) == identity:
                    return entry.path, st
    except OSError:
        return None
    return None


def find_compressed(path: str, fp_len: int, fp: int) -> str | None:
    """A compressed file next to ``path`` whose decompressed first ``fp_len`` bytes have the CRC ``fp``:
    the file, rotated and compressed while nobody read it."""
    if fp_len <= 0:
        return None
    directory, name = os.path.split(path)
    for entry in _candidates(directory, name):
        if not entry.name.endswith(COMPRESSED_SUFFIXES):
            continue
        fd = _open_regular_in(directory, entry.name)
        if fd is None:
            continue
        try:
            with os.fdopen(fd, "rb") as raw, gzip.GzipFile(fileobj=raw) as stream:
                if zlib.crc32(stream.read(fp_len)) == fp:
                    return entry.path
        except (OSError, EOFError, zlib.error):
            continue
    return None


def compressed_chunks(path: str, offset: int, chunk_size: int = 1024 * 1024) -> Iterator[tuple[int, bytes]]:
    """(decompressed offset, data) from ``offset`` to the end of a compressed file, a chunk at a time.
    A corrupt or truncated stream ends the iteration where it broke (OSError, EOFError, zlib.error)."""
    directory, name = os.path.split(path)
    fd = _open_regular_in(directory, name)
    if fd is None:
        raise FileNotFoundError(path)
    with os.fdopen(fd, "rb") as raw, gzip.GzipFile(fileobj=raw) as stream:
        position = 0
        while position < offset:  # skip what was read before, without holding it
            skipped = len(stream.read(min(chunk_size, offset - position)))
            if not skipped:
                return
            position += skipped
        while True:
            data = stream.read(chunk_size)
            if not data:
                return
            yield position, data
            position += len(data)
