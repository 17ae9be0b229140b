"""The monitor's cost on bench-32m: off, at its defaults, and with everything on (per-layer statistics and
the detectors' reads every step), through the loop's own step (`Trainer.step`: events and detectors
included), in interleaved rounds so that the machine's load falls on every variant alike.

    PYTHONPATH=$PWD python benchmarks/monitor_overhead.py [--rounds R] [--steps K]

Each variant builds and compiles its own trainer once; then every round times K steps of each variant
(the order rotating from round to round). Printed: each variant's median tokens/s over the rounds and the
median over rounds of its per-round cost against `off` (1 - tokens/s / off's tokens/s of the same round);
and the same for the process's CPU seconds per step (`time.process_time`, every thread of the process):
on a shared machine, other processes' load moves wall time by tens of percent per round, CPU seconds much
less, so the CPU figure is the one that can resolve a cost of a few percent there.
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
    names = list(VARIANTS)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                trainers[name].step()
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
    for trainer in trainers.values():
        trainer.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    main(args.rounds, args.steps)
