"""`picotron-jax debug hang RUN_DIR`: print the hang report from the dumps in RUN_DIR/debug/;
`picotron-jax debug nan RUN_DIR --step K`: replay step K and name the operation that first produced a NaN/inf;
`picotron-jax debug replay RUN_DIR --step K`: replay step K and compare it bitwise with what the run recorded;
`picotron-jax debug bisect --config A --against B`: the first layer value where two layouts differ."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("debug", help="the distributed debugger: hang reports, NaN origin, step replay")
    what = p.add_subparsers(dest="debug_command", required=True)
    h = what.add_parser("hang", help="print the hang report from RUN_DIR/debug/hang-p*.json (exit 1: no dumps)")
    h.add_argument("run_dir", help="the run directory of the hung run")
    n = what.add_parser("nan", help="replay step K from the checkpoint before it, checking every operation "
                                    "(exit 1: the replayed step is finite)")
    n.add_argument("run_dir", help="the run directory (config.yaml and checkpoints)")
    n.add_argument("--step", type=int, required=True, help="the step whose loss or gradients became non-finite")
    r = what.add_parser("replay", help="re-run step K from the checkpoint before it and compare it bitwise with its "
                                       "metrics row and checkpoint (exit 1: it differs)")
    r.add_argument("run_dir", help="the run directory (config.yaml, metrics.jsonl and checkpoints)")
    r.add_argument("--step", type=int, required=True, help="the step to replay")
    b = what.add_parser("bisect", help="one step on two layouts from one initialisation and batch: the first layer "
                                       "output or gradient that differs (exit 1: one does)")
    b.add_argument("--config", required=True, help="layout A: a YAML file or preset name (e.g. single)")
    b.add_argument("--against", required=True, help="layout B: a YAML file or preset name (e.g. tp2-dp4)")
    b.add_argument("--tolerance", type=float, default=1e-4, help="largest relative difference that counts as equal")
    b.add_argument("overrides", nargs="*", help="section.key=value overrides applied to both configs")


def cmd_debug(args) -> int:
    if args.debug_command == "nan":
        return cmd_nan(args)
    if args.debug_command == "bisect":
        return cmd_bisect(args)
    if args.debug_command == "replay":
        from picotron_jax.debug.replay import replay_step

        result = replay_step(args.run_dir, args.step)
        print(result.describe())
        return 0 if result.compared and result.identical else 1
    from picotron_jax.debug.hang import load_dumps, report

    dumps = load_dumps(Path(args.run_dir))
    if not dumps:
        print(f"no hang dumps in {Path(args.run_dir) / 'debug'} (hang-p<process>.json are written when the "
              f"watchdog stops a multi-process run)", file=sys.stderr)
        return 1
    print(report(dumps), end="")
    return 0


def cmd_nan(args) -> int:
    from picotron_jax.debug.nan import replay_and_trace

    origin = replay_and_trace(args.run_dir, args.step)
    if origin is None:
        print(f"step {args.step} is finite when replayed: the fault does not reproduce (transient: hardware, or a "
              f"race), or it lies outside the step (data, host code)")
        return 1
    print(origin.describe())
    return 0


def cmd_bisect(args) -> int:
    from picotron_jax.config import load_config
    from picotron_jax.debug.bisect import bisect

    a, b = load_config(args.config, args.overrides), load_config(args.against, args.overrides)
    found = bisect(a, b, args.tolerance)
    if found is None:
        print(f"no divergence: every layer output, the loss and every gradient agree within relative tolerance "
              f"{args.tolerance:g}")
        return 0
    print(found.describe())
    return 1
