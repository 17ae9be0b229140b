#!/usr/bin/env bash
# Pipeline schedules against data parallelism: the bench-32m model (8 layers) on 8 virtual CPU devices,
# dp8 vs pp2-dp4 and pp4-dp2 under each schedule, one after the other in the same run (same machine load).
# Same global batch (16 x 256 tokens) everywhere; microbatches = 2 x pipe.
# Usage: benchmarks/pipeline.sh   (JSON in benchmarks/results/, one table row per layout on stdout)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
mkdir -p benchmarks/results
COMMON="mesh.num_devices=0 train.global_batch=16 bench.steps=${STEPS:-3} bench.warmup=1"
run() {  # name, overrides...
  local name=$1; shift
  XLA_FLAGS=--xla_force_host_platform_device_count=8 "$BIN/picotron-jax" bench --config meshes/bench-32m.yaml \
    --json "benchmarks/results/pipeline-$name.json" $COMMON "$@" >/dev/null
  "$BIN/python" - "$name" <<'PY'
import json, sys
n = sys.argv[1]
b = json.load(open(f"benchmarks/results/pipeline-{n}.json"))
pl = b["pipeline"] or {}
bubble = f"{pl['bubble_counted']:.3f} / {pl['bubble_analytic']:.3f}" if pl else "-"
print(f"| {n} | {b['mesh']} | {b['tokens_per_s']:,.0f} | {b['step_s']:.2f} | {bubble} | "
      f"{b['memory']['temp_bytes'] / 2**20:,.0f} | {b['compile_s']:.0f} |", flush=True)
PY
}
echo "| layout | mesh | tokens/s | step s | bubble counted / analytic | temp MiB | compile s |"
echo "|---|---|---|---|---|---|---|"
run dp8 mesh.data=8
for pp in 2 4; do
  dp=$((8 / pp))
  for sched in afab 1f1b interleaved; do
    run "pp$pp-dp$dp-$sched" mesh.pipe=$pp mesh.data=$dp pipeline.schedule=$sched pipeline.microbatches=$((2 * pp))
  done
done
run dp8-again mesh.data=8
