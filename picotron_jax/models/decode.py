"""Autoregressive decoding with a KV cache: the same Llama blocks, attending over cached keys and values.

`cached_forward` runs T new tokens at positions pos0 .. pos0+T-1 (the whole prompt once, then one
token per step), writes their keys and values into the cache at those positions, and attends over
every cached position up to its own (the causal mask over the cache). The layers are the model's
own pieces (`attention_inputs`, `attention_output`, `dense_mlp_residual`), scanned over the
stacked layer axis together with each layer's cache slice, so decoding cannot drift from training.

Shapes: B batch, T new tokens, S cache length, L layers, D model, G KV heads, H query heads,
R = H/G, K head dim, V vocab.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from picotron_jax.config import ModelConfig
from picotron_jax.models.attention import NEG_INF, rotary_tables
from picotron_jax.models.llama import attention_inputs, attention_output, dense_mlp_residual, rms_norm
from picotron_jax.models.ops import ParallelOps

KVCache = dict[str, jax.Array]  # "k", "v": [L, B, S, G, K]


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> KVCache:
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.resolved_head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def cached_attention(q_BTHK: jax.Array, k_BSGK: jax.Array, v_BSGK: jax.Array, pos0: jax.Array) -> jax.Array:
    """Queries at positions pos0 + t over the cache's positions s <= pos0 + t (fp32 softmax)."""
    B, T, H, K = q_BTHK.shape
    S, G = k_BSGK.shape[1], k_BSGK.shape[2]
    q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
    scores_BGRTS = jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK, preferred_element_type=jnp.float32) * K**-0.5
    visible_TS = jnp.arange(S)[None, :] <= (pos0 + jnp.arange(T))[:, None]
    probs_BGRTS = jax.nn.softmax(jnp.where(visible_TS, scores_BGRTS, NEG_INF), axis=-1).astype(v_BSGK.dtype)
    return jnp.einsum("bgrts,bsgk->btgrk", probs_BGRTS, v_BSGK).reshape(B, T, H, K)


def cached_forward(params: dict[str, Any], tokens_BT: jax.Array, cache: KVCache, pos0: jax.Array,
                   cfg: ModelConfig, ops: ParallelOps) -> tuple[jax.Array, KVCache]:
    """(logits of the last new token [B, V] in fp32, the cache with the new keys and values)."""
    T = tokens_BT.shape[1]
    x_BTD = ops.constrain(ops.embed(params["embed"], tokens_BT), ("batch", "seq", "embed"))
    cos_TK, sin_TK = rotary_tables(pos0 + jnp.arange(T), cfg.resolved_head_dim, cfg.rope_theta)

    def layer(x_BTD, xs):
        p, k_cache_BSGK, v_cache_BSGK = xs
        q_BTHK, k_BTGK, v_BTGK = attention_inputs(p, x_BTD, cos_TK, sin_TK, cfg, ops)
        k_cache_BSGK = jax.lax.dynamic_update_slice_in_dim(k_cache_BSGK, k_BTGK.astype(k_cache_BSGK.dtype), pos0, 1)
        v_cache_BSGK = jax.lax.dynamic_update_slice_in_dim(v_cache_BSGK, v_BTGK.astype(v_cache_BSGK.dtype), pos0, 1)
        o_BTHK = cached_attention(q_BTHK, k_cache_BSGK, v_cache_BSGK, pos0).astype(x_BTD.dtype)
        x_BTD = dense_mlp_residual(p, attention_output(p, x_BTD, o_BTHK, ops), cfg, ops)
        return x_BTD, (k_cache_BSGK, v_cache_BSGK)

    x_BTD, (k, v) = jax.lax.scan(layer, x_BTD, (params["layers"], cache["k"], cache["v"]))
    h_BD = rms_norm(x_BTD[:, -1], params["final_norm"], cfg.rms_norm_eps)
    head, spec = (params["embed"], "bd,vd->bv") if cfg.tie_embeddings else (params["lm_head"], "bd,dv->bv")
    return jnp.einsum(spec, h_BD, head, preferred_element_type=jnp.float32), {"k": k, "v": v}
