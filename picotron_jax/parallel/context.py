"""Context parallelism: ring attention over the `context` mesh axis, causally load-balanced.

The sequence is split over `context` (c devices). Each device keeps its queries; the K/V blocks
travel around the ring with `ppermute` (device d sends to d+1), and after step s device i holds
the block of device j = i - s (mod c). The ring is double-buffered: a step sends the next block on
before computing on the one it holds, and none of its matmuls wait for that transfer. Each step's block attention is merged into the running
output with the online softmax of flash attention (Milakov & Gimelshein 2018; Dao et al. 2022):
the output is kept normalised together with its per-row log-sum-exp, and
    lse' = logaddexp(lse, lse_blk),  o' = o exp(lse - lse') + o_blk exp(lse_blk - lse').
Ring attention: Liu et al. 2023, "Ring Attention with Blockwise Transformers"; picotron's
`context_parallel.py` (whose causal load balancing is a TODO).

Causal load balancing ("zigzag", as in Megatron-LM's context parallelism and zhuzilin's
ring-flash-attention): the sequence is cut into 2c chunks and device i holds chunks i and
2c-1-i. Then for every visiting block j != i exactly half of the query x key pairs are causal
(j < i: all queries x the first K/V chunk; j > i: the second query chunk x all K/V), so every
device computes the same number of blocks. With the contiguous layout, blocks above the
diagonal (j > i) are skipped and device c-1 computes c blocks while device 0 computes one.

The permutation is a column permutation of the [batch, seq] token arrays done once per step
(`sequence_order`, applied by train/step.py); rotary positions follow the same order, and the
loss is a masked sum over tokens, so it does not change. Blocks are laid out so that the causal
mask of the diagonal block is the plain lower triangle in both layouts.

Backward: a custom VJP that runs the ring again (K, V and their gradient accumulators travel
together; one last shift brings dK/dV home), recomputing each block's probabilities from the
saved log-sum-exp. Residuals are q, k, v, o and lse of the local block only, so memory stays
per block, never per sequence.

Shapes: B batch, T sequence, H query heads, G KV heads, R = H/G, K head dim; lower-case b, n
are the local (per-device) batch and sequence lengths inside `shard_map`.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from picotron_jax.models.attention import NEG_INF, causal_attention
from picotron_jax.parallel.sharding import MeshRules, sequence_order, zigzag_order  # noqa: F401 (the layout)

CONTEXT = "context"
F32 = jnp.float32


# ------------------------------------------------------------------------------ block kernels


def _scores(q_bnGRK, k_bmGK):
    scale = q_bnGRK.shape[-1] ** -0.5
    return jnp.einsum("bngrk,bmgk->bgrnm", q_bnGRK, k_bmGK, preferred_element_type=F32) * scale


def _rows(x_bgrn):
    """[b, g, r, n] -> [b, n, g, r, 1], to scale an output [b, n, g, r, k] row by row."""
    return jnp.transpose(x_bgrn, (0, 3, 1, 2))[..., None]


def _block_attend(q_bnGRK, k_bmGK, v_bmGK, causal: bool):
    """Attention of these queries over these keys only: (normalised output f32, lse [b, g, r, n])."""
    s_bgrnm = _scores(q_bnGRK, k_bmGK)
    if causal:
        n = s_bgrnm.shape[-1]
        s_bgrnm = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s_bgrnm, NEG_INF)
    m_bgrn = jnp.max(s_bgrnm, axis=-1)
    p_bgrnm = jnp.exp(s_bgrnm - m_bgrn[..., None])
    l_bgrn = jnp.sum(p_bgrnm, axis=-1)
    o_bnGRK = jnp.einsum("bgrnm,bmgk->bngrk", p_bgrnm.astype(v_bmGK.dtype), v_bmGK, preferred_element_type=F32)
    return o_bnGRK / _rows(l_bgrn), m_bgrn + jnp.log(l_bgrn)


def _merge(o, lse, o_blk, lse_blk):
    """Online-softmax merge of two normalised partial attentions over disjoint key sets."""
    new = jnp.logaddexp(lse, lse_blk)
    return o * _rows(jnp.exp(lse - new)) + o_blk * _rows(jnp.exp(lse_blk - new)), new


def _block_grads(q, k, v, do, lse, delta, causal: bool):
    """Flash-attention backward for one block, probabilities recomputed from the final lse."""
    s = _scores(q, k)
    if causal:
        n = s.shape[-1]
        s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, NEG_INF)
    p = jnp.exp(s - lse[..., None])  # [b, g, r, n, m]
    dv = jnp.einsum("bgrnm,bngrk->bmgk", p.astype(do.dtype), do, preferred_element_type=F32)
    dp = jnp.einsum("bngrk,bmgk->bgrnm", do, v, preferred_element_type=F32)
    ds = p * (dp - delta[..., None]) * (q.shape[-1] ** -0.5)
    dq = jnp.einsum("bgrnm,bmgk->bngrk", ds.astype(k.dtype), k, preferred_element_type=F32)
    dk = jnp.einsum("bgrnm,bngrk->bmgk", ds.astype(q.dtype), q, preferred_element_type=F32)
    return dq, dk, dv


# ------------------------------------------------------------------------------ the ring


def _shift(xs, c: int):
    """Every device passes its blocks to the next one on the ring."""
    return jax.lax.ppermute(xs, CONTEXT, [(d, (d + 1) % c) for d in range(c)])


def _ring_forward(q, k, v, c: int, zigzag: bool):
    """Local queries over all K/V blocks of the ring: (o f32 [b,n,g,r,k], lse [b,g,r,n], work).

    Double-buffered: the block for the next step is sent on (`ppermute`) before this step's block is
    computed on, and nothing this step computes waits for it, so the transfer can overlap the compute.
    `work` counts the query x key pairs this device scored (for the balance measurement)."""
    i = jax.lax.axis_index(CONTEXT)
    n = q.shape[1]
    h = n // 2
    kv = _shift((k, v), c)  # block i-1, in flight while the diagonal is computed
    o, lse = _block_attend(q, k, v, causal=True)  # step 0: own block (the diagonal)
    work = jnp.asarray(n * n, F32)

    def below(o, lse, work, k, v):  # j < i: every key is in the past
        if zigzag:  # ... of both query chunks, but only the first K/V chunk is
            ob, lb = _block_attend(q, k[:, :h], v[:, :h], causal=False)
            return (*_merge(o, lse, ob, lb), work + n * h)
        ob, lb = _block_attend(q, k, v, causal=False)
        return (*_merge(o, lse, ob, lb), work + n * n)

    def above(o, lse, work, k, v):  # j > i
        if zigzag:  # only the second query chunk sees them, and sees all of them
            ob, lb = _block_attend(q[:, h:], k, v, causal=False)
            o2, l2 = _merge(o[:, h:], lse[..., h:], ob, lb)
            return (jnp.concatenate([o[:, :h], o2], axis=1), jnp.concatenate([lse[..., :h], l2], axis=-1),
                    work + h * n)
        return o, lse, work  # entirely in the future: skipped

    def compute(o, lse, work, kv, s):
        j = (i - s) % c
        return jax.lax.cond(j < i, below, above, o, lse, work, *kv)

    def step(carry, s):
        o, lse, work, kv = carry
        kv_next = _shift(kv, c)  # sent on before, and independent of, this step's compute
        o, lse, work = compute(o, lse, work, kv, s)
        return (o, lse, work, kv_next), None

    (o, lse, work, kv), _ = jax.lax.scan(step, (o, lse, work, kv), jnp.arange(1, c - 1))
    o, lse, work = compute(o, lse, work, kv, c - 1)  # the last block: nothing left to send
    return o, lse, work


def _ring_backward(q, k, v, o, lse, do, c: int, zigzag: bool):
    """Second trip round the ring: dQ stays home; K, V and the dK/dV accumulators travel, then dK/dV
    shift home. Double-buffered like the forward: the next K/V block and the accumulator of the block
    computed last step are in flight while this step's block gradients are computed; the arriving
    accumulator is only added to them afterwards."""
    i = jax.lax.axis_index(CONTEXT)
    h = q.shape[1] // 2
    delta = jnp.einsum("bngrk,bngrk->bgrn", do.astype(F32), o)  # rowsum(dO * O)
    kv = _shift((k, v), c)
    dq, dk, dv = _block_grads(q, k, v, do, lse, delta, causal=True)

    def below(dq, k, v):  # -> dq, and this block's dk, dv contributions
        if zigzag:
            a, b, e = _block_grads(q, k[:, :h], v[:, :h], do, lse, delta, causal=False)
            pad = lambda x: jnp.concatenate([x, jnp.zeros_like(x)], axis=1)  # noqa: E731
            return dq + a, pad(b), pad(e)
        a, b, e = _block_grads(q, k, v, do, lse, delta, causal=False)
        return dq + a, b, e

    def above(dq, k, v):
        if zigzag:
            a, b, e = _block_grads(q[:, h:], k, v, do[:, h:], lse[..., h:], delta[..., h:], causal=False)
            return dq.at[:, h:].add(a), b, e
        return dq, jnp.zeros_like(k, F32), jnp.zeros_like(v, F32)

    def compute(dq, kv, dkv_in, s):
        j = (i - s) % c
        dq, b, e = jax.lax.cond(j < i, below, above, dq, *kv)
        return dq, (dkv_in[0] + b, dkv_in[1] + e)

    def step(carry, s):
        dq, kv, dkv = carry
        kv_next = _shift(kv, c)
        dkv_in = _shift(dkv, c)  # this block's accumulator, from the device that computed on it last step
        dq, dkv = compute(dq, kv, dkv_in, s)
        return (dq, kv_next, dkv), None

    (dq, kv, dkv), _ = jax.lax.scan(step, (dq, kv, (dk, dv)), jnp.arange(1, c - 1))
    dq, dkv = compute(dq, kv, _shift(dkv, c), c - 1)
    dk, dv = _shift(dkv, c)  # block j's gradients are on device j-1: one more step home
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _ring_attention_local(q, k, v, c: int, zigzag: bool):
    o, _, _ = _ring_forward(q, k, v, c, zigzag)
    return o.astype(q.dtype)


def _ring_attention_fwd(q, k, v, c, zigzag):
    o, lse, _ = _ring_forward(q, k, v, c, zigzag)
    return o.astype(q.dtype), (q, k, v, o, lse)


def _ring_attention_bwd(c, zigzag, residuals, do):
    q, k, v, o, lse = residuals
    dq, dk, dv = _ring_backward(q, k, v, o, lse, do, c, zigzag)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_ring_attention_local.defvjp(_ring_attention_fwd, _ring_attention_bwd)


# ------------------------------------------------------------------------------ entry points


def _specs_and_kv(rules: MeshRules, q_BTHK, k_BTGK, v_BTGK):
    """Partition specs (batch over data/expert, seq over context, heads over tensor). When the KV
    heads do not divide by `tensor` (e.g. 4 KV heads on tensor=8) they are repeated up to `tensor`
    heads first, so each rank gets exactly the KV head its query heads use (Megatron replicates
    KV heads the same way)."""
    tp = rules.mesh.shape["tensor"]
    G = k_BTGK.shape[2]
    if G % tp:
        k_BTGK, v_BTGK = (jnp.repeat(x, tp // G, axis=2) for x in (k_BTGK, v_BTGK))
    q_spec = rules.activation_spec(("batch", "seq", "heads", "head_dim"), q_BTHK.shape)
    kv_spec = rules.activation_spec(("batch", "seq", "kv_heads", "head_dim"), k_BTGK.shape)
    if q_spec[1] != CONTEXT or kv_spec[1] != CONTEXT:
        raise ValueError(f"ring attention needs the sequence ({q_BTHK.shape[1]}) split over context; got {q_spec}")
    return q_spec, kv_spec, k_BTGK, v_BTGK


def _grouped(q_bnHK, g: int):
    b, n, hl, K = q_bnHK.shape
    return q_bnHK.reshape(b, n, g, hl // g, K)


def ring_attention(rules: MeshRules, q_BTHK: jax.Array, k_BTGK: jax.Array, v_BTGK: jax.Array,
                   zigzag: bool = True) -> jax.Array:
    """Causal GQA attention with the sequence split over `context`, in the layout of
    `sequence_order(T, c, zigzag)` (q, k, v already rotated with the matching positions)."""
    c = rules.mesh.shape[CONTEXT]
    q_spec, kv_spec, k_BTGK, v_BTGK = _specs_and_kv(rules, q_BTHK, k_BTGK, v_BTGK)

    def local(q_bnHK, k_bnGK, v_bnGK):
        o = _ring_attention_local(_grouped(q_bnHK, k_bnGK.shape[2]), k_bnGK, v_bnGK, c, zigzag)
        return o.reshape(q_bnHK.shape)

    return jax.shard_map(local, mesh=rules.mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec)(
        q_BTHK, k_BTGK, v_BTGK
    )


def context_attention(rules: MeshRules, q_BTHK: jax.Array, k_BTGK: jax.Array, v_BTGK: jax.Array) -> jax.Array:
    """`MeshOps.attention` (parallel/ops.py): the ring when the sequence is split over `context`, else the fused kernel."""
    if rules.mesh.shape[CONTEXT] == 1:
        return causal_attention(q_BTHK, k_BTGK, v_BTGK)
    return ring_attention(rules, q_BTHK, k_BTGK, v_BTGK, zigzag=rules.context_zigzag)


def ring_attention_work(rules: MeshRules, q_BTHK, k_BTGK, v_BTGK, zigzag: bool = True) -> jax.Array:
    """Query x key pairs scored by each context rank in the forward ring: [c] (balance measurement;
    the backward ring takes the same branches, so it has the same balance)."""
    c = rules.mesh.shape[CONTEXT]
    q_spec, kv_spec, k_BTGK, v_BTGK = _specs_and_kv(rules, q_BTHK, k_BTGK, v_BTGK)
    others = tuple(a for a in rules.mesh.axis_names if a != CONTEXT)

    def local(q_bnHK, k_bnGK, v_bnGK):
        _, _, work = _ring_forward(_grouped(q_bnHK, k_bnGK.shape[2]), k_bnGK, v_bnGK, c, zigzag)
        return jax.lax.pmax(work, others)[None]  # the same on every rank of the other axes

    return jax.shard_map(local, mesh=rules.mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=P(CONTEXT))(
        q_BTHK, k_BTGK, v_BTGK
    )


def gathered_kv_attention(q_bnHK: jax.Array, k_bnGK: jax.Array, v_bnGK: jax.Array,
                          positions_n: jax.Array, positions_T: jax.Array) -> jax.Array:
    """Causal attention of this context rank's queries [b, n, H', K] over the keys and values of every rank,
    all-gathered over `context` ("all-gather" context parallelism, as Llama 3 trains long context: Dubey et
    al. 2024, section 3.3.2), from inside a `shard_map` already manual over `context`. Causality comes from
    the columns' positions (`positions_n`: this rank's, `positions_T`: all ranks' in rank order, i.e. the run's
    layout `MeshRules.sequence_order`), so both layouts work; the
    gather's transpose reduce-scatters dK and dV. Memory: the sequence's K/V [b, T, G', K] and n x T scores.

    The pipeline's stage program uses it (parallel/ops.py StageOps): its F and B run under a `lax.cond`
    that differs between pipe ranks, and XLA:CPU's collective-permute (the ring's transfer) waits for every
    device of the program, so a ring inside the cond hangs or pairs up transfers of different slots;
    all-gather and reduce-scatter wait only for their group."""
    k_bTGK, v_bTGK = (jax.lax.all_gather(t, CONTEXT, axis=1, tiled=True) for t in (k_bnGK, v_bnGK))
    mask_nT = positions_n[:, None] >= positions_T[None, :]
    return jax.nn.dot_product_attention(q_bnHK, k_bTGK, v_bTGK, mask=mask_nT[None, None])
