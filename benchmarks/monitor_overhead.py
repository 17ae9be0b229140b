"""The monitor's cost on bench-32m: off, at its defaults, and with everything on (per-layer statistics and
the detectors' reads every step), through the loop's own step (`Trainer.step`: events and detectors
included), in interleaved rounds so that the machine's load falls on every variant alike.

    PYTHONPATH=$PWD python benchmarks/monitor_overhead.py [--rounds R] [--steps K]

Each variant builds and compiles its own trainer once; then every round times K steps of each variant
(the order rotating from round to round). Printed: each variant's median tokens/s over the rounds and the
median over rounds of its per-round cost against `off` (1 - tokens/s / off's tokens/s of the same round);
and the same for the process's CPU seconds per step (`time.process_time`, every thread of the process).
Two figures that the machine's load does not move: each variant's matmul FLOPs per step (the jaxpr walk of
memory/flops.py, loops counted by their trip counts; a per-layer step's extra work amortised over
`monitor.layer_every` steps) and the host seconds per step the loop charged to its callbacks (the rows'
`time_host_s`: the detectors, the sinks and the monitor's reads), which together are the monitor's cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax

import picotron_jax as pj

VARIANTS = {
    "off": ["monitor.enabled=false"],
    "default": [],
    "everything": ["monitor.layer_every=1", "monitor.check_every=1", "monitor.on_spike=skip"],
}


def main(rounds: int, steps: int) -> None:
    trainers = {}
    for name, overrides in VARIANTS.items():
        cfg = pj.load_config("bench-32m", [f"train.steps={1 + rounds * steps}", "logging.every=1000000",
                                           "logging.progress=false", "memory.live_arrays=false", *overrides])
        trainers[name] = pj.Trainer(cfg)
        trainers[name].step()  # compiles
        jax.block_until_ready(trainers[name].state)
    tokens = trainers["off"].cfg.train.global_batch * trainers["off"].cfg.train.seq_len * steps
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}  # CPU seconds per step
    host: dict[str, list[float]] = {name: [] for name in VARIANTS}  # the loop's callback seconds per step
    names = list(VARIANTS)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                row = trainers[name].step()
                host[name].append(row.get("time_host_s", 0.0))
            jax.block_until_ready(trainers[name].state)
            rates[name].append(tokens / (time.perf_counter() - t0))
            cpu[name].append((time.process_time() - c0) / steps)
        print(json.dumps({"round": r, **{n: round(v[-1], 1) for n, v in rates.items()},
                          **{f"{n}_cpu_s": round(v[-1], 3) for n, v in cpu.items()}}), flush=True)
    for name in VARIANTS:
        cost = [1 - a / b for a, b in zip(rates[name], rates["off"])]
        cpu_cost = [a / b - 1 for a, b in zip(cpu[name], cpu["off"])]
        print(f"{name}: median {statistics.median(rates[name]):,.1f} tokens/s, median per-round cost against "
              f"off {100 * statistics.median(cost):+.1f}% (range {100 * min(cost):+.1f} .. {100 * max(cost):+.1f}); "
              f"CPU {statistics.median(cpu[name]):.3f} s/step, median per-round cost "
              f"{100 * statistics.median(cpu_cost):+.1f}% (range {100 * min(cpu_cost):+.1f} .. "
              f"{100 * max(cpu_cost):+.1f})")
    flops = {name: step_flops(trainer) for name, trainer in trainers.items()}  # each step traced once
    for name in trainers:
        print(f"{name}: matmul {flops[name] / 1e9:,.3f} GFLOP per step; host (callbacks) "
              f"{statistics.median(host[name]) * 1e3:.2f} ms per step")
    every = trainers["default"].cfg.monitor.layer_every
    extra = flops["everything"] - flops["off"]  # a per-layer step's extra matmuls
    print(f"default: a per-layer step every {every}: {100 * extra / every / flops['off']:+.3f}% "
          f"matmul FLOPs amortised; everything: {100 * extra / flops['off']:+.3f}%")
    for trainer in trainers.values():
        trainer.close()


def step_flops(trainer) -> float:
    """Matmul FLOPs of one call of the trainer's jitted step on its current state (trip counts included)."""
    from picotron_jax.memory.flops import traced_flops_per_device

    built = trainer.built
    traced = built.train_step.trace(trainer.state, built.batch(0))
    return traced_flops_per_device(traced, built.mesh.size)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    main(args.rounds, args.steps)
