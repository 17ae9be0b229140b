"""`picotron-jax meta --config FILE --run-dir DIR`: meta-train, print the k-shot adaptation table and write
DIR/adaptation.json ({"meta": [...], "baseline": [...]}: held-out loss after 0 .. meta.eval_steps inner steps)."""

from __future__ import annotations


def add_parser(sub, add_config_args) -> None:
    p = sub.add_parser("meta", help="meta-learning (MAML, first-order MAML, Reptile, Meta-SGD) on the mesh")
    add_config_args(p)
    p.add_argument("--run-dir", default=None, help="write adaptation.json and metrics.jsonl here")


def cmd_meta(args, load) -> int:
    from picotron_jax.meta.loop import run_meta

    run_meta(load(args), args.run_dir)
    return 0
