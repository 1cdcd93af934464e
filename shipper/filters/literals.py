"""Every occurrence of some literals in a blob: the triggers of the redact rules, found at C speed.

A redact rule names literals one of which each of its matches holds (``AKIA``, ``passw``, thirteen
digits): only the lines that hold one go through the rule's regex. Literals come in two kinds: raw
ones, compared byte for byte, and literals of the trigger *view* (VIEW_TABLE: letters lower-cased,
digits as "0", space, "-" and "_" as " "), so that ``api key`` also finds ``API_KEY`` and
``0000 0000`` every group of card digits.

:func:`trigger_finder` gives every occurrence of every literal, from one of two engines that give
the same answers (a test holds them to it):
- **hyperscan** (Vectorscan, the ``hyperscan`` package) when it imports: one scan of the blob itself
  for all literals, a view literal written as byte classes (``[aA]``, ``[0-9]``, ``[ _-]``) so no
  view is built. It runs in C at well under a nanosecond a byte with the GIL released, and calls
  back into Python only at an occurrence (rare: a secret-looking word);
- **re** otherwise: the view made with one bytes.translate, then one sre scan per anchor byte
  (:class:`ReFinder`), several nanoseconds a byte on a slow machine.
"""

from __future__ import annotations

import re
import threading

try:  # optional: an architecture without a wheel of it uses the re engine
    import hyperscan
except ImportError:  # pragma: no cover - the test environment has it
    hyperscan = None

# Triggers are searched in one view of a blob, made by one bytes.translate (same length, same
# offsets): letters lower-cased, digits as "0", space, "-" and "_" as " " (so "api key" stands for
# api_key and api-key, "0000 0000" for card groups).
VIEW_TABLE = bytes(b + 32 if 65 <= b <= 90 else 48 if 48 <= b <= 57 else 32 if b in (32, 45, 95) else b
                    for b in range(256))


def view_of(text: bytes) -> bytes:
    """The trigger view of some bytes (see VIEW_TABLE)."""
    return text.translate(VIEW_TABLE)


# How often a byte occurs in a log line (about 200 bytes; measured on the bench's mix of JSON, access and
# plain logs): a literal is searched from its rarest byte. A regex starting with one literal byte scans at
# C speed (sre's literal-prefix loop) and stops only at that byte, where a look-behind and a look-ahead
# check the rest: one such scan finds every literal that shares that byte (each bytes.find is a scan of
# its own, about as slow, and a short literal of common letters is slower still).
_LETTERS = {"e": 10.5, "s": 7.8, "t": 7.2, "a": 6.8, "i": 6.4, "r": 5.8, "p": 5.8, "o": 5.7, "n": 4.1,
            "l": 3.5, "c": 3.4, "d": 3.3, "u": 3.1, "h": 2.6, "g": 2.5, "v": 2.4, "m": 2.4, "f": 1.6,
            "b": 1.1, "k": 0.8, "w": 0.7, "z": 0.6, "q": 0.6, "x": 0.6, "y": 0.5, "j": 0.2}
VIEW_FREQUENCY = {**{ord(c): f for c, f in _LETTERS.items()}, 48: 20.0, 32: 30.0}
RAW_FREQUENCY = {**{ord(c): f for c, f in _LETTERS.items()}, **{c: 2.0 for c in range(48, 58)},
                  **{c: 0.4 for c in range(65, 91)}, 32: 25.0}
_ANCHOR_MAX = 3.5  # a literal whose rarest byte is more common than this is searched with bytes.find


class ReFinder:
    """Every occurrence of some literals in a text, at (nearly) one C scan per distinct anchor byte
    (the engine when hyperscan is not installed)."""

    def __init__(self, literals: dict[bytes, int], frequency: dict[int, float]):
        groups: dict[int, list[tuple[bytes, int, int]]] = {}
        self.finds: list[tuple[bytes, int]] = []
        best = {}
        for literal, mask in literals.items():
            anchor = min(range(len(literal)), key=lambda i: frequency.get(literal[i], 2.0))
            if frequency.get(literal[anchor], 2.0) > _ANCHOR_MAX or len(literal) > 64:
                self.finds.append((literal, mask))
            else:
                best[literal] = anchor
        for literal, anchor in best.items():
            groups.setdefault(literal[anchor], []).append((literal, anchor, literals[literal]))
        # Each scan is a pass over the whole text: a scan whose literals all hold another scan's
        # anchor byte is merged into that one (apikey found at its "k", with token, not at its "y").
        for byte in sorted(groups, key=lambda b: len(groups[b])):
            others = [other for other in groups if other != byte]
            moved = []
            for literal, _, mask in groups[byte]:
                at = [i for i in range(len(literal)) if literal[i] in others]
                if not at:
                    break
                moved.append((literal, min(at, key=lambda i: frequency.get(literal[i], 2.0)), mask))
            else:
                del groups[byte]
                for literal, at, mask in moved:
                    groups[literal[at]].append((literal, at, mask))
        self.scans = []
        for byte, entries in groups.items():
            # Zero-width after the anchor byte: the next search starts at the next byte, so no
            # occurrence is hidden inside another one.
            tails = "|".join(f"(?<={re.escape(lit[:at + 1].decode('latin-1'))})(?={re.escape(lit[at + 1:].decode('latin-1'))})"
                             for lit, at, _ in entries)
            regex = re.compile((re.escape(chr(byte)) + "(?:" + tails + ")").encode("latin-1"))
            self.scans.append((regex, entries))

    def hits(self, text: bytes, limit: int) -> list[tuple[int, int]] | None:
        """(position, mask) of each occurrence, unsorted; None when more than ``limit``."""
        found: list[tuple[int, int]] = []
        for regex, entries in self.scans:
            for match in regex.finditer(text):
                at = match.start()
                for literal, offset, mask in entries:  # every literal there (one may be another's prefix)
                    if text.startswith(literal, at - offset) and at >= offset:
                        found.append((at - offset, mask))
                if len(found) > limit:
                    return None
        for literal, mask in self.finds:
            at = text.find(literal)
            while at != -1:
                found.append((at, mask))
                if len(found) > limit:
                    return None
                at = text.find(literal, at + 1)
        return found


def _view_classes() -> dict[int, bytes]:
    """For each byte of the view, the raw bytes that the view shows as it (empty for "A", "5", "_")."""
    classes: dict[int, bytearray] = {}
    for raw in range(256):
        classes.setdefault(VIEW_TABLE[raw], bytearray()).append(raw)
    return {byte: bytes(classes.get(byte, b"")) for byte in range(256)}


_VIEW_CLASSES = _view_classes()


def _expression(literal: bytes, view: bool) -> bytes | None:
    """A hyperscan expression matching ``literal`` in the raw text (for a view literal: every raw
    text whose view it is); None when nothing can (a view literal holding a byte no view has)."""
    parts = []
    for byte in literal:
        options = _VIEW_CLASSES[byte] if view else bytes((byte,))
        if not options:
            return None
        escaped = "".join(f"\\x{option:02x}" for option in options)
        parts.append(escaped if len(options) == 1 else "[" + escaped + "]")
    return "".join(parts).encode("ascii")


class HyperscanFinder:
    """All literals in one hyperscan database, scanned over the raw text. Each thread scans with a
    scratch space of its own (a scratch serves one scan at a time; the scan releases the GIL)."""

    def __init__(self, raw: dict[bytes, int], view: dict[bytes, int]):
        expressions, self.lengths, self.masks = [], [], []
        for literals, is_view in ((raw, False), (view, True)):
            for literal, mask in literals.items():
                expression = _expression(literal, is_view)
                if expression is not None:
                    expressions.append(expression)
                    self.lengths.append(len(literal))
                    self.masks.append(mask)
        self.database = None
        if expressions:
            self.database = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
            self.database.compile(expressions=expressions, ids=list(range(len(expressions))),
                                  elements=len(expressions), flags=[0] * len(expressions))
        self._local = threading.local()

    def hits(self, blob: bytes, limit: int) -> list[tuple[int, int]] | None:
        """(position, mask) of each occurrence, unsorted; None when more than ``limit``."""
        found: list[tuple[int, int]] = []
        if self.database is None or not blob:
            return found
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = hyperscan.Scratch(self.database)
        lengths, masks, append = self.lengths, self.masks, found.append

        def occurrence(index: int, start: int, end: int, flags: int, context) -> bool:
            append((end - lengths[index], masks[index]))
            return len(found) > limit  # true ends the scan

        try:
            self.database.scan(blob, match_event_handler=occurrence, scratch=scratch)
        except hyperscan.ScanTerminated:
            return None
        return found


class ReFinderPair:
    """The re engine over a raw text: raw literals on it, view literals on its view."""

    def __init__(self, raw: dict[bytes, int], view: dict[bytes, int]):
        self.raw = ReFinder(raw, RAW_FREQUENCY) if raw else None
        self.view = ReFinder(view, VIEW_FREQUENCY) if view else None

    def hits(self, blob: bytes, limit: int) -> list[tuple[int, int]] | None:
        found: list[tuple[int, int]] = []
        for finder, is_view in ((self.raw, False), (self.view, True)):
            if finder is not None:
                hits = finder.hits(blob.translate(VIEW_TABLE) if is_view else blob, limit - len(found))
                if hits is None:
                    return None
                found += hits
        return found


ENGINES = ("hyperscan", "re") if hyperscan is not None else ("re",)


def trigger_finder(raw: dict[bytes, int], view: dict[bytes, int], engine: str | None = None):
    """A finder of every occurrence of the raw and the view literals (literal -> rule bit mask) in a
    raw text: ``.hits(blob, limit)``. ``engine`` is "hyperscan" or "re"; the fastest one by default.
    An empty literal occurs everywhere: only the re engine reports that (hyperscan refuses it)."""
    engine = engine or ENGINES[0]
    if engine == "hyperscan" and hyperscan is not None and not any(not literal for literal in (*raw, *view)):
        try:
            return HyperscanFinder(raw, view)
        except hyperscan.error:  # pragma: no cover - every literal compiles; kept as a safety net
            pass
    return ReFinderPair(raw, view)
