"""The command line: shipper run | check | status | version."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from shipper import __version__
from shipper.config import DEFAULT_CONFIG_PATH, Config, load, target_of
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
    from shipper.service import Service

    try:
        service = Service(config, args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("cannot start: %s", problem)
        return EXIT_CONFIG
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_FAILED
    _release_startup_memory()
    code = service.run()
    # Exit now: an upload thread stuck in a socket call past the deadline must not hold the
    # process (the interpreter would otherwise wait for every worker thread).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_status(args: argparse.Namespace) -> int:
    from shipper.status import fetch_status, render_status

    url = args.url
    if url is None:
        try:
            listen = load(args.config).server.listen
        except ConfigError:
            listen = "127.0.0.1:2020"
        if not listen:
            print("shipper status: the status server is off ([server] listen = \"\")", file=sys.stderr)
            return EXIT_FAILED
        url = f"http://{listen}"
    try:
        first = fetch_status(url)
        time.sleep(args.interval)
        second = fetch_status(url)
    except OSError as exc:
        print(f"shipper status: no agent answers at {url}: {getattr(exc, 'reason', exc)} "
              f"(is it running? `systemctl status shipper`)", file=sys.stderr)
        return EXIT_FAILED
    print(render_status(first, second, args.interval))
    return EXIT_OK if second["healthy"] else EXIT_FAILED


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
    status = commands.add_parser("status", help="show the running agent's inputs, outputs, rates and health")
    status.add_argument("-c", "--config", help=config_help + "; its [server] listen is asked")
    status.add_argument("--url", help="the agent's server (default: http://LISTEN from the config)")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between the two samples for rates")
    status.set_defaults(func=cmd_status)
    version = commands.add_parser("version", help="print the version")
    version.set_defaults(func=cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
