"""Opening what lies below a directory without following links: one path component at a time.

The root is the operator's (named in a glob's fixed part, or on the command line) and may be a
link; every directory below it is opened with O_NOFOLLOW from the one above, so a directory
swapped for a symlink after a listing cannot lead anywhere else. Used by the file input (log
files) and by fetch (directory archives).
"""

from __future__ import annotations

import os
import stat

# O_PATH where there is one: going through a directory then needs search permission only, as a
# path lookup does.
DIRECTORY_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_directory_below(root: str, names: list[str]) -> int:
    """A descriptor of ``root/names...``, no link followed below ``root``; OSError (ELOOP, ENOTDIR) else."""
    directory = os.open(root, DIRECTORY_FLAGS & ~os.O_NOFOLLOW)
    try:
        for name in names:
            inner = os.open(name, DIRECTORY_FLAGS, dir_fd=directory)
            os.close(directory)
            directory = inner
    except BaseException:
        os.close(directory)
        raise
    return directory


def open_below(root: str, names: list[str], flags: int) -> int:
    """``root/names...`` opened with ``flags`` | O_NOFOLLOW, no link followed below ``root``."""
    directory = open_directory_below(root, names[:-1])
    try:
        return os.open(names[-1], flags | os.O_NOFOLLOW, dir_fd=directory)
    finally:
        os.close(directory)


def kind_of(mode: int) -> str:
    """What a file that is not a regular one is, for messages: "FIFO", "socket", ..."""
    for check, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                        (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                        (stat.S_ISDIR, "directory")):
        if check(mode):
            return name
    return "special file"
