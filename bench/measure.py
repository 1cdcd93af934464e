"""Process measurement helpers: wall time, CPU seconds, peak RSS, and polling."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field

import psutil


@dataclass
class Result:
    name: str
    seconds: float
    bytes: int
    lines: int
    cpu_seconds: float
    peak_rss_mib: float
    extra: dict = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds

    @property
    def lines_per_s(self) -> float:
        return self.lines / self.seconds

    def as_dict(self) -> dict:
        data = asdict(self)
        data["mb_per_s"] = round(self.mb_per_s, 2)
        data["lines_per_s"] = round(self.lines_per_s)
        return data


def run_to_devnull(name: str, argv: list[str], size: int, lines: int) -> Result:
    """Run a command with stdout to /dev/null; CPU and peak RSS from its own rusage.

    The command runs under GNU time (/usr/bin/time) when present: a child forked straight
    from this Python process would report Python's RSS as its ru_maxrss (it is kept across exec).
    """
    timer = shutil.which("time", path="/usr/bin:/bin")
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        command = [timer, "-f", "%U %S %M %R", "-o", report.name, *argv] if timer else argv
        started = time.monotonic()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv} exited with {proc.returncode}")
        if timer:
            user, system, max_kib, faults = report.read().split()[-4:]
            return Result(name, elapsed, size, lines, float(user) + float(system), int(max_kib) / 1024,
                          {"minor_faults": int(faults)})
    return Result(name, elapsed, size, lines, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024,
                  {"note": "ru_maxrss includes the forking Python process"})


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the process's peak resident set size."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def minor_faults(pid: int) -> int:
    """Minor page faults of the whole process so far (first touches of newly mapped memory)."""
    with open(f"/proc/{pid}/stat") as handle:
        stat = handle.read()
    return int(stat[stat.rindex(")") + 2:].split()[7])


_TICKS = os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> dict:
    """Memory and threads from /proc/PID/status: VmRSS, VmHWM, RssAnon, RssFile, RssShmem (MiB), Threads,
    and the process's context switches (of its main thread only: see task_stats for all threads)."""
    out: dict = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "VmSize"):
                out[key] = int(value.split()[0]) / 1024
            elif key in ("Threads", "voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                out[key] = int(value)
    return out


def reset_peak_rss(pid: int) -> bool:
    """Restart VmHWM from the current RSS (``5 > /proc/PID/clear_refs``, Linux 4.0+): the peak of an
    interval, not of the process's whole life. False when not allowed (needs ptrace rights on it)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def task_stat(pid: int, tid: int | str) -> dict | None:
    """One thread of ``pid``: kernel name, user and system CPU seconds (ticks), time on a CPU in ns
    (schedstat, exact), voluntary (it waited) / involuntary (preempted) context switches; None once it ended."""
    base = f"/proc/{pid}/task/{tid}"
    try:
        with open(f"{base}/stat") as handle:
            stat = handle.read()
        with open(f"{base}/schedstat") as handle:
            run_ns = int(handle.read().split()[0])
        switches = {}
        with open(f"{base}/status") as handle:
            for line in handle:
                if "ctxt_switches" in line:
                    key, _, value = line.partition(":")
                    switches[key] = int(value)
    except (OSError, ValueError, IndexError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return {"comm": stat[stat.index("(") + 1:stat.rindex(")")],
            "user": int(fields[11]) / _TICKS, "sys": int(fields[12]) / _TICKS, "run_ns": run_ns,
            "voluntary": switches.get("voluntary_ctxt_switches", 0),
            "involuntary": switches.get("nonvoluntary_ctxt_switches", 0)}


def task_stats(pid: int) -> dict[int, dict]:
    """task_stat of every thread of ``pid``, by thread id."""
    tasks: dict[int, dict] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = task_stat(pid, tid)
        if stat is not None:  # else the thread ended meanwhile
            tasks[int(tid)] = stat
    return tasks


def smaps_rss(pid: int) -> dict[str, float]:
    """Resident MiB of ``pid`` by kind of mapping (/proc/PID/smaps): "heap" (glibc's main arena, brk),
    "thread arenas" (glibc's per-thread heaps: anonymous read-write mappings followed by the
    inaccessible rest of their 64 MiB reservation), "thread stacks" (anonymous 8 MiB after a guard
    page), "other anonymous" (mmap: Python's object arenas, large buffers) and "files" (code, data)."""
    maps = []  # (start, end, perms, name, rss kB)
    current = None
    with open(f"/proc/{pid}/smaps") as handle:
        for line in handle:
            first = line.split(None, 5)
            if "-" in first[0] and len(first) >= 5 and not first[0].endswith(":"):
                start, end = (int(x, 16) for x in first[0].split("-"))
                current = [start, end, first[1], first[5].strip() if len(first) > 5 else "", 0]
                maps.append(current)
            elif first[0] == "Rss:" and current is not None:
                current[4] = int(first[1])
    out = dict.fromkeys(("heap", "thread arenas", "thread stacks", "other anonymous", "files"), 0.0)
    for index, (start, end, perms, name, rss) in enumerate(maps):
        size = end - start
        before = maps[index - 1] if index else None
        after = maps[index + 1] if index + 1 < len(maps) else None
        if name == "[heap]":
            kind = "heap"
        elif name.startswith("/"):
            kind = "files"
        elif name:
            kind = "other anonymous" if name.startswith("[anon") else "files" if not name.startswith("[") else \
                "thread stacks" if name == "[stack]" else "other anonymous"
        elif perms.startswith("rw") and after is not None and after[2].startswith("---") and not after[3] \
                and after[0] == end and (after[1] - start) == 64 << 20:
            kind = "thread arenas"
        elif perms.startswith("rw") and size == 8 << 20 and before is not None and before[2].startswith("---") \
                and before[1] == start:
            kind = "thread stacks"
        else:
            kind = "other anonymous"
        out[kind] += rss / 1024
    return {k: round(v, 2) for k, v in out.items()}


def tree_memory_mib(pid: int) -> tuple[float, float]:
    """(Rss, Pss) in MiB of ``pid`` and all its descendants now (/proc/PID/smaps_rollup). Pss shares
    each page among the processes that map it, so a fork's copy-on-write pages count once: the sum
    of Pss is what the tree costs the machine; the sum of Rss counts shared pages in every process."""
    rss = pss = 0
    try:
        processes = [psutil.Process(pid)]
        processes += processes[0].children(recursive=True)
    except psutil.Error:
        return 0.0, 0.0
    for process in processes:
        try:
            with open(f"/proc/{process.pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            pass  # it ended meanwhile
    return rss / 1024, pss / 1024


class TreePeak:
    """The peak of :func:`tree_memory_mib` of a running process, sampled every ``interval`` s by a thread."""

    def __init__(self, pid: int, interval: float = 0.02):
        import threading

        self.pid, self.interval = pid, interval
        self.rss = self.pss = 0.0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(self.interval):
            rss, pss = tree_memory_mib(self.pid)
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)

    def stop(self) -> tuple[float, float]:
        self.done.set()
        self.thread.join()
        return round(self.rss, 1), round(self.pss, 1)


def io_counters(pid: int) -> dict[str, int]:
    """/proc/PID/io: rchar, wchar, syscr, syscw (read-like and write-like system calls), read_bytes, write_bytes."""
    out = {}
    try:
        with open(f"/proc/{pid}/io") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                out[key] = int(value)
    except OSError:
        pass
    return out


def machine_cpu() -> tuple[float, float]:
    """(busy, steal): CPU seconds of all cores since boot, busy in this VM and taken by the hypervisor."""
    with open("/proc/stat") as handle:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in handle.readline().split()[1:9])
    return (user + nice + system + irq + softirq) / _TICKS, steal / _TICKS


def busy_cpu_seconds() -> float:
    return machine_cpu()[0]


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Background:
    """What else used the CPUs during a measurement: other processes, and the hypervisor (steal)."""

    def __init__(self):
        self.busy, self.steal = machine_cpu()
        self.own = own_cpu_seconds()

    def other(self, target_cpu: float) -> tuple[float, float]:
        """(CPU s of other processes, CPU s stolen by the hypervisor) since the start."""
        busy, steal = machine_cpu()
        other = busy - self.busy - (own_cpu_seconds() - self.own) - target_cpu
        return round(max(0.0, other), 2), round(steal - self.steal, 2)


def wait_quiet(max_wait: float, log, threshold: float = 0.1, window: float = 1.0) -> float:
    """Wait (at most ``max_wait`` s) until other processes use under ``threshold`` of a core.

    Returns the load (cores) of the last window. Measurements on 2 cores are meaningless while
    something else runs (tests, another benchmark).
    """
    deadline = time.monotonic() + max_wait
    said = False
    quiet_windows = 0
    while True:
        before, own = busy_cpu_seconds(), own_cpu_seconds()
        time.sleep(window)
        load = (busy_cpu_seconds() - before - (own_cpu_seconds() - own)) / window
        quiet_windows = quiet_windows + 1 if load < threshold else 0
        if quiet_windows >= 2:
            return load
        if time.monotonic() >= deadline:
            log(f"  WARNING: machine still busy ({load:.2f} cores used by other processes); measuring anyway")
            return load
        if not said:
            log(f"  waiting for the machine to be quiet ({load:.2f} cores busy elsewhere) ...")
            said = True


def keep_pace(due: float, period: float) -> bool:
    """Sleep until ``due`` (monotonic); True when already more than a ``period`` late (a late write)."""
    now = time.monotonic()
    if now < due:
        time.sleep(due - now)
        return False
    return now - due > period


def read_chars(pid: int) -> int:
    """rchar from /proc/PID/io: bytes the process got from read-like system calls."""
    try:
        with open(f"/proc/{pid}/io") as handle:
            for line in handle:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def poll_until(proc: subprocess.Popen, name: str, started: float, timeout: float, interval: float, step) -> float:
    """Call ``step(now)`` every ``interval`` s until it returns (True, _); return that moment.

    ``step`` returns (done, progress): progress says how far it got, for the error when the
    process exits first or ``timeout`` passes.
    """
    while True:
        time.sleep(interval)
        now = time.monotonic()
        done, progress = step(now)
        if done:
            return now
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} ({progress})")
        if now - started > timeout:
            raise RuntimeError(f"{name}: {progress} after {timeout:.0f}s")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> tuple[int, float]:
    """Signal a process and wait for it (SIGKILL after ``timeout``); (exit code, seconds to exit)."""
    started = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode, time.monotonic() - started


class LineCounter:
    """Counts the lines of a file that another process is appending to, reading only new bytes."""

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None
        self.lines = 0
        self.bytes = 0

    def update(self) -> int:
        if self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return 0
        while True:
            data = os.read(self.fd, 8 << 20)
            if not data:
                return self.lines
            self.lines += data.count(b"\n")
            self.bytes += len(data)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def add_common_arguments(parser: argparse.ArgumentParser, timeout: float, what: str) -> None:
    """The flags every benchmark script shares: input generation, timing, repetition, results."""
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--exc-json-share", type=float, default=0.005,
                        help="share of JSON lines with an exc_info holding escaped newlines (default 0.005)")
    parser.add_argument("--timeout", type=float, default=timeout, help=f"seconds allowed for each {what}")
    parser.add_argument("--results", default=None,
                        help="results name under bench/results (default: the script's; none with --only)")
    parser.add_argument("--quiet-wait", type=float, default=300,
                        help="before each measurement, wait up to this many seconds for other processes "
                             "to leave the CPUs alone (0: do not wait)")
    parser.add_argument("--repeat", type=int, default=1,
                        help=f"measure each {what} this many times and report the median run (all runs in the JSON)")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (configs, logs, outputs)")


def measure_all(names: list[str], wanted: list[str], repeat: int, run_one, summary, work: str, keep: bool,
                log, median_of=lambda r: r.seconds) -> list[Result]:
    """Measure each wanted name in order, ``repeat`` times, in a fresh run directory; keep the median run.

    ``run_one(name, run_dir)`` returns a Result; ``summary(result)`` the figures kept of every run;
    ``median_of(result)`` what the median is taken of (default: the seconds).
    """
    os.makedirs(work, exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix="run-", dir=work)
    results: list[Result] = []
    try:
        for name in names:
            if name not in wanted:
                continue
            runs = []
            for attempt in range(repeat):
                log(f"{name} ..." if repeat == 1 else f"{name} ({attempt + 1}/{repeat}) ...")
                runs.append(run_one(name, run_dir))
            result = sorted(runs, key=median_of)[len(runs) // 2]  # the median run
            if len(runs) > 1:
                result.extra["runs"] = [summary(r) for r in runs]
            results.append(result)
    finally:
        if keep:
            log(f"kept {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    return results


def write_results(directory: str, name: str, document: dict, markdown: str, log) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{name}.json"), "w") as handle:
        json.dump(document, handle, indent=2)
        handle.write("\n")
    with open(os.path.join(directory, f"{name}.md"), "w") as handle:
        handle.write(markdown)
    log(f"wrote bench/results/{name}.json and .md")


def warn_if_disturbed(seconds: float, other_cpu: float, steal_cpu: float, log) -> None:
    """Say so when other processes or the hypervisor took CPU during a measurement."""
    if other_cpu > max(0.1 * seconds, 0.2):
        log(f"  WARNING: other processes used {other_cpu:.2f} CPU s meanwhile: this number is disturbed")
    if steal_cpu > max(0.1 * seconds, 0.2):
        log(f"  WARNING: the hypervisor stole {steal_cpu:.2f} CPU s meanwhile: this number is disturbed")


def add_py_spy_argument(parser: argparse.ArgumentParser, target: str) -> None:
    parser.add_argument("--py-spy", nargs=argparse.REMAINDER, metavar="ARG",
                        help=f"attach `py-spy record --pid PID ARG...` to {target} (skews its numbers), "
                             "e.g. --py-spy --threads --format raw -o /tmp/profile.txt")


def py_spy_command(args: argparse.Namespace, venv_bin: str) -> list[str] | None:
    if args.py_spy is None:
        return None
    return [shutil.which("py-spy", path=venv_bin) or "py-spy", *args.py_spy]


def wait_for_text(path: str, text: bytes, proc: subprocess.Popen, timeout: float) -> float:
    """Wait until the agent's log holds ``text``; return when (monotonic)."""
    deadline = time.monotonic() + timeout
    while True:
        with open(path, "rb") as handle:
            if text in handle.read():
                return time.monotonic()
        if proc.poll() is not None:
            raise RuntimeError(f"shipper exited with {proc.returncode} before logging {text!r}; see {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"shipper did not log {text!r} within {timeout:.0f}s; see {path}")
        time.sleep(0.02)


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
