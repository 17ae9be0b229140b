"""Pipeline x context parallelism, compile-only: per-device temporary bytes and collective bytes of the train
step on pipe 2 x data 2 x context 2 (K/V all-gathered over `context` inside the stages) against the same run
without context parallelism (pipe 2 x data 2 on 4 devices) and against pipe 2 x data 4 (the same tokens per
device), the presets' model, global batch 16 in 4 microbatches, at growing sequence lengths.

    .venv/bin/python benchmarks/pipeline_context.py [--seq 128 512 2048]

Needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 is set here before jax is imported.
"""

from __future__ import annotations

import argparse
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from picotron_jax.config import load_config  # noqa: E402
from picotron_jax.observe.hlo import collective_stats  # noqa: E402
from picotron_jax.run import build_run  # noqa: E402


def measure(overrides: list[str]) -> dict:
    cfg = load_config("meshes/pp2-cp2-dp2.yaml", overrides)
    run = build_run(cfg, data=False)
    rules, st = run.rules, run.setup
    shapes = {k: jax.ShapeDtypeStruct((cfg.train.global_batch, cfg.train.seq_len),
                                      np.float32 if k == "mask" else np.int32, sharding=rules.batch_sharding())
              for k in ("inputs", "targets", "mask")}
    compiled = run.train_step.lower(st.abstract, shapes).compile()
    stats = collective_stats(compiled.as_text())
    return {"temp": compiled.memory_analysis().temp_size_in_bytes, "bytes": stats["bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[128, 512, 2048])
    args = ap.parse_args()
    print("| seq | layout | temp bytes / device | all-gather bytes | reduce-scatter bytes | all-reduce bytes |")
    print("|---|---|---|---|---|---|")
    for T in args.seq:
        for name, mesh in (("pp2-dp2 (4 devices)", ["mesh.context=1", "mesh.num_devices=4"]),
                           ("pp2-dp4", ["mesh.context=1", "mesh.data=4"]), ("pp2-cp2-dp2", [])):
            out = measure([f"train.seq_len={T}", "train.global_batch=16", *mesh])
            b = out["bytes"]
            print(f"| {T} | {name} | {out['temp']:,} | {b['all-gather']:,} | {b['reduce-scatter']:,} | "
                  f"{b['all-reduce']:,} |", flush=True)


if __name__ == "__main__":
    main()
