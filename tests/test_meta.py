"""Meta-learning (picotron_jax/meta): MAML's second-order gradient against finite differences and a hand
case, first-order MAML as MAML without the second-order term, sharded meta-steps equal single device,
Meta-SGD's rates learn, Reptile improves a toy task, remat keeps memory flat in the inner steps, the CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import picotron_jax as pj
from picotron_jax.cli import main
from picotron_jax.errors import UserError
from picotron_jax.meta.algorithms import MetaLearner, adapt
from picotron_jax.meta.loop import build_meta, run_meta
from picotron_jax.meta.sine import init_mlp, mse, sample_tasks
from helpers import MESHES


def test_maml_meta_gradient_equals_finite_differences_of_the_post_adaptation_loss():
    with jax.enable_x64(True):
        task = jax.tree.map(lambda x: jnp.asarray(x[0], jnp.float64), sample_tasks(3, 0, 1, 5, 5))
        params = jax.tree.map(lambda p: p.astype(jnp.float64), init_mlp(1, 6))
        learner = MetaLearner(mse, "maml", inner_steps=2, inner_lr=0.05, remat=True)
        meta = learner.init(params)
        grad = jax.jit(jax.grad(learner.task_objective))(meta, task)
        f = jax.jit(learner.task_objective)
        rng = np.random.default_rng(0)
        for _ in range(3):  # directional derivatives along random directions
            v = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), meta)
            eps = 1e-6
            plus = f(jax.tree.map(lambda p, d: p + eps * d, meta, v), task)
            minus = f(jax.tree.map(lambda p, d: p - eps * d, meta, v), task)
            fd = float((plus - minus) / (2 * eps))
            exact = float(sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(v))))
            assert abs(fd - exact) <= 1e-6 * abs(exact), (fd, exact)
        fo = jax.jit(jax.grad(MetaLearner(mse, "fomaml", 2, 0.05).task_objective))(meta, task)
        gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(fo)))
        assert gap > 1e-4  # the second-order term is there, and matters


def quadratic(theta, batch):
    """0.5 (theta - c)^T A (theta - c), averaged over the batch's (A, c) pairs."""
    d = theta["w"][None, :] - batch["c"]
    return 0.5 * jnp.mean(jnp.einsum("ki,kij,kj->k", d, batch["A"], d))


def test_maml_and_first_order_maml_on_a_quadratic_hand_case():
    rng = np.random.default_rng(1)

    def spd():
        m = rng.normal(size=(3, 3))
        return m @ m.T + np.eye(3)

    A_s, A_q, c_s, c_q = spd(), spd(), rng.normal(size=3), rng.normal(size=3)
    theta, alpha = rng.normal(size=3), 0.05
    task = {"support": {"A": jnp.asarray(A_s[None], jnp.float32), "c": jnp.asarray(c_s[None], jnp.float32)},
            "query": {"A": jnp.asarray(A_q[None], jnp.float32), "c": jnp.asarray(c_q[None], jnp.float32)}}
    adapted = theta - alpha * A_s @ (theta - c_s)  # one inner step
    outer = A_q @ (adapted - c_q)  # grad of the query loss at the adapted point
    maml_expected = (np.eye(3) - alpha * A_s) @ outer  # chain rule through the inner step (A_s is the Hessian)
    meta = {"params": {"w": jnp.asarray(theta, jnp.float32)}}
    maml = jax.grad(MetaLearner(quadratic, "maml", 1, alpha).task_objective)(meta, task)["params"]["w"]
    fomaml = jax.grad(MetaLearner(quadratic, "fomaml", 1, alpha).task_objective)(meta, task)["params"]["w"]
    np.testing.assert_allclose(np.asarray(maml), maml_expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(fomaml), outer, rtol=1e-5)  # the (I - alpha H) factor dropped


def meta_cfg(*more: str) -> pj.Config:
    return pj.load_config(None, ["meta.steps=3", "meta.tasks_per_step=8", "meta.hidden=8", "meta.eval_tasks=8",
                                 "meta.eval_steps=3", "meta.inner_steps=1", *more])


LAYOUTS = {"dp2-tp2": ["mesh.num_devices=4", "mesh.data=2", "mesh.tensor=2"],
           "dp2-tp2-zero3": ["mesh.num_devices=4", "mesh.data=2", "mesh.tensor=2", "train.zero_stage=3"]}


@pytest.mark.parametrize("algorithm, layout", [
    ("metasgd", "dp2-tp2-zero3"),
    pytest.param("maml", "dp2-tp2-zero3", marks=pytest.mark.slow),
    pytest.param("maml", "dp2-tp2", marks=pytest.mark.slow),
    pytest.param("fomaml", "dp2-tp2", marks=pytest.mark.slow),
])
def test_meta_steps_on_the_sharded_mesh_equal_one_device(algorithm, layout):
    results = []
    for devices in (["mesh.num_devices=1"], LAYOUTS[layout]):
        setup = build_meta(meta_cfg(f"meta.algorithm={algorithm}", *devices))
        meta, opt_state = setup.init()
        step, losses = setup.step_fn(), []
        for i in range(2):
            meta, opt_state, loss = step(meta, opt_state, setup.tasks(i))
            losses.append(float(loss))
        results.append((jax.tree.map(np.asarray, meta), losses, meta["params"]["w2"].sharding.spec))
    (single, single_losses, _), (sharded, sharded_losses, spec) = results
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-6)  # after 2 Adam steps on the meta-gradients
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
    expect = ("tensor", "data") if layout.endswith("zero3") else ("tensor", None)
    assert spec == jax.sharding.PartitionSpec(*expect)  # really laid out on the mesh


def test_meta_sgd_inner_learning_rates_receive_gradients_and_change():
    setup = build_meta(meta_cfg("meta.algorithm=metasgd"))
    meta, opt_state = setup.init()
    start = jax.tree.map(np.asarray, meta["lrs"])
    _, grads = jax.jit(setup.learner.meta_grad)(meta, setup.tasks(0))
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads["lrs"]))
    step = setup.step_fn()
    meta, opt_state, _ = step(meta, opt_state, setup.tasks(0))
    assert all(not np.allclose(np.asarray(a), b) for a, b in zip(jax.tree.leaves(meta["lrs"]), jax.tree.leaves(start)))


def test_reptile_moves_the_initialisation_towards_the_task_family_and_adaptation_improves():
    rng = np.random.default_rng(2)
    mu = np.array([2.0, -1.0, 0.5], np.float32)
    A = np.broadcast_to(np.eye(3, dtype=np.float32), (16, 4, 3, 3))

    def tasks():  # quadratic tasks centred near mu: the best initialisation is mu
        c = (mu + 0.3 * rng.normal(size=(16, 1, 3))).astype(np.float32).repeat(4, axis=1)
        return {"support": {"A": A[:, :2], "c": c[:, :2]}, "query": {"A": A[:, 2:], "c": c[:, 2:]}}

    learner = MetaLearner(quadratic, "reptile", inner_steps=3, inner_lr=0.1)
    meta = {"params": {"w": jnp.zeros(3)}}
    held_out = tasks()
    outer = jax.jit(lambda meta, t: jax.tree.map(lambda p, g: p - 0.5 * g, meta, learner.meta_grad(meta, t)[1]))

    @jax.jit
    def after_adapting(meta, held_out):
        return jax.vmap(lambda t: quadratic(adapt(quadratic, meta["params"], t["support"], 0.1, 3), t["query"]))(
            held_out).mean()

    before = float(after_adapting(meta, held_out))
    for _ in range(40):
        meta = outer(meta, tasks())  # outer SGD, Reptile's epsilon = 0.5
    assert np.linalg.norm(np.asarray(meta["params"]["w"]) - mu) < 0.1 * np.linalg.norm(mu)
    assert float(after_adapting(meta, held_out)) < 0.2 * before


def test_remat_keeps_compiled_memory_of_8_inner_steps_within_1_25x_of_one():
    tasks = sample_tasks(0, 0, 2, 256, 16)  # activations (256 points x 40 units) outweigh the parameters

    def temp_bytes(steps: int, remat: bool) -> int:
        learner = MetaLearner(mse, "maml", steps, 0.01, remat)
        meta = learner.init(init_mlp(0, 40))
        return jax.jit(learner.meta_grad).lower(meta, tasks).compile().memory_analysis().temp_size_in_bytes

    one = temp_bytes(1, True)
    assert temp_bytes(8, True) <= 1.25 * one
    assert temp_bytes(8, False) > 2 * one  # without remat every inner step's activations are kept


def test_meta_command_prints_the_table_and_writes_adaptation_json(tmp_path, capsys):
    code = main(["meta", "--config", str(MESHES / "maml-sine.yaml"), "--run-dir", str(tmp_path), "meta.steps=10",
                 "meta.log_every=5", "meta.eval_steps=4", "meta.eval_tasks=10", "meta.inner_steps=1", "meta.hidden=8"])
    assert code == 0
    result = json.loads((tmp_path / "adaptation.json").read_text())
    assert set(result) == {"meta", "baseline"} and len(result["meta"]) == len(result["baseline"]) == 5
    assert all(np.isfinite(result["meta"] + result["baseline"]))
    out = capsys.readouterr().out
    assert "inner steps | meta-learned | pre-trained" in out and "meta step 10/10" in out


@pytest.mark.parametrize("override, field", [("meta.algorithm=anil", "meta.algorithm"),
                                             ("meta.tasks_per_step=3", "meta.tasks_per_step"),
                                             ("meta.inner_steps=0", "meta.inner_steps")])
def test_bad_meta_settings_name_the_field(override, field):
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        build_meta(pj.load_config(MESHES / "maml-sine.yaml", [override]))


@pytest.mark.slow
def test_maml_initialisation_adapts_faster_than_pretraining_on_held_out_sinusoids():
    result = run_meta(pj.load_config(MESHES / "maml-sine.yaml"), None, say=lambda line: None)
    assert result["meta"][5] < 0.5 * result["baseline"][5]
