"""Expert parallelism: experts split over the `expert` mesh axis, tokens sent to them with all_to_all.

Tokens are split over the batch axes, `data` x `expert` (dense layers treat `expert` as more batch); the E experts
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
padding rows give zero through the grouped matmul), but it moves ep x M x D per rank instead of about
M x D and the experts' buffers are ep times larger. The per-expert counts travel with a second,
tiny all_to_all.

Shapes: B batch, T time, D model, E experts (El = E/ep local), C capacity, F MLP width, K top-k;
lower-case b, t: this device's batch rows and sequence positions; M = b*t*K token copies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from picotron_jax.models.moe import Routing, route, sort_by_expert, swiglu_experts
from picotron_jax.models.moe_grouped import grouped_swiglu
from picotron_jax.parallel.sharding import MeshRules


def _one(axes: tuple[str, ...]) -> str | None:
    """The single mesh axis a logical axis is split over (None when unsplit)."""
    if len(axes) > 1:
        raise ValueError(f"expert parallelism expects one mesh axis per logical axis, got {axes}")
    return axes[0] if axes else None


def expert_axes(rules: MeshRules) -> tuple[str | None, str | None]:
    """(the axis experts are split over, the axis each expert's MLP width is split over), from the rules."""
    return _one(rules.mesh_axes("experts")), _one(rules.mesh_axes("mlp"))


def _weight_specs(rules: MeshRules) -> tuple[P, P, P]:
    ep, tp = expert_axes(rules)
    return P(ep, None, tp), P(ep, None, tp), P(ep, tp, None)


def capacity_local(x_EbCD, wg, wu, wd, ep: str | None, tp: str | None) -> jax.Array:
    """Inside a shard_map manual over `ep` and `tp`: this device's capacity buffers [E, b, C, D] through
    the experts (E/ep of them here, each with F/tp of its MLP width), back in the same layout."""
    if ep is not None:  # send expert slice j to rank j: [E, b, C, D] -> [E/ep, ep * b, C, D]
        x_EbCD = jax.lax.all_to_all(x_EbCD, ep, split_axis=0, concat_axis=1, tiled=True)
    y = swiglu_experts(x_EbCD, wg, wu, wd)  # project sums its grads like autodiff
    if tp is not None:
        y = jax.lax.psum(y, tp)
    if ep is not None:  # and back: [E/ep, ep * b, C, D] -> [E, b, C, D]
        y = jax.lax.all_to_all(y, ep, split_axis=1, concat_axis=0, tiled=True)
    return y


def expert_parallel_capacity(rules: MeshRules, x_EBCD: jax.Array, w_gate_EDF, w_up_EDF, w_down_EFD) -> jax.Array:
    """Capacity buffers [E, B, C, D] (batch over the batch axes) -> expert outputs, same shape and layout."""
    ep, tp = expert_axes(rules)
    x_spec = P(None, rules.mesh_axes("batch") or None, None, None)
    local = lambda x, wg, wu, wd: capacity_local(x, wg, wu, wd, ep, tp)  # noqa: E731
    return jax.shard_map(local, mesh=rules.mesh, in_specs=(x_spec, *_weight_specs(rules)), out_specs=x_spec)(
        x_EBCD, w_gate_EDF, w_up_EDF, w_down_EFD
    )


def _dropless_exchange(x_sorted_MD, e_sorted_M, sizes_E, wg, wu, wd, ep_axis: str, ep: int, tp: str | None):
    """Padded all_to_all round trip of the expert-sorted copies [M, D] -> their expert outputs [M, D]."""
    M, D = x_sorted_MD.shape
    El = sizes_E.shape[0] // ep
    # send: copies for rank j go to rows [0, count_j) of buffer j, in expert order
    dest_M = e_sorted_M // El
    per_dest = jnp.bincount(dest_M, length=ep)
    slot_M = jnp.arange(M) - (jnp.cumsum(per_dest) - per_dest)[dest_M]
    send_PMD = jnp.zeros((ep, M, D), x_sorted_MD.dtype).at[dest_M, slot_M].set(x_sorted_MD)
    recv_PMD = jax.lax.all_to_all(send_PMD, ep_axis, 0, 0, tiled=True)  # [source rank, M, D]
    recv_sizes_PE = jax.lax.all_to_all(sizes_E.reshape(ep, El), ep_axis, 0, 0, tiled=True)  # [source, El]
    # local expert of each received row (El = padding), then one ragged matmul over all sources
    ends_PE = jnp.cumsum(recv_sizes_PE, axis=1)
    local_e = jnp.sum(jnp.arange(M)[None, :, None] >= ends_PE[:, None, :], axis=-1).reshape(ep * M)
    order = jnp.argsort(local_e, stable=True)
    y_rows = grouped_swiglu(recv_PMD.reshape(ep * M, D)[order], jnp.sum(recv_sizes_PE, axis=0), wg, wu, wd)
    y_PMD = y_rows[jnp.argsort(order)].reshape(ep, M, D)
    if tp is not None:
        y_PMD = jax.lax.psum(y_PMD, tp)
    back_PMD = jax.lax.all_to_all(y_PMD, ep_axis, 0, 0, tiled=True)
    return back_PMD[dest_M, slot_M]


def dropless_local(x_btD, e_btK, wg, wu, wd, num_experts: int, ep: str | None, tp: str | None) -> jax.Array:
    """Inside a shard_map manual over `ep` and `tp`: this device's tokens [b, t, D] and their experts
    [b, t, K] -> every copy's expert output [b, t, K, D]."""
    b, t, D = x_btD.shape
    K = e_btK.shape[-1]
    order_M, token_M, sizes_E = sort_by_expert(e_btK.reshape(b * t, K), num_experts)
    x_sorted_MD = x_btD.reshape(b * t, D)[token_M]
    ep_size = jax.lax.axis_size(ep) if ep is not None else 1
    if ep_size > 1:
        y_sorted_MD = _dropless_exchange(x_sorted_MD, e_btK.reshape(-1)[order_M], sizes_E, wg, wu, wd, ep,
                                         ep_size, tp)
    else:
        y_sorted_MD = grouped_swiglu(x_sorted_MD, sizes_E, wg, wu, wd)
        if tp is not None:
            y_sorted_MD = jax.lax.psum(y_sorted_MD, tp)
    return y_sorted_MD[jnp.argsort(order_M)].reshape(b, t, K, D)


def expert_parallel_dropless(rules: MeshRules, x_BTD: jax.Array, experts_BTK: jax.Array,
                             w_gate_EDF, w_up_EDF, w_down_EFD) -> jax.Array:
    """Tokens [B, T, D] and their experts [B, T, K] -> every copy's expert output [B, T, K, D]."""
    ep, tp = expert_axes(rules)
    E = w_gate_EDF.shape[0]
    batch, seq = rules.mesh_axes("batch") or None, rules.mesh_axes("seq") or None
    x_spec, e_spec, y_spec = P(batch, seq, None), P(batch, seq, None), P(batch, seq, None, None)
    local = lambda x, e, wg, wu, wd: dropless_local(x, e, wg, wu, wd, E, ep, tp)  # noqa: E731
    return jax.shard_map(local, mesh=rules.mesh, in_specs=(x_spec, e_spec, *_weight_specs(rules)),
                         out_specs=y_spec)(x_BTD, experts_BTK, w_gate_EDF, w_up_EDF, w_down_EFD)


def local_routing(rules: MeshRules, h_BTD: jax.Array, router_DE: jax.Array, bias_E: jax.Array | None,
                  cfg) -> Routing:
    """`models/moe.py:route` on each device's own tokens: a shard_map over the token axes (batch, seq),
    router weights and bias replicated (their gradients are summed over those axes by autodiff)."""
    tok = P(rules.mesh_axes("batch") or None, rules.mesh_axes("seq") or None, None)
    if bias_E is None:
        local = lambda h, w: route(h, w, None, cfg)  # noqa: E731
        args, in_specs = (h_BTD, router_DE), (tok, P())
    else:
        local = lambda h, w, b: route(h, w, b, cfg)  # noqa: E731
        args, in_specs = (h_BTD, router_DE, bias_E), (tok, P(), P())
    return jax.shard_map(local, mesh=rules.mesh, in_specs=in_specs, out_specs=Routing(*(tok,) * 5))(*args)
