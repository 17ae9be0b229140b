"""The hyperparameter search space of `tune hparams`, from YAML.

    steps: 60            # train.steps of every trial
    eval_every: 20       # eval.every: the pruner sees the eval loss at these steps
    eval_tokens: 16384   # eval.tokens when the config holds out none
    params:
      optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      optimizer.warmup_steps: {type: int, low: 0, high: 40, step: 10}
      optimizer.b2: {type: categorical, choices: [0.95, 0.99]}

Each parameter is a config field (`section.key`, checked against the config's types); `float` and
`int` spaces are uniform or log-uniform (`log: true`, low > 0), `int` may have a `step`;
`categorical` picks among `choices`. The grid sampler takes categorical spaces and int spaces with a step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from picotron_jax.config import Config
from picotron_jax.errors import UserError

TYPES = ("float", "int", "categorical")


@dataclass
class Param:
    name: str  # section.key
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None

    def suggest(self, trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.name, self.choices)

    def grid(self) -> list:
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int" and self.step:
            return list(range(int(self.low), int(self.high) + 1, int(self.step)))
        raise UserError(f"search space '{self.name}': the grid sampler needs categorical choices or an int range "
                        f"with a step (e.g. {{type: int, low: 0, high: 40, step: 10}})")


@dataclass
class Space:
    params: dict[str, Param]
    steps: int = 0  # 0: the config's train.steps
    eval_every: int = 0  # 0: the config's eval.every
    eval_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def grid(self) -> dict[str, list]:
        return {n: p.grid() for n, p in self.params.items()}


def _field_type(cfg: Config, name: str) -> type:
    section, _, key = name.partition(".")
    sec = getattr(cfg, section, None) if section and key else None
    if sec is None or not dataclasses.is_dataclass(sec) or key not in {f.name for f in dataclasses.fields(sec)}:
        raise UserError(f"search space parameter '{name}': not a config field (section.key, e.g. optimizer.lr)")
    return type(getattr(sec, key))


def _num(raw: dict, key: str, where: str) -> float:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"search space '{where}': '{key}' must be a number, got {value!r}")
    return float(value)


def parse_param(name: str, raw: Any, cfg: Config) -> Param:
    ftype = _field_type(cfg, name)
    if not isinstance(raw, dict):
        raise UserError(f"search space '{name}': expected a mapping like {{type: float, low: 1e-4, high: 1e-2}}, "
                        f"got {raw!r}")
    kind = raw.get("type")
    if kind not in TYPES:
        raise UserError(f"search space '{name}': type {kind!r}; valid types are {', '.join(TYPES)}")
    unknown = set(raw) - {"type", "low", "high", "log", "step", "choices"}
    if unknown:
        raise UserError(f"search space '{name}': unknown key '{sorted(unknown)[0]}'; keys are type, low, high, log, "
                        f"step, choices")
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"search space '{name}': categorical needs a non-empty 'choices' list")
        return Param(name, kind, choices=choices)
    if ftype not in (int, float) or (kind == "float" and ftype is int):
        raise UserError(f"search space '{name}': the config field is {ftype.__name__}; use type "
                        f"{'int' if ftype is int else 'categorical'}")
    low, high = _num(raw, "low", name), _num(raw, "high", name)
    if not low < high:
        raise UserError(f"search space '{name}': low = {low:g} must be below high = {high:g}")
    log = bool(raw.get("log", False))
    if log and low <= 0:
        raise UserError(f"search space '{name}': log: true needs low > 0, got {low:g}")
    step = _num(raw, "step", name) if "step" in raw else None
    if step is not None and (step <= 0 or log):
        raise UserError(f"search space '{name}': step must be > 0 and cannot combine with log: true")
    if kind == "int" and not (low.is_integer() and high.is_integer()):
        raise UserError(f"search space '{name}': an int space needs whole low/high, got {low:g}..{high:g}")
    return Param(name, kind, low, high, log, step)


def parse_space(source: str | Path | dict, cfg: Config) -> Space:
    """A Space from a YAML file (or its parsed dict), each parameter checked against `cfg`."""
    if isinstance(source, dict):
        raw = source
    else:
        p = Path(source)
        if not p.is_file():
            raise UserError(f"--space {source!r}: no such file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"--space {source}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("params"), dict) or not raw["params"]:
        raise UserError("search space: expected a mapping with 'params: {section.key: {type: ..., ...}, ...}'")
    unknown = set(raw) - {"params", "steps", "eval_every", "eval_tokens"}
    if unknown:
        raise UserError(f"search space: unknown key '{sorted(unknown)[0]}'; keys are params, steps, eval_every, "
                        f"eval_tokens")
    ints = {}
    for key in ("steps", "eval_every", "eval_tokens"):
        value = raw.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"search space: '{key}' must be a whole number >= 0, got {value!r}")
        ints[key] = value
    params = {name: parse_param(name, spec, cfg) for name, spec in raw["params"].items()}
    return Space(params, **ints)
