"""`picotron-jax tune hparams`: the argument parser and the command (hparams.py does the work)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from picotron_jax.errors import UserError


def add_hparams_parser(tsub, add_config_args) -> None:
    from picotron_jax.tune.hparams import PRUNERS, SAMPLERS

    q = tsub.add_parser("hparams", help="Optuna study over a YAML search space; one trial = one short training run")
    add_config_args(q)
    q.add_argument("--space", required=True, help="search space YAML (see picotron_jax/tune/space_yaml.py)")
    q.add_argument("--trials", type=int, required=True, help="finished trials the study should hold in total")
    q.add_argument("--sampler", default="tpe", choices=SAMPLERS)
    q.add_argument("--pruner", default="median", choices=PRUNERS)
    q.add_argument("--pruner-startup", type=int, default=3, help="median pruner: trials before it prunes")
    q.add_argument("--storage", help="Optuna storage, e.g. sqlite:///study.db (resumable); default in memory")
    q.add_argument("--study-name", default="picotron-jax")
    q.add_argument("--seed", type=int, default=0, help="sampler seed")
    q.add_argument("--no-baseline", action="store_true", help="do not run the config's own values first")
    q.add_argument("--run-dir", help="keep each trial's metrics under RUN_DIR/trial-NNNN (default: nothing written)")
    q.add_argument("--out", help="write the best trial's config as a preset YAML here")
    q.add_argument("--json", dest="json_out", help="write the study report as JSON here")


def cmd_hparams(args, load) -> int:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UserError("tune hparams needs Optuna: pip install 'picotron-jax[tune]' (or pip install optuna)") from None
    from picotron_jax.tune.hparams import run_study, study_report, write_best_preset
    from picotron_jax.tune.space_yaml import parse_space

    cfg = load(args)
    if args.trials < 1:
        raise UserError(f"--trials {args.trials}: must be >= 1")
    space = parse_space(args.space, cfg)
    study = run_study(cfg, space, args.trials, sampler=args.sampler, pruner=args.pruner, storage=args.storage,
                      study_name=args.study_name, seed=args.seed, pruner_startup=args.pruner_startup,
                      baseline=not args.no_baseline, run_root=Path(args.run_dir) if args.run_dir else None,
                      log=lambda s: print(s, file=sys.stderr))
    rep = study_report(study)
    c = rep["counts"]
    print(f"study {rep['study']!r}: {c['COMPLETE']} complete, {c['PRUNED']} pruned, {c['FAIL']} failed")
    if rep["baseline"] is not None and rep["baseline"]["value"] is not None:
        print(f"baseline (the config's values) {rep['baseline']['params']}: eval loss {rep['baseline']['value']:.4f}")
    if rep["best"] is not None:
        print(f"best trial {rep['best']['number']} {rep['best']['params']}: eval loss {rep['best']['value']:.4f}")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(rep, indent=2) + "\n")
    if rep["best"] is None:
        raise UserError("no trial completed (all pruned or failed): widen the space or lower --pruner-startup")
    if args.out:
        path = write_best_preset(cfg, study, args.out)
        print(f"wrote {path}: picotron-jax train --config {path}")
    return 0
