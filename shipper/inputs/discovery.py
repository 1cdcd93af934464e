"""Which files to tail: glob patterns minus excludes, and a wake-up when that may change.

watchdog (inotify on Linux) reports created, moved and deleted files at once; a slow
rescan every ``refresh_interval`` covers file systems without inotify and directories
that appear later. Writes to files are not watched: the tailer polls open descriptors,
which is cheaper than one Python event per write on a busy file.

The patterns are expanded by a walk of our own rather than ``glob``, which follows every
symlink (to files and, through ``*`` and ``**``, to directories, looping on a link to
``..``). Unless ``follow_symlinks``, a symlink is followed only in a pattern's fixed part,
the directories before its first wildcard, which the operator named: a symlink among the
files or directories a wildcard matches is skipped, as are FIFOs, sockets and devices.
Each skipped path is logged and counted once (``files_skipped{reason}``) while it stays.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from fnmatch import fnmatchcase
from typing import Callable, Iterable, Iterator

log = logging.getLogger(__name__)

# What a path a pattern matches holds; all but REGULAR are skipped (SYMLINK: only when not followed;
# TOO_DEEP: a directory more than MAX_DEPTH below a pattern's fixed part, not walked).
REGULAR, SYMLINK, NOT_REGULAR, TOO_DEEP = "regular", "symlink", "not_regular", "too_deep"
MAX_DEPTH = 64  # the walk recurses: a directory chain thousands deep must not exhaust the stack


def expand(patterns: list[str], excludes: list[str], follow_symlinks: bool = False,
           skips: "Skips | None" = None) -> list[str]:
    """Regular files matching any pattern and no exclude (an exclude matches the path or its name).

    ``skips``: told about every matching path that is not tailed (see the module's docstring).
    """
    found: dict[str, None] = {}
    matched: set[str] = set()
    for pattern in patterns:
        for path, kind in sorted(matches(pattern, follow_symlinks)):
            if is_excluded(path, excludes):
                continue
            path = os.path.abspath(path)
            matched.add(path)
            if kind == REGULAR:
                found[path] = None
            elif skips is not None:
                skips.skip(path, kind)
    if skips is not None:
        skips.keep(matched)
    return list(found)


def _has_magic(part: str) -> bool:
    return any(c in part for c in "*?[")


def matches(pattern: str, follow_symlinks: bool = False) -> Iterator[tuple[str, str]]:
    """(path, kind) of everything but directories that ``pattern`` matches, as ``glob`` would
    (``**`` for any depth, names starting with "." only for a part starting with "."), and of
    the symlinks to directories it did not follow."""
    parts = pattern.split(os.sep)
    fixed = 0
    while fixed < len(parts) - 1 and not _has_magic(parts[fixed]):
        fixed += 1
    base = os.sep.join(parts[:fixed])
    if not base and pattern.startswith(os.sep):
        base = os.sep
    visited: set[tuple[int, int]] = set()  # directories entered, when symlinks may lead back to one
    if follow_symlinks:
        _enter(base or ".", False, True, visited)
    yield from _walk(base, parts[fixed:], follow_symlinks, visited, 0)


def _join(directory: str, name: str) -> str:
    return os.path.join(directory, name) if directory else name


def _kind(path: str, follow_symlinks: bool) -> str | None:
    """REGULAR, SYMLINK or NOT_REGULAR for what ``path`` holds; None for a directory or nothing."""
    try:
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            if not follow_symlinks:
                return SYMLINK
            mode = os.stat(path).st_mode
    except OSError:  # vanished, or a dangling symlink
        return None
    if stat.S_ISREG(mode):
        return REGULAR
    return None if stat.S_ISDIR(mode) else NOT_REGULAR


def _entry_kind(entry: os.DirEntry, follow_symlinks: bool) -> str | None:
    try:
        if entry.is_file(follow_symlinks=False):
            return REGULAR
        if entry.is_dir(follow_symlinks=False):
            return None
        if entry.is_symlink():
            return _kind(entry.path, follow_symlinks)
    except OSError:
        return None
    return NOT_REGULAR


def _enter(path: str, is_link: bool, follow_symlinks: bool, visited: set[tuple[int, int]]) -> bool | None:
    """May the walk go into the directory at ``path``? None: it is a symlink to one, not followed."""
    if is_link and not follow_symlinks:
        return None if os.path.isdir(path) else False
    if follow_symlinks:
        try:
            st = os.stat(path)
        except OSError:
            return False
        if not stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) in visited:
            return False  # visited: a symlink loop, or a second way to the same directory
        visited.add((st.st_dev, st.st_ino))
    return True


def _subdirectories(directory: str, part: str | None, follow_symlinks: bool,
                    visited: set[tuple[int, int]]) -> Iterator[tuple[str, str | None]]:
    """(path, None) of the directories in ``directory`` whose name matches ``part`` (any, if None);
    (path, SYMLINK) of the symlinks to directories among them that are not followed."""
    for entry in _scan(directory):
        if not _name_matches(entry.name, part):
            continue
        try:
            is_link = entry.is_symlink()
            if not is_link and not entry.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        verdict = _enter(entry.path, is_link, follow_symlinks, visited)
        if verdict:
            yield entry.path, None
        elif verdict is None:
            yield entry.path, SYMLINK


def _name_matches(name: str, part: str | None) -> bool:
    if name.startswith(".") and not (part or "").startswith("."):
        return False  # as glob: hidden names only for a part that starts with "."
    return part is None or fnmatchcase(name, part)


def _scan(directory: str) -> list[os.DirEntry]:
    try:
        with os.scandir(directory or ".") as entries:
            return list(entries)
    except OSError:  # gone, not a directory, or not readable: nothing there for us
        return []


def _walk(directory: str, parts: list[str], follow_symlinks: bool, visited: set[tuple[int, int]],
          depth: int) -> Iterator[tuple[str, str]]:
    part, rest = parts[0], parts[1:]
    deeper = depth + 1
    if part == "**":
        if rest:
            yield from _walk(directory, rest, follow_symlinks, visited, depth)  # ** as no directory at all
        else:
            for entry in _scan(directory):
                if _name_matches(entry.name, None):
                    kind = _entry_kind(entry, follow_symlinks)
                    if kind is not None:
                        yield _join(directory, entry.name), kind
        for path, skipped in _subdirectories(directory, None, follow_symlinks, visited):
            if skipped or deeper > MAX_DEPTH:
                yield path, skipped or TOO_DEEP
            else:
                yield from _walk(path, parts, follow_symlinks, visited, deeper)
        return
    if not _has_magic(part):
        path = _join(directory, part)
        if not rest:
            kind = _kind(path, follow_symlinks)
            if kind is not None:
                yield path, kind
            return
        is_link = os.path.islink(path)
        verdict = _enter(path, is_link, follow_symlinks, visited) if is_link or os.path.isdir(path) else False
        if verdict:
            yield from _walk(path, rest, follow_symlinks, visited, deeper)
        elif verdict is None:
            yield path, SYMLINK
        return
    if not rest:
        for entry in _scan(directory):
            if _name_matches(entry.name, part):
                kind = _entry_kind(entry, follow_symlinks)
                if kind is not None:
                    yield _join(directory, entry.name), kind
        return
    for path, skipped in _subdirectories(directory, part, follow_symlinks, visited):
        if skipped or deeper > MAX_DEPTH:
            yield path, skipped or TOO_DEEP
        else:
            yield from _walk(path, rest, follow_symlinks, visited, deeper)


def fixed_root(path: str, patterns: list[str]) -> str | None:
    """The longest fixed directory (see watch_root) of a pattern that ``path`` is below: symlinks
    above it were named by the operator, those below it are the ones to refuse."""
    best: str | None = None
    for pattern in patterns:
        root = watch_root(pattern)[0]
        inside = path.startswith(root if root.endswith(os.sep) else root + os.sep)
        if inside and (best is None or len(root) > len(best)):
            best = root
    return best


class Skips:
    """Paths a pattern matches that are not tailed: symlinks (unless follow_symlinks) and what is
    not a regular file (FIFO, socket, device). Each is logged and counted once while it stays."""

    WHY = {SYMLINK: "it is a symlink (follow_symlinks = false)",
           NOT_REGULAR: "it is not a regular file (a FIFO, socket or device)",
           TOO_DEEP: f"a directory more than {MAX_DEPTH} levels below the pattern's fixed part, not searched"}

    def __init__(self, stats=None, tag: str | None = None):
        self.stats = stats
        self.tag = tag
        self.reported: dict[str, str] = {}  # path -> reason

    def skip(self, path: str, reason: str, detail: str | None = None) -> None:
        if self.reported.get(path) == reason:
            return
        self.reported[path] = reason
        log.warning("not tailing %s: %s (reported once; counted in files_skipped)", path,
                    detail or self.WHY.get(reason, reason))
        if self.stats is not None:
            self.stats.add("files_skipped", 1, input=self.tag, reason=reason)

    def keep(self, paths: set[str]) -> None:
        """Forget the paths no pattern matches any more (one that comes back is reported again)."""
        if any(path not in paths for path in self.reported):
            self.reported = {p: r for p, r in self.reported.items() if p in paths}


def path_matches(path: str, pattern: str) -> bool:
    """Whether ``expand`` could yield ``path`` for ``pattern`` (``**`` is any number of directories). Pure."""
    def match(names: list[str], parts: list[str]) -> bool:
        if not parts:
            return not names
        if parts[0] == "**":
            return any(match(names[i:], parts[1:]) for i in range(len(names) + 1))
        return bool(names) and fnmatchcase(names[0], parts[0]) and match(names[1:], parts[1:])

    return match(path.split(os.sep), pattern.split(os.sep))


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
    """Watches the patterns' directories with inotify (watchdog): a file created, moved or deleted sets
    ``changed`` (discovery runs again) and names its paths to ``touched``. After ``watch_content()``,
    the files written or truncated are named by ``written()``, which the reader asks at each poll
    (content_events.py: no thread, no wake-up), so that with many files a quiet one costs nothing
    until it changes."""

    def __init__(self, patterns: list[str], changed: threading.Event, wake: threading.Event,
                 touched: Callable[[str], None] | None = None):
        self.patterns = patterns
        self.changed = changed
        self.wake = wake
        self.touched = touched
        self.modified = None  # content_events.ModifiedFiles, once watch_content() was called
        self._observer = None
        self._watched: set[tuple[str, bool]] = set()

    @property
    def watching(self) -> bool:
        """Whether events arrive (watchdog started); False: everything is found by polling."""
        return self._observer is not None

    @property
    def content(self) -> bool:
        """Whether writes to files are reported (``written()``)."""
        return self.modified is not None

    def start(self) -> None:
        try:
            from watchdog.events import (DirCreatedEvent, FileCreatedEvent, FileDeletedEvent,
                                         FileMovedEvent, FileSystemEventHandler)
            from watchdog.observers import Observer
        except ImportError:  # pragma: no cover - watchdog is a dependency; polling still works
            log.warning("watchdog is not available; discovering new files by polling only")
            return
        changed, wake, touched = self.changed, self.wake, self.touched

        class Structure(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                if touched is not None:
                    touched(os.fsdecode(event.src_path))
                    if getattr(event, "dest_path", ""):
                        touched(os.fsdecode(event.dest_path))
                changed.set()
                wake.set()

        self._handler = Structure()
        self._event_filter = [FileCreatedEvent, FileMovedEvent, FileDeletedEvent, DirCreatedEvent]
        self._observer = Observer()
        self._observer.daemon = True
        self.refresh()
        try:
            self._observer.start()
        except OSError as exc:  # e.g. inotify limits reached
            log.warning("cannot watch directories (%s); discovering new files by polling only", exc)
            self._observer = None

    def watch_content(self, paths: Iterable[str]) -> None:
        """From now on, report writes to ``paths`` and to the files ``watch_file`` names."""
        if self._observer is None or self.modified is not None:
            return
        from .content_events import ModifiedFiles

        try:
            self.modified = ModifiedFiles()
        except (OSError, ImportError) as exc:
            log.warning("cannot watch files for writes (%s); every file is visited every poll", exc)
            return
        for path in paths:
            self.watch_file(path)

    def watch_file(self, path: str) -> None:
        if self.modified is not None:
            self.modified.watch(os.path.dirname(path))

    def unwatched(self) -> set[str]:
        """Directories whose writes are not reported (their files must be polled)."""
        return set() if self.modified is None else self.modified.unwatched

    def written(self) -> set[str] | None:
        """The files written since the last call (None: events were lost, look at every file)."""
        return set() if self.modified is None else self.modified.drain()

    def refresh(self) -> None:
        """Watch roots that exist now (a directory created later is picked up on the next call)."""
        if self._observer is None:
            return
        if self.modified is not None:
            self.modified.retry_unwatched()
        for pattern in self.patterns:
            root, recursive = watch_root(pattern)
            if (root, recursive) in self._watched or not os.path.isdir(root):
                continue
            try:
                self._observer.schedule(self._handler, root, recursive=recursive, event_filter=self._event_filter)
            except OSError as exc:
                log.warning("cannot watch %s (%s); relying on polling for it", root, exc)
                continue
            self._watched.add((root, recursive))

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=2)
            self._observer = None
        if self.modified is not None:
            self.modified.close()
            self.modified = None
