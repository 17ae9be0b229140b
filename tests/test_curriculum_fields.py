"""Difficulty from the user's scores (data/curriculum_fields.py): each window gets the token-weighted mean score
of the documents it spans (checked against a per-token array built by hand), from .jsonl and .parquet, cached
per field; a run draws its first batch from the lowest-scored documents; bad fields are named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import picotron_jax as pj
from picotron_jax.config import DataConfig
from picotron_jax.data import curriculum_difficulty as cd
from picotron_jax.data.curriculum_fields import field_scores
from picotron_jax.data.dataset import TokenDataset
from picotron_jax.errors import UserError

T = 8


def _records(n: int = 30) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"text": "".join(map(chr, rng.integers(97, 123, int(rng.integers(3, 30))))), "level": float(i % 7),
             "other": "x"} for i in range(n)]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _by_hand(records: list[dict], num_sequences: int) -> np.ndarray:
    """Each byte token (and each document's end byte) carries its document's score; windows average them."""
    per_token = np.concatenate([np.full(len(r["text"].encode()) + 1, r["level"]) for r in records if r["text"]])
    return np.array([per_token[w * T: w * T + T + 1].mean() for w in range(num_sequences)])


def _dataset(source: Path, tmp_path: Path) -> tuple[TokenDataset, DataConfig]:
    data = DataConfig(source=str(source), cache_dir=str(tmp_path / "tokens"))
    return TokenDataset.build(data, T, 0), data


def test_window_scores_are_the_token_weighted_mean_of_their_documents(tmp_path):
    records = _records()
    records[3]["text"] = ""  # an empty document is no document: skipped as the corpus skips it
    records[0].update(text="z" * 40, level=5.0)  # 41 tokens (0..40): windows 0..4 lie inside it
    ds, data = _dataset(_write_jsonl(tmp_path / "docs.jsonl", records), tmp_path)
    scores = field_scores(ds, data, "level")
    np.testing.assert_allclose(scores, _by_hand(records, ds.num_sequences), rtol=1e-12)
    np.testing.assert_array_equal(scores[:5], 5.0)  # a window inside one document gets its score
    assert scores[5] == pytest.approx((5.0 + 8 * records[1]["level"]) / 9)  # tokens 40 (doc 0), 41..48 (doc 1)


def test_parquet_records_score_like_jsonl(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    records = _records()
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "docs.parquet")
    ds, data = _dataset(tmp_path / "docs.parquet", tmp_path)
    np.testing.assert_allclose(field_scores(ds, data, "level"), _by_hand(records, ds.num_sequences), rtol=1e-12)


def test_field_scores_are_cached_per_field(tmp_path, monkeypatch):
    records = [{**r, "rank": -r["level"]} for r in _records()]
    ds, data = _dataset(_write_jsonl(tmp_path / "docs.jsonl", records), tmp_path)
    cfg = pj.load_config("single", ["curriculum.kind=difficulty", "curriculum.metric=field",
                                    "curriculum.score_field=level", f"data.source={data.source}",
                                    f"data.cache_dir={data.cache_dir}"])
    calls = []
    monkeypatch.setattr(cd, "field_scores", lambda *a: calls.append(a[2]) or field_scores(*a))
    level = cd.cached_scores(ds, "field", cfg)
    np.testing.assert_array_equal(cd.cached_scores(ds, "field", cfg), level)
    rank = cd.cached_scores(ds, "field", cfg.replace(curriculum={"score_field": "rank"}))
    assert calls == ["level", "rank"]  # once per field
    np.testing.assert_allclose(rank, -level)


def test_a_field_run_draws_its_first_batch_from_the_lowest_scores(tmp_path):
    records = _records(60)
    _write_jsonl(tmp_path / "docs.jsonl", records)
    cfg = pj.load_config("single", [
        "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", f"train.seq_len={T}", "train.global_batch=8", "logging.progress=false",
        "memory.live_arrays=false", "eval.tokens=0", "eval.fraction=0", f"data.source={tmp_path / 'docs.jsonl'}",
        f"data.cache_dir={tmp_path / 'tokens'}", "curriculum.kind=difficulty", "curriculum.metric=field",
        "curriculum.score_field=level", "curriculum.start_percentile=10", "curriculum.steps=4"])
    with pj.Trainer(cfg) as trainer:
        batch = trainer._read(0)  # the batch step 1 trains on, through the curriculum callback
        ds = trainer.built.dataset
    scores = _by_hand(records, ds.num_sequences)
    every = cd.window_tokens(ds, np.arange(ds.num_sequences))  # equal windows have equal scores
    rows = np.concatenate([np.asarray(batch["inputs"]), np.asarray(batch["targets"])[:, -1:]], axis=1)
    chosen = [int(np.flatnonzero((every == x).all(1))[0]) for x in rows]
    pool = int(np.ceil(0.32 * ds.num_sequences))  # pct(1) = floor(1/4 * 90 + 10) = 32
    assert np.all(scores[chosen] <= np.sort(scores)[pool - 1])
    assert np.mean(scores[chosen]) < np.mean(scores)


def test_bad_score_fields_are_named(tmp_path):
    records = _records()
    ds, data = _dataset(_write_jsonl(tmp_path / "docs.jsonl", records), tmp_path)
    with pytest.raises(UserError, match=r"curriculum\.score_field.*'missing'.*not found.*line 1"):
        field_scores(ds, data, "missing")
    with pytest.raises(UserError, match=r"line 1: field 'other' holds 'x'.*curriculum\.score_field.*number"):
        field_scores(ds, data, "other")
    (tmp_path / "plain.txt").write_text("no fields in a text file")
    plain, plain_data = _dataset(tmp_path / "plain.txt", tmp_path)
    with pytest.raises(UserError, match=r"curriculum\.score_field.*plain text"):
        field_scores(plain, plain_data, "level")
    with pytest.raises(UserError, match=r"curriculum\.score_field"):
        pj.load_config("single", ["curriculum.kind=difficulty", "curriculum.metric=field"]).validate()
