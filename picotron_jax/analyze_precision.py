"""`picotron-jax precision analyze`: measure each module in bf16/fp16 against fp32 and write a policy YAML.

Runs on the configured mesh and data, at freshly initialised parameters or at a checkpoint's
(`--checkpoint DIR`: gradients late in training differ from those at step 0). See
train/precision_analysis.py for what is measured and how a module is judged.
"""

from __future__ import annotations

import fnmatch
import sys

from picotron_jax.errors import UserError


def add_parser(sub, add_config_args) -> None:
    p = sub.add_parser("precision", help="precision tools: `precision analyze` writes a per-module policy file")
    inner = p.add_subparsers(dest="precision_command", required=True)
    a = inner.add_parser("analyze", help="measure every module in bf16/fp16 against fp32; write a policy YAML")
    add_config_args(a)
    a.add_argument("--out", default="precision-policy.yaml", help="policy file to write (default: %(default)s)")
    a.add_argument("--mode", choices=("bf16", "fp16"), help="low precision to test (default: the run's mode, or "
                                                            "bf16 where that is fp32)")
    a.add_argument("--batches", type=int, default=2, help="batches to measure on (default: %(default)s)")
    a.add_argument("--modules", default="*", help="module name patterns, comma-separated (default: all)")
    a.add_argument("--checkpoint", help="a checkpoint folder (RUN_DIR/checkpoints) whose newest step is analysed")
    a.add_argument("--out-tol", type=float, default=0.05, help="largest relative output error kept in low precision")
    a.add_argument("--grad-tol", type=float, default=0.1, help="largest relative gradient error kept in low precision")


def cmd_precision(args, load) -> int:
    from picotron_jax.checkpoint.restore import restore_train_state
    from picotron_jax.train import precision as mp
    from picotron_jax.train.precision_analysis import analyze, write_policy
    from picotron_jax.train.state import init_params
    from picotron_jax.run import build_run

    cfg = load(args)
    if args.batches < 1:
        raise UserError(f"--batches {args.batches}: must be >= 1")
    patterns = [x.strip() for x in args.modules.split(",") if x.strip()]
    modules = [m for m in mp.MODULES if any(fnmatch.fnmatch(m, p) for p in patterns)]
    if not modules:
        raise UserError(f"--modules {args.modules!r} matches no module; modules are {', '.join(mp.MODULES)}")
    if cfg.moe.num_experts:
        raise UserError(f"precision analyze probes the dense layer stack; this config has MoE layers "
                        f"(moe.num_experts = {cfg.moe.num_experts}). Analyse its dense variant (moe.num_experts=0)")
    run = build_run(cfg)
    mode = args.mode or (run.setup.policy.mode if run.setup.policy.mode != "fp32" else "bf16")
    if args.checkpoint:
        state, _, _ = restore_train_state(args.checkpoint, run.setup.abstract, run.setup.shardings, cfg,
                                          lambda message: print(message, file=sys.stderr))
        params, where = state.params, f"checkpoint step {int(state.step)}"
    else:
        params, where = init_params(cfg, run.setup), "initial parameters"
    batches = [run.batch(i) for i in range(args.batches)]
    print(f"analysing {len(modules)} module(s) in {mode} against fp32 on {args.batches} batch(es), {where}",
          file=sys.stderr)
    reports = analyze(cfg, run.rules, run.setup, params, batches, [mode], modules, args.out_tol, args.grad_tol,
                      log=print)
    write_policy(args.out, mode, reports)
    kept = [r.module for r in reports if r.needs_fp32]
    print(f"wrote {args.out}: {len(kept)} of {len(reports)} module(s) in fp32 ({', '.join(kept) or 'none'}); "
          f"train with precision.policy_file={args.out}")
    return 0
