"""Performance-gated curriculum pacing (`curriculum.pacing=gated`): advance one stage when the eval loss says so.

The stages are the curriculum's buckets (kind=seqlen: the sequence lengths, shortest first; kind=difficulty:
curriculum.gate_stages percentiles of the easiest windows, start_percentile to 100 evenly). At every
scheduled evaluation (steps that are multiples of eval.every; the extra evaluation at the end of a run
and `Trainer.evaluate()` calls do not count, so a run stopped and resumed sees the same evaluations as one
that never stopped) the gate advances one stage when either

- the eval loss crossed the threshold: eval_loss <= curriculum.gate_loss (when gate_loss > 0), or
- the loss has plateaued: the best of the stage's last `gate_patience` evals did not improve on the stage's
  best before them by more than `gate_min_delta` (relative), i.e.
  best_recent >= best_before - min_delta * |best_before|. This is the patience / min_delta rule of Keras'
  EarlyStopping and ReduceLROnPlateau (and of Lightning's EarlyStopping), with the improvement measured
  relative to the loss; the gate needs gate_patience + 1 evaluations of a stage.

Only evaluations taken at or after the stage's first step count toward it (the evaluations between a
decision and the stage it starts still measure the previous stage, and are skipped).

Determinism with the prefetch thread: a decision taken at the eval of step e starts the next stage at
step e + gate_delay, a number fixed by the config and not by when the prefetch thread happened to read.
gate_delay >= MIN_GATE_DELAY: while step e's events run the loop may already have read the batches up to
step e + READ_AHEAD_STEPS (data/loader.py), never the one after, so every batch is read after the
decisions that shape it; `decided(step)` checks it on every read. The list of steps at which each stage
began (`starts`) then defines the stage of every step purely, and it, with the current stage's eval
losses, is the callback's checkpointed state (callback.py `state_dict`), so `--resume` continues the same
stage sequence bitwise.
"""

from __future__ import annotations

import bisect

from typing import Any

from picotron_jax.callback import Callback
from picotron_jax.data.loader import READ_AHEAD_STEPS
from picotron_jax.errors import UserError

MIN_GATE_DELAY = READ_AHEAD_STEPS + 1


class PlateauGate:
    """The stage of every step, decided from the scheduled eval losses (pure logic: no JAX, no threads)."""

    def __init__(self, num_stages: int, eval_every: int, delay: int, patience: int, min_delta: float,
                 threshold: float = 0.0):
        self.num_stages, self.every, self.delay = num_stages, eval_every, delay
        self.patience, self.min_delta, self.threshold = patience, min_delta, threshold
        self.starts: list[int] = [1]  # starts[k]: the first step of stage k
        self.stage_evals: list[tuple[int, float]] = []  # (step, eval loss) of the newest stage's evaluations
        self.evaluated_through = 0  # the last scheduled evaluation step observed

    def stage(self, step: int) -> int:
        """The stage optimizer step `step` (1-based) trains at."""
        return bisect.bisect_right(self.starts, step) - 1

    def decided(self, step: int) -> bool:
        """Whether every evaluation that can shape step `step`'s stage (those at steps <= step - delay) is in."""
        return (max(0, step - self.delay) // self.every) * self.every <= self.evaluated_through

    def check(self, step: int) -> None:
        """Refuse to say the stage of a step whose deciding evaluations have not run (see the module docstring)."""
        if not self.decided(step):
            raise RuntimeError(
                f"curriculum.pacing=gated: the stage of step {step} is decided by the evaluation of step "
                f"{step - self.delay} (or earlier), which has not run (evaluated through step {self.evaluated_through}). "
                f"The loop reads at most {READ_AHEAD_STEPS} steps ahead, but a monitor rewind moves the data past the "
                "steps it skips: resume with --resume, or raise curriculum.gate_delay")

    def verdict(self, losses: list[float]) -> str:
        """Why the stage whose eval losses are `losses` (oldest first) is done, or '' while it is not."""
        if self.threshold > 0 and losses[-1] <= self.threshold:
            return f"eval loss {losses[-1]:.4f} <= curriculum.gate_loss = {self.threshold:g}"
        if len(losses) > self.patience:
            before, recent = min(losses[:-self.patience]), min(losses[-self.patience:])
            if recent >= before - self.min_delta * abs(before):
                return (f"eval loss plateaued: best {recent:.4f} of the last {self.patience} evals vs {before:.4f} "
                        f"before (improved by <= curriculum.gate_min_delta = {self.min_delta:g})")
        return ""

    def observe(self, step: int, loss: float) -> str:
        """Take the eval loss of step `step`; returns the reason when it starts a new stage (at step + delay)."""
        if step % self.every or step <= self.evaluated_through:
            return ""  # not a scheduled evaluation, or one seen already
        self.evaluated_through = step
        if len(self.starts) == self.num_stages or step < self.starts[-1]:
            return ""  # the last stage, or the next one is already decided and has not begun
        self.stage_evals.append((step, float(loss)))
        reason = self.verdict([value for _, value in self.stage_evals])
        if reason:
            self.starts.append(step + self.delay)
            self.stage_evals = []
        return reason

    def state_dict(self) -> dict:
        return {"starts": list(self.starts), "stage_evals": [[s, v] for s, v in self.stage_evals],
                "evaluated_through": self.evaluated_through}

    def load_state_dict(self, state: dict) -> None:
        self.starts = [int(s) for s in state["starts"]]
        self.stage_evals = [(int(s), float(v)) for s, v in state["stage_evals"]]
        self.evaluated_through = int(state["evaluated_through"])


def gated_percentiles(start: int, stages: int) -> list[int]:
    """kind=difficulty's stages: `stages` percentiles from `start` to 100, evenly spaced (rounded down)."""
    return sorted({start + (100 - start) * k // (stages - 1) for k in range(stages)})


class GatedCallback(Callback):
    """What a curriculum callback with a gate does besides reading batches: feed it the scheduled eval losses,
    keep its state in the checkpoint (callback.py `state_dict`), refuse a resume without that state.
    `gate` is None under the other pacings; `stage_label(k)` names stage k in the console line."""

    gate: PlateauGate | None = None
    _restored = False

    def stage_label(self, stage: int) -> str:
        return f"stage {stage}"

    def on_run_start(self, trainer: Any) -> None:
        gate = self.gate
        if gate is not None and not self._restored and trainer.step_count >= gate.every:
            raise UserError(f"config field 'curriculum.pacing' = 'gated': the run starts at step {trainer.step_count} "
                            "from a checkpoint that holds no gated curriculum state (it was saved with another "
                            "curriculum.pacing); resume with the pacing it was saved with, or start a new run")

    def on_eval(self, trainer: Any, row: dict) -> None:
        if self.gate is not None and "eval_loss" in row and (reason := self.gate.observe(row["step"], row["eval_loss"])):
            k = len(self.gate.starts) - 1
            trainer.say(f"curriculum: stage {k} ({self.stage_label(k)}) begins at step {self.gate.starts[k]}: {reason}")

    def state_dict(self) -> dict | None:
        return None if self.gate is None else self.gate.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.gate is not None:
            self.gate.load_state_dict(state)
            self._restored = True
