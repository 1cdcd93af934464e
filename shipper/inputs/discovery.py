"""Which files to tail: glob patterns minus excludes, and a wake-up when that may change.

watchdog (inotify on Linux) reports created, moved and deleted files at once; a slow
rescan every ``refresh_interval`` covers file systems without inotify and directories
that appear later. Writes to files are not watched: the tailer polls open descriptors,
which is cheaper than one Python event per write on a busy file.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
from fnmatch import fnmatchcase

log = logging.getLogger(__name__)


def expand(patterns: list[str], excludes: list[str]) -> list[str]:
    """Regular files matching any pattern and no exclude (an exclude matches the path or its name)."""
    found: dict[str, None] = {}
    for pattern in patterns:
        for path in sorted(glob.glob(pattern, recursive=True)):
            if is_excluded(path, excludes) or not os.path.isfile(path):
                continue
            found[os.path.abspath(path)] = None
    return list(found)


def is_excluded(path: str, excludes: list[str]) -> bool:
    name = os.path.basename(path)
    return any(fnmatchcase(path, pattern) or fnmatchcase(name, pattern) for pattern in excludes)


def watch_root(pattern: str) -> tuple[str, bool]:
    """The deepest directory of a pattern without glob characters, and whether to watch below it."""
    parts = pattern.split(os.sep)
    fixed: list[str] = []
    for part in parts[:-1]:
        if any(c in part for c in "*?["):
            break
        fixed.append(part)
    root = os.sep.join(fixed) or (os.sep if pattern.startswith(os.sep) else ".")
    recursive = len(fixed) < len(parts) - 1 or "**" in pattern
    return root, recursive


class DirectoryWatcher:
    """Sets ``changed`` when a file is created, moved or deleted under the patterns' directories."""

    def __init__(self, patterns: list[str], changed: threading.Event, wake: threading.Event):
        self.patterns = patterns
        self.changed = changed
        self.wake = wake
        self._observer = None
        self._watched: set[tuple[str, bool]] = set()

    def start(self) -> None:
        try:
            from watchdog.events import (DirCreatedEvent, FileCreatedEvent, FileDeletedEvent,
                                         FileMovedEvent, FileSystemEventHandler)
            from watchdog.observers import Observer
        except ImportError:  # pragma: no cover - watchdog is a dependency; polling still works
            log.warning("watchdog is not available; discovering new files by polling only")
            return
        changed, wake = self.changed, self.wake

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                changed.set()
                wake.set()

        self._handler = Handler()
        self._filter = [FileCreatedEvent, FileMovedEvent, FileDeletedEvent, DirCreatedEvent]
        self._observer = Observer()
        self._observer.daemon = True
        self.refresh()
        try:
            self._observer.start()
        except OSError as exc:  # e.g. inotify limits reached
            log.warning("cannot watch directories (%s); discovering new files by polling only", exc)
            self._observer = None

    def refresh(self) -> None:
        """Watch roots that exist now (a directory created later is picked up on the next call)."""
        if self._observer is None:
            return
        for pattern in self.patterns:
            root, recursive = watch_root(pattern)
            if (root, recursive) in self._watched or not os.path.isdir(root):
                continue
            try:
                self._observer.schedule(self._handler, root, recursive=recursive, event_filter=self._filter)
            except OSError as exc:
                log.warning("cannot watch %s (%s); relying on polling for it", root, exc)
                continue
            self._watched.add((root, recursive))

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=2)
            self._observer = None
