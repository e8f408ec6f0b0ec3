"""The benchmarks' package, behind scripts/bench and the other scripts/bench-* scripts.

  cli.py        scripts/bench's subcommands and their options
  load.py       load, idle, matrix: the daemon under scripts/flood
  fleet.py      fleet: the daemon under scripts/fleet (the fleet shape)
  restart.py    fleet-restart: SIGKILL and restart under the fleet; the WAL checked
  recovery.py   recovery: fill, SIGKILL, restart, every ACKed frame checked
  soak.py       soak: full load for minutes, sampled
  harness.py    the daemon on a temp data dir, its stats snapshot, the temp dir's clean-up
  daemonproc.py the daemon as a child process as systemd sees it (READY=1 on a notify
                socket): shared with tests/conftest.py
  errors.py     BenchError (one line to print) and how a script exits on it or on Ctrl-C
  loadchild.py  a load generator (its command line) as a child process, and the marks
                taken while it runs
  procfs.py     /proc and /sys probes: CPU, memory, I/O, the machine's counters
  wal.py        the daemon's WAL seen through its files
  report.py     how a figure, a table and the --json object are printed

The load generators themselves are scripts/flood and scripts/fleet (on scripts/_loadlib.py
and scripts/_fleetgen.py): plain children that print one JSON object.
"""
