"""Crash-loop protection: input that made the agent exit twice is moved past on the next start.

A record can fail without stopping the agent (``record.repair``, ``RecordBuilder.build``), but
a bug in an output's I/O may still stop it. Then systemd restarts the agent, it reads the same
lines again, and may fail on them again, forever: nothing else would ship meanwhile. So when
an output fails, the byte ranges it had been handed and not confirmed are written down as
*strikes*, with their file's (device, inode); a range of the same file struck by two failures in
a row (no clean stop between them: ``clear``) is skipped once by the next start, without being
read (confirmed unshipped, counted as ``records_dropped{reason="quarantined"}``, logged with its
file and offsets). The output cannot say which of the batches it held made it fail, so all of
them are struck: the price of never looping is what that output held at the second failure.

The file is small JSON in ``data_dir``; it is written with the same care as checkpoints.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Iterable, NamedTuple

import orjson

from shipper.durable import write_atomically

log = logging.getLogger(__name__)

FILE_NAME = "quarantine.json"
STRIKES_TO_QUARANTINE = 2
MAX_ENTRIES = 1000  # a failure with more unconfirmed batches than this keeps the first ones


class Strike(NamedTuple):
    source: str
    start: int
    end: int
    count: int
    identity: tuple[int, int] | None = None  # (device, inode) of the file, when known


def merge_strikes(previous: Iterable[Strike], failed: Iterable[tuple]) -> list[Strike]:
    """The strikes after one more failure: a failed range (source, start, end[, identity])
    overlapping an earlier strike of the same file counts one more; ranges that were not
    involved this time are forgotten (in a row)."""
    by_source: dict[str, list[Strike]] = {}
    for strike in previous:
        by_source.setdefault(strike.source, []).append(strike)
    merged: list[Strike] = []
    for source, start, end, *rest in failed:
        identity = tuple(rest[0]) if rest and rest[0] is not None else None
        count = 1 + max((s.count for s in by_source.get(source, ())
                         if s.start < end and start < s.end and s.identity == identity), default=0)
        merged.append(Strike(source, start, end, count, identity))
        if len(merged) >= MAX_ENTRIES:
            break
    return merged


def overlapping(strikes: Iterable[Strike], source: str, start: int, end: int,
                identity: tuple[int, int] | None = None) -> Strike | None:
    """The quarantined strike (struck often enough) that a range [start, end) of a file touches."""
    for strike in strikes:
        if (strike.count >= STRIKES_TO_QUARANTINE and strike.source == source and strike.identity == identity
                and strike.start < end and start < strike.end):
            return strike
    return None


class Quarantine:
    def __init__(self, data_dir: str):
        self.path = os.path.join(data_dir, FILE_NAME)
        self.lock = threading.Lock()  # two outputs may fail at once

    def load(self) -> list[Strike]:
        try:
            with open(self.path, "rb") as handle:
                entries = orjson.loads(handle.read(1 << 20))["strikes"]
            return [Strike(str(e["source"]), int(e["start"]), int(e["end"]), int(e["count"]),
                           tuple(e["identity"]) if e.get("identity") else None) for e in entries]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a damaged file protects nothing: start over
            log.warning("ignoring %s: %s", self.path, exc)
            return []

    def save(self, strikes: list[Strike]) -> None:
        data = orjson.dumps({"strikes": [s._asdict() for s in strikes]})
        write_atomically(self.path, data)

    def strike(self, failed: list[tuple]) -> None:
        """An output failed holding these unconfirmed ranges, (source, start, end, identity):
        write them down (never raises)."""
        try:
            with self.lock:
                strikes = merge_strikes(self.load(), failed)
                self.save(strikes)
        except Exception as exc:  # the agent is stopping anyway: say so, do not mask the failure
            log.error("cannot write %s: %s", self.path, exc)
            return
        quarantined = [s for s in strikes if s.count >= STRIKES_TO_QUARANTINE]
        if quarantined:
            log.error("%d batches failed twice in a row; the next start moves past them (first: %s at %d-%d)",
                      len(quarantined), quarantined[0].source, quarantined[0].start, quarantined[0].end)

    def clear(self) -> None:
        """A clean stop: failures since are not "in a row" with those before."""
        with self.lock:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("cannot remove %s: %s", self.path, exc)

    def take(self) -> list[Strike]:
        """The quarantined strikes, for this start only: once read they are removed from the file."""
        strikes = self.load()
        quarantined = [s for s in strikes if s.count >= STRIKES_TO_QUARANTINE]
        if quarantined:
            try:
                self.save([s for s in strikes if s.count < STRIKES_TO_QUARANTINE])
            except Exception as exc:
                log.error("cannot write %s: %s", self.path, exc)
        return quarantined
