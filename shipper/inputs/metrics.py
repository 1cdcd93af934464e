"""The metrics input: a sample of the machine (psutil) every ``interval``, as one record.

Samples are aligned to the wall clock (every 10 s at :00, :10, ...), so samples of a fleet
line up. Each is one record with ``"metrics": {"group.name_unit": value, ...}``; a metric of
several things (a mount, a disk, an interface, a process) is a map from the thing to its
value. Rates per second come from counter deltas between two samples: the first sample has
none, and a counter that went backwards (reset, wrap, a new device) gives no rate, never a
negative one. Reading psutil is the I/O edge; turning readings into metrics is pure.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Any, Callable

import psutil

from shipper.config import Option, did_you_mean
from shipper.inputs.journaled import JournaledInput
from shipper.record import METRICS, TIME, Batch, format_time

log = logging.getLogger(__name__)

GROUPS = ("cpu", "load", "memory", "swap", "disk", "diskio", "network", "processes", "fds", "uptime")
# File systems that hold no data worth watching (Linux names).
PSEUDO_FS = frozenset({
    "tmpfs", "devtmpfs", "devfs", "proc", "sysfs", "cgroup", "cgroup2", "overlay", "squashfs", "autofs",
    "debugfs", "tracefs", "securityfs", "pstore", "bpf", "configfs", "fusectl", "mqueue", "hugetlbfs",
    "ramfs", "nsfs", "efivarfs", "binfmt_misc", "rpc_pipefs", "iso9660",
})
# Block devices that are not disks.
SKIP_DEVICES = ("loop", "ram", "zram", "sr", "fd")
SKIP_INTERFACES = ("lo",)


def check_groups(groups: list[str]) -> str | None:
    unknown = [g for g in groups if g not in GROUPS]
    return f"unknown group {unknown[0]!r}{did_you_mean(unknown[0], GROUPS)}" if unknown else None


OPTIONS = {
    "interval": Option("duration", 10.0, minimum=0.1),
    "groups": Option("strlist", list(GROUPS), check=check_groups),
    "per_core": Option("bool", False),
    "top_processes": Option("int", 0, minimum=0),           # N busiest by CPU and largest by RSS
    "process_names": Option("strlist", []),                 # processes to watch by name
    "pid_files": Option("strlist", []),                     # ... or by pid file
    "id": Option("str", ""),                                # names its journal (default: metrics-<tag>)
    "journal_max_bytes": Option("size", 64 * 1024**2, minimum=1024**2),  # samples kept while outputs are down
}


# ---------------------------------------------------------------- pure: readings -> metrics

def next_tick(now: float, interval: float) -> float:
    """The next multiple of ``interval`` on the wall clock after ``now``."""
    return (math.floor(now / interval) + 1) * interval


def rate(previous: float | None, current: float, seconds: float) -> float | None:
    """Per second, from two counter readings; None when there is no earlier reading or it went backwards."""
    if previous is None or current < previous or seconds <= 0:
        return None
    return (current - previous) / seconds


def rates(previous: dict[str, dict[str, float]] | None, current: dict[str, dict[str, float]], seconds: float,
          names: dict[str, str]) -> dict[str, dict[str, float]]:
    """Counters per thing (``{thing: {counter: value}}``) -> ``{metric: {thing: per second}}``.

    ``names`` maps each counter to its metric name; things new since the last sample are left out.
    """
    out: dict[str, dict[str, float]] = {}
    if previous is None:
        return out
    for thing, counters in current.items():
        before = previous.get(thing)
        if before is None:
            continue
        for counter, metric in names.items():
            value = rate(before.get(counter), counters[counter], seconds)
            if value is not None:
                out.setdefault(metric, {})[thing] = round(value, 3)
    return out


def cpu_percentages(previous: dict[str, float] | None, current: dict[str, float]) -> dict[str, float]:
    """CPU time shares between two readings of cumulative CPU times (seconds per state)."""
    if previous is None:
        return {}
    deltas = {state: current[state] - previous.get(state, 0.0) for state in current}
    total = sum(deltas.values())
    if total <= 0 or any(d < 0 for d in deltas.values()):
        return {}

    def share(*states: str) -> float:
        return round(100.0 * sum(deltas.get(s, 0.0) for s in states) / total, 2)

    return {
        "cpu.percent": round(100.0 - share("idle", "iowait"), 2),
        "cpu.user_percent": share("user", "nice"),
        "cpu.system_percent": share("system", "irq", "softirq"),
        "cpu.iowait_percent": share("iowait"),
        "cpu.steal_percent": share("steal"),
    }


# ---------------------------------------------------------------- the input

class Sampler:
    """Readings of psutil turned into one sample's metrics, with what rates need of the last one."""

    def __init__(self, settings, stats):
        self.settings = settings
        self.tag = settings.tag
        self.stats = stats
        self.groups = set(settings.groups)
        self.previous: dict[str, Any] = {}
        self.previous_time: float | None = None
        self.watched: dict[int, psutil.Process] = {}  # processes whose CPU % needs their previous reading
        self.sample_seconds = 0.0  # what the last sample cost, for the benchmark and the health endpoint

    def sample(self) -> dict[str, Any]:
        now = time.monotonic()
        seconds = now - self.previous_time if self.previous_time is not None else 0.0
        metrics: dict[str, Any] = {}
        for group in GROUPS:
            if group in self.groups:
                try:
                    metrics.update(getattr(self, f"_{group}")(seconds))
                except (OSError, psutil.Error) as exc:  # one group failing must not lose the others
                    self.stats.add("sample_errors", 1, input=self.tag, group=group)
                    log.debug("metrics group %s failed: %s", group, exc)
        if self.settings.top_processes or self.settings.process_names or self.settings.pid_files:
            metrics.update(self._processes_watched())
        self.previous_time = now
        return metrics

    # Each group returns its metrics; counters are kept in self.previous for the next rates.

    def _cpu(self, seconds: float) -> dict[str, Any]:
        current = psutil.cpu_times()._asdict()
        metrics: dict[str, Any] = cpu_percentages(self.previous.get("cpu"), current)
        self.previous["cpu"] = current
        if self.settings.per_core:
            cores = [c._asdict() for c in psutil.cpu_times(percpu=True)]
            before = self.previous.get("cores") or [None] * len(cores)
            per_core = {str(i): cpu_percentages(b, c).get("cpu.percent") for i, (b, c) in enumerate(zip(before, cores))}
            if any(v is not None for v in per_core.values()):
                metrics["cpu.core_percent"] = {k: v for k, v in per_core.items() if v is not None}
            self.previous["cores"] = cores
        return metrics

    def _load(self, seconds: float) -> dict[str, Any]:
        one, five, fifteen = os.getloadavg()
        return {"load.1m": one, "load.5m": five, "load.15m": fifteen}

    def _memory(self, seconds: float) -> dict[str, Any]:
        memory = psutil.virtual_memory()
        return {"memory.total_bytes": memory.total, "memory.available_bytes": memory.available,
                "memory.used_bytes": memory.total - memory.available, "memory.used_percent": memory.percent}

    def _swap(self, seconds: float) -> dict[str, Any]:
        swap = psutil.swap_memory()
        return {"swap.total_bytes": swap.total, "swap.used_bytes": swap.used, "swap.used_percent": swap.percent}

    def _disk(self, seconds: float) -> dict[str, Any]:
        total, used, percent = {}, {}, {}
        for partition in psutil.disk_partitions(all=False):
            if partition.fstype in PSEUDO_FS or partition.mountpoint in total:
                continue
            try:
                usage = psutil.disk_usage(partition.mountpoint)
            except OSError:  # gone, or not ours to look at
                continue
            total[partition.mountpoint] = usage.total
            used[partition.mountpoint] = usage.used
            percent[partition.mountpoint] = usage.percent
        return {"disk.total_bytes": total, "disk.used_bytes": used, "disk.used_percent": percent} if total else {}

    def _diskio(self, seconds: float) -> dict[str, Any]:
        counters = {name: c._asdict() for name, c in (psutil.disk_io_counters(perdisk=True) or {}).items()
                    if not name.startswith(SKIP_DEVICES)}
        metrics: dict[str, Any] = rates(self.previous.get("diskio"), counters, seconds, {
            "read_bytes": "diskio.read_bytes_per_second", "write_bytes": "diskio.write_bytes_per_second",
            "read_count": "diskio.read_ops_per_second", "write_count": "diskio.write_ops_per_second",
        })
        busy = rates(self.previous.get("diskio"), {n: c for n, c in counters.items() if "busy_time" in c}, seconds,
                     {"busy_time": "busy"}).get("busy", {})
        if busy:  # busy_time is in ms: ms of work per second of time / 10 = percent
            metrics["diskio.busy_percent"] = {name: round(min(100.0, value / 10.0), 2) for name, value in busy.items()}
        self.previous["diskio"] = counters
        return metrics

    def _network(self, seconds: float) -> dict[str, Any]:
        counters = {}
        for name, c in (psutil.net_io_counters(pernic=True) or {}).items():
            if name in SKIP_INTERFACES:
                continue
            counters[name] = {"bytes_recv": c.bytes_recv, "bytes_sent": c.bytes_sent, "packets_recv": c.packets_recv,
                              "packets_sent": c.packets_sent, "errors": c.errin + c.errout,
                              "drops": c.dropin + c.dropout}
        metrics = rates(self.previous.get("network"), counters, seconds, {
            "bytes_recv": "network.received_bytes_per_second", "bytes_sent": "network.sent_bytes_per_second",
            "packets_recv": "network.received_packets_per_second", "packets_sent": "network.sent_packets_per_second",
            "errors": "network.errors_per_second", "drops": "network.drops_per_second",
        })
        self.previous["network"] = counters
        return metrics

    def _processes(self, seconds: float) -> dict[str, Any]:
        running = zombie = count = 0
        for process in psutil.process_iter(["status"]):
            count += 1
            status = process.info.get("status")
            running += status == psutil.STATUS_RUNNING
            zombie += status == psutil.STATUS_ZOMBIE
        return {"processes.count": count, "processes.running": running, "processes.zombie": zombie}

    def _fds(self, seconds: float) -> dict[str, Any]:
        with open("/proc/sys/fs/file-nr") as handle:  # allocated, free, maximum
            allocated, free, maximum = (int(v) for v in handle.read().split())
        return {"fds.open": allocated - free, "fds.max": maximum}

    def _uptime(self, seconds: float) -> dict[str, Any]:
        return {"uptime.seconds": round(time.time() - psutil.boot_time(), 1)}

    def _processes_watched(self) -> dict[str, Any]:
        """Top processes and chosen ones: cpu %, rss, threads, open files, keyed by "name:pid"."""
        chosen = set(self._pids_from_files())
        names = set(self.settings.process_names)
        seen: dict[int, psutil.Process] = {}
        rows = []
        for fresh in psutil.process_iter(["name", "memory_info", "num_threads"]):
            # The object seen last time keeps the CPU baseline (unless the pid was reused since).
            kept = self.watched.get(fresh.pid)
            process = kept if kept is not None and kept == fresh else fresh
            seen[fresh.pid] = process
            try:
                cpu = process.cpu_percent(None)
            except psutil.Error:
                continue
            info = fresh.info
            rows.append((fresh.pid, info.get("name") or "?", cpu, getattr(info.get("memory_info"), "rss", 0),
                         info.get("num_threads") or 0, process))
        self.watched = seen
        picked: dict[int, tuple] = {}
        top = self.settings.top_processes
        if top:
            for row in sorted(rows, key=lambda r: -r[2])[:top] + sorted(rows, key=lambda r: -r[3])[:top]:
                picked[row[0]] = row
        for row in rows:
            if row[0] in chosen or row[1] in names:
                picked[row[0]] = row
        metrics: dict[str, dict[str, float]] = {"process.cpu_percent": {}, "process.rss_bytes": {},
                                                "process.threads": {}}
        for pid, name, cpu, rss, threads, process in picked.values():
            key = f"{name}:{pid}"
            metrics["process.cpu_percent"][key] = round(cpu, 2)
            metrics["process.rss_bytes"][key] = rss
            metrics["process.threads"][key] = threads
            if pid in chosen or name in names:
                try:
                    metrics.setdefault("process.open_files", {})[key] = process.num_fds()
                except (psutil.Error, AttributeError):
                    pass
        return {k: v for k, v in metrics.items() if v}

    def _pids_from_files(self) -> list[int]:
        pids = []
        for path in self.settings.pid_files:
            try:
                with open(path) as handle:
                    pids.append(int(handle.read().split()[0]))
            except (OSError, ValueError, IndexError):
                self.stats.add("sample_errors", 1, input=self.tag, group="pid_files")
        return pids


class Sampling:
    """The producer: a thread taking a sample at each tick of the wall clock and journaling it."""

    def __init__(self, source: "MetricsInput"):
        self.source = source
        self.thread = threading.Thread(target=self._run, name=f"{source.tag}-sampling", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.source.stop.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(5.0)  # a sample under way goes into the journal before it is closed

    def _run(self) -> None:
        source, sampler, stop = self.source, self.source.sampler, self.source.stop
        interval = source.settings.interval
        try:
            sampler.sample()  # primes the counters: the first record already has rates
            while not stop.is_set():
                tick = next_tick(time.time(), interval)
                source.heartbeat.beat(max(0.0, tick - time.time()) + 5.0)
                if stop.wait(max(0.0, tick - time.time())):
                    break
                started = time.perf_counter()
                metrics = sampler.sample()
                sampler.sample_seconds = time.perf_counter() - started
                source.journal_now(source.tag, [None], [{METRICS: metrics, TIME: format_time(tick)}])
        except Exception:  # a bug, not bad input: as an input thread's would, it stops the agent
            log.exception("%s: sampling failed; stopping the agent", source.tag)
            source.failed = True
            stop.set()


class MetricsInput(JournaledInput):
    """Samples are journaled before they go on: one taken before a kill -9 is delivered after it."""

    def __init__(self, settings, context):
        self.settings = settings
        self.sampler = Sampler(settings, context.stats)
        self.failed = False
        name = settings.get("id") or f"metrics-{settings.tag}"
        super().__init__(settings.tag, name, os.path.join(context.data_dir, "journal", name),
                         settings.journal_max_bytes, context.stats, context.checkpoint_interval, settings.where)

    def make_producers(self) -> list:
        return [Sampling(self)]

    def beat(self) -> None:
        """The sampling thread beats (a sample stuck in psutil is late); the reader's ticks do not."""

    def run(self, emit: Callable[[Batch], None], stop: threading.Event) -> None:
        super().run(emit, stop)
        if self.failed:
            raise RuntimeError(f"the sampling of {self.tag} failed")

    def sample(self) -> dict[str, Any]:
        return self.sampler.sample()


INPUT = MetricsInput
