"""Validation: a held-out tail of the corpus, disjoint from training; the same loss on every layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import picotron_jax as pj
from helpers import MESHES
from picotron_jax.cli import main
from test_api import TINY, tiny

SINGLE = {"num_devices": 1, "pipe": 1, "data": 1, "context": 1, "expert": 1, "tensor": 1}


def test_validation_loss_is_a_plain_forward_over_the_held_out_rows():
    trainer = pj.Trainer(tiny("single", "eval.tokens=300", "eval.batch=4"))  # 19 windows of 16: a padded batch
    trainer.run(2)
    ds = trainer.built.dataset
    T = ds.seq_len
    assert ds.num_held_out == 19
    first = ds.num_sequences + 1  # after the guard window
    windows = np.arange(first, first + ds.num_held_out)
    tokens = np.asarray(ds.tokens[windows[:, None] * T + np.arange(T + 1)], np.int32)
    model = nnx.merge(trainer.built.setup.spec.graphdef, nnx.State(jax.device_get(trainer.params)))
    logits = np.asarray(model(jnp.asarray(tokens[:, :-1])), np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    target = np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
    expected = float(np.mean(log_z - target))
    row = trainer.evaluate()
    assert row["eval_tokens"] == 19 * T
    np.testing.assert_allclose(row["eval_loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(row["eval_ppl"], np.exp(expected), rtol=1e-4)


def test_held_out_windows_never_appear_in_training_batches():
    ds = pj.Trainer(tiny("single", "eval.fraction=0.01")).built.dataset
    T, n = ds.seq_len, ds.num_sequences
    assert ds.num_held_out == int(0.01 * ((ds.num_tokens - 1) // T))
    trained = ds.window_index(np.arange(3 * n))  # three epochs of samples
    assert trained.max() == n - 1 and np.unique(trained).size == n
    last_training_token = (n - 1) * T + T  # the last target of the last training window
    first_held_out_token = (n + 1) * T
    assert last_training_token < first_held_out_token
    rows = ds.eval_rows(0, 4, slice(None))["inputs"]
    assert np.array_equal(rows[0], np.asarray(ds.tokens[first_held_out_token:first_held_out_token + T]))


@pytest.mark.parametrize("name,extra", [
    ("tp2-dp4", []),
    ("pp2-dp2-tp2", ["eval.batch=8"]),  # 1F1B; eval batches split into the pipeline's 4 microbatches x data 2
    ("moe-ep8", []),
    # make train's layout (data 4 x tensor 2, ZeRO-3) over 24 eval batches
    ("default", ["eval.batch=4", "eval.tokens=3072"]),
])
def test_validation_loss_on_a_layout_equals_one_device(name, extra):
    cfg = pj.load_config(name, ["train.seq_len=32", "eval.tokens=512", "logging.progress=false", *extra])
    layout = pj.Trainer(cfg).evaluate()
    single = pj.Trainer(cfg.replace(mesh=SINGLE, pipeline={"schedule": "none"})).evaluate()
    assert layout["eval_tokens"] == single["eval_tokens"] == cfg.eval.tokens
    np.testing.assert_allclose(layout["eval_loss"], single["eval_loss"], rtol=1e-5)


def test_eval_split_larger_than_the_corpus_is_refused_before_anything_is_written(tmp_path, capsys):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("a small corpus of a few hundred bytes. " * 10)
    run_dir = tmp_path / "run"
    code = main(["train", "--config", str(MESHES / "single.yaml"), "--run-dir", str(run_dir), *TINY,
                 f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "eval.tokens=100000"])
    err = capsys.readouterr().err
    assert code == 2 and "eval.tokens = 100000 holds out 6250 windows" in err and "has only 24" in err
    assert err.count("\n") == 1 and not run_dir.exists()
    code = main(["train", "--config", str(MESHES / "single.yaml"), "--run-dir", str(run_dir), *TINY,
                 "eval.fraction=1.5"])
    assert code == 2 and "'eval.fraction' = 1.5" in capsys.readouterr().err and not run_dir.exists()
