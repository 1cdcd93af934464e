"""The agent as a service: signals, reload, systemd notify and watchdog, the health server, termination notices.

The main thread only waits: SIGTERM/SIGINT (drain and exit), SIGHUP (reload), or a part
of the pipeline failing wake it. A reload validates the new configuration first and keeps
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

from shipper import __version__
from shipper.config import Config, ConfigError, load, source_of, target_of
from shipper.identity import ImdsClient, resolve_identity
from shipper.lifecycle import TerminationWatcher, lifecycle_batch
from shipper.server import AgentState, InputState, Server, output_problem
from shipper.stats import Stats
from shipper.systemd import Notifier, Watchdog

log = logging.getLogger("shipper")

EXIT_OK, EXIT_FAILED = 0, 1


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


class Service:
    def __init__(self, config: Config, config_path: str | None, environ: dict[str, str] | None = None):
        self.config = config
        self.config_path = config_path
        self.stats = Stats()
        self.started = time.time()
        self.wakeup = Wakeup()
        self.stop_requested = False
        self.reload_requested = False
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
        self._first_signal: float | None = None

    def _make_pipeline(self, config: Config):
        from shipper.pipeline import Pipeline

        return Pipeline(config, identity=self.identity, wakeup=self.wakeup, stats=self.stats)

    # ------------------------------------------------------------ signals

    def _on_stop_signal(self, signum, frame) -> None:
        now = time.monotonic()
        if self._first_signal is not None:
            # One Ctrl-C often arrives twice (from the terminal and from a parent such as make):
            # only a signal well after the first means "stop now".
            if now - self._first_signal > 1.0:
                log.warning("second signal: exiting now (undelivered records are read again on the next start)")
                os._exit(EXIT_FAILED)
            return
        self._first_signal = now
        log.info("received %s: draining", signal.Signals(signum).name)
        self.stop_requested = True
        self.wakeup.set()

    def _on_reload_signal(self, signum, frame) -> None:
        self.reload_requested = True
        self.wakeup.set()

    # ------------------------------------------------------------ running

    def run(self) -> int:
        self.wakeup.catch_signals()
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_reload_signal)
        self._announce(self.config)
        self.pipeline.start()
        self._start_server()
        self._start_watcher()
        self.notifier.ready(self._summary())
        if self.notifier.watchdog_seconds:
            self.watchdog = Watchdog(self.notifier, self._alive, self.notifier.watchdog_seconds)
            self.watchdog.start()
        while True:
            self.wakeup.wait(60)
            if self.stop_requested or self.pipeline.failed.is_set():
                break
            if self.reload_requested:
                self.reload_requested = False
                self.reload()
            self.notifier.status(self._summary())
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
        for settings in config.outputs:
            log.info("writing %s %s (match %s)", settings.type, target_of(settings), ", ".join(settings.match))
        log.info("state (checkpoints) in %s", os.path.abspath(config.agent.data_dir))

    def _summary(self) -> str:
        stats = self.stats
        text = (f"{int(stats.get('records_in'))} records in, {int(stats.get('records_out'))} out, "
                f"{int(stats.get('records_dropped'))} dropped")
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
        of being emitted into the one that is draining.
        """
        log.info("received SIGHUP: reloading %s", self.config_path or "the configuration")
        try:
            config = load(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %d problem(s) in %s: %s",
                      len(exc.problems), self.config_path, "; ".join(exc.problems))
            self.stats.add("reloads_refused", 1)
            return False
        with self.changing:
            old = self.pipeline
            old.stop()  # drain: what was read is delivered and its checkpoints saved
            old.wait_closed(old.config.agent.shutdown_timeout)  # no old upload left behind
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

    # ------------------------------------------------------------ health server

    def state(self) -> AgentState:
        with self.lock:
            pipeline, config = self.pipeline, self.config
        inputs = [InputState(getattr(source, "tag", "?"), config.inputs[index].type,
                             source.lag() if hasattr(source, "lag") else {})
                  for index, source in enumerate(pipeline.inputs)]
        return AgentState(self.started, self.identity, dict(config.agent.labels), self.stats.snapshot(),
                          pipeline.output_states(), inputs, config.server.unhealthy_after, self.reloads,
                          self.lifecycle)

    def _start_server(self) -> None:
        listen = self.config.server.listen
        if not listen:
            return
        try:
            self.server = Server(listen, self.state)
        except OSError as exc:  # the port is taken: shipping matters more than the status page
            log.error("cannot serve /healthz and /metrics on %s: %s (shipping goes on without them)", listen, exc)
            return
        self.server.start()
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
            pipeline.emit(lifecycle_batch("termination_notice", message, **notice))
        self.notifier.status(message)
