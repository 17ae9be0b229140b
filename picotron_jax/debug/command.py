"""`picotron-jax debug hang RUN_DIR`: print the hang report from the dumps in RUN_DIR/debug/."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("debug", help="the distributed debugger: hang reports")
    what = p.add_subparsers(dest="debug_command", required=True)
    h = what.add_parser("hang", help="print the hang report from RUN_DIR/debug/hang-p*.json (exit 1: no dumps)")
    h.add_argument("run_dir", help="the run directory of the hung run")


def cmd_debug(args) -> int:
    from picotron_jax.debug.hang import load_dumps, report

    dumps = load_dumps(Path(args.run_dir))
    if not dumps:
        print(f"no hang dumps in {Path(args.run_dir) / 'debug'} (hang-p<process>.json are written when the "
              f"watchdog stops a multi-process run)", file=sys.stderr)
        return 1
    print(report(dumps), end="")
    return 0
