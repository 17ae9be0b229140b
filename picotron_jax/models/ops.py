"""What the model asks of the parallel layer (`ParallelOps`), and its single-device version.

The model code never names mesh axes or calls collectives: every operation whose implementation
depends on the layout goes through this protocol. `parallel/ops.py` implements it on the whole
mesh (`MeshOps`) and inside the pipeline's stage program (`StageOps`); `LocalOps` is one device.

Shapes: B batch, T time, D model, H query heads, G KV heads, K head dim, V vocab, E experts,
C capacity slots, F expert MLP width, K (in `experts_BTK`) the router's top-k.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp

from picotron_jax.config import MoEConfig
from picotron_jax.models import moe as moe_math
from picotron_jax.models.attention import causal_attention, causal_logit_max


class ParallelOps(Protocol):
    def constrain(self, x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
        """Pin an activation's layout by its logical axes (identity where layouts are manual)."""

    def embed(self, table_VD: jax.Array, tokens_BT: jax.Array) -> jax.Array:
        """Rows of the embedding table for these tokens (vocabulary-parallel when V is split)."""

    def attention(self, q_BTHK: jax.Array, k_BTGK: jax.Array, v_BTGK: jax.Array) -> jax.Array:
        """Causal attention over the whole sequence (a ring over `context` when it is split)."""

    def attention_logit_max(self, q_BTHK: jax.Array, k_BTGK: jax.Array, positions_T: jax.Array | None) -> jax.Array:
        """The largest causal attention logit over the whole batch, sequence and every head, f32 scalar
        (`models/attention.causal_logit_max`; `positions_T` the columns' positions, None = arange)."""

    def sum_partials(self, y_BTD: jax.Array) -> jax.Array:
        """Sum the partial outputs of a projection whose input is split over `tensor` (Megatron's
        row-parallel all-reduce). The identity where the compiler inserts the sum (auto sharding)."""

    def cross_entropy(self, h_BTD: jax.Array, head: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array,
                      vocab_first: bool) -> tuple[jax.Array, jax.Array]:
        """(sum of mask * -log p(target), sum of mask * log(Z)^2) over the program's tokens, logits in fp32;
        `head` is [V, D] (`vocab_first`, a tied table) or [D, V] (vocabulary-parallel when V is split)."""

    def route(self, h_BTD: jax.Array, router_DE: jax.Array, bias_E: jax.Array | None,
              cfg: MoEConfig) -> moe_math.Routing:
        """The MoE router on each device's own tokens (`models/moe.py:route`, a per-token computation)."""

    def capacity_experts(self, x_EBCD: jax.Array, w_gate_EDF: jax.Array, w_up_EDF: jax.Array,
                         w_down_EFD: jax.Array) -> jax.Array:
        """MoE capacity buffers [E, B, C, D] through their experts' SwiGLU, same shape back."""

    def dropless_experts(self, x_BTD: jax.Array, experts_BTK: jax.Array, w_gate_EDF: jax.Array,
                         w_up_EDF: jax.Array, w_down_EFD: jax.Array) -> jax.Array:
        """Every token copy through its expert, none dropped: [B, T, D] -> [B, T, K, D]."""

    def capacity_positions(self, experts_BTK: jax.Array, priority_BTK: jax.Array,
                           num_experts: int) -> tuple[jax.Array, int]:
        """(each token copy's rank among its whole sequence's copies sent to the same expert,
        `models/moe.py:capacity_positions`; the whole sequence's length): capacity ranks whole sequences."""

    def token_share_mean(self, x: jax.Array) -> tuple[jax.Array, float | jax.Array]:
        """(the mean of x over the R equal shares of the batch's tokens that programs like this one hold,
        1 / R): x itself and 1 where the program sees the whole batch (here and under GSPMD)."""


class LocalOps:
    """ParallelOps on one device: plain jnp."""

    def constrain(self, x, axes):
        return x

    def embed(self, table_VD, tokens_BT):
        return jnp.take(table_VD, tokens_BT, axis=0)

    def attention(self, q_BTHK, k_BTGK, v_BTGK):
        return causal_attention(q_BTHK, k_BTGK, v_BTGK)

    def attention_logit_max(self, q_BTHK, k_BTGK, positions_T):
        return causal_logit_max(q_BTHK, k_BTGK, positions_T)

    def sum_partials(self, y_BTD):
        return y_BTD

    def cross_entropy(self, h_BTD, head, targets_BT, mask_BT, vocab_first):
        logits_BTV = jnp.einsum("btd,vd->btv" if vocab_first else "btd,dv->btv", h_BTD, head,
                                preferred_element_type=jnp.float32)
        lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
        target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
        mask_BT = mask_BT.astype(jnp.float32)
        return jnp.sum((lse_BT - target_BT) * mask_BT), jnp.sum(jnp.square(lse_BT) * mask_BT)

    def route(self, h_BTD, router_DE, bias_E, cfg):
        return moe_math.route(h_BTD, router_DE, bias_E, cfg)

    def capacity_experts(self, x_EBCD, w_gate_EDF, w_up_EDF, w_down_EFD):
        return moe_math.swiglu_experts(x_EBCD, w_gate_EDF, w_up_EDF, w_down_EFD)

    def dropless_experts(self, x_BTD, experts_BTK, w_gate_EDF, w_up_EDF, w_down_EFD):
        return moe_math.dropless_experts(x_BTD, experts_BTK, w_gate_EDF, w_up_EDF, w_down_EFD)

    def capacity_positions(self, experts_BTK, priority_BTK, num_experts):
        return moe_math.capacity_positions(experts_BTK, priority_BTK, num_experts), experts_BTK.shape[1]

    def token_share_mean(self, x):
        return x, 1.0


LOCAL_OPS = LocalOps()
