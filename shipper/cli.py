"""The command line: shipper run | check | version."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

from shipper import __version__
from shipper.config import DEFAULT_CONFIG_PATH, Config, load, source_of, target_of
from shipper.errors import ConfigError

log = logging.getLogger("shipper")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("watchdog").setLevel(logging.WARNING)


def _tune_allocator() -> None:
    """Keep glibc from handing every large buffer back to the kernel.

    The hot path makes a few MiB-sized temporaries per chunk; by default glibc serves each from
    a fresh mmap and unmaps it on free, so every page is faulted in again on the next chunk.
    Serving them from the heap (and trimming only past 32 MiB free) removes most page faults
    (bench/: shipper's minor faults per run). No-op where glibc is not the allocator.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        libc.mallopt(m_mmap_threshold, 16 * 1024 * 1024)
        libc.mallopt(m_trim_threshold, 32 * 1024 * 1024)
        libc.mallopt(m_arena_max, 2)
    except (OSError, AttributeError):
        pass


def _release_startup_memory() -> None:
    """Start-up (config, boto3's models and endpoint rules) leaves freed memory in the heap; the
    allocator keeps up to 32 MiB of it (see _tune_allocator) unless told to give it back once."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _load_or_report(path: str | None) -> Config | None:
    try:
        return load(path)
    except ConfigError as exc:
        print(f"shipper: {len(exc.problems)} problem(s) in the configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    print(config.describe())
    print("configuration OK")
    if args.probe:
        return _probe(config)
    return EXIT_OK


def _probe(config: Config) -> int:
    """Try each output's credentials and destination; print what failed, exactly."""
    import importlib

    from shipper.config import OUTPUT_MODULES
    from shipper.identity import resolve_identity

    cloud = config.cloud
    identity = resolve_identity(cloud.metadata, cloud.imds_endpoint, cloud.imds_timeout)
    failed = False
    for settings in config.outputs:
        probe = getattr(importlib.import_module(OUTPUT_MODULES[settings.type]), "probe", None)
        if probe is None:
            continue
        try:
            problems = probe(settings, identity)
        except ConfigError as exc:
            problems = exc.problems
        for problem in problems:
            print(f"probe failed: {problem}")
        if not problems:
            print(f"probe OK: {settings.where} ({settings.type}, {target_of(settings)})")
        failed = failed or bool(problems)
    return EXIT_FAILED if failed else EXIT_OK


def cmd_version(args: argparse.Namespace) -> int:
    print(f"shipper {__version__}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    _setup_logging("info")
    config = _load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    _setup_logging(config.agent.log_level)
    _tune_allocator()
    from shipper.pipeline import Pipeline

    stop = threading.Event()
    first_signal: list[float] = []

    def on_signal(signum, frame):
        now = time.monotonic()
        if first_signal:
            # One Ctrl-C often arrives twice (from the terminal and from a parent such as make):
            # only a signal well after the first means "stop now".
            if now - first_signal[0] > 1.0:
                log.warning("second signal: exiting now (undelivered records are read again on the next start)")
                os._exit(EXIT_FAILED)
            return
        first_signal.append(now)
        log.info("received %s: draining", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        pipeline = Pipeline(config, wakeup=stop)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("cannot start: %s", problem)
        return EXIT_CONFIG
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_FAILED
    log.info("shipper %s starting with %s", __version__, config.source)
    for settings in config.inputs:
        log.info("reading %s (%s, tag %s)", source_of(settings), settings.type, settings.tag)
    for settings in config.outputs:
        log.info("writing %s %s (match %s)", settings.type, target_of(settings), ", ".join(settings.match))
    log.info("state (checkpoints) in %s", pipeline.data_dir)
    pipeline.start()
    _release_startup_memory()
    while not stop.wait(60):  # set by SIGTERM/SIGINT or by a failing part of the pipeline
        pass
    complete = pipeline.stop()
    log.info("stopped%s", "" if complete else " with undelivered records")
    code = EXIT_FAILED if pipeline.failed.is_set() or not complete else EXIT_OK
    # Exit now: an upload thread stuck in a socket call past the deadline must not hold the
    # process (the interpreter would otherwise wait for every worker thread).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shipper", description="Ship log files and metrics off the box.")
    commands = parser.add_subparsers(dest="command", required=True)
    config_help = f"config file (default: {DEFAULT_CONFIG_PATH} if present, else the embedded default)"
    run = commands.add_parser("run", help="run the agent until SIGTERM/SIGINT")
    run.add_argument("-c", "--config", help=config_help)
    run.set_defaults(func=cmd_run)
    check = commands.add_parser("check", help="validate a config and print the resolved pipeline")
    check.add_argument("-c", "--config", help=config_help)
    check.add_argument("--probe", action="store_true",
                       help="also try credentials and reach each destination (HeadBucket, DescribeLogGroups)")
    check.set_defaults(func=cmd_check)
    version = commands.add_parser("version", help="print the version")
    version.set_defaults(func=cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
