"""The health and metrics server on loopback: GET /healthz, /metrics (Prometheus text), /status (JSON).

One thread and a selector loop serve it, with a cap on connections and a deadline per request
(see :class:`Server`); a non-loopback address is refused unless ``allow_remote`` is set.

Nothing is counted per request or per record for it: a scrape reads the counters the
pipeline keeps anyway (:class:`shipper.stats.Stats`) and asks each output and input for
its state, through ``agent_state`` (a function, because a reload replaces the pipeline).

/status carries rates over the last minute (:class:`CounterHistory`): the server thread copies the
counters every 10 s, its only timer, so an input that samples every 10 s shows a steady rate.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import threading
import time
from collections import deque
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
    late_for: float = 0.0              # seconds past the time its thread promised to be back in its loop


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


# An input thread this late back to its loop is stuck (in an open, a read, a regex): unhealthy.
INPUT_LATE_AFTER = 60.0


def input_problem(state: InputState) -> str | None:
    if state.late_for > INPUT_LATE_AFTER:
        return f"stuck for {state.late_for:.0f}s (its thread did not come back to its loop)"
    return None


def health(state: AgentState) -> tuple[bool, dict[str, Any]]:
    problems = {o.name: p for o in state.outputs if (p := output_problem(o, state.unhealthy_after))}
    stuck = {i.name: p for i in state.inputs if (p := input_problem(i))}
    body = {"status": "unhealthy" if problems or stuck else "ok", "outputs": problems or None,
            "inputs": stuck or None}
    return not (problems or stuck), {k: v for k, v in body.items() if v is not None}


# ---------------------------------------------------------------- rates

Counters = dict[tuple[str, tuple[tuple[str, str], ...]], float]

RATE_WINDOW = 60.0      # /status rates cover the last minute (since the start while the agent is younger) ...
SNAPSHOT_EVERY = 10.0   # ... measured from copies of the counters this far apart


@dataclass(frozen=True)
class Baseline:
    """What the rates of /status are measured from: the counters ``seconds`` ago."""
    seconds: float
    counters: Counters
    since_start: bool   # the first copy, taken when the server started: the agent is younger than the window


class CounterHistory:
    """Copies of the counters every ``every`` seconds, only as many as cover ``window``.

    The rates are the growth since the newest copy at least ``window`` old (the oldest while the
    agent is younger), so they cover window..window+every seconds: a whole number of samples of an
    input sampling every 10 s, never the 0 or 1 of a one-second difference. Used by one thread only.
    """

    def __init__(self, now: float, counters: Counters, window: float = RATE_WINDOW, every: float = SNAPSHOT_EVERY):
        self.window = window
        self.every = every
        self.snapshots: deque[tuple[float, Counters]] = deque([(now, counters)])
        self.first = now
        self.next_at = now + every

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def add(self, now: float, counters: Counters) -> None:
        self.snapshots.append((now, counters))
        self.next_at = now + self.every  # after a stall: the next one in ``every``, not a burst to catch up
        while len(self.snapshots) > 1 and self.snapshots[1][0] <= now - self.window:
            self.snapshots.popleft()   # the next one is old enough to measure from

    def baseline(self, now: float) -> Baseline:
        """The newest copy at least ``window`` before ``now``, or the oldest while none is."""
        when, counters = self.snapshots[0]
        for moment, copy in self.snapshots:
            if moment > now - self.window:
                break
            when, counters = moment, copy
        return Baseline(max(0.0, now - when), counters, when == self.first)


def total(counters: Counters, name: str, **labels: str) -> float:
    """The sum of counter ``name`` over the series whose labels include ``labels``."""
    wanted = labels.items()
    return sum(value for (n, series), value in counters.items() if n == name and wanted <= dict(series).items())


def per_second(current: Counters, baseline: Baseline, name: str, **labels: str) -> float:
    """The growth of ``name`` (over the series with ``labels``) per second since ``baseline``.
    0 over no time at all; never negative (a counter that went down counts as still)."""
    if baseline.seconds <= 0:
        return 0.0
    grown = total(current, name, **labels) - total(baseline.counters, name, **labels)
    return round(max(0.0, grown) / baseline.seconds, 6)


def status_document(state: AgentState, baseline: Baseline | None = None) -> dict[str, Any]:
    """Everything `shipper status` shows, as JSON; with ``baseline``, each input's and output's
    records per second since then, and ``rates`` saying over how long."""
    healthy, _ = health(state)
    counters: dict[str, list[dict[str, Any]]] = {}
    for (name, labels), value in sorted(state.counters.items()):
        counters.setdefault(name, []).append({"labels": dict(labels), "value": value})
    outputs = [dict(asdict(o), problem=output_problem(o, state.unhealthy_after)) for o in state.outputs]
    inputs = [asdict(i) for i in state.inputs]
    rates = None
    if baseline is not None:
        rates = {"window_seconds": round(baseline.seconds, 1), "since_start": baseline.since_start}
        for item in inputs:
            item["records_per_second"] = per_second(state.counters, baseline, "records_in", input=item["name"])
        for item in outputs:
            item["records_per_second"] = per_second(state.counters, baseline, "records_out", output=item["name"])
    return {
        "version": __version__, "healthy": healthy, "uptime_seconds": round(time.time() - state.started, 1),
        "identity": state.identity, "labels": state.labels, "reloads": state.reloads,
        "lifecycle": state.lifecycle, "unhealthy_after": state.unhealthy_after,
        "rates": rates, "outputs": outputs, "inputs": inputs, "counters": counters,
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


# ---------------------------------------------------------------- listen addresses

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


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (::ffff:127.0.0.1); False for anything else."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone ("fe80::1%eth0") is not loopback anyway
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def remote_addresses(host: str, port: int) -> list[str] | str:
    """The addresses ``host`` resolves to now that other machines reach (none: loopback only), or
    why it cannot be resolved."""
    try:
        addresses = sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
    except (OSError, UnicodeError) as exc:
        return f"cannot resolve {host!r}: {exc}"
    return [a for a in addresses if not is_loopback(a)]


def remote_listen_problem(listen: str, allow_remote: bool) -> str | None:
    """Why ``listen`` would serve /status and /metrics to other machines, or None.

    A host name counts by what it resolves to now: every address must be loopback. "0.0.0.0" and
    "::" (every interface) are not."""
    if not listen or allow_remote:
        return None
    host, port = parse_listen(listen)
    remote = remote_addresses(host, port)
    if isinstance(remote, str):
        return f"{remote}; listen on an address such as \"127.0.0.1:{port}\""
    if not remote:
        return None
    return (f"{listen!r} is reachable from other machines ({', '.join(remote)}) and /status and /metrics show "
            f"the instance's identity, labels, paths and errors: listen on \"127.0.0.1:{port}\" or \"[::1]:{port}\", "
            f"or set [server] allow_remote = true to serve them to the network on purpose")


# ---------------------------------------------------------------- HTTP

# The server is one thread with a selector loop, never a thread per connection: a few hundred
# slow local clients once exhausted the unit's TasksMax and thread creation failed elsewhere.
MAX_CONNECTIONS = 8         # clients served at once; more are answered 503 and closed at once
REQUEST_DEADLINE = 5.0      # seconds for a whole request and its answer, however slowly the bytes come
MAX_REQUEST_BYTES = 8192    # the request line and headers (a GET has no body)
LISTEN_BACKLOG = 64
ACCEPT_PAUSE = 1.0          # out of descriptors: stop accepting for this long instead of spinning

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


def http_response(code: int, content_type: str, body: bytes, head_only: bool = False,
                  extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    headers = [f"HTTP/1.1 {code} {_REASONS.get(code, 'Unknown')}", f"Server: shipper/{__version__}",
               f"Content-Type: {content_type}", f"Content-Length: {len(body)}", "Connection: close",
               *(f"{name}: {value}" for name, value in extra)]
    return ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)


BUSY = http_response(503, "text/plain", b"busy: too many connections to the status server, try again\n")
TIMED_OUT = http_response(408, "text/plain", b"request not received in time\n")
TOO_LARGE = http_response(431, "text/plain", b"request headers too large\n")


def request_complete(data: bytes) -> bool:
    """The request line and headers have all arrived (a blank line ends them)."""
    return b"\r\n\r\n" in data or b"\n\n" in data


def answer(head: bytes, route: Callable[[str], tuple[int, str, bytes]]) -> bytes:
    """The whole HTTP response to one request's line and headers. ``route(path)`` gives code, type, body;
    an exception in it is answered 500 and logged (a bug must be seen, and must not stop the server)."""
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/") or not parts[1].startswith(b"/"):
        return http_response(400, "text/plain", b"bad request\n")
    method, target = parts[0], parts[1].decode("latin-1")
    if method not in (b"GET", b"HEAD"):
        return http_response(405, "text/plain", b"only GET and HEAD\n", extra=(("Allow", "GET, HEAD"),))
    path = target.split("?", 1)[0]
    try:
        code, content_type, body = route(path)
    except Exception:
        log.exception("server: %s failed", path[:200])
        code, content_type, body = 500, "text/plain", b"internal error (see the agent's log)\n"
    return http_response(code, content_type, body, head_only=method == b"HEAD")


class _Connection:
    __slots__ = ("sock", "deadline", "received", "reply", "answered")

    def __init__(self, sock, deadline: float):
        self.sock = sock
        self.deadline = deadline      # the whole request and answer, from the accept
        self.received = b""
        self.reply: memoryview | None = None  # set once the request is complete: what is left to send
        self.answered = False         # sent and half-closed: waiting for the client to close


class Server:
    """/healthz, /metrics and /status over HTTP/1.1, one request per connection, on one thread.

    Bounded whatever clients do: at most ``max_connections`` at once (others get a 503 and are closed
    at once), each given ``deadline`` seconds in total to send its request and take the answer, at most
    MAX_REQUEST_BYTES of request. Nothing here can reach the pipeline: every error is contained in
    this thread. ``stats`` counts the connections dropped (``server_connections_dropped{reason}``),
    and its counters are copied every ``snapshot_every`` seconds for the rates of /status (without
    ``stats``, the rates are measured from nothing at the start).
    """

    def __init__(self, listen: str, agent_state: Callable[[], AgentState], stats=None, *,
                 max_connections: int = MAX_CONNECTIONS, deadline: float = REQUEST_DEADLINE,
                 rate_window: float = RATE_WINDOW, snapshot_every: float = SNAPSHOT_EVERY):
        self.agent_state = agent_state
        self.stats = stats
        self._copy_counters: Callable[[], Counters] = stats.snapshot if stats is not None else dict
        self.history = CounterHistory(time.monotonic(), self._copy_counters(), rate_window, snapshot_every)
        self.max_connections = max_connections
        self.deadline = deadline
        self._exposition: list = []  # prometheus-client, imported at the first scrape (nobody scrapes: -1 MiB)
        host, port = parse_listen(listen)
        self.sock = socket.socket(_family(host), socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
            self.sock.listen(LISTEN_BACKLOG)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        bound = self.sock.getsockname()[1]
        self.address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._connections: dict[int, _Connection] = {}
        self._accept_paused_until: float | None = None
        self._last_warning = -float("inf")
        self._stopped = False
        self.thread = threading.Thread(target=self._serve, name="server", daemon=True)

    # ------------------------------------------------------------ routes

    def route(self, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            healthy, body = health(self.agent_state())
            return 200 if healthy else 503, "application/json", orjson.dumps(body)
        if path == "/metrics":
            return (200, *self._metrics_text())
        if path == "/status":
            baseline = self.history.baseline(time.monotonic())
            return 200, "application/json", orjson.dumps(status_document(self.agent_state(), baseline))
        return 404, "text/plain", b"not found: try /healthz, /metrics or /status\n"

    def _metrics_text(self) -> tuple[str, bytes]:
        if not self._exposition:  # only this thread serves: no lock needed
            from prometheus_client.core import CollectorRegistry
            from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Collector(self.agent_state))
            self._exposition.extend([CONTENT_TYPE_LATEST, lambda: generate_latest(registry)])
        return self._exposition[0], self._exposition[1]()

    # ------------------------------------------------------------ the loop

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stopped = True
        try:
            self._wake_write.send(b"\0")
        except OSError:
            pass
        self.thread.join(2)
        for sock in (self.sock, self._wake_read, self._wake_write):
            sock.close()

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.sock, selectors.EVENT_READ, "listen")
        selector.register(self._wake_read, selectors.EVENT_READ, "wake")
        try:
            while not self._stopped:
                try:
                    self._step(selector)
                except Exception:  # a bug here must end neither this thread nor the agent
                    self._warn("server: unexpected error (the server goes on)", exc_info=True)
                    time.sleep(0.1)  # never a hot loop on a persisting error
        finally:
            for connection in list(self._connections.values()):
                self._close(selector, connection)
            selector.close()

    def _step(self, selector) -> None:
        now = time.monotonic()
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            selector.register(self.sock, selectors.EVENT_READ, "listen")
        if self.history.due(now):
            self.history.add(now, self._copy_counters())  # a dict copy: idle, one wake-up every 10 s
        wake_at = [c.deadline for c in self._connections.values()]
        wake_at.append(self.history.next_at)
        if self._accept_paused_until is not None:
            wake_at.append(self._accept_paused_until)
        timeout = max(0.0, min(wake_at) - now)
        for key, events in selector.select(timeout):
            if key.data == "listen":
                self._accept(selector)
            elif key.data == "wake":
                try:
                    while self._wake_read.recv(64):
                        pass
                except OSError:
                    pass
            else:
                try:
                    self._service(selector, key.data, events)
                except OSError:  # the client went away
                    self._close(selector, key.data)
        now = time.monotonic()
        for connection in [c for c in self._connections.values() if now >= c.deadline]:
            if connection.reply is None:  # still sending its request: tell it, without waiting
                self._try_send(connection.sock, TIMED_OUT)
            if not connection.answered:
                self._count("deadline")
            self._close(selector, connection)

    def _accept(self, selector) -> None:
        for _ in range(LISTEN_BACKLOG):  # what is queued now; the selector brings the rest
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._warn(f"server: cannot accept connections ({exc.strerror}); pausing {ACCEPT_PAUSE:g}s")
                    selector.unregister(self.sock)
                    self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE
                    return
                continue  # ECONNABORTED and the like: that client is gone
            if len(self._connections) >= self.max_connections:
                try:  # what the client sent already: unread bytes at the close would reset the answer away
                    sock.recv(65536, socket.MSG_DONTWAIT)
                except OSError:
                    pass
                self._try_send(sock, BUSY)
                sock.close()
                self._count("too_many")
                self._warn(f"server: more than {self.max_connections} connections at once; refusing the others")
                continue
            sock.setblocking(False)
            connection = _Connection(sock, time.monotonic() + self.deadline)
            self._connections[sock.fileno()] = connection
            selector.register(sock, selectors.EVENT_READ, connection)

    def _service(self, selector, connection: _Connection, events: int) -> None:
        if connection.reply is None or connection.answered:
            try:
                data = connection.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                self._close(selector, connection)
                return
            if connection.answered:  # the rest of a request already answered (431): dropped
                return
            connection.received += data
            if request_complete(connection.received):
                reply = answer(connection.received, self.route)
            elif len(connection.received) > MAX_REQUEST_BYTES:
                reply = TOO_LARGE
                self._count("too_large")
            else:
                return
            connection.reply = memoryview(reply)
            selector.modify(connection.sock, selectors.EVENT_WRITE, connection)
        try:
            sent = connection.sock.send(connection.reply)
        except (BlockingIOError, InterruptedError):
            return
        connection.reply = connection.reply[sent:]
        if not connection.reply:
            # Half-close and wait (within the deadline) for the client to close: closing with
            # unread bytes would reset the connection, and the client might lose the answer.
            connection.sock.shutdown(socket.SHUT_WR)
            connection.answered = True
            selector.modify(connection.sock, selectors.EVENT_READ, connection)

    def _close(self, selector, connection: _Connection) -> None:
        self._connections.pop(connection.sock.fileno(), None)
        try:
            selector.unregister(connection.sock)
        except (KeyError, ValueError):
            pass
        connection.sock.close()

    @staticmethod
    def _try_send(sock, data: bytes) -> None:
        try:
            sock.send(data, socket.MSG_DONTWAIT)  # a best-effort word, never a wait
        except OSError:
            pass

    def _count(self, reason: str) -> None:
        if self.stats is not None:
            self.stats.add("server_connections_dropped", 1, reason=reason)

    def _warn(self, message: str, exc_info: bool = False) -> None:
        """At most one warning a minute: a flood of connections must not flood the journal too."""
        now = time.monotonic()
        if now - self._last_warning >= 60:
            self._last_warning = now
            log.warning("%s", message, exc_info=exc_info)


def _family(host: str):
    return socket.AF_INET6 if ":" in host else socket.AF_INET
