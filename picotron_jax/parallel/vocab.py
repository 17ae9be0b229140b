"""Megatron-style vocabulary parallelism: embedding and cross-entropy over a vocab split on `tensor`.

Each tensor rank holds rows [r*V/tp, (r+1)*V/tp) of the table. The full [batch, seq, vocab] logits
never exist on one device: the softmax normaliser is combined with pmax/psum over `tensor`
(Shoeybi et al. 2019, section 3; picotron's VocabParallelEmbedding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

if TYPE_CHECKING:
    from picotron_jax.parallel.sharding import MeshRules

TENSOR = "tensor"


def _local_vocab_range(rows: int) -> jax.Array:
    return jax.lax.axis_index(TENSOR) * rows


def vocab_parallel_embed(rules: "MeshRules", table_VD: jax.Array, tokens_BT: jax.Array) -> jax.Array:
    """tokens [B, T] -> embeddings [B, T, D]; each rank looks up the tokens it owns, then psum."""
    tok_spec = rules.activation_spec(("batch", "seq"))
    out_spec = rules.activation_spec(("batch", "seq", "embed"))

    def local(table_vD, tok_bt):
        v = table_vD.shape[0]
        ids_bt = tok_bt - _local_vocab_range(v)
        mine_bt = (ids_bt >= 0) & (ids_bt < v)
        x_btD = jnp.take(table_vD, jnp.where(mine_bt, ids_bt, 0), axis=0)
        x_btD = jnp.where(mine_bt[..., None], x_btD, jnp.zeros((), x_btD.dtype))
        return jax.lax.psum(x_btD, TENSOR)

    return jax.shard_map(local, mesh=rules.mesh, in_specs=(P(TENSOR, None), tok_spec), out_specs=out_spec)(
        table_VD, tokens_BT
    )


def vocab_parallel_cross_entropy(
    rules: "MeshRules",
    h_BTD: jax.Array,
    head_VD: jax.Array,
    targets_BT: jax.Array,
    mask_BT: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Sum over tokens of (-log p(target), log(Z)^2), each weighted by mask. Logits in fp32.

    Returns scalars replicated on every device; divide by the token count outside.
    """
    tok_spec = rules.activation_spec(("batch", "seq"))
    h_spec = rules.activation_spec(("batch", "seq", "embed"))
    reduce_axes = tuple(a for a in ("data", "expert", "context", TENSOR) if rules.mesh.shape[a] > 1)

    def local(h_btD, w_vD, tgt_bt, m_bt):
        logits_btv = jnp.einsum("btd,vd->btv", h_btD, w_vD, preferred_element_type=jnp.float32)
        v = logits_btv.shape[-1]
        # max is only a shift for stability: no gradient flows through it
        max_bt = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits_btv, axis=-1)), TENSOR)
        sumexp_bt = jax.lax.psum(jnp.sum(jnp.exp(logits_btv - max_bt[..., None]), axis=-1), TENSOR)
        lse_bt = jnp.log(sumexp_bt) + max_bt
        ids_bt = tgt_bt - _local_vocab_range(v)
        mine_bt = (ids_bt >= 0) & (ids_bt < v)
        picked_bt = jnp.take_along_axis(logits_btv, jnp.where(mine_bt, ids_bt, 0)[..., None], axis=-1)[..., 0]
        target_logit_bt = jax.lax.psum(jnp.where(mine_bt, picked_bt, 0.0), TENSOR)
        m_bt = m_bt.astype(jnp.float32)
        nll = jnp.sum((lse_bt - target_logit_bt) * m_bt)
        z = jnp.sum(jnp.square(lse_bt) * m_bt)
        batch_axes = tuple(a for a in reduce_axes if a != TENSOR)
        if batch_axes:
            nll, z = jax.lax.psum(nll, batch_axes), jax.lax.psum(z, batch_axes)
        return nll, z

    return jax.shard_map(
        local,
        mesh=rules.mesh,
        in_specs=(h_spec, P(TENSOR, None), tok_spec, tok_spec),
        out_specs=(P(), P()),
    )(h_BTD, head_VD, targets_BT, mask_BT)
