"""Listening sockets of the network inputs (forward, syslog): TCP and Unix stream sockets served a
thread per connection up to a cap, datagram sockets, TLS, and the checks ``shipper check`` runs.

Bounded by construction: at most ``max_connections`` connections (one more is accepted and closed at
once, counted), every read waits at most ``POLL`` seconds so a stop is seen, and a connection silent
for ``idle_timeout`` is closed. What a connection does with its bytes is the input's ``serve``.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import socket
import ssl
import stat
import threading
import time
from typing import Callable

from shipper.config import Option
from shipper.errors import ConfigError
from shipper.server import parse_listen, remote_addresses

log = logging.getLogger(__name__)

POLL = 0.5   # how long a blocking call waits before looking at the stop flag again


def _check_mode(value: str) -> str | None:
    try:
        mode = int(value, 8)
    except ValueError:
        return f"{value!r} is not an octal mode such as \"0660\""
    return None if 0 <= mode <= 0o777 else f"{value!r} is not a mode between 0000 and 0777"


# The options every listening input has (each adds its own defaults for listen and socket).
LISTENER_OPTIONS = {
    "allow_remote": Option("bool", False),          # a listen address other machines reach, on purpose
    "socket_mode": Option("str", "0660", check=_check_mode),
    "socket_group": Option("str", ""),               # the group that may write to the socket ("": the agent's)
    # A thread each: the systemd unit's TasksMax=128 holds the agent's threads and these together.
    "max_connections": Option("int", 64, minimum=1, maximum=10_000),
    "idle_timeout": Option("duration", 600.0, minimum=1.0),
    "journal_max_bytes": Option("size", 256 * 1024**2, minimum=1024**2),
    "tls_cert": Option("str", ""),                   # PEM certificate (chain) and key: TCP becomes TLS
    "tls_key": Option("str", ""),
    "tls_ca": Option("str", ""),                     # clients must present a certificate this CA signed
}


# ---------------------------------------------------------------- checks (pure, or reading only)

def remote_problem(where: str, listen: str, allow_remote: bool) -> str | None:
    """A listen address other machines reach needs allow_remote = true: events from the network
    become records of this instance, and a forward port is not authenticated unless shared_key is set."""
    if not listen or allow_remote:
        return None
    host, port = parse_listen(listen)
    remote = remote_addresses(host, port)
    if isinstance(remote, str):
        return f"{where}.listen: {remote}"
    if not remote:
        return None
    return (f"{where}.listen: {listen!r} is reachable from other machines ({', '.join(remote)}): anyone there could "
            f"write records as this instance; listen on \"127.0.0.1:{port}\", or set allow_remote = true "
            f"(with shared_key or TLS) to receive from the network on purpose")


def socket_problems(where: str, path: str, group: str) -> list[str]:
    """What would stop the input from making its Unix socket at ``path`` (read-only checks)."""
    problems = []
    directory = os.path.dirname(os.path.abspath(path)) or "/"
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        parent = os.path.dirname(directory)
        if not os.access(parent, os.W_OK | os.X_OK):
            problems.append(f"{where}.socket: its directory {directory} does not exist and {parent} is not "
                            f"writable by this user (systemd's RuntimeDirectory=shipper makes /run/shipper)")
        info = None
    except OSError as exc:
        problems.append(f"{where}.socket: cannot look at {directory}: {exc.strerror}")
        info = None
    if info is not None:
        if not stat.S_ISDIR(info.st_mode):
            problems.append(f"{where}.socket: {directory} is not a directory")
        elif info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
            problems.append(f"{where}.socket: {directory} is writable by everyone without the sticky bit: anyone "
                            f"could replace the socket; use a directory of the agent's (/run/shipper)")
        elif not os.access(directory, os.W_OK | os.X_OK):
            problems.append(f"{where}.socket: {directory} is not writable by this user")
    try:
        existing = os.lstat(path)
    except OSError:
        existing = None
    if existing is not None and not stat.S_ISSOCK(existing.st_mode):
        problems.append(f"{where}.socket: {path} exists and is not a socket; the agent never replaces it")
    if group:
        try:
            grp.getgrnam(group)
        except KeyError:
            problems.append(f"{where}.socket_group: no group {group!r} on this machine")
    return problems


def tls_problems(where: str, settings) -> list[str]:
    if bool(settings.tls_cert) != bool(settings.tls_key):
        return [f"{where}.{'tls_key' if settings.tls_cert else 'tls_cert'}: required with "
                f"{'tls_cert' if settings.tls_cert else 'tls_key'} (TLS needs a certificate and its key)"]
    if settings.tls_ca and not settings.tls_cert:
        return [f"{where}.tls_cert: required with tls_ca (client certificates are checked over TLS only)"]
    return []


def in_use_problem(where: str, listen: str, kind: int = socket.SOCK_STREAM) -> str | None:
    """Whether ``listen`` can be bound now (``shipper check``: a running agent holds its own, so this
    is said as a warning there)."""
    if not listen:
        return None
    try:
        sock = bind_inet(listen, kind)
    except ConfigError as exc:
        return f"{where}.listen: {exc.problems[0].split(': ', 1)[-1]}"
    sock.close()
    return None


# ---------------------------------------------------------------- sockets

def bind_inet(listen: str, kind: int = socket.SOCK_STREAM, where: str = "listen") -> socket.socket:
    host, port = parse_listen(listen)
    try:
        infos = socket.getaddrinfo(host, port, type=kind)
    except (OSError, UnicodeError) as exc:
        raise ConfigError([f"{where}: cannot resolve {host!r}: {exc}"]) from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
    except OSError as exc:
        sock.close()
        why = "the address is in use (another agent, or this one already running?)" \
            if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ConfigError([f"{where}: cannot listen on {listen}: {why}"]) from None
    sock.settimeout(POLL)
    return sock


def bind_unix(path: str, kind: int, mode: int, group: str, where: str = "socket") -> socket.socket:
    """A Unix socket at ``path`` with ``mode`` and ``group``. A socket left by an earlier run is replaced;
    anything else at the path is refused (never removed)."""
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        raise ConfigError([f"{where}: cannot look at {path}: {exc.strerror}"]) from None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise ConfigError([f"{where}: {path} exists and is not a socket; remove it or choose another path"])
        os.unlink(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise ConfigError([f"{where}: cannot make {directory}: {exc.strerror}"]) from None
    sock = socket.socket(socket.AF_UNIX, kind)
    old_umask = os.umask(0o177)  # never a moment with a socket anyone may write to
    try:
        sock.bind(path)
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
        gid = grp.getgrnam(group).gr_gid if group else -1
        os.chown(path, -1, gid)
        os.chmod(path, mode)
    except (OSError, KeyError) as exc:
        sock.close()
        raise ConfigError([f"{where}: cannot make the socket {path}: {getattr(exc, 'strerror', None) or exc}"]) from None
    finally:
        os.umask(old_umask)
    sock.settimeout(POLL)
    return sock


def server_tls_context(settings, where: str) -> ssl.SSLContext | None:
    if not settings.tls_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"{where}.tls_cert: cannot load the certificate and its key: {exc}"]) from None
    if settings.tls_ca:
        try:
            context.load_verify_locations(settings.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError([f"{where}.tls_ca: cannot load {settings.tls_ca!r}: {exc}"]) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class StreamServer:
    """Accepts on listening sockets, one thread per connection up to ``max_connections``."""

    def __init__(self, name: str, sockets: list[tuple[socket.socket, ssl.SSLContext | None]],
                 serve: Callable[[socket.socket, str], None], max_connections: int, stats, stop: threading.Event):
        self.name = name
        self.sockets = sockets
        self.serve = serve
        self.max_connections = max_connections
        self.stats = stats
        self.stop = stop
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for sock, context in self.sockets:
            thread = threading.Thread(target=self._accept, args=(sock, context), name=f"{self.name}-accept",
                                      daemon=True)
            thread.start()
            self.threads.append(thread)

    def _accept(self, listener: socket.socket, context: ssl.SSLContext | None) -> None:
        while not self.stop.is_set():
            try:
                conn, address = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self.stop.is_set() or exc.errno == errno.EBADF:
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.stats.add("connections_refused", 1, input=self.name, reason="no_descriptors")
                    time.sleep(POLL)  # out of descriptors: never a busy loop
                continue
            peer = address if isinstance(address, str) and address else (
                f"{address[0]}:{address[1]}" if isinstance(address, tuple) else "unix")
            with self.lock:
                full = len(self.connections) >= self.max_connections
                if not full:
                    self.connections.add(conn)
            if full:
                self.stats.add("connections_refused", 1, input=self.name, reason="max_connections")
                conn.close()
                continue
            self.stats.add("connections", 1, input=self.name)
            threading.Thread(target=self._serve, args=(conn, peer, context), name=f"{self.name}-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket, peer: str, context: ssl.SSLContext | None) -> None:
        sock = conn
        try:
            conn.settimeout(POLL * 10)
            if context is not None:
                try:
                    sock = context.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    self.stats.add("connection_errors", 1, input=self.name, reason="tls")
                    log.warning("%s: TLS handshake with %s failed: %s", self.name, peer, exc)
                    return
            sock.settimeout(POLL)
            self.serve(sock, peer)
        except Exception:  # a bug in serving one connection: that connection only
            self.stats.add("connection_errors", 1, input=self.name, reason="internal")
            log.exception("%s: serving %s failed; the connection is closed", self.name, peer)
        finally:
            with self.lock:
                self.connections.discard(conn)
            try:
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        for sock, _ in self.sockets:
            try:  # wakes the accepting thread now: until its accept returns, the address stays taken
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join(POLL * 2)
        with self.lock:
            connections = list(self.connections)
        for conn in connections:  # their threads see the stop flag within POLL; this wakes them now
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def recv_some(sock: socket.socket, stop: threading.Event, idle_timeout: float, size: int = 256 * 1024,
              deadline: float | None = None) -> bytes | None:
    """The next bytes of a connection; b"" at its end; None when stopping, idle for ``idle_timeout``,
    or past ``deadline`` (monotonic: what a peer that drips a byte at a time cannot push back)."""
    idle_since = time.monotonic()
    while not stop.is_set():
        if deadline is not None and time.monotonic() >= deadline:
            return None
        try:
            data = sock.recv(size)
        except (TimeoutError, ssl.SSLWantReadError):
            if time.monotonic() - idle_since >= idle_timeout:
                return None
            continue
        except (ConnectionError, ssl.SSLError, OSError):
            return b""
        return data
    return None


def send_all(sock: socket.socket, data: bytes, stop: threading.Event, timeout: float = 10.0) -> bool:
    """Send ``data`` (an ack, a handshake message); False when the peer does not take it in ``timeout``."""
    deadline = time.monotonic() + timeout
    view = memoryview(data)
    while view:
        if stop.is_set() and time.monotonic() > deadline:
            return False
        try:
            sent = sock.send(view)
        except (TimeoutError, ssl.SSLWantWriteError):
            if time.monotonic() > deadline:
                return False
            continue
        except OSError:
            return False
        view = view[sent:]
    return True
