"""`picotron-jax meta --config FILE --run-dir DIR`: meta-train, print the k-shot adaptation table and write
DIR/adaptation.json ({"meta": [...], "baseline": [...]}: held-out loss after 0 .. meta.eval_steps inner steps)."""

from __future__ import annotations

import os


def add_parser(sub, add_config_args) -> None:
    p = sub.add_parser("meta", help="meta-learning (MAML, first-order MAML, Reptile, Meta-SGD) on the mesh")
    add_config_args(p)
    p.add_argument("--run-dir", default=None, help="write adaptation.json and metrics.jsonl here")


def cmd_meta(args, load) -> int:
    """Meta-train; on a CPU-only machine the mesh's devices are virtual XLA:CPU devices (as `memory` does)."""
    from picotron_jax.memory.command import ask_for_virtual_devices, needed_devices

    cfg = load(args)
    if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        ask_for_virtual_devices(needed_devices(cfg, 0))
    from picotron_jax.meta.loop import run_meta

    run_meta(cfg, args.run_dir)
    return 0
