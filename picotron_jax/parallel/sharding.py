"""One table maps logical axis names to mesh axes; everything else derives shardings from it.

Parameters and activations carry logical names (`embed`, `heads`, `mlp`, ...). Data and tensor
parallelism are nothing but these rules; ZeRO adds `embed -> data` for the optimizer state
(stage 1) or for the parameters too (stage 3, FSDP), as in MaxText's `fsdp` axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# logical axis -> mesh axes (a tuple means split over their product, outer axis first)
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "expert"),  # dense layers treat `expert` as more batch
    "seq": ("context",),
    "embed": (),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "layers": ("pipe",),  # pipeline stages hold consecutive layers (parallel/pipeline.py)
    "experts": ("expert",),
    "stage": ("pipe",),
}
# ZeRO: parameters (stage 3) / optimizer state (stages 1 and 3) are additionally split over `data`.
ZERO_RULES: dict[str, tuple[str, ...]] = {**LOGICAL_RULES, "embed": ("data",)}

BATCH_AXES = LOGICAL_RULES["batch"]


def logical_to_spec(
    axes: tuple[str | None, ...], mesh: Mesh, rules: dict[str, tuple[str, ...]], shape: tuple[int, ...] | None = None
) -> P:
    """Logical names -> PartitionSpec. A dimension that does not divide by its mesh axes, or a mesh
    axis already used by an earlier dimension, stays unsplit (replicated) instead of failing."""
    used: set[str] = set()
    out = []
    for dim, name in enumerate(axes):
        mesh_axes = tuple(a for a in (rules.get(name, ()) if name else ()) if a not in used and mesh.shape[a] > 1)
        ways = 1
        for a in mesh_axes:
            ways *= mesh.shape[a]
        if not mesh_axes or (shape is not None and shape[dim] % ways):
            out.append(None)
            continue
        used.update(mesh_axes)
        out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*out)


@dataclass(frozen=True)
class MeshRules:
    """The mesh plus the ZeRO stage: the one place that turns logical axes into shardings.

    `context_zigzag`: with context > 1, the sequence is in the load-balanced zigzag layout of
    `parallel/context.py` (train.context_zigzag; train/step.py lays the batch out to match)."""

    mesh: Mesh
    zero_stage: int = 0
    context_zigzag: bool = True

    @classmethod
    def from_config(cls, mesh: Mesh, cfg) -> "MeshRules":
        return cls(mesh, cfg.train.zero_stage, cfg.train.context_zigzag)

    def named(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    # -- parameters and optimizer state ------------------------------------------------------
    def param_specs(self, logical_axes: Any, shapes: Any) -> Any:
        rules = ZERO_RULES if self.zero_stage >= 3 else LOGICAL_RULES
        return _map_axes(lambda ax, sh: logical_to_spec(ax, self.mesh, rules, sh.shape), logical_axes, shapes)

    def opt_param_specs(self, logical_axes: Any, shapes: Any) -> Any:
        rules = ZERO_RULES if self.zero_stage >= 1 else LOGICAL_RULES
        return _map_axes(lambda ax, sh: logical_to_spec(ax, self.mesh, rules, sh.shape), logical_axes, shapes)

    def param_shardings(self, logical_axes: Any, shapes: Any) -> Any:
        return jax.tree.map(self.named, self.param_specs(logical_axes, shapes))

    def opt_state_shardings(self, tx: optax.GradientTransformation, abstract_opt_state: Any,
                            logical_axes: Any, shapes: Any) -> Any:
        """Moments shaped like parameters follow `opt_param_specs`; counters etc. are replicated."""
        specs = self.opt_param_specs(logical_axes, shapes)
        # tree_map_params maps over leaves shaped like params; everything else -> replicated.
        return optax.tree_map_params(
            tx,
            lambda _, spec: self.named(spec),
            abstract_opt_state,
            specs,
            transform_non_params=lambda _: self.named(P()),
            is_leaf=lambda x: isinstance(x, P),
        )

    # -- activations and batches -------------------------------------------------------------
    def activation_spec(self, axes: tuple[str | None, ...], shape: tuple[int, ...] | None = None) -> P:
        return logical_to_spec(axes, self.mesh, LOGICAL_RULES, shape)

    def constrain(self, x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
        """Pin an activation's layout. A dimension that does not divide (e.g. 4 KV heads on
        tensor=8) stays replicated: those ranks recompute it, as Megatron replicates KV heads."""
        return jax.lax.with_sharding_constraint(x, self.named(self.activation_spec(axes, x.shape)))

    def batch_sharding(self) -> NamedSharding:
        """[batch, seq] token arrays: rows over data x expert, sequence over context."""
        return self.named(self.activation_spec(("batch", "seq")))

    def embed(self, table_VD: jax.Array, tokens_BT: jax.Array) -> jax.Array:
        from picotron_jax.parallel.vocab import vocab_parallel_embed

        return vocab_parallel_embed(self, table_VD, tokens_BT)

    def attention(self, q_BTHK: jax.Array, k_BTGK: jax.Array, v_BTGK: jax.Array) -> jax.Array:
        """Causal attention; with the sequence split over `context`, ring attention."""
        from picotron_jax.parallel.context import context_attention

        return context_attention(self, q_BTHK, k_BTGK, v_BTGK)

    def capacity_experts(self, x_EBCD, w_gate, w_up, w_down):
        """MoE capacity buffers through their experts, experts split over `expert` (parallel/expert.py)."""
        from picotron_jax.parallel.expert import expert_parallel_capacity

        return expert_parallel_capacity(self, x_EBCD, w_gate, w_up, w_down)

    def dropless_experts(self, x_BTD, experts_BTK, w_gate, w_up, w_down):
        """MoE token copies through their experts without drops (parallel/expert.py)."""
        from picotron_jax.parallel.expert import expert_parallel_dropless

        return expert_parallel_dropless(self, x_BTD, experts_BTK, w_gate, w_up, w_down)

    def sum_partials(self, y: jax.Array) -> jax.Array:
        """Row-parallel partial sums: XLA inserts the all-reduce over `tensor` from the shardings."""
        return y

    def sequence_order(self, seq_len: int):
        """Natural position of each sequence column in this layout (numpy; arange unless zigzag)."""
        from picotron_jax.parallel.context import sequence_order

        return sequence_order(seq_len, self.mesh.shape["context"], self.context_zigzag)


def _map_axes(fn, logical_axes: Any, shapes: Any) -> Any:
    return jax.tree.map(fn, logical_axes, shapes, is_leaf=lambda x: isinstance(x, tuple))


def bytes_per_device(shapes: Any, shardings: Any) -> int:
    """Bytes one device holds for arrays with these shapes under these shardings."""
    total = 0
    for sds, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
        total += jnp.dtype(sds.dtype).itemsize * math.prod(sh.shard_shape(sds.shape))
    return total
