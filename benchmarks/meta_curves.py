"""Held-out adaptation curves along one meta-training run or one baseline pre-training run, evaluated every
EVERY steps, so a sweep over training lengths costs one run per side (the attempts table of the corpus
section in benchmarks/README.md).

    PYTHONPATH=$PWD python benchmarks/meta_curves.py meta EVERY TOTAL [--config FILE] [overrides]
    PYTHONPATH=$PWD python benchmarks/meta_curves.py baseline EVERY TOTAL [--lrs 0.03,0.1] [--config FILE] [overrides]

`meta`: run_meta's meta-step for TOTAL steps (set meta.steps >= TOTAL: task batch i does not depend on it, and
Adam has no schedule, so the curve after S steps is that of a run with meta.steps = S). `baseline`:
loop.py's pretrain_baseline for TOTAL gradient evaluations (its task batches cycle over i % meta.steps, so
keep meta.steps fixed across a comparison); the meta run of S steps is matched by the baseline after
S x (meta.inner_steps + 1) evaluations. Each line: held-out query loss after 0 .. meta.eval_steps inner SGD
steps (the baseline at each of --lrs, default meta.inner_lr; the meta init at its own rates, as run_meta).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
import time

import jax

import picotron_jax as pj
from picotron_jax.meta.loop import build_meta, curves, pretrain_baseline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("side", choices=("meta", "baseline"))
    ap.add_argument("every", type=int)
    ap.add_argument("total", type=int)
    ap.add_argument("--config", default="meshes/maml-corpus.yaml")
    ap.add_argument("--lrs", default="", help="baseline: inner learning rates of its curves (default meta.inner_lr)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = pj.load_config(args.config, args.overrides)
    setup, m = build_meta(cfg), cfg.meta
    fmt = lambda c: " ".join(f"{x:.3f}" for x in c)
    t0 = time.time()
    if args.side == "meta":
        meta, opt_state = setup.init()
        step = setup.step_fn()
        for i in range(args.total):
            meta, opt_state, loss = jax.block_until_ready(step(meta, opt_state, setup.tasks(i)))
            if (i + 1) % args.every == 0:
                c = curves(setup, meta["params"], setup.learner.inner_lrs(meta), m.eval_steps)
                print(f"meta {i + 1} | train {float(loss):.3f} | {fmt(c)} | {time.time() - t0:.0f} s", flush=True)
    else:
        lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else [m.inner_lr]

        def on_step(i, params):
            if i % args.every == 0:
                for lr in lrs:
                    print(f"baseline {i} lr {lr} | {fmt(curves(setup, params, lr, m.eval_steps))} | "
                          f"{time.time() - t0:.0f} s", flush=True)

        pretrain_baseline(setup, args.total, on_step)


if __name__ == "__main__":
    main()
