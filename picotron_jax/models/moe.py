"""Mixture-of-Experts feed-forward block: router, top-k, capacity or dropless dispatch, balancing losses.

A router (a [D, E] linear map computed in fp32) scores every token against E experts; each token
goes to its k best experts, and the block's output is the score-weighted sum of those experts'
SwiGLU outputs (Shazeer et al. 2017; GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021).

Two dispatch modes:

* **capacity** (GShard/Switch): every expert takes at most C = ceil(T * k / E * capacity_factor)
  tokens of each sequence (T tokens). When more are routed to it, the ones with the lowest router
  score are dropped: their expert output is zero and only the residual passes them on. Tokens move
  with one-hot dispatch/combine einsums into fixed [E, B, C, D] buffers, so every shape is static
  and expert parallelism is one `all_to_all` each way (parallel/expert.py). The groups are
  sequences, never devices: which tokens drop does not depend on the mesh.
* **dropless** (MegaBlocks, Gale et al. 2023; Megatron-Core): the token copies are sorted by
  expert and multiplied with grouped matmuls (models/moe_grouped.py: `jax.lax.ragged_dot`, or
  single-expert row blocks on CPU); no token is ever dropped.

Balancing, each independently switchable (config `moe.*`):

* Switch auxiliary loss  E * sum_e f_e * P_e  (f_e: fraction of the N*k assignments that go to e,
  P_e: mean router probability of e; 1.0 when perfectly uniform), Fedus et al. 2021 eq. 4.
* Router z-loss  mean_t logsumexp(logits_t)^2  (ST-MoE, Zoph et al. 2022, eq. 5).
* Aux-loss-free bias (DeepSeek-V3, Wang et al. 2024): a per-expert bias added to the scores only
  to *select* experts, moved after each step towards balance outside the gradient (train/moe_aux.py).

Shapes: B batch, T time, D model, E experts, K = top_k, C capacity, F expert MLP width,
N = B*T tokens, M = N*K token copies.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from picotron_jax.config import MoEConfig
from picotron_jax.models.linear import project
from picotron_jax.models.moe_grouped import grouped_swiglu, ragged_swiglu  # noqa: F401 (re-exported)

if TYPE_CHECKING:  # models/ops.py imports this module
    from picotron_jax.models.ops import ParallelOps

F32 = jnp.float32


class Routing(NamedTuple):
    experts_BTK: jax.Array  # int32: the chosen experts, best first
    weights_BTK: jax.Array  # fp32 combine weights (normalised over the k if moe.normalize_top_k)
    priority_BTK: jax.Array  # fp32 router score of each choice: who is dropped first in capacity mode
    probs_BTE: jax.Array  # fp32 per-token distribution over experts (for the Switch loss)
    logits_BTE: jax.Array  # fp32 router logits (for the z-loss)


def route(h_BTD: jax.Array, router_DE: jax.Array, bias_E: jax.Array | None, cfg: MoEConfig) -> Routing:
    """Router in fp32. The bias (aux-loss-free balancing) only changes which experts are chosen,
    never the weights they get (DeepSeek-V3 section 2.1.2)."""
    logits_BTE = jnp.einsum("btd,de->bte", h_BTD.astype(F32), router_DE.astype(F32))
    if cfg.score == "softmax":
        scores_BTE = jax.nn.softmax(logits_BTE, axis=-1)
        probs_BTE = scores_BTE
    else:  # sigmoid: independent affinities; the Switch loss uses them normalised per token
        scores_BTE = jax.nn.sigmoid(logits_BTE)
        probs_BTE = scores_BTE / jnp.sum(scores_BTE, axis=-1, keepdims=True)
    select_BTE = scores_BTE if bias_E is None else scores_BTE + jax.lax.stop_gradient(bias_E.astype(F32))
    _, experts_BTK = jax.lax.top_k(select_BTE, cfg.top_k)
    chosen_BTK = jnp.take_along_axis(scores_BTE, experts_BTK, axis=-1)
    weights_BTK = chosen_BTK / jnp.sum(chosen_BTK, axis=-1, keepdims=True) if cfg.normalize_top_k else chosen_BTK
    return Routing(experts_BTK.astype(jnp.int32), weights_BTK, jax.lax.stop_gradient(chosen_BTK), probs_BTE,
                   logits_BTE)


def expert_load(experts_BTK: jax.Array, num_experts: int) -> jax.Array:
    """[E] fp32: token copies routed to each expert (before any capacity drop)."""
    return jnp.sum(jax.nn.one_hot(experts_BTK, num_experts, dtype=F32), axis=(0, 1, 2))


def assignment_fraction(experts_NK: jax.Array, num_experts: int) -> jax.Array:
    """[E] fp32: the share of the N*K assignments sent to each expert."""
    return jnp.mean(jnp.sum(jax.nn.one_hot(experts_NK, num_experts, dtype=F32), axis=1), axis=0) / experts_NK.shape[-1]


def switch_aux_loss(probs_NE: jax.Array, experts_NK: jax.Array, fraction_E: jax.Array | None = None) -> jax.Array:
    """E * sum_e f_e * P_e; f_e = share of the N*K assignments sent to e, P_e = mean probability of e.

    As Megatron-Core's switch_load_balancing_loss_func: counts before capacity drops, no gradient
    through f (a count), the gradient flows through P. `fraction_E`: f when it is counted over more
    tokens than these (the pipeline's stages: over every token rank); given f the loss is linear in P."""
    E = probs_NE.shape[-1]
    f_E = assignment_fraction(experts_NK, E) if fraction_E is None else fraction_E
    P_E = jnp.mean(probs_NE, axis=0)
    return E * jnp.sum(jax.lax.stop_gradient(f_E) * P_E)


def router_z_loss(logits_NE: jax.Array) -> jax.Array:
    """mean over tokens of logsumexp(router logits)^2: keeps the logits small (ST-MoE)."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_NE, axis=-1)))


# ------------------------------------------------------------------------------ capacity mode


def expert_capacity(seq_len: int, top_k: int, num_experts: int, factor: float) -> int:
    """Slots per expert per sequence: ceil(T * k / E * factor), at most T (k distinct experts per token)."""
    return max(1, min(seq_len, math.ceil(seq_len * top_k / num_experts * factor)))


def capacity_positions(experts_BTK: jax.Array, priority_BTK: jax.Array, num_experts: int) -> jax.Array:
    """[B, T, K] int32: rank of each token copy among its sequence's copies sent to the same expert,
    highest router score first (ties: earlier token, then earlier choice). Rank >= C means dropped."""
    B, T, K = experts_BTK.shape
    M = T * K
    copy_M = jnp.arange(M)

    def one_sequence(e_M, s_M):
        order_M = jnp.lexsort((copy_M, -s_M, e_M))  # the last key is the primary one
        counts_E = jnp.bincount(e_M, length=num_experts)
        start_E = jnp.cumsum(counts_E) - counts_E
        rank_sorted_M = copy_M - start_E[e_M[order_M]]
        return jnp.zeros((M,), jnp.int32).at[order_M].set(rank_sorted_M.astype(jnp.int32))

    ranks = jax.vmap(one_sequence)(experts_BTK.reshape(B, M), jax.lax.stop_gradient(priority_BTK).reshape(B, M))
    return ranks.reshape(B, T, K)


def capacity_masks(experts_BTK, weights_BTK, positions_BTK, num_experts: int, capacity: int):
    """One-hot dispatch [B, T, E, C] (0/1), combine [B, T, E, C] (router weights), kept [B, T, K] (bool)."""
    kept_BTK = positions_BTK < capacity
    expert_BTKE = jax.nn.one_hot(experts_BTK, num_experts, dtype=F32)
    slot_BTKC = jax.nn.one_hot(jnp.where(kept_BTK, positions_BTK, capacity), capacity, dtype=F32)  # 0 if dropped
    dispatch_BTEC = jnp.einsum("btke,btkc->btec", expert_BTKE, slot_BTKC)
    combine_BTEC = jnp.einsum("btke,btkc,btk->btec", expert_BTKE, slot_BTKC, weights_BTK)
    return dispatch_BTEC, combine_BTEC, kept_BTK


def swiglu_experts(x_EBCD: jax.Array, w_gate_EDF, w_up_EDF, w_down_EFD, dot=project) -> jax.Array:
    """Each expert's SwiGLU on its own capacity buffers: [E, B, C, D] -> [E, B, C, D]. Experts lead and
    (B, C) merge into one row axis: plain batched matmuls (measured 1.26x faster on XLA:CPU than
    [B, E, C, D] with the expert axis in the middle).

    `dot(spec, x, w)`: `project` (fast weight-gradient dots on CPU); inside `shard_map` a variant
    whose VJP also sums the gradients over the mesh axes autodiff would (parallel/expert.py)."""
    E, B, C, D = x_EBCD.shape
    x_END = x_EBCD.reshape(E, B * C, D)
    gate = dot("end,edf->enf", x_END, w_gate_EDF)
    up = dot("end,edf->enf", x_END, w_up_EDF)
    return dot("enf,efd->end", jax.nn.silu(gate) * up, w_down_EFD).reshape(E, B, C, D)


# ------------------------------------------------------------------------------ dropless mode


def sort_by_expert(experts_NK: jax.Array, num_experts: int):
    """Token copies sorted by expert: (order [M], token of each sorted copy [M], rows per expert [E])."""
    K = experts_NK.shape[-1]
    e_M = experts_NK.reshape(-1)
    order_M = jnp.argsort(e_M, stable=True)
    return order_M, order_M // K, jnp.bincount(e_M, length=num_experts).astype(jnp.int32)


def dropless_experts(x_BTD: jax.Array, experts_BTK: jax.Array, w_gate_EDF, w_up_EDF, w_down_EFD) -> jax.Array:
    """Every token copy through its expert, none dropped: [B, T, D] -> [B, T, K, D] (one device)."""
    B, T, D = x_BTD.shape
    K, E = experts_BTK.shape[-1], w_gate_EDF.shape[0]
    order_M, token_M, sizes_E = sort_by_expert(experts_BTK.reshape(B * T, K), E)
    y_sorted_MD = grouped_swiglu(x_BTD.reshape(B * T, D)[token_M], sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD)
    return y_sorted_MD[jnp.argsort(order_M)].reshape(B, T, K, D)


# ------------------------------------------------------------------------------ the block


def moe_ffn(p: dict[str, jax.Array], h_BTD: jax.Array, cfg: MoEConfig, ops: "ParallelOps") -> tuple[jax.Array, dict]:
    """MoE feed-forward of one layer: normed h [B, T, D] -> (output [B, T, D], stats).

    `p`: router [D, E] (fp32), router_bias [E] (if balancing by bias), w_gate/w_up [E, D, F],
    w_down [E, F, D], shared_gate/shared_up [D, S], shared_down [S, D] (if shared experts).
    `ops.capacity_experts` / `ops.dropless_experts` run the experts (one device, or expert
    parallel over the mesh: parallel/expert.py). Stats (fp32): load [E] token copies per expert,
    dropped (copies), aux (Switch loss), z (router z-loss), all over this call's whole batch; where the
    program holds one of several equal shares of the batch's tokens (`ops.token_share_mean`: the pipeline's
    stages), this share's part of each, so that their sums over the shares are the batch's values."""
    B, T, D = h_BTD.shape
    E, K = cfg.num_experts, cfg.top_k
    with jax.named_scope("moe_router"):  # named scopes: the profiler's modules (picotron_jax/profile)
        r = ops.route(h_BTD, p["router"], p.get("router_bias"), cfg)  # on each device's own tokens
    experts = (p["w_gate"], p["w_up"], p["w_down"])
    if cfg.dispatch == "capacity":
        with jax.named_scope("moe_dispatch"):
            positions_BTK, seq_len = ops.capacity_positions(r.experts_BTK, r.priority_BTK, E)
            C = expert_capacity(seq_len, K, E, cfg.capacity_factor)
            dispatch_BTEC, combine_BTEC, kept_BTK = capacity_masks(r.experts_BTK, r.weights_BTK, positions_BTK, E, C)
            x_EBCD = jnp.einsum("btec,btd->ebcd", dispatch_BTEC.astype(h_BTD.dtype), h_BTD)
        with jax.named_scope("moe_experts"):
            y_EBCD = ops.capacity_experts(ops.constrain(x_EBCD, (None, "batch", None, "embed")), *experts)
        with jax.named_scope("moe_combine"):
            y_BTD = jnp.einsum("ebcd,btec->btd", y_EBCD, combine_BTEC.astype(h_BTD.dtype))
            dropped = B * T * K - jnp.sum(kept_BTK.astype(F32))
    else:
        with jax.named_scope("moe_experts"):
            y_BTKD = ops.dropless_experts(h_BTD, r.experts_BTK, *experts)
        with jax.named_scope("moe_combine"):
            y_BTD = jnp.einsum("btkd,btk->btd", y_BTKD, r.weights_BTK.astype(h_BTD.dtype))
            dropped = jnp.zeros((), F32)
    if "shared_gate" in p:  # DeepSeek shared experts: a dense SwiGLU every token goes through
        with jax.named_scope("moe_shared"):
            act_BTS = jax.nn.silu(project("btd,ds->bts", h_BTD, p["shared_gate"])) * project(
                "btd,ds->bts", h_BTD, p["shared_up"])
            y_BTD = y_BTD + project("bts,sd->btd", ops.constrain(act_BTS, ("batch", "seq", "mlp")),
                                    p["shared_down"])
    experts_NK = r.experts_BTK.reshape(B * T, K)
    f_E, share = ops.token_share_mean(jax.lax.stop_gradient(assignment_fraction(experts_NK, E)))
    stats = {
        "load": expert_load(r.experts_BTK, E),
        "dropped": dropped,
        "aux": switch_aux_loss(r.probs_BTE.reshape(B * T, E), experts_NK, f_E) * share,
        "z": router_z_loss(r.logits_BTE.reshape(B * T, E)) * share,
    }
    return y_BTD, stats
