"""Curriculum learning: sequence-length warm-up (short sequences first), as a loop callback.

Pacing functions follow DeepSpeed's curriculum scheduler (deepspeed/runtime/data_pipeline/
curriculum_scheduler.py; Li et al., "The Stability-Efficiency Dilemma", arXiv 2108.06084), with the
difficulty being the sequence length, `min` = curriculum.start_seq_len, `max` = train.seq_len and the
step `s` the optimizer step being taken (1-based):

    fixed_root:     d(s) = floor((s / steps) ** (1 / root_degree) * (max - min) + min), minus d mod seq_len_step,
                    capped at max
    fixed_linear:   fixed_root with root_degree = 1
    fixed_discrete: discrete_lengths[i] for the first i with s <= discrete_steps[i]; the last length after
    gated:          the buckets in turn, one more each time the eval loss crosses curriculum.gate_loss or
                    plateaus (data/curriculum_gate.py); the stage starts are the callback's checkpointed state

JAX compiles once per shape, so the length is then snapped down to a *bucket*: a multiple of
seq_len_step (and, with constant_tokens, a divisor of train.seq_len). `Curriculum.buckets(n)` lists the
lengths steps 1..n use: the train step compiles exactly once for each. Evaluation is untouched: it always
runs at train.seq_len.

With `constant_tokens` the batch of step s is the usual batch (global_batch rows of train.seq_len), each
row cut into seq_len / L rows of L, so every step trains on the same tokens as without the curriculum,
only with shorter contexts. Without it, the rows are truncated to their first L tokens (fewer tokens per
step, DeepSpeed's and Composer's SeqLengthWarmup default).

Determinism and resume: the length is a pure function of the step, so batch i is a pure function of
(seed, data, curriculum config, i) and a resumed run continues the same stage sequence bitwise; there is
no other curriculum state to checkpoint. With gated pacing it is a pure function of the step and the
stage starts, which the checkpoint holds (SeqLenWarmup.state_dict).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from picotron_jax.config import Config, CurriculumConfig
from picotron_jax.data.curriculum_gate import GatedCallback, PlateauGate
from picotron_jax.data.loader import place_rows


def fixed_root(step: int, total: int, start: int, end: int, difficulty_step: int, root_degree: int) -> int:
    """DeepSpeed's fixed_root difficulty at `step` (fixed_linear: root_degree 1)."""
    value = math.floor((float(step) / total) ** (1.0 / root_degree) * (end - start) + start)
    value -= value % difficulty_step
    return min(value, end)


def fixed_discrete(step: int, lengths: list[int], max_steps: list[int]) -> int:
    """DeepSpeed's fixed_discrete difficulty: lengths[i] while step <= max_steps[i], then the last length."""
    for length, last in zip(lengths, max_steps):
        if step <= last:
            return length
    return lengths[-1]


class Curriculum:
    """The sequence length of every step, and how a batch is rebuilt at that length."""

    def __init__(self, c: CurriculumConfig, seq_len: int, eval_every: int = 0):
        self.c, self.seq_len = c, seq_len
        if c.pacing == "fixed_discrete":
            self.lengths = sorted(set(c.discrete_lengths))
        else:
            self.lengths = [L for L in range(c.seq_len_step, seq_len + 1, c.seq_len_step)
                            if L >= c.start_seq_len and (not c.constant_tokens or seq_len % L == 0)]
        self.gate = PlateauGate(len(self.lengths), eval_every, c.gate_delay, c.gate_patience, c.gate_min_delta,
                                c.gate_loss) if c.pacing == "gated" else None

    def difficulty(self, step: int) -> int:
        """The pacing function's value at optimizer step `step` (1-based), before snapping to a bucket."""
        c = self.c
        if c.pacing == "fixed_discrete":
            return fixed_discrete(step, c.discrete_lengths, c.discrete_steps)
        degree = 1 if c.pacing == "fixed_linear" else c.root_degree
        return fixed_root(min(step, c.steps), c.steps, c.start_seq_len, self.seq_len, c.seq_len_step, degree)

    def length(self, step: int) -> int:
        """The sequence length step `step` trains on: the largest bucket not above the pacing value."""
        if self.gate is not None:
            self.gate.check(step)
            return self.lengths[min(self.gate.stage(step), len(self.lengths) - 1)]
        d = self.difficulty(step)
        return max([L for L in self.lengths if L <= d] or [self.lengths[0]])

    def buckets(self, steps: int) -> list[int]:
        """The distinct lengths steps 1..`steps` use, ascending (one compilation each); gated: every bucket
        (a stage may start at any evaluation)."""
        if self.gate is not None:
            return list(self.lengths)
        return sorted({self.length(s) for s in range(1, steps + 1)})

    def rows(self, batch: int, length: int) -> int:
        """Rows of the batch at `length`."""
        return batch * self.seq_len // length if self.c.constant_tokens else batch

    def read(self, ds: Any, index: int, batch: int, sharding: Any) -> dict:
        """Batch `index` (trained on by step index + 1) at its curriculum length, placed like a training batch;
        this process reads only the full-length rows its devices' short rows come from."""
        L = self.length(index + 1)
        if L == self.seq_len:
            return place_rows(lambda rows: ds.batch_rows(index, batch, rows), batch, self.seq_len, sharding)
        k = self.seq_len // L if self.c.constant_tokens else 1

        def read_rows(rows: np.ndarray) -> dict[str, np.ndarray]:
            source = np.unique(rows // k)  # full-length rows holding the asked-for short rows
            full = ds.batch_rows(index, batch, source)
            at = np.searchsorted(source, rows // k)
            segment = (rows % k)[:, None] * L + np.arange(L)[None, :]  # [r, L] columns in the full row
            return {name: np.take_along_axis(x_BT[at], segment, axis=1) for name, x_BT in full.items()}

        return place_rows(read_rows, self.rows(batch, L), L, sharding)


class SeqLenWarmup(GatedCallback):
    """The loop callback: reads every training batch at its step's length; logs the stage in each row
    (`seq_len`, `curriculum_stage` = the bucket's index, with gated pacing `curriculum_stage_step` = the step
    the stage began; `tokens` counts the step's tokens as always). With gated pacing it feeds the scheduled
    eval losses to the gate and keeps the gate's state in the checkpoint (GatedCallback)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.curriculum = Curriculum(cfg.curriculum, cfg.train.seq_len, cfg.eval.every)
        self.gate = self.curriculum.gate

    def stage_label(self, stage: int) -> str:
        return f"seq_len {self.curriculum.lengths[stage]}"

    def wrap_batches(self, read: Callable[[int], Any]) -> Callable[[int], Any]:
        run = getattr(read, "__self__", None)  # the Run whose `batch` this replaces (the first wrapper)
        if run is None or not hasattr(run, "dataset"):
            raise RuntimeError("SeqLenWarmup must wrap Run.batch directly: it is the first loop callback")
        batch, sharding = self.cfg.train.global_batch, run.rules.batch_sharding()
        return lambda index: self.curriculum.read(run._data(), index, batch, sharding)

    def on_log(self, trainer: Any, row: dict) -> None:
        if row.get("kind") == "train":
            L = self.curriculum.length(row["step"])
            row["seq_len"] = L
            row["curriculum_stage"] = self.curriculum.lengths.index(L)
            if (gate := self.curriculum.gate) is not None:
                row["curriculum_stage_step"] = gate.starts[gate.stage(row["step"])]
