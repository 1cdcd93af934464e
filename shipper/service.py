"""The agent as a service: signals, reload, systemd notify and watchdog, the health server, termination notices.

The main thread only waits: SIGTERM/SIGINT (drain and exit), SIGHUP (reload), or a part
of the pipeline failing wake it. The signal handlers are installed before anything else
(:class:`Signals`), and a stop keeps one deadline, ``shutdown_timeout`` from the signal,
whatever it interrupts (a reload included). A reload validates the new configuration first and keeps
the old pipeline running when it is broken; otherwise it drains the old pipeline (every
record read is delivered, every checkpoint saved) and starts the new one, whose inputs
resume from those checkpoints: nothing is lost or read twice.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import threading
import time
from dataclasses import replace

from shipper import __version__
from shipper.config import (EMBEDDED_DEFAULT, Config, ConfigError, filter_name, load, redact_urls, source_of,
                            target_of)
from shipper.envfile import environment_with
from shipper.identity import ImdsClient, resolve_identity
from shipper.lifecycle import TerminationWatcher, lifecycle_batch
from shipper.server import AgentState, InputState, Server, output_problem
from shipper.stats import Stats
from shipper.systemd import Notifier, Watchdog

log = logging.getLogger("shipper")

EXIT_OK, EXIT_FAILED = 0, 1

# How long past the stop deadline (the signal + shutdown_timeout) the agent may take before it exits
# regardless (a checkpoint write on a hung disk, a close that blocks): well under the unit's
# TimeoutStopSec (45 s) with the default shutdown_timeout (20 s).
STOP_GRACE = 3.0


class Wakeup:
    """What the main thread sleeps on: set by a signal or by another thread, never polled.

    A signal is often delivered to another thread than the main one (the kernel picks any
    thread that does not block it); Python then runs its handler only when the main thread next
    runs Python code, which a thread blocked on a lock may not do for a minute. With
    ``signal.set_wakeup_fd`` the signal also writes a byte to a socket the main thread waits on.
    """

    def __init__(self):
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)

    def catch_signals(self) -> int:
        """Signals wake the main thread too (call from the main thread); returns the previous fd."""
        return signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)

    def set(self) -> None:
        try:
            self._write.send(b"\0")
        except (BlockingIOError, OSError):  # full: a wake-up is pending anyway
            pass

    def wait(self, timeout: float) -> None:
        select.select([self._read], [], [], timeout)
        try:
            while self._read.recv(4096):  # the pending signal handlers run before this returns
                pass
        except (BlockingIOError, OSError):
            pass


class Signals:
    """SIGTERM/SIGINT (stop) and SIGHUP (reload), caught from the first moment of `shipper run`.

    Python's default handlers would let a SIGHUP during start-up (reading the config, asking IMDS,
    making the AWS clients: a second or more) kill the agent, and a SIGTERM skip the clean stop.
    The handlers only record the signal and wake the main thread; :class:`Service` acts on it.
    Create in the main thread.
    """

    def __init__(self):
        self.wakeup = Wakeup()
        self.stop_at: float | None = None     # monotonic time of the first stop signal
        self.reload_at: float | None = None   # of the last SIGHUP not yet acted on
        self.stopping = threading.Event()     # for the stop guard (an Event: safe to set from a handler)
        self.wakeup.catch_signals()
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)

    @property
    def stop_requested(self) -> bool:
        return self.stop_at is not None

    @property
    def reload_requested(self) -> bool:
        return self.reload_at is not None

    def take_reload(self) -> bool:
        """True once per SIGHUP (or several close together) received."""
        requested, self.reload_at = self.reload_at is not None, None
        return requested

    def config_read(self, since: float) -> None:
        """The configuration file was read after ``since``: a SIGHUP from before asked for nothing more."""
        if self.reload_at is not None and self.reload_at < since:
            self.reload_at = None
            log.info("SIGHUP before the configuration was read: nothing to reload")

    def _on_stop(self, signum, frame) -> None:
        now = time.monotonic()
        if self.stop_at is not None:
            # One Ctrl-C often arrives twice (from the terminal and from a parent such as make):
            # only a signal well after the first means "stop now".
            if now - self.stop_at > 1.0:
                log.warning("second signal: exiting now (undelivered records are read again on the next start)")
                os._exit(EXIT_FAILED)
            return
        self.stop_at = now
        log.info("received %s: draining", signal.Signals(signum).name)
        self.stopping.set()
        self.wakeup.set()

    def _on_reload(self, signum, frame) -> None:
        self.reload_at = time.monotonic()
        self.wakeup.set()


class Service:
    def __init__(self, config: Config, config_path: str | None, environ: dict[str, str] | None = None,
                 signals: Signals | None = None, env_file: str | None = None):
        self.config = config
        self.config_path = config_path  # None: the embedded default, on reload too
        self.env_file = env_file
        self.stats = Stats()
        self.started = time.time()
        self.signals = signals or Signals()
        self.wakeup = self.signals.wakeup
        self.reloads = 0
        self.lifecycle: str | None = None
        self.lock = threading.Lock()  # guards self.pipeline against the watcher and the server
        self.changing = threading.Lock()  # held while a reload swaps pipelines
        self.notifier = Notifier(environ)
        cloud = config.cloud
        self.identity = resolve_identity(cloud.metadata, cloud.imds_endpoint, cloud.imds_timeout)
        self.pipeline = self._make_pipeline(config)
        self.server: Server | None = None
        self.watchdog: Watchdog | None = None
        self.watcher: TerminationWatcher | None = None

    def _make_pipeline(self, config: Config):
        from shipper.pipeline import Pipeline

        return Pipeline(config, identity=self.identity, wakeup=self.wakeup, stats=self.stats)

    # ------------------------------------------------------------ stopping

    def stop_deadline(self) -> float | None:
        """When the whole stop must be over: the first stop signal + shutdown_timeout (None: no stop yet)."""
        at = self.signals.stop_at
        return None if at is None else at + self.config.agent.shutdown_timeout

    def _guard_stop(self) -> None:
        """The stop's last resort, on its own thread: past the deadline (and STOP_GRACE), exit whatever
        still runs, so that systemd never has to kill the agent (TimeoutStopSec)."""
        self.signals.stopping.wait()
        deadline = self.stop_deadline()
        time.sleep(max(0.0, deadline + STOP_GRACE - time.monotonic()))
        log.error("the stop took longer than shutdown_timeout (%.0fs): exiting now; what was not confirmed "
                  "is read again on the next start", self.config.agent.shutdown_timeout)
        logging.shutdown()
        os._exit(EXIT_FAILED)

    # ------------------------------------------------------------ running

    def run(self) -> int:
        if self.signals.stop_requested:  # during start-up: nothing was read, nothing to deliver
            log.info("stopped during start-up, before reading anything")
            return EXIT_OK
        threading.Thread(target=self._guard_stop, name="stop-guard", daemon=True).start()
        self._announce(self.config)
        self.pipeline.start()
        self._start_server()
        self._start_watcher()
        self.notifier.ready(self._summary())
        if self.notifier.watchdog_seconds:
            self.watchdog = Watchdog(self.notifier, self._alive, self.notifier.watchdog_seconds)
            self.watchdog.start()
        while not (self.signals.stop_requested or self.pipeline.failed.is_set()):
            if self.signals.take_reload():  # also a SIGHUP received during start-up
                self.reload()
                continue  # a stop or another SIGHUP may have come meanwhile
            self.notifier.status(self._summary())
            self.wakeup.wait(60)
        self.notifier.stopping("draining: delivering what was read")
        if self.watcher:
            self.watcher.stop()
        complete = self.pipeline.stop()
        log.info("stopped%s", "" if complete else " with undelivered records")
        if self.watchdog:
            self.watchdog.stop()
        return EXIT_FAILED if self.pipeline.failed.is_set() or not complete else EXIT_OK

    def _announce(self, config: Config, what: str = "starting") -> None:
        log.info("shipper %s %s with %s", __version__, what, config.source)
        for settings in config.inputs:
            log.info("reading %s (%s, tag %s)", source_of(settings), settings.type, settings.tag)
        for settings in config.filters:
            log.info("filtering with %s (match %s)", filter_name(settings), ", ".join(settings.match))
        for settings in config.outputs:
            log.info("writing %s %s (match %s)", settings.type, target_of(settings), ", ".join(settings.match))
        log.info("state (checkpoints) in %s", os.path.abspath(config.agent.data_dir))

    def _summary(self) -> str:
        stats = self.stats
        text = (f"{int(stats.get('records_in'))} records in, {int(stats.get('records_out'))} out, "
                f"{int(stats.get('records_dropped'))} dropped")
        reasons: dict[str, float] = {}
        for (name, labels), value in stats.snapshot().items():
            if name == "records_dropped":
                reason = dict(labels).get("reason", "?")
                reasons[reason] = reasons.get(reason, 0) + value
        if reasons:
            text += " (" + ", ".join(f"{int(v)} {r}" for r, v in sorted(reasons.items())) + ")"
        unhealthy = [o.name for o in self.state().outputs if self._problem(o)]
        if unhealthy:
            text += f"; unhealthy: {', '.join(unhealthy)}"
        return text

    def _problem(self, output) -> str | None:
        return output_problem(output, self.config.server.unhealthy_after)

    def _alive(self) -> bool:
        """For the watchdog: every output runner has made progress within the watchdog period."""
        with self.lock:
            pipeline = self.pipeline
        return not pipeline.failed.is_set() and pipeline.stalled(self.notifier.watchdog_seconds) == []

    # ------------------------------------------------------------ reload

    def reload(self) -> bool:
        """Apply the configuration file again; False (old pipeline kept) when it is broken.

        Holds ``changing`` throughout, so a termination notice waits for the new pipeline instead
        of being emitted into the one that is draining. The drain and the wait for old uploads share
        one ``shutdown_timeout``; a stop requested meanwhile leaves the new pipeline unstarted (the
        main loop then finds the old one stopped), so the stop keeps its deadline.
        """
        log.info("received SIGHUP: reloading %s", self.config_path or EMBEDDED_DEFAULT)
        try:
            config = load(self.config_path, environment_with(self.env_file))
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %d problem(s) in %s: %s",
                      len(exc.problems), exc.source, redact_urls("; ".join(exc.problems)))
            self.stats.add("reloads_refused", 1)
            return False
        if self._stop_during_reload():
            return False
        with self.changing:
            old = self.pipeline
            deadline = time.monotonic() + old.config.agent.shutdown_timeout
            old.stop()  # drain: what was read is delivered and its checkpoints saved (by the deadline)
            old.wait_closed(max(0.0, deadline - time.monotonic()))  # no old upload left behind
            if self._stop_during_reload():
                return False
            try:
                pipeline = self._make_pipeline(config)
            except Exception as exc:  # e.g. a region that cannot be resolved: back to what ran
                log.error("reload failed, going back to the previous configuration: %s", exc)
                self.stats.add("reloads_refused", 1)
                config = self.config
                try:
                    pipeline = self._make_pipeline(config)
                except Exception:
                    log.exception("cannot start the previous configuration again; stopping (systemd restarts us)")
                    old.failed.set()
                    return False
            if self._stop_during_reload():  # made, never started: it has read nothing
                pipeline.close_inputs()
                return False
            with self.lock:
                self.pipeline, self.config = pipeline, config
            pipeline.start()
            if config is not old.config:
                self.reloads += 1
                self._announce(config, "reloaded")
                if (config.server.listen != old.config.server.listen
                        or config.cloud.termination_check_interval != old.config.cloud.termination_check_interval):
                    log.warning("[server] listen and [cloud] termination_check_interval apply at the next restart")
            if self.lifecycle:
                pipeline.flush_now()
            return config is not old.config

    def _stop_during_reload(self) -> bool:
        if self.signals.stop_requested:
            log.info("stop requested during the reload: the new configuration is not started")
        return self.signals.stop_requested

    # ------------------------------------------------------------ health server

    def state(self) -> AgentState:
        with self.lock:
            pipeline, config = self.pipeline, self.config
        now = time.monotonic()
        inputs = [InputState(getattr(source, "tag", "?"), config.inputs[index].type,
                             source.lag() if hasattr(source, "lag") else {},
                             beat.late_by(now) if (beat := getattr(source, "heartbeat", None)) else 0.0)
                  for index, source in enumerate(pipeline.inputs)]
        # Errors name endpoints: their credentials never reach /status, /healthz or systemd's STATUS.
        outputs = [replace(o, last_error=redact_urls(o.last_error)) if o.last_error else o
                   for o in pipeline.output_states()]
        return AgentState(self.started, self.identity, dict(config.agent.labels), self.stats.snapshot(),
                          outputs, inputs, config.server.unhealthy_after, self.reloads, self.lifecycle)

    def _start_server(self) -> None:
        listen = self.config.server.listen
        if not listen:
            return
        try:
            server = Server(listen, self.state, self.stats)
            server.start()
        except Exception as exc:  # the port is taken, no thread to be had: shipping matters more
            log.error("cannot serve /healthz and /metrics on %s: %s (shipping goes on without them)", listen, exc)
            return
        self.server = server
        log.info("serving /healthz, /metrics and /status on http://%s", self.server.address)

    # ------------------------------------------------------------ termination notices

    def _start_watcher(self) -> None:
        cloud = self.config.cloud
        if cloud.termination_check_interval <= 0 or "instance_id" not in self.identity:
            return
        imds = ImdsClient(cloud.imds_endpoint, cloud.imds_timeout)
        self.watcher = TerminationWatcher(imds, cloud.termination_check_interval, self._on_termination_notice)
        self.watcher.start()

    def _on_termination_notice(self, notice: dict[str, str]) -> None:
        when = f" at {notice['at']}" if notice.get("at") else ""
        message = f"termination notice ({notice['source']}): {notice['action']}{when}"
        log.warning("%s: shipping everything now", message)
        self.lifecycle = message
        self.stats.add("termination_notices", 1, source=notice["source"])
        with self.changing:  # not into a pipeline that a reload is draining
            pipeline = self.pipeline
            pipeline.flush_now()
            pipeline.record_lifecycle(lifecycle_batch("termination_notice", message, **notice))
        self.notifier.status(message)
