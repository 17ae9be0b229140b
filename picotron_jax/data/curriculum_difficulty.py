"""Curriculum by difficulty (`curriculum.kind=difficulty`): easy training windows first.

Every training window (one row of train.seq_len + 1 tokens, the unit the dataset samples) gets a
difficulty score once, cached next to the token file:

- `compression`: zlib-compressed size / raw size of the window's token bytes, a cheap proxy of its
  entropy (repetitive text compresses well and is easy);
- `rarity`: the mean unigram surprisal -log p(token) of its tokens, p counted over the training windows
  (DeepSpeed's "vocabulary rarity" metric, Li et al., arXiv 2108.06084 / DeepSpeed data efficiency);
- `reference`: the mean token loss of a trained checkpoint (`curriculum.reference_checkpoint`) on it
  (curriculum_reference.py); the cache key holds the checkpoint's identity;
- `field`: the token-weighted mean of the user's scores (`curriculum.score_field` of the .jsonl/.parquet
  records) of the documents it spans (curriculum_fields.py);
- `length`: the token-weighted mean length of the documents it spans (a per-document score: short documents
  first; the documents are read off the token file's end-of-document tokens, curriculum_fields.py).

Pacing is DeepSpeed's percentile form: step s draws from the easiest pct(s) percent of the windows,

    pct(s) = fixed_root(s, curriculum.steps, curriculum.start_percentile, 100, 1, degree)  (data/curriculum.py)

with degree 1 for fixed_linear, or, with `curriculum.pacing=gated` (data/curriculum_gate.py), the stages
gated_percentiles(start_percentile, curriculum.gate_stages) in turn, one more each time the scheduled eval
loss crosses curriculum.gate_loss or plateaus (the stage starts are then checkpointed). Rows of batch i are windows order[u], u drawn uniformly from
[0, pool(i+1)) by a generator seeded by (train.seed, i), where order sorts the windows by score (stable)
and pool(s) = ceil(pct(s) / 100 * windows). So batch i is a pure function of (seed, data, curriculum
config, i) and a resumed run reads the same batches bitwise (no other state; gated: and the stage starts). From pct = 100 on, the
batches are the dataset's usual ones. Evaluation is untouched.

Mixing instead of hard filtering (`curriculum.mix_temperature` tau > 0): the draw also reaches past the pool,
the window of rank u >= pool (of N, easiest first) weighted exp(-(u + 1 - pool) / (N tau)) against 1 for the
pool's windows: the easy pool and the current frontier dominate, harder windows appear with a weight that
falls off with their distance in quantile past the frontier (tau = 0.05: e^-1 at 5 percentiles past it).
"""

from __future__ import annotations

import hashlib
import math
import os
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from picotron_jax.config import Config, CurriculumConfig
from picotron_jax.data.curriculum import fixed_root
from picotron_jax.data.curriculum_fields import field_scores, length_scores
from picotron_jax.data.curriculum_reference import reference_key, reference_scores
from picotron_jax.data.curriculum_gate import GatedCallback, PlateauGate, gated_percentiles
from picotron_jax.data.loader import place_rows
from picotron_jax.errors import UserError

_SALT = 0x63757272  # "curr": the row draw's generator differs from the dataset's epoch permutations


def window_tokens(ds: Any, w: np.ndarray) -> np.ndarray:
    """[len(w), seq_len + 1] tokens of training windows `w`."""
    return ds.take(np.asarray(w, np.int64)[:, None] * ds.seq_len + np.arange(ds.seq_len + 1))


def score_windows(ds: Any, metric: str, chunk: int = 4096) -> np.ndarray:
    """Difficulty of each of the dataset's training windows, float64 [num_sequences] (higher: harder)."""
    n = ds.num_sequences
    out = np.empty(n, np.float64)
    if metric == "compression":
        for lo in range(0, n, chunk):
            rows = window_tokens(ds, np.arange(lo, min(lo + chunk, n)))
            out[lo:lo + len(rows)] = [len(zlib.compress(r.tobytes(), 6)) / r.nbytes for r in rows]
        return out
    if metric == "rarity":
        counts = np.zeros(ds.vocab_size, np.int64)
        for lo in range(0, n, chunk):
            counts += np.bincount(window_tokens(ds, np.arange(lo, min(lo + chunk, n))).reshape(-1),
                                  minlength=ds.vocab_size)[: ds.vocab_size]
        surprisal = -np.log(np.maximum(counts, 1) / counts.sum())
        for lo in range(0, n, chunk):
            out[lo:lo + min(chunk, n - lo)] = surprisal[window_tokens(ds, np.arange(lo, min(lo + chunk, n)))].mean(1)
        return out
    raise UserError(f"config field 'curriculum.metric' = {metric!r}: valid values are compression, rarity "
                    "(reference and field are scored by cached_scores, from the run's config)")


def _scorer(ds: Any, metric: str, cfg: Config | None) -> tuple[str, Callable[[], np.ndarray]]:
    """(cache-name tag, the computation) of `metric`: the tag names what else the scores depend on."""
    if metric == "reference":
        return f"-{reference_key(cfg.curriculum.reference_checkpoint)}", lambda: reference_scores(ds, cfg)
    if metric == "length":
        from picotron_jax.data.tokenizer import load_tokenizer

        eos_id = load_tokenizer(cfg.data.tokenizer).eos_id
        return f"-eos{eos_id}", lambda: length_scores(ds, eos_id)
    if metric == "field":
        field = cfg.curriculum.score_field
        tag = hashlib.sha256(field.encode()).hexdigest()[:12]
        return f"-{tag}", lambda: field_scores(ds, cfg.data, field)
    return "", lambda: score_windows(ds, metric)


def cached_scores(ds: Any, metric: str, cfg: Config | None = None) -> np.ndarray:
    """The window scores, computed once per (token file, metric and what it reads, seq_len) and kept next
    to the token file (written to a temporary name and renamed; an unwritable folder just recomputes next
    time). `reference` and `field` read their checkpoint / field from `cfg`."""
    path = Path(ds.path)
    tag, compute = _scorer(ds, metric, cfg)
    cache = path.with_name(f"{path.stem}.difficulty-{metric}{tag}-T{ds.seq_len}-N{ds.num_sequences}.npy")
    if cache.is_file():
        scores = np.load(cache)
        if scores.shape == (ds.num_sequences,):
            return scores
    scores = compute()
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, scores)
        tmp.replace(cache)
    except OSError:
        tmp.unlink(missing_ok=True)
    return scores


class DifficultyCurriculum:
    """Which windows step s may draw from, and the batches drawn from them."""

    def __init__(self, c: CurriculumConfig, scores: np.ndarray, seed: int, gate: PlateauGate | None = None):
        self.c, self.seed, self.gate = c, seed, gate
        self.stages = gated_percentiles(c.start_percentile, c.gate_stages) if gate is not None else []
        self.scores = np.asarray(scores, np.float64)
        self.order = np.argsort(self.scores, kind="stable")  # easiest first

    def percentile(self, step: int) -> int:
        """pct(s): the share of windows (percent, easiest first) step `step` (1-based) draws from."""
        c = self.c
        if self.gate is not None:
            self.gate.check(step)
            return self.stages[min(self.gate.stage(step), len(self.stages) - 1)]
        degree = 1 if c.pacing == "fixed_linear" else c.root_degree
        return fixed_root(min(step, c.steps), c.steps, c.start_percentile, 100, 1, degree)

    def pool(self, step: int) -> int:
        return max(1, math.ceil(self.percentile(step) / 100 * len(self.order)))

    def windows(self, index: int, batch: int) -> np.ndarray:
        """The windows of batch `index` (trained on by step index + 1), [batch]."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed % (1 << 64), _SALT, index]))
        pool = self.pool(index + 1)
        if self.c.mix_temperature == 0:
            return self.order[rng.integers(0, pool, batch)]
        cdf = self.mix_cdf(pool)
        u = np.searchsorted(cdf, rng.random(batch) * cdf[-1], side="right")
        return self.order[np.minimum(u, len(self.order) - 1)]

    def mix_cdf(self, pool: int) -> np.ndarray:
        """Cumulative draw weights of the ranks 0..N-1 with mixing (see the module docstring), [N]."""
        n = len(self.order)
        beyond = np.exp(-np.arange(1, n - pool + 1) / (n * self.c.mix_temperature))
        return np.concatenate([np.arange(1, pool + 1, dtype=np.float64), pool + np.cumsum(beyond)])

    def mix_share(self, step: int) -> float:
        """The expected share of step `step`'s rows drawn from past the pool (0 without mixing)."""
        pool = self.pool(step)
        if self.c.mix_temperature == 0 or pool >= len(self.order):
            return 0.0
        cdf = self.mix_cdf(pool)
        return float(1 - cdf[pool - 1] / cdf[-1])

    def read(self, ds: Any, index: int, batch: int, sharding: Any) -> dict:
        if self.percentile(index + 1) >= 100:
            return place_rows(lambda rows: ds.batch_rows(index, batch, rows), batch, ds.seq_len, sharding)
        chosen = self.windows(index, batch)

        def read_rows(rows: np.ndarray) -> dict[str, np.ndarray]:
            tokens = window_tokens(ds, chosen[rows]).astype(np.int32)
            return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                    "mask": np.ones((len(rows), ds.seq_len), np.float32)}

        return place_rows(read_rows, batch, ds.seq_len, sharding)


class DifficultyWarmup(GatedCallback):
    """The loop callback: reads every training batch from its step's pool; logs the stage in each row
    (`curriculum_percentile` = pct(s), `difficulty_max` = the hardest score the pool holds; gated:
    `curriculum_stage` and `curriculum_stage_step`, the step the stage began)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.curriculum: DifficultyCurriculum | None = None
        c = cfg.curriculum
        if c.pacing == "gated":  # before the data is read: a restore hands the gate its state first
            self.gate = PlateauGate(len(gated_percentiles(c.start_percentile, c.gate_stages)), cfg.eval.every,
                                    c.gate_delay, c.gate_patience, c.gate_min_delta, c.gate_loss)

    def stage_label(self, stage: int) -> str:
        c = self.cfg.curriculum
        return f"the easiest {gated_percentiles(c.start_percentile, c.gate_stages)[stage]}% of the windows"

    def _build(self, ds: Any) -> DifficultyCurriculum:
        if self.curriculum is None:
            if not all(hasattr(ds, a) for a in ("take", "num_sequences", "path")):
                raise UserError("config field 'curriculum.kind' = 'difficulty': needs a local token file "
                                f"dataset (data.source a corpus or .jsonl/.parquet), not {type(ds).__name__}; "
                                "use curriculum.kind=seqlen with this data")
            scores = cached_scores(ds, self.cfg.curriculum.metric, self.cfg)
            self.curriculum = DifficultyCurriculum(self.cfg.curriculum, scores, self.cfg.train.seed, self.gate)
        return self.curriculum

    def wrap_batches(self, read: Callable[[int], Any]) -> Callable[[int], Any]:
        run = getattr(read, "__self__", None)  # the Run whose `batch` this replaces (the first wrapper)
        if run is None or not hasattr(run, "dataset"):
            raise RuntimeError("DifficultyWarmup must wrap Run.batch directly: it is the first loop callback")
        batch, sharding = self.cfg.train.global_batch, run.rules.batch_sharding()
        cur = self._build(run._data())
        return lambda index: cur.read(run._data(), index, batch, sharding)

    def on_log(self, trainer: Any, row: dict) -> None:
        if row.get("kind") == "train" and self.curriculum is not None:
            cur, step = self.curriculum, row["step"]
            row["curriculum_percentile"] = cur.percentile(step)
            row["difficulty_max"] = float(cur.scores[cur.order[cur.pool(step) - 1]])
            if cur.c.mix_temperature > 0:
                row["curriculum_mix_share"] = round(cur.mix_share(step), 4)
            if (gate := self.gate) is not None:
                row["curriculum_stage"], row["curriculum_stage_step"] = gate.stage(step), gate.starts[gate.stage(step)]
