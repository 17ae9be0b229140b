"""The Llama model on its own: causality, GQA, rotary embeddings, tied head, scanned layers."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from picotron_jax.config import ModelConfig
from picotron_jax.models.attention import apply_rotary, causal_attention, reference_attention, rotary_tables
from picotron_jax.models.llama import Llama

SMALL = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)


def test_causal_future_tokens_do_not_change_past_logits():
    model = Llama(SMALL, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
    changed = tokens.at[:, 8:].set((tokens[:, 8:] + 7) % 64)
    a, b = model(tokens), model(changed)
    np.testing.assert_allclose(a[:, :8], b[:, :8], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[:, 8:], b[:, 8:])


def test_grouped_query_attention_equals_repeated_kv_heads():
    q = jax.random.normal(jax.random.key(0), (2, 6, 4, 8))
    k = jax.random.normal(jax.random.key(1), (2, 6, 2, 8))
    v = jax.random.normal(jax.random.key(2), (2, 6, 2, 8))
    out = causal_attention(q, k, v)
    k_rep, v_rep = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)  # head h uses KV head h // 2
    scores = jnp.einsum("bthk,bshk->bhts", q, k_rep) / np.sqrt(8)
    scores = jnp.where(jnp.tril(jnp.ones((6, 6), bool)), scores, -jnp.inf)
    ref = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(scores, axis=-1), v_rep)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reference_attention(q, k, v), ref, rtol=1e-5, atol=1e-6)


def test_rotary_scores_depend_only_on_relative_position():
    cos, sin = rotary_tables(jnp.arange(16), 8, 10000.0)
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))
    qs = apply_rotary(jnp.broadcast_to(q, (1, 16, 1, 8)), cos, sin)
    ks = apply_rotary(jnp.broadcast_to(k, (1, 16, 1, 8)), cos, sin)
    dots = jnp.einsum("btnk,bsnk->ts", qs, ks)
    np.testing.assert_allclose(dots[5, 2], dots[12, 9], rtol=1e-5)  # both: distance 3
    np.testing.assert_allclose(jnp.linalg.norm(qs[0, 7]), jnp.linalg.norm(q), rtol=1e-5)  # a rotation


def test_tied_embeddings_share_the_table():
    cfg = ModelConfig(**{**SMALL.__dict__, "tie_embeddings": True})
    model = Llama(cfg, rngs=nnx.Rngs(0))
    assert not hasattr(model, "lm_head")
    assert model.head_weight() is not None and model.head_weight().shape == (64, 32)
    np.testing.assert_array_equal(model.head_weight(), model.embed[...])


def test_layers_are_scanned_so_the_program_does_not_grow_with_depth():
    def hlo_lines(layers):
        cfg = ModelConfig(**{**SMALL.__dict__, "num_layers": layers})
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
        tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)

        def loss(state, tokens):
            return jnp.mean(nnx.merge(graphdef, state)(tokens))

        text = jax.jit(jax.grad(loss)).lower(state, tokens).compile().as_text()
        trips = re.findall(r'"known_trip_count":\{"n":"(\d+)"\}', text)
        return len(text.splitlines()), trips

    lines2, trips2 = hlo_lines(2)
    lines16, trips16 = hlo_lines(16)
    assert "16" in trips16 and "2" in trips2  # one while loop over the layers, forward and backward
    assert lines16 < 1.1 * lines2


def test_projection_vjp_equals_autodiff():
    from picotron_jax.models.linear import project

    x = jax.random.normal(jax.random.key(0), (2, 5, 6))
    w = jax.random.normal(jax.random.key(1), (6, 3, 4))
    dy = jax.random.normal(jax.random.key(2), (2, 5, 3, 4))
    spec = "btd,dhk->bthk"
    _, custom = jax.vjp(lambda x, w: project(spec, x, w), x, w)
    _, plain = jax.vjp(lambda x, w: jnp.einsum(spec, x, w), x, w)
    for a, b in zip(custom(dy), plain(dy)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
