#!/usr/bin/env bash
# Checkpoint figures for bench-32m (benchmarks/README.md, "Checkpoints"): blocked time of an async vs a
# synchronous save, time to a complete checkpoint, bytes on disk per zstd level vs raw bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export PYTHONPATH=${PYTHONPATH:-.} JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
mkdir -p benchmarks/results
"$PY" benchmarks/checkpoint_bench.py --out "${TMPDIR:-/tmp}/picotron-ckpt-bench" --json "${1:-benchmarks/results/checkpoint.json}" "${@:2}"
