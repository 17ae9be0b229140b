"""The dropless MoE's row-block grouped matmul (models/moe_grouped.py) equals the ragged_dot one: outputs and
gradients, with empty experts, groups that are not multiples of the block and padding rows past the groups;
and on CPU the dropless block runs without ragged_dot."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from picotron_jax.config import MoEConfig
from picotron_jax.models import moe
from picotron_jax.models.llama import LOCAL_OPS
from picotron_jax.models.moe_grouped import block_layout, block_swiglu, ragged_swiglu

E, D, F = 4, 16, 24


def weights(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return (0.3 * jax.random.normal(k[0], (E, D, F)), 0.3 * jax.random.normal(k[1], (E, D, F)),
            0.3 * jax.random.normal(k[2], (E, F, D)))


@jax.jit
def _values_and_grads(x_MD, w, sizes_E):
    """(ragged_dot's, the blocks') outputs and gradients; one compile serves every sizes_E (a traced array)."""
    def run(fn):
        return jax.value_and_grad(lambda x, w: (lambda y: (jnp.sum(jnp.sin(y)), y))(fn(x, sizes_E, *w)),
                                  argnums=(0, 1), has_aux=True)(x_MD, w)

    return run(ragged_swiglu), run(lambda x, s, *w: block_swiglu(x, s, *w, block=8))


def test_block_swiglu_equals_ragged_dot_values_and_gradients():
    M = 36  # rows past sum(sizes) are padding (the expert-parallel exchange's), zeros out of both
    x_MD = jax.random.normal(jax.random.key(1), (M, D))
    w = weights()
    for sizes in ((5, 0, 17, 9), (8, 8, 8, 8), (0, 0, 30, 0), (36, 0, 0, 0)):  # ragged, aligned, one expert, full
        ((_, y_r), g_r), ((_, y_b), g_b) = _values_and_grads(x_MD, w, jnp.asarray(sizes, jnp.int32))
        np.testing.assert_allclose(y_b, y_r, rtol=1e-5, atol=1e-5, err_msg=str(sizes))
        assert float(jnp.abs(y_b[sum(sizes):]).max(initial=0.0)) == 0.0
        for a, b in zip(jax.tree.leaves(g_b), jax.tree.leaves(g_r)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=str(sizes))


def test_block_layout_puts_each_expert_in_its_own_blocks():
    sizes_E = jnp.asarray([5, 0, 17, 9], jnp.int32)
    slot_M, expert_N, NB = jax.jit(block_layout, static_argnums=(1, 2))(sizes_E, 36, 8)
    assert NB == 36 // 8 + 1 + 4
    expert_of_row = np.repeat(np.arange(4), np.asarray(sizes_E))
    slots = np.asarray(slot_M)[:31]
    np.testing.assert_array_equal(np.asarray(expert_N)[slots // 8], expert_of_row)  # every row in its expert's block
    assert len(set(slots.tolist())) == 31 and (np.asarray(slot_M)[31:] == NB * 8).all()  # distinct; padding dropped


def test_dropless_block_on_cpu_has_no_ragged_dot_and_equals_ragged_dot_block():
    k = jax.random.split(jax.random.key(2), 2)
    p = {"router": jax.random.normal(k[0], (D, E)), **dict(zip(("w_gate", "w_up", "w_down"), weights(3)))}
    h_BTD = jax.random.normal(k[1], (2, 16, D))
    cfg = MoEConfig(num_experts=E, top_k=2, dispatch="dropless")
    f = lambda p, h: jnp.sum(jnp.sin(moe.moe_ffn(p, h, cfg, LOCAL_OPS)[0]))  # noqa: E731
    assert jax.default_backend() == "cpu"
    assert "ragged_dot" not in str(jax.make_jaxpr(jax.grad(f))(p, h_BTD))

    @jax.jit
    def both(p, h_BTD):  # the dropless block's expert rows through ragged_dot and through the blocks
        r = LOCAL_OPS.route(h_BTD, p["router"], None, cfg)
        _, token_M, sizes_E = moe.sort_by_expert(r.experts_BTK.reshape(32, 2), E)
        x_MD, w = h_BTD.reshape(32, D)[token_M], (p["w_gate"], p["w_up"], p["w_down"])
        return block_swiglu(x_MD, sizes_E, *w), ragged_swiglu(x_MD, sizes_E, *w)

    np.testing.assert_allclose(*both(p, h_BTD), rtol=1e-5, atol=1e-5)
