import signal
import sys

if sys.argv[1:2] == ["run"]:
    # Until the agent's own handlers are installed (cli.cmd_run, after the imports), a SIGHUP
    # (systemctl reload right after start) would kill it; ignoring it loses nothing, the
    # configuration is read afterwards.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

from shipper.cli import main  # noqa: E402 (after the signal disposition, on purpose)

raise SystemExit(main())
