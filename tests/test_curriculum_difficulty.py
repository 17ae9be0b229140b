"""Curriculum by difficulty (data/curriculum_difficulty.py): the scores by hand, cached once with the
token file, the percentile pacing on a table of steps, batches drawn only from the easiest pool, a
resumed run equal to the uninterrupted one bitwise, clear config errors."""

from __future__ import annotations

import zlib
from pathlib import Path

import jax
import numpy as np
import pytest

import picotron_jax as pj
from picotron_jax.config import CurriculumConfig
from picotron_jax.data import curriculum_difficulty as cd
from picotron_jax.errors import UserError

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "train.seq_len=16", "train.global_batch=8", "optimizer.warmup_steps=2",
        "logging.progress=false", "memory.live_arrays=false", "logging.every=1"]
DIFF = ["curriculum.kind=difficulty", "curriculum.start_percentile=20", "curriculum.steps=4"]


class Windows:
    """A token file stand-in: windows of seq_len + 1 tokens sharing their edge token, as TokenDataset."""

    def __init__(self, tokens: np.ndarray, seq_len: int, path: Path):
        self.tokens, self.seq_len, self.path, self.vocab_size = tokens, seq_len, path, int(tokens.max()) + 1
        self.num_sequences = (len(tokens) - 1) // seq_len

    def take(self, offsets: np.ndarray) -> np.ndarray:
        return self.tokens[offsets]


def _windows(tmp_path: Path) -> Windows:
    rng = np.random.default_rng(0)
    T = 8
    easy, hard = np.zeros(T, np.uint16), rng.integers(1, 200, T).astype(np.uint16)  # one repeated token, noise
    toks = np.concatenate([easy, hard, easy, hard, easy, [0]])  # windows: easy, hard, easy, hard, easy
    return Windows(toks, T, tmp_path / "tokens.bin")


def test_scores_by_hand(tmp_path):
    ds = _windows(tmp_path)
    comp = cd.score_windows(ds, "compression")
    rows = [ds.tokens[w * 8: w * 8 + 9] for w in range(5)]
    assert comp == pytest.approx([len(zlib.compress(r.tobytes(), 6)) / r.nbytes for r in rows])
    assert comp[4] <= comp[0] == comp[2] < comp[1] == comp[3]  # repeated tokens compress: easy
    rare = cd.score_windows(ds, "rarity")
    every = np.concatenate(rows)
    p = np.bincount(every) / every.size
    assert rare == pytest.approx([float(np.mean(-np.log(p[r]))) for r in rows])
    assert rare[0] < rare[1]  # the common token 0 is not rare
    with pytest.raises(UserError, match="curriculum.metric"):
        cd.score_windows(ds, "perplexity")


def test_scores_are_computed_once_and_cached_next_to_the_token_file(tmp_path, monkeypatch):
    ds = _windows(tmp_path)
    first = cd.cached_scores(ds, "compression")
    assert (tmp_path / "tokens.difficulty-compression-T8-N5.npy").is_file()
    monkeypatch.setattr(cd, "score_windows", lambda *a: pytest.fail("recomputed"))
    np.testing.assert_array_equal(cd.cached_scores(ds, "compression"), first)
    assert not list(tmp_path.glob("*.tmp"))


def test_percentile_pacing_and_pools_on_a_table_of_steps():
    scores = np.arange(100, dtype=float)[::-1]  # window 99 is the easiest
    lin = cd.DifficultyCurriculum(CurriculumConfig(kind="difficulty", start_percentile=20, steps=4), scores, 0)
    # fixed_linear: floor(s / 4 * (100 - 20) + 20) -> 40, 60, 80, 100, then 100
    assert [lin.percentile(s) for s in range(1, 7)] == [40, 60, 80, 100, 100, 100]
    assert [lin.pool(s) for s in (1, 2, 3)] == [40, 60, 80]
    root = cd.DifficultyCurriculum(CurriculumConfig(kind="difficulty", pacing="fixed_root", start_percentile=20,
                                                    steps=4, root_degree=2), scores, 0)
    assert [root.percentile(s) for s in (1, 2, 3, 4)] == [int((s / 4) ** 0.5 * 80 + 20) for s in (1, 2, 3, 4)]
    for index in range(3):  # batch i draws from step i + 1's pool of the easiest windows only
        w = lin.windows(index, 64)
        assert np.all(w >= 100 - lin.pool(index + 1))
        np.testing.assert_array_equal(w, lin.windows(index, 64))  # a pure function of (seed, i)
    other = cd.DifficultyCurriculum(lin.c, scores, 1)
    assert not np.array_equal(other.windows(0, 64), lin.windows(0, 64))


@pytest.mark.slow  # three trainers, as test_curriculum.py's seqlen resume test
def test_resumed_difficulty_run_equals_the_uninterrupted_one_bitwise(tmp_path):
    rng = np.random.default_rng(0)  # a small corpus (a few hundred windows) whose lines differ in difficulty
    lines = ["ab " * int(rng.integers(2, 30)) if i % 2 else "".join(map(chr, rng.integers(97, 123, 60)))
             for i in range(200)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines))
    cfg = pj.load_config("single", [*TINY, *DIFF, "train.steps=4", "checkpoint.require_lossless=true",
                                    "eval.tokens=0", "eval.fraction=0", f"data.source={tmp_path / 'corpus.txt'}",
                                    f"data.cache_dir={tmp_path / 'tokens'}"])
    with pj.Trainer(cfg.replace(train={"stop_at_step": 2}), tmp_path / "stopped") as first:
        assert first.run().stopped_early == "train.stop_at_step"
    with pj.Trainer.restore(tmp_path / "stopped") as resumed:
        rest = resumed.run()
        params = [np.asarray(x) for x in jax.tree.leaves(resumed.params)]
    straight = pj.Trainer(cfg)
    whole = straight.run()
    for x, y in zip(params, jax.tree.leaves(straight.params), strict=True):
        np.testing.assert_array_equal(x, np.asarray(y))
    rows = {r["step"]: r for r in whole.rows if r["kind"] == "train"}
    assert [(r["step"], r["loss"]) for r in rest.rows if r["kind"] == "train"] == \
        [(s, rows[s]["loss"]) for s in range(3, 5)]
    assert [rows[s]["curriculum_percentile"] for s in range(1, 5)] == [40, 60, 80, 100]
    assert rows[1]["difficulty_max"] <= rows[3]["difficulty_max"] <= rows[4]["difficulty_max"]
    assert len(list((tmp_path / "tokens").glob("*.difficulty-compression-T16-*.npy"))) == 1  # scored once


@pytest.mark.parametrize("override, field", [
    ("curriculum.metric=perplexity", "curriculum.metric"),
    ("curriculum.start_percentile=0", "curriculum.start_percentile"),
    ("curriculum.pacing=fixed_discrete", "curriculum.pacing"),
    ("curriculum.steps=0", "curriculum.steps"),
])
def test_bad_difficulty_settings_name_the_field(override, field):
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        pj.load_config("single", [*TINY, *DIFF, override]).validate()
