"""Same math on every layout: each preset's losses and gradients equal the single-device run.

Tolerances: losses rtol 1e-5 (fp32; the only difference is the order of cross-device sums).
Gradients: |g - g_ref| <= 1e-4 * |g_ref| + 1e-5 * max|g_ref| per parameter: element-wise they are
sums of per-token products whose summation order changes with the layout (psum trees, split
matmuls over tensor), which moves fp32 results by a few ulps of the *largest* terms, so small
entries need an absolute floor scaled to the tensor's magnitude.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from helpers import preset, run_steps, setup
from picotron_jax.train.state import init_params

LAYOUTS = ["dp8", "zero1-dp8", "zero3-dp8", "tp2-dp4", "tp4-dp2", "tp8", "default"]


@functools.lru_cache(maxsize=None)
def reference():
    return run_steps(preset("single"))


def assert_grads_close(grads, ref):
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    ref_flat = jax.tree.leaves(ref)
    for (path, g), r in zip(flat, ref_flat):
        scale = float(np.max(np.abs(r)))
        assert scale > 0, f"zero gradient for {jax.tree_util.keystr(path)}"
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_single_device(layout):
    losses, grads = run_steps(preset(layout))
    ref_losses, ref_grads = reference()
    assert losses[2] < losses[0], "training did not move the loss"
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_grads_close(grads, ref_grads)


def test_grad_accumulation_matches_one_big_batch():
    losses, grads = run_steps(preset("tp2-dp4", "train.grad_accum=2"))
    ref_losses, ref_grads = reference()
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_grads_close(grads, ref_grads)


def test_expert_axis_is_more_batch_for_dense_layers():
    losses, grads = run_steps(preset("tp2-dp4", "mesh.data=2", "mesh.expert=2", "train.zero_stage=1"))
    ref_losses, ref_grads = reference()
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_grads_close(grads, ref_grads)


def test_initialisation_does_not_depend_on_the_mesh():
    cfg1 = preset("single")
    ref = jax.tree.map(np.asarray, init_params(cfg1, setup(cfg1)[1]))
    cfg8 = preset("zero3-dp8", "mesh.data=4", "mesh.tensor=2")
    sharded = init_params(cfg8, setup(cfg8)[1])
    assert jax.tree.leaves(sharded)[0].sharding.num_devices == 8
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), sharded, ref)
    cfg_seed = preset("single", "train.seed=1")
    other = init_params(cfg_seed, setup(cfg_seed)[1])
    assert not np.array_equal(np.asarray(other["embed"]), ref["embed"])
