"""Difficulty from a reference checkpoint's loss (data/curriculum_reference.py): the scores equal the library's
own evaluation of each window, they are cached per checkpoint identity, a run trains easiest-first with them,
and a wrong reference stops with the field named."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

import picotron_jax as pj
from picotron_jax.data import curriculum_difficulty as cd
from picotron_jax.data import curriculum_reference as cr
from picotron_jax.data.loader import place_rows
from picotron_jax.data.sources import open_dataset
from picotron_jax.errors import UserError

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "train.seq_len=16", "train.global_batch=8", "optimizer.warmup_steps=2",
        "logging.progress=false", "memory.live_arrays=false", "logging.every=1", "eval.tokens=0", "eval.fraction=0"]
DIFF = ["curriculum.kind=difficulty", "curriculum.metric=reference", "curriculum.start_percentile=20",
        "curriculum.steps=4"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """A small corpus (~60 windows of 16 bytes) whose lines differ in difficulty, and two reference
    checkpoints of it (step 0 of two seeds: no train step to compile)."""
    root = tmp_path_factory.mktemp("reference")
    rng = np.random.default_rng(0)
    lines = ["ab " * int(rng.integers(2, 12)) if i % 2 else "".join(map(chr, rng.integers(97, 123, 20)))
             for i in range(40)]
    (root / "corpus.txt").write_text("\n".join(lines))
    data = [f"data.source={root / 'corpus.txt'}", f"data.cache_dir={root / 'tokens'}"]
    for seed in (0, 1):
        with pj.Trainer(pj.load_config("single", [*TINY, *data, f"train.seed={seed}"]), root / f"ref{seed}") as ref:
            ref.save()
    return root, data


def _run_cfg(corpus, *more: str) -> pj.Config:
    root, data = corpus
    return pj.load_config("single", [*TINY, *data, *DIFF, f"curriculum.reference_checkpoint={root / 'ref0'}"
                                     "/checkpoints", *more])


def _dataset(cfg: pj.Config):
    return open_dataset(cfg.data, cfg.train.seq_len, cfg.train.seed)


def test_reference_scores_equal_the_library_evaluation_of_each_window(corpus):
    cfg = _run_cfg(corpus)
    ds = _dataset(cfg)
    scores = cr.reference_scores(ds, cfg)
    assert scores.shape == (ds.num_sequences,) and np.all(np.isfinite(scores))
    assert np.ptp(scores) > 0.01  # the windows differ in difficulty
    with pj.Trainer.restore(corpus[0] / "ref0" / "checkpoints") as ref:  # its own config, the eval program
        sharding, B = ref.built.rules.batch_sharding(), ref.cfg.train.global_batch
        for w in (0, ds.num_sequences // 2, ds.num_sequences - 1):
            def rows(r: np.ndarray) -> dict[str, np.ndarray]:  # window w in row 0 only (the others masked)
                tokens = cd.window_tokens(ds, np.full(len(r), w)).astype(np.int32)
                mask = np.zeros((len(r), ds.seq_len), np.float32)
                mask[r == 0] = 1.0
                return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}

            nll, tokens = jax.device_get(ref.built.eval_step(ref.params, place_rows(rows, B, ds.seq_len, sharding)))
            assert scores[w] == pytest.approx(float(nll) / float(tokens), rel=1e-5)


@pytest.mark.slow  # default suite under 20 minutes
def test_reference_scores_on_a_tensor_and_data_parallel_mesh_equal_the_single_device_ones(corpus):
    single = _run_cfg(corpus)
    ds = _dataset(single)
    cfg = _run_cfg(corpus).replace(mesh=pj.load_config("tp2-dp4").mesh)
    np.testing.assert_allclose(cr.reference_scores(ds, cfg), cr.reference_scores(ds, single), rtol=2e-5)
    with pytest.raises(UserError, match=r"curriculum\.metric.*mesh\.pipe = 2"):
        cr.reference_scores(ds, _run_cfg(corpus).replace(mesh=pj.load_config("pp2-afab").mesh))


def test_scores_are_cached_per_checkpoint_identity(corpus, monkeypatch):
    cfg = _run_cfg(corpus)
    ds = _dataset(cfg)
    calls = []
    original = cd.reference_scores
    monkeypatch.setattr(cd, "reference_scores", lambda *a: calls.append(1) or original(*a))
    first = cd.cached_scores(ds, "reference", cfg)
    again = cd.cached_scores(ds, "reference", cfg)
    assert len(calls) == 1  # the second call read the cache
    np.testing.assert_array_equal(first, again)
    key = cr.reference_key(cfg.curriculum.reference_checkpoint)
    assert (Path(ds.path).parent / f"{Path(ds.path).stem}.difficulty-reference-{key}-T16-N{ds.num_sequences}.npy").is_file()
    other = cfg.replace(curriculum={"reference_checkpoint": str(corpus[0] / "ref1" / "checkpoints" / "0")})
    second = cd.cached_scores(ds, "reference", other)
    assert len(calls) == 2  # another checkpoint: scored anew, under another name
    assert not np.allclose(first, second)
    assert cr.reference_key(other.curriculum.reference_checkpoint) != key
    assert cr.reference_key(str(corpus[0] / "ref0" / "checkpoints")) == \
        cr.reference_key(str(corpus[0] / "ref0" / "checkpoints" / "0"))  # folder = its newest step


@pytest.mark.slow  # default suite under 20 minutes
def test_a_run_with_reference_difficulty_trains_easiest_first(corpus):
    cfg = _run_cfg(corpus, "train.steps=1")
    with pj.Trainer(cfg) as trainer:
        batch = trainer._read(0)  # the batch step 1 trains on, through the curriculum callback
        (warmup,) = [cb for cb in trainer.callbacks.callbacks if isinstance(cb, cd.DifficultyWarmup)]
        ds = trainer.built.dataset
        row = {"kind": "train", "step": 1}
        warmup.on_log(trainer, row)
    scores = cd.cached_scores(ds, "reference", cfg)  # what the callback scored, from the cache
    np.testing.assert_array_equal(warmup.curriculum.scores, scores)
    every = cd.window_tokens(ds, np.arange(ds.num_sequences))  # equal windows have equal scores
    rows = np.concatenate([np.asarray(batch["inputs"]), np.asarray(batch["targets"])[:, -1:]], axis=1)
    chosen = [int(np.flatnonzero((every == x).all(1))[0]) for x in rows]
    easiest = np.sort(scores)[int(np.ceil(0.40 * ds.num_sequences)) - 1]  # pct(1) = 40 of the windows
    assert row["curriculum_percentile"] == 40 and row["difficulty_max"] == pytest.approx(easiest)
    assert np.all(scores[chosen] <= easiest)
    assert np.mean(scores[chosen]) < np.mean(scores)  # easier than a uniform draw would be, on average


@pytest.mark.parametrize("override, field", [
    ("curriculum.reference_checkpoint=", "curriculum.reference_checkpoint"),
    ("model.vocab_size=512", "model.vocab_size"),
    ("train.seq_len=32", "train.seq_len"),
])
def test_a_wrong_reference_names_the_field(corpus, override, field):
    cfg = _run_cfg(corpus, override)
    with pytest.raises(UserError, match="curriculum.reference_checkpoint") as err:
        cfg.validate()
        cr.reference_scores(_dataset(cfg), cfg)
    assert field in str(err.value)


def test_a_missing_reference_names_the_field(corpus):
    cfg = _run_cfg(corpus)
    for missing in (corpus[0] / "nowhere", corpus[0] / "ref0" / "checkpoints" / "7"):
        with pytest.raises(UserError, match=r"curriculum\.reference_checkpoint.*no (such )?checkpoint"):
            cr.reference_scores(_dataset(cfg), cfg.replace(curriculum={"reference_checkpoint": str(missing)}))


@pytest.mark.slow  # trains a reference (a train step to compile), as test_curriculum_difficulty.py's resume test
def test_a_reference_trained_on_part_of_the_data_finds_that_part_easier(tmp_path):
    rng = np.random.default_rng(0)  # part A: letters a..h, part B: s..z; same entropy, disjoint symbols

    def text(letters: str) -> str:
        return "".join(rng.choice(list(letters), 400))

    (tmp_path / "a.txt").write_text(text("abcdefgh"))
    (tmp_path / "ab.txt").write_text(text("abcdefgh") + text("stuvwxyz"))
    cache = f"data.cache_dir={tmp_path / 'tokens'}"
    ref_cfg = pj.load_config("single", [*TINY, cache, f"data.source={tmp_path / 'a.txt'}", "train.steps=30",
                                        "optimizer.lr=1e-2", "checkpoint.every=30"])
    with pj.Trainer(ref_cfg, tmp_path / "ref") as ref:
        ref.run()
    cfg = pj.load_config("single", [*TINY, cache, f"data.source={tmp_path / 'ab.txt'}", *DIFF,
                                    f"curriculum.reference_checkpoint={tmp_path / 'ref' / 'checkpoints'}"])
    ds = _dataset(cfg)
    scores = cr.reference_scores(ds, cfg)
    part_a = np.arange(ds.num_sequences) * ds.seq_len + ds.seq_len < 400  # windows wholly inside part A
    part_b = np.arange(ds.num_sequences) * ds.seq_len > 401
    assert scores[part_a].max() < scores[part_b].min()
    assert scores[part_a].mean() < np.log(8) + 0.5 < scores[part_b].mean()  # A near its entropy, B far above
