"""Rotary position embeddings (Su et al. 2021) and causal grouped-query attention (Ainslie et al. 2023)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def rotary_tables(positions_T: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [T, K]; frequencies theta^(-2i/K) repeated for the two halves (Llama/HF layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_TK2 = positions_T.astype(jnp.float32)[:, None] * inv_freq[None, :]
    angles_TK = jnp.concatenate([angles_TK2, angles_TK2], axis=-1)
    return jnp.cos(angles_TK), jnp.sin(angles_TK)


def apply_rotary(x_BTNK: jax.Array, cos_TK: jax.Array, sin_TK: jax.Array) -> jax.Array:
    """Rotate pairs (x_i, x_{i+K/2}) by position-dependent angles; N is any head axis."""
    half = x_BTNK.shape[-1] // 2
    x1, x2 = x_BTNK[..., :half], x_BTNK[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos = cos_TK[None, :, None, :].astype(x_BTNK.dtype)
    sin = sin_TK[None, :, None, :].astype(x_BTNK.dtype)
    return x_BTNK * cos + rotated * sin


def attention_implementation(platform: str, dtype) -> str | None:
    """The `implementation=` to ask `jax.nn.dot_product_attention` for: "cudnn" (flash attention) on an
    NVIDIA GPU in fp16/bf16, the only dtypes cuDNN's kernel takes; None (XLA's) otherwise. Without
    `implementation=` the function uses XLA's kernel on every backend."""
    if platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return None


def causal_attention(q_BTHK: jax.Array, k_BSGK: jax.Array, v_BSGK: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(K) + causal mask) v, with H = G * R query heads sharing each KV head.

    `jax.nn.dot_product_attention` takes GQA directly (no repeated K/V); on GPU in fp16/bf16 it is
    asked for cuDNN flash attention (`attention_implementation`), falling back to XLA's kernel when
    cuDNN refuses the shapes (it raises at trace time). On XLA:CPU its fused form measured 7-19%
    faster for the whole bench-32m step than a hand-written einsum. Softmax statistics are in fp32.
    """
    impl = attention_implementation(jax.default_backend(), q_BTHK.dtype)
    if impl is not None:
        try:
            return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, is_causal=True, implementation=impl)
        except (ValueError, NotImplementedError, RuntimeError, TypeError):
            pass  # cuDNN does not take these shapes or this build has no cuDNN attention: XLA's kernel
    return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, is_causal=True)


def reference_attention(q_BTHK: jax.Array, k_BSGK: jax.Array, v_BSGK: jax.Array) -> jax.Array:
    """The same attention as plain einsums (for tests and for reading)."""
    B, T, H, K = q_BTHK.shape
    G = k_BSGK.shape[2]
    q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
    scores_BGRTS = jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK).astype(jnp.float32) * (K**-0.5)
    S = k_BSGK.shape[1]
    causal_TS = jnp.arange(T)[:, None] >= jnp.arange(S)[None, :]
    scores_BGRTS = jnp.where(causal_TS, scores_BGRTS, NEG_INF)
    probs_BGRTS = jax.nn.softmax(scores_BGRTS, axis=-1).astype(v_BSGK.dtype)
    out_BTGRK = jnp.einsum("bgrts,bsgk->btgrk", probs_BGRTS, v_BSGK)
    return out_BTGRK.reshape(B, T, H, K)


SCORES_BLOCK = 1 << 24  # causal_logit_max holds at most this many scores at once (64 MiB in fp32)


def causal_logit_max(q_BTHK: jax.Array, k_BSGK: jax.Array, positions_T: jax.Array | None = None,
                     positions_S: jax.Array | None = None, key_block: int | None = None) -> jax.Array:
    """max over b, h and causal pairs (t, s) of the attention logit q_t . k_s / sqrt(K), in fp32: the monitor's
    attention-logit max (a growing one is the classic precursor of a loss spike: Dehghani et al. 2023).

    Causality is read from the positions (default arange: the natural order; context parallelism's zigzag
    layout passes its own), so any column order works. The keys are visited in blocks of `key_block` (default:
    the most that keeps [B, G, R, T, key_block] within SCORES_BLOCK scores), so the memory does not grow with
    T^2. Meant for a `stop_gradient`ed q and k."""
    B, T, H, K = q_BTHK.shape
    S, G = k_BSGK.shape[1], k_BSGK.shape[2]
    q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
    pos_T = jnp.arange(T) if positions_T is None else positions_T
    pos_S = pos_T if positions_S is None else positions_S
    key_block = key_block or max(1, SCORES_BLOCK // (B * T * H))
    block = max(d for d in range(1, min(S, key_block) + 1) if S % d == 0)

    def block_max(j):
        k_BNGK = jax.lax.dynamic_slice_in_dim(k_BSGK, j * block, block, axis=1)
        pos_N = jax.lax.dynamic_slice_in_dim(pos_S, j * block, block)
        s_BGRTN = jnp.einsum("btgrk,bngk->bgrtn", q_BTGRK, k_BNGK, preferred_element_type=jnp.float32) * K**-0.5
        return jnp.max(jnp.where(pos_T[:, None] >= pos_N[None, :], s_BGRTN, -jnp.inf))

    # the first block starts the loop: its max is typed like the scores (inside shard_map: varying over the
    # axes q and k vary over), which a constant -inf start is not
    return jax.lax.fori_loop(1, S // block, lambda j, m: jnp.maximum(m, block_max(j)), block_max(0))
