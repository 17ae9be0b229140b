"""`picotron-jax bench`: compile the train step once, then time it.

Reports tokens/s, MFU (DESIGN.md's flops_per_token against the run's peak), per-device compiled
memory from `memory_analysis()`, bytes per collective kind parsed from the optimized HLO, and
compile time. Benchmarks are measurements, never tests.
"""

from __future__ import annotations

import platform
import time

import jax
import numpy as np

from picotron_jax.config import Config
from picotron_jax.mesh import describe
from picotron_jax.observe.flops import flops_per_token, measure_matmul_peak, run_peak_flops, save_cpu_peak
from picotron_jax.observe.hlo import collective_bytes
from picotron_jax.train.state import init_train_state
from picotron_jax.run import build_run


def compiled_memory(compiled) -> dict[str, int]:
    """Per-device bytes of the compiled step (XLA's buffer assignment)."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    return {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "code_bytes": int(m.generated_code_size_in_bytes),
    }


def bench_step(cfg: Config, compiled=None) -> dict:
    """`compiled`: the step already compiled for this config's shapes and shardings (tune/layout.py reuses
    its compile-only executable); compiled here when None."""
    run = build_run(cfg)
    state = init_train_state(cfg, run.setup)
    batch = run.batch(0)
    t0 = time.perf_counter()
    if compiled is None:
        compiled = run.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0

    warmup, steps = cfg.bench.warmup, cfg.bench.steps
    times, cpu_times = [], []  # wall and this process's CPU seconds (all threads) per step
    for i in range(warmup + steps):
        batch = run.batch(i)
        jax.block_until_ready(batch)
        t0, c0 = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)

    step_s = float(np.median(times))
    tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
    fpt = flops_per_token(cfg.model, cfg.train.seq_len, cfg.moe)
    peak, peak_source = run_peak_flops(run.devices, cfg.logging.peak_flops)
    tps = tokens_per_step / step_s
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    return {
        "tokens_per_s": tps,
        "mfu": tps * fpt / peak,
        "peak_flops": peak,
        "peak_source": peak_source,
        "model_flops_per_token": fpt,
        "model_flops_per_s": tps * fpt,
        "step_s": step_s,
        "step_s_all": times,
        "cpu_s": float(np.median(cpu_times)),
        "compile_s": compile_s,
        "memory": compiled_memory(compiled),
        "collective_bytes": collective_bytes(compiled.as_text()),
        "xla_flops_per_device": float(cost.get("flops", float("nan"))),
        "loss": float(metrics["loss"]),
        "mesh": describe(run.mesh),
        "precision": run.setup.policy.describe(),
        "remat": cfg.memory.remat,
        "num_devices": len(run.devices),
        "device_kind": run.devices[0].device_kind,
        "params": run.setup.spec.num_params(),
        "tokens_per_step": tokens_per_step,
        "jax": jax.__version__,
        "host": platform.node(),
        "pipeline": _pipeline_report(cfg, run.mesh.shape["pipe"]),
    }


def _pipeline_report(cfg: Config, pipe: int) -> dict | None:
    """Schedule, bubble fraction (counted and analytic) and stored-input bound; None without a pipeline."""
    if pipe == 1:
        return None
    from picotron_jax.parallel.pipeline_schedule import backward_cost, schedule_of_config, schedule_report

    return schedule_report(schedule_of_config(cfg, pipe), backward_cost(cfg.memory.remat))


def bench_peak() -> dict:
    """Measure the default device's f32 matmul FLOP/s; on CPU cache it as the MFU peak."""
    result = measure_matmul_peak()
    if jax.devices()[0].platform == "cpu":
        save_cpu_peak(result)
    return {**result, "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__}
