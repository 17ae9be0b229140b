#!/usr/bin/env bash
# The issue-4 benchmark: bench-moe-32m (8 experts, top-2, bench-32m's active parameters) with
# expert=1 (one device) vs expert=8 (8 virtual devices), capacity 1.25 vs dropless, and the dense
# bench-32m as the baseline, interleaved, ROUNDS times. Every variant runs with 8 virtual CPU devices visible, so all see the same XLA:CPU setup.
# Usage: [STEPS=5 WARMUP=2] benchmarks/moe.sh [ROUNDS]   (results in benchmarks/results/, not committed)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
BIN=${BIN:-.venv/bin}
export XLA_FLAGS=--xla_force_host_platform_device_count=8
mkdir -p benchmarks/results
declare -A VARIANTS=(
  [dense]="mesh.num_devices=1"
  [ep1-capacity]="mesh.num_devices=1 moe.dispatch=capacity"
  [ep1-dropless]="mesh.num_devices=1 moe.dispatch=dropless"
  [ep8-capacity]="mesh.num_devices=8 mesh.expert=8 moe.dispatch=capacity"
  [ep8-dropless]="mesh.num_devices=8 mesh.expert=8 moe.dispatch=dropless"
)
for r in $(seq 1 "$ROUNDS"); do
  for v in dense ep1-capacity ep8-capacity ep1-dropless ep8-dropless; do
    config=meshes/bench-moe-32m.yaml
    [ "$v" = dense ] && config=meshes/bench-32m.yaml
    # shellcheck disable=SC2086
    "$BIN/picotron-jax" bench --config "$config" --json "benchmarks/results/moe-$v-$r.json" \
      ${VARIANTS[$v]} bench.steps="${STEPS:-5}" bench.warmup="${WARMUP:-2}" >/dev/null
    "$BIN/python" - "benchmarks/results/moe-$v-$r.json" "$v" "$r" <<'PY'
import json, sys
b, v, r = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
c = b["collective_bytes"]
print(f"round {r} {v:13s} {b['tokens_per_s']:6.0f} tok/s | step {b['step_s']:.2f} s | compile {b['compile_s']:.1f} s | "
      f"temp {b['memory']['temp_bytes'] / 2**20:.0f} MiB args {b['memory']['argument_bytes'] / 2**20:.0f} MiB | "
      f"all-to-all {c.get('all-to-all', 0) / 2**20:.1f} MiB all-reduce {c.get('all-reduce', 0) / 2**20:.1f} MiB | "
      f"loss {b['loss']:.4f}", flush=True)
PY
  done
done
