"""Weighted mixtures (`data.mixture`): proportions, determinism across runs and hosts, schedules, errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from picotron_jax.config import DataConfig, load_config
from picotron_jax.data.mixture import MixtureDataset
from picotron_jax.data.prepare import prepare_store
from picotron_jax.data.sources import open_dataset
from picotron_jax.data.stats import DataStats
from picotron_jax.errors import UserError

ALPHABETS = ("abcde", "klmno", "vwxyz")  # each store's text uses its own letters: a row shows its source
SEQ = 16


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    out = []
    for k, letters in enumerate(ALPHABETS):
        (root / f"{k}.txt").write_text("".join(rng.choice(list(letters), 3000 + 1000 * k)))
        prepare_store(str(root / f"{k}.txt"), str(root / f"s{k}"), shard_tokens=512, say=lambda _m: None)
        out.append(str(root / f"s{k}"))
    return out


def mixture(stores, weights=(0.5, 0.3, 0.2), seed=0, **extra) -> MixtureDataset:
    entries = [{"source": s, "weight": w} for s, w in zip(stores, weights)]
    for k, sched in extra.get("schedules", {}).items():
        entries[k] = {"source": stores[k], "schedule": sched}
    return open_dataset(DataConfig(mixture=entries), SEQ, seed)


def source_of_rows(inputs: np.ndarray) -> np.ndarray:
    """Which store each row came from, from its letters (the NUL end marker belongs to all)."""
    first = np.array([row[row != 0][0] for row in inputs])
    return np.array([next(k for k, a in enumerate(ALPHABETS) if chr(c) in a) for c in first])


def test_proportions_match_the_weights_and_rows_come_from_their_source(stores):
    ds = mixture(stores)
    B, steps = 16, 400
    counts = np.zeros(3, np.int64)
    for step in range(steps):
        src, _ = ds.sources(step, B)
        counts += np.bincount(src, minlength=3)
        if step < 20:
            np.testing.assert_array_equal(source_of_rows(ds.batch_rows(step, B, slice(None))["inputs"]), src)
    N, p = B * steps, np.array([0.5, 0.3, 0.2])
    assert (np.abs(counts - N * p) <= 4 * np.sqrt(N * p * (1 - p))).all(), counts
    assert ds.tokens_by_source(steps, B) == {s: int(c) * SEQ for s, c in zip(stores, counts)}


def test_each_source_is_read_in_its_own_order_without_repeats(stores):
    ds = mixture(stores)
    B, steps = 8, 200
    per = {k: [] for k in range(3)}
    for step in range(steps):
        src, sample = ds.sources(step, B)
        for k in range(3):
            per[k] += sample[src == k].tolist()
    for k in range(3):
        assert per[k] == list(range(len(per[k])))  # samples 0, 1, 2, ... of that source, in order


def test_identical_across_runs_hosts_and_resumes(stores):
    B = 8
    a, b = mixture(stores), mixture(stores)
    ref = [a.batch_rows(s, B, slice(None))["inputs"] for s in range(40)]
    for procs in (2, 4):  # each host reads its rows only, with its own dataset
        hosts = [mixture(stores) for _ in range(procs)]
        for s in range(40):
            got = np.concatenate([h.batch_rows(s, B, np.arange(p * B // procs, (p + 1) * B // procs))["inputs"]
                                  for p, h in enumerate(hosts)])
            np.testing.assert_array_equal(got, ref[s])
    resumed = mixture(stores)  # a resumed run starts reading at step 25
    for s in range(25, 40):
        np.testing.assert_array_equal(resumed.batch_rows(s, B, slice(None))["inputs"], ref[s])
    np.testing.assert_array_equal(b.batch_rows(7, B, slice(None))["inputs"], ref[7])
    other = mixture(stores, seed=1)
    assert not all(np.array_equal(other.batch_rows(s, B, slice(None))["inputs"], ref[s]) for s in range(5))


def test_weights_follow_their_schedule(stores):
    ds = mixture(stores, weights=(0.5, 0.5, 0.0), schedules={2: [[0, 0.0], [100, 1.0]]})
    np.testing.assert_allclose(ds.probabilities(0), [0.5, 0.5, 0.0])
    np.testing.assert_allclose(ds.probabilities(50), [0.5 / 1.5, 0.5 / 1.5, 0.5 / 1.5])
    np.testing.assert_allclose(ds.probabilities(500), [0.25, 0.25, 0.5])
    early = np.concatenate([ds.sources(s, 16)[0] for s in range(0, 5)])
    late = np.concatenate([ds.sources(s, 16)[0] for s in range(200, 300)])
    assert not (early == 2).any()
    assert abs((late == 2).mean() - 0.5) < 4 * np.sqrt(0.25 / late.size)


def test_mixture_from_a_config_override_and_logged_token_counts(stores):
    cfg = load_config(None, [f"data.mixture=[{{source: {stores[0]}, weight: 3}}, {{source: {stores[1]}, weight: 1}}]"])
    ds = open_dataset(cfg.data, SEQ, 0)
    assert isinstance(ds, MixtureDataset) and ds.names == stores[:2]
    np.testing.assert_allclose(ds.probabilities(0), [0.75, 0.25])
    ds.batch_rows(0, 8, slice(None))
    row = {"kind": "train", "step": 10}
    DataStats().on_log(SimpleNamespace(built=SimpleNamespace(dataset=ds), cfg=SimpleNamespace(
        train=SimpleNamespace(global_batch=8))), row)
    by = ds.tokens_by_source(10, 8)
    assert row["data_tokens_0"] == by[stores[0]] and row["data_tokens_1"] == by[stores[1]]
    assert row["data_tokens_0"] + row["data_tokens_1"] == 10 * 8 * SEQ
    assert row["data_fetches"] > 0 and row["data_bytes_fetched"] > 0 and 0 <= row["data_hit_rate"] <= 1


@pytest.mark.parametrize("weights, match", [
    ((0.0, 0.0, 0.0), r"weights sum to 0.0 at step 0; they must sum to a positive number"),
    ((0.5, -1.0, 0.2), r"data.mixture\[1\]: weights must be finite and >= 0"),
])
def test_bad_weights_are_clear_errors(stores, weights, match):
    with pytest.raises(UserError, match=match):
        mixture(stores, weights=weights)


def test_bad_entries_are_clear_errors(stores, tmp_path):
    with pytest.raises(UserError, match=r"data.mixture\[0\]: unknown field 'wieght'"):
        open_dataset(DataConfig(mixture=[{"source": stores[0], "wieght": 1}]), SEQ, 0)
    with pytest.raises(UserError, match="eval with data.mixture is not supported"):
        open_dataset(DataConfig(mixture=[{"source": stores[0]}]), SEQ, 0, held_out=(64, 0.0))
    with pytest.raises(UserError, match="no such file or folder"):
        open_dataset(DataConfig(mixture=[{"source": str(Path(tmp_path) / "nope")}]), SEQ, 0)
