"""Few-shot corpus tasks (meta/corpus_tasks.py, `meta.task=corpus`): tasks are deterministic, held-out
documents never reach training, the sharded meta-step equals one device, the CLI writes both curves, and
bad settings name their field."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import picotron_jax as pj
from picotron_jax.cli import main
from picotron_jax.errors import UserError
from picotron_jax.meta.loop import build_meta
from helpers import MESHES

# a 1-layer Llama of width 32 on windows of 16 + 1 bytes: compiles in seconds
TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1", "train.seq_len=16",
        "meta.k_support=2", "meta.k_query=2", "meta.tasks_per_step=4", "meta.eval_tasks=4", "meta.steps=2",
        "meta.eval_steps=3", "meta.inner_lr=0.1"]


@pytest.fixture(scope="module")
def letters(tmp_path_factory):
    """12 files, file i all letter i (so a window names its document), and one file too short to be a task."""
    root = tmp_path_factory.mktemp("letters")
    for i in range(12):
        (root / f"doc{i:02d}.txt").write_text(chr(ord("a") + i) * (100 + 20 * i))
    (root / "short.txt").write_text("z" * 40)  # < (2 + 2) x 17 bytes
    return root


def corpus_cfg(*more: str) -> pj.Config:
    return pj.load_config(MESHES / "maml-corpus.yaml", ["mesh.num_devices=1", "mesh.data=1", *TINY, *more])


def test_corpus_tasks_are_deterministic_and_held_out_documents_never_train(letters):
    family = build_meta(corpus_cfg(f"data.source={letters}")).family
    assert len(family.documents) == 12  # the short file is no task
    assert set(family.held_out_ids).isdisjoint(family.train_ids) and len(family.held_out_ids) == 4
    again = build_meta(corpus_cfg(f"data.source={letters}")).family
    for index in (0, 7):
        a, b = family.sample_tasks(index, 4), again.sample_tasks(index, 4)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(family.sample_tasks(0, 4)["support"]["tokens"],
                              family.sample_tasks(1, 4)["support"]["tokens"])
    held_out_bytes = {ord("a") + d for d in family.held_out_ids}
    for index in range(50):
        batch = family.sample_tasks(index, 4)
        tokens = np.concatenate([batch["support"]["tokens"], batch["query"]["tokens"]], axis=1)  # [4, 4, 17]
        assert tokens.shape == (4, 4, 17)
        assert held_out_bytes.isdisjoint(np.unique(tokens))  # no held-out document, not even as a support set
        assert all(len(np.unique(t)) == 1 for t in tokens)  # a task's sequences all come from one document
        docs, windows = family.draw(index, 4)
        assert len(set(docs)) == 4 and all(len(set(w)) == 4 for w in windows)  # support and query distinct
    evaluation = family.sample_tasks(0, 4, held_out=True)["query"]["tokens"]
    assert set(np.unique(evaluation)) == held_out_bytes  # the evaluation covers exactly the held-out files


@pytest.mark.parametrize("algorithm, layout", [
    ("fomaml", ["mesh.num_devices=2", "mesh.data=2"]),
    pytest.param("maml", ["mesh.num_devices=4", "mesh.data=2", "mesh.tensor=2", "train.zero_stage=3"],
                 marks=pytest.mark.slow),
])
def test_corpus_meta_gradient_on_the_sharded_mesh_equals_one_device(letters, algorithm, layout):
    results = []
    for devices in (["mesh.num_devices=1", "mesh.data=1"], layout):
        setup = build_meta(corpus_cfg(f"data.source={letters}", f"meta.algorithm={algorithm}", *devices))
        meta, _ = setup.init()
        loss, grads = jax.jit(setup.learner.meta_grad)(meta, setup.tasks(3))
        results.append((float(loss), jax.tree.map(np.asarray, grads), meta["params"]["layers"]["wq"].sharding.spec))
    (loss1, grads1, _), (loss2, grads2, spec) = results
    np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads2), strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-6)
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads1)) > 1e-4  # a real gradient
    assert 3.0 < loss1 < 6.0  # a fresh model (log 256 = 5.55) after one inner step on a one-letter file
    if "mesh.tensor=2" in layout:
        assert "tensor" in jax.tree.leaves(tuple(spec))  # the Llama really is split over tensor


@pytest.mark.slow  # default suite under 20 minutes
def test_meta_command_with_corpus_tasks_writes_both_curves(letters, tmp_path, capsys):
    code = main(["meta", "--config", str(MESHES / "maml-corpus.yaml"), "--run-dir", str(tmp_path), *TINY,
                 f"data.source={letters}"])
    assert code == 0
    result = json.loads((tmp_path / "adaptation.json").read_text())
    assert set(result) == {"meta", "baseline"} and len(result["meta"]) == len(result["baseline"]) == 4
    assert all(np.isfinite(result["meta"] + result["baseline"]))
    assert result["meta"] != result["baseline"]  # two initialisations, two curves
    out = capsys.readouterr().out
    assert "inner steps | meta-learned | pre-trained" in out and "meta step 2/2" in out


@pytest.mark.parametrize("override, field", [("meta.eval_tasks=9", "meta.eval_tasks"),
                                             ("model.vocab_size=128", "model.vocab_size"),
                                             ("data.mixture=[{source: stdlib, weight: 1}]", "data.mixture")])
def test_bad_corpus_settings_name_the_field(letters, override, field):
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        build_meta(corpus_cfg(f"data.source={letters}", override))
