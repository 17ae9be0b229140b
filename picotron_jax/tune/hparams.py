"""`picotron-jax tune hparams`: an Optuna study over a YAML search space (space_yaml.py).

One trial is one short training run through the library API (`Trainer`), on the whole mesh, one
after another. The held-out eval loss is reported to the trial at every evaluation (eval.every), so
the pruner (median or Hyperband) can stop a bad trial early: the callback asks the loop to stop
(`LoopControl.stop`) and the trial ends as pruned. The objective is the eval loss at the end.

With SQLite storage a study resumes: running the command again continues to --trials in total;
trials a killed run left RUNNING are marked failed and their parameters queued again. The config's
own values (when they lie in the space) run first as the baseline trial, so the report says whether
the best trial beats the config as it is.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from picotron_jax.callback import Callback
from picotron_jax.config import Config, save_config
from picotron_jax.errors import RunAborted, UserError
from picotron_jax.tune.space_yaml import Space

SAMPLERS = ("tpe", "gp", "cmaes", "random", "grid")
PRUNERS = ("median", "hyperband", "none")


class PruneOnEval(Callback):
    """Reports each evaluation's loss to the Optuna trial; stops the run when the pruner says so."""

    def __init__(self, trial: Any):
        self.trial, self.pruned = trial, False

    def on_eval(self, trainer: Any, row: dict) -> None:
        self.trial.report(row["eval_loss"], row["step"])
        if self.trial.should_prune():
            self.pruned = True
            trainer.control.stop("pruned by the Optuna pruner")


def trial_config(cfg: Config, space: Space, values: dict[str, Any]) -> Config:
    """The config one trial trains: the sampled values, the space's steps/evaluation, no checkpoints."""
    over = [f"{k}={v}" for k, v in values.items()]
    if space.steps:
        over.append(f"train.steps={space.steps}")
    if space.eval_every:
        over.append(f"eval.every={space.eval_every}")
    if not cfg.eval.enabled:
        over.append(f"eval.tokens={space.eval_tokens or 4 * cfg.train.global_batch * cfg.train.seq_len}")
    over += ["checkpoint.every=0", "generate.prompt=", "logging.progress=false"]
    return cfg.with_overrides(over)


def make_sampler(name: str, space: Space, seed: int):
    import optuna

    if name not in SAMPLERS:
        raise UserError(f"--sampler {name!r}: valid samplers are {', '.join(SAMPLERS)}")
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.GridSampler(space.grid(), seed=seed)


def make_pruner(name: str, cfg: Config, startup: int):
    import optuna

    if name not in PRUNERS:
        raise UserError(f"--pruner {name!r}: valid pruners are {', '.join(PRUNERS)}")
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(cfg.eval.every, 1), max_resource=cfg.train.steps)
    return optuna.pruners.NopPruner()


def baseline_values(cfg: Config, space: Space) -> dict[str, Any] | None:
    """The config's own values of the searched fields, if every one lies in the space."""
    out = {}
    for name, p in space.params.items():
        section, _, key = name.partition(".")
        value = getattr(getattr(cfg, section), key)
        inside = value in p.choices if p.type == "categorical" else p.low <= value <= p.high
        if not inside:
            return None
        out[name] = value
    return out


def run_study(cfg: Config, space: Space, trials: int, *, sampler: str = "tpe", pruner: str = "median",
              storage: str | None = None, study_name: str = "picotron-jax", seed: int = 0,
              pruner_startup: int = 3, baseline: bool = True, run_root: Path | None = None,
              log: Callable[[str], None] | None = None):
    """Run (or resume) the study until it holds `trials` finished (complete or pruned) trials."""
    import optuna
    from optuna.trial import TrialState
    from rich.console import Console

    from picotron_jax.trainer import Trainer

    log = log or (lambda s: None)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    probe = trial_config(cfg, space, {})
    study = optuna.create_study(study_name=study_name, storage=storage, direction="minimize", load_if_exists=True,
                                sampler=make_sampler(sampler, space, seed),
                                pruner=make_pruner(pruner, probe, pruner_startup))
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # left by a killed run
        log(f"trial {t.number} was left running (killed?): marked failed, its parameters queued again")
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params)
    if baseline and not study.trials and (values := baseline_values(cfg, space)) is not None:
        study.enqueue_trial(values, user_attrs={"baseline": True})

    def objective(trial) -> float:
        values = {name: p.suggest(trial) for name, p in space.params.items()}
        tcfg = trial_config(cfg, space, values)
        prune = PruneOnEval(trial)
        run_dir = run_root / f"trial-{trial.number:04d}" if run_root else None
        trainer = Trainer(tcfg, run_dir, callbacks=[prune], console=Console(quiet=True))
        try:
            summary = trainer.run()
        except RunAborted as exc:  # a diverged trial (non-finite loss) fails; the study goes on
            trial.set_user_attr("error", str(exc))
            log(f"trial {trial.number} {values}: failed: {exc}")
            return math.nan
        finally:
            trainer.close()
        if prune.pruned:
            log(f"trial {trial.number} {values}: pruned at step {summary.steps}")
            raise optuna.TrialPruned()
        log(f"trial {trial.number} {values}: eval loss {summary.eval_loss:.4f}")
        return summary.eval_loss

    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if trials - len(done) > 0:
        study.optimize(objective, n_trials=trials - len(done))
    return study


def study_report(study) -> dict[str, Any]:
    from optuna.trial import TrialState

    rows = [{"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
             "intermediate": {str(k): v for k, v in t.intermediate_values.items()},
             "baseline": bool(t.user_attrs.get("baseline")), "error": t.user_attrs.get("error", "")}
            for t in study.trials]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    base = next((r for r in rows if r["baseline"]), None)
    best = study.best_trial if complete else None
    return {"study": study.study_name, "trials": rows,
            "counts": {s.name: sum(1 for t in study.trials if t.state == s)
                       for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)},
            "baseline": base,
            "best": None if best is None else {"number": best.number, "params": best.params, "value": best.value}}


def write_best_preset(cfg: Config, study, path: str | Path) -> Path:
    """The config with the best trial's values, as a YAML `picotron-jax train --config` runs."""
    best = study.best_trial
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_config(cfg.with_overrides([f"{k}={v}" for k, v in best.params.items()]), path)
    path.write_text(f"# picotron-jax tune hparams: trial {best.number} of study {study.study_name!r}, eval loss "
                    f"{best.value:.4f}\n" + path.read_text())
    return path
