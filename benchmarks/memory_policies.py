"""Memory and step time of each remat policy x precision on one preset (default bench-32m).

Compiled per-device memory (`memory_analysis()`: temporaries = activations kept for the backward
pass + gradients + scratch) is deterministic. Step times are noisy on a shared host, so the
variants are timed interleaved: every round runs one step of each variant in turn; the median over
rounds is reported.

    python benchmarks/memory_policies.py [--config meshes/bench-32m.yaml] [--rounds 3]
        [--remat none,dots,save_attn,full] [--precision fp32,bf16] [--json out.json] [overrides...]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import numpy as np

from picotron_jax.config import load_config
from picotron_jax.memory.estimate import estimate_from_compiled, mib
from picotron_jax.memory.flops import traced_flops_per_device
from picotron_jax.train.state import init_train_state
from picotron_jax.run import build_run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="meshes/bench-32m.yaml")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--remat", default="none,dots,save_attn,full")
    ap.add_argument("--precision", default="fp32,bf16")
    ap.add_argument("--json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    variants = []
    for prec in args.precision.split(","):
        for remat in args.remat.split(","):
            cfg = load_config(args.config, [*args.overrides, f"precision.mode={prec}", f"memory.remat={remat}"])
            run = build_run(cfg)
            state = init_train_state(cfg, run.setup)
            batch = run.batch(0)
            t0 = time.perf_counter()
            traced = run.train_step.trace(state, batch)
            compiled = traced.lower().compile()
            compile_s = time.perf_counter() - t0
            est = estimate_from_compiled(cfg, compiled, run.rules, run.setup,
                                         traced_flops_per_device(traced, len(run.devices)))
            state, _ = compiled(state, batch)  # warm-up step
            jax.block_until_ready(state)
            variants.append({"precision": prec, "remat": remat, "compiled": compiled, "state": state, "batch": batch,
                             "est": est, "compile_s": compile_s, "times": []})
            print(f"compiled {prec}/{remat}: temp {mib(est.temp_bytes)}, peak {mib(est.peak_bytes)} ({compile_s:.1f}s)",
                  flush=True)
    for r in range(args.rounds):
        for v in variants:
            t0 = time.perf_counter()
            v["state"], metrics = v["compiled"](v["state"], v["batch"])
            jax.block_until_ready((v["state"], metrics))
            v["times"].append(time.perf_counter() - t0)
        print(f"round {r + 1}: " + ", ".join(f"{v['precision']}/{v['remat']} {v['times'][-1]:.2f}s" for v in variants),
              flush=True)

    base = next(v for v in variants if v["remat"] == "none")["est"]
    rows = []
    print("\n| precision | remat | temp | vs none fp32 | activations | peak | matmul GFLOP/step | step (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for v in variants:
        e = v["est"]
        step = float(np.median(v["times"]))
        print(f"| {v['precision']} | {v['remat']} | {mib(e.temp_bytes)} | {e.temp_bytes / base.temp_bytes:.0%} | "
              f"{mib(e.activations_bytes)} | {mib(e.peak_bytes)} | {e.flops / 1e9:.1f} | {step:.2f} s |")
        rows.append({"precision": v["precision"], "remat": v["remat"], "step_s": step, "step_s_all": v["times"],
                     "compile_s": v["compile_s"], **e.as_dict()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"host": platform.node(), "jax": jax.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
