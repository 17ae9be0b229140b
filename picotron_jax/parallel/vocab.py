"""Megatron-style vocabulary parallelism: embedding and cross-entropy over a vocab split on `tensor`.

Each tensor rank holds rows [r*V/tp, (r+1)*V/tp) of the table. The full [batch, seq, vocab] logits
never exist on one device: the softmax normaliser is combined with pmax/psum over `tensor`
(Shoeybi et al. 2019, section 3; picotron's VocabParallelEmbedding).
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from picotron_jax.models.linear import sum_to_type
from picotron_jax.parallel.sharding import LOGICAL_RULES, MeshRules

(TENSOR,) = LOGICAL_RULES["vocab"]  # the vocabulary's mesh axis (inside shard_maps manual over it)


def _local_vocab_range(rows: int) -> jax.Array:
    return jax.lax.axis_index(TENSOR) * rows


def vocab_parallel_embed(rules: MeshRules, table_VD: jax.Array, tokens_BT: jax.Array) -> jax.Array:
    """tokens [B, T] -> embeddings [B, T, D]; each rank looks up the tokens it owns, then psum."""
    tok_spec = rules.activation_spec(("batch", "seq"), tokens_BT.shape)  # a batch too small to split stays whole
    out_spec = rules.activation_spec(("batch", "seq", "embed"), (*tokens_BT.shape, table_VD.shape[1]))
    return jax.shard_map(local_vocab_embed, mesh=rules.mesh, in_specs=(P(TENSOR, None), tok_spec),
                         out_specs=out_spec)(table_VD, tokens_BT)


def local_vocab_embed(table_vD: jax.Array, tok_bt: jax.Array) -> jax.Array:
    """Inside a shard_map manual over `tensor`: look up the tokens this rank's rows own, then psum."""
    v = table_vD.shape[0]
    ids_bt = tok_bt - _local_vocab_range(v)
    mine_bt = (ids_bt >= 0) & (ids_bt < v)
    x_btD = jnp.take(table_vD, jnp.where(mine_bt, ids_bt, 0), axis=0)
    x_btD = jnp.where(mine_bt[..., None], x_btD, jnp.zeros((), x_btD.dtype))
    return jax.lax.psum(x_btD, TENSOR)


def _local_xent_stats(h_btD, w, tgt_bt, head_spec: str):
    """Per-token log-sum-exp over the whole vocabulary and the target logit, from this rank's slice."""
    logits_btv = jnp.einsum(head_spec, h_btD, w, preferred_element_type=jnp.float32)
    v = logits_btv.shape[-1]
    # the max is only a shift for stability; it gets no gradient (the VJP below is written by hand), and
    # stop_gradient keeps pmax (which has no derivative rule) out of the derivative of this VJP's residuals
    # (second-order MAML differentiates the inner loop's gradient: meta/corpus_tasks.py)
    max_bt = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits_btv, axis=-1)), TENSOR)
    sumexp_bt = jax.lax.psum(jnp.sum(jnp.exp(logits_btv - max_bt[..., None]), axis=-1), TENSOR)
    lse_bt = jnp.log(sumexp_bt) + max_bt
    ids_bt = tgt_bt - _local_vocab_range(v)
    mine_bt = (ids_bt >= 0) & (ids_bt < v)
    local_ids_bt = jnp.where(mine_bt, ids_bt, 0)
    picked_bt = jnp.take_along_axis(logits_btv, local_ids_bt[..., None], axis=-1)[..., 0]
    target_bt = jax.lax.psum(jnp.where(mine_bt, picked_bt, 0.0), TENSOR)
    return logits_btv, lse_bt, target_bt, mine_bt, local_ids_bt


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def local_xent(head_spec: str, h_btD, w, tgt_bt, m_bt):
    """(sum of mask * (lse - target logit), sum of mask * lse^2) over this rank's tokens."""
    return _local_xent_fwd(head_spec, h_btD, w, tgt_bt, m_bt)[0]


def _local_xent_fwd(head_spec, h_btD, w, tgt_bt, m_bt):
    _, lse_bt, target_bt, _, _ = _local_xent_stats(h_btD, w, tgt_bt, head_spec)
    out = jnp.sum((lse_bt - target_bt) * m_bt), jnp.sum(jnp.square(lse_bt) * m_bt)
    return out, (h_btD, w, tgt_bt, m_bt, lse_bt)


def _local_xent_bwd(head_spec, residuals, cotangents):
    """d/dlogits = softmax * (g_nll + 2 g_z lse) * mask - onehot(target) * g_nll * mask.

    Recomputes the logits slice instead of saving it (one [b, t, V/tp] buffer less), and writes the
    head gradient in the head's own layout (fast weight-gradient dots, see models/linear.py)."""
    h_btD, w, tgt_bt, m_bt, lse_bt = residuals
    g_nll, g_z = cotangents
    logits_btv = jnp.einsum(head_spec, h_btD, w, preferred_element_type=jnp.float32)
    v = logits_btv.shape[-1]
    ids_bt = tgt_bt - _local_vocab_range(v)
    mine_bt = (ids_bt >= 0) & (ids_bt < v)
    probs_btv = jnp.exp(logits_btv - lse_bt[..., None])
    m_bt = m_bt.astype(jnp.float32)
    row_scale_bt = (g_nll + 2.0 * g_z * lse_bt) * m_bt
    onehot_btv = jax.nn.one_hot(jnp.where(mine_bt, ids_bt, -1), v, dtype=jnp.float32)
    dlogits_btv = (probs_btv * row_scale_bt[..., None] - onehot_btv * (g_nll * m_bt)[..., None]).astype(h_btD.dtype)
    h_sub, w_sub, y_sub = head_spec.replace("->", ",").split(",")
    dh_btD = jnp.einsum(f"{y_sub},{w_sub}->{h_sub}", dlogits_btv, w)
    dw = jnp.einsum(f"{h_sub},{y_sub}->{w_sub}", h_btD, dlogits_btv)
    return sum_to_type(dh_btD, h_btD), sum_to_type(dw, w), None, None


local_xent.defvjp(_local_xent_fwd, _local_xent_bwd)


def vocab_parallel_cross_entropy(
    rules: MeshRules,
    h_BTD: jax.Array,
    head: jax.Array,
    targets_BT: jax.Array,
    mask_BT: jax.Array,
    vocab_first: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Sum over tokens of (-log p(target), log(Z)^2), each weighted by mask. Logits in fp32.

    `head` is [V, D] (`vocab_first`, a tied embedding table) or [D, V] (an untied LM head).
    Returns scalars replicated on every device; divide by the token count outside.
    """
    tok_spec = rules.activation_spec(("batch", "seq"))
    h_spec = rules.activation_spec(("batch", "seq", "embed"))
    token_axes = rules.mesh_axes("batch", "seq")  # the per-token sums are reduced over these
    head_spec, w_spec = ("btd,vd->btv", P(TENSOR, None)) if vocab_first else ("btd,dv->btv", P(None, TENSOR))

    def local(h_btD, w, tgt_bt, m_bt):
        nll, z = local_xent(head_spec, h_btD, w, tgt_bt, m_bt.astype(jnp.float32))
        if token_axes:
            nll, z = jax.lax.psum(nll, token_axes), jax.lax.psum(z, token_axes)
        return nll, z

    return jax.shard_map(
        local,
        mesh=rules.mesh,
        in_specs=(h_spec, w_spec, tok_spec, tok_spec),
        out_specs=(P(), P()),
    )(h_BTD, head, targets_BT, mask_BT)
