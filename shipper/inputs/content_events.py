"""Which followed files were written: inotify's IN_MODIFY, read without a thread.

With thousands of files the reader cannot visit each one every poll; it reads those the kernel
says were written (or truncated). watchdog's observer would hand each event through three
threads (~0.4 ms an event, which at 10 lines/s is most of the agent's idle cost); here the
reader itself drains one non-blocking inotify descriptor at each poll: one read() a poll, a
struct unpack an event, no wake-up of its own. watchdog's ctypes bindings and its event parser
are used; only the directories holding followed files are watched. A directory that cannot be
watched (the inotify watch limit) is in ``unwatched``: the reader polls its files as before.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024


class ModifiedFiles:
    """An inotify instance watching directories for IN_MODIFY. ``drain()`` names the files written
    since the last call, or returns None when the kernel's queue overflowed (events were lost:
    look at every file)."""

    def __init__(self):
        from watchdog.observers.inotify_c import InotifyConstants, InotifyFD, inotify_add_watch, inotify_init

        self._add_watch = inotify_add_watch
        self._parse = InotifyFD._parse_event_buffer  # a static parser of struct inotify_event
        self._modify = InotifyConstants.IN_MODIFY
        self._overflow = InotifyConstants.IN_Q_OVERFLOW
        self._ignored = InotifyConstants.IN_IGNORED
        # A symlinked directory is watched where it points (the globs go through it as well).
        self._mask = InotifyConstants.IN_MODIFY | InotifyConstants.IN_ONLYDIR | InotifyConstants.IN_EXCL_UNLINK
        fd = inotify_init()
        if fd < 0:
            raise OSError(0, "inotify_init failed")
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
        self.fd: int | None = fd
        self.directories: dict[int, str] = {}   # watch descriptor -> directory
        self._watched: set[str] = set()
        self.unwatched: set[str] = set()  # could not be watched: their files are polled

    def watch(self, directory: str, quiet: bool = False) -> bool:
        """Watch ``directory`` (once); False when it cannot be (tried again by ``retry_unwatched``)."""
        if directory in self._watched:
            return True
        if directory in self.unwatched or self.fd is None:
            return False
        wd = self._add_watch(self.fd, os.fsencode(directory or "."), self._mask)
        if wd < 0:
            self.unwatched.add(directory)
            if not quiet:
                log.warning("cannot watch %s for writes (%s); its files are visited every poll",
                            directory or ".", os.strerror(_errno()))
            return False
        self.directories[wd] = directory
        self._watched.add(directory)
        return True

    def retry_unwatched(self) -> None:
        for directory in list(self.unwatched):
            self.unwatched.discard(directory)
            if not self.watch(directory, quiet=True):
                self.unwatched.add(directory)

    def drain(self) -> set[str] | None:
        """The paths written since the last call; None: events were lost (queue overflow)."""
        if self.fd is None:
            return set()
        written: set[str] = set()
        lost = False
        while True:
            try:
                buffer = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            if not buffer:
                break
            for wd, mask, _cookie, name in self._parse(buffer):
                if mask & self._overflow:
                    lost = True
                elif mask & self._ignored:  # the directory went away: watched again if it comes back
                    directory = self.directories.pop(wd, None)
                    self._watched.discard(directory)
                elif mask & self._modify and name:
                    directory = self.directories.get(wd)
                    if directory is not None:
                        written.add(os.path.join(directory, os.fsdecode(name)) if directory else os.fsdecode(name))
            if len(buffer) < READ_SIZE - 4096:  # less than a full buffer: the queue is empty
                break
        return None if lost else written

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()
