from shipper.cli import main  # ignores SIGHUP first thing for `run` (see shipper/cli.py)

raise SystemExit(main())
