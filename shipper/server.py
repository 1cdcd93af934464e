"""The health and metrics server on loopback: GET /healthz, /metrics (Prometheus text), /status (JSON).

Nothing is counted per request or per record for it: a scrape reads the counters the
pipeline keeps anyway (:class:`shipper.stats.Stats`) and asks each output and input for
its state, through ``agent_state`` (a function, because a reload replaces the pipeline).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import orjson

from shipper import __version__

log = logging.getLogger(__name__)


@dataclass
class OutputState:
    name: str                          # "s3.1"
    buffered_bytes: int                # waiting in memory (and in the spool, for S3)
    pending: int                       # batches accepted and not yet confirmed
    oldest_unsent_age: float | None    # seconds since the oldest unconfirmed record was read
    failing_for: float | None          # seconds of continuous delivery failures
    last_error: str | None
    hold_seconds: float                # how long the output holds records by design (upload_interval)


@dataclass
class InputState:
    name: str                          # the tag
    type: str
    lag: dict[str, int] = field(default_factory=dict)  # per file: bytes not yet confirmed by every output


@dataclass
class AgentState:
    started: float                     # time.time() of the start (not of the last reload)
    identity: dict[str, str]
    labels: dict[str, str]
    counters: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    outputs: list[OutputState]
    inputs: list[InputState]
    unhealthy_after: float
    reloads: int = 0
    lifecycle: str | None = None       # "terminating: spot ..." once a termination notice came


def output_problem(state: OutputState, unhealthy_after: float) -> str | None:
    """Why an output is unhealthy, or None: it delivered within ``unhealthy_after`` (plus what it
    holds by design) or has nothing to send."""
    if state.failing_for is not None and state.failing_for > unhealthy_after:
        return f"delivery failing for {state.failing_for:.0f}s: {state.last_error or 'unknown error'}"
    age = state.oldest_unsent_age
    if age is not None and age > unhealthy_after + state.hold_seconds:
        return f"oldest unsent record read {age:.0f}s ago (limit {unhealthy_after + state.hold_seconds:.0f}s)"
    return None


def health(state: AgentState) -> tuple[bool, dict[str, Any]]:
    problems = {o.name: p for o in state.outputs if (p := output_problem(o, state.unhealthy_after))}
    body = {"status": "unhealthy" if problems else "ok", "outputs": problems or None}
    return not problems, {k: v for k, v in body.items() if v is not None}


def status_document(state: AgentState) -> dict[str, Any]:
    """Everything `shipper status` shows, as JSON."""
    healthy, _ = health(state)
    counters: dict[str, list[dict[str, Any]]] = {}
    for (name, labels), value in sorted(state.counters.items()):
        counters.setdefault(name, []).append({"labels": dict(labels), "value": value})
    return {
        "version": __version__, "healthy": healthy, "uptime_seconds": round(time.time() - state.started, 1),
        "identity": state.identity, "labels": state.labels, "reloads": state.reloads,
        "lifecycle": state.lifecycle, "unhealthy_after": state.unhealthy_after,
        "outputs": [dict(asdict(o), problem=output_problem(o, state.unhealthy_after)) for o in state.outputs],
        "inputs": [asdict(i) for i in state.inputs],
        "counters": counters,
    }


# ---------------------------------------------------------------- Prometheus

def metric_families(state: AgentState) -> list:
    """Prometheus metric families for one scrape: every counter, and the gauges of the moment."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

    families: list = []
    by_name: dict[str, list[tuple[dict[str, str], float]]] = {}
    for (name, labels), value in state.counters.items():
        by_name.setdefault(name, []).append((dict(labels), value))
    for name, series in sorted(by_name.items()):
        keys = sorted({key for labels, _ in series for key in labels})
        family = CounterMetricFamily(f"shipper_{name}", f"shipper's {name.replace('_', ' ')} counter", labels=keys)
        for labels, value in series:
            family.add_metric([labels.get(key, "") for key in keys], value)
        families.append(family)

    def gauge(name: str, help_text: str, labels: list[str], rows) -> None:
        family = GaugeMetricFamily(f"shipper_{name}", help_text, labels=labels)
        for values, value in rows:
            family.add_metric(values, value)
        families.append(family)

    outputs = state.outputs
    gauge("output_buffer_bytes", "Bytes waiting to be delivered (memory and spool)", ["output"],
          [([o.name], o.buffered_bytes) for o in outputs])
    gauge("output_pending_batches", "Batches accepted and not yet confirmed", ["output"],
          [([o.name], o.pending) for o in outputs])
    gauge("output_oldest_unsent_seconds", "Age of the oldest record not yet confirmed (0: none)", ["output"],
          [([o.name], o.oldest_unsent_age or 0.0) for o in outputs])
    gauge("output_failing_seconds", "Seconds of continuous delivery failures (0: delivering)", ["output"],
          [([o.name], o.failing_for or 0.0) for o in outputs])
    gauge("output_healthy", "1 when the output delivers (see /healthz)", ["output"],
          [([o.name], 0.0 if output_problem(o, state.unhealthy_after) else 1.0) for o in outputs])
    gauge("file_checkpoint_lag_bytes", "Bytes of a followed file not yet confirmed by every output",
          ["input", "path"], [([i.name, path], lag) for i in state.inputs for path, lag in sorted(i.lag.items())])
    gauge("uptime_seconds", "Seconds since the agent started", [], [([], time.time() - state.started)])
    gauge("reloads", "Configuration reloads (SIGHUP) applied", [], [([], state.reloads)])
    gauge("terminating", "1 once the instance announced its termination", [], [([], 1.0 if state.lifecycle else 0.0)])
    info = InfoMetricFamily("shipper_build", "The agent's version and where it runs")
    info.add_metric([], {"version": __version__, **{k: v for k, v in state.identity.items() if v},
                         **{f"label_{k}": v for k, v in state.labels.items()}})
    families.append(info)
    return families


class _Collector:
    def __init__(self, agent_state: Callable[[], AgentState]):
        self.agent_state = agent_state

    def collect(self):
        return metric_families(self.agent_state())


# ---------------------------------------------------------------- HTTP

def parse_listen(listen: str) -> tuple[str, int]:
    """"127.0.0.1:2020" -> ("127.0.0.1", 2020); "[::1]:2020" for IPv6. Raises ValueError."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host or not 0 <= int(port) <= 65535:
        raise ValueError(f"{listen!r} is not host:port (e.g. \"127.0.0.1:2020\")")
    return host.strip("[]"), int(port)


def check_listen(listen: str) -> str | None:
    if listen == "":
        return None
    try:
        parse_listen(listen)
    except ValueError as exc:
        return str(exc)
    return None


class Server:
    """A small threaded HTTP server; each request runs on its own short-lived thread."""

    def __init__(self, listen: str, agent_state: Callable[[], AgentState]):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        exposition: list = []  # prometheus-client, imported at the first scrape (an agent nobody scrapes: -1 MiB)
        lock = threading.Lock()

        def metrics_text() -> tuple[str, bytes]:
            with lock:
                if not exposition:
                    from prometheus_client.core import CollectorRegistry
                    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

                    registry = CollectorRegistry(auto_describe=False)
                    registry.register(_Collector(agent_state))
                    exposition.extend([CONTENT_TYPE_LATEST, lambda: generate_latest(registry)])
            return exposition[0], exposition[1]()

        class Handler(BaseHTTPRequestHandler):
            server_version = f"shipper/{__version__}"
            timeout = 10  # a client that connects and says nothing does not hold a thread forever

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/healthz":
                        healthy, body = health(agent_state())
                        self._reply(200 if healthy else 503, "application/json", orjson.dumps(body))
                    elif path == "/metrics":
                        self._reply(200, *metrics_text())
                    elif path == "/status":
                        self._reply(200, "application/json", orjson.dumps(status_document(agent_state())))
                    else:
                        self._reply(404, "text/plain", b"not found: try /healthz, /metrics or /status\n")
                except OSError:  # the client went away
                    pass
                except Exception:  # a bug must not kill the server thread, nor go unseen
                    log.exception("server: %s failed", path)
                    try:
                        self._reply(500, "text/plain", b"internal error (see the agent's log)\n")
                    except OSError:
                        pass

            def _reply(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # no log line per request
                pass

        host, port = parse_listen(listen)
        ThreadingHTTPServer.address_family = _family(host)
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.address = f"{host}:{self.httpd.server_address[1]}"
        self.httpd.timeout = None  # handle_request() blocks until a request: no idle wake-ups
        self._stopped = False
        self.thread = threading.Thread(target=self._serve, name="server", daemon=True)

    def _serve(self) -> None:
        while not self._stopped:
            self.httpd.handle_request()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        import socket

        self._stopped = True
        try:  # wake the blocking accept
            host, port = parse_listen(self.address)
            socket.create_connection((host, port), timeout=1).close()
        except OSError:
            pass
        self.thread.join(2)
        self.httpd.server_close()


def _family(host: str):
    import socket

    return socket.AF_INET6 if ":" in host else socket.AF_INET
