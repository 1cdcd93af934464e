"""The command line: shipper run | check | status | fetch | report | version."""

from __future__ import annotations

import signal
import sys

if sys.argv[1:2] == ["run"]:
    # Until cmd_run installs the agent's handlers (after the imports below), a SIGHUP (`systemctl
    # reload` right after start) would kill it; ignoring it loses nothing: the configuration is
    # read afterwards. Here, not in __main__, so that the console script is covered too.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

import argparse  # noqa: E402 (after the signal disposition, on purpose)
import importlib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from shipper import __version__
from shipper.config import DEFAULT_CONFIG_PATH, INPUT_MODULES, Config, config_path, load, redact_urls, target_of
from shipper.envfile import DEFAULT_ENV_FILE, environment_with
from shipper.errors import ConfigError
from shipper.memory import trim_heap, tune_allocator, tune_collector

log = logging.getLogger("shipper")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


class _RedactingFormatter(logging.Formatter):
    """Every log line, tracebacks included, with URL credentials redacted (botocore names the endpoint URL
    in its errors, an imds_endpoint may carry a user:password): one regex per log line, never per record."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_urls(super().format(record))


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
    logging.getLogger("watchdog").setLevel(logging.WARNING)


def _counted(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def _report(exc: ConfigError) -> None:
    print(f"shipper: {_counted(len(exc.problems), 'problem')} in {exc.source or 'the configuration'}:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {redact_urls(problem)}", file=sys.stderr)


def _env_file_of(args: argparse.Namespace, path: str | None) -> str | None:
    """--env-file; else, for the packaged configuration, the unit's EnvironmentFile when it exists (the
    service reads its ${VAR}s from there, so a check of that file must too)."""
    if getattr(args, "env_file", None):
        return args.env_file
    if path == DEFAULT_CONFIG_PATH and os.path.isfile(DEFAULT_ENV_FILE):
        return DEFAULT_ENV_FILE
    return None


def _load_or_report(path: str | None, env_file: str | None) -> Config | None:
    try:
        return load(path, environment_with(env_file))
    except ConfigError as exc:
        _report(exc)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    path = config_path(args.config, args.default)
    env_file = _env_file_of(args, path)
    config = _load_or_report(path, env_file)
    if config is None:
        return EXIT_CONFIG
    print(config.describe())
    if env_file:
        print(f"environment: {env_file}")
    warnings = config.warnings()
    problems, found = _listener_checks(config)
    warnings += found
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"configuration refused: {_counted(len(problems), 'problem')} with the listeners", file=sys.stderr)
        return EXIT_CONFIG
    if warnings and args.strict:
        print(f"configuration refused: {_counted(len(warnings), 'warning')} and --strict", file=sys.stderr)
        return EXIT_CONFIG
    print("configuration OK" + (f", with {_counted(len(warnings), 'warning')}" if warnings else ""))
    if args.sample:
        code = _sample(config, args.sample, args.tag, args.limit)
        if code != EXIT_OK:
            return code
    if args.probe:
        return _probe(config)
    return EXIT_OK


def _listener_checks(config: Config) -> tuple[list[str], list[str]]:
    """What the machine says of the network inputs' listeners now (socket directories, addresses in use)."""
    problems: list[str] = []
    warnings: list[str] = []
    for settings in config.inputs:
        check = getattr(importlib.import_module(INPUT_MODULES[settings.type]), "check", None)
        if check is not None:
            found_problems, found_warnings = check(settings)
            problems += found_problems
            warnings += found_warnings
    return problems, warnings


# ---------------------------------------------------------------- check --sample

def _sample_input(config: Config, path: str):
    """The file input whose paths take ``path`` (it reads the sample as it would read that file), or None."""
    from fnmatch import fnmatchcase

    from shipper.inputs.discovery import is_excluded

    real = os.path.abspath(path)
    for settings in config.inputs:
        if settings.type == "file" and any(fnmatchcase(real, os.path.abspath(p)) for p in settings.paths) \
                and not is_excluded(real, settings.get("exclude") or []):
            return settings
    return None


def _sample_batches(settings, tag: str, path: str, data: bytes) -> list:
    """The batches the file input would make of ``data`` (its parser, multiline, line limit); without an
    input, plain lines."""
    from shipper.inputs.framing import RecordBuilder
    from shipper.inputs.tail import LINES, Read, split_long_lines
    from shipper.multiline import Joiner, make_rule
    from shipper.parsers import LineParser

    if data and not data.endswith(b"\n"):
        data += b"\n"  # the last line as if its newline had come
    now = time.time()
    if settings is None:
        parser, joiner, limit = LineParser("none", None, None, None), None, None
    else:
        parser = LineParser(settings.parser, settings.pattern, settings.time_key, settings.time_format)
        multiline = settings.multiline
        joiner = Joiner(make_rule(multiline.start, multiline.preset), multiline.max_lines,
                        settings.max_line_bytes) if multiline is not None else None
        limit = settings.max_line_bytes
    builder = RecordBuilder(tag, os.path.abspath(path), parser, joiner, 0)
    blocks = split_long_lines(data, limit) if limit else [(LINES, data, len(data))]
    batches = [builder.build(Read(0, len(data), blocks), now), builder.flush_pending(now)]
    return [b for b in batches if b is not None and b.count]


def _sample(config: Config, path: str, tag: str | None, limit: int) -> int:
    """Run the config's filters over the lines of ``path``: what each route would ship, what each filter
    dropped or changed. Nothing is sent and no state is written."""
    import threading
    from collections import Counter

    import orjson

    from shipper.config import tag_matches
    from shipper.pipeline import FilterStage
    from shipper.record import Envelope
    from shipper.stats import Stats

    try:
        with open(path, "rb") as handle:
            data = handle.read(64 * 1024**2 + 1)
    except OSError as exc:
        print(f"--sample {path}: cannot read: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    if len(data) > 64 * 1024**2:
        print(f"--sample {path}: more than 64 MiB; a sample is a few lines", file=sys.stderr)
        return EXIT_FAILED
    settings = _sample_input(config, path)
    file_inputs = [s for s in config.inputs if s.type == "file"]
    if settings is not None and tag is None:
        tag, how = settings.tag, f"as {settings.where} reads it (tag {settings.tag}, parser {settings.parser})"
    else:
        tag = tag or (file_inputs[0].tag if file_inputs else "sample")
        how = f"as plain lines, tag {tag}" + ("" if settings is None else f" (read by {settings.where}'s parser)")
    print(f"\nsample: {path}, {how}")
    envelope = Envelope({}, dict(config.agent.labels))
    stats = Stats()
    stop = threading.Event()
    stop.set()  # nothing waits here: a throttle that would hold does what it does at stop
    stage = FilterStage(config.filters, stats, envelope, stop)
    batches = _sample_batches(settings, tag, path, data)
    read = sum(b.count for b in batches)

    def keys(items) -> Counter:
        return Counter(orjson.dumps(r, option=orjson.OPT_SORT_KEYS) for b in items for r in b.records(envelope))

    report: list[tuple[str, Counter, Counter]] = []  # (filter, records that left, records that came)
    for position, (filt, _) in enumerate(stage.filters):
        out = []
        for batch in batches:
            if position in stage.chain(batch.tag):
                before = keys([batch])
                made = stage.apply(position, batch)
                after = keys(made)
                report.append((filt.context.name, before - after, after - before))
                out.extend(made)
            else:
                out.append(batch)
        batches = out
    for batch, after in stage.flush(final=True):
        batches.extend(stage.run(batch, after))
    print(f"read: {_counted(read, 'record')}")
    print("filters:" if stage.filters else "filters: none")
    for filt, match in stage.filters:
        name = filt.context.name
        if not any(r[0] == name for r in report):
            print(f"  {name}: not applied (its match {','.join(match)} took no record's tag)")
            continue
        left = sum((r[1] for r in report if r[0] == name), Counter())
        came = sum((r[2] for r in report if r[0] == name), Counter())
        dropped = stats.snapshot()
        by_reason = {dict(labels).get("reason"): value for (counter, labels), value in dropped.items()
                     if counter == "records_dropped" and dict(labels).get("filter") == name}
        text = ", ".join(f"{value:.0f} {reason}" for reason, value in sorted(by_reason.items())) or "0 dropped"
        changed = sum(came.values())
        print(f"  {name}: {text}; {changed} changed or made"
              + (f"; {stats.get('filter_errors', filter=name):.0f} errors" if stats.get("filter_errors", filter=name)
                 else ""))
        if by_reason:
            for line in list((left - came).elements())[:3]:
                print(f"    - {_shown_record(line)}")
        for line in list(came.elements())[:3]:
            print(f"    + {_shown_record(line)}")
    for output in config.outputs:
        mine = [b for b in batches if b.count and tag_matches(b.tag, output.match)]
        lines = [line for b in mine for line in b.ndjson(envelope).splitlines()]
        print(f"route {output.where} ({' '.join(filter(None, (output.type, target_of(output))))}, "
              f"match {','.join(output.match)}): "
              f"{_counted(len(lines), 'record')}")
        for line in lines[:limit]:
            print(f"  {line.decode()}")
        if len(lines) > limit:
            print(f"  ... {len(lines) - limit} more (--limit)")
    total_dropped = sum(value for (counter, labels), value in stats.snapshot().items() if counter == "records_dropped")
    tags = Counter(b.tag for b in batches for _ in range(b.count))
    print(f"totals: read {read}, dropped {total_dropped:.0f}, left {sum(tags.values())} "
          f"({', '.join(f'tag {t}: {n}' for t, n in sorted(tags.items())) or 'none'})")
    return EXIT_OK


def _shown_record(line: bytes) -> str:
    import orjson

    record = orjson.loads(line)
    text = f"[{record.get('tag')}] {record.get('message', '')}"
    extra = {k: v for k, v in record.items() if k not in ("time", "tag", "source", "message", "labels")}
    if extra:
        text += " " + orjson.dumps(extra).decode()
    return text if len(text) <= 200 else text[:197] + "..."


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
            print(f"probe failed: {redact_urls(problem)}")
        if not problems:
            print(f"probe OK: {settings.where} ({settings.type}, {target_of(settings)})")
        failed = failed or bool(problems)
    return EXIT_FAILED if failed else EXIT_OK


def cmd_version(args: argparse.Namespace) -> int:
    print(f"shipper {__version__}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from shipper.service import Service, Signals

    # First thing: Python's default for SIGHUP is to die, and a SIGTERM must stop cleanly, even during
    # start-up (reading the config, asking IMDS, making AWS clients). Until the pipeline runs the
    # handlers only remember the signals; Service.run acts on them.
    signals = Signals()
    _setup_logging("info")
    reading = time.monotonic()
    path = config_path(args.config, args.default)
    config = _load_or_report(path, args.env_file)
    if config is None:
        return EXIT_CONFIG
    signals.config_read(reading)
    _setup_logging(config.agent.log_level)
    if signals.stop_requested:
        log.info("stopped during start-up, before reading anything")
        return EXIT_OK
    for warning in config.warnings():
        log.warning("%s", warning)
    tune_allocator()
    tune_collector()
    try:
        service = Service(config, path, signals=signals, env_file=args.env_file)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("cannot start: %s", redact_urls(problem))
        return EXIT_CONFIG
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_FAILED
    trim_heap(collect=True)  # start-up (config, boto3's models) leaves freed memory in the heap
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
        path = config_path(args.config)
        try:
            listen = load(path, environment_with(_env_file_of(args, path))).server.listen
        except ConfigError:
            listen = "127.0.0.1:2020"
        if not listen:
            print("shipper status: the status server is off ([server] listen = \"\")", file=sys.stderr)
            return EXIT_FAILED
        url = f"http://{listen}"
    try:
        previous = None
        if args.interval is not None:  # rates measured here; without it, the agent's own over its last minute
            previous = fetch_status(url)
            time.sleep(args.interval)
        document = fetch_status(url)
    except OSError as exc:
        print(f"shipper status: no agent answers at {redact_urls(url)}: {getattr(exc, 'reason', exc)} "
              f"(is it running? `systemctl status shipper`)", file=sys.stderr)
        return EXIT_FAILED
    print(render_status(document, previous, args.interval))
    return EXIT_OK if document["healthy"] else EXIT_FAILED


def cmd_fetch(args: argparse.Namespace) -> int:
    import re

    import orjson

    from shipper.postmortem import fetch
    from shipper.postmortem.selection import Filter, Format, SelectionError, check_level, printable, time_range
    from shipper.postmortem.sources import CloudWatchLogsSource, SourceError, open_source

    # On a terminal, what the archive holds (messages, instance names, keys) is shown with its
    # control characters escaped; --json and pipes get the exact text.
    shown_err = printable if sys.stderr.isatty() else str

    def warn(text: str) -> None:
        print(f"shipper fetch: {shown_err(text)}", file=sys.stderr)

    try:
        since, until = time_range(args.since, args.until)
        level = check_level(args.level) if args.level else None
        grep = re.compile(args.grep) if args.grep else None
        template = Format(args.format) if args.format is not None else None
        source = open_source(args.source, args.endpoint_url, args.region)
    except (SelectionError, SourceError) as exc:
        warn(str(exc))
        return EXIT_CONFIG
    except re.error as exc:
        warn(f"--grep: not a regular expression: {exc}")
        return EXIT_CONFIG
    out = sys.stdout
    shown = printable if out.isatty() and not args.json else str
    # Plain lines and --format leave out the records without a message (metrics samples), unless
    # asked for (--all, or a template naming a metrics field); --json prints whole records, all.
    every = args.json or args.all or (template is not None and template.names_metrics())
    try:
        if args.list_instances:
            if isinstance(source, CloudWatchLogsSource):
                warn("--list-instances reads an archive (s3:// or a directory), not CloudWatch Logs")
                return EXIT_CONFIG
            rows = fetch.list_instances(source, since, until, warn)
            if args.json:
                out.writelines(orjson.dumps(row).decode() + "\n" for row in rows)
            else:
                out.write(f"{'INSTANCE':<22} {'FIRST RECORD':<27} {'LAST RECORD':<27} {'IMAGE':<22} HOST / LABELS\n")
                for row in rows:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(row["labels"].items()))
                    line = (f"{row['instance']:<22} {row['first']:<27} {row['last']:<27} {row['image_id'] or '-':<22} "
                            f"{row['host']} {labels}").rstrip()
                    out.write(shown(line) + "\n")
            return EXIT_OK
        wanted = Filter(since, until, args.tag or None, grep, level)
        if args.patterns is not None:
            records = fetch.records_of(source, since, until, args.instance, args.tag or None, warn)
            if records is None:
                return EXIT_FAILED
            _print_patterns(fetch.filtered(records, wanted, args.host, warn), args.patterns, args.json, out, shown)
            out.flush()
            return EXIT_OK
        line_of = _LineOf(args.json, every, template, shown)
        chunks = fetch.output_of(source, since, until, args.instance, args.tag or None, wanted, args.host, line_of,
                                 warn)
        if chunks is None:
            return EXIT_FAILED
        for chunk in chunks:
            out.buffer.write(chunk)
        out.flush()
        seen = line_of.seen
    except SourceError as exc:
        warn(str(exc))
        return EXIT_FAILED
    except BrokenPipeError:  # piped into head: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    problem = template.unknown_error(seen) if template is not None else None
    if problem is not None:
        warn(str(problem))
        return EXIT_CONFIG
    return EXIT_OK


class _LineOf:
    """``fetch``'s rendering of one record (None: left out). It runs in the fetch's worker processes
    (inherited through fork); what it learns there (the --format fields found, the keys seen, how many
    records it rendered) comes back per object through worker_state/absorb (shipper.postmortem.fetch)."""

    def __init__(self, as_json: bool, every: bool, template, shown):
        import orjson

        from shipper.postmortem.selection import render

        self.dumps, self.render = orjson.dumps, render
        self.as_json, self.every, self.template, self.shown = as_json, every, template, shown
        self.seen: set[str] = set()   # the records' keys, to name them when a --format field is unknown
        self.sent = 0                 # records rendered that worker_state has told of

    def __call__(self, record: dict) -> str | None:
        if self.as_json:
            return self.dumps(record).decode()
        if not self.every and record.get("message") is None:   # metrics samples, unless asked for
            return None
        template = self.template
        if template is None:
            return self.shown(self.render(record, None))
        if len(template.found) < len(template.fields) and len(self.seen) < 1000:
            self.seen.update(record)
        return self.shown(template.render(record))

    @property
    def message_text(self):
        """For fetch: the plain rendering of a record whose message is a string, from that string alone
        (None with --json or --format, which need the whole record)."""
        return self.shown if not self.as_json and self.template is None else None

    def worker_state(self) -> tuple:
        template = self.template
        if template is None:
            return set(), set(), 0
        rendered, self.sent = template.rendered - self.sent, template.rendered
        return set(template.found), set(self.seen), rendered

    def absorb(self, state: tuple) -> None:
        found, seen, rendered = state
        if self.template is not None:
            self.template.found.update(found)
            self.template.rendered += rendered
        if len(self.seen) < 1000:
            self.seen.update(seen)


PATTERNS_RECENT = 300.0   # "the last 5 minutes before the end"


def _print_patterns(records, count: int, as_json: bool, out, shown) -> None:
    """``fetch --patterns``: the top patterns of the errors and warnings among ``records`` over the
    range and in the last 5 minutes before the last record, each with count, first, last, one example."""
    import orjson

    from shipper.filters import LEVEL_RANKS
    from shipper.postmortem.patterns import PatternMiner
    from shipper.postmortem.selection import level_of
    from shipper.record import epoch_of, format_time

    miner = PatternMiner()
    warn_rank = LEVEL_RANKS["warn"]
    end = None
    total = 0
    for record in records:
        moment = epoch_of(record.get("time"))
        if moment is None:
            continue
        total += 1
        if end is None or moment > end:
            end = moment
        message = record.get("message")
        if not isinstance(message, str):
            continue
        level = level_of(record)
        if level is not None and LEVEL_RANKS[level] >= warn_rank:
            miner.add(record, message, level, moment)
    windows = [("range", miner.top(count))]
    if end is not None:
        windows.append(("last_5m", miner.top(count, since=end - PATTERNS_RECENT)))
    if as_json:
        for window, patterns in windows:
            for pattern in patterns:
                out.write(orjson.dumps({"window": window, "template": pattern.template, "count": pattern.count,
                                        "first": format_time(pattern.first), "last": format_time(pattern.last),
                                        "level": pattern.level, "anchor": pattern.anchor,
                                        "example": pattern.example}).decode() + "\n")
        return
    if not miner.records:
        out.write(f"no errors or warnings among the {total:,} records read\n")
        return
    dropped = f"; {miner.dropped:,} in rare patterns dropped to stay within {miner.max_clusters:,}" \
        if miner.dropped else ""
    out.write(f"{miner.records:,} errors and warnings among {total:,} records, {len(miner):,} patterns{dropped}\n")
    for window, patterns in windows:
        if window == "range":
            out.write("\nTop patterns over the range:\n")
        else:
            out.write(f"\nTop patterns in the last 5 minutes before the end ({format_time(end - PATTERNS_RECENT)} "
                      f"to {format_time(end)}):\n")
            if not patterns:
                out.write("  none\n")
        for pattern in patterns:
            out.write(shown(f"  {pattern.count:>9,}  {pattern.level or '-':<8} first {format_time(pattern.first)}  "
                            f"last {format_time(pattern.last)}  [{pattern.anchor}]") + "\n")
            out.write(shown(f"             {pattern.template}") + "\n")
            example = pattern.example
            head = " ".join(str(example[key]) for key in ("time", "host", "tag") if example.get(key))
            text = str(example.get("message", ""))
            out.write(shown(f"             e.g. {head}: " + text.replace("\n", "\n                  ")) + "\n")


def _one_instance(source, since: float, until: float, warn) -> tuple[str | None, list[str]]:
    """The instances with records in the range: (the only one, [it]) or (None, all of them)."""
    from shipper.postmortem import fetch
    from shipper.postmortem.sources import CloudWatchLogsSource

    if isinstance(source, CloudWatchLogsSource):
        seen = sorted({stream.split("/", 1)[0] for stream in source.streams(None)})
    else:
        seen = sorted(fetch.instances_seen(source, since, until, warn))
    return (seen[0] if len(seen) == 1 else None), seen


def cmd_report(args: argparse.Namespace) -> int:
    from shipper.postmortem import fetch, report
    from shipper.postmortem.selection import Filter, SelectionError, printable, time_range
    from shipper.postmortem.sources import SourceError, open_source

    shown_err = printable if sys.stderr.isatty() else str

    def warn(text: str) -> None:
        print(f"shipper report: {shown_err(text)}", file=sys.stderr)

    try:
        since, until = time_range(args.since or "1d", args.until)
    except SelectionError as exc:
        warn(str(exc))
        return EXIT_CONFIG
    try:
        source = open_source(args.source, args.endpoint_url, args.region)
        instance = args.instance
        if instance is None and args.host is None:  # the same selection as fetch: none needed for one instance
            instance, seen = _one_instance(source, since, until, warn)
            if instance is None and seen:
                shown = ", ".join(seen[:10]) + (f" and {len(seen) - 10} more" if len(seen) > 10 else "")
                warn(f"{len(seen)} instances have records in the range: {shown}; "
                     f"choose one with --instance (or --host; --list-instances on fetch lists them)")
                return EXIT_CONFIG
            if instance is None:
                from shipper.record import format_time

                warn(f"no records in {source.name} between {format_time(since)} and {format_time(until)}")
                return EXIT_FAILED
        records = fetch.records_of(source, since, until, instance, None, warn)
        if records is None:
            return EXIT_FAILED
        wanted = Filter(since, until)
        summary = report.summarize(fetch.filtered(records, wanted, args.host), args.lines)
    except (SelectionError, SourceError) as exc:
        warn(str(exc))
        return EXIT_FAILED
    # the charts span what the records cover, unless a range was asked for
    page = report.render_html(summary, source.name, since, until,
                              explicit_range=args.since is not None or args.until is not None)
    with open(args.output, "w", encoding="utf-8") as handle:
        handle.write(page)
    print(f"wrote {args.output}: {summary.records:,} records, {len(summary.metrics)} metric series, "
          f"{summary.events_seen} lifecycle events", file=sys.stderr)
    return EXIT_OK


def _positive_seconds(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _bounded_int(low: int, high: int):
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low} to {high}")
        return value

    return parse


def _fleet_selection(args: argparse.Namespace):
    from shipper.postmortem.query import Selection
    from shipper.postmortem.selection import time_range

    since, until = time_range(args.since, args.until)
    return Selection(since, until, tuple(args.instance or ()), tuple(args.tag or ()))


def cmd_query(args: argparse.Namespace) -> int:
    from shipper.postmortem import query
    from shipper.postmortem.selection import SelectionError, printable
    from shipper.postmortem.sources import SourceError

    # On a terminal, what the archive holds (messages, keys) is shown with its control characters
    # escaped, as fetch does; pipes and files get the exact text.
    shown_err = printable if sys.stderr.isatty() else str
    shown = printable if sys.stdout.isatty() else str

    def warn(text: str) -> None:
        print(f"shipper query: {shown_err(text)}", file=sys.stderr)

    sql = sys.stdin.read() if args.sql == "-" else args.sql
    try:
        selection = _fleet_selection(args)
        query.load_duckdb()
        archive = query.open_archive(args.source, args.endpoint_url, args.region)
        answer = query.run(archive, selection, sql, jobs=args.jobs)
    except (SelectionError, query.QueryError) as exc:
        warn(str(exc))
        return EXIT_CONFIG
    except SourceError as exc:
        warn(str(exc))
        return 1
    for problem in answer.problems:
        warn(problem)
    for skipped in answer.skipped:
        warn(f"left out {skipped}")
    if args.format == "csv":
        sys.stdout.write(query.format_csv(answer.columns, answer.rows))
    elif args.format == "json":
        out = sys.stdout.buffer
        for line in query.format_json(answer.columns, answer.rows):
            out.write(line)
        out.flush()
    else:
        sys.stdout.write(query.format_table(answer.columns, answer.rows, shown=shown))
    if not args.quiet:
        warn(f"read {answer.objects:,} objects ({answer.bytes / 1e6:,.1f} MB) in {answer.seconds:.2f} s")
    return 0


def cmd_athena(args: argparse.Namespace) -> int:
    from shipper.postmortem.athena import AthenaError, table_definitions

    try:
        key = {"key_template": args.key} if args.key else {}
        text = table_definitions(args.source, args.table, args.first_date, args.compacted, database=args.database, **key)
    except AthenaError as exc:
        print(f"shipper athena: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    sys.stdout.write(text)
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from shipper.postmortem import compact, query
    from shipper.postmortem.sources import SourceError

    def warn(text: str) -> None:
        print(f"shipper compact: {text}", file=sys.stderr)

    try:
        hour = compact.parse_hour(args.hour)
        archive = query.open_archive(args.source, args.endpoint_url, args.region)
        destination = args.to or compact.default_destination(args.source)
        done = compact.compact(archive, hour, destination, args.jobs, args.endpoint_url, args.region)
    except query.QueryError as exc:
        warn(str(exc))
        return EXIT_CONFIG
    except SourceError as exc:
        warn(str(exc))
        return 1
    ratio = done.output_bytes / done.input_bytes if done.input_bytes else 0
    print(f"{done.hour}: {done.records:,} records of {done.instances:,} instances ({done.input_objects:,} objects, "
          f"{done.input_bytes / 1e6:,.1f} MB) -> {destination} ({done.output_bytes / 1e6:,.1f} MB Parquet, "
          f"{ratio:.2f} of the NDJSON) in {done.seconds:.2f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shipper", description="Ship log files and metrics off the box.")
    commands = parser.add_subparsers(dest="command", required=True)
    config_help = f"config file (default: {DEFAULT_CONFIG_PATH} if present, else the embedded default)"
    default_help = f"the embedded default configuration, even when {DEFAULT_CONFIG_PATH} exists"
    env_help = ("a systemd EnvironmentFile (NAME=VALUE lines) whose values the config's ${VAR}s take, over the "
                "environment")
    run = commands.add_parser("run", help="run the agent until SIGTERM/SIGINT")
    sources = run.add_mutually_exclusive_group()
    sources.add_argument("-c", "--config", help=config_help)
    sources.add_argument("--default", action="store_true", help=default_help)
    run.add_argument("--env-file", help=env_help + " (read again on SIGHUP)")
    run.set_defaults(func=cmd_run)
    check = commands.add_parser("check", help="validate a config and print the resolved pipeline")
    sources = check.add_mutually_exclusive_group()
    sources.add_argument("-c", "--config", help=config_help)
    sources.add_argument("--default", action="store_true", help=default_help)
    check.add_argument("--env-file", help=env_help + f" (default for {DEFAULT_CONFIG_PATH}: {DEFAULT_ENV_FILE} "
                       "if present, as the unit reads it)")
    check.add_argument("--strict", action="store_true",
                       help="exit 2 on warnings too (an input whose records reach no output)")
    check.add_argument("--probe", action="store_true",
                       help="also try credentials and reach each destination (HeadBucket, DescribeLogGroups)")
    check.add_argument("--sample", metavar="FILE",
                       help="run the filters over the lines of FILE (read as the file input whose paths take it "
                            "reads it, else as plain lines) and print what each route would ship")
    check.add_argument("--tag", help="--sample: the tag of the lines (default: the input's, or the first file "
                                     "input's)")
    check.add_argument("--limit", type=_bounded_int(0, 1_000_000), default=20,
                       help="--sample: records shown per route (default 20)")
    check.set_defaults(func=cmd_check)
    status = commands.add_parser("status", help="show the running agent's inputs, outputs, rates and health")
    status.add_argument("-c", "--config", help=config_help + "; its [server] listen is asked")
    status.add_argument("--url", help="the agent's server (default: http://LISTEN from the config)")
    status.add_argument("--interval", type=_positive_seconds, default=None,
                        help="measure the rates here, between two fetches this many seconds apart "
                             "(default: the agent's own rates, over its last minute)")
    status.set_defaults(func=cmd_status)
    fetch = commands.add_parser("fetch", help="read a (dead) server's records back from S3, a directory or CloudWatch",
                                description="Print one instance's records of a time range, in time order.")
    fetch.add_argument("source", help="s3://BUCKET[/PREFIX], a directory archive, or cwl://LOG_GROUP")
    fetch.add_argument("--instance", help="the instance id (the archive's instance= partition)")
    fetch.add_argument("--host", help="only records of this host name")
    fetch.add_argument("--since", default="1d", help="a time (2026-11-29T13:00Z) or a duration ago (2h, 30m); default 1d")
    fetch.add_argument("--until", help="a time or a duration ago; default now")
    fetch.add_argument("--tag", action="append", help="only this tag (repeatable)")
    fetch.add_argument("--grep", help="only records whose message matches this regular expression")
    fetch.add_argument("--level", help="only records of this level or more severe (the parsed level, else the "
                                       "journald priority, else the level the message shows: ERROR, [warn], "
                                       "level=error ...)")
    fetch.add_argument("--json", action="store_true",
                       help="whole records as JSON lines (all of them, metrics samples too)")
    fetch.add_argument("--format", help="a line per record, e.g. '{time} {level} {host} {message}'; nested fields "
                                        "dotted ({metrics.cpu.percent}, {fields.user}), dicts and lists as JSON")
    fetch.add_argument("--all", action="store_true",
                       help="also print the records without a message (metrics samples); --json always does")
    fetch.add_argument("--patterns", nargs="?", type=_bounded_int(1, 1000), const=10, default=None, metavar="N",
                       help="instead of the records: the top N (default 10) patterns of the errors and warnings, over "
                            "the range and in the last 5 minutes before the end, with count, first, last, an example")
    fetch.add_argument("--list-instances", action="store_true", help="list the instances seen in the range instead")
    fetch.add_argument("--endpoint-url", help="an S3/CloudWatch-compatible endpoint")
    fetch.add_argument("--region", help="the AWS region (default: boto3's)")
    fetch.set_defaults(func=cmd_fetch)
    rep = commands.add_parser("report", help="one self-contained HTML page about one (dead) instance")
    rep.add_argument("source", help="s3://BUCKET[/PREFIX], a directory archive, or cwl://LOG_GROUP")
    rep.add_argument("--instance", help="the instance id (or the host name off EC2); "
                                        "not needed when one instance has records in the range")
    rep.add_argument("--host", help="only records of this host name (alone: whichever instance had it)")
    rep.add_argument("--since", default=None, help="a time or a duration ago; default 1d (the charts then span "
                                                   "what the records cover)")
    rep.add_argument("--until", help="a time or a duration ago; default now")
    rep.add_argument("--lines", type=_bounded_int(1, 10_000), default=50, help="the last lines shown (default 50)")
    rep.add_argument("-o", "--output", default="report.html", help="the HTML file to write (default report.html)")
    rep.add_argument("--endpoint-url", help="an S3/CloudWatch-compatible endpoint")
    rep.add_argument("--region", help="the AWS region (default: boto3's)")
    rep.set_defaults(func=cmd_report)
    fleet_help = "s3://BUCKET[/PREFIX] or a directory archive (or its compacted copy)"
    que = commands.add_parser("query", help="SQL over the fleet's archive (DuckDB: pip install 'shipper[query]')",
                              description="Run SQL over the table `logs`: every record field a column, plus the "
                                          "partitions dt, hour and instance. Only the asked hours are read.")
    que.add_argument("source", help=fleet_help)
    que.add_argument("sql", help="the SQL, e.g. \"SELECT instance, count(*) FROM logs GROUP BY 1\"; - reads stdin")
    que.add_argument("--since", default="1d", help="a time or a duration ago; default 1d")
    que.add_argument("--until", help="a time or a duration ago; default now")
    que.add_argument("--instance", action="append", help="only this instance's partitions (repeatable)")
    que.add_argument("--tag", action="append", help="only objects of this tag (repeatable)")
    que.add_argument("--format", choices=("table", "csv", "json"), default="table",
                     help="table (default), csv, or json (a JSON object per row)")
    que.add_argument("--jobs", type=_bounded_int(1, 64), default=16, help="S3 downloads at once (default 16)")
    que.add_argument("-q", "--quiet", action="store_true", help="no summary line on stderr")
    que.add_argument("--endpoint-url", help="an S3-compatible endpoint")
    que.add_argument("--region", help="the AWS region (default: boto3's)")
    que.set_defaults(func=cmd_query)
    ath = commands.add_parser("athena", help="print the Athena table definitions of an S3 archive (partition "
                                             "projection: no crawler)")
    ath.add_argument("source", help="s3://BUCKET[/PREFIX] of the S3 output")
    ath.add_argument("--table", default="shipper_logs", help="the table name (default shipper_logs)")
    ath.add_argument("--database", help="qualify the tables with this database")
    ath.add_argument("--first-date", help="the first day projected (default: January 1st of last year)")
    ath.add_argument("--compacted", metavar="S3_URL", help="also the table over shipper compact's Parquet objects")
    ath.add_argument("--key", help="the S3 output's key template, when not its default (checked)")
    ath.set_defaults(func=cmd_athena)
    com = commands.add_parser("compact", help="rewrite one hour of the archive (all instances) as Parquet "
                                              "(pip install 'shipper[query]')")
    com.add_argument("source", help="s3://BUCKET[/PREFIX] or a directory archive")
    com.add_argument("--hour", required=True, help="the hour, e.g. 2026-11-29T13 (or any time inside it)")
    com.add_argument("--to", help="where the Parquet objects go (default: SOURCE-parquet beside the archive)")
    com.add_argument("--jobs", type=_bounded_int(1, 64), default=16, help="S3 downloads at once (default 16)")
    com.add_argument("--endpoint-url", help="an S3-compatible endpoint")
    com.add_argument("--region", help="the AWS region (default: boto3's)")
    com.set_defaults(func=cmd_compact)
    version = commands.add_parser("version", help="print the version")
    version.set_defaults(func=cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
