"""Writing state so that a crash at any instant leaves the old content or the new, never a mix.

Everything here is also safe against a hostile neighbour in a writable parent directory:
temporary files are created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` (a planted symlink or file at
the name is never followed or reused), and directories are created 0750 whatever the umask.
"""

from __future__ import annotations

import errno
import os

# Directories holding state (data_dir, checkpoints, spool, archive): the agent and its group.
DIR_MODE = 0o750
FILE_MODE = 0o640
# open() flags of a new state file: never an existing file, never through a symlink.
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def fsync_dir(path: str) -> None:
    """Make a directory's entries (a new name, a rename) survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str, mode: int = DIR_MODE) -> None:
    """``mkdir -p`` whose new directories get exactly ``mode``: os.makedirs' mode is masked by the
    umask (a umask of 000 would give 0777), so each directory created here is chmodded after.
    Directories that exist already are left as the operator made them."""
    path = os.path.abspath(path)
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            continue  # made meanwhile by another thread or process: theirs
        # Through a descriptor opened without following links: the new name could have been
        # swapped for a symlink (in a writable parent), and chmod would follow it.
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def create_new(path: str, flags: int = NEW_FILE, mode: int = FILE_MODE) -> int:
    """Open a new file at ``path`` (FileExistsError if anything, even a dangling symlink, is there)."""
    return os.open(path, flags, mode)


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file and a rename.

    The temporary name (``path.tmp``) is predictable, so whatever lies there (a leftover of a
    crash, or a planted symlink) is removed first, never opened: unlink removes a symlink itself,
    and O_EXCL|O_NOFOLLOW refuses anything planted again in between.
    """
    tmp = f"{path}.tmp"
    for _ in range(3):
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        try:
            fd = create_new(tmp)
            break
        except FileExistsError:
            continue  # planted again between unlink and open: try again, a few times
    else:
        raise OSError(errno.EEXIST, f"something keeps re-creating {tmp}; not writing through it", tmp)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")
