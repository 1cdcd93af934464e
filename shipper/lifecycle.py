"""Lifecycle records (the agent started, the instance is going away) and the termination watcher.

On EC2 the instance says it is about to go through IMDS: a Spot interruption notice at
``spot/instance-action`` (two minutes ahead) and an Auto Scaling scale-in at
``autoscaling/target-lifecycle-state`` ("Terminated"). The watcher asks every few seconds;
on a notice it emits one ``lifecycle`` record and switches every output to flush-now, so
the last minutes of a doomed server are shipped before it disappears.

The record is journaled first (``LifecycleRecords``, a journaled input of the pipeline's own), so a
crash between the notice and its delivery does not lose it: the restarted agent reads it again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

import orjson

from shipper.inputs.journaled import JournaledInput
from shipper.record import Batch

log = logging.getLogger(__name__)

TAG = "lifecycle"
SPOT_PATH = "meta-data/spot/instance-action"
AUTOSCALING_PATH = "meta-data/autoscaling/target-lifecycle-state"


def lifecycle_batch(event: str, message: str, **fields: str) -> Batch:
    """One record tagged ``lifecycle``: {"event": ..., "message": ..., more fields}."""
    return Batch(TAG, None, time.time(), messages=[message], fields=[{"event": event, **fields}])


class LifecycleRecords(JournaledInput):
    """The pipeline's input of lifecycle records: ``record`` journals one, the reader hands it on."""

    JOURNAL_BYTES = 4 * 1024 * 1024

    def __init__(self, data_dir: str, stats, checkpoint_interval: float):
        super().__init__(TAG, "lifecycle", os.path.join(data_dir, "journal", "lifecycle"), self.JOURNAL_BYTES,
                         stats, checkpoint_interval, "agent.data_dir")

    def record(self, batch: Batch) -> bool:
        """Journal the batch's records (fsynced); False when the journal refused them (counted), or is
        closed already (the pipeline is stopping: the caller hands the batch on itself)."""
        if self.stop.is_set():
            return False
        return self.journal_now(batch.tag, batch.message_list(), batch.fields or [None] * batch.count)


def termination_notice(spot: str | None, lifecycle_state: str | None) -> dict[str, str] | None:
    """What IMDS said, as record fields, when the instance is going away; None otherwise.

    ``spot``: the body of spot/instance-action (JSON, absent until a notice);
    ``lifecycle_state``: autoscaling/target-lifecycle-state ("InService", "Terminated", ...).
    """
    if spot:
        try:
            notice = orjson.loads(spot)
        except orjson.JSONDecodeError:
            notice = {}
        action = str(notice.get("action", "")) if isinstance(notice, dict) else ""
        if action in ("terminate", "stop", "hibernate"):
            return {"source": "spot", "action": action, "at": str(notice.get("time", ""))}
    if lifecycle_state and lifecycle_state.strip() == "Terminated":
        return {"source": "autoscaling", "action": "terminate", "at": ""}
    return None


class TerminationWatcher(threading.Thread):
    """Polls IMDS every ``interval`` seconds until a termination notice, then calls ``on_notice`` once."""

    def __init__(self, imds, interval: float, on_notice: Callable[[dict[str, str]], None]):
        super().__init__(name="termination-watcher", daemon=True)
        self.imds = imds
        self.interval = interval
        self.on_notice = on_notice
        self.stopped = threading.Event()
        self._failing = False

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                notice = termination_notice(self.imds.get(SPOT_PATH), self.imds.get(AUTOSCALING_PATH))
            except Exception as exc:  # IMDS briefly unreachable: ask again next time, say so once
                if not self._failing:
                    log.warning("cannot ask IMDS for termination notices: %s (retrying every %gs)", exc,
                                self.interval)
                    self._failing = True
                continue
            self._failing = False
            if notice is not None:
                self.on_notice(notice)
                return

    def stop(self) -> None:
        self.stopped.set()
