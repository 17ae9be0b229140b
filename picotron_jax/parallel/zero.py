"""ZeRO's gradient reduction as a reduce-scatter over `data` (Rajbhandari et al. 2020, ZeRO, sec. 5).

Under plain GSPMD the gradients of a data-parallel step are all-reduced: XLA's partitioner sums the
per-rank partial gradients where the weight-gradient dots contract the batch, and a ZeRO layout only
slices the sum afterwards (XLA:CPU has no pass that fuses the two into a reduce-scatter). ZeRO needs
each rank to receive only the 1/data slice of the sum that its optimizer shard updates.

So the step computes the gradient sums of each `data` rank's rows as their own group: the batch
[B, T] is reshaped to [G = data, B/G, T] and the loss-and-gradient function is `vmap`ped over G with
`spmd_axis_name=data` (each rank computes its group, no traffic), giving unreduced gradients
[G, ...]. One `shard_map` then `psum_scatter`s each of them over `data` on the dimension ZeRO shards
(`embed`), which is the only gradient collective over `data` in the step. The sums are the same as
before, added in a different order (fp32 round-off only; tests/test_layouts.py's parity holds).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from picotron_jax.parallel.sharding import LOGICAL_RULES, ZERO_AXIS, ZERO_RULES, MeshRules, _map_axes, logical_to_spec


def reduce_scatters(cfg, rules: MeshRules) -> bool:
    """Whether this step reduces its gradients with a reduce-scatter: ZeRO over a `data` axis > 1 in
    the plain step. The pipeline keeps its own reduction (parallel/pipeline.py); MoE layers keep the
    all-reduce, because their balancing losses are means over a whole microbatch, not sums over groups;
    so does context parallelism: ring attention's shard_map, vmapped over the groups, mixes its ring
    position (varying over `context` only) with data-varying blocks, which JAX 0.10's checks refuse."""
    return rules.zero_stage >= 1 and rules.mesh.shape[ZERO_AXIS] > 1 and not rules.mesh_axes("layers") \
        and not rules.mesh_axes("seq") and not cfg.moe.enabled


def group_rules(rules: MeshRules) -> MeshRules:
    """The rules inside one data group: the batch is no longer split over `data` (the group axis is)."""
    return dataclasses.replace(rules, data_groups=True)


def split_data_groups(batch: dict, rules: MeshRules) -> dict:
    """[B, T] -> [G, B/G, T], group g = the contiguous rows that `data` rank g holds: no traffic."""
    groups = rules.mesh.shape[ZERO_AXIS]
    inner = group_rules(rules).activation_spec(("batch", "seq"))

    def split(x_BT):
        x_GbT = x_BT.reshape(groups, x_BT.shape[0] // groups, *x_BT.shape[1:])
        return jax.lax.with_sharding_constraint(x_GbT, rules.named(P(ZERO_AXIS, *inner)))

    return jax.tree.map(split, batch)


def group_param_specs(rules: MeshRules, logical_axes: Any, shapes: Any) -> Any:
    """A group's gradient layout: the parameters' model-parallel split, whole over `data`."""
    return _map_axes(lambda ax, sh: logical_to_spec(ax, rules.mesh, LOGICAL_RULES, sh.shape), logical_axes, shapes)


def reduce_scatter_groups(rules: MeshRules, grads_G: Any, logical_axes: Any, shapes: Any) -> Any:
    """Unreduced per-group gradients [G, ...] -> their sum over G, in ZeRO's layout (`embed` over
    `data`): one psum_scatter per parameter; a parameter without a data-split dimension is psummed."""
    in_specs = jax.tree.map(lambda s: P(ZERO_AXIS, *s), group_param_specs(rules, logical_axes, shapes),
                            is_leaf=lambda x: isinstance(x, P))
    out_specs = _map_axes(lambda ax, sh: logical_to_spec(ax, rules.mesh, ZERO_RULES, sh.shape), logical_axes, shapes)

    def reduce(out_spec: P, g_1X):
        dims = [d for d, s in enumerate(out_spec) if s == ZERO_AXIS or (isinstance(s, tuple) and ZERO_AXIS in s)]
        if not dims:
            return jax.lax.psum(g_1X[0], ZERO_AXIS)
        return jax.lax.psum_scatter(g_1X[0], ZERO_AXIS, scatter_dimension=dims[0], tiled=True)

    def local(g):
        return jax.tree.map(reduce, out_specs, g, is_leaf=lambda x: isinstance(x, P))

    return jax.shard_map(local, mesh=rules.mesh, in_specs=(in_specs,), out_specs=out_specs)(grads_G)
