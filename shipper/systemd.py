"""systemd's notify protocol: READY, STATUS, STOPPING and watchdog pings over $NOTIFY_SOCKET.

The protocol is one datagram per message, ``KEY=value`` lines, sent to the AF_UNIX socket
named by ``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace). Without the
variable (not started by systemd with ``Type=notify``) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None
        self._socket: socket.socket | None = None
        self._failed = False
        self.watchdog_seconds = watchdog_seconds(environ)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str) -> bool:
        """Send one message (``ready="1"`` becomes ``READY=1``); False when it could not be sent."""
        if self.address is None:
            return False
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items()).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message, self.address)
        except OSError as exc:
            if not self._failed:  # reported once: systemd may simply not be listening any more
                log.warning("cannot notify systemd at %s: %s", self.address.replace("\0", "@"), exc)
                self._failed = True
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(ready="1", status=status, mainpid=str(os.getpid()))

    def status(self, status: str) -> bool:
        return self.send(status=status)

    def stopping(self, status: str) -> bool:
        return self.send(stopping="1", status=status)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_seconds(environ: dict[str, str]) -> float | None:
    """systemd's watchdog period (``WatchdogSec=``) when it applies to this process, else None."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 1_000_000


class Watchdog(threading.Thread):
    """Pings WATCHDOG=1 every half period, but only while ``alive()`` says the pipeline works.

    A pipeline whose threads stopped making progress (a deadlock, a call that never returns)
    stops the pings, and systemd restarts the agent after ``WatchdogSec``.
    """

    def __init__(self, notifier: Notifier, alive: Callable[[], bool], period: float):
        super().__init__(name="systemd-watchdog", daemon=True)
        self.notifier = notifier
        self.alive = alive
        self.interval = period / 2
        self.stopped = threading.Event()
        self.pings = 0
        self._reported = False

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            if self.alive():
                if self.notifier.send(watchdog="1"):
                    self.pings += 1
                self._reported = False
            elif not self._reported:
                log.error("the pipeline stopped making progress: no watchdog ping to systemd (it restarts us)")
                self._reported = True

    def stop(self) -> None:
        self.stopped.set()
