"""Expert parallelism: experts split over the `expert` mesh axis, tokens sent to them with all_to_all.

Tokens are split over `data` x `expert` (dense layers treat `expert` as more batch); the E experts
over `expert` (E/ep per rank) and, optionally, each expert's MLP width over `tensor`. Inside
`shard_map`, one `all_to_all` over `expert` takes every device's tokens to the ranks holding
their experts and a second one brings the outputs back (GShard, Lepikhin et al. 2020, section
3.2; MaxText's `moe.py`). Ranks along `data` (and `context`) run independent exchanges.
With the MLP width split over `tensor`, each tensor rank computes its slice of every expert and
the down projection is summed with `psum` over `tensor` (Megatron's row-parallel layer).

Capacity mode sends fixed [E, b, C, D] buffers: split on E, joined on the batch.

Dropless mode has data-dependent counts. `jax.lax.ragged_all_to_all` would send exactly them,
but XLA:CPU cannot run it (jaxlib 0.10: "HLO opcode ragged-all-to-all is not supported by
XLA:CPU ThunkEmitter"), so this module uses the padded fallback on every backend: each rank
sends every other rank a buffer of M = b*t*k rows (room for all of its token copies), filled
with the copies for that rank's experts, sorted by expert, then zeros. Exact (nothing drops,
padding rows give zero through `ragged_dot`), but it moves ep x M x D per rank instead of about
M x D and the experts' buffers are ep times larger. The per-expert counts travel with a second,
tiny all_to_all.

Shapes: B batch, T time, D model, E experts (El = E/ep local), C capacity, F MLP width, K top-k;
lower-case b, t: this device's batch rows and sequence positions; M = b*t*K token copies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from picotron_jax.models.moe import ragged_swiglu, sort_by_expert, swiglu_experts

if TYPE_CHECKING:
    from picotron_jax.parallel.sharding import MeshRules

EXPERT, TENSOR = "expert", "tensor"


def _axis(rules: "MeshRules", name: str) -> str | None:
    return name if rules.mesh.shape[name] > 1 else None


def _batch_axes(rules: "MeshRules"):
    axes = tuple(a for a in ("data", "expert") if rules.mesh.shape[a] > 1)
    return axes or None


def _weight_specs(rules: "MeshRules") -> tuple[P, P, P]:
    ep, tp = _axis(rules, EXPERT), _axis(rules, TENSOR)
    return P(ep, None, tp), P(ep, None, tp), P(ep, tp, None)


def expert_parallel_capacity(rules: "MeshRules", x_EBCD: jax.Array, w_gate_EDF, w_up_EDF, w_down_EFD) -> jax.Array:
    """Capacity buffers [E, B, C, D] (batch over data x expert) -> expert outputs, same shape and layout."""
    ep, tp = rules.mesh.shape[EXPERT], rules.mesh.shape[TENSOR]
    x_spec = P(None, _batch_axes(rules), None, None)

    def local(x_EbCD, wg, wu, wd):
        if ep > 1:  # send expert slice j to rank j: [E, b, C, D] -> [E/ep, ep * b, C, D]
            x_EbCD = jax.lax.all_to_all(x_EbCD, EXPERT, split_axis=0, concat_axis=1, tiled=True)
        y = swiglu_experts(x_EbCD, wg, wu, wd)  # project sums its grads like autodiff
        if tp > 1:
            y = jax.lax.psum(y, TENSOR)
        if ep > 1:  # and back: [E/ep, ep * b, C, D] -> [E, b, C, D]
            y = jax.lax.all_to_all(y, EXPERT, split_axis=1, concat_axis=0, tiled=True)
        return y

    return jax.shard_map(local, mesh=rules.mesh, in_specs=(x_spec, *_weight_specs(rules)), out_specs=x_spec)(
        x_EBCD, w_gate_EDF, w_up_EDF, w_down_EFD
    )


def _dropless_exchange(x_sorted_MD, e_sorted_M, sizes_E, wg, wu, wd, ep: int, tp: int):
    """Padded all_to_all round trip of the expert-sorted copies [M, D] -> their expert outputs [M, D]."""
    M, D = x_sorted_MD.shape
    El = sizes_E.shape[0] // ep
    # send: copies for rank j go to rows [0, count_j) of buffer j, in expert order
    dest_M = e_sorted_M // El
    per_dest = jnp.bincount(dest_M, length=ep)
    slot_M = jnp.arange(M) - (jnp.cumsum(per_dest) - per_dest)[dest_M]
    send_PMD = jnp.zeros((ep, M, D), x_sorted_MD.dtype).at[dest_M, slot_M].set(x_sorted_MD)
    recv_PMD = jax.lax.all_to_all(send_PMD, EXPERT, 0, 0, tiled=True)  # [source rank, M, D]
    recv_sizes_PE = jax.lax.all_to_all(sizes_E.reshape(ep, El), EXPERT, 0, 0, tiled=True)  # [source, El]
    # local expert of each received row (El = padding), then one ragged matmul over all sources
    ends_PE = jnp.cumsum(recv_sizes_PE, axis=1)
    local_e = jnp.sum(jnp.arange(M)[None, :, None] >= ends_PE[:, None, :], axis=-1).reshape(ep * M)
    order = jnp.argsort(local_e, stable=True)
    y_rows = ragged_swiglu(recv_PMD.reshape(ep * M, D)[order], jnp.sum(recv_sizes_PE, axis=0), wg, wu, wd)
    y_PMD = y_rows[jnp.argsort(order)].reshape(ep, M, D)
    if tp > 1:
        y_PMD = jax.lax.psum(y_PMD, TENSOR)
    back_PMD = jax.lax.all_to_all(y_PMD, EXPERT, 0, 0, tiled=True)
    return back_PMD[dest_M, slot_M]


def expert_parallel_dropless(rules: "MeshRules", x_BTD: jax.Array, experts_BTK: jax.Array,
                             w_gate_EDF, w_up_EDF, w_down_EFD) -> jax.Array:
    """Tokens [B, T, D] and their experts [B, T, K] -> every copy's expert output [B, T, K, D]."""
    ep, tp = rules.mesh.shape[EXPERT], rules.mesh.shape[TENSOR]
    E = w_gate_EDF.shape[0]
    batch, ctx = _batch_axes(rules), _axis(rules, "context")
    x_spec, e_spec, y_spec = P(batch, ctx, None), P(batch, ctx, None), P(batch, ctx, None, None)

    def local(x_btD, e_btK, wg, wu, wd):
        b, t, D = x_btD.shape
        K = e_btK.shape[-1]
        order_M, token_M, sizes_E = sort_by_expert(e_btK.reshape(b * t, K), E)
        x_sorted_MD = x_btD.reshape(b * t, D)[token_M]
        if ep > 1:
            y_sorted_MD = _dropless_exchange(x_sorted_MD, e_btK.reshape(-1)[order_M], sizes_E, wg, wu, wd, ep, tp)
        else:
            y_sorted_MD = ragged_swiglu(x_sorted_MD, sizes_E, wg, wu, wd)
            if tp > 1:
                y_sorted_MD = jax.lax.psum(y_sorted_MD, TENSOR)
        return y_sorted_MD[jnp.argsort(order_M)].reshape(b, t, K, D)

    return jax.shard_map(local, mesh=rules.mesh, in_specs=(x_spec, e_spec, *_weight_specs(rules)),
                         out_specs=y_spec)(x_BTD, experts_BTK, w_gate_EDF, w_up_EDF, w_down_EFD)
