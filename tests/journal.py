"""Real journal files for the journald input's tests, made by systemd-journal-remote from export format."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

JOURNAL_REMOTE = next((p for p in ("/lib/systemd/systemd-journal-remote", "/usr/lib/systemd/systemd-journal-remote")
                       if Path(p).exists()), None)


class Journal:
    """A journal directory; ``append`` writes entries into its file as journald would."""

    def __init__(self, directory: Path):
        if JOURNAL_REMOTE is None or shutil.which("journalctl") is None:
            pytest.skip("needs journalctl and systemd-journal-remote, from the Debian packages systemd and "
                        "systemd-journal-remote: `make test` installs them when run as root or with sudo "
                        "(tests/system-packages.sh)")
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.file = directory / "remote.journal"
        self.boot = uuid.uuid4().hex
        self.monotonic = 1000

    def append(self, entries: list[dict[str, str | bytes]]) -> None:
        """Each entry: journal fields (MESSAGE, _SYSTEMD_UNIT, PRIORITY, _PID, ...); bytes values stay binary."""
        export = bytearray()
        now = int(time.time() * 1_000_000)
        for entry in entries:
            self.monotonic += 1
            fields = {"__REALTIME_TIMESTAMP": str(now + self.monotonic), "__MONOTONIC_TIMESTAMP": str(self.monotonic),
                      "_BOOT_ID": self.boot, **entry}
            for key, value in fields.items():
                if isinstance(value, bytes):  # the export format's binary field: name, newline, length, data
                    export += key.encode() + b"\n" + len(value).to_bytes(8, "little") + value + b"\n"
                else:
                    export += f"{key}={value}\n".encode()
            export += b"\n"
        source = self.directory.parent / f"export-{self.monotonic}.txt"
        source.write_bytes(bytes(export))
        subprocess.run([JOURNAL_REMOTE, f"--output={self.file}", str(source)], check=True, capture_output=True,
                       timeout=30)
        source.unlink()


def entries(start: int, count: int, unit: str = "web.service", priority: int = 6) -> list[dict]:
    return [{"_SYSTEMD_UNIT": unit, "PRIORITY": str(priority), "_PID": "42", "SYSLOG_IDENTIFIER": "web",
             "MESSAGE": f"seq={n:07d} from the journal"} for n in range(start, start + count)]
