#!/usr/bin/env bash
# Remat policy x precision on bench-32m: compiled memory and interleaved step times (benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p benchmarks/results
$PY benchmarks/memory_policies.py --config meshes/bench-32m.yaml --rounds "${1:-3}" \
  --json benchmarks/results/memory_policies.json
# the planner on the same model: fastest configuration under a 1 GiB per-device budget
$PY -m picotron_jax memory --config meshes/bench-32m.yaml --plan --budget 1GiB --remat none,dots,save_attn,full \
  --accum 1,2,4 --json benchmarks/results/memory_plan.json
