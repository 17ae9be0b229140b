"""`picotron-jax memory`: per-device memory of the train step by compiling only; `--plan` fits a budget.

A mesh larger than this machine is compiled for virtual XLA:CPU devices: before JAX starts, the
command asks XLA for as many host devices as the mesh needs (the same flag the tests use). JAX
cannot compile for an abstract GPU topology, and for TPU topologies only with libtpu installed,
so the figures for such a mesh are XLA:CPU's (see memory/estimate.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

from picotron_jax.config import Config
from picotron_jax.errors import UserError

FLAG = "--xla_force_host_platform_device_count"


def add_parser(sub, add_config_args) -> None:
    p = sub.add_parser("memory", help="per-device memory of the train step, by compiling only (--plan: fit a budget)")
    add_config_args(p)
    p.add_argument("--devices", type=int, default=0,
                   help="compile for this many devices (default: what the mesh needs, else all visible)")
    p.add_argument("--plan", action="store_true", help="search remat x microbatches x ZeRO stage for --budget")
    p.add_argument("--budget", help="per-device memory budget for --plan, e.g. 16GiB")
    p.add_argument("--remat", help="--plan: remat policies to try, comma-separated (default: none,dots,save_attn,"
                                   "save_qkv,full)")
    p.add_argument("--accum", help="--plan: grad_accum values to try, e.g. 1,2,4 (default: every valid power of 2)")
    p.add_argument("--zero", help="--plan: ZeRO stages to try, e.g. 0,3 (default: 0,1,3 with a data axis)")
    p.add_argument("--json", dest="json_out", help="also write the result as JSON to this file")


def needed_devices(cfg: Config, requested: int) -> int:
    """Devices the mesh asks for: --devices, mesh.num_devices, or the product of fixed axes (0: all)."""
    if requested:
        return requested
    if cfg.mesh.num_devices:
        return cfg.mesh.num_devices
    sizes = cfg.mesh.axis_sizes().values()
    return 0 if -1 in sizes else math.prod(sizes)


def ask_for_virtual_devices(n: int) -> None:
    """Before JAX starts: make sure XLA:CPU offers at least n devices."""
    if "jax" in sys.modules:
        from picotron_jax import compat

        if compat.backends_are_initialized():
            return
    flags = os.environ.get("XLA_FLAGS", "")
    current = re.search(FLAG + r"=(\d+)", flags)
    if current and int(current.group(1)) >= n:
        return
    flags = re.sub(FLAG + r"=\d+", "", flags)
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}={n}".strip()


def pick_devices(n: int) -> tuple[list, str]:
    import jax

    devices = jax.devices()
    if not n:
        return devices, ""
    if len(devices) >= n:
        return devices[:n], ""
    cpu = jax.devices("cpu")
    if len(cpu) >= n:
        return cpu[:n], (f"note: {n} devices wanted, {len(devices)} {devices[0].platform} device(s) here: compiled for "
                         f"{n} virtual XLA:CPU devices (state bytes exact; temporaries are XLA:CPU's)")
    raise UserError(f"the mesh needs {n} devices but only {len(devices)} are available and JAX had already started "
                    f"with {len(cpu)} CPU devices; run `picotron-jax memory` in a fresh process (it sets {FLAG})")


def cmd_memory(args, load) -> int:
    cfg = load(args)
    n = needed_devices(cfg, args.devices)
    if n:
        ask_for_virtual_devices(n)
    devices, note = pick_devices(n)
    if note:
        print(note, file=sys.stderr)
    if args.plan:
        result = _plan(cfg, devices, args)
    else:
        from picotron_jax.memory.estimate import estimate_memory, format_estimate

        est = estimate_memory(cfg, devices)
        print(format_estimate(est))
        result = est.as_dict()
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _ints(text: str | None, flag: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,2,4") from None


def _plan(cfg: Config, devices: list, args) -> dict:
    from picotron_jax.config_checks import REMAT_POLICIES
    from picotron_jax.memory.planner import candidate_space, choose, format_plan, plan
    from picotron_jax.units import parse_bytes

    if not args.budget:
        raise UserError("--plan needs --budget, e.g. --budget 16GiB")
    budget = parse_bytes(args.budget)
    remats = [x.strip() for x in args.remat.split(",")] if args.remat else None
    if remats and (bad := [r for r in remats if r not in REMAT_POLICIES]):
        raise UserError(f"--remat {args.remat!r}: {bad[0]!r} is not a policy; valid: {', '.join(REMAT_POLICIES)}")
    space = candidate_space(cfg, len(devices), remats, _ints(args.accum, "--accum"), _ints(args.zero, "--zero"))
    if not space:
        raise UserError("--plan: no candidate (remat x grad_accum x zero) is valid for this config; widen --remat, "
                        "--accum or --zero (pipelines take no grad_accum, MoE models no per-layer remat segments)")
    table = plan(cfg, devices, space, log=lambda s: print(s, file=sys.stderr))
    choice = choose(table, budget)
    print(format_plan(table, budget, choice))
    return {"budget_bytes": budget,
            "choice": None if choice is None else {"remat": choice.remat, "grad_accum": choice.grad_accum,
                                                   "zero_stage": choice.zero_stage, "peak_bytes": choice.peak},
            "table": [{"remat": c.remat, "grad_accum": c.grad_accum, "zero_stage": c.zero_stage, **c.estimate.as_dict()}
                      for c in table]}
