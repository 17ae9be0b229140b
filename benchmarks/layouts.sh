#!/usr/bin/env bash
# Per-device compiled memory and collective bytes per step for every preset layout (same small model),
# on 8 virtual CPU devices. Memory and traffic are properties of the compiled program, not of the machine.
# Usage: benchmarks/layouts.sh [preset ...]   (default: all of them; JSON in benchmarks/results/, one table row per preset on stdout)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
mkdir -p benchmarks/results
for preset in ${@:-single dp8 zero1-dp8 zero3-dp8 tp2-dp4 tp4-dp2 tp8 default cp4-dp2 cp2-tp2-dp2}; do
  XLA_FLAGS=--xla_force_host_platform_device_count=8 "$BIN/picotron-jax" bench --config "meshes/$preset.yaml" \
    --json "benchmarks/results/layout-$preset.json" bench.steps=2 bench.warmup=1 >/dev/null
  "$BIN/python" - "$preset" <<'PY'
import json, sys
p = sys.argv[1]
b = json.load(open(f"benchmarks/results/layout-{p}.json"))
m, c = b["memory"], b["collective_bytes"]
kib = lambda n: f"{n / 1024:,.0f}"
print(f"| {p} | {kib(m['argument_bytes'])} | {kib(m['temp_bytes'])} | {kib(c['all-reduce'])} | "
      f"{kib(c['all-gather'])} | {kib(c['reduce-scatter'])} | {kib(c['collective-permute'])} | "
      f"{b['tokens_per_s']:,.0f} |")
PY
done
