"""Tokens/s of bench-32m with the monitor off, at its defaults, and with everything on (per-layer statistics
every step), through the real loop (`Trainer.run`: the detectors' per-step reads included).

    PYTHONPATH=$PWD python benchmarks/monitor_overhead.py [STEPS]

Each variant compiles its own step; tokens/s is the median of the logged rows after the compiling step.
"""

from __future__ import annotations

import json
import sys

import picotron_jax as pj

VARIANTS = {
    "off": ["monitor.enabled=false"],
    "default": [],
    "everything": ["monitor.layer_every=1", "monitor.check_every=1"],
}


def main(steps: int) -> None:
    out = {}
    for name, overrides in VARIANTS.items():
        cfg = pj.load_config("bench-32m", [f"train.steps={steps}", "logging.every=2", "logging.progress=false",
                                           "memory.live_arrays=false", *overrides])
        with pj.Trainer(cfg) as trainer:
            summary = trainer.run()
        out[name] = round(summary.tokens_per_s, 1)
        print(json.dumps({"variant": name, "tokens_per_s": out[name]}), flush=True)
    for name in ("default", "everything"):
        print(f"{name}: {100 * (1 - out[name] / out['off']):+.1f}% cost against off")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 13)
