"""`tune hparams`: the search-space parser and its errors; an Optuna study of short training runs that
reports the eval loss at each evaluation (pruned trials stop early), runs the config's own values as the
baseline, writes the best trial as a preset, and resumes from its SQLite storage (a trial a killed run
left running is marked failed and its parameters run again)."""

from __future__ import annotations

import json

import optuna
import pytest
import yaml

from picotron_jax.cli import main
from picotron_jax.config import load_config
from picotron_jax.errors import UserError
from picotron_jax.tune.space_yaml import parse_space

TINY = ["model.vocab_size=256", "model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=2",
        "model.num_heads=4", "model.num_kv_heads=2", "train.seq_len=32", "train.global_batch=8",
        "mesh.num_devices=2", "optimizer.lr=3e-3", "optimizer.warmup_steps=1", "train.steps=3"]
SPACE = {"steps": 4, "eval_every": 2, "eval_tokens": 2048,
         "params": {"optimizer.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
                    "optimizer.warmup_steps": {"type": "int", "low": 0, "high": 3}}}


def test_space_parses_every_kind():
    cfg = load_config(None, TINY)
    s = parse_space({"steps": 10, "params": {
        "optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "optimizer.warmup_steps": {"type": "int", "low": 0, "high": 40, "step": 10},
        "optimizer.b2": {"type": "categorical", "choices": [0.95, 0.99]}}}, cfg)
    assert s.steps == 10 and s.params["optimizer.lr"].log and s.params["optimizer.lr"].low == 1e-4
    assert s.params["optimizer.warmup_steps"].grid() == [0, 10, 20, 30, 40]
    assert s.params["optimizer.b2"].grid() == [0.95, 0.99]
    with pytest.raises(UserError, match="'optimizer.lr': the grid sampler needs"):
        s.grid()


@pytest.mark.parametrize("params,match", [
    ({"optimizer.lrr": {"type": "float", "low": 0.1, "high": 1}}, "'optimizer.lrr': not a config field"),
    ({"optimizer.lr": {"type": "normal", "low": 0.1, "high": 1}}, "type 'normal'; valid types"),
    ({"optimizer.lr": {"type": "float", "low": 1, "high": 0.1}}, "low = 1 must be below high = 0.1"),
    ({"optimizer.lr": {"type": "float", "low": 0, "high": 1, "log": True}}, "log: true needs low > 0"),
    ({"optimizer.lr": {"type": "float", "low": "a", "high": 1}}, "'low' must be a number"),
    ({"optimizer.warmup_steps": {"type": "float", "low": 0, "high": 9}}, "the config field is int; use type int"),
    ({"optimizer.b2": {"type": "categorical", "choices": []}}, "categorical needs a non-empty 'choices'"),
    ({"optimizer.lr": {"type": "float", "low": 0.1, "high": 1, "scale": 2}}, "unknown key 'scale'"),
    ({"data.source": {"type": "float", "low": 0.1, "high": 1}}, "the config field is str"),
])
def test_space_errors_name_the_parameter(params, match):
    with pytest.raises(UserError, match=match):
        parse_space({"params": params}, load_config(None, TINY))


def test_space_file_errors(tmp_path):
    cfg = load_config(None, TINY)
    with pytest.raises(UserError, match="no such file"):
        parse_space(tmp_path / "missing.yaml", cfg)
    (tmp_path / "s.yaml").write_text("params: {}\n")
    with pytest.raises(UserError, match="expected a mapping with 'params:"):
        parse_space(tmp_path / "s.yaml", cfg)
    with pytest.raises(UserError, match="unknown key 'trials'"):
        parse_space({"trials": 3, **SPACE}, cfg)


def _study(tmp_path, trials: int, *extra: str) -> dict:
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    out = tmp_path / "report.json"
    assert main(["tune", "hparams", *TINY, "--space", str(tmp_path / "space.yaml"), "--trials", str(trials),
                 "--storage", f"sqlite:///{tmp_path}/study.db", "--pruner-startup", "1", "--json", str(out),
                 "--out", str(tmp_path / "best.yaml"), *extra]) == 0
    return json.loads(out.read_text())


def _check_trials(trials: list[dict]) -> None:
    for t in trials:
        steps = sorted(int(s) for s in t["intermediate"])
        if t["state"] == "COMPLETE":  # an eval loss at every evaluation; the objective is the last one
            assert steps == [2, 4] and t["value"] == t["intermediate"]["4"]
        elif t["state"] == "PRUNED":  # stopped at the evaluation where the pruner said so
            assert steps and steps[-1] < 4


def test_study_reports_baseline_and_resumes_after_a_kill(tmp_path):
    rep = _study(tmp_path, 1)
    (base,) = rep["trials"]  # trial 0 is the config's own values (in the space), the baseline
    assert base["baseline"] and base["params"] == {"optimizer.lr": 3e-3, "optimizer.warmup_steps": 1}
    assert base["state"] == "COMPLETE" and rep["best"]["number"] == 0 and rep["baseline"]["value"] == base["value"]
    _check_trials(rep["trials"])
    preset = load_config(tmp_path / "best.yaml")
    assert (preset.optimizer.lr, preset.optimizer.warmup_steps) == (3e-3, 1) and preset.train.steps == 3

    # a killed run leaves a trial running: the next run marks it failed and runs its parameters again
    study = optuna.load_study(study_name="picotron-jax", storage=f"sqlite:///{tmp_path}/study.db")
    killed = study.ask()
    killed.suggest_float("optimizer.lr", 1e-3, 3e-2, log=True)
    killed.suggest_int("optimizer.warmup_steps", 0, 3)
    rep2 = _study(tmp_path, 2)
    assert rep2["trials"][0] == base  # resumed: the finished trial is kept, not rerun
    assert rep2["trials"][1]["state"] == "FAIL" and len(rep2["trials"]) == 3
    assert rep2["trials"][2]["params"] == killed.params and rep2["trials"][2]["state"] in ("COMPLETE", "PRUNED")
    _check_trials(rep2["trials"])
    best = min((t for t in rep2["trials"] if t["state"] == "COMPLETE"), key=lambda t: t["value"])
    assert rep2["best"]["number"] == best["number"]
    assert load_config(tmp_path / "best.yaml").optimizer.lr == best["params"]["optimizer.lr"]


@pytest.mark.slow
def test_tpe_study_prunes_with_the_median_pruner(tmp_path):
    rep = _study(tmp_path, 8)
    _check_trials(rep["trials"])
    assert rep["counts"]["COMPLETE"] + rep["counts"]["PRUNED"] == 8 and rep["counts"]["PRUNED"] >= 1


def test_hparams_errors(tmp_path, capsys):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    assert main(["tune", "hparams", *TINY, "--space", str(tmp_path / "space.yaml"), "--trials", "0"]) == 2
    assert "--trials 0: must be >= 1" in capsys.readouterr().err
