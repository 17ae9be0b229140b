"""Overhead of the debugger's always-on and periodic parts on bench-32m / dp8 (8 virtual CPU devices):
the train step's time, one replica consistency check (debug.check_every) and one flight-recorder entry.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python benchmarks/debug_overhead.py [--steps 5] [--checks 5]

Prints one JSON object. Interleaved: step, check, step, check, ... (the machine is noisy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax

import picotron_jax as pj
from picotron_jax.debug.consistency import first_divergence, local_fingerprints
from picotron_jax.debug.recorder import FlightRecorder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--checks", type=int, default=5)
    args = ap.parse_args()
    cfg = pj.load_config("meshes/bench-32m.yaml", ["mesh.num_devices=8", "mesh.data=8", "logging.progress=false",
                                                   "memory.live_arrays=false", "train.steps=1000"])
    trainer = pj.Trainer(cfg)
    trainer.step()  # compiles
    t = time.perf_counter()
    rows = local_fingerprints(trainer.state)  # compiles the fingerprint programs
    first_check_s = time.perf_counter() - t
    assert first_divergence(rows) is None
    steps, checks = [], []
    for _ in range(max(args.steps, args.checks)):
        t = time.perf_counter()
        jax.block_until_ready(trainer.step())
        steps.append(time.perf_counter() - t)
        t = time.perf_counter()
        assert first_divergence(local_fingerprints(trainer.state)) is None
        checks.append(time.perf_counter() - t)
    recorder = FlightRecorder(cfg, None)
    n = 100_000
    t = time.perf_counter()
    for i in range(n):
        recorder.record("step", i)
    record_us = (time.perf_counter() - t) / n * 1e6
    step_s, check_s = statistics.median(steps), statistics.median(checks)
    print(json.dumps({
        "config": "bench-32m, mesh dp8 (8 virtual CPU devices)", "arrays_checked": len({r["array"] for r in rows}),
        "shards_fingerprinted": len(rows), "step_s_median": round(step_s, 4), "check_s_median": round(check_s, 4),
        "first_check_s_with_compile": round(first_check_s, 2), "check_vs_step": round(check_s / step_s, 3),
        "recorder_entry_us": round(record_us, 3), "recorder_entries_per_step": 3,
        "recorder_vs_step": 3 * record_us * 1e-6 / step_s,
    }, indent=1))


if __name__ == "__main__":
    main()
