"""The 5D preset (meshes/5d-32.yaml: pipe 2 x data 2 x context 2 x expert 2 x tensor 2 on 32 devices),
compile-only: per-device argument (the train state), output and temporary bytes of the train step, and the
collective bytes, against the same model and batch on one device, at growing sequence lengths.

    .venv/bin/python benchmarks/five_d.py [--seq 128 512]

Needs 32 devices: XLA_FLAGS=--xla_force_host_platform_device_count=32 is set here before jax is imported.
"""

from __future__ import annotations

import argparse
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=32").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from picotron_jax.bench import compiled_memory  # noqa: E402
from picotron_jax.config import load_config  # noqa: E402
from picotron_jax.memory.estimate import abstract_inputs  # noqa: E402
from picotron_jax.observe.hlo import collective_stats  # noqa: E402
from picotron_jax.run import build_run  # noqa: E402

ONE_DEVICE = ["mesh.num_devices=1", "mesh.pipe=1", "mesh.data=1", "mesh.context=1", "mesh.expert=1", "mesh.tensor=1",
              "pipeline.schedule=none"]


def measure(overrides: list[str]) -> dict:
    cfg = load_config("meshes/5d-32.yaml", overrides)
    run = build_run(cfg, data=False)
    compiled = run.train_step.lower(*abstract_inputs(cfg, run.rules, run.setup)).compile()
    mem = compiled_memory(compiled)
    return {"args": mem["argument_bytes"], "temp": mem["temp_bytes"],
            "bytes": collective_stats(compiled.as_text())["bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[128, 512])
    args = ap.parse_args()
    print("| seq | layout | state (argument) bytes / device | temp bytes / device | all-to-all bytes | "
          "all-gather bytes | all-reduce bytes | collective-permute bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for T in args.seq:
        # one device accumulates the same 2 microbatches (the losses are means per microbatch)
        for name, mesh in (("one device", [*ONE_DEVICE, "train.grad_accum=2"]), ("5d-32", [])):
            out = measure([f"train.seq_len={T}", *mesh])
            b = out["bytes"]
            print(f"| {T} | {name} | {out['args']:,} | {out['temp']:,} | {b['all-to-all']:,} | {b['all-gather']:,} | "
                  f"{b['all-reduce']:,} | {b['collective-permute']:,} |", flush=True)


if __name__ == "__main__":
    main()
