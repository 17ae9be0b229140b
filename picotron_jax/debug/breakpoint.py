"""Conditional breakpoints (`debug.break_when`): after each step, evaluate an expression over its metrics
(debug/expr.py) and, when it holds, hand control to an inspector.

The inspector gets a `BreakContext` (trainer, state, metrics, step; `batch` read on demand). The
default one: in Jupyter the run stops after this step and `Trainer.run()` returns (call it again to
continue); on a terminal, pdb opens with `trainer`, `state`, `batch`, `metrics` in scope (`continue`
resumes training); without a terminal, one line is printed and training goes on. A test or a
notebook passes its own: `Breakpoint(text, cfg, inspector=fn)` or `set_inspector(fn)`.

Several processes: every process evaluates the same expression on the same (replicated) metrics,
so all of them break at the same step; process 0 runs the inspector, the others wait for it at a
barrier of the coordination service (up to `debug.break_timeout_s`).

The metrics an expression names are fetched from the device after every step (a sync per step,
only while a breakpoint is set).
"""

from __future__ import annotations

import statistics
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import numpy as np

from picotron_jax.callback import Callback
from picotron_jax.debug.expr import AGGREGATES, Expression, parse

METRICS = ("loss", "z_loss", "tokens", "grad_norm", "lr")
FP16_METRICS = ("loss_scale", "skipped_steps")
WINDOW = 1000  # steps kept for NAME_median / NAME_mean / NAME_max


def metric_names(cfg) -> set[str]:
    """The names `debug.break_when` may use for this config."""
    names = {"step", *METRICS}
    if cfg.precision.mode == "fp16":
        names |= set(FP16_METRICS)
    return names


@dataclass
class BreakContext:
    trainer: Any
    step: int
    metrics: dict[str, float]
    expression: str
    _batch: Any = field(default=None, repr=False)

    @property
    def state(self):
        return self.trainer.state

    @property
    def batch(self):
        """The batch this step trained on (read again from the data: same index, same tokens)."""
        if self._batch is None:
            self._batch = self.trainer.batch(self.step - 1)
        return self._batch


_INSPECTOR: list[Callable[[BreakContext], None] | None] = [None]


def set_inspector(fn: Callable[[BreakContext], None] | None) -> None:
    """The inspector breakpoints built from the config use (None: the default one)."""
    _INSPECTOR[0] = fn


def _in_jupyter() -> bool:
    shell = sys.modules.get("IPython")
    try:
        return shell is not None and type(shell.get_ipython()).__name__ == "ZMQInteractiveShell"
    except Exception:  # noqa: BLE001 - an IPython without get_ipython
        return False


def default_inspector(ctx: BreakContext) -> None:
    trainer = ctx.trainer
    head = f"breakpoint at step {ctx.step}: {ctx.expression} ({_fmt(ctx.metrics)})"
    if _in_jupyter():
        trainer.say(f"{head}; the run stops here, run() again to continue")
        trainer.control.stop(f"breakpoint ({ctx.expression})")
    elif sys.stdin is not None and sys.stdin.isatty():
        import pdb

        trainer.say(f"{head}; pdb with trainer, state, batch, metrics in scope; 'continue' resumes training")
        state, metrics = ctx.state, ctx.metrics  # noqa: F841 - in scope for the user
        batch = ctx.batch  # noqa: F841
        pdb.Pdb().set_trace()
    else:
        trainer.say(f"{head}; no terminal to inspect on, training goes on")


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.6g}" for k, v in sorted(values.items()))


class Breakpoint(Callback):
    """Break after the first step and every later one whose metrics satisfy `text`."""

    def __init__(self, text: str, cfg, inspector: Callable[[BreakContext], None] | None = None,
                 timeout_s: float | None = None):
        self.expr: Expression = parse(text, metric_names(cfg))
        self.inspector = inspector
        self.timeout_s = cfg.debug.break_timeout_s if timeout_s is None else timeout_s
        base = {n.rsplit("_", 1)[0] if n.rsplit("_", 1)[-1] in AGGREGATES and n not in metric_names(cfg) else n
                for n in self.expr.names}
        self.fetch = sorted(base - {"step"})
        self.seen: dict[str, deque] = {n: deque(maxlen=WINDOW) for n in self.fetch}
        self.fired: list[int] = []

    def values(self, step: int, outputs: dict) -> dict[str, float]:
        got = jax.device_get({n: outputs[n] for n in self.fetch})
        values = {"step": float(step)}
        for n in self.fetch:
            v = float(np.asarray(got[n]))
            self.seen[n].append(v)
            values[n] = v
            history = list(self.seen[n])
            values[f"{n}_median"] = statistics.median(history)
            values[f"{n}_mean"] = sum(history) / len(history)
            values[f"{n}_max"] = max(history)
        return values

    def on_step_end(self, trainer, step, outputs):
        values = self.values(step, outputs)
        if not self.expr.evaluate(values):
            return
        self.fired.append(step)
        shown = {n: values[n] for n in sorted(self.expr.names)}
        if jax.process_index() == 0:
            (self.inspector or _INSPECTOR[0] or default_inspector)(BreakContext(trainer, step, shown, self.expr.text))
        if jax.process_count() > 1:
            from picotron_jax import compat

            compat.distributed_client().wait_at_barrier(f"picotron_break/{step}",
                                                                int(self.timeout_s * 1000))
