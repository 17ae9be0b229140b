"""The training loop: run jitted steps and fire events; everything else is a callback (callback.py).

`Trainer` is also the Python API (notebooks, scripts): build once, then `step()`, `run(n)`,
`evaluate()`, `save()`, `generate()`, `shardings()`, `reconfigure(...)`, and `Trainer.restore(...)`.
What it builds is a `Run` (run.py); how the state starts is session.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
from rich.console import Console

from picotron_jax import session
from picotron_jax.callback import CallbackList, LoopControl
from picotron_jax.callbacks import build_callbacks
from picotron_jax.config import Config
from picotron_jax.data import prefetch
from picotron_jax.data.loader import PREFETCH_BATCHES
from picotron_jax.observe.metrics import median
from picotron_jax.signals import StopFlag, reached_stop_point, stop_on_signals
from picotron_jax.train.evaluate import evaluate as evaluate_split


@dataclass
class Summary:
    steps: int = 0  # the step reached (optimizer steps done in total)
    steps_run: int = 0  # steps this run() call took
    first_loss: float = math.nan
    final_loss: float = math.nan
    eval_loss: float = math.nan
    eval_ppl: float = math.nan
    tokens_per_s: float = math.nan
    mfu: float = math.nan
    compile_s: float = math.nan
    wall_s: float = 0.0
    stopped_early: str = ""  # SIGINT, SIGTERM, train.stop_at_step, or a callback's reason
    error: str = ""  # set when the run raised
    rows: list[dict] = field(default_factory=list)  # this call's training and evaluation rows


class Trainer(session.Session):
    """A training run you can drive step by step; `picotron-jax train` is `Trainer(cfg, run_dir).run()`.

    `run_dir` None: nothing is written (no metrics.jsonl, no checkpoints unless checkpoint.dir is set).
    A run directory belongs to one run (rundir.py): a new run into one that holds a run is refused unless
    `overwrite` (the old contents are moved aside); a second trainer writing into it at once is refused.
    `callbacks`: extra loop callbacks, fired after the built-in ones and those named in the config."""

    def __init__(self, cfg: Config, run_dir: str | Path | None = None, *, callbacks: list | tuple = (),
                 console: Console | None = None, resume: bool = False, resume_from: str | None = None,
                 init_from_hf: str | None = None, overwrite: bool = False):
        self._t_start = time.perf_counter()
        self.console = console or Console(soft_wrap=True)
        self.control = LoopControl()
        self.history: list[dict] = []  # every row of this trainer, training and evaluation
        self.last_outputs: dict = {}  # the newest step's metrics, as device arrays
        self._flag = StopFlag()
        self._open(cfg, run_dir, lambda: CallbackList(build_callbacks(cfg, self.run_dir, callbacks)),
                   resume, resume_from, init_from_hf, overwrite)

    # ----------------------------------------------------------------------------- the loop
    def run(self, n: int | None = None) -> Summary:
        """Train `n` more steps, or up to train.steps (stopping early at train.stop_at_step when it lies
        ahead). A second call continues where the first stopped."""
        stop_at = self.cfg.train.stop_at_step
        end = self.step_count + n if n is not None else (
            stop_at if self.step_count < stop_at < self.cfg.train.steps else self.cfg.train.steps)
        summary, t0 = Summary(steps=self.step_count), time.perf_counter()
        self._flag = StopFlag(coordinated=jax.process_count() > 1)
        self.control.stop_reason = ""
        self.callbacks.fire("on_run_start", self)
        batches = None
        # signals are handled until on_run_end is done: a SIGTERM during the final save does not kill it
        with stop_on_signals(self._flag):
            try:
                batches = self._batches(end)
                while self.step_count < end:
                    self._advance(next(batches), summary, last=self.step_count + 1 == end)
                    if self._apply_requests():  # restored: the data continues from the restored step
                        batches.close()
                        batches = self._batches(end)
                    if self._flag.requested or self.control.stop_reason:
                        summary.stopped_early = self._flag.reason or self.control.stop_reason
                        break
                if not summary.stopped_early and self.step_count == end:
                    summary.stopped_early = "train.stop_at_step" if n is None and end == stop_at else ""
                    if self.cfg.eval.enabled and self._last_eval != self.step_count:
                        self._evaluate(summary)
                jax.block_until_ready(self.state)
            except BaseException as exc:
                summary.error = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                if batches is not None:
                    batches.close()
                if self._flag.requested and self._flag.reason and summary.stopped_early in ("", "train.stop_at_step"):
                    summary.stopped_early = self._flag.reason  # a signal after the loop's last check
                self._finish(summary, t0)
                self.callbacks.fire("on_run_end", self, summary)
        return summary

    def step(self) -> dict:
        """One optimizer step; returns its row (the metrics.jsonl row) as plain Python numbers."""
        row = self._advance(self._read(self.step_count), None, last=True)
        self._apply_requests()
        return row

    def _advance(self, batch, summary: Summary | None, last: bool) -> dict:
        number = self.step_count + 1
        self.callbacks.fire("on_step_start", self, number)
        self._flag.in_step = True
        self.state, outputs = self.built.step(self.state, batch, number)
        self.step_count, self.last_outputs = number, outputs
        self.callbacks.fire("on_step_dispatched", self, number, outputs)  # before any wait for the step
        self._flag.step_stored()  # a second Ctrl-C during the step raises here, with the state stored
        if self._sync_every_step:
            jax.block_until_ready(outputs)
        if self._flag.coordinated and reached_stop_point(number - 1):
            self._flag.requested, self._flag.reason = True, self._flag.reason or "SIGTERM"
        first = summary is not None and summary.steps_run == 0
        if not self._compiled:  # throughput excludes the compiling step
            jax.block_until_ready(outputs)
            if summary is not None:
                summary.compile_s = time.perf_counter() - self._t_dispatch
            self._rows.restart()
            self._compiled = True
        else:
            self._rows.count_step()
        if summary is not None:
            summary.steps_run += 1
        row = None
        if last or first or self._flag.requested or number % self.cfg.logging.every == 0:
            row = self._rows.row(number, outputs)
            self._record(row, summary, "on_log")
        if self.cfg.eval.enabled and self.cfg.eval.every and number % self.cfg.eval.every == 0:
            self._evaluate(summary)
        self.callbacks.fire("on_step_end", self, number, outputs)
        return row

    def _batches(self, end: int):
        """Batches step_count .. end-1 on a background thread (the next one is read during the step)."""
        self._t_dispatch = time.perf_counter()
        read = self.callbacks.wrap_batches(self.built.batch)
        return prefetch((read(i) for i in range(self.step_count, end)), size=PREFETCH_BATCHES)

    def _read(self, index: int):
        self._t_dispatch = time.perf_counter()
        return self.callbacks.wrap_batches(self.built.batch)(index)

    def _record(self, row: dict, summary: Summary | None, event: str) -> None:
        self.history.append(row)
        if summary is not None:
            summary.rows.append(row)
        self.callbacks.fire(event, self, row)

    def _finish(self, summary: Summary, t0: float) -> None:
        summary.steps, summary.wall_s = self.step_count, time.perf_counter() - t0
        train = [r for r in summary.rows if r["kind"] == "train"]
        evals = [r for r in summary.rows if r["kind"] == "eval"]
        if train:
            summary.first_loss, summary.final_loss = train[0]["loss"], train[-1]["loss"]
            summary.tokens_per_s = median([r["tokens_per_s"] for r in train])
            summary.mfu = median([r["mfu"] for r in train])
        if evals:
            summary.eval_loss, summary.eval_ppl = evals[-1]["eval_loss"], evals[-1]["eval_ppl"]

    # ----------------------------------------------------------------------------- API
    def evaluate(self) -> dict:
        """Validation loss and perplexity on the held-out split (config `eval`), as a row (also logged)."""
        return self._evaluate(None)

    def _evaluate(self, summary: Summary | None) -> dict:
        result = evaluate_split(self.built.eval_step, self.state.params, self.built.eval_batches())
        row = self._rows.eval_row(self.step_count, result)
        self._last_eval = self.step_count
        self._record(row, summary, "on_eval")
        self._rows.restart()  # evaluation time is not training throughput
        return row

    def save(self) -> str:
        """Save a checkpoint of the current step now (no-op if one exists); returns its location."""
        path, blocked = self._save()
        if blocked is not None:
            self.say(f"checkpoint {self.step_count}: training blocked {blocked:.3f}s "
                     f"({'async' if self.cfg.checkpoint.async_save else 'sync'} save)")
            self.callbacks.fire("on_checkpoint", self, self.step_count, path)
        return path
