"""Context parallelism (parallel/context.py): ring attention over `context`, zigzag load balancing.

Same math as one device: attention output and its gradients (c = 2, 4, 8; zigzag and contiguous),
then whole-model losses and gradients against tests/test_layouts.py's single-device reference with
its tolerances. Plus: the zigzag layout, the measured work balance, and the bad-input message.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from helpers import preset, run_steps, setup, synthetic_batch
from picotron_jax.config import MESH_AXES
from picotron_jax.config_checks import validate
from picotron_jax.errors import UserError
from picotron_jax.models.attention import reference_attention
from picotron_jax.parallel.context import ring_attention, ring_attention_work, sequence_order, zigzag_order
from picotron_jax.parallel.sharding import MeshRules
from picotron_jax.train.state import init_train_state
from picotron_jax.train.step import build_grad_fn
from test_layouts import assert_grads_close, reference


def rules_for(context: int, data: int = 1, tensor: int = 1, zigzag: bool = True) -> MeshRules:
    devices = np.array(jax.devices()[: data * context * tensor]).reshape(1, data, context, 1, tensor)
    return MeshRules(Mesh(devices, MESH_AXES), context_zigzag=zigzag)


def qkv(B=2, T=32, H=4, G=2, K=8, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(B, T, H, K), (B, T, G, K), (B, T, G, K), (B, T, H, K)]
    return [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]


def test_zigzag_order_gives_device_i_chunks_i_and_mirror():
    order = zigzag_order(16, 4)  # 8 chunks of 2
    np.testing.assert_array_equal(order, [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9])
    np.testing.assert_array_equal(np.sort(order), np.arange(16))
    np.testing.assert_array_equal(sequence_order(16, 4, zigzag=False), np.arange(16))
    np.testing.assert_array_equal(sequence_order(16, 1, zigzag=True), np.arange(16))


@pytest.mark.parametrize("zigzag", [True, False], ids=["zigzag", "contiguous"])
@pytest.mark.parametrize("context,data,tensor", [(2, 1, 1), (4, 2, 1), (8, 1, 1), (2, 2, 2)])
def test_ring_attention_equals_single_device(context, data, tensor, zigzag):
    """Output and dQ, dK, dV (custom VJP: the ring run again) equal plain causal GQA attention."""
    q, k, v, do = qkv()
    rules = rules_for(context, data, tensor, zigzag)
    order = sequence_order(q.shape[1], context, zigzag)
    inverse = np.argsort(order)

    def ring(q, k, v):  # natural order in and out; the layout permutation around the ring
        out = ring_attention(rules, q[:, order], k[:, order], v[:, order], zigzag)[:, inverse]
        return jnp.sum(out * do), out

    def plain(q, k, v):
        out = reference_attention(q, k, v)
        return jnp.sum(out * do), out

    (_, out), grads = jax.jit(jax.value_and_grad(ring, (0, 1, 2), has_aux=True))(q, k, v)
    (_, ref_out), ref_grads = jax.value_and_grad(plain, (0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


def test_kv_heads_replicated_over_tensor():
    """2 KV heads on tensor=4: each rank gets its query heads' KV head (repeated, as Megatron does)."""
    q, k, v, _ = qkv(H=4, G=2)
    rules = rules_for(2, tensor=4)
    order = sequence_order(q.shape[1], 2, True)
    out = jax.jit(lambda q, k, v: ring_attention(rules, q[:, order], k[:, order], v[:, order]))(q, k, v)
    np.testing.assert_allclose(out[:, np.argsort(order)], reference_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("context", [2, 4, 8])
def test_zigzag_balances_the_work(context):
    """Query x key pairs scored per context rank, counted by the running ring: equal with zigzag;
    without it rank i scores i + 1 blocks (the last rank c times the first)."""
    q, k, v, _ = qkv(B=1, T=64, H=2, G=1, K=4)
    zig = np.asarray(ring_attention_work(rules_for(context), q, k, v, zigzag=True))
    flat = np.asarray(ring_attention_work(rules_for(context, zigzag=False), q, k, v, zigzag=False))
    assert zig.max() / zig.min() == 1.0
    np.testing.assert_array_equal(flat / flat[0], np.arange(1, context + 1))
    n = 64 // context
    assert zig[0] == n * n + (context - 1) * n * n // 2  # the diagonal block, then half of each other block


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("cp4-dp2", ()),
        ("cp2-tp2-dp2", ()),  # sequence, heads and batch split: the 3-axis layout
    ],
)
def test_layout_matches_single_device(name, overrides):
    losses, grads = run_steps(preset(name, *overrides))
    ref_losses, ref_grads = reference()
    assert losses[2] < losses[0], "training did not move the loss"
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize(
    "overrides",
    [
        ("mesh.context=8", "mesh.data=1"),
        ("mesh.context=8", "mesh.data=1", "train.context_zigzag=false"),
        ("train.context_zigzag=false", "train.zero_stage=3", "train.grad_accum=2"),
    ],
    ids=["cp8-zigzag", "cp8-contiguous", "cp4-dp2-contiguous-zero3-accum2"],
)
def test_step_one_loss_and_gradients_match_single_device(overrides):
    """Cheaper than three steps (one compile): step-1 loss and gradients."""
    cfg = preset("cp4-dp2", *overrides)
    rules, st = setup(cfg)
    state = init_train_state(cfg, st)
    metrics, grads = build_grad_fn(cfg, rules, st)(state.params, synthetic_batch(cfg, 0, rules))
    ref_losses, ref_grads = reference()
    np.testing.assert_allclose(float(metrics["loss"]), ref_losses[0], rtol=1e-5)
    assert_grads_close(jax.tree.map(np.asarray, grads), ref_grads)


def test_seq_len_not_divisible_names_field_value_and_multiple():
    with pytest.raises(UserError) as info:
        validate(preset("cp4-dp2", "train.seq_len=36"), 8)
    msg = str(info.value)
    assert "train.seq_len' = 36" in msg and "2 x mesh.context = 8" in msg and "train.seq_len=32" in msg
    with pytest.raises(UserError) as info:
        validate(preset("cp4-dp2", "train.seq_len=34", "train.context_zigzag=false"), 8)
    assert "train.seq_len' = 34" in str(info.value) and "mesh.context = 4" in str(info.value)
    validate(preset("cp4-dp2", "train.seq_len=36", "train.context_zigzag=false"), 8)  # 36 = 4 x 9: fine


def test_ring_program_does_not_grow_with_context():
    """The ring is a scan over steps: the lowered program is the same size for c = 4 and c = 8 (at c = 2
    the double-buffered ring has no loop: the one visiting block is computed after the diagonal)."""
    q, k, v, _ = qkv()

    def size(c):
        rules = rules_for(c)
        fn = jax.grad(lambda q, k, v: jnp.sum(ring_attention(rules, q, k, v)), (0, 1, 2))
        return len(jax.jit(fn).lower(q, k, v).as_text().splitlines())

    small, large = size(4), size(8)
    assert abs(large - small) <= 0.05 * small, (small, large)
