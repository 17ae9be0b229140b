"""Mixing instead of hard filtering (`curriculum.mix_temperature`) and the per-document length score
(`curriculum.metric=length`) of the difficulty curriculum (data/curriculum_difficulty.py, curriculum_fields.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import picotron_jax as pj
from picotron_jax.config import CurriculumConfig
from picotron_jax.data import curriculum_difficulty as cd
from picotron_jax.data.curriculum_fields import length_scores
from picotron_jax.errors import UserError

N = 1000  # windows; score = its index, so rank u is window u (easiest first)


def curriculum(tau: float) -> cd.DifficultyCurriculum:
    c = CurriculumConfig(kind="difficulty", start_percentile=20, steps=4, mix_temperature=tau)
    return cd.DifficultyCurriculum(c, np.arange(N, dtype=float), 0)


def test_mixing_draws_past_the_pool_with_the_stated_weights_and_stays_a_pure_function_of_the_step():
    cur = curriculum(0.05)
    step, pool = 1, 400  # pct(1) = 40: the easiest 400 windows
    assert cur.pool(step) == pool
    draws = cur.windows(0, 20000)  # batch 0: trained on by step 1
    w = np.concatenate([np.ones(pool), np.exp(-np.arange(1, N - pool + 1) / (N * 0.05))])  # the docstring's weights
    p = w / w.sum()
    share = p[pool:].sum()
    assert cur.mix_share(step) == pytest.approx(share)
    beyond = np.mean(draws >= pool)
    sigma = np.sqrt(share * (1 - share) / draws.size)
    assert abs(beyond - share) < 4 * sigma, (beyond, share)
    # the weight falls off past the frontier: the first 5 percentiles beyond it hold e times the next five
    near, far = np.sum((draws >= pool) & (draws < pool + 50)), np.sum((draws >= pool + 50) & (draws < pool + 100))
    assert near > 1.5 * far > 0
    np.testing.assert_array_equal(cur.windows(0, 1000), cur.windows(0, 1000))


def test_no_mixing_is_the_hard_filter_and_a_hot_temperature_approaches_uniform():
    hard = curriculum(0.0)
    assert hard.mix_share(1) == 0.0 and np.all(hard.windows(0, 4000) < hard.pool(1))
    hot = curriculum(100.0)  # every weight ~1: about (N - pool) / N of the rows come from past the pool
    assert hot.mix_share(1) == pytest.approx((N - 400) / N, rel=1e-2)
    assert np.mean(hot.windows(0, 4000) >= 400) == pytest.approx(0.6, abs=0.04)


class Tokens:
    """A token file stand-in with documents ended by eos = 0."""

    def __init__(self, docs: list[list[int]], seq_len: int):
        self.tokens = np.asarray([t for d in docs for t in [*d, 0]], np.uint16)
        self.seq_len, self.num_tokens, self.path = seq_len, len(self.tokens), Path("tokens.bin")
        self.num_sequences = (self.num_tokens - 1) // seq_len

    def take(self, offsets: np.ndarray) -> np.ndarray:
        return self.tokens[offsets]


def test_the_length_score_is_the_token_weighted_length_of_the_documents_a_window_spans():
    docs = [[5] * 3, [7] * 9, [9] * 1, [4] * 14]  # lengths with their eos: 4, 10, 2, 15 (31 tokens)
    ds = Tokens(docs, seq_len=6)
    length_T = np.repeat([4, 10, 2, 15], [4, 10, 2, 15]).astype(float)  # each token's document length
    expected = [length_T[w * 6: w * 6 + 7].mean() for w in range(ds.num_sequences)]
    np.testing.assert_allclose(length_scores(ds, eos_id=0, chunk=5), expected)  # chunks cut documents: no matter
    scores = length_scores(ds, 0)
    assert scores[-1] == scores.max() == 15  # inside the long last document: the hardest


@pytest.mark.parametrize("override, field", [
    (["curriculum.kind=difficulty", "curriculum.start_percentile=10", "curriculum.steps=4",
      "curriculum.mix_temperature=-1"], "curriculum.mix_temperature"),
    (["curriculum.kind=seqlen", "curriculum.start_seq_len=32", "curriculum.steps=4", "curriculum.mix_temperature=0.1"],
     "curriculum.mix_temperature"),
])
def test_bad_mixing_settings_name_the_field(override, field):
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        pj.load_config("single", override).validate()
