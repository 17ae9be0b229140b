"""Collective bytes per step of each preset layout, from the compiled HLO, against the closed-form minimum
(picotron_jax/memory/comm_minimum.py). Compile-only: nothing runs. 8 virtual CPU devices.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python benchmarks/comm_minimum.py [PRESET ...]
"""

from __future__ import annotations

import sys

from picotron_jax.config import load_config
from picotron_jax.memory.comm_minimum import compare_preset

PRESETS = ("dp8", "zero1-dp8", "zero3-dp8", "tp2-dp4", "tp4-dp2", "tp8", "default", "cp4-dp2", "cp2-tp2-dp2",
           "moe-ep8", "moe-dropless-dp2-ep4")
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def main() -> None:
    kib = lambda n: f"{n / 1024:,.0f}"  # noqa: E731
    print("| preset | " + " | ".join(f"{k} measured / min" for k in KINDS) + " | wire measured / min | ratio |")
    print("|---" * (len(KINDS) + 3) + "|")
    for name in sys.argv[1:] or PRESETS:
        r = compare_preset(load_config(name))
        cells = [f"{kib(r['measured'][k])} / {kib(r['minimum'][k])}" for k in KINDS]
        print(f"| {name} | " + " | ".join(cells) + f" | {kib(r['measured_wire'])} / {kib(r['minimum_wire'])} | "
              f"{r['ratio']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
