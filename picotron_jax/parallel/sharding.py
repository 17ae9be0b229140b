"""One table maps logical axis names to mesh axes; everything else derives shardings from it.

Only layouts live here (specs, shardings, the sequence order of context parallelism); the model's
parallel operations that need code (vocabulary-parallel embedding, ring attention, expert
all-to-alls) are in `parallel/ops.py`, which reads its axes from this table.

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
import numpy as np
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
(ZERO_AXIS,) = ZERO_RULES["embed"]  # the axis ZeRO shards over and reduce-scatters gradients on (parallel/zero.py)
(TENSOR,) = LOGICAL_RULES["kv_heads"]
# KV heads fewer than tensor ranks: the tensor axis seen as (kv_groups, kv_copies), see `kv_head_mesh`
KV_GROUPS, KV_COPIES = "kv_groups", "kv_copies"


def kv_head_mesh(mesh: Mesh, kv_heads: int) -> Mesh | None:
    """The mesh on which G KV heads split over `tensor` = t > G ranks (t a multiple of G, as config
    validation requires): the same devices with `tensor` split into (kv_groups = G, kv_copies = t/G),
    so tensor ranks g*t/G .. (g+1)*t/G - 1, the ranks whose query heads use KV head g, hold head g
    (Megatron's replicated KV heads: each rank holds 1/G of wk and wv, not all of them). None when
    G divides by t (the plain rule splits it) or t == 1."""
    t = mesh.shape[TENSOR]
    if t == 1 or kv_heads % t == 0 or t % kv_heads:
        return None
    if mesh.axis_names[-1] != TENSOR:
        raise ValueError(f"the tensor axis must be the innermost mesh axis, got {mesh.axis_names}")
    names = mesh.axis_names[:-1]
    inner = mesh.devices.reshape(*(mesh.shape[a] for a in names), kv_heads, t // kv_heads)
    return Mesh(inner, (*names, KV_GROUPS, KV_COPIES))


def _kv_rules(rules: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """The rules on `kv_head_mesh`: kv_heads over the groups; nothing else names `tensor` there."""
    return {k: (KV_GROUPS,) if k == "kv_heads" else tuple(a for a in v if a != TENSOR) for k, v in rules.items()}


def sharding_for(mesh: Mesh, axes: tuple[str | None, ...], shape: tuple[int, ...],
                 rules: dict[str, tuple[str, ...]]) -> NamedSharding:
    """The sharding of an array with these logical axes: on the mesh, or on `kv_head_mesh` for an
    array with KV heads fewer than the tensor ranks."""
    if "kv_heads" in axes and (kv := kv_head_mesh(mesh, shape[axes.index("kv_heads")])) is not None:
        return NamedSharding(kv, logical_to_spec(axes, kv, _kv_rules(rules), shape))
    return NamedSharding(mesh, logical_to_spec(axes, mesh, rules, shape))



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


def _unsplit_dims(axes: tuple[str | None, ...], mesh: Mesh, rules: dict[str, tuple[str, ...]],
                  shape: tuple[int, ...]) -> list[str]:
    """The dimensions `logical_to_spec` leaves unsplit because their size does not divide by their mesh axes."""
    used: set[str] = set()
    out = []
    for dim, name in enumerate(axes):
        mesh_axes = tuple(a for a in (rules.get(name, ()) if name else ()) if a not in used and mesh.shape[a] > 1)
        ways = math.prod(mesh.shape[a] for a in mesh_axes)
        if name == "kv_heads" and kv_head_mesh(mesh, shape[dim]) is not None:
            continue  # split over the KV groups (`kv_head_mesh`)
        if mesh_axes and shape[dim] % ways:
            over = " x ".join(f"{a}={mesh.shape[a]}" for a in mesh_axes)
            out.append(f"dim {dim} ({name}={shape[dim]}): {over} does not divide it")
        elif mesh_axes:
            used.update(mesh_axes)
    return out


@dataclass(frozen=True)
class MeshRules:
    """The mesh plus the ZeRO stage: the one place that turns logical axes into shardings.

    `context_zigzag`: with context > 1, the sequence is in the load-balanced zigzag layout of
    `parallel/context.py` (train.context_zigzag; train/step.py lays the batch out to match).

    `data_groups`: the program runs on one group of the batch per `data` rank, the group dimension
    vmapped over `data` (parallel/zero.py), so the `batch` rule leaves `data` out."""

    mesh: Mesh
    zero_stage: int = 0
    context_zigzag: bool = True
    data_groups: bool = False

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

    def unsplit_params(self, logical_axes: Any, shapes: Any) -> list[str]:
        """Why parameter dimensions stay replicated although their logical rule names a mesh axis of
        size > 1: `"wk dim 2 (kv_heads=4): tensor=8 does not divide it"`, one line per (parameter, dimension),
        for the parameters (stage 3) and the optimizer state (stages 1 and 3). The start-up banner prints them."""
        out: list[str] = []
        param_rules = ZERO_RULES if self.zero_stage >= 3 else LOGICAL_RULES
        opt_rules = ZERO_RULES if self.zero_stage >= 1 else LOGICAL_RULES
        flat_axes = jax.tree_util.tree_leaves_with_path(logical_axes, is_leaf=lambda x: isinstance(x, tuple))
        for (path, axes), sds in zip(flat_axes, jax.tree.leaves(shapes)):
            name = jax.tree_util.keystr(path, simple=True, separator=".")
            for what, rules in (("parameter", param_rules), ("optimizer state", opt_rules)):
                for reason in _unsplit_dims(axes, self.mesh, rules, sds.shape):
                    line = f"{name} {reason}: {what} replicated on that axis"
                    out.append(line)
        return list(dict.fromkeys(out))

    def param_shardings(self, logical_axes: Any, shapes: Any) -> Any:
        rules = ZERO_RULES if self.zero_stage >= 3 else LOGICAL_RULES
        return _map_axes(lambda ax, sh: sharding_for(self.mesh, ax, sh.shape, rules), logical_axes, shapes)

    def opt_param_shardings(self, logical_axes: Any, shapes: Any) -> Any:
        """Shardings of the optimizer's parameter-shaped leaves (and of ZeRO's reduce-scattered gradients)."""
        rules = ZERO_RULES if self.zero_stage >= 1 else LOGICAL_RULES
        return _map_axes(lambda ax, sh: sharding_for(self.mesh, ax, sh.shape, rules), logical_axes, shapes)

    def opt_state_shardings(self, tx: optax.GradientTransformation, abstract_opt_state: Any,
                            logical_axes: Any, shapes: Any) -> Any:
        """Moments shaped like parameters follow `opt_param_specs`; counters etc. are replicated."""
        shardings = self.opt_param_shardings(logical_axes, shapes)
        # tree_map_params maps over leaves shaped like params; everything else -> replicated.
        return optax.tree_map_params(
            tx,
            lambda _, sharding: sharding,
            abstract_opt_state,
            shardings,
            transform_non_params=lambda _: self.named(P()),
            is_leaf=lambda x: isinstance(x, NamedSharding),
        )

    # -- activations and batches -------------------------------------------------------------
    def activation_rules(self) -> dict[str, tuple[str, ...]]:
        if not self.data_groups:
            return LOGICAL_RULES
        return {**LOGICAL_RULES, "batch": tuple(a for a in LOGICAL_RULES["batch"] if a != ZERO_AXIS)}

    def activation_spec(self, axes: tuple[str | None, ...], shape: tuple[int, ...] | None = None) -> P:
        return logical_to_spec(axes, self.mesh, self.activation_rules(), shape)

    def constrain(self, x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
        """Pin an activation's layout. KV heads fewer than the tensor ranks (4 on tensor=8) sit on
        the ranks whose query heads use them (`kv_head_mesh`); another dimension that does not divide
        stays replicated."""
        return jax.lax.with_sharding_constraint(x, sharding_for(self.mesh, axes, x.shape, self.activation_rules()))

    def batch_sharding(self) -> NamedSharding:
        """[batch, seq] token arrays: rows over data x expert, sequence over context."""
        return self.named(self.activation_spec(("batch", "seq")))

    def mesh_axes(self, *logical: str) -> tuple[str, ...]:
        """The mesh axes (of size > 1) that these logical axes are split over, in rule order: e.g.
        `mesh_axes("batch")` are the axes a per-example sum must be reduced over, `mesh_axes("batch",
        "seq")` those of a per-token sum. Callers derive reductions from the table, never spell axes."""
        out: list[str] = []
        rules = self.activation_rules()
        for name in logical:
            out.extend(a for a in rules.get(name, ()) if self.mesh.shape[a] > 1 and a not in out)
        return tuple(out)

    def sequence_order(self, seq_len: int) -> np.ndarray:
        """Natural position of each sequence column in this layout (arange unless zigzag)."""
        return sequence_order(seq_len, self.mesh.shape[LOGICAL_RULES["seq"][0]], self.context_zigzag)


# ------------------------------------------------------------------------------ sequence layout


def zigzag_order(seq_len: int, context: int) -> np.ndarray:
    """Natural position of each layout column: context rank i holds chunks i and 2c-1-i of the 2c
    chunks, so every rank does the same causal work (parallel/context.py)."""
    if seq_len % (2 * context):
        raise ValueError(f"seq_len {seq_len} is not divisible by 2 x context = {2 * context}")
    chunks = np.arange(seq_len).reshape(2 * context, seq_len // (2 * context))
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * context - 1 - i]]) for i in range(context)])


def sequence_order(seq_len: int, context: int, zigzag: bool) -> np.ndarray:
    """The layout's column -> natural position map (arange unless zigzag with context > 1)."""
    if context > 1 and zigzag:
        return zigzag_order(seq_len, context)
    return np.arange(seq_len)


def _map_axes(fn, logical_axes: Any, shapes: Any) -> Any:
    return jax.tree.map(fn, logical_axes, shapes, is_leaf=lambda x: isinstance(x, tuple))


def bytes_per_device(shapes: Any, shardings: Any) -> int:
    """Bytes one device holds for arrays with these shapes under these shardings."""
    total = 0
    for sds, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
        total += jnp.dtype(sds.dtype).itemsize * math.prod(sh.shard_shape(sds.shape))
    return total
