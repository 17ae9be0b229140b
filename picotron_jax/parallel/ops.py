"""The model's parallel operations (`models/ops.ParallelOps`) on the mesh.

Two implementations, one per kind of program the model runs in:

* `MeshOps`: the whole mesh under GSPMD (the plain train step, evaluation, generation). Layouts
  are constraints from the rules table; the operations that need explicit collectives run in
  their own `shard_map` (vocabulary-parallel embedding, ring attention, expert all-to-alls).
* `StageOps`: inside the pipeline's stage program, a `shard_map` already manual over every mesh
  axis (parallel/pipeline.py): constraints are no-ops and the collectives are called directly.

Mesh axes come from the rules table (`parallel/sharding.py`), never spelled here.
"""

from __future__ import annotations

import jax

from picotron_jax.models import moe as moe_math
from picotron_jax.models.attention import causal_attention, causal_logit_max
from picotron_jax.parallel.context import CONTEXT, context_attention, gathered_kv_attention
from picotron_jax.parallel.expert import (
    capacity_local,
    dropless_local,
    expert_parallel_capacity,
    expert_parallel_dropless,
    local_routing,
)
from picotron_jax.parallel.sharding import LOGICAL_RULES, MeshRules
from picotron_jax.parallel.vocab import local_vocab_embed, local_xent, vocab_parallel_cross_entropy, vocab_parallel_embed


class MeshOps:
    """ParallelOps on the whole mesh (GSPMD, with shard_map islands)."""

    def __init__(self, rules: MeshRules):
        self.rules = rules

    def constrain(self, x, axes):
        """A dimension that does not divide (e.g. 4 KV heads on tensor=8) stays replicated."""
        return self.rules.constrain(x, axes)

    def embed(self, table_VD, tokens_BT):
        return vocab_parallel_embed(self.rules, table_VD, tokens_BT)

    def attention(self, q_BTHK, k_BTGK, v_BTGK):
        """Causal attention; with the sequence split over `context`, ring attention."""
        return context_attention(self.rules, q_BTHK, k_BTGK, v_BTGK)

    def attention_logit_max(self, q_BTHK, k_BTGK, positions_T):
        """Under GSPMD as written: the keys (sequence split over `context`) are gathered for the scores of
        each device's queries, block by block; the max is reduced over the mesh by the compiler."""
        return causal_logit_max(q_BTHK, k_BTGK, positions_T)

    def sum_partials(self, y_BTD):
        """Row-parallel partial sums: XLA inserts the all-reduce over `tensor` from the shardings."""
        return y_BTD

    def cross_entropy(self, h_BTD, head, targets_BT, mask_BT, vocab_first):
        """Summed over the whole batch, replicated on every device."""
        return vocab_parallel_cross_entropy(self.rules, h_BTD, head, targets_BT, mask_BT, vocab_first)

    def route(self, h_BTD, router_DE, bias_E, cfg):
        """The router in a shard_map over the token axes: each device routes its own tokens. Under plain
        GSPMD, top_k all-gathered the global router scores onto every device (traffic and work grew with
        the global batch; tests/test_engine_review.py)."""
        return local_routing(self.rules, h_BTD, router_DE, bias_E, cfg)

    def capacity_experts(self, x_EBCD, w_gate_EDF, w_up_EDF, w_down_EFD):
        return expert_parallel_capacity(self.rules, x_EBCD, w_gate_EDF, w_up_EDF, w_down_EFD)

    def dropless_experts(self, x_BTD, experts_BTK, w_gate_EDF, w_up_EDF, w_down_EFD):
        return expert_parallel_dropless(self.rules, x_BTD, experts_BTK, w_gate_EDF, w_up_EDF, w_down_EFD)

    def capacity_positions(self, experts_BTK, priority_BTK, num_experts):
        """Under GSPMD the arrays are whole sequences (in the run's column layout)."""
        return moe_math.capacity_positions(experts_BTK, priority_BTK, num_experts), experts_BTK.shape[1]

    def token_share_mean(self, x):
        """The whole batch under GSPMD: x itself."""
        return x, 1.0


# inside a program manual over every axis, size-1 axes are harmless: their collectives are no-ops
(_TENSOR,) = LOGICAL_RULES["mlp"]
(_EXPERT,) = LOGICAL_RULES["experts"]
# every axis a microbatch's rows or columns are split over
TOKEN_AXES = tuple(dict.fromkeys(LOGICAL_RULES["batch"] + LOGICAL_RULES["seq"]))


class StageOps:
    """ParallelOps inside the pipeline's shard_map, which is manual over every mesh axis.

    `kv_replicated`: the KV heads do not divide by `tensor` (e.g. 2 KV heads on tensor = 4), so every rank
    holds all G of them next to its H/tp query heads, as the plain path's rules replicate them.
    `positions_n`, `positions_T`: with context > 1, the positions of this rank's n = T/context columns of the
    sequence and of all T (the layout `MeshRules.sequence_order`); attention then gathers K/V over `context`
    (parallel/context.py `gathered_kv_attention`, which says why not the ring)."""

    def __init__(self, kv_replicated: bool = False, positions_n: jax.Array | None = None,
                 positions_T: jax.Array | None = None):
        self.kv_replicated, self.positions_n, self.positions_T = kv_replicated, positions_n, positions_T

    def constrain(self, x, axes):
        return x

    def embed(self, table_vD, tokens_bT):
        return local_vocab_embed(table_vD, tokens_bT)

    def attention(self, q_bTHK, k_bTGK, v_bTGK):
        """This rank's query heads over its whole sequence, or over its columns of it with every rank's keys.
        With replicated KV heads, each local query head h takes its own KV head (global h // R): the gather's
        transpose sums the KV gradients over `tensor`."""
        k_bTGK, v_bTGK = self._own_kv_heads(q_bTHK, k_bTGK, v_bTGK)
        if self.positions_n is not None:
            return gathered_kv_attention(q_bTHK, k_bTGK, v_bTGK, self.positions_n, self.positions_T)
        return causal_attention(q_bTHK, k_bTGK, v_bTGK)

    def attention_logit_max(self, q_bTHK, k_bTGK, positions_T):
        """Over this rank's heads, then the max over `tensor` (the other axes: the pipeline's reduction). With
        context parallelism, `positions_T` are this rank's columns' positions, and its queries meet every rank's
        keys (gathered over `context`: the probe's steps only)."""
        k_bTGK, _ = self._own_kv_heads(q_bTHK, k_bTGK, k_bTGK)
        if self.positions_n is not None:
            k_bTGK = jax.lax.all_gather(k_bTGK, CONTEXT, axis=1, tiled=True)
        return jax.lax.pmax(causal_logit_max(q_bTHK, k_bTGK, positions_T, self.positions_T), _TENSOR)

    def _own_kv_heads(self, q_bTHK, k_bTGK, v_bTGK):
        """With replicated KV heads: the KV head of each local query head (else k, v unchanged)."""
        if not self.kv_replicated:
            return k_bTGK, v_bTGK
        Hl, G = q_bTHK.shape[2], k_bTGK.shape[2]
        R = Hl * jax.lax.axis_size(_TENSOR) // G  # query heads per KV head
        kv_of_head = (jax.lax.axis_index(_TENSOR) * Hl + jax.numpy.arange(Hl)) // R
        return tuple(jax.numpy.take(t, kv_of_head, axis=2) for t in (k_bTGK, v_bTGK))

    def sum_partials(self, y_bTD):
        return jax.lax.psum(y_bTD, _TENSOR)

    def cross_entropy(self, h_bTD, head, targets_bT, mask_bT, vocab_first):
        """This rank's vocabulary slice and tokens; the sums over the token axes are the pipeline's."""
        spec = "btd,vd->btv" if vocab_first else "btd,dv->btv"
        return local_xent(spec, h_bTD, head, targets_bT, mask_bT.astype(jax.numpy.float32))

    def route(self, h_bTD, router_DE, bias_E, cfg):
        return moe_math.route(h_bTD, router_DE, bias_E, cfg)  # already this rank's tokens

    def capacity_experts(self, x_EbCD, w_gate, w_up, w_down):
        return capacity_local(x_EbCD, w_gate, w_up, w_down, _EXPERT, _TENSOR)

    def dropless_experts(self, x_btD, experts_btK, w_gate, w_up, w_down):
        return dropless_local(x_btD, experts_btK, w_gate, w_up, w_down, w_gate.shape[0] * jax.lax.axis_size(_EXPERT),
                              _EXPERT, _TENSOR)

    def capacity_positions(self, experts_btK, priority_btK, num_experts):
        """With the sequence split over `context`, every rank's choices are all-gathered (small: [b, T, K]),
        put back in the natural column order and ranked over the whole sequence, exactly as on one device;
        this rank keeps its columns' ranks."""
        if self.positions_n is None:
            return moe_math.capacity_positions(experts_btK, priority_btK, num_experts), experts_btK.shape[1]
        order_T = self.positions_T  # the layout: column j holds position order_T[j]
        natural = jax.numpy.argsort(order_T)  # position t sits in layout column natural[t]
        gather = lambda a: jax.numpy.take(jax.lax.all_gather(a, CONTEXT, axis=1, tiled=True), natural, axis=1)  # noqa: E731
        ranks_BTK = moe_math.capacity_positions(gather(experts_btK), gather(priority_btK), num_experts)
        return jax.numpy.take(ranks_BTK, self.positions_n, axis=1), order_T.shape[0]

    def token_share_mean(self, x):
        """This rank holds one of R equal shares of the microbatch's tokens (R = the sizes of the token axes)."""
        ranks = 1
        for axis in TOKEN_AXES:
            ranks *= jax.lax.axis_size(axis)
        return jax.lax.pmean(x, TOKEN_AXES), 1.0 / ranks


