"""Weighted mixtures of sources (`data.mixture`): deterministic per (seed, step), exact in expectation.

    data:
      mixture:
        - {source: s3://bucket/web, weight: 0.7}
        - {source: ./code-store, weight: 0.3, schedule: [[0, 0.3], [10000, 0.6]]}

At step s the weights w_k(s) (a source's `schedule` is piecewise linear in the step, constant past
its ends; without one, `weight`) are normalised to p_k(s), and the step's B rows are split as
n(s) ~ Multinomial(B, p(s)) drawn from a generator seeded by (seed, s); the rows of each source are
then placed at slots given by a permutation from the same generator. E[n_k(s)] = B p_k(s) exactly.
Source k's rows at step s are its samples C_k(s) .. C_k(s) + n_k(s) - 1 with C_k(s) = sum of n_k
over the earlier steps, so every source is read in its own order (its dataset's), without repeats.
All of it depends on (seed, step) only: identical across runs, process counts and resumes.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from picotron_jax.errors import UserError


def parse_mixture(entries: list[dict]) -> list[tuple[str, np.ndarray]]:
    """`data.mixture` -> [(source, schedule [[step, weight], ...] sorted by step)], checked."""
    out = []
    for k, entry in enumerate(entries):
        where = f"data.mixture[{k}]"
        if not isinstance(entry, dict) or "source" not in entry:
            raise UserError(f"{where} = {entry!r}: each entry must be a mapping like {{source: STORE, weight: 0.5}}")
        unknown = sorted(set(entry) - {"source", "weight", "schedule"})
        if unknown:
            raise UserError(f"{where}: unknown field {unknown[0]!r}; the fields are source, weight, schedule")
        if "schedule" in entry:
            try:
                points = np.array([[float(a), float(b)] for a, b in entry["schedule"]], dtype=np.float64)
            except (TypeError, ValueError):
                raise UserError(f"{where}.schedule = {entry['schedule']!r}: must be a list of [step, weight] "
                                f"pairs, e.g. [[0, 0.3], [10000, 0.6]]") from None
            if points.size == 0:
                raise UserError(f"{where}.schedule is empty; give at least one [step, weight] pair")
            points = points[np.argsort(points[:, 0], kind="stable")]
        else:
            try:
                points = np.array([[0.0, float(entry.get("weight", 1.0))]])
            except (TypeError, ValueError):
                raise UserError(f"{where}.weight = {entry.get('weight')!r}: must be a number") from None
        if (points[:, 1] < 0).any() or not np.isfinite(points).all():
            raise UserError(f"{where}: weights must be finite and >= 0, got {points[:, 1].tolist()}")
        out.append((str(entry["source"]), points))
    if not out:
        raise UserError("data.mixture is empty; give at least one {source, weight} entry")
    knots = np.unique(np.concatenate([p[:, 0] for _, p in out]))
    totals = sum(np.interp(knots, p[:, 0], p[:, 1]) for _, p in out)
    if (totals <= 0).any():
        bad = float(knots[np.argmax(totals <= 0)])
        raise UserError(f"data.mixture: the weights sum to {float(totals.min())} at step {int(bad)}; they must "
                        f"sum to a positive number at every step (give some source a weight > 0)")
    return out


class MixtureDataset:
    """Training rows of several datasets mixed by weight; same reading API as TokenDataset for training."""

    def __init__(self, datasets: list, schedules: list[np.ndarray], seed: int, names: list[str] | None = None):
        seq = {d.seq_len for d in datasets}
        if len(seq) != 1:  # pragma: no cover - all built with train.seq_len
            raise ValueError(f"datasets of different seq_len {seq}")
        self.datasets = datasets
        self.schedules = schedules
        self.names = names or [str(i) for i in range(len(datasets))]
        self.seq_len = seq.pop()
        self.seed = int(seed)
        self.vocab_size = max(d.vocab_size for d in datasets)
        self.num_sequences = sum(d.num_sequences for d in datasets)
        self.num_held_out = 0
        self.from_cache = all(d.from_cache for d in datasets)
        self._counts = np.zeros((1, len(datasets)), np.int64)  # [steps + 1, K]: C_k(s)
        self._counts_B = 0
        self._lock = threading.Lock()

    def probabilities(self, step: int) -> np.ndarray:
        """p(step): the normalised weights [K]."""
        w = np.array([np.interp(step, p[:, 0], p[:, 1]) for p in self.schedules])
        return w / w.sum()

    def _draw(self, step: int, B: int) -> tuple[np.ndarray, np.ndarray]:
        """(n [K] rows per source, source of each of the B slots [B]) at `step`."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed % (1 << 64), 0x6D6978, step]))
        n = rng.multinomial(B, self.probabilities(step))
        slots = np.repeat(np.arange(len(n)), n)[rng.permutation(B)]
        return n, slots

    def cumulative(self, step: int, B: int) -> np.ndarray:
        """C(step) [K]: samples taken from each source before `step` (computed once, kept)."""
        with self._lock:
            if self._counts_B != B:
                self._counts, self._counts_B = np.zeros((1, len(self.datasets)), np.int64), B
            have = self._counts.shape[0] - 1
            if step > have:
                more = np.stack([self._draw(s, B)[0] for s in range(have, step)])
                self._counts = np.concatenate([self._counts, self._counts[-1] + np.cumsum(more, axis=0)])
            return self._counts[step]

    def sources(self, step: int, B: int) -> tuple[np.ndarray, np.ndarray]:
        """For each of the B rows at `step`: (source number, sample number within that source)."""
        n, slots = self._draw(step, B)
        base = self.cumulative(step, B)
        sample = np.empty(B, np.int64)
        for k in range(len(n)):
            at = np.flatnonzero(slots == k)
            sample[at] = base[k] + np.arange(at.size)
        return slots, sample

    def batch_rows(self, step: int, global_batch: int, rows) -> dict[str, np.ndarray]:
        if isinstance(rows, slice):
            rows = np.arange(global_batch)[rows]
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        src, sample = self.sources(step, global_batch)
        src, sample = src[rows], sample[rows]
        out = {name: np.empty((rows.size, self.seq_len), dtype) for name, dtype in
               (("inputs", np.int32), ("targets", np.int32), ("mask", np.float32))}
        for k in np.unique(src):
            sel = src == k
            part = self.datasets[k].sample_rows(sample[sel])
            for name in out:
                out[name][sel] = part[name]
        return out

    def tokens_by_source(self, steps: int, B: int) -> dict[str, int]:
        """Training tokens taken from each source over the first `steps` steps."""
        c = self.cumulative(steps, B)
        return {name: int(c[k]) * self.seq_len for k, name in enumerate(self.names)}

    def eval_rows(self, *_: Any) -> dict[str, np.ndarray]:
        raise UserError("eval with data.mixture is not supported (which source would be held out?); set "
                        "eval.tokens=0 and eval.fraction=0, or evaluate on one source with data.source")

    def eval_batches(self, batch: int) -> int:
        return 0

    def close(self) -> None:
        for d in self.datasets:
            getattr(d, "close", lambda: None)()

    def __repr__(self) -> str:
        return f"MixtureDataset({', '.join(self.names)}, seq_len={self.seq_len}, seed={self.seed})"
