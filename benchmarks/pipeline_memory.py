"""Compiled per-device memory of the pipelined train step, per schedule (deterministic: XLA's buffer
assignment from `compiled.memory_analysis()`, no timing).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/pipeline_memory.py \
        --config meshes/pp4-1f1b.yaml pipeline.microbatches=16 train.global_batch=32

Prints one JSON line per schedule (afab, 1f1b, interleaved) with the bubble fractions (counted, analytic,
time-weighted for this lockstep executor and for a dataflow one) and the remat policy; compare AFAB and 1F1B
like for like with `memory.remat=none` and `memory.remat=full`.
"""

from __future__ import annotations

import argparse
import json

from picotron_jax.bench import compiled_memory
from picotron_jax.config import load_config
from picotron_jax.memory.estimate import abstract_inputs
from picotron_jax.parallel.pipeline_schedule import backward_cost, build_schedule, idle_share
from picotron_jax.run import build_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--schedules", default="afab,1f1b,interleaved")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    for schedule in args.schedules.split(","):
        cfg = load_config(args.config, [*args.overrides, f"pipeline.schedule={schedule}"])
        run = build_run(cfg, data=False)
        pipe = run.mesh.shape["pipe"]
        compiled = run.train_step.lower(*abstract_inputs(cfg, run.rules, run.setup)).compile()
        sched = build_schedule(schedule, pipe, cfg.pipeline.microbatches, cfg.pipeline.virtual_stages)
        print(json.dumps({
            "schedule": schedule, "pipe": pipe, "microbatches": sched.m, "virtual_stages": sched.v,
            "bubble_counted": round(sched.bubble_fraction(), 4),
            "bubble_analytic": round(sched.analytic_bubble_fraction(), 4),
            "backward_cost": backward_cost(cfg.memory.remat),  # one B in F's: 2, or 3 under remat
            "idle_time_weighted": {k: round(v, 4) for k, v in idle_share(sched, 1.0, backward_cost(cfg.memory.remat)).items()},
            "max_in_flight": max(sched.max_in_flight()),
            "remat": cfg.memory.remat,
            **compiled_memory(compiled),
        }), flush=True)


if __name__ == "__main__":
    main()
