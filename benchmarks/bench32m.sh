#!/usr/bin/env bash
# The issue-2 benchmark: this CPU's f32 matmul peak, then bench-32m on one device, ROUNDS times
# (peak and step measured back to back, so both see the same machine load).
# Usage: benchmarks/bench32m.sh [ROUNDS]   (results in benchmarks/results/, not committed)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
BIN=${BIN:-.venv/bin}
mkdir -p benchmarks/results
for r in $(seq 1 "$ROUNDS"); do
  XLA_FLAGS= "$BIN/picotron-jax" bench --peak --json "benchmarks/results/peak-$r.json" >/dev/null
  XLA_FLAGS= "$BIN/picotron-jax" bench --config meshes/bench-32m.yaml --json "benchmarks/results/bench-32m-$r.json" \
    bench.steps=6 bench.warmup=2 >/dev/null
  "$BIN/python" - "$r" <<'PY'
import json, sys
r = sys.argv[1]
peak = json.load(open(f"benchmarks/results/peak-{r}.json"))
b = json.load(open(f"benchmarks/results/bench-32m-{r}.json"))
sizes = ", ".join(f"{n}^2 {v / 1e9:.0f}" for n, v in peak["by_size"].items())
print(f"round {r}: peak GFLOP/s {sizes} | bench-32m {b['tokens_per_s']:.0f} tok/s, step {b['step_s']:.2f} s, "
      f"{b['model_flops_per_s'] / 1e9:.1f} GFLOP/s, MFU {100 * b['mfu']:.1f}% | compile {b['compile_s']:.1f} s | "
      f"temp {b['memory']['temp_bytes'] / 2**20:.0f} MiB, args {b['memory']['argument_bytes'] / 2**20:.0f} MiB")
PY
done
