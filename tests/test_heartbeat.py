"""Input heartbeats: a stuck input thread is seen by the watchdog's and /healthz's question."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from shipper.heartbeat import Heartbeat, late_inputs


def stuck_input(tag: str, beat: Heartbeat) -> SimpleNamespace:
    return SimpleNamespace(tag=tag, settings=SimpleNamespace(type="file", id=None), heartbeat=beat)


def test_an_input_past_its_promised_return_is_late_and_a_quiet_one_is_not():
    quiet, stuck = Heartbeat(), Heartbeat()
    quiet.beat(3600)  # a metrics input waiting an hour for its next sample is not late
    stuck.beat(0)
    time.sleep(0.05)
    inputs = [stuck_input("quiet", quiet), stuck_input("stuck", stuck), SimpleNamespace(tag="no heartbeat")]
    assert late_inputs(inputs, 0.01) == ["input file:stuck"]
    assert late_inputs(inputs, 60) == []


def test_waiting_for_room_in_the_outputs_is_not_being_stuck():
    beat = Heartbeat()
    beat.beat(0)
    entered, leave = threading.Event(), threading.Event()

    def emit_blocked_by_backpressure():
        with beat.paused():
            entered.set()
            leave.wait(5)

    thread = threading.Thread(target=emit_blocked_by_backpressure)
    thread.start()
    entered.wait(5)
    time.sleep(0.05)
    assert late_inputs([stuck_input("app", beat)], 0.01) == []
    leave.set()
    thread.join()
    assert late_inputs([stuck_input("app", beat)], 0.01) == ["input file:app"]


def test_a_new_input_has_a_grace_period_for_its_start_up():
    beat = Heartbeat()
    assert beat.late_by(time.monotonic() + Heartbeat.STARTUP_GRACE - 1) == 0.0
    assert beat.late_by(time.monotonic() + Heartbeat.STARTUP_GRACE + 5) > 0


def test_a_stuck_input_makes_healthz_unhealthy():
    from shipper.server import INPUT_LATE_AFTER, AgentState, InputState, health

    def state(late_for):
        return AgentState(0.0, {}, {}, {}, [], [InputState("app", "file", {}, late_for)], 300.0)

    assert health(state(1.0)) == (True, {"status": "ok"})
    healthy, body = health(state(INPUT_LATE_AFTER + 1))
    assert not healthy and body["status"] == "unhealthy" and "stuck" in body["inputs"]["app"]
