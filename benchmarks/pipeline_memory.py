"""Compiled per-device memory of the pipelined train step, per schedule (deterministic: XLA's buffer
assignment from `compiled.memory_analysis()`, no timing).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/pipeline_memory.py \
        --config meshes/pp4-1f1b.yaml pipeline.microbatches=16 train.global_batch=32

Prints one JSON line per schedule (afab, 1f1b, interleaved) with the bubble fractions.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from picotron_jax.bench import compiled_memory
from picotron_jax.config import load_config
from picotron_jax.config_checks import validate
from picotron_jax.mesh import build_mesh, run_devices
from picotron_jax.parallel.pipeline_schedule import build_schedule
from picotron_jax.parallel.sharding import MeshRules
from picotron_jax.train.state import setup_state
from picotron_jax.train.step import build_train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--schedules", default="afab,1f1b,interleaved")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    for schedule in args.schedules.split(","):
        cfg = load_config(args.config, [*args.overrides, f"pipeline.schedule={schedule}"])
        devices = run_devices(cfg.mesh)
        sizes = validate(cfg, len(devices))
        rules = MeshRules.from_config(build_mesh(cfg.mesh, devices), cfg)
        setup = setup_state(cfg, rules)
        step = build_train_step(cfg, rules, setup)
        batch = {k: rules.batch_sharding() for k in ("inputs", "targets", "mask")}
        shapes = {k: jax.ShapeDtypeStruct((cfg.train.global_batch, cfg.train.seq_len),
                                          jnp.float32 if k == "mask" else jnp.int32, sharding=s)
                  for k, s in batch.items()}
        compiled = step.lower(setup.abstract, shapes).compile()
        sched = build_schedule(schedule, sizes["pipe"], cfg.pipeline.microbatches, cfg.pipeline.virtual_stages)
        print(json.dumps({
            "schedule": schedule, "pipe": sizes["pipe"], "microbatches": sched.m, "virtual_stages": sched.v,
            "bubble_counted": round(sched.bubble_fraction(), 4),
            "bubble_analytic": round(sched.analytic_bubble_fraction(), 4),
            "max_in_flight": max(sched.max_in_flight()),
            **compiled_memory(compiled),
        }), flush=True)


if __name__ == "__main__":
    main()
