"""`picotron-jax tune layout|hparams`: the argument parsers and the commands.

`tune layout` asks XLA:CPU for --devices virtual devices before JAX starts when the machine has
fewer (memory/command.py), so a layout for 8 devices can be searched on a laptop; with
--target the ranking then comes from the target's figures and is a prediction.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from picotron_jax.errors import UserError


def add_parser(sub, add_config_args) -> None:
    p = sub.add_parser("tune", help="auto-tuning: the fastest layout that fits (layout), hyperparameters (hparams)")
    tsub = p.add_subparsers(dest="tune_command", required=True)

    q = tsub.add_parser("layout", help="compile-only search over mesh x ZeRO x remat x microbatches, then short "
                                       "measured trials of the best; writes the chosen layout as a preset")
    add_config_args(q)
    q.add_argument("--devices", type=int, required=True, help="number of devices to lay the model out on")
    q.add_argument("--memory-budget", help="per-device memory budget, e.g. 16GiB (default: the target's or none)")
    q.add_argument("--time-budget", type=float, default=math.inf, help="seconds for the measured trials")
    q.add_argument("--top", type=int, default=3, help="measure at most this many of the best-ranked (0: none)")
    q.add_argument("--calibrate", type=int, default=0,
                   help="first measure this many layouts spread over the model's terms and fit its rates to them "
                        "(tune/calibrate.py), then rank and measure --top more")
    q.add_argument("--objective", choices=("wall", "cpu"), default="wall",
                   help="what the measured trials minimise (and --calibrate fits): wall seconds per step, or the "
                        "process's CPU seconds per step (steadier on a host other users load)")
    q.add_argument("--steps", type=int, default=3, help="timed steps per measured trial (after one warm-up)")
    q.add_argument("--axes", default="pipe,data,context,expert,tensor",
                   help="mesh axes to search, comma-separated (the others stay 1)")
    q.add_argument("--remat", default="none,full", help="remat policies to try, comma-separated")
    q.add_argument("--zero", default="0,1,3", help="ZeRO stages to try (only with a data axis)")
    q.add_argument("--accum", help="microbatch counts to try (default: every power of 2 dividing the batch)")
    q.add_argument("--schedules", default="1f1b,interleaved", help="pipeline schedules to try with mesh.pipe > 1")
    q.add_argument("--target", help="cluster YAML (meshes/targets/8xh100.yaml): rank by its figures, measure nothing")
    q.add_argument("--cache-dir", help="compile-result cache (default ~/.cache/picotron_jax/tune; 'none': off)")
    q.add_argument("--out", help="write the chosen layout as a preset YAML here")
    q.add_argument("--json", dest="json_out", help="write the full report as JSON here")

    from picotron_jax.tune.hparams_command import add_hparams_parser

    add_hparams_parser(tsub, add_config_args)


def _csv(text: str | None, flag: str, cast=str) -> list | None:
    if not text:
        return None
    try:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated values, e.g. 1,2,4") from None


def cmd_tune(args, load) -> int:
    if args.tune_command == "hparams":
        from picotron_jax.tune.hparams_command import cmd_hparams

        return cmd_hparams(args, load)
    return cmd_layout(args, load)


def cmd_layout(args, load) -> int:
    from picotron_jax.config_checks import REMAT_POLICIES
    from picotron_jax.memory.command import ask_for_virtual_devices, pick_devices
    from picotron_jax.units import parse_bytes

    cfg = load(args)
    if args.devices < 1:
        raise UserError(f"--devices {args.devices}: must be >= 1")
    remats = _csv(args.remat, "--remat")
    if bad := [r for r in remats if r not in REMAT_POLICIES]:
        raise UserError(f"--remat {args.remat!r}: {bad[0]!r} is not a policy; valid: {', '.join(REMAT_POLICIES)}")
    ask_for_virtual_devices(args.devices)
    devices, note = pick_devices(args.devices)
    if note:
        print(note, file=sys.stderr)

    from picotron_jax.tune.cost import load_target, measure_hardware
    from picotron_jax.tune.layout import DEFAULT_CACHE, choose, format_report, report, search, write_preset
    from picotron_jax.tune.space import enumerate_layouts

    hw = load_target(args.target) if args.target else measure_hardware(devices)
    budget = parse_bytes(args.memory_budget) if args.memory_budget else (hw.memory_bytes or math.inf)
    layouts, rejected = enumerate_layouts(cfg, args.devices, axes=_csv(args.axes, "--axes"), remats=remats,
                                          zeros=_csv(args.zero, "--zero", int),
                                          accums=_csv(args.accum, "--accum", int),
                                          schedules=_csv(args.schedules, "--schedules"))
    if not layouts:
        raise UserError(f"no layout of {args.devices} devices over {args.axes} passes the config validation "
                        f"({rejected} rejected); widen --axes, --accum or --zero, or change the model shape")
    print(f"{len(layouts)} layouts pass validation ({rejected} rejected); hardware: {hw.source}", file=sys.stderr)
    cache = None if args.cache_dir == "none" else Path(args.cache_dir) if args.cache_dir else DEFAULT_CACHE
    stand_ins = bool(note)  # virtual CPU devices standing in for devices this machine lacks: nothing to measure on
    if stand_ins and not args.target:
        print("note: the layouts are compiled for virtual CPU devices; nothing is measured, the ranking is the "
              "model's prediction with this machine's CPU figures (give --target for the real cluster's)",
              file=sys.stderr)
    measures = not (args.target or stand_ins)
    calibration: dict = {}
    results = search(cfg, devices, layouts, hw, budget=budget, top=args.top if measures else 0,
                     time_budget=args.time_budget, steps=args.steps, calibrate=args.calibrate if measures else 0,
                     objective=args.objective, calibration=calibration, cache_dir=cache,
                     log=lambda s: print(s, file=sys.stderr))
    hw = calibration.get("hardware", hw)
    chosen = choose(results, args.objective)
    print(format_report(results, chosen, budget))
    if args.target:
        print(f"note: ranked by {hw.source}; memory compiled for {args.devices} {devices[0].platform} devices")
    rep = report(results, chosen, args.devices, hw, budget, rejected)
    rep["calibration"] = {k: v for k, v in calibration.items() if k != "hardware"} or None
    rep["objective"] = args.objective
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(rep, indent=2, default=str) + "\n")
    if chosen is None:
        raise UserError("no layout fits the memory budget: raise --memory-budget, add devices, or shorten "
                        "train.seq_len / train.global_batch")
    if args.out:
        path = write_preset(cfg, chosen, args.devices, args.out)
        print(f"wrote {path}: picotron-jax train --config {path}")
    return 0
