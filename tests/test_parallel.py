"""ZeRO shrinks per-device state; vocabulary-parallel cross-entropy is exact and never holds full logits."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import preset, setup, synthetic_batch
from picotron_jax.bench import compiled_memory
from picotron_jax.config import load_config
from picotron_jax.mesh import build_mesh
from picotron_jax.parallel.sharding import MeshRules, bytes_per_device
from picotron_jax.parallel.vocab import vocab_parallel_cross_entropy, vocab_parallel_embed
from picotron_jax.train.state import init_train_state
from picotron_jax.train.step import build_train_step


def state_bytes(name: str) -> tuple[int, int, dict]:
    cfg = preset(name)
    rules, st = setup(cfg)
    params = bytes_per_device(st.abstract.params, st.shardings.params)
    opt = bytes_per_device(st.abstract.opt_state, st.shardings.opt_state)
    state = init_train_state(cfg, st)
    compiled = build_train_step(cfg, rules, st).lower(state, synthetic_batch(cfg, 0, rules)).compile()
    return params, opt, compiled_memory(compiled)


def test_zero_shrinks_state_by_the_data_axis():
    p0, o0, m0 = state_bytes("dp8")
    p1, o1, m1 = state_bytes("zero1-dp8")
    p3, o3, m3 = state_bytes("zero3-dp8")
    counters = o0 - 2 * p0  # Adam: two moments shaped like the params + small replicated step counters
    assert 0 <= counters < 64
    assert p1 == p0 and (o1 - counters) * 8 == o0 - counters  # ZeRO-1: moments / 8, params replicated
    assert p3 * 8 == p0 and o3 == o1  # ZeRO-3: parameters / 8 too
    # the compiled step's inputs (state + batch) shrink accordingly
    assert m1["argument_bytes"] < 0.5 * m0["argument_bytes"]
    assert m3["argument_bytes"] < 0.2 * m0["argument_bytes"]


def test_tensor_parallel_splits_heads_mlp_and_vocab():
    cfg = preset("tp4-dp2")
    _, st = setup(cfg)
    specs = jax.tree.map(lambda s: s.spec, st.shardings.params)
    layers = specs["layers"]
    assert layers["wq"] == P(None, None, "tensor", None)  # [L, D, H, K]: heads (column parallel)
    assert layers["wo"] == P(None, "tensor", None, None)  # [L, H, K, D]: o split by its input (row parallel)
    assert layers["w_gate"] == P(None, None, "tensor") and layers["w_down"] == P(None, "tensor", None)
    assert specs["embed"] == P("tensor", None) and specs["lm_head"] == P(None, "tensor")


def _xent_case(mesh_overrides):
    cfg = load_config(None, ["mesh.pipe=1", *mesh_overrides])
    rules = MeshRules(build_mesh(cfg.mesh), 0)
    B, T, D, V = 8, 16, 32, 512
    keys = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(keys[0], (B, T, D))
    w = jax.random.normal(keys[1], (V, D)) * 0.3
    tgt = jax.random.randint(keys[2], (B, T), 0, V)
    mask = (jax.random.uniform(keys[3], (B, T)) > 0.2).astype(jnp.float32)
    return rules, h, w, tgt, mask


def plain_xent(h, w, tgt, mask):
    logp = jax.nn.log_softmax(jnp.einsum("btd,vd->btv", h, w), axis=-1)
    nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    lse = jax.nn.logsumexp(jnp.einsum("btd,vd->btv", h, w), axis=-1)
    return jnp.sum(nll * mask), jnp.sum(lse**2 * mask)


@pytest.mark.parametrize("vocab_first", [True, False])
def test_vocab_parallel_cross_entropy_equals_plain_and_has_no_full_logits(vocab_first):
    """Tied head [V, D] and untied head [D, V]; value and gradients (hand-written VJP) vs autodiff."""
    for overrides in (["mesh.data=1", "mesh.tensor=8"], ["mesh.data=4", "mesh.tensor=2"], ["mesh.data=8"]):
        rules, h, w, tgt, mask = _xent_case(overrides)
        tp = rules.mesh.shape["tensor"]
        h = jax.device_put(h, rules.named(P(("data", "expert"), None, None)))
        head = w if vocab_first else w.T
        head = jax.device_put(head, rules.named(P("tensor", None) if vocab_first else P(None, "tensor")))

        def loss(h, head):
            nll, z = vocab_parallel_cross_entropy(rules, h, head, tgt, mask, vocab_first=vocab_first)
            return nll + 0.1 * z

        def ref_loss(h, head):
            nll, z = plain_xent(h, head if vocab_first else head.T, tgt, mask)
            return nll + 0.1 * z

        value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(h, head)
        ref_value, ref_grads = jax.value_and_grad(ref_loss, argnums=(0, 1))(np.asarray(h), np.asarray(head))
        np.testing.assert_allclose(value, ref_value, rtol=1e-5)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(r))))

        if tp > 1:
            hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(h, head).compile().as_text()
            dims = {int(d) for shape in re.findall(r"\[([\d,]+)\]", hlo) for d in shape.split(",")}
            assert 512 // tp in dims, "expected the local vocab shard in the HLO"
            assert 512 not in dims, f"an array with the full vocabulary (512) appears on one device, tensor={tp}"


def test_vocab_parallel_embedding_equals_take():
    rules, _, w, tgt, _ = _xent_case(["mesh.data=2", "mesh.tensor=4"])
    w_sharded = jax.device_put(w, rules.named(P("tensor", None)))
    out = jax.jit(lambda w, t: vocab_parallel_embed(rules, w, t))(w_sharded, tgt)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.take(w, tgt, axis=0)))
