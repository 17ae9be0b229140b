"""Llama decoder (Touvron et al. 2023) in Flax NNX with stacked, scanned layers.

Tensors are named with their shape letters (nanodo convention): B batch, T time, D model width,
F MLP width, H query heads, G KV heads, R = H/G query heads per KV head, K head dim, V vocab,
L layers. Every parameter carries `logical_axes` metadata that `parallel/sharding.py` maps to
mesh axes. Weights are stored input-first ([in, out], e.g. wq [L, D, H, K]) and applied with
`project`, whose hand-written VJP keeps XLA:CPU's weight-gradient dots fast (models/linear.py).

Layers are stacked on a leading `layers` axis and run with `jax.lax.scan`, so compile time
does not grow with depth. Initialisation uses only the seed (one key per parameter).
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from picotron_jax.config import ModelConfig
from picotron_jax.models.attention import apply_rotary, causal_attention, rotary_tables
from picotron_jax.models.linear import project


class ParallelOps(Protocol):
    """What the model asks of the parallel layer; `LocalOps` is the single-device version."""

    def constrain(self, x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array: ...

    def embed(self, table_VD: jax.Array, tokens_BT: jax.Array) -> jax.Array: ...

    def attention(self, q_BTHK: jax.Array, k_BTGK: jax.Array, v_BTGK: jax.Array) -> jax.Array:
        """Causal attention over the whole sequence (a ring over `context` when it is split)."""

    def sum_partials(self, y_BTD: jax.Array) -> jax.Array:
        """Sum the partial outputs of a projection whose input is split over `tensor` (Megatron's
        row-parallel all-reduce). The identity where the compiler inserts the sum (auto sharding)."""


class LocalOps:
    def constrain(self, x, axes):
        return x

    def embed(self, table_VD, tokens_BT):
        return jnp.take(table_VD, tokens_BT, axis=0)

    def attention(self, q_BTHK, k_BTGK, v_BTGK):
        return causal_attention(q_BTHK, k_BTGK, v_BTGK)

    def sum_partials(self, y_BTD):
        return y_BTD


LOCAL_OPS = LocalOps()

# name -> (logical axes, shape from (L, D, F, H, G, K, V)); "norm" params start at one.
LAYER_PARAMS = {
    "attn_norm": (("layers", "embed"), lambda L, D, F, H, G, K: (L, D)),
    "wq": (("layers", "embed", "heads", "head_dim"), lambda L, D, F, H, G, K: (L, D, H, K)),
    "wk": (("layers", "embed", "kv_heads", "head_dim"), lambda L, D, F, H, G, K: (L, D, G, K)),
    "wv": (("layers", "embed", "kv_heads", "head_dim"), lambda L, D, F, H, G, K: (L, D, G, K)),
    "wo": (("layers", "heads", "head_dim", "embed"), lambda L, D, F, H, G, K: (L, H, K, D)),
    "mlp_norm": (("layers", "embed"), lambda L, D, F, H, G, K: (L, D)),
    "w_gate": (("layers", "embed", "mlp"), lambda L, D, F, H, G, K: (L, D, F)),
    "w_up": (("layers", "embed", "mlp"), lambda L, D, F, H, G, K: (L, D, F)),
    "w_down": (("layers", "mlp", "embed"), lambda L, D, F, H, G, K: (L, F, D)),
}
OUTPUT_PROJECTIONS = ("wo", "w_down")  # scaled by 1/sqrt(2L) at init (GPT-2, Radford et al. 2019)


def rms_norm(x_BTD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
    """RMSNorm (Zhang & Sennrich 2019), computed in fp32."""
    x32 = x_BTD.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (x32 * scale_D.astype(jnp.float32)).astype(x_BTD.dtype)


def decoder_block(p: dict, x_BTD: jax.Array, cos_TK, sin_TK, cfg: ModelConfig, ops: ParallelOps) -> jax.Array:
    """One pre-norm Llama block: x + Attn(norm(x)), then x + SwiGLU(norm(x)). `p` holds one layer."""
    h_BTD = rms_norm(x_BTD, p["attn_norm"], cfg.rms_norm_eps)
    q_BTHK = project("btd,dhk->bthk", h_BTD, p["wq"])
    k_BTGK = project("btd,dgk->btgk", h_BTD, p["wk"])
    v_BTGK = project("btd,dgk->btgk", h_BTD, p["wv"])
    q_BTHK = ops.constrain(apply_rotary(q_BTHK, cos_TK, sin_TK), ("batch", "seq", "heads", "head_dim"))
    k_BTGK = ops.constrain(apply_rotary(k_BTGK, cos_TK, sin_TK), ("batch", "seq", "kv_heads", "head_dim"))
    v_BTGK = ops.constrain(v_BTGK, ("batch", "seq", "kv_heads", "head_dim"))
    o_BTHK = ops.attention(q_BTHK, k_BTGK, v_BTGK)
    x_BTD = x_BTD + ops.sum_partials(project("bthk,hkd->btd", o_BTHK, p["wo"]))
    x_BTD = ops.constrain(x_BTD, ("batch", "seq", "embed"))

    h_BTD = rms_norm(x_BTD, p["mlp_norm"], cfg.rms_norm_eps)
    gate_BTF = project("btd,df->btf", h_BTD, p["w_gate"])
    up_BTF = project("btd,df->btf", h_BTD, p["w_up"])
    act_BTF = ops.constrain(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "seq", "mlp"))
    x_BTD = x_BTD + ops.sum_partials(project("btf,fd->btd", act_BTF, p["w_down"]))
    return ops.constrain(x_BTD, ("batch", "seq", "embed"))


def decoder_layers(stacked: dict, x_BTD: jax.Array, cos_TK, sin_TK, cfg: ModelConfig, ops: ParallelOps) -> jax.Array:
    """Run the layers stacked on the leading axis of every array in `stacked` ([L', ...]) in order."""

    def step(x, layer_params):
        return decoder_block(layer_params, x, cos_TK, sin_TK, cfg, ops), None

    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    x_BTD, _ = jax.lax.scan(step, x_BTD, stacked, unroll=min(cfg.scan_unroll, num_layers))
    return x_BTD


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.cfg = cfg
        L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
        H, G, K, V = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim, cfg.vocab_size

        self.embed = nnx.Param(
            cfg.init_std * jax.random.normal(rngs.params(), (V, D), param_dtype), logical_axes=("vocab", "embed")
        )
        layers = {}
        for name, (axes, shape_fn) in LAYER_PARAMS.items():
            shape = shape_fn(L, D, F, H, G, K)
            if name.endswith("norm"):
                value = jnp.ones(shape, param_dtype)
            else:
                std = cfg.init_std / (2 * L) ** 0.5 if name in OUTPUT_PROJECTIONS else cfg.init_std
                value = std * jax.random.normal(rngs.params(), shape, param_dtype)
            layers[name] = nnx.Param(value, logical_axes=axes)
        self.layers = nnx.Dict(layers)
        self.final_norm = nnx.Param(jnp.ones((D,), param_dtype), logical_axes=("embed",))
        if not cfg.tie_embeddings:  # [D, V], input-first like every projection
            self.lm_head = nnx.Param(
                cfg.init_std * jax.random.normal(rngs.params(), (D, V), param_dtype), logical_axes=("embed", "vocab")
            )

    def head_weight(self) -> jax.Array:
        """The LM head: [D, V], or the [V, D] embedding table when tied (see `head_is_vocab_first`)."""
        return (self.embed if self.cfg.tie_embeddings else self.lm_head)[...]

    @property
    def head_is_vocab_first(self) -> bool:
        return self.cfg.tie_embeddings

    def hidden_states(self, tokens_BT: jax.Array, ops: ParallelOps = LOCAL_OPS,
                      compute_dtype=jnp.float32, positions_T: jax.Array | None = None) -> jax.Array:
        """tokens [B, T] -> final-normed hidden states [B, T, D] (the LM head is applied by the loss).

        `positions_T`: the position of each column (default arange(T)); context parallelism passes
        its zigzag order (parallel/context.py), in which the tokens are then laid out."""
        cfg = self.cfg
        T = tokens_BT.shape[1]
        x_BTD = ops.embed(self.embed[...].astype(compute_dtype), tokens_BT)
        x_BTD = ops.constrain(x_BTD, ("batch", "seq", "embed"))
        positions_T = jnp.arange(T) if positions_T is None else positions_T
        cos_TK, sin_TK = rotary_tables(positions_T, cfg.resolved_head_dim, cfg.rope_theta)
        stacked = {name: v[...].astype(compute_dtype) for name, v in self.layers.items()}
        x_BTD = decoder_layers(stacked, x_BTD, cos_TK, sin_TK, cfg, ops)
        return rms_norm(x_BTD, self.final_norm[...], cfg.rms_norm_eps)

    def __call__(self, tokens_BT: jax.Array, ops: ParallelOps = LOCAL_OPS) -> jax.Array:
        """tokens [B, T] -> logits [B, T, V] (full logits: for inference and inspection)."""
        h_BTD = self.hidden_states(tokens_BT, ops)
        spec = "btd,vd->btv" if self.head_is_vocab_first else "btd,dv->btv"
        return jnp.einsum(spec, h_BTD, self.head_weight(), preferred_element_type=jnp.float32)
